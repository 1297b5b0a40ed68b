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


@pytest.mark.parametrize("exchange", ["all_gather", "all_reduce"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_synced_over_nccl_equals_unsynced_on_one_rank(monkeypatch, exchange, compiled):
    """A one-rank NCCL group: the collectives (and their backward) run on the GPU, with
    either exchange (``torch_distributed.Reduce`` forced on one rank), eagerly and under
    ``torch.compile(fullgraph=True)`` (the functional collectives on NCCL); then
    ``sync_running_statistics`` over NCCL (the mean over one rank: the statistics)."""
    import torch.distributed as dist

    from bn1d.backends import torch_distributed
    from bn1d.backends.torch import sync_running_statistics

    if exchange == "all_reduce":
        monkeypatch.setattr(torch_distributed, "ALL_GATHER_MAX_RANKS", 0)
    with tempfile.TemporaryDirectory() as scratch:
        dist.init_process_group(
            "nccl", init_method=f"file://{os.path.join(scratch, 'rendezvous')}", rank=0, world_size=1,
            timeout=datetime.timedelta(seconds=60),
        )  # fmt: skip
        try:
            torch.manual_seed(1)
            synced, plain = BatchNorm1d(64, axis_name="data", device="cuda"), BatchNorm1d(64, device="cuda")
            call = torch.compile(synced, fullgraph=True) if compiled else synced
            for _ in range(2):  # the second call of the all-reduce shifts by the first call's mean
                x = torch.randn(8, 128, 64, device="cuda") * 2 + 3
                xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
                ys, yp = call(xs), plain(xp)
                ys.square().sum().backward()
                yp.square().sum().backward()
                torch.testing.assert_close(ys, yp, **TOL)
                torch.testing.assert_close(xs.grad, xp.grad, **TOL)
                torch.testing.assert_close(synced.running_var, plain.running_var, **TOL)
            if exchange == "all_reduce":
                assert synced._sync.agreed_shift is not None and synced._sync.agreed_shift.device.type == "cuda"
            before = synced.running_mean.clone()
            sync_running_statistics(synced)
            torch.testing.assert_close(synced.running_mean, before, rtol=0, atol=0)
        finally:
            dist.destroy_process_group()


def test_a_converted_cuda_model_stays_on_cuda_and_trains_as_pytorch():
    """Every batch-norm class converted on the GPU (bn1d's drop-ins): same device and
    tensors, and three SGD steps equal to PyTorch's CUDA layers (TOL: the two reduce in
    different orders)."""
    import copy

    from torch import nn

    from bn1d.backends.torch_nn import convert_batchnorm, revert_batchnorm

    torch.manual_seed(2)
    theirs = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(2), nn.BatchNorm1d(4),
        nn.Flatten(), nn.Linear(4 * 36, 5), nn.SyncBatchNorm(5), nn.Linear(5, 3),
    ).cuda()  # fmt: skip
    ours = convert_batchnorm(copy.deepcopy(theirs))
    assert all(t.device.type == "cuda" for t in ours.state_dict().values())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (theirs, ours)]
    for _ in range(3):
        x = torch.randn(8, 2, 6, 6, device="cuda") * 2 + 1
        target = torch.randint(0, 3, (8,), device="cuda")
        for model, optimizer in zip((theirs, ours), optimizers):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()
    for (key, value), ours_value in zip(theirs.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(ours_value, value, **TOL, msg=key)
    revert_batchnorm(ours)
    assert type(ours[1]) is nn.BatchNorm2d and ours[1].weight.device.type == "cuda"


def test_functional_call_vmaps_an_ensemble_on_cuda():
    import copy

    from torch import nn

    from bn1d.backends.torch import convert_batchnorm
    from bn1d.backends.torch_func import functional_call

    models = [convert_batchnorm(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))).cuda() for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(6, 5, device="cuda")
    y, new_buffers = torch.func.vmap(lambda p, b: functional_call(base, {**p, **b}, (x,)))(params, buffers)
    for i, model in enumerate(models):
        torch.testing.assert_close(y[i], model(x), **TOL)
        torch.testing.assert_close(new_buffers["1.running_var"][i], model[1].running_var, **TOL)


def test_strided_half_input_keeps_float32_parameter_gradients_on_cuda():
    """A transposed (N, C) bfloat16 input on CUDA against the same values made contiguous
    (the contiguous path is checked against the specification on the CPU): the parameter
    gradients are float32 sums, TOL."""
    values = (torch.randn(3, 4096, device="cuda") * 2 + 1).to(torch.bfloat16)
    dy = torch.randn(4096, 3, device="cuda").to(torch.bfloat16)
    grads = []
    for x in (values.t(), values.t().contiguous()):
        layer = BatchNorm1d(3, axis=0, device="cuda")
        layer(x.detach().requires_grad_()).backward(dy)
        grads.append((layer.scale.grad, layer.bias.grad))
    for strided, contiguous in zip(*grads):
        torch.testing.assert_close(strided, contiguous, **TOL)


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


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_a_training_call_never_synchronises_the_device_with_the_host(momentum):
    """The drop-ins and the BrainPy-signature layer on CUDA run the core (no host check of
    the kernels' statistics, no data-dependent branch): under
    ``torch.cuda.set_sync_debug_mode("error")`` a training forward and backward, then an
    inference call, raise nothing."""
    from bn1d.backends import torch_nn

    layers = [torch_nn.BatchNorm2d(8, momentum=momentum).cuda(), BatchNorm1d(8, axis=(0, 2, 3), device="cuda")]
    x = (torch.randn(16, 8, 12, 12, device="cuda") * 3 + 1e3).requires_grad_()
    for layer in layers:
        layer(x).sum().backward()  # warm-up: allocator, kernels' first launches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in layers:
            layer.train()
            layer(x).square().sum().backward()
            layer.eval()
            layer(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
