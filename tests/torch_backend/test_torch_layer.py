"""The PyTorch layer against the NumPy specification in one process.

Forward, running statistics and autograd gradients are compared with the float64
NumPy backend (``BatchNorm1d.__call__`` and its analytic ``vjp``) in training and
inference, with and without masks, for every layout of R1.3 (docs/spec.md), for
float16/bfloat16/float32/float64 input, on both execution paths (PyTorch's
native kernel and the core); then edge counts, options, errors (R7.1),
state (R6.1-R6.6) and the PyTorch idioms (functional_call, autocast, devices).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bn1d.backends import numpy as spec  # noqa: E402
from bn1d.backends import torch_functional  # noqa: E402
from bn1d.backends.torch import BatchNorm1d  # noqa: E402
from bn1d.protocol import BatchNormLayer  # noqa: E402

#: Absolute and relative tolerance against the float64 specification, by input dtype.
#: float32: inputs ~3 +- 1.5, statistics over <= 30 values: a few 1e-7 absolute error in
#: y (|y| < 6), in dx and in running statistics; parameter gradients sum <= 30 terms.
#: 2e-5 is ~20x that and far below what a real mistake (a wrong count, Bessel factor,
#: momentum or axis) changes (> 1e-3). float64: only summation order differs: 1e-10.
#: float16/bfloat16: y and dx are rounded to the input dtype (half an ulp: 2**-11 and
#: 2**-8 relative), so one ulp of the dtype, 2**-10 and 2**-7, relative and absolute;
#: their statistics and parameter gradients are float32, computed from the same
#: (rounded) inputs: the float32 tolerance.
TOL = {"float32": 2e-5, "float64": 1e-10, "float16": 2.0**-10, "bfloat16": 2.0**-7}
FLOAT32_TOL = 2e-5

#: (name, axis, input shape): R1.3's layouts, negative axes, and the
#: feature axis first (PyTorch's kernel sees it through movedim).
LAYOUTS = [
    ("BLC", (0, 1), (4, 5, 3)),
    ("BC", 0, (6, 3)),
    ("BCL", (0, 2), (4, 3, 5)),
    ("BLC-negative", (-3, -2), (4, 5, 3)),
    ("BCL-negative", (0, -1), (4, 3, 5)),
    ("CBL", (1, 2), (3, 4, 5)),
]
STATE = {"running_mean": np.array([0.5, -1.0, 2.0]), "running_var": np.array([2.0, 0.5, 1.5])}
PARAMS = {"scale": np.array([1.5, -0.5, 2.0]), "bias": np.array([0.1, 0.2, -0.3])}
KWARGS = dict(momentum=0.9, scale_initializer=PARAMS["scale"], bias_initializer=PARAMS["bias"])


def feature_axis_of(axis, ndim):
    axes = {a % ndim for a in ((axis,) if isinstance(axis, int) else axis)}
    return next(a for a in range(ndim) if a not in axes)


def data(shape, feature_axis, dtype, seed=0, masked=False, offset=3.0, spread=1.5):
    """x, dy (rounded to ``dtype``, as float64 NumPy) and a mask or None."""
    rng = np.random.default_rng(seed)
    x = torch.tensor(offset + spread * rng.standard_normal(shape)).to(getattr(torch, dtype)).double().numpy()
    dy = torch.tensor(rng.standard_normal(shape)).to(getattr(torch, dtype)).double().numpy()
    mask = None
    if masked:
        mask = rng.random(tuple(s for a, s in enumerate(shape) if a != feature_axis)) < 0.7
    return x, dy, mask


def torch_grads(layer, x, dy, mask=None, training=None):
    """y and the autograd gradients of sum(y * dy), as float64 NumPy."""
    layer.zero_grad(set_to_none=True)
    xt = x.clone().requires_grad_(True)
    y = layer(xt, mask, training)
    y.backward(dy)
    grads = {"x": xt.grad}
    for key in ("scale", "bias"):
        if hasattr(layer, key):
            grads[key] = getattr(layer, key).grad
    return y, {k: v.double().numpy() for k, v in grads.items()}


def to_torch(array, dtype):
    return None if array is None else torch.tensor(array).to(getattr(torch, dtype))


def uses_native_kernel(y):
    """Whether PyTorch's batch-norm kernel is in y's autograd graph."""
    stack, seen = [y.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "NativeBatchNorm" in type(node).__name__:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def close(actual, expected, tol, what):
    actual, expected = (v.detach().double().numpy() if isinstance(v, torch.Tensor) else v for v in (actual, expected))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol, err_msg=what)


@pytest.mark.parametrize("native", [True, False], ids=["native", "core"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("name, axis, shape", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_matches_specification(name, axis, shape, dtype, masked, native):
    fa = feature_axis_of(axis, len(shape))
    param_dtype = "float64" if dtype == "float64" else "float32"
    layer = BatchNorm1d(3, axis, **KWARGS, dtype=getattr(torch, param_dtype), native_kernel=native)
    reference = spec.BatchNorm1d(3, axis, **KWARGS, dtype=np.float64)
    layer.load_state_dict({**STATE, **PARAMS})
    reference.load_state_dict({**STATE, **PARAMS})
    tol = TOL[dtype]
    for step in range(2):
        x, dy, mask = data(shape, fa, dtype, seed=step, masked=masked)
        want_grads = reference.vjp(x, dy, mask)
        want_y = reference(x, mask)
        y, grads = torch_grads(layer, to_torch(x, dtype), to_torch(dy, dtype), to_torch(mask, "bool"))
        assert y.dtype == getattr(torch, dtype) and y.shape == shape
        assert uses_native_kernel(y) == (native and not masked)
        close(y, want_y, tol, f"step {step} y")
        close(grads["x"], want_grads["x"], tol * max(1.0, np.abs(want_grads["x"]).max()), f"step {step} dx")
        for key in ("scale", "bias"):  # float32 (or float64) sums of <= 30 terms of size <= 6
            close(grads[key], want_grads[key], 10 * TOL[param_dtype], f"step {step} d{key}")
        for key in ("running_mean", "running_var"):
            assert getattr(layer, key).dtype == getattr(torch, param_dtype)
            close(getattr(layer, key), getattr(reference, key), TOL[param_dtype], f"step {step} {key}")
    # Inference: the running statistics, no update, gradients without the statistics' terms.
    x, dy, mask = data(shape, fa, dtype, seed=7, masked=masked)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    want_grads = reference.vjp(x, dy, mask, training=False)
    y, grads = torch_grads(layer, to_torch(x, dtype), to_torch(dy, dtype), to_torch(mask, "bool"), training=False)
    close(y, reference(x, mask, training=False), tol, "inference y")
    close(grads["x"], want_grads["x"], tol * max(1.0, np.abs(want_grads["x"]).max()), "inference dx")
    assert uses_native_kernel(y) == native
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_spec_section_8_reference_numbers():
    # BrainPy 2.8.2's numbers (R8.1), float32 throughout: 1e-6 is ~10 ulps.
    x = torch.tensor(np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32))
    for native in (True, False):
        layer = BatchNorm1d(3, native_kernel=native)
        y = layer(x)
        close(layer.running_mean, [0.000187764846, 0.000142188437, 0.00198892271], 1e-6, "running_mean")
        close(layer.running_var, [1.00352418, 0.99599659, 0.99568027], 1e-6, "running_var")
        close(y[3, 4], [0.59750485, -1.58767688, -1.17151904], 1e-6, "y[3, 4]")


@pytest.mark.parametrize("native", [True, False], ids=["native", "core"])
def test_variance_is_stable_at_large_mean(native):
    # mean 1e4, std 1e-2 in float32 (R2.7). The float32 mean itself is off by
    # up to half an ulp of 1e4 (4.9e-4), which moves the variance by (4.9e-4 / 1e-2)**2
    # = 2.4e-3 relative: 1e-2 bounds the two-pass result; the one-pass formula loses
    # everything (relative error ~1).
    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.standard_normal((64, 3))).astype(np.float32)
    want = x.astype(np.float64).var(axis=0, ddof=1)
    errors = {}
    for fast in (False, True):
        layer = BatchNorm1d(3, axis=0, momentum=0.0, fast_variance=fast, native_kernel=native)
        layer(torch.tensor(x))
        errors[fast] = np.max(np.abs(layer.running_var.double().numpy() - want) / want)
    assert errors[False] < 1e-2, errors
    assert errors[True] > 0.5, errors  # the test can tell the two formulas apart


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "core"])
def test_half_input_at_mean_300_has_float32_statistics(dtype, native):
    # BrainPy and Haiku return NaN here in float16 (R2.5, R2.7).
    x, dy, _ = data((8, 16, 3), 2, dtype, offset=300.0, spread=1.0)
    layer = BatchNorm1d(3, momentum=0.0, native_kernel=native)
    reference = spec.BatchNorm1d(3, momentum=0.0, dtype=np.float64)
    want_grads = reference.vjp(x, dy)
    y, grads = torch_grads(layer, to_torch(x, dtype), to_torch(dy, dtype))
    assert y.dtype == getattr(torch, dtype) and layer.running_var.dtype == torch.float32
    assert layer.scale.grad.dtype == torch.float32
    close(y, reference(x), TOL[dtype] * 4, "y")  # |y| < 4
    close(layer.running_mean, reference.running_mean, 300 * FLOAT32_TOL, "running_mean")  # |mean| = 300
    close(layer.running_var, reference.running_var, FLOAT32_TOL, "running_var")
    close(grads["x"], want_grads["x"], TOL[dtype] * max(1.0, np.abs(want_grads["x"]).max()), "dx")


def test_mixed_parameter_and_input_dtypes_use_the_core():
    # float64 statistics with float32 input: reduced in float64, y in float32 (1 rounding).
    x, dy, _ = data((4, 5, 3), 2, "float32")
    reference = spec.BatchNorm1d(3, **KWARGS, dtype=np.float64)
    want_y, want_grads = reference(x), reference.vjp(x, dy)
    layer = BatchNorm1d(3, **KWARGS, dtype=torch.float64)
    y, grads = torch_grads(layer, to_torch(x, "float32"), to_torch(dy, "float32"))
    assert y.dtype == torch.float32 and layer.running_var.dtype == torch.float64 and not uses_native_kernel(y)
    close(y, want_y, 1e-6, "y")  # ~one float32 rounding of |y| < 6
    close(grads["x"], want_grads["x"], 1e-6 * np.abs(want_grads["x"]).max(), "dx")  # idem
    close(grads["scale"], want_grads["scale"], 1e-10, "float64 dscale")  # reduced in float64
    close(layer.running_var, reference.running_var, 1e-12, "float64 running_var")
    # float64 input with float32 statistics: reduced in float64, statistics stored in float32
    # (the specification with float32 parameters does the same: 0.1 is not 0.1 in float32).
    layer = BatchNorm1d(3, **KWARGS)
    reference = spec.BatchNorm1d(3, **KWARGS)
    y, grads = torch_grads(layer, torch.tensor(x), torch.tensor(dy))
    assert y.dtype == torch.float64 and layer.running_var.dtype == torch.float32 and not uses_native_kernel(y)
    close(y, reference(x), 1e-10, "float64 y")
    close(layer.running_var, reference.running_var, 0, "float32 running_var")


@pytest.mark.parametrize("native", [True, False], ids=["native", "core"])
@pytest.mark.parametrize("option", [{"fast_variance": True}, {"unbiased_running_var": False}, {"affine": False}])
def test_options_match_specification(option, native):
    x, dy, _ = data((4, 5, 3), 2, "float32")
    kwargs = {**KWARGS, **option} if option.get("affine", True) else {"momentum": 0.9, **option}
    reference = spec.BatchNorm1d(3, **kwargs, dtype=np.float64)
    layer = BatchNorm1d(3, **kwargs, native_kernel=native)
    want_grads = reference.vjp(x, dy)
    y, grads = torch_grads(layer, torch.tensor(x, dtype=torch.float32), torch.tensor(dy, dtype=torch.float32))
    close(y, reference(x), FLOAT32_TOL, "y")
    assert grads.keys() == want_grads.keys()
    for key in grads:
        close(grads[key], want_grads[key], 10 * FLOAT32_TOL, key)
    close(layer.running_var, reference.running_var, FLOAT32_TOL, "running_var")
    # Only the native semantics (two-pass variance, unbiased running variance) use the native kernel.
    assert uses_native_kernel(y) == (native and "affine" in option)


def test_single_value_per_feature():
    layer = BatchNorm1d(3)
    with pytest.raises(ValueError, match=r"^x: expected more than 1 value per feature when training, got \(1, 1, 3\)$"):
        layer(torch.ones(1, 1, 3))
    assert layer.num_batches_tracked == 0
    # Known only at run time (a mask): no Bessel factor, no error (R3.5).
    x, _, _ = data((2, 2, 3), 2, "float32")
    mask = np.array([[True, False], [False, False]])
    reference = spec.BatchNorm1d(3, momentum=0.5, dtype=np.float64)
    layer = BatchNorm1d(3, momentum=0.5)
    close(layer(torch.tensor(x, dtype=torch.float32), torch.tensor(mask)), reference(x, mask), FLOAT32_TOL, "y")
    close(layer.running_var, reference.running_var, FLOAT32_TOL, "running_var")
    close(layer.running_var, [0.5, 0.5, 0.5], 0, "running_var = 0.5 * 1 + 0.5 * 0")


@pytest.mark.parametrize("native", [True, False], ids=["native", "core"])
def test_no_value_behaves_as_inference(native):
    layer = BatchNorm1d(3, **KWARGS, native_kernel=native)
    layer.load_state_dict({**STATE, **PARAMS})
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(torch.ones(0, 5, 3))
    assert y.shape == (0, 5, 3)
    x, dy, _ = data((4, 5, 3), 2, "float32")
    mask = np.zeros((4, 5), bool)
    reference = spec.BatchNorm1d(3, **KWARGS, dtype=np.float64)
    reference.load_state_dict({**STATE, **PARAMS})
    want_grads = reference.vjp(x, dy, mask)
    y, grads = torch_grads(layer, torch.tensor(x, dtype=torch.float32), torch.tensor(dy, dtype=torch.float32),
                           torch.tensor(mask))  # fmt: skip
    close(y, reference(x, training=False), FLOAT32_TOL, "y = the inference output")
    for key in grads:
        assert np.all(np.isfinite(grads[key])), key
        close(grads[key], want_grads[key], 10 * FLOAT32_TOL, key)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_gradients_never_reach_the_running_statistics():
    for native in (True, False):
        layer = BatchNorm1d(3, native_kernel=native)
        x = torch.randn(4, 5, 3, requires_grad=True)
        layer(x).pow(2).sum().backward()
        for name in ("running_mean", "running_var"):
            buffer = getattr(layer, name)
            assert not buffer.requires_grad and buffer.grad is None and buffer.grad_fn is None, name
        assert [name for name, _ in layer.named_parameters()] == ["scale", "bias"]


@pytest.mark.parametrize("axis, shape, hooked", [((0, 2), (16, 64, 128), True), ((0, 1), (16, 128, 64), False)])
def test_expanded_cotangent_gives_the_same_gradients(monkeypatch, axis, shape, hooked):
    # y.sum() sends a stride-0 gradient. On large inputs that take PyTorch's fused kernel
    # (here channel-first) the layer makes it contiguous (4x faster there) with a hook;
    # torch_kernels.NativeBatchNorm (channel-last, split statistics) does so in its
    # backward. The gradients must not change: float32 sums of 2048 terms, hence 1e-4
    # relative to the largest gradient.
    fa = feature_axis_of(axis, 3)
    x, _, _ = data(shape, fa, "float32")
    reference = spec.BatchNorm1d(64, axis, dtype=np.float64)
    want = reference.vjp(x, np.ones_like(x))
    layer = BatchNorm1d(64, axis)
    seen, original = [], torch_functional._contiguous_gradients

    def spy(grads):
        seen.append(grads[0].is_contiguous())
        return original(grads)

    monkeypatch.setattr(torch_functional, "_contiguous_gradients", spy)
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    layer(xt).sum().backward()
    assert seen == ([False] if hooked else []), "one non-contiguous gradient went through the hook"
    close(xt.grad, want["x"], 1e-4 * max(1.0, np.abs(want["x"]).max()), "dx")
    close(layer.scale.grad, want["scale"], 1e-4 * np.abs(want["bias"]).max(), "dscale")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(16, 32, 64), (512, 32)], ids=["NCL", "NC"])
@pytest.mark.parametrize("stride", ["transposed", "broadcast", "sliced"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_strided_gradients_below_the_hooked_size_give_the_specifications_gradients(dtype, shape, stride, training):
    """Below ``HOOKED_NUMEL`` values, 2-D and 3-D input keeps no hook: a strided gradient
    reaches PyTorch's strided backward kernel, as in ``nn.BatchNorm1d``, which must give the
    specification's gradients (the hook was there for 4-D strides that it permutes, half
    inputs and the speed of large ones). Drop-in layout ``(N, C, *)``, float32 and float64,
    against the float64 specification on the same values: each gradient within ``4 n u``
    of the sum of its terms' magnitudes (a recursive sum of ``n`` terms per feature is
    within ``n u`` of it; the broadcast gradient's ``dscale`` is 0 in exact arithmetic).
    Training and inference (the running statistics 0 and 1)."""
    from bn1d.backends import torch_nn

    assert math.prod(shape) < torch_functional.HOOKED_NUMEL
    axis = (0, 2) if len(shape) == 3 else 0
    x, _, _ = data(shape, 1, dtype)
    rng = np.random.default_rng(3)
    if stride == "transposed":  # a transpose downstream: the gradient is the transpose of a contiguous one
        dy_t = torch.tensor(rng.standard_normal(shape[::-1])).to(getattr(torch, dtype))
        dy_t = dy_t.permute(*reversed(range(len(shape))))
    elif stride == "broadcast":  # y.sum() and friends: stride 0
        dy_t = torch.tensor(rng.standard_normal(shape[1:2]), dtype=getattr(torch, dtype))
        dy_t = dy_t.view((1, -1) + (1,) * (len(shape) - 2)).expand(shape)
    else:  # every other element of a wider gradient
        dy_t = torch.tensor(rng.standard_normal(shape[:-1] + (2 * shape[-1],))).to(getattr(torch, dtype))[..., ::2]
    assert not dy_t.is_contiguous()
    dy = dy_t.double().numpy()
    mode = None if training else "inference"
    want = spec.BatchNorm1d(shape[1], axis, dtype=np.float64, mode=mode).vjp(x, dy)
    layer = torch_nn.BatchNorm1d(shape[1], dtype=getattr(torch, dtype)).train(training)
    xt = torch.tensor(x, dtype=getattr(torch, dtype), requires_grad=True)
    layer(xt).backward(dy_t)
    n, unit = math.prod(shape) // shape[1], (2.0**-24 if dtype == "float32" else 2.0**-53)
    reduce = (0, 2) if len(shape) == 3 else (0,)
    mean, var = (x.mean(reduce, keepdims=True), x.var(reduce, keepdims=True)) if training else (0.0, 1.0)
    xhat, a = (x - mean) / np.sqrt(var + 1e-5), 1 / np.sqrt(var + 1e-5)
    centring = training * (np.abs(dy).mean(reduce, keepdims=True)
                           + np.abs(xhat) * np.abs(dy * xhat).mean(reduce, keepdims=True))  # fmt: skip
    magnitude = {
        "x": a * (np.abs(dy) + centring),
        "scale": np.abs(dy * xhat).sum(reduce),
        "bias": np.abs(dy).sum(reduce),
    }  # fmt: skip
    for name, got in (("x", xt.grad), ("scale", layer.weight.grad), ("bias", layer.bias.grad)):
        error = np.abs(got.double().numpy() - want[name])
        assert np.all(error <= 4 * n * unit * magnitude[name]), (name, (error / magnitude[name]).max() / (n * unit))


# -- errors (R7.1): the NumPy backend's messages, before any state change ------


CONSTRUCTOR_ERRORS = [
    dict(num_features=0), dict(num_features=3.0), dict(num_features=True), dict(num_features=3, axis=(0, 0)),
    dict(num_features=3, axis=(0, 3)), dict(num_features=3, axis=()), dict(num_features=3, axis="0"),
    dict(num_features=3, epsilon=0.0), dict(num_features=3, epsilon=float("nan")), dict(num_features=3, epsilon="1"),
    dict(num_features=3, momentum=1.5), dict(num_features=3, momentum="0.1"), dict(num_features=3, affine=1),
    dict(num_features=3, use_fast_variance=True), dict(num_features=3, track_running_stats=None),
    dict(num_features=3, fast_variance="yes"), dict(num_features=3, unbiased_running_var=None),
    dict(num_features=3, axis_name=3), dict(num_features=3, axis_index_groups=[[0, 1]]),
    dict(num_features=3, axis_name="i", axis_index_groups=[[0, 1], [2]]), dict(num_features=3, mode="train"),
    dict(num_features=3, name=5), dict(num_features=3, scale_initializer="ones"),
    dict(num_features=3, scale_initializer=np.ones(4)), dict(num_features=3, bias_initializer=[1.0, np.nan, 0.0]),
    dict(num_features=3, bias_initializer=True),
]  # fmt: skip


@pytest.mark.parametrize("kwargs", CONSTRUCTOR_ERRORS, ids=[str(k) for k in CONSTRUCTOR_ERRORS])
def test_constructor_errors_equal_the_numpy_backend(kwargs):
    with pytest.raises((TypeError, ValueError)) as numpy_error:
        spec.BatchNorm1d(**kwargs)
    with pytest.raises(numpy_error.type) as torch_error:
        BatchNorm1d(**kwargs)
    assert str(torch_error.value) == str(numpy_error.value)


TORCH_CONSTRUCTOR_ERRORS = [
    (
        dict(dtype=torch.float16),
        TypeError,
        r"^dtype: expected None, torch\.float32 or torch\.float64, got torch\.float16$",
    ),
    (dict(dtype="float32"), TypeError, r"^dtype: expected None, torch\.float32 or torch\.float64, got 'float32'$"),
    (dict(process_group=object()), ValueError, r"^process_group: expected None when axis_name is None"),
    (dict(axis_name="i", process_group=object()), TypeError, r"^process_group: expected None or a torch\.distributed"),
    (dict(timeout=0), ValueError, r"^timeout: expected None or a finite number of seconds > 0, got 0$"),
    (dict(timeout=float("inf")), ValueError, r"^timeout: expected None or a finite number of seconds > 0, got inf$"),
    (dict(timeout="5"), TypeError, r"^timeout: expected None or a finite number of seconds > 0, got '5'$"),
    (dict(timeout=True), TypeError, r"^timeout: expected None or a finite number of seconds > 0, got True$"),
    (dict(timeout=float("nan")), ValueError, r"^timeout: expected None or a finite number of seconds > 0, got nan$"),
    (dict(native_kernel=1), TypeError, r"^native_kernel: expected a bool, got 1$"),
]


@pytest.mark.parametrize("kwargs, exception, pattern", TORCH_CONSTRUCTOR_ERRORS)
def test_torch_constructor_errors(kwargs, exception, pattern):
    with pytest.raises(exception, match=pattern):
        BatchNorm1d(3, **kwargs)


X = torch.tensor(np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32))
CALL_ERRORS = [
    ((X.int(),), {}, TypeError, r"^x: expected a real floating-point array .*got torch\.int32$"),
    ((X > 0,), {}, TypeError, r"^x: expected a real floating-point array .*got torch\.bool$"),
    ((X.to(torch.complex64),), {}, TypeError, r"^x: expected a real floating-point array .*got torch\.complex64$"),
    ((X.numpy(),), {}, TypeError, r"^x: expected a torch\.Tensor, got 'ndarray'$"),
    ((X.numpy()[0],), {}, TypeError, r"^x: expected a torch\.Tensor, got 'ndarray'$"),  # the type before the rank
    (([1.0, 2.0, 3.0],), {}, TypeError, r"^x: expected an array, got 'list'$"),
    ((X[0],), {}, ValueError, r"^x: expected a 3-D input for reduced axes \(0, 1\), got \(5, 3\)$"),
    ((X[..., :2],), {}, ValueError, r"^x: expected num_features=3 on axis 2, got \(4, 5, 2\)$"),
    ((X[:1, :1],), {}, ValueError, r"^x: expected more than 1 value per feature when training, got \(1, 1, 3\)$"),
    (
        (X,),
        {"mask": torch.ones(4, 5, dtype=torch.int8)},
        TypeError,
        r"^mask: expected a boolean array, got torch\.int8$",
    ),
    ((X,), {"mask": torch.ones(5, 4, dtype=torch.bool)}, ValueError, r"^mask: expected shape \(4, 5\) .*got \(5, 4\)$"),
    ((X,), {"mask": np.ones((4, 5), bool)}, TypeError, r"^mask: expected a boolean array of the same library as x"),
    ((X,), {"training": 1}, TypeError, r"^training: expected None or a bool, got 1$"),
]


@pytest.mark.parametrize("args, kwargs, exception, pattern", CALL_ERRORS)
def test_call_rejects_before_any_state_change(args, kwargs, exception, pattern):
    layer = BatchNorm1d(3)
    layer(X * 2 + 1)  # some non-trivial state to protect
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(exception, match=pattern):
        layer(*args, **kwargs)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert layer.num_batches_tracked == 1


def test_shape_error_messages_equal_the_numpy_backend():
    for bad in (X[0], X[..., :2], X[:1, :1]):
        with pytest.raises(ValueError) as numpy_error:
            spec.BatchNorm1d(3)(bad.numpy())
        with pytest.raises(ValueError) as torch_error:
            BatchNorm1d(3)(bad)
        assert str(torch_error.value) == str(numpy_error.value)


# -- state (R6.1-R6.6) --------------------------------------------------------------

STATE_ERRORS = [
    lambda s: [1, 2],
    lambda s: {k: v for k, v in s.items() if k != "bias"},
    lambda s: {**s, "num_batches_tracked": np.array(3)},
    lambda s: {**s, "scale": np.ones(4)},
    lambda s: {**s, "running_var": -np.ones(3)},
    lambda s: {**s, "running_mean": np.array([0, 1e39, 0])},  # finite, beyond float32
    lambda s: {**s, "bias": np.array(["a", "b", "c"])},
]


@pytest.mark.parametrize("corrupt", STATE_ERRORS)
def test_load_state_dict_is_strict_atomic_and_says_what_numpy_says(corrupt):
    layer = BatchNorm1d(3)
    layer(X)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    replacement = {k: v.numpy() + 1 for k, v in before.items()}  # valid entries that must NOT land
    with pytest.raises((TypeError, ValueError)) as numpy_error:
        spec.BatchNorm1d(3).load_state_dict(corrupt(replacement))
    with pytest.raises(numpy_error.type) as torch_error:
        layer.load_state_dict(corrupt(replacement))
    assert str(torch_error.value) == str(numpy_error.value)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_state_dict_keys_and_loading():
    assert list(BatchNorm1d(3).state_dict()) == ["scale", "bias", "running_mean", "running_var"]
    plain = BatchNorm1d(3, affine=False)
    assert list(plain.state_dict()) == ["running_mean", "running_var"]
    assert not hasattr(plain, "scale") and not hasattr(plain, "bias") and not list(plain.parameters())
    layer = BatchNorm1d(3)
    state = {"scale": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), "bias": [0.0, 1.0, 2.0],
             "running_mean": np.arange(3.0), "running_var": torch.ones(3, dtype=torch.float64)}  # fmt: skip
    assert tuple(layer.load_state_dict(state)) == ([], [])  # PyTorch's (missing_keys, unexpected_keys)
    assert layer.scale.dtype == torch.float32 and layer.scale.requires_grad
    close(layer.scale, [1, 2, 3], 0, "scale")
    with pytest.raises(ValueError, match=r"^strict: expected True"):
        layer.load_state_dict(state, strict=False)


def test_load_with_assign_takes_the_given_tensors():
    """``assign=True`` (PyTorch's meaning): the module's tensors become the given
    ones, e.g. to fill a module built on the meta device; it used to copy silently."""
    with torch.device("meta"):
        layer = BatchNorm1d(3)
    model = nn.Sequential(layer)
    source = BatchNorm1d(3)
    source(X)
    state = {key: value.clone() for key, value in source.state_dict().items()}
    assert tuple(layer.load_state_dict(state, assign=True)) == ([], [])
    assert layer.running_mean.data_ptr() == state["running_mean"].data_ptr() and layer.scale.device.type == "cpu"
    assert isinstance(layer.scale, nn.Parameter) and layer.scale.requires_grad
    assert layer.scale.data_ptr() == state["scale"].data_ptr()
    torch.testing.assert_close(layer(X, training=False), source(X, training=False), rtol=0, atol=0)
    with torch.device("meta"):
        model = nn.Sequential(BatchNorm1d(3))
    model.load_state_dict({f"0.{key}": value for key, value in state.items()}, assign=True)
    assert model[0].running_var.data_ptr() == state["running_var"].data_ptr()
    model[0](X)  # trains: the count (not state here) followed the tensors off the meta device
    assert model[0].num_batches_tracked.device.type == "cpu" and int(model[0].num_batches_tracked) == 1
    assert int(model[0].to_torch().num_batches_tracked) == 1
    copied = BatchNorm1d(3)
    copied.load_state_dict(state)
    assert copied.running_mean.data_ptr() != state["running_mean"].data_ptr()
    with pytest.raises(TypeError, match=r"^assign: expected a bool, got 1$"):
        copied.load_state_dict(state, assign=1)


def test_a_layers_own_state_dict_always_loads_back():
    layer = BatchNorm1d(3)
    layer(torch.where(X > 1.5, torch.nan, X))
    saved = {key: value.clone() for key, value in layer.state_dict().items()}
    assert torch.isnan(saved["running_mean"]).any()
    fresh = BatchNorm1d(3)
    with pytest.warns(RuntimeWarning, match=r"holds non-finite values"):
        fresh.load_state_dict(saved)
    for key, value in saved.items():
        assert torch.equal(fresh.state_dict()[key], value) or torch.isnan(value).any(), key
        torch.testing.assert_close(fresh.state_dict()[key], value, equal_nan=True, rtol=0, atol=0)


def test_a_new_running_variance_tensor_renews_the_inference_kernels_verdict():
    """Whether the inference kernel meets the rule is cached per running statistics;
    a new ``running_var`` tensor (of the same version) must renew the verdict."""
    layer = BatchNorm1d(3, mode="inference")
    with torch.no_grad():
        layer.running_mean.fill_(1e4)
        layer.running_var.fill_(1e8)  # |mean| / std = 1: the kernel's x * a + b is accurate
    x = 1e4 + torch.randn(4, 5, 3)
    layer(x)
    new_var = torch.empty(3)
    new_var.fill_(1.0)  # |mean| / std = 1e4 now: the kernel is not; the same version as the old tensor
    assert new_var._version == layer.running_var._version
    layer.running_var = new_var
    reference = spec.BatchNorm1d(3, mode="inference", dtype=np.float64)
    reference.load_state_dict({k: v.detach().double().numpy() for k, v in layer.state_dict().items()})
    # The rule's 1e-5 at scale 1; the kernel's float32 x * a + b is off by ~1e-3 here.
    np.testing.assert_allclose(layer(x).detach().double().numpy(), reference(x.double().numpy()), rtol=0, atol=1e-5)


def test_a_mask_on_another_device_is_an_argument_error():
    layer = BatchNorm1d(3)
    mask = torch.ones(4, 5, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"^mask: expected an array on x's device \(cpu\), got device\(type='meta'\)$"):
        layer(X, mask=mask)


@pytest.mark.parametrize("options", [dict(momentum=None), dict(track_running_stats=False)], ids=str)
def test_options_of_the_state_follow_pytorch_conventions(options):
    layer = BatchNorm1d(3, **options)
    reference = nn.BatchNorm1d(3, momentum=options.get("momentum", 0.1),
                               track_running_stats=options.get("track_running_stats", True))  # fmt: skip
    assert list(layer.state_dict()) == [{"weight": "scale"}.get(k, k) for k in reference.state_dict()]
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert (getattr(layer, key) is None) == (getattr(reference, key) is None), key
    layer(X)
    state = layer.state_dict()
    again = BatchNorm1d(3, **options)
    again.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(again.state_dict()[key], value), key


def test_loading_inside_a_parent_module_uses_the_same_checks():
    model = nn.Sequential(nn.Linear(3, 3), BatchNorm1d(3))
    state = model.state_dict()
    assert list(state) == ["0.weight", "0.bias", "1.scale", "1.bias", "1.running_mean", "1.running_var"]
    state["1.running_mean"] = torch.tensor([1.0, 2.0, 3.0])
    model.load_state_dict(state)
    close(model[1].running_mean, [1, 2, 3], 0, "loaded through the parent")
    bad = {**state, "1.running_var": -torch.ones(3)}
    with pytest.raises(RuntimeError, match=r"state_dict\['1\.running_var'\]: expected non-negative values"):
        model.load_state_dict(bad)
    close(model[1].running_var, [1, 1, 1], 0, "nothing of the layer landed")


def test_state_moves_between_the_numpy_and_torch_backends():
    x, _, _ = data((4, 5, 3), 2, "float32")
    numpy_layer = spec.BatchNorm1d(3, **KWARGS)
    numpy_layer(x)
    torch_layer = BatchNorm1d(3, momentum=0.9)
    torch_layer.load_state_dict(numpy_layer.state_dict())
    x2, _, _ = data((4, 5, 3), 2, "float32", seed=1)
    for training in (False, True):
        close(torch_layer(torch.tensor(x2, dtype=torch.float32), training=training),
              numpy_layer(x2.astype(np.float32), training=training), FLOAT32_TOL, f"training={training}")  # fmt: skip
    back = spec.BatchNorm1d(3)
    back.load_state_dict(torch_layer.state_dict())
    for key, value in back.state_dict().items():
        close(value, numpy_layer.state_dict()[key], FLOAT32_TOL, key)


# -- PyTorch idioms --------------------------------------------------------------------


def test_protocol_modes_and_per_call_training():
    layer = BatchNorm1d(3)
    assert isinstance(layer, BatchNormLayer) and isinstance(layer, nn.Module) and layer.training
    assert BatchNorm1d(3, mode="inference").training is False
    assert layer.eval() is layer and not layer.training
    layer(X)
    assert layer.num_batches_tracked == 0 and torch.equal(layer.running_mean, torch.zeros(3))
    layer(X, training=True)  # the per-call flag overrides the mode
    assert layer.num_batches_tracked == 1 and not torch.equal(layer.running_mean, torch.zeros(3))
    layer.train()
    mean = layer.running_mean.clone()
    layer(X, training=False)
    assert torch.equal(layer.running_mean, mean)
    with pytest.raises(TypeError, match=r"^mode: expected a bool, got 'yes'$"):
        layer.train("yes")


def test_functional_call_and_torch_func_grad():
    layer = BatchNorm1d(3, **KWARGS)
    x = X * 2 + 1
    for mask in (None, torch.tensor(np.random.default_rng(1).random((4, 5)) < 0.7)):
        params = {k: v.detach().clone() for k, v in layer.named_parameters()}
        buffers = {k: v.clone() for k, v in layer.named_buffers()}
        y = torch.func.functional_call(layer, {**params, **buffers}, (x, mask))
        eager = BatchNorm1d(3, **KWARGS)
        close(y, eager(x, mask), 0, "functional_call output")
        close(buffers["running_var"], eager.running_var, 0, "the passed buffers were updated")
        assert torch.equal(layer.running_var, torch.ones(3)), "the layer's own buffers were not"

        def loss(p, b, x, mask=mask):  # buffers are inputs: torch.func forbids mutating captured tensors
            return (torch.func.functional_call(layer, {**p, **b}, (x, mask)) ** 3).sum()

        grads = torch.func.grad(loss, argnums=(0, 2))(params, buffers, x)
        xt = x.clone().requires_grad_(True)
        (eager(xt, mask) ** 3).sum().backward()
        close(grads[1], xt.grad, 1e-5, "torch.func.grad dx")  # both float32 autograd: a few ulps apart
        close(grads[0]["scale"], eager.scale.grad, 1e-4, "torch.func.grad dscale")


def test_autocast_feeds_bfloat16_and_keeps_float32_statistics():
    torch.manual_seed(0)
    linear, layer = nn.Linear(3, 3), BatchNorm1d(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = linear(X)
        y = layer(hidden)
    assert hidden.dtype == y.dtype == torch.bfloat16 and layer.running_var.dtype == torch.float32
    reference = spec.BatchNorm1d(3, dtype=np.float64)
    x64 = hidden.double().detach().numpy()
    close(y, reference(x64), TOL["bfloat16"] * 4, "y")  # |y| < 4
    close(layer.running_var, reference.running_var, FLOAT32_TOL, "running_var")


def test_device_and_dtype_arguments_and_conversion():
    layer = BatchNorm1d(3, device=torch.device("cpu"), dtype=torch.float64)
    assert {t.dtype for t in layer.state_dict().values()} == {torch.float64}
    assert {t.device.type for t in layer.state_dict().values()} == {"cpu"}
    assert layer.num_batches_tracked.dtype == torch.long
    layer = BatchNorm1d(3).to(torch.float64)  # nn.Module conversion: float64 statistics from then on
    x, _, _ = data((4, 5, 3), 2, "float64")
    reference = spec.BatchNorm1d(3, dtype=np.float64)
    close(layer(torch.tensor(x)), reference(x), 1e-10, "float64 after .to()")
    close(layer.running_var, reference.running_var, 1e-10, "float64 running_var after .to()")


def test_initializers_and_repr():
    layer = BatchNorm1d(3, scale_initializer=lambda shape, dtype: np.full(shape, 2.0, dtype), bias_initializer=0.5)
    close(layer.scale, [2, 2, 2], 0, "callable initializer")
    close(layer.bias, [0.5, 0.5, 0.5], 0, "scalar initializer")
    layer = BatchNorm1d(3, scale_initializer=torch.tensor([1.0, 2.0, 3.0]))
    close(layer.scale, [1, 2, 3], 0, "tensor initializer")
    assert repr(BatchNorm1d(3, axis=(0, 2))).startswith("BatchNorm1d(3, axis=(0, 2), epsilon=1e-05, momentum=0.99")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("n, offset", [(200, 0.0), (4096, 30.0)], ids=["fused kernel", "split kernels"])
def test_strided_channel_last_input(dtype, n, offset):
    """Features last but strided (a transposed ``(N, C)``; a slice of a wider feature axis
    is the same): PyTorch's generic strided kernel rounded half inputs' parameter
    gradients to half (bfloat16: 2e-3 off), and the split kernels' views of it failed.
    Against the float64 specification on the same values: TOL for y and dx (rounded to
    the input's dtype), FLOAT32_TOL for the parameter gradients (float32 sums)."""
    rng = np.random.default_rng(4)
    values = torch.tensor(offset + 2.0 * rng.standard_normal((3, n))).to(getattr(torch, dtype))
    x = values.t()  # (n, 3), strides (1, n)
    assert not x.is_contiguous()
    dy = torch.tensor(rng.standard_normal((n, 3))).to(x.dtype)
    reference = spec.BatchNorm1d(3, axis=0, momentum=0.9, dtype=np.float64)
    want = reference.vjp(x.double().numpy(), dy.double().numpy())
    layer = BatchNorm1d(3, axis=0, momentum=0.9)
    xt = x.detach().requires_grad_(True)
    y = layer(xt)
    y.backward(dy)
    close(y, reference(x.double().numpy()), TOL[dtype] * 4, "y")  # |y| < 4
    close(xt.grad, want["x"], TOL[dtype] * 4, "dx")
    scale = np.abs(want["bias"]).max() + np.abs(want["scale"]).max()
    for name in ("scale", "bias"):
        close(getattr(layer, name).grad, want[name], FLOAT32_TOL * scale, f"d{name}")


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("position", [(0, 0, 0), (1, 2, 0)], ids=["first sample", "later sample"])
@pytest.mark.parametrize("native", [True, False], ids=["kernels", "core"])
def test_a_non_finite_input_gives_the_specifications_non_finite_results_without_warnings(value, position, native):
    """Found by fuzzing: an inf input gave this backend a NaN running mean where NumPy gave
    inf, and NumPy's RuntimeWarnings reached the user. Every result (y, the running
    statistics, dx) is non-finite exactly where the specification's is, and no warning is
    raised (a first sample that is not finite is no shift: the mean of data holding inf is
    inf, not NaN)."""
    x = np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32)
    x[position] = value
    reference = spec.BatchNorm1d(3)
    layer = BatchNorm1d(3, native_kernel=native)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want_y, want = reference(x), reference.vjp(x, np.ones_like(x))
        xt = torch.from_numpy(x).requires_grad_(True)
        y = layer(xt)
        y.sum().backward()
    for name, got, expected in (("y", y, want_y), ("dx", xt.grad, want["x"]),
                                ("running_mean", layer.running_mean, reference.running_mean),
                                ("running_var", layer.running_var, reference.running_var)):  # fmt: skip
        got = got.detach().numpy()
        assert np.array_equal(np.isnan(got), np.isnan(expected)), name
        assert np.array_equal(np.isposinf(got), np.isposinf(expected)), name
        assert np.array_equal(np.isneginf(got), np.isneginf(expected)), name
    assert np.isinf(reference.running_mean[0]) == (not np.isnan(value))


def test_the_brainpy_signature_is_forwarded_and_shown():
    """PyTorch's BrainPy-signature layer forwards BrainPy's arguments (written once,
    ``bn1d.Layer``'s, bound by ``bn1d.layer.brainpy_arguments``) and shows them, then its
    own keywords; positional and keyword arguments land where BrainPy's signature puts
    them, initializers included, and a missing or surplus one is a ``TypeError``."""
    import inspect

    from bn1d import Constant, Layer

    brainpy = [p for p in inspect.signature(Layer.__init__).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    parameters = list(inspect.signature(BatchNorm1d.__init__).parameters.values())
    assert parameters[: len(brainpy)] == brainpy
    own = ["process_group", "device", "dtype", "timeout", "native_kernel", "options"]
    assert [p.name for p in parameters[len(brainpy) :]] == own
    layer = BatchNorm1d(3, (0, 2), 1e-3, None, True, Constant(2.0), Constant(3.0), None, None, "inference", "bn")
    assert (layer.config.reduce_axes, layer.config.epsilon, layer.config.momentum, layer.training, layer.name) == (
        (0, 2), 1e-3, None, False, "bn")  # fmt: skip
    assert layer.bias.tolist() == [2.0] * 3 and layer.scale.tolist() == [3.0] * 3
    with pytest.raises(TypeError, match=r"missing a required argument: 'num_features'"):
        BatchNorm1d()
    with pytest.raises(TypeError, match=r"too many positional arguments"):
        BatchNorm1d(3, 0, 1e-5, 0.9, True, None, None, None, None, None, None, "surplus")


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("momentum", [1e-10, 3e-7, 1 / 3, 0.99, 1 - 2**-53])
def test_bn1d_momentum_reaches_the_core_exactly(momentum, native):
    """The BrainPy-signature layer gives the core its own momentum ``m``, not ``1 - (1 - m)``
    (PyTorch's factor and back: off by up to ``2**-53`` absolute, a relative 1e-6 at
    ``m = 1e-10``, which hypothesis found as a float64 running variance 4x over R2.7's
    bound); and PyTorch's kernels get the exact complement ``1 - m`` (the shortest decimal
    of ``torch_momentum``, 1e-16 for ``1 - 2**-53``, is 10% off it). Float64, a batch
    variance of 1e-6 beside the old 1 (the lost ``m`` multiplies
    their difference): the running statistics equal the NumPy specification's within
    float64's rule (``1e-5 * 2**-29`` relative, R2.7), on the kernels' path and the core's."""
    x = np.random.default_rng(5).standard_normal((64, 3, 16)) * 1e-3
    reference = spec.BatchNorm1d(3, axis=(0, 2), momentum=momentum, dtype=np.float64)
    layer = BatchNorm1d(3, axis=(0, 2), momentum=momentum, dtype=torch.float64, native_kernel=native)
    rule64 = 1e-5 * 2.0**-29
    for step in range(2):  # checked after each call (a small m forgets the previous call's error)
        reference(x + step)
        layer(torch.from_numpy(x + step))
        for key in ("running_mean", "running_var"):
            want, got = getattr(reference, key), getattr(layer, key).numpy()
            assert np.all(np.abs(got - want) <= rule64 * np.abs(want) + np.spacing(want)), (step, key, got - want)


@pytest.mark.parametrize("training", [True, False])
def test_a_gradient_strided_like_channels_last_reaches_the_kernels_contiguous(training):
    """Features on axis 2 of a ``(1, 2, 2, 1)`` input: the layer moves them to axis 1, and the
    gradient comes back strided ``(4, 1, 2, 1)``, on which PyTorch 2.13's CPU batch-norm
    backward permutes ``dx`` (found by the suite's hypothesis cases). The kernels' path gives
    the NumPy specification's gradient, as the core's does."""
    x64 = np.random.default_rng(0).standard_normal((1, 2, 2, 1)).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal((1, 2, 2, 1)).astype(np.float32)
    reference = spec.BatchNorm1d(2, axis=(0, 1, 3), epsilon=1.0, affine=False, mode=None if training else "inference")
    want = reference.vjp(x64, dy)["x"]
    for native in (True, False):
        layer = BatchNorm1d(2, axis=(0, 1, 3), epsilon=1.0, affine=False, native_kernel=native)
        layer.train(training)
        x = torch.from_numpy(x64).requires_grad_(True)
        layer(x).backward(torch.from_numpy(dy))
        np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=f"native={native}")


def test_gradcheck_with_undefined_gradients_passes_on_the_kernels_path():
    """``torch.autograd.gradcheck`` sends an undefined (``None``) gradient through the hook
    that makes gradients contiguous (PyTorch's test_modules ``test_grad_*``): it stays
    ``None``, and the gradients check in training and inference."""
    from bn1d.backends import torch_nn

    for training in (True, False):
        layer = torch_nn.BatchNorm1d(3, dtype=torch.float64).train(training)
        x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(layer, (x,), check_undefined_grad=True)
