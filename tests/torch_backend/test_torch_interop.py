"""Conversion between ``bn1d.backends.torch.BatchNorm1d`` and ``torch.nn.BatchNorm1d``
(docs/spec.md R6.7): layout (PyTorch's ``(N, C, L)`` is ``axis=(0, 2)``, its ``(N, C)``
is ``axis=0``), momentum ``1 - m``, running statistics and ``num_batches_tracked``.

Both layers run PyTorch's float32 kernel on the same data, so they agree to the
last bits except where the two formulas differ in rounding order (BrainPy folds
``scale`` into the inverse standard deviation, PyTorch does not; the momentum
``0.9`` is stored as ``1 - 0.1``; bn1d updates the running statistics from the batch's
float32 statistics, PyTorch's kernel from its float64 sums): 1e-6 absolute and relative
on O(1) values, a few float32 ulps, over several training steps.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bn1d.backends import numpy as spec  # noqa: E402
from bn1d.backends.torch import BatchNorm1d  # noqa: E402

TOL = 1e-6


def close(actual, expected, what, tol=TOL):
    np.testing.assert_allclose(actual.detach().double().numpy(), expected.detach().double().numpy(), rtol=tol,
                               atol=tol, err_msg=what)  # fmt: skip


def trained_torch_module(c, shape, steps=3, **kwargs):
    torch.manual_seed(0)
    module = nn.BatchNorm1d(c, **kwargs)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    for _ in range(steps):
        module(torch.randn(shape) * 2 + 1)
    return module


PYTORCH_OPTIONS = [
    pytest.param(dict(momentum=0.1, eps=1e-3), id="momentum"),
    pytest.param(dict(momentum=None), id="cumulative"),  # bn1d's momentum=None
    pytest.param(dict(track_running_stats=False), id="untracked"),  # batch statistics in eval too
]


@pytest.mark.parametrize("options", PYTORCH_OPTIONS)
@pytest.mark.parametrize("shape, axis", [((4, 3, 6), (0, 2)), ((8, 3), 0)], ids=["NCL", "NC"])
def test_from_torch_then_train_side_by_side(shape, axis, options):
    """PyTorch's layer is an independent implementation of the same semantics,
    the cumulative average and untracked statistics included."""
    module = trained_torch_module(3, shape, **options)
    layer = BatchNorm1d.from_torch(module, axis=axis)
    tracked = module.track_running_stats
    assert layer.config.reduce_axes == ((0, 2) if axis == (0, 2) else (0,))
    assert layer.config.epsilon == module.eps and layer.training
    assert layer.config.momentum == (None if module.momentum is None else round(1 - module.momentum, 15))
    assert layer.config.track_running_stats == tracked
    assert list(layer.state_dict()) == [
        {"weight": "scale"}.get(key, key) for key in module.state_dict() if tracked and module.momentum is None
        or key != "num_batches_tracked"
    ]  # fmt: skip
    if tracked:
        assert int(layer.num_batches_tracked) == 3
    torch.manual_seed(1)
    for step in range(4):
        x = torch.randn(shape) * 3 - 1
        dy = torch.randn(shape)
        x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_ours, y_theirs = layer(x_ours), module(x_theirs)
        y_ours.backward(dy)
        y_theirs.backward(dy)
        close(y_ours, y_theirs, f"step {step} y")
        close(x_ours.grad, x_theirs.grad, f"step {step} dx")
        close(layer.scale.grad, module.weight.grad, f"step {step} dscale", 1e-5)  # sums of 24 terms
        if tracked:
            close(layer.running_mean, module.running_mean, f"step {step} running_mean")
            close(layer.running_var, module.running_var, f"step {step} running_var")
        layer.zero_grad()
        module.zero_grad()
    if tracked:
        assert int(layer.num_batches_tracked) == int(module.num_batches_tracked) == 7
    layer.eval()
    module.eval()
    x = torch.randn(shape)
    close(layer(x), module(x), "inference y")
    back = layer.to_torch()
    assert (back.momentum, back.track_running_stats) == (module.momentum, tracked)
    close(back(x), module(x), "converted back, inference y")


def test_to_torch_round_trip():
    layer = BatchNorm1d(3, axis=(0, 2), momentum=0.9, epsilon=1e-3, scale_initializer=np.array([1.0, 2.0, 0.5]))
    for _ in range(3):
        layer(torch.randn(4, 3, 6) * 2 + 1)
    layer.eval()
    module = layer.to_torch()
    assert isinstance(module, nn.BatchNorm1d) and not module.training
    assert module.momentum == 0.1 and module.eps == 1e-3 and module.affine and module.track_running_stats
    assert int(module.num_batches_tracked) == 3
    x = torch.randn(5, 3, 7)
    close(module(x), layer(x), "inference y")
    module.train()
    layer.train()
    close(module(x), layer(x), "training y")
    close(module.running_var, layer.running_var, "running_var")
    back = BatchNorm1d.from_torch(module)
    assert back.config == layer.config
    for key, value in module.state_dict().items():  # the round trip keeps every bit
        assert torch.equal(back.to_torch().state_dict()[key], value), key
    for key, value in layer.state_dict().items():  # trained by bn1d and by PyTorch: a few ulps apart
        close(back.state_dict()[key], value, key)


def test_to_torch_without_affine_and_in_float64():
    layer = BatchNorm1d(3, axis=0, affine=False, dtype=torch.float64)
    layer(torch.randn(8, 3, dtype=torch.float64))
    module = layer.to_torch()
    assert not module.affine and module.running_var.dtype == torch.float64
    x = torch.randn(6, 3, dtype=torch.float64)
    np.testing.assert_allclose(module.eval()(x).numpy(), layer.eval()(x).numpy(), rtol=1e-12, atol=1e-12)


def test_torch_state_reaches_the_numpy_specification():
    module = trained_torch_module(3, (4, 3, 6))
    layer = BatchNorm1d.from_torch(module)
    reference = spec.BatchNorm1d(3, axis=(0, 2), momentum=0.9)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(4, 3, 6)
    np.testing.assert_allclose(reference(x.numpy(), training=False), module.eval()(x).detach().numpy(), rtol=1e-6,
                               atol=1e-6)  # fmt: skip


CONVERSION_ERRORS = [
    (lambda: BatchNorm1d.from_torch(nn.BatchNorm2d(3)), TypeError, r"^module: expected a torch\.nn\.BatchNorm1d"),
    (lambda: BatchNorm1d(3, fast_variance=True).to_torch(), ValueError, r"^fast_variance: expected False"),
    (lambda: BatchNorm1d(3, unbiased_running_var=False).to_torch(), ValueError, r"^unbiased_running_var: expected"),
    (lambda: BatchNorm1d(3, axis_name="batch").to_torch(), ValueError, r"^axis_name: expected None"),
]


@pytest.mark.parametrize("convert, exception, pattern", CONVERSION_ERRORS)
def test_conversion_errors(convert, exception, pattern):
    with pytest.raises(exception, match=pattern):
        convert()


def test_from_torch_refuses_frozen_statistics_naming_the_module():
    """``track_running_stats = False`` set on a module that keeps its running statistics
    (batch statistics in training, the frozen ones in evaluation) has no plain-layer
    equivalent: a ``ValueError`` naming ``module`` and pointing to the conversion, which
    keeps PyTorch's class and so its frozen statistics (``convert_batchnorm``)."""
    module = nn.BatchNorm1d(3)
    module.track_running_stats = False
    with pytest.raises(ValueError, match=r"^module: expected .*track_running_stats.*got .*running statistics kept"):
        BatchNorm1d.from_torch(module)
    from bn1d.backends.torch import convert_batchnorm

    converted = convert_batchnorm(module)
    assert converted is module and not converted.track_running_stats and converted.running_mean is not None


MOMENTA = [1 / 3, 0.1, 0.01, 0.3, 0.7, 0.0, 1.0, 0.5, 0.9, 0.99, 0.123456789, 2 / 3, 1e-20, 5e-324]
RANDOM_MOMENTA = [float(v) for v in np.random.default_rng(0).uniform(0, 1, 200)] + [
    float(v) for v in 10.0 ** np.random.default_rng(1).uniform(-12, 0, 100)
]


def test_from_torch_then_to_torch_gives_back_every_momentum():
    """PyTorch's ``p`` becomes bn1d's nearest float to ``1 - p`` and comes back as ``p``
    itself (every float in [0, 1]); bn1d's ``m`` through ``to_torch``/``from_torch`` too."""
    for p in MOMENTA + RANDOM_MOMENTA:
        layer = BatchNorm1d.from_torch(nn.BatchNorm1d(3, momentum=p))
        assert abs(layer.config.momentum - (1 - p)) <= 2**-53, p
        assert layer.to_torch().momentum == p, p
    for m in MOMENTA + RANDOM_MOMENTA:
        module = BatchNorm1d(3, axis=(0, 2), momentum=m).to_torch()
        assert abs(module.momentum - (1 - m)) <= 2**-53, m
        assert BatchNorm1d.from_torch(module).config.momentum == m, m
    assert BatchNorm1d.from_torch(nn.BatchNorm1d(3, momentum=1 / 3)).to_torch().momentum == 1 / 3


def test_torch_momentum_is_its_own_inverse_where_a_function_can_be():
    """``torch_momentum`` alone (no layer remembering the value it came from): the
    nearest-float ``1 - m``, the shortest decimal where several floats map to one, so
    that it is its own inverse on every float in [0.5, 1] (bn1d's usual momenta, and
    PyTorch's above 0.5) and on the short decimals below (0.1, 1/3 as 0.3333333333333333).
    Below 0.5 floats are denser than near 1, so no function inverts every one of them:
    the layers remember the momentum they were converted from."""
    from bn1d.backends.formats import torch_momentum

    assert torch_momentum(0.99) == 0.01 and torch_momentum(0.01) == 0.99 and torch_momentum(0.9) == 0.1
    assert torch_momentum(1.0) == 0.0 and torch_momentum(0.0) == 1.0 and torch_momentum(0.5) == 0.5
    for m in [1 / 3, 0.1, 0.01, 0.3, 0.7, 0.001, 1e-5, 0.123456789, 2 / 3] + [
        float(v) for v in np.random.default_rng(2).uniform(0.5, 1, 1000)
    ]:
        assert torch_momentum(torch_momentum(m)) == m, m
        assert abs(torch_momentum(m) - (1 - m)) <= 2**-53, m
