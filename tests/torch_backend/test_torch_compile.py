"""``torch.compile(fullgraph=True)`` of ``bn1d.backends.torch`` layers (slow on 2 cores: few tests).

The training step (forward and backward) of a layer, of a masked layer and of a
converted model compiles as one graph (``fullgraph=True`` raises on any graph break)
and gives eager's numbers; half-precision input keeps R2.5's float32 statistics and
the accuracy rule (R2.7) under Inductor too. (The synced gloo path compiled is in
``test_torch_distributed.py``.) Eager runs PyTorch's kernels, compiled the core
(Inductor fuses and reorders its reductions) on the same float32 data, so they
agree to a few ulps: 1e-5 absolute and relative on O(1) values (parameter gradients
sum 15 to 60 terms).
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from bn1d.backends.torch import BatchNorm1d  # noqa: E402

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")


def test_compiled_training_step_equals_eager_without_graph_breaks():
    torch.manual_seed(0)
    layer = BatchNorm1d(4, momentum=0.9, scale_initializer=torch.tensor([1.0, 2.0, 0.5, -1.0]))
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True)
    for step in range(2):
        x, dy = torch.randn(3, 5, 4) * 2 + 1, torch.randn(3, 5, 4)
        x_eager, x_compiled = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_eager, y_compiled = eager(x_eager), compiled(x_compiled)
        y_eager.backward(dy)
        y_compiled.backward(dy)
        torch.testing.assert_close(y_compiled, y_eager, rtol=TOL, atol=TOL, msg=f"step {step} y")
        torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=TOL, atol=TOL, msg=f"step {step} dx")
        for name in ("scale", "bias"):
            torch.testing.assert_close(getattr(layer, name).grad, getattr(eager, name).grad, rtol=TOL, atol=TOL)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(layer, name), getattr(eager, name), rtol=TOL, atol=TOL, msg=name)
    x = torch.randn(2, 7, 4)
    torch.testing.assert_close(compiled(x, training=False), eager(x, training=False), rtol=TOL, atol=TOL)


def test_masked_layer_compiles_to_one_graph_with_eager_results():
    # The mask path runs the core (array-api-compat on torch) with no graph break. The layer
    # must stay correct across calls: the running statistics it copies into after the core
    # call must not be tensors a compiled graph saved for backward.
    torch.manual_seed(1)
    layer = BatchNorm1d(3)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True)
    for step in range(2):
        x, mask = torch.randn(4, 5, 3) + 2, torch.rand(4, 5) < 0.6
        x_eager, x_compiled = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_eager, y_compiled = eager(x_eager, mask), compiled(x_compiled, mask)
        (y_eager**3).sum().backward()
        (y_compiled**3).sum().backward()
        torch.testing.assert_close(y_compiled, y_eager, rtol=TOL, atol=TOL, msg=f"step {step} y")
        torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=TOL, atol=TOL, msg=f"step {step} dx")
        torch.testing.assert_close(layer.running_var, eager.running_var, rtol=TOL, atol=TOL)
        torch.testing.assert_close(layer.scale.grad, eager.scale.grad, rtol=TOL, atol=TOL)


def test_a_converted_model_compiles_to_one_graph_and_trains_as_eager():
    """A Conv2d + BatchNorm2d block and a Linear + BatchNorm1d head ((N, C) input),
    converted, two SGD steps and an evaluation, compiled against eager."""
    from torch import nn

    from bn1d.backends.torch import convert_batchnorm

    torch.manual_seed(2)
    model = convert_batchnorm(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 6),
        nn.BatchNorm1d(6, momentum=None), nn.ReLU(), nn.Linear(6, 3),
    ))  # fmt: skip
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    for step in range(2):
        x, target = torch.randn(8, 2, 5, 5) * 2 + 1, torch.randint(0, 3, (8,))
        for call, optimizer in zip((compiled, eager), optimizers):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(call(x), target).backward()
            optimizer.step()
        for (key, ours), theirs in zip(model.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(ours, theirs, rtol=TOL, atol=TOL, msg=f"step {step} {key}")
    model.eval()
    eager.eval()
    x = torch.randn(4, 2, 5, 5)
    torch.testing.assert_close(compiled(x), eager(x), rtol=TOL, atol=TOL)


def test_compiled_half_input_keeps_float32_statistics_and_the_rule():
    """bfloat16 and float16 input at |mean| / std = 30, n = 2**15 per feature, both
    layouts: the compiled layer's running statistics are float32 and, with its
    parameter gradients, meet the accuracy rule against the float64 computation on
    the same half values (y and dx are rounded to half: their own tolerance, the
    layer tests'). The eager (native) path is held to the same."""
    import numpy as np

    from bn1d.backends import numpy as spec
    from bn1d.conformance.accuracy import RULE, forward_errors, gradient_errors, raw_data

    for dtype in (torch.bfloat16, torch.float16):
        for axis, shape, feature_axis in (((0, 1), (32, 1024, 4), 2), ((0, 2), (32, 4, 1024), 1)):
            x = torch.from_numpy(raw_data(shape, 30.0, seed=1)).to(dtype)
            dy = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
            x64, dy64 = x.double().numpy(), dy.double().numpy()
            want = spec.BatchNorm1d(4, axis=axis, dtype=np.float64).vjp(x64, dy64)
            for compiled in (False, True):
                layer = BatchNorm1d(4, axis=axis, momentum=0.0)
                call = torch.compile(layer, fullgraph=True) if compiled else layer
                xt = x.clone().requires_grad_(True)
                call(xt).backward(dy)
                assert layer.running_mean.dtype == layer.running_var.dtype == torch.float32
                mean, var = (v.double().numpy() for v in (layer.running_mean, layer.running_var))
                errors = forward_errors(x64, want["x"] * 0, mean, var, feature_axis=feature_axis)
                errors.pop("y")  # not compared here (y = 0 passed)
                grads = {"x": want["x"], "scale": layer.scale.grad.double().numpy(),
                         "bias": layer.bias.grad.double().numpy()}  # fmt: skip
                errors.update(gradient_errors(x64, dy64, grads, want, feature_axis=feature_axis))
                errors.pop("dx")
                assert max(errors.values()) <= RULE, (dtype, axis, compiled, errors)
                dx_tol = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # one ulp of |dx| <= 1 (layer tests)
                np.testing.assert_allclose(xt.grad.double().numpy(), want["x"], rtol=dx_tol, atol=dx_tol)


def test_a_compiled_layer_takes_batches_of_every_size_without_recompiling_per_size():
    """Batch sizes 3 * 2**j, j = 0..9: with automatic dynamic shapes PyTorch compiles
    twice (the first size, then a dynamic one). A Python decision on the symbolic batch
    size (the core once chose how many rows to fold into its float64 sums from it) is a
    guard that fails for each new power of two dividing it: a recompilation per size,
    and with ``fullgraph=True`` a hard error at the recompile limit (8)."""
    torch._dynamo.reset()
    layer = BatchNorm1d(4)
    compiled = torch.compile(layer, fullgraph=True)
    eager = copy.deepcopy(layer)
    for j in range(10):
        x = torch.randn(3 * 2**j, 5, 4)
        xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yc, ye = compiled(xc), eager(xe)
        yc.sum().backward(), ye.sum().backward()
        assert torch.allclose(yc, ye, rtol=TOL, atol=TOL)
        assert torch.allclose(xc.grad, xe.grad, rtol=TOL, atol=TOL)
