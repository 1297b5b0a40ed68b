"""The contract's accuracy rule on the NumPy specification and the core: float32 raw
data, n = 2**18 values per feature, |mean| / std up to 1e4, every layout, masks,
simulated replicas with both hooks and groups, half inputs, and the analytic
gradients. The metrics and the rule (1e-5 each) are ``bn1d.conformance.accuracy``'s;
the rule is the tolerance: it is what the contract promises, and the measured
errors are 5-50x below it (the rounding of float32 outputs, ~5e-7), while the
naive float32 two-pass algorithm it replaced missed it by 10**5 at these sizes
(``test_the_previous_algorithm_misses_the_rule`` keeps that measurement honest).
"""

from __future__ import annotations

import numpy as np
import pytest

from bn1d.algorithm import batch_moments
from bn1d.backends.numpy import BatchNorm1d, run_replicas
from bn1d.conformance.accuracy import RULE, forward_errors, gradient_errors, raw_data, statistics64

N = 2**18
LAYOUTS = {  # name: (axis, shape with C = 4 features, n = 2**18 per feature)
    "(B, L, C)": ((0, 1), (64, 4096, 4)),
    "(B, C, L)": ((0, 2), (64, 4, 4096)),
    "(B, C)": (0, (N, 4)),
    "(C, B, L)": ((1, 2), (4, 64, 4096)),
}


def feature_axis(axis, ndim):
    axes = {a % ndim for a in ((axis,) if isinstance(axis, int) else axis)}
    return next(a for a in range(ndim) if a not in axes)


def check(errors):
    assert max(errors.values()) <= RULE, errors


@pytest.mark.parametrize("ratio", [0.25, 1e2, 1e4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_raw_float32_data_meet_the_rule(layout, ratio):
    axis, shape = LAYOUTS[layout]
    fa = feature_axis(axis, len(shape))
    x = raw_data(shape, ratio, seed=1).astype(np.float32)
    layer = BatchNorm1d(4, axis, momentum=0.0)
    y = layer(x)
    check(forward_errors(x, y, layer.running_mean, layer.running_var, feature_axis=fa))
    dy = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    grads = layer.vjp(x, dy)
    spec = BatchNorm1d(4, axis, dtype=np.float64)
    check(gradient_errors(x, dy, grads, spec.vjp(x.astype(np.float64), dy.astype(np.float64)), feature_axis=fa))


def test_masked_raw_data_meet_the_rule():
    x = raw_data((64, 4096, 4), 1e4, seed=3).astype(np.float32)
    mask = np.random.default_rng(4).random((64, 4096)) < 0.3
    layer = BatchNorm1d(4, momentum=0.0)
    y = layer(x, mask=mask)
    check(forward_errors(x, y, layer.running_mean, layer.running_var, feature_axis=2, mask=mask))
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    want = BatchNorm1d(4, dtype=np.float64).vjp(x.astype(np.float64), dy.astype(np.float64), mask)
    check(gradient_errors(x, dy, layer.vjp(x, dy, mask), want, feature_axis=2, mask=mask))


@pytest.mark.parametrize("hook", ["all_sum", "all_gather"])
def test_replicas_with_uneven_masks_and_groups_meet_the_rule(hook):
    """4 replicas of (16, 4096, 4) keeping 100/50/75/25%, groups [[0, 2], [1, 3]],
    means 1e4 + r: each group's statistics are those of its concatenated kept values,
    with the hook JAX's psum uses (two rounds) and torch.distributed's (one gather)."""
    keep = (1.0, 0.5, 0.75, 0.25)
    xs = [raw_data((16, 4096, 4), 1e4 + r, seed=10 + r).astype(np.float32) for r in range(4)]
    masks = [np.random.default_rng(20 + r).random((16, 4096)) < k for r, k in enumerate(keep)]
    groups = [[0, 2], [1, 3]]
    layers = [BatchNorm1d(4, momentum=0.0, axis_name="r", axis_index_groups=groups) for _ in range(4)]
    ys = run_replicas(lambda r: layers[r](xs[r], mask=masks[r]), 4, hook=hook)
    for group in groups:
        x, mask, y = (np.concatenate([v[r] for r in group]) for v in (xs, masks, ys))
        for r in group:
            check(forward_errors(x, y, layers[r].running_mean, layers[r].running_var, feature_axis=2, mask=mask))


@pytest.mark.parametrize("dtype, ratio", [("float16", 300.0), ("float16", 30.0)])
def test_half_input_meets_the_rule_in_its_float32_statistics(dtype, ratio):
    x = raw_data((16, 4096, 4), ratio, seed=5, dtype=dtype).astype(dtype)
    layer = BatchNorm1d(4, momentum=0.0)
    y = layer(x)
    assert y.dtype == np.dtype(dtype)
    check(forward_errors(x, y, layer.running_mean, layer.running_var, feature_axis=2, y_dtype=dtype))


def test_the_previous_algorithm_misses_the_rule():
    """What the rule guards against, measured on the same data: float32 two-pass
    statistics accumulated naively over non-contiguous axes (the NumPy backend
    before this change) and the mean rounded to float32 before ``x - mean``."""
    x = raw_data((64, 4096, 4), 1e4, seed=1).astype(np.float32)
    mean = x.mean(axis=(0, 1))  # float32 accumulation
    var = np.square(x - mean).mean(axis=(0, 1))
    y = (x - mean) / np.sqrt(var + np.float32(1e-5))
    errors = forward_errors(x, y, mean, var * N / (N - 1), feature_axis=2)
    assert errors["y"] > 1.0 and errors["var"] > 10.0, errors


def test_float64_accumulation_is_what_makes_numpy_exact():
    """The core accumulates in float64 where the library has it. Forced to float32
    (what JAX's default has), NumPy's sequential sums over 2**18 values lose a
    factor 100 of the variance's accuracy: XLA's accurate reductions, not the
    algorithm alone, carry JAX there (``docs/numerics.md``)."""
    x = raw_data((64, 4096, 4), 0.25, seed=6).astype(np.float32)
    _, _, var64 = statistics64(x, None, 2)
    exact = batch_moments(x, reduce_axes=(0, 1))
    narrow = batch_moments(x, reduce_axes=(0, 1), accumulate=np.float32)
    assert exact.var.dtype == np.float64 and narrow.var.dtype == np.float32
    assert np.max(np.abs(exact.var - var64) / var64) < 1e-7
    assert np.max(np.abs(narrow.var - var64) / var64) > 1e-6


@pytest.mark.parametrize(
    "shape, reduce_axes, folded",
    [
        ((8, 128, 64), (0, 1), (32, 2048)),  # 32 rows per folded row
        ((64, 4096, 4), (0, 1), (512, 2048)),
        ((3, 5, 7), (0, 1), None),  # 15 rows, odd: no fold
        ((6, 1, 1024), (0, 1), (3, 2048)),  # 2 rows of 1024 fold into one
        ((0, 4, 3), (0, 1), None),  # empty
        ((16, 3, 8), (0, 2), None),  # features in the middle: the plain sum
        ((4096, 2), (0,), (4, 2048)),
    ],
)
def test_folded_float64_sums_are_the_plain_sums(shape, reduce_axes, folded):
    """``_feature_sums`` folds rows into the features before a casting sum (NumPy's
    ``Tuning.fold_rows``, a speed-up, docs/performance.md): the same float64 sum in
    another order. Each of the two float64 sums of float32 terms is within
    ``(n - 1) 2**-53 sum|terms|`` of the exact one, so they differ by at most twice
    that, per feature; a fold that mixed features up would be off by O(sqrt(n) * 100).
    The sum is taken of the folded shape when one is expected, and not folded without
    the hook (the default: JAX, PyTorch, array_api_strict)."""
    import array_api_compat.numpy as compat

    from bn1d.algorithm import _feature_sums

    shapes_summed = []

    class Spy:  # compat's namespace, recording what each sum reduces
        def __getattr__(self, name):
            return getattr(compat, name)

        def sum(self, v, **kwargs):
            shapes_summed.append(tuple(v.shape))
            return compat.sum(v, **kwargs)

    v = np.random.default_rng(7).standard_normal(shape).astype(np.float32) + np.float32(100)
    got = _feature_sums(Spy(), v, reduce_axes, np.float64, fold=True)
    want = np.sum(v, axis=reduce_axes, dtype=np.float64)
    assert got.dtype == np.float64 and got.shape == want.shape
    n = int(np.prod([shape[a] for a in reduce_axes]))
    bound = 2 * max(n - 1, 0) * 2.0**-53 * np.sum(np.abs(v), axis=reduce_axes, dtype=np.float64)
    assert np.all(np.abs(got - want) <= bound)
    assert shapes_summed[0] == (folded or shape)
    shapes_summed.clear()
    assert np.array_equal(_feature_sums(Spy(), v, reduce_axes, np.float64, fold=False), want)
    assert shapes_summed == [shape]
    same_dtype = _feature_sums(compat, v, reduce_axes, np.float32, fold=True)  # no cast: the plain sum
    assert np.array_equal(same_dtype, np.sum(v, axis=reduce_axes))


def test_the_numpy_layer_folds_its_sums_and_the_jax_one_does_not():
    """NumPy's layer sets the core's private ``Tuning.fold_rows`` for every call (its speed
    at small shapes depends on it, docs/performance.md), synced ones too; the plain
    ``Layer`` and JAX's (XLA reduces without casting loops; it recomputes ``x - K``
    instead) do not. The folded sums are counted: a training call sums folded shapes."""
    import array_api_strict

    from bn1d import Layer, algorithm

    layer, synced = BatchNorm1d(3), BatchNorm1d(3, axis_name="i")
    assert layer._tuning.fold_rows and synced._tuning.fold_rows
    assert all(h.synced for h in run_replicas(lambda i: synced._hooks(True), 2))
    assert not Layer(3, xp=array_api_strict)._tuning.fold_rows
    folds = []
    original = algorithm._feature_sums
    try:
        algorithm._feature_sums = lambda xp, v, axes, acc, fold: folds.append(fold) or original(xp, v, axes, acc, fold)
        layer(np.ones((64, 4096, 3), np.float32), training=True)
    finally:
        algorithm._feature_sums = original
    assert folds and all(folds)
    jax_backend = pytest.importorskip("bn1d.backends.jax")
    tuning = jax_backend.BatchNorm1d(3)._tuning
    assert not tuning.fold_rows and tuning.recompute_shifted
