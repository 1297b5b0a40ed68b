"""The contract's accuracy rule on the PyTorch backend: raw float32 data, n = 2**18
values per feature, |mean| / std up to 1e4, every layout, on both paths, masks,
half inputs, inference and autograd; and PyTorch's kernels only where the rule
holds for them (``bn1d.backends.torch_kernels``: its error model, the routes).

Tolerance: the rule itself (1e-5 in ``bn1d.conformance.accuracy``'s metrics): it is
the contract; measured errors are 10-50x below it. PyTorch's own kernels miss it
by up to 10**5 on the same data (``test_pytorch_kernels_alone_miss_the_rule``).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bn1d.backends import numpy as spec  # noqa: E402
from bn1d.backends import torch_functional, torch_kernels  # noqa: E402
from bn1d.backends.torch import BatchNorm1d  # noqa: E402
from bn1d.conformance.accuracy import RULE, forward_errors, gradient_errors, raw_data  # noqa: E402

N = 2**18
LAYOUTS = {
    "(B, L, C)": ((0, 1), (64, 4096, 4), 2),
    "(B, C, L)": ((0, 2), (64, 4, 4096), 1),
    "(B, C)": (0, (N, 4), 1),
}


@contextlib.contextmanager
def threads(count):
    """``torch.set_num_threads(count)`` inside, the thread count as it was after: PyTorch's
    kernels chain ``N / threads`` rows, so the routes these tests are about need a count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure(layer, x, dy, mask=None, fa=2, y_dtype="float32"):
    xt = torch.from_numpy(np.asarray(x)).requires_grad_(True)
    y = layer(xt, None if mask is None else torch.from_numpy(mask))
    y.backward(torch.from_numpy(np.asarray(dy)))
    x64 = np.asarray(x, np.float64)
    stats = layer.running_mean.double().numpy(), layer.running_var.double().numpy()
    errors = forward_errors(x64, y.detach().double().numpy(), *stats, feature_axis=fa, mask=mask, y_dtype=y_dtype)
    want = spec.BatchNorm1d(layer.config.num_features, layer.config.reduce_axes, dtype=np.float64).vjp(
        x64, np.asarray(dy, np.float64), mask
    )
    grads = {"x": xt.grad.double().numpy(), "scale": layer.scale.grad.double().numpy(),
             "bias": layer.bias.grad.double().numpy()}  # fmt: skip
    errors.update(gradient_errors(x64, np.asarray(dy, np.float64), grads, want, feature_axis=fa, mask=mask))
    return errors


@pytest.mark.parametrize("native", [True, False], ids=["native", "core"])
@pytest.mark.parametrize("ratio", [0.25, 1e2, 1e4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_raw_float32_data_meet_the_rule(layout, ratio, native):
    axis, shape, fa = LAYOUTS[layout]
    x = raw_data(shape, ratio, seed=1).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    errors = measure(BatchNorm1d(4, axis, momentum=0.0, native_kernel=native), x, dy, fa=fa)
    assert max(errors.values()) <= RULE, errors


def test_masked_raw_data_meet_the_rule():
    x = raw_data((64, 4096, 4), 1e4, seed=3).astype(np.float32)
    dy = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    mask = np.random.default_rng(5).random((64, 4096)) < 0.3
    errors = measure(BatchNorm1d(4, momentum=0.0), x, dy, mask=mask)
    assert max(errors.values()) <= RULE, errors


@pytest.mark.parametrize("dtype, ratio", [("float16", 300.0), ("bfloat16", 30.0)])
def test_half_input_meets_the_rule_in_its_float32_statistics(dtype, ratio):
    x = raw_data((16, 4096, 4), ratio, seed=6, dtype=dtype)
    layer = BatchNorm1d(4, momentum=0.0)
    with torch.no_grad():
        y = layer(torch.from_numpy(x).to(getattr(torch, dtype)))
    assert y.dtype == getattr(torch, dtype) and layer.running_var.dtype == torch.float32
    errors = forward_errors(x, y.double().numpy(), layer.running_mean.numpy(), layer.running_var.numpy(),
                            feature_axis=2, y_dtype=dtype)  # fmt: skip
    assert max(errors.values()) <= RULE, errors


def test_inference_at_a_large_running_mean_meets_the_rule():
    """The inference kernel forms ``x * a + b``: at |running_mean| / std = 1e4 that
    loses 1e-3; the layer then normalises with the core's ``(x - mean) * a + bias``."""
    layer = BatchNorm1d(4)
    layer.load_state_dict({**layer.state_dict(), "running_mean": np.full(4, 1e4), "running_var": np.ones(4)})
    assert not torch_kernels.inference_is_accurate(layer.running_mean, layer.running_var, 1e-5)
    x = raw_data((8, 512, 4), 1e4, seed=7).astype(np.float32)
    with torch.no_grad():
        y = layer(torch.from_numpy(x), training=False).double().numpy()
        stats = layer.running_mean, layer.running_var
        kernel = torch.batch_norm(torch.from_numpy(x).reshape(-1, 4), layer.scale, layer.bias, *stats, False, 0.0,
                                  1e-5, False).reshape(x.shape).double().numpy()  # fmt: skip
    want = (x.astype(np.float64) - 1e4) / np.sqrt(1 + 1e-5)
    assert np.abs(y - want).max() <= RULE
    assert np.abs(kernel - want).max() > 10 * RULE


def test_pytorch_kernels_alone_miss_the_rule():
    """What the routes guard against, measured: the fused kernel on (B * L, C) at
    n = 2**18 (float32 partial sums of 2**17 rows) misses at any |mean| / std."""
    x = raw_data((64, 4096, 4), 0.25, seed=8).astype(np.float32)
    module = torch.nn.BatchNorm1d(4, momentum=1.0)
    with torch.no_grad():
        y = module(torch.from_numpy(x).reshape(-1, 4)).reshape(x.shape)
    errors = forward_errors(x, y.double().numpy(), module.running_mean.numpy(), module.running_var.numpy(),
                            feature_axis=2)  # fmt: skip
    assert errors["var"] > RULE and errors["y"] > RULE, errors


# -- the routes and the error model ----------------------------------------------------------


def kernel_calls(monkeypatch):
    calls = []
    original = torch_kernels.NativeBatchNorm.apply
    monkeypatch.setattr(torch_kernels.NativeBatchNorm, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize(
    "shape, axis, ratio, fused",
    [
        ((8, 128, 64), (0, 1), 0.25, True),  # 1024 rows, centred: PyTorch's fused kernel
        ((8, 128, 64), (0, 1), 100.0, False),  # the same at |mean| / std = 100: it would miss
        ((32, 1024, 16), (0, 1), 0.25, False),  # 32768 rows: float32 partial sums too long
        ((32, 16, 1024), (0, 2), 0.25, True),  # channel-first: the kernel sums in float64
        ((32, 16, 1024), (0, 2), 1e4, False),  # ...but forms x * a + b: misses at 1e4
    ],
)
def test_the_fused_kernel_runs_exactly_where_the_model_accepts_it(monkeypatch, shape, axis, ratio, fused):
    calls = kernel_calls(monkeypatch)
    fa = 2 if axis == (0, 1) else 1
    x = raw_data(shape, ratio, seed=9).astype(np.float32)
    layer = BatchNorm1d(shape[fa], axis, momentum=0.0)
    with torch.no_grad():
        y = layer(torch.from_numpy(x))
    assert (calls == []) == fused
    errors = forward_errors(x, y.double().numpy(), layer.running_mean.numpy(), layer.running_var.numpy(),
                            feature_axis=fa)  # fmt: skip
    assert max(errors.values()) <= RULE, errors
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("rows", [1024, 4096, 32768])
@pytest.mark.parametrize("ratio", [0.25, 2.0, 8.0, 32.0])
def test_the_error_model_is_conservative_for_the_fused_kernel(rows, ratio):
    """Wherever the model accepts PyTorch's fused kernel's result, its measured
    errors meet the rule (the model: ``torch_kernels.predicted_error``)."""
    x = raw_data((rows, 16), ratio, seed=rows).astype(np.float32)
    xt = torch.from_numpy(x)
    mean, var = torch.zeros(2, 16)  # the kernel writes the batch's statistics here at momentum 1, as in _fused
    y = torch.native_batch_norm(xt, None, None, mean, var, True, 1.0, 1e-5)[0]
    accumulation = torch_kernels.fused_accumulation(xt.shape, xt.dtype, torch.get_num_threads())
    accepted = accumulation is not None and torch_kernels.fused_is_accurate(mean, var, accumulation[2])
    errors = forward_errors(x, y.double().numpy(), mean.numpy(), var.numpy(), feature_axis=1)
    if accepted:
        assert max(errors.values()) <= RULE, errors
    predicted = torch_kernels.predicted_error(2.0**-24, *torch_kernels._accumulation(xt, 1), ratio)
    assert predicted >= max(errors.values()), (predicted, errors)  # the model bounds what it models


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fused_check_never_accepts_a_feature_beyond_the_ratio(dtype):
    """``fused_is_accurate`` judges ``|mean| / std <= ratio`` for every feature from the
    kernel's mean and unbiased variance over ``n`` rows, rounded to ``dtype`` (``std``: the
    biased variance's root), against the ratio of those values in float64, one feature at a
    time beside centred ones (one bad feature rejects): it never accepts a feature beyond
    the ratio, at variances from 1e-30 to 1e30, nor just beyond it (2e-5 to 3e-4 relative,
    where a slack on the product accepted them); it accepts every feature 1e-5 inside it;
    a dead channel (mean 0) passes, alone or beside others; a nonzero mean at a variance of 0
    or below the normal range does not (whose rounding is absolute: as a square's that
    underflows); NaN fails; overflow (a square beyond the dtype, an infinite mean or
    variance, an infinite or NaN running mean or variance) fails, quietly."""
    rng = np.random.default_rng(11)
    n, ratio = 1024, 47.0
    coefficient = torch_kernels.check_coefficient(ratio, n, dtype)

    def accepts(mean, var):
        mean, var = torch.tensor(mean, dtype=dtype), torch.tensor(var, dtype=dtype)
        return torch_kernels.fused_is_accurate(mean, var, coefficient)

    biased = 10.0 ** rng.uniform(-30, 30, 400)
    band = np.concatenate([1 + rng.uniform(2e-5, 3e-4, 60), rng.uniform(0.5, 1.5, 340)])  # just beyond; around
    mean = torch.tensor(ratio * band * np.sqrt(biased) * rng.choice([-1.0, 1.0], 400), dtype=dtype)
    var = torch.tensor(biased * n / (n - 1), dtype=dtype)
    true_ratio = np.abs(mean.double().numpy()) / np.sqrt(var.double().numpy() * (n - 1) / n)
    for k in range(400):
        accepted = accepts([0.0, 0.5, mean[k].item()], [1.0, 2.0, var[k].item()])
        assert not accepted or true_ratio[k] <= ratio, (k, biased[k], true_ratio[k] / ratio - 1)
        if true_ratio[k] <= ratio * (1 - 1e-5):
            assert accepted, (k, biased[k], true_ratio[k] / ratio - 1)
    assert accepts([0.0], [0.0]) and accepts([0.0, 0.5], [0.0, 1.0]) and accepts([0.0], [1e-45])
    tiny = torch.finfo(dtype).tiny  # below it, a variance (or a square) rounds at an absolute step
    assert not accepts([1e-30], [0.0]) and not accepts([1e-4], [0.0]) and not accepts([1e-30], [tiny / 2])
    assert accepts([1e-30], [4 * tiny]) == (dtype == torch.float32)  # float32: a ratio of 5e-12 (its square underflows)
    assert not accepts([0.0, np.nan], [1.0, 1.0]) and not accepts([0.0], [np.nan])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        big = torch.finfo(dtype).max
        assert not accepts([big / 2], [big]) and not accepts([np.inf], [np.inf]) and not accepts([0.0], [np.inf])
        finite = torch.tensor([1.0], dtype=dtype)  # the running statistics the accepted ones would update
        assert torch_kernels.fused_is_accurate(finite * 0, finite, coefficient, (finite, finite))
        for value in (np.inf, -np.inf, np.nan):  # their update from the batch's would give NaN, not inf
            for running in ((finite * value, finite), (finite, finite * value)):
                assert not torch_kernels.fused_is_accurate(finite * 0, finite, coefficient, running)


@pytest.mark.parametrize("sigma, ratio", [(3e-8, 100.0), (3e-8, 200.0), (1e-8, 500.0), (1e-30, 1000.0), (1e-18, 1e-5)])
def test_a_variance_far_below_eps_is_not_taken_for_eps(sigma, ratio):
    """Raw data whose variance is far below ``eps`` (``sigma`` 1e-8, a ``var`` of 1e-16 beside
    ``eps = 1e-5``), at ``|mean| / std`` beyond the fused kernel's limit: a float32
    ``invstd`` cannot tell that variance from 0, so a check on it must not accept the
    kernel's result (a slack on the product did, and the mean missed R2.7 by 5x). Every
    metric within RULE, the drop-in, 2-D input. At ``sigma`` 1e-30 the float32 variance
    underflows to 0 and the square of the mean too (the check must not read ``0 - 0`` as
    accurate: the kernel's mean then misses the rule by 30x); at 1e-18 and a ratio of 1e-5
    the square alone underflows, and the result is accurate."""
    from bn1d.backends.torch_nn import BatchNorm1d as DropIn

    for seed in range(3):
        x = (ratio * sigma + sigma * np.random.default_rng(seed).standard_normal((1024, 4))).astype(np.float32)
        layer = DropIn(4, momentum=1.0)
        with torch.no_grad():
            y = layer(torch.from_numpy(x))
        errors = forward_errors(x.astype(np.float64), y.numpy(), layer.running_mean.numpy(),
                                layer.running_var.numpy(), feature_axis=1)  # fmt: skip
        if sigma**2 < torch.finfo(torch.float32).tiny:  # float32 holds no such variance: 0 is its nearest
            assert errors.pop("var") == 1.0 and not layer.running_var.any()
        assert max(errors.values()) <= RULE, (seed, errors)


@pytest.mark.parametrize("shape", [(1024, 8), (128, 8, 16), (64, 16, 8)])
def test_float32_data_whose_squares_overflow_meet_the_rule(shape):
    """float32 data of ``|x - mean|`` ~1e18 at ``|mean| / std = 10``: the variance (~1e36)
    is a float32 number, but PyTorch's kernels sum its squares in float32 and overflow
    (``y`` was 0, 4 away; the running variance inf, on the fused and the split paths alike).
    bn1d takes those statistics in float64. Every metric within RULE, the drop-in, channel
    last and first, and the BrainPy-signature layer."""
    from bn1d.backends.torch_nn import BatchNorm1d as DropIn

    x = ((np.random.default_rng(1).standard_normal(shape) + 10) * 1e18).astype(np.float32)
    brainpy = BatchNorm1d(shape[1], (0, 2) if len(shape) == 3 else 0, momentum=0.0)
    for layer in (DropIn(shape[1], momentum=1.0), brainpy):
        with torch.no_grad():
            y = layer(torch.from_numpy(x))
        errors = forward_errors(x.astype(np.float64), y.numpy(), layer.running_mean.numpy(),
                                layer.running_var.numpy(), feature_axis=1)  # fmt: skip
        assert max(errors.values()) <= RULE, (type(layer).__module__, errors)


def test_split_statistics_fold_rows_into_features():
    """(N, C) float32 on the CPU is seen as (N / k, k * C) so that each float32 partial
    sum has at most CHAIN_ROWS rows; the combination is exact (Chan, equal counts)."""
    x = torch.randn(2**15, 8, dtype=torch.float64).float() * 3 + 1
    mean, var, error = torch_kernels.local_moments(x)
    k = torch_kernels._split_factor(x)
    rows, chains = torch_kernels._accumulation(x, k)
    assert x.shape[0] % k == 0 and rows <= torch_kernels.CHAIN_ROWS and chains == k * torch_kernels._threads(x)
    x64 = x.double().numpy()
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-7)
    np.testing.assert_allclose(var, x64.var(0), rtol=1e-6)
    assert error <= RULE


def test_the_fused_kernels_accumulation_follows_the_thread_count():
    """``fused_accumulation`` (rows, chains, largest ratio) is computed once per (shape,
    dtype, threads), and ``_fused`` asks it with the thread count of the call: the same
    shape under another ``torch.set_num_threads`` has other chains (N / threads rows each),
    so an answer cached for one thread count must not serve another. (2048, 16) float32
    is refused at once on one thread (one chain of 2048 rows misses the rule at any mean)
    and taken on two (two chains of 1024)."""
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    for count, chains in ((1, None), (2, (1024, 2)), (1, None)):
        with threads(count):
            accumulation = torch_kernels.fused_accumulation(x.shape, x.dtype, count)
            assert (accumulation and accumulation[:2]) == chains
            assert torch_kernels.fused_accumulation(x.shape, torch.float64, count)[:2] == (0, 1)  # float64 sums
            stats = torch.zeros(16), torch.ones(16)
            y = torch_functional._fused(x, *stats, None, None, 0.1, 1e-5, None)
            assert (y is None) == (chains is None), count
            moved = 0.0 if chains is None else 0.1 * x.double().mean(0)  # refused: nothing changed
            torch.testing.assert_close(stats[0].double(), moved + torch.zeros(16, dtype=torch.float64))


@pytest.mark.parametrize("const", [0.1, 0.7])
@pytest.mark.parametrize(
    "form, shape, node",
    [
        ("drop-in (N, C)", (2048, 17), "FusedBatchNormBackward"),  # 1024 rows per chain
        ("drop-in (N, C, 1)", (2048, 17), "FusedBatchNormBackward"),
        ("BrainPy (B, L, C)", (2048, 17), "FusedBatchNormBackward"),
        ("drop-in (N, C)", (8191, 5), "NativeBatchNormBackward"),  # prime N: the split view cannot split it
    ],
)
def test_gradients_on_chained_input_meet_the_rule(form, shape, node, const):
    """A gradient constant along the batch, materialised (equal terms: a recursive sum's
    worst case), on channel-last float32 input that PyTorch's kernels sum in float32
    chains of N / 2 rows (2 threads): its backward kernel sums ``dy`` in the same chains
    and gave ``dbias`` and ``dx`` up to 1.09e-5 at (2048, 17) (``FusedBatchNorm``'s route)
    and, where the split statistics cannot split a prime N, 4.1e-5 at (8191, 5)
    (``NativeBatchNorm``'s): both now sum by ``torch_kernels.gradient_sums`` (``torch.sum``,
    cascaded). Bound: the rule, in its metrics."""
    from bn1d.backends import torch_nn

    c = shape[1]
    x = raw_data(shape, 0.25, seed=3).astype(np.float32)
    dy = np.full(shape, const, np.float32)
    with threads(2):
        if form.startswith("BrainPy"):
            layer = BatchNorm1d(c, (0, 1), momentum=0.0)
            xt = torch.from_numpy(x.reshape(64, -1, c)).requires_grad_(True)
            y = layer(xt)
            y.backward(torch.from_numpy(dy).view(xt.shape))
            params = layer.scale, layer.bias
        else:
            layer = torch_nn.BatchNorm1d(c)
            xt = torch.from_numpy(x if form.endswith("C)") else x[:, :, None]).requires_grad_(True)
            y = layer(xt)
            y.backward(torch.from_numpy(dy).view(xt.shape))
            params = layer.weight, layer.bias
    kernel = y.grad_fn if not form.startswith("BrainPy") else y.grad_fn.next_functions[0][0]  # under a view
    assert type(kernel).__name__ == node  # the route the case is about
    x64 = x.astype(np.float64)
    want = spec.BatchNorm1d(c, 0, dtype=np.float64).vjp(x64, dy.astype(np.float64), None)
    grads = {"x": xt.grad.reshape(shape).double().numpy(), "scale": params[0].grad.double().numpy(),
             "bias": params[1].grad.double().numpy()}  # fmt: skip
    errors = gradient_errors(x64, dy.astype(np.float64), grads, want, feature_axis=1)
    assert max(errors.values()) <= RULE, errors


@pytest.mark.parametrize("route", ["fused, chained", "inference, chained", "split kernels"])
def test_bn1ds_own_backwards_are_twice_differentiable(route):
    """Under ``create_graph=True`` bn1d's own backwards (chained input, training and
    inference; statistics the fused kernel's check rejects) differentiate the forward's
    float64 maths, as PyTorch's twice differentiable batch norm: a Hessian-vector product
    equals float64 ``F.batch_norm``'s. Bound: the rule times the largest value (both are
    float64 maths rounded to float32 once at each of the two steps)."""
    layer, x, reference, params64 = _route_call(route, "weight bias")
    rng = np.random.default_rng(9)
    w1, w2 = (torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32)) for _ in range(2))

    def hessian_vector(forward, x, weight):
        x = x.detach().clone().requires_grad_(True)
        y = forward(x)
        (g,) = torch.autograd.grad((y * w1.to(y.dtype)).sum(), x, create_graph=True)
        return y, torch.autograd.grad(
            (g * w2.to(g.dtype)).sum(), (x, weight), allow_unused=True, materialize_grads=True
        )

    with threads(2):
        y, got = hessian_vector(layer, x, layer.weight)
    assert type(y.grad_fn).__name__ == ROUTES[route][3]
    _, want = hessian_vector(reference, x.double(), params64[0])
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() <= RULE * w.abs().max(), (g, w)


@pytest.mark.parametrize("shape", [(65536, 4), (2048, 17)])
def test_parameter_gradients_in_inference_on_chained_input_meet_the_rule(shape):
    """Inference with trainable ``weight`` and ``bias`` (a fine-tuned model in ``eval()``):
    PyTorch's inference backward sums ``dy`` and ``dy * xhat`` in float32 chains of N / 2
    rows (2 threads) on channel-last input, and a gradient constant along the batch gave
    ``dbias`` 2.6e-4 at (65536, 4); such calls keep the kernel's forward with
    ``torch_kernels.FusedBatchNorm``'s backward (``torch.sum``, cascaded). Bound: the rule,
    in its metrics (sums over the terms' magnitudes)."""
    from bn1d.backends import torch_nn

    layer = torch_nn.BatchNorm1d(shape[1]).eval()
    rng = np.random.default_rng(5)
    with torch.no_grad():
        layer.running_mean.copy_(torch.from_numpy(rng.uniform(-1, 1, shape[1])))
        layer.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, shape[1])))
    x = raw_data(shape, 0.25, seed=4).astype(np.float32)
    dy = np.full(shape, 0.1, np.float32)
    with threads(2):
        y = layer(torch.from_numpy(x))
        y.backward(torch.from_numpy(dy))
    assert type(y.grad_fn).__name__ == "FusedBatchNormBackward"
    mean, var = layer.running_mean.double().numpy(), layer.running_var.double().numpy()
    xhat = (x.astype(np.float64) - mean) / np.sqrt(var + 1e-5)
    terms = {"bias": dy.astype(np.float64), "weight": dy * xhat}
    errors = {key: float(np.max(np.abs(getattr(layer, key).grad.double().numpy() - t.sum(0)) / np.abs(t).sum(0)))
              for key, t in terms.items()}  # fmt: skip
    assert max(errors.values()) <= RULE, errors


ROUTES = {  # (shape, |mean| / std, training): the node each takes with 2 threads
    "fused, chained": ((2048, 17), 0.25, True, "FusedBatchNormBackward"),
    "inference, chained": ((2048, 17), 0.25, False, "FusedBatchNormBackward"),
    "split kernels": ((64, 8, 32), 1e4, True, "NativeBatchNormBackward"),
}


def _route_call(route, affine, *, dual=False):
    """A drop-in's call on ``route`` with ``weight``/``bias`` as ``affine`` says, its
    input, tangent (``dual``) and the parameters, and float64 ``F.batch_norm``'s the same."""
    from bn1d.backends import torch_nn

    shape, ratio, training, _ = ROUTES[route]
    x = torch.from_numpy(raw_data(shape, ratio, seed=11).astype(np.float32)).requires_grad_(True)
    layer = torch_nn.BatchNorm1d(shape[1]).train(training)
    rng = np.random.default_rng(12)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, shape[1])))
        layer.bias.copy_(torch.from_numpy(rng.uniform(-1.0, 1.0, shape[1])))
        layer.running_mean.copy_(torch.from_numpy(rng.uniform(-1.0, 1.0, shape[1])))
    layer.weight.requires_grad_("weight" in affine)
    layer.bias.requires_grad_("bias" in affine)
    stats64 = [None, None] if training else [layer.running_mean.double(), layer.running_var.double()]
    params64 = [p.detach().double().requires_grad_(p.requires_grad) for p in (layer.weight, layer.bias)]
    return layer, x, lambda v: torch.nn.functional.batch_norm(v, *stats64, *params64, training), params64


@pytest.mark.parametrize("affine", ["weight bias", "weight", "bias", ""])
@pytest.mark.parametrize("route", ROUTES)
def test_bn1ds_own_backwards_give_every_gradient_pytorchs_node_gives(route, affine):
    """bn1d's backwards (``FusedBatchNorm`` training and inference, ``NativeBatchNorm``) give
    a gradient for each input that needs one, and ``None`` for the others, as PyTorch's
    node: each equals float64 ``F.batch_norm``'s within the rule times its largest value. A
    bias changed in place between the forward and the backward (an optimizer step) is not
    the backward's business (PyTorch's node does not save it)."""
    layer, x, reference, params64 = _route_call(route, affine)
    dy = torch.from_numpy(np.random.default_rng(13).standard_normal(x.shape).astype(np.float32))
    with threads(2):
        y = layer(x)
    own = ROUTES[route][2] or affine  # inference without parameter gradients: no sums, PyTorch's node
    assert type(y.grad_fn).__name__ == (ROUTES[route][3] if own else "NativeBatchNormBackward0")
    with torch.no_grad():
        layer.bias.add_(0.5)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_(True)
    reference(x64).backward(dy.double())
    for got, want in ((x.grad, x64.grad), (layer.weight.grad, params64[0].grad), (layer.bias.grad, params64[1].grad)):
        assert (got is None) == (want is None)
        if want is not None:
            assert (got.double() - want).abs().max() <= RULE * want.abs().max(), (got, want)


@pytest.mark.parametrize("route", ROUTES)
def test_forward_mode_ad_runs_the_core(route):
    """``torch.autograd.forward_ad``: bn1d's own backwards have no ``jvp``, so a dual level
    sends the call to the core, whose operations carry the tangent; it equals float64
    ``F.batch_norm``'s within the rule times its largest value."""
    import torch.autograd.forward_ad as fwad

    layer, x, reference, _ = _route_call(route, "weight bias")
    tangent = torch.from_numpy(np.random.default_rng(14).standard_normal(x.shape).astype(np.float32))
    with fwad.dual_level():
        got = fwad.unpack_dual(layer(fwad.make_dual(x.detach(), tangent))).tangent
        want = fwad.unpack_dual(reference(fwad.make_dual(x.detach().double(), tangent.double()))).tangent
    assert (got.double() - want).abs().max() <= RULE * want.abs().max()


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_fused_batch_norms_backward_takes_the_gradient_as_it_comes(monkeypatch, training):
    """From ``HOOKED_NUMEL`` values PyTorch's node gets its gradient made contiguous by a
    pre-hook (``torch_functional._with_gradient_hook``); ``FusedBatchNorm``'s backward takes
    any strides, so it gets no hook (no copy of the gradient) and its gradients stay the
    rule's on a broadcast one. Bound: the rule times the largest value, against float64."""
    from bn1d.backends import torch_functional, torch_nn

    seen = []
    monkeypatch.setattr(torch_functional, "_contiguous_gradients", lambda grads: seen.append(grads) or None)
    shape = (2048, 64)  # 2**17 values, 1024 rows per chain with 2 threads
    assert np.prod(shape) >= torch_functional.HOOKED_NUMEL
    x = torch.from_numpy(raw_data(shape, 0.25, seed=15).astype(np.float32)).requires_grad_(True)
    layer = torch_nn.BatchNorm1d(shape[1]).train(training)
    with threads(2):
        y = layer(x)
    assert type(y.grad_fn).__name__ == "FusedBatchNormBackward"
    y.sum().backward()
    assert seen == []
    x64 = x.detach().double().requires_grad_(True)
    stats = [None, None] if training else [layer.running_mean.double(), layer.running_var.double()]
    torch.nn.functional.batch_norm(x64, *stats, None, None, training).sum().backward()
    assert (x.grad.double() - x64.grad).abs().max() <= RULE * max(x64.grad.abs().max(), 1.0)
