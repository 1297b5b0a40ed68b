"""docs/spec.md sections 1, 7: every bad argument or input raises a ValueError/TypeError
naming the argument, what was expected and what was given, before any state changes."""

import re
import warnings

import numpy as np
import pytest

from bn1d.backends.numpy import BatchNorm1d

X = np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32)

CONSTRUCTOR_ERRORS = [
    # (kwargs, exception, pattern naming argument / expected / given)
    (dict(num_features=0), ValueError, r"num_features: expected a positive int, got 0"),
    (dict(num_features=-2), ValueError, r"num_features: expected a positive int, got -2"),
    (dict(num_features=3.0), TypeError, r"num_features: expected a positive int, got 3\.0"),
    (dict(num_features=True), TypeError, r"num_features: expected a positive int, got True"),
    (dict(num_features=3, axis=(0, 0)), ValueError, r"axis: expected no duplicate axes, got \(0, 0\)"),
    (dict(num_features=3, axis=(0, -3)), ValueError, r"axis: expected no duplicate axes, got \(0, -3\)"),
    (dict(num_features=3, axis=(0, 3)), ValueError, r"axis: expected axes in \[-3, 3\) for a 3-D input, got \(0, 3\)"),
    (dict(num_features=3, axis=(0, -4)), ValueError, r"axis: expected axes in \[-3, 3\)"),
    (dict(num_features=3, axis=()), TypeError, r"axis: expected an int or a non-empty sequence of ints, got \(\)"),
    (dict(num_features=3, axis="0"), TypeError, r"axis: expected an int or a non-empty sequence of ints, got '0'"),
    (dict(num_features=3, axis=(0, 1.0)), TypeError, r"axis: expected an int or a non-empty sequence"),
    (dict(num_features=3, epsilon=0.0), ValueError, r"epsilon: expected a finite float > 0, got 0\.0"),
    (dict(num_features=3, epsilon=-1e-5), ValueError, r"epsilon: expected a finite float > 0, got -1e-05"),
    (dict(num_features=3, epsilon=float("nan")), ValueError, r"epsilon: expected a finite float > 0, got nan"),
    (dict(num_features=3, epsilon=float("inf")), ValueError, r"epsilon: expected a finite float > 0, got inf"),
    (dict(num_features=3, epsilon="1e-5"), TypeError, r"epsilon: expected a finite float > 0, got '1e-5'"),
    (
        dict(num_features=3, momentum=1.5),
        ValueError,
        r"momentum: expected a finite float in \[0, 1\] or None, got 1\.5",
    ),
    (
        dict(num_features=3, momentum=-0.1),
        ValueError,
        r"momentum: expected a finite float in \[0, 1\] or None, got -0\.1",
    ),
    (
        dict(num_features=3, momentum=float("nan")),
        ValueError,
        r"momentum: expected a finite float in \[0, 1\] or None, got nan",
    ),
    (
        dict(num_features=3, momentum="0.9"),
        TypeError,
        r"momentum: expected a finite float in \[0, 1\] or None, got '0.9'",
    ),
    (dict(num_features=3, track_running_stats=1), TypeError, r"track_running_stats: expected a bool, got 1"),
    (dict(num_features=3, use_fast_variance=True), TypeError, r"use_fast_variance: expected one of the options"),
    (dict(num_features=3, affine=1), TypeError, r"affine: expected a bool, got 1"),
    (dict(num_features=3, fast_variance="yes"), TypeError, r"fast_variance: expected a bool, got 'yes'"),
    (dict(num_features=3, unbiased_running_var=None), TypeError, r"unbiased_running_var: expected a bool, got None"),
    (dict(num_features=3, axis_name=3), TypeError, r"axis_name: expected None, a str or a non-empty sequence of str"),
    (dict(num_features=3, axis_name=()), TypeError, r"axis_name: expected None, a str or a non-empty sequence"),
    (dict(num_features=3, axis_index_groups=[[0, 1]]), ValueError, r"axis_index_groups: expected None when axis_name"),
    (
        dict(num_features=3, axis_name="i", axis_index_groups=[[0, 1], [2]]),
        ValueError,
        r"axis_index_groups: expected a non-empty list of equal-size.*got \[\[0, 1\], \[2\]\]",
    ),
    (
        dict(num_features=3, axis_name="i", axis_index_groups=[[0, 1], [1, 2]]),
        ValueError,
        r"axis_index_groups: expected .*partitioning range\(total\), got \[\[0, 1\], \[1, 2\]\]",
    ),
    (dict(num_features=3, axis_name="i", axis_index_groups=[[1, 2]]), ValueError, r"axis_index_groups: expected"),
    (dict(num_features=3, axis_name="i", axis_index_groups=[]), TypeError, r"axis_index_groups: expected"),
    (dict(num_features=3, axis_name="i", axis_index_groups=[[0, "1"]]), TypeError, r"axis_index_groups: expected"),
    (
        dict(num_features=3, mode="train"),
        ValueError,
        r"mode: expected one of \(None, 'training', 'inference'\), got 'train'",
    ),
    (dict(num_features=3, name=5), TypeError, r"name: expected None or a str, got 5"),
    (dict(num_features=3, scale_initializer="ones"), TypeError, r"scale_initializer: expected a callable"),
    (
        dict(num_features=3, scale_initializer=np.ones(4)),
        ValueError,
        r"scale_initializer: expected shape \(3,\), got \(4,\)",
    ),
    (
        dict(num_features=3, bias_initializer=lambda shape, dtype: np.zeros((3, 1), dtype)),
        ValueError,
        r"bias_initializer: expected shape \(3,\), got \(3, 1\)",
    ),
    (
        dict(num_features=3, bias_initializer=[1.0, np.nan, 0.0]),
        ValueError,
        r"bias_initializer: expected finite values",
    ),
    (dict(num_features=3, bias_initializer=True), TypeError, r"bias_initializer: expected a callable"),
    (dict(num_features=3, dtype=np.int32), TypeError, r"dtype: expected numpy\.float32 or numpy\.float64"),
    (
        dict(num_features=3, dtype="float16"),
        TypeError,
        r"dtype: expected numpy\.float32 or numpy\.float64, got 'float16'",
    ),
]


@pytest.mark.parametrize("kwargs, exception, pattern", CONSTRUCTOR_ERRORS)
def test_constructor_rejects(kwargs, exception, pattern):
    with pytest.raises(exception, match=pattern):
        BatchNorm1d(**kwargs)


def test_accepted_constructor_forms():
    assert BatchNorm1d(3, axis=-2).config.reduce_axes == (0,)  # a 2-D (B, C) input
    assert BatchNorm1d(3, axis=(-3, -2)).config.reduce_axes == (0, 1)
    assert BatchNorm1d(3, axis=[2, 0]).config.feature_axis == 1
    assert BatchNorm1d(3, axis=0).config.feature_axis == 1
    assert BatchNorm1d(3, momentum=0).config.momentum == 0.0
    assert BatchNorm1d(3, momentum=1).config.momentum == 1.0
    with warnings.catch_warnings():  # a float32 compared with float's max was cast to inf, with a warning
        warnings.simplefilter("error")
        assert BatchNorm1d(3, epsilon=np.float32(1e-3)).config.epsilon == pytest.approx(1e-3)
        assert BatchNorm1d(3, momentum=np.float16(0.5)).config.momentum == 0.5
        with pytest.raises(ValueError, match=r"^epsilon: expected .*, got np\.float32\(inf\)$"):
            BatchNorm1d(3, epsilon=np.float32(np.inf))
    assert BatchNorm1d(3, axis_name=["i", "j"]).config.axis_name == ("i", "j")
    assert BatchNorm1d(3, dtype="float64").dtype == np.float64
    assert BatchNorm1d(3, mode="inference").training is False
    assert BatchNorm1d(3, mode="training").training is True
    assert BatchNorm1d(3).training is True  # mode=None means training (BrainPy >= 2.8)
    np.testing.assert_array_equal(BatchNorm1d(3, scale_initializer=2).scale, [2, 2, 2])
    np.testing.assert_array_equal(BatchNorm1d(3, bias_initializer=np.arange(3)).bias, [0, 1, 2])


CALL_ERRORS = [
    # (args builder, exception, pattern)
    (lambda: (X.astype(np.int32),), {}, TypeError, r"x: expected a real floating-point array .*got dtype\('int32'\)"),
    (lambda: (X > 0,), {}, TypeError, r"x: expected a real floating-point array .*got dtype\('bool'\)"),
    (lambda: (X.astype(np.complex64),), {}, TypeError, r"x: expected a real floating-point array"),
    (lambda: (X[0],), {}, ValueError, r"x: expected a 3-D input for reduced axes \(0, 1\), got \(5, 3\)"),
    (lambda: (X[None],), {}, ValueError, r"x: expected a 3-D input for reduced axes \(0, 1\), got \(1, 4, 5, 3\)"),
    (lambda: (X[..., :2],), {}, ValueError, r"x: expected num_features=3 on axis 2, got \(4, 5, 2\)"),
    (lambda: (X[:1, :1],), {}, ValueError, r"x: expected more than 1 value per feature when training, got \(1, 1, 3\)"),
    (
        lambda: (X,),
        {"mask": np.ones((4, 5), np.int8)},
        TypeError,
        r"mask: expected a boolean array, got dtype\('int8'\)",
    ),
    (
        lambda: (X,),
        {"mask": np.ones((4, 5, 3), bool)},
        ValueError,
        r"mask: expected shape \(4, 5\) \(x's shape without",
    ),
    (lambda: (X,), {"mask": np.ones((5, 4), bool)}, ValueError, r"mask: expected shape \(4, 5\).*got \(5, 4\)"),
    (lambda: (X,), {"training": 1}, TypeError, r"training: expected None or a bool, got 1"),
    # float128 (NumPy's longdouble) has no float64 accumulation beyond it: refused, not
    # silently computed in float32 (which was off by 0.17).
    (lambda: (X.astype(np.longdouble),), {}, TypeError, r"x: expected a real floating-point array .*float128"),
]


@pytest.mark.parametrize("args, kwargs, exception, pattern", CALL_ERRORS)
def test_call_rejects_before_any_state_change(args, kwargs, exception, pattern):
    layer = BatchNorm1d(3)
    layer(X * 2 + 1)  # some non-trivial state to protect
    before = layer.state_dict()
    with pytest.raises(exception, match=pattern):
        layer(*args(), **kwargs)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_single_value_in_inference_is_fine():
    # n == 1 only matters when training; inference uses the running statistics.
    y = BatchNorm1d(3, mode="inference")(X[:1, :1])
    np.testing.assert_allclose(y, X[:1, :1] / np.sqrt(1 + 1e-5), rtol=1e-6)


STATE_ERRORS = [
    (lambda s: [1, 2], TypeError, r"state_dict: expected a mapping, got 'list'"),
    (
        lambda s: {k: v for k, v in s.items() if k != "bias"},
        ValueError,
        r"state_dict: expected exactly the keys .*missing \['bias'\]",
    ),
    (
        lambda s: {**s, "extra": np.zeros(3)},
        ValueError,
        r"state_dict: expected exactly the keys .*unexpected \['extra'\]",
    ),
    (lambda s: {**s, "scale": np.ones(4)}, ValueError, r"state_dict\['scale'\]: expected shape \(3,\), got \(4,\)"),
    (
        lambda s: {**s, "running_var": -np.ones(3)},
        ValueError,
        r"state_dict\['running_var'\]: expected non-negative values",
    ),
    (  # finite, but beyond float32: it used to load as inf
        lambda s: {**s, "running_mean": np.array([0, 1e39, 0])},
        ValueError,
        r"state_dict\['running_mean'\]: expected finite values that float32 can hold",
    ),
    (lambda s: {**s, "bias": np.array(["a", "b", "c"])}, TypeError, r"state_dict\['bias'\]: expected a real array"),
    (lambda s: {**s, "bias": object()}, TypeError, r"state_dict\['bias'\]: expected a real array|expected an array"),
]


@pytest.mark.parametrize("corrupt, exception, pattern", STATE_ERRORS)
def test_load_state_dict_is_strict_and_atomic(corrupt, exception, pattern):
    layer = BatchNorm1d(3)
    layer(X)
    before = layer.state_dict()
    replacement = {k: v + 1 for k, v in before.items()}  # valid entries that must NOT land
    with pytest.raises(exception, match=pattern):
        layer.load_state_dict(corrupt(replacement))
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_state_keys_follow_affine():
    assert list(BatchNorm1d(3).state_dict()) == ["scale", "bias", "running_mean", "running_var"]
    plain = BatchNorm1d(3, affine=False)
    assert list(plain.state_dict()) == ["running_mean", "running_var"]
    assert not hasattr(plain, "scale") and not hasattr(plain, "bias")  # not just frozen: absent
    with pytest.raises(ValueError, match=r"unexpected \['scale'\]"):
        plain.load_state_dict({**plain.state_dict(), "scale": np.ones(3)})


def test_messages_name_expected_and_given():
    # The one format: "<argument>: expected <what>, got <given>".
    with pytest.raises(ValueError) as info:
        BatchNorm1d(3, momentum=2.0)
    assert re.fullmatch(r"momentum: expected .+, got 2\.0", str(info.value))


def test_torch_momentum_round_trips_exactly():
    from bn1d.backends.formats import torch_momentum

    assert torch_momentum(0.99) == 0.01
    for m in (0.0, 0.1, 0.9, 0.99, 0.999, 1.0):
        assert torch_momentum(torch_momentum(m)) == m


def test_torch_momentum_of_a_float_does_not_depend_on_earlier_calls_with_other_types():
    """A cache keyed by value would take ``np.float32(m)`` and ``m`` as one key (they
    compare equal) and then answer the float with float32 arithmetic's result."""
    from bn1d.backends.formats import torch_momentum

    m = 1 - 2**-19  # exact in float32 too
    torch_momentum(np.float32(m))
    got = torch_momentum(m)
    assert type(got) is float and 1.0 - got == m


def test_static_count_is_a_plain_int_from_a_list():
    from bn1d.algorithm import static_count

    assert static_count((4, 5, 3), (0, 1)) == 20 and static_count((0, 5, 3), (0, 1)) == 0


def test_a_layers_own_state_dict_always_loads_back():
    """After a NaN batch the running statistics are NaN; the layer's own state_dict
    still loads back into it, bit for bit, with a warning naming the entries (a
    diverged run's checkpoint must load for inspection)."""
    layer = BatchNorm1d(3)
    layer(np.where(np.arange(60).reshape(4, 5, 3) % 3 == 0, np.nan, X))
    saved = layer.state_dict()
    assert np.isnan(saved["running_mean"]).any()
    fresh = BatchNorm1d(3)
    with pytest.warns(RuntimeWarning, match=r"state_dict\['running_mean'\] holds non-finite values"):
        fresh.load_state_dict(saved)
    for key, value in saved.items():
        np.testing.assert_array_equal(fresh.state_dict()[key], value)


def test_bfloat16_state_loads_with_its_values():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    layer = BatchNorm1d(3)
    state = {key: np.asarray(value + 0.5).astype(ml_dtypes.bfloat16) for key, value in layer.state_dict().items()}
    layer.load_state_dict(state)
    for key, value in state.items():
        np.testing.assert_array_equal(layer.state_dict()[key], value.astype(np.float32))


def test_the_count_of_the_cumulative_average_is_checked():
    layer = BatchNorm1d(3, momentum=None)
    assert list(layer.state_dict()) == ["scale", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for bad in (-1, 2.5, np.array([1, 2])):
        with pytest.raises(ValueError, match=r"state_dict\['num_batches_tracked'\]: expected a non-negative integer"):
            layer.load_state_dict({**layer.state_dict(), "num_batches_tracked": bad})
    layer.load_state_dict({**layer.state_dict(), "num_batches_tracked": np.float32(7)})
    assert int(layer.num_batches_tracked) == 7


def test_vjp_raises_where_the_forward_raises():
    """One value per feature in training: the forward raises, and so does the vjp
    (it returned a zero gradient)."""
    layer = BatchNorm1d(3)
    one = X[:1, :1]
    with pytest.raises(ValueError, match=r"^x: expected more than 1 value per feature when training"):
        layer(one)
    with pytest.raises(ValueError, match=r"^x: expected more than 1 value per feature when training"):
        layer.vjp(one, np.ones_like(one))
    with pytest.raises(ValueError, match=r"^dy: expected shape \(4, 5, 3\)"):
        layer.vjp(X, X[:2])


def test_a_count_beyond_its_integer_dtype_is_an_error():
    """A count of 1e30 (or the largest uint64) used to wrap to a negative int64."""
    layer = BatchNorm1d(3, momentum=None)
    for bad in (1e30, np.uint64(2**64 - 1), 2**63):
        with pytest.raises(ValueError, match=r"^state_dict\['num_batches_tracked'\]: expected a non-negative integer"):
            layer.load_state_dict({**layer.state_dict(), "num_batches_tracked": bad})
    assert int(layer.num_batches_tracked) == 0


def test_vjp_names_dy():
    layer = BatchNorm1d(3)
    for bad, exception, pattern in [
        ("abc", TypeError, r"^dy: expected a real floating-point array, got dtype\('<U3'\)"),
        (X > 0, TypeError, r"^dy: expected a real floating-point array, got dtype\('bool'\)"),
        (X[..., :2], ValueError, r"^dy: expected shape \(4, 5, 3\) \(x's shape\), got \(4, 5, 2\)"),
    ]:
        with pytest.raises(exception, match=pattern):
            layer.vjp(X, bad)


def test_without_running_statistics_one_value_per_feature_is_an_error_in_inference_too():
    """The batch's statistics normalise in inference too: one value gives a variance of
    0 and an output of ``bias`` (PyTorch raises as well)."""
    layer = BatchNorm1d(3, track_running_stats=False, mode="inference")
    pattern = r"^x: expected more than 1 value per feature without running statistics"
    with pytest.raises(ValueError, match=pattern):
        layer(X[:1, :1])
    with pytest.raises(ValueError, match=pattern):
        layer.vjp(X[:1, :1], X[:1, :1])
    BatchNorm1d(3, mode="inference")(X[:1, :1])  # with running statistics it is fine


def test_the_core_function_names_its_arguments():
    from bn1d import batch_norm, batch_norm_vjp

    config = BatchNorm1d(3).config
    params, state = {"scale": np.ones(3), "bias": np.zeros(3)}, {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    with pytest.raises(TypeError, match=r"^params\['scale'\]: expected an array of the same library as x, got 'list'"):
        batch_norm(X, {**params, "scale": [1.0, 1.0, 1.0]}, state, config, training=True)
    with pytest.raises(TypeError, match=r"^training: expected a bool, got 'no'"):
        batch_norm(X, params, state, config, training="no")
    with pytest.raises(ValueError, match=r"^state: expected a mapping with exactly the keys"):
        batch_norm(X, params, {"running_mean": np.zeros(3)}, config, training=True)
    # None is no array (array_namespace skips it): named, not an AttributeError later
    with pytest.raises(TypeError, match=r"^params\['scale'\]: expected an array of the same library as x, got 'None'"):
        batch_norm(X, {**params, "scale": None}, state, config, training=True)
    with pytest.raises(TypeError, match=r"^dy: expected an array of the same library as x, got 'None'"):
        batch_norm_vjp(X, None, params, state, config, training=True)


def test_the_generic_layer_names_a_wrong_library():
    strict = pytest.importorskip("array_api_strict")
    from bn1d import Layer

    with pytest.raises(TypeError, match=r"^xp: expected an Array API namespace"):
        Layer(3, xp="numpy")
    with pytest.raises(TypeError, match=r"^x: expected an array of array_api_strict, got 'ndarray'"):
        Layer(3, xp=strict)(X)


def test_the_generic_layers_vjp_names_a_wrong_library():
    strict = pytest.importorskip("array_api_strict")
    from bn1d import Layer

    with pytest.raises(TypeError, match=r"^x: expected an array of array_api_strict, got 'ndarray'"):
        Layer(3, xp=strict).vjp(X, X)
