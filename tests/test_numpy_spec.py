"""docs/spec.md sections 2, 3, 5, 6 and 8 on the NumPy backend, against the independent
float64 re-derivation in ``reference.py``.

Tolerances: with float64 parameters and inputs the only differences are summation
order and the expression order of ``y`` (a few ulps over sums of at most a few
hundred terms), so ``rtol=1e-12, atol=1e-12``. float32 runs compare with
``rtol=atol=2e-5``: float32 sums of <= 60 terms of unit size lose ~1e-6, and ``y``
divides by ``sqrt(var + eps)`` >= 0.3 here.
"""

import numpy as np
import pytest
from reference import reference

from bn1d.backends.numpy import BatchNorm1d

F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=2e-5, atol=2e-5)

LAYOUTS = [
    # (axis, shape, feature_axis)
    ((0, 1), (4, 5, 3), 2),  # BrainPy's (B, L, C)
    (0, (6, 3), 1),  # (B, C)
    ((0, 2), (4, 3, 5), 1),  # PyTorch's channel-first (B, C, L)
    ((-3, -2), (4, 5, 3), 2),  # negative axes (BrainPy 2.8.2 fails on them)
    ((1, 2), (3, 4, 5), 0),  # feature axis first
]


def make_x(shape, seed=0, loc=0.5, scale=2.0):
    return np.random.default_rng(seed).normal(loc, scale, shape)


def test_reference_numbers_section_8():
    x = np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32)
    for fast in (True, False):
        layer = BatchNorm1d(3, fast_variance=fast)
        y = layer(x)
        # BrainPy 2.8.2's float32 numbers: agreement to float32 rounding of 60-term sums.
        np.testing.assert_allclose(layer.running_mean, [0.000187764846, 0.000142188437, 0.00198892271], rtol=2e-5)
        np.testing.assert_allclose(layer.running_var, [1.00352418, 0.99599659, 0.99568027], rtol=1e-6)
        np.testing.assert_allclose(y[3, 4], [0.59750485, -1.58767688, -1.17151904], rtol=1e-6)
    biased = BatchNorm1d(3, fast_variance=True, unbiased_running_var=False)
    biased(x)
    np.testing.assert_allclose(biased.running_var, [1.00284791, 0.99569672, 0.99539626], rtol=1e-6)


@pytest.mark.parametrize("axis, shape, feature_axis", LAYOUTS)
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("unbiased", [True, False])
def test_training_steps_then_inference(axis, shape, feature_axis, fast, unbiased):
    c = shape[feature_axis]
    rng = np.random.default_rng(1)
    scale, bias = rng.uniform(0.5, 2, c), rng.normal(size=c)
    layer = BatchNorm1d(
        c, axis=axis, momentum=0.7, epsilon=1e-3, scale_initializer=scale, bias_initializer=bias,
        dtype=np.float64, fast_variance=fast, unbiased_running_var=unbiased,
    )  # fmt: skip
    rm, rv = None, None
    for step in range(3):
        x = make_x(shape, seed=step)
        y = layer(x)
        (y_ref,), rm, rv = reference(
            [x], feature_axis=feature_axis, scale=scale, bias=bias, running_mean=rm, running_var=rv,
            epsilon=1e-3, momentum=0.7, fast_variance=fast, unbiased=unbiased,
        )  # fmt: skip
        np.testing.assert_allclose(y, y_ref, **F64)
        np.testing.assert_allclose(layer.running_mean, rm, **F64)
        np.testing.assert_allclose(layer.running_var, rv, **F64)
    x = make_x(shape, seed=9)
    before = layer.state_dict()
    for y in (layer(x, training=False), layer.eval()(x)):
        (y_ref,), _, _ = reference(
            [x], feature_axis=feature_axis, scale=scale, bias=bias, running_mean=rm, running_var=rv,
            epsilon=1e-3, training=False,
        )  # fmt: skip
        np.testing.assert_allclose(y, y_ref, **F64)
    for key, value in layer.state_dict().items():  # inference changes nothing
        np.testing.assert_array_equal(value, before[key])


def test_training_flag_overrides_mode_per_call():
    x = make_x((4, 5, 3))
    layer = BatchNorm1d(3, mode="inference")
    layer(x)
    np.testing.assert_array_equal(layer.running_mean, 0)
    layer(x, training=True)
    assert np.all(layer.running_mean != 0)
    assert layer.training is False  # the per-call flag does not switch the mode
    assert layer.train().training is True


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_extremes(momentum):
    x = make_x((4, 5, 3))
    layer = BatchNorm1d(3, momentum=momentum, dtype=np.float64)
    layer(x)
    _, rm, rv = reference([x], feature_axis=2, momentum=momentum)
    np.testing.assert_allclose(layer.running_mean, rm, **F64)
    np.testing.assert_allclose(layer.running_var, rv, **F64)
    if momentum == 1.0:
        np.testing.assert_array_equal(layer.running_mean, 0)
        np.testing.assert_array_equal(layer.running_var, 1)


def test_affine_false_has_no_parameters_and_plain_normalisation():
    x = make_x((4, 5, 3))
    layer = BatchNorm1d(3, affine=False, dtype=np.float64)
    (y_ref,), _, _ = reference([x], feature_axis=2)
    np.testing.assert_allclose(layer(x), y_ref, **F64)


def test_initializer_callable_receives_shape_and_dtype():
    seen = []

    def init(shape, dtype):
        seen.append((shape, np.dtype(dtype)))
        return np.full(shape, 3.0)

    layer = BatchNorm1d(4, scale_initializer=init, dtype=np.float64)
    assert seen == [((4,), np.dtype(np.float64))]
    assert layer.scale.dtype == np.float64
    np.testing.assert_array_equal(layer.scale, 3.0)


@pytest.mark.parametrize("axis, shape, feature_axis", LAYOUTS)
def test_mask_excludes_positions_from_statistics(axis, shape, feature_axis):
    c = shape[feature_axis]
    x = make_x(shape, seed=3)
    mask_shape = shape[:feature_axis] + shape[feature_axis + 1 :]
    mask = np.random.default_rng(4).random(mask_shape) < 0.6
    mask.flat[:2] = True  # at least two kept positions
    layer = BatchNorm1d(c, axis=axis, dtype=np.float64)
    y = layer(x, mask=mask)
    (y_ref,), rm, rv = reference([x], [mask], feature_axis=feature_axis)
    np.testing.assert_allclose(y, y_ref, **F64)  # masked positions use the same statistics
    np.testing.assert_allclose(layer.running_mean, rm, **F64)
    np.testing.assert_allclose(layer.running_var, rv, **F64)
    # Garbage at masked positions (padding) cannot leak into the statistics.
    poisoned = np.where(np.expand_dims(mask, feature_axis), x, np.nan)
    fresh = BatchNorm1d(c, axis=axis, dtype=np.float64)
    y_poisoned = fresh(poisoned, mask=mask)
    np.testing.assert_allclose(fresh.running_mean, rm, **F64)
    kept = np.broadcast_to(np.expand_dims(mask, feature_axis), shape)
    np.testing.assert_allclose(y_poisoned[kept], y_ref[kept], **F64)


def test_all_masked_behaves_as_inference_without_nan():
    x = make_x((4, 5, 3))
    layer = BatchNorm1d(3, dtype=np.float64)
    layer(make_x((4, 5, 3), seed=7))
    before = layer.state_dict()
    with np.errstate(all="raise"):  # no 0/0 anywhere, not even hidden
        y = layer(x, mask=np.zeros((4, 5), bool))
    (y_ref,), _, _ = reference(
        [x], feature_axis=2, running_mean=before["running_mean"], running_var=before["running_var"], training=False
    )
    np.testing.assert_allclose(y, y_ref, **F64)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_empty_batch_behaves_as_inference():
    layer = BatchNorm1d(3)
    with np.errstate(all="raise"):
        y = layer(np.zeros((0, 5, 3), np.float32))
    assert y.shape == (0, 5, 3)
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)


def test_single_kept_value_at_run_time_has_no_bessel_factor():
    # n == 1 known only through the mask: no error, var = 0, Bessel factor 1.
    x = make_x((4, 5, 3))
    mask = np.zeros((4, 5), bool)
    mask[2, 3] = True
    layer = BatchNorm1d(3, dtype=np.float64, momentum=0.5)
    with np.errstate(all="raise"):
        layer(x, mask=mask)
    np.testing.assert_allclose(layer.running_mean, 0.5 * x[2, 3], **F64)
    np.testing.assert_allclose(layer.running_var, 0.5 * 1 + 0.5 * 0.0, **F64)


def test_ill_conditioned_two_pass_keeps_precision():
    # mean 1e4, std 1e-2 in float32: E[x^2] - mean^2 cancels completely.
    x = np.random.default_rng(5).normal(1e4, 1e-2, (64, 8, 2)).astype(np.float32)
    n = 64 * 8
    true_var = x.astype(np.float64).reshape(-1, 2).var(axis=0)
    # momentum=0: the running variance is the batch variance times n / (n - 1).
    fast, two_pass = BatchNorm1d(2, momentum=0, fast_variance=True), BatchNorm1d(2, momentum=0)
    y_fast, y_two = fast(x), two_pass(x)
    # x - mean is exact in float32 near 1e4 (Sterbenz), so the two-pass variance is
    # off by the square of the float32 mean's error, about one ulp of 1e4 (2**-10):
    # ~1e-6 against a variance of 1e-4.
    np.testing.assert_allclose(two_pass.running_var * (n - 1) / n, true_var, rtol=0, atol=2 * 2.0**-20)
    # The one-pass formula loses everything: docs/spec.md section 2 says it returns var = 0 here.
    np.testing.assert_array_equal(fast.running_var, 0.0)
    (y_ref,), _, _ = reference([x], feature_axis=2)
    # A mean error of one ulp of 1e4 is ~0.1 std, hence the bound on y.
    assert np.max(np.abs(y_two - y_ref)) < 0.2
    assert np.max(np.abs(y_fast - y_ref)) > 1.0  # the documented failure of the one-pass formula


def test_float16_is_reduced_in_float32():
    # mean 300 in float16: sum(x**2) overflows float16 (BrainPy returns NaN here).
    x = np.random.default_rng(6).normal(300, 1, (16, 8, 3)).astype(np.float16)
    for fast in (False, True):
        layer = BatchNorm1d(3, fast_variance=fast)
        y = layer(x)
        assert y.dtype == np.float16
        assert layer.running_mean.dtype == np.float32
        (y_ref,), rm, rv = reference([x], feature_axis=2, fast_variance=fast)
        np.testing.assert_allclose(layer.running_mean, rm, rtol=1e-5)
        np.testing.assert_allclose(y, y_ref, atol=0.05 if not fast else 0.5)  # float16 output rounding
        assert np.all(np.isfinite(y))


def test_float64_input_with_float32_statistics_computes_in_float64():
    x = make_x((4, 5, 3))
    layer = BatchNorm1d(3)  # float32 statistics
    y = layer(x)
    assert y.dtype == np.float64 and layer.running_var.dtype == np.float32
    (y_ref,), _, _ = reference([x], feature_axis=2)
    np.testing.assert_allclose(y, y_ref, **F64)


def test_state_round_trip_gives_identical_outputs():
    x = make_x((4, 5, 3))
    a = BatchNorm1d(3, scale_initializer=np.array([1.0, 2.0, 3.0]))
    for seed in range(3):
        a(make_x((4, 5, 3), seed=seed))
    b = BatchNorm1d(3)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b(x, training=False), a(x, training=False))
    state = a.state_dict()
    state["running_mean"][:] = 99  # a copy: mutating it leaves the layer alone
    assert np.all(a.running_mean != 99)


def test_list_input_is_accepted_like_numpy_functions():
    x = make_x((4, 3))
    np.testing.assert_allclose(BatchNorm1d(3, axis=0)(x.tolist()), BatchNorm1d(3, axis=0)(x))


@pytest.mark.parametrize("axis, shape, feature_axis", LAYOUTS[:3])
def test_cumulative_average_is_the_mean_of_the_batch_statistics(axis, shape, feature_axis):
    """``momentum=None`` (PyTorch's cumulative average): after k training calls with
    data, the running statistics are the plain means of the k batch means and the k
    unbiased batch variances; a call that keeps nothing counts for nothing."""
    layer = BatchNorm1d(shape[feature_axis], axis=axis, momentum=None, dtype=np.float64)
    mask_shape = shape[:feature_axis] + shape[feature_axis + 1 :]
    means, variances = [], []
    for step in range(4):
        x = make_x(shape, seed=10 + step, loc=step)
        if step == 2:  # nothing kept: the count stays, the statistics too
            y = layer(x, mask=np.zeros(mask_shape, bool))
            assert int(layer.num_batches_tracked) == 2
            continue
        ys, mean, var = reference([x], feature_axis=feature_axis, momentum=0.0)
        means.append(mean)
        variances.append(var)
        y = layer(x)
        np.testing.assert_allclose(y, ys[0], **F64)
        assert int(layer.num_batches_tracked) == len(means)
        np.testing.assert_allclose(layer.running_mean, np.mean(means, axis=0), **F64)
        np.testing.assert_allclose(layer.running_var, np.mean(variances, axis=0), **F64)
    assert list(layer.state_dict())[-1] == "num_batches_tracked"


@pytest.mark.parametrize("axis, shape, feature_axis", LAYOUTS[:3])
def test_without_running_statistics_the_batch_normalises_in_inference_too(axis, shape, feature_axis):
    c = shape[feature_axis]
    layer = BatchNorm1d(c, axis=axis, track_running_stats=False, dtype=np.float64, scale_initializer=2.0)
    assert list(layer.state_dict()) == ["scale", "bias"] and not hasattr(layer, "running_mean")
    x = make_x(shape, seed=20)
    mask = np.random.default_rng(21).random(shape[:feature_axis] + shape[feature_axis + 1 :]) < 0.6
    for training in (True, False):
        ys, _, _ = reference([x], [mask], feature_axis=feature_axis, scale=np.full(c, 2.0))
        np.testing.assert_allclose(layer(x, mask=mask, training=training), ys[0], **F64)
    # Nothing kept: mean 0 and variance 1 normalise (no running statistics to fall back on).
    y = layer(x, mask=np.zeros_like(mask), training=False)
    np.testing.assert_allclose(y, 2.0 * x / np.sqrt(1 + 1e-5), **F64)
