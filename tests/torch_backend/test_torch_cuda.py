"""The PyTorch backend on CUDA tensors and over NCCL.

These run only where a GPU is present (the project's CI machines have none; they
skip there, and say so). On a GPU machine: ``pytest tests/torch_backend/test_torch_cuda.py``.

Tolerance: CUDA and CPU kernels reduce in different orders (and cuDNN may use
another algorithm), both in float32 over <= 2**15 terms: 1e-5 relative.
"""

import datetime
import os
import tempfile

import numpy as np
import pytest
import torch

from bn1d.backends.torch import BatchNorm1d

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = dict(rtol=1e-5, atol=1e-5)


def run_both(layer_kwargs, x, mask=None):
    results = []
    for device in ("cpu", "cuda"):
        layer = BatchNorm1d(**layer_kwargs, device=device)
        xd = x.to(device).requires_grad_()
        y = layer(xd, mask=None if mask is None else mask.to(device))
        y.square().sum().backward()
        results.append((y.detach().cpu(), xd.grad.cpu(), {k: v.detach().cpu() for k, v in layer.state_dict().items()}))
    return results


@pytest.mark.parametrize(
    "layer_kwargs, shape, masked",
    [
        (dict(num_features=64), (8, 128, 64), False),  # native kernel, channels last
        (dict(num_features=64, axis=(0, 2)), (8, 64, 128), False),  # native kernel, channel-first
        (dict(num_features=64), (8, 128, 64), True),  # the core, with a mask
        (dict(num_features=64, fast_variance=True), (8, 128, 64), False),  # the core
    ],
)
def test_cuda_equals_cpu(layer_kwargs, shape, masked):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1
    mask = (torch.rand(shape[:-1]) < 0.7) if masked else None
    (y_cpu, dx_cpu, s_cpu), (y_gpu, dx_gpu, s_gpu) = run_both(layer_kwargs, x, mask)
    torch.testing.assert_close(y_gpu, y_cpu, **TOL)
    torch.testing.assert_close(dx_gpu, dx_cpu, **TOL)
    for key in s_cpu:
        torch.testing.assert_close(s_gpu[key], s_cpu[key], **TOL)


def test_half_precision_on_cuda_keeps_float32_statistics():
    x = torch.randn(8, 128, 64, device="cuda", dtype=torch.bfloat16) + 30
    layer = BatchNorm1d(64, device="cuda")
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.running_mean.dtype == torch.float32
    np.testing.assert_allclose(
        layer.running_mean.cpu().numpy(), 0.01 * x.float().mean(dim=(0, 1)).cpu().numpy(), rtol=1e-4
    )


def test_synced_over_nccl_equals_unsynced_on_one_rank():
    """A one-rank NCCL group: the collectives (and their backward) run on the GPU."""
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as scratch:
        dist.init_process_group(
            "nccl", init_method=f"file://{os.path.join(scratch, 'rendezvous')}", rank=0, world_size=1,
            timeout=datetime.timedelta(seconds=60),
        )  # fmt: skip
        try:
            torch.manual_seed(1)
            x = torch.randn(8, 128, 64, device="cuda")
            synced, plain = BatchNorm1d(64, axis_name="data", device="cuda"), BatchNorm1d(64, device="cuda")
            xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
            ys, yp = synced(xs), plain(xp)
            ys.square().sum().backward()
            yp.square().sum().backward()
            torch.testing.assert_close(ys, yp, **TOL)
            torch.testing.assert_close(xs.grad, xp.grad, **TOL)
            torch.testing.assert_close(synced.running_var, plain.running_var, **TOL)
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("axis, shape, feature_axis", [((0, 1), (64, 4096, 4), 2), ((0, 2), (64, 4, 4096), 1)])
@pytest.mark.parametrize("ratio", [0.25, 1e4])
def test_raw_data_on_cuda_meet_the_accuracy_rule(axis, shape, feature_axis, ratio):
    """The contract's rule at n = 2**18 on the CUDA kernels' route (torch_kernels counts
    CUDA reductions as 64-row trees: this is the measurement behind that assumption)."""
    from bn1d.conformance.accuracy import RULE, forward_errors, raw_data

    x = raw_data(shape, ratio, seed=3).astype(np.float32)
    layer = BatchNorm1d(4, axis, momentum=0.0, device="cuda")
    with torch.no_grad():
        y = layer(torch.from_numpy(x).cuda())
    errors = forward_errors(x, y.double().cpu().numpy(), layer.running_mean.double().cpu().numpy(),
                            layer.running_var.double().cpu().numpy(), feature_axis=feature_axis)  # fmt: skip
    assert max(errors.values()) <= RULE, errors
