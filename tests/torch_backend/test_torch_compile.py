"""``torch.compile`` of ``bn1d.backends.torch.BatchNorm1d`` (slow on 2 cores: two tests).

The training step (forward and backward, native path) compiles as one graph
(``fullgraph=True`` raises on any graph break) and gives eager's numbers. Both
run float32 kernels on the same data; Inductor fuses and reorders the
reductions, so they agree to a few ulps: 1e-5 absolute and relative on O(1)
values (parameter gradients sum 15 terms).
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from bn1d.backends.torch import BatchNorm1d  # noqa: E402

TOL = 1e-5


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


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_masked_layer_compiles_to_eager_results():
    # The mask path runs the core (array-api-compat on torch); aot_eager traces it through
    # AOTAutograd without Inductor's compile time. The core breaks the graph once
    # (bn1d.algorithm.static_count passes a generator to math.prod), and the layer must
    # stay correct across that break: the running statistics it copies into after the
    # core call must not be tensors a compiled graph saved for backward.
    torch.manual_seed(1)
    layer = BatchNorm1d(3)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="aot_eager")
    x, mask = torch.randn(4, 5, 3) + 2, torch.rand(4, 5) < 0.6
    x_eager, x_compiled = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_eager, y_compiled = eager(x_eager, mask), compiled(x_compiled, mask)
    (y_eager**3).sum().backward()
    (y_compiled**3).sum().backward()
    torch.testing.assert_close(y_compiled, y_eager, rtol=TOL, atol=TOL)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=TOL, atol=TOL)
    torch.testing.assert_close(layer.running_var, eager.running_var, rtol=TOL, atol=TOL)
