"""Unknown dimensions in the core (issue 24): ``None`` entries of ``x.shape`` (the Array
API's unknown sizes), through ndonnx, whose arrays build an ONNX model that onnxruntime runs.

``bn1d.Layer(C, xp=ndonnx)`` is called on a symbolic input (batch and length unknown);
the count then comes from the data at run time. The model is run on real data of several
sizes and compared with the NumPy backend: both accumulate in float64 and round the same
per-feature values to float32, so the results are asserted bitwise (measured equal), and
against float64 through the accuracy rule (R2.7) on un-centred raw data. R3.5: with an
unknown size the one-value check moves to run time (no error, no Bessel factor).
``load_state_dict`` takes ndonnx arrays, with R7.1's messages unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest

from bn1d import Layer
from bn1d.algorithm import static_count
from bn1d.backends.numpy import BatchNorm1d
from bn1d.conformance.accuracy import RULE, forward_errors, gradient_errors, raw_data

ndx = pytest.importorskip("ndonnx")
ort = pytest.importorskip("onnxruntime")

C = 32


def test_static_count_of_unknown_dimensions():
    assert static_count((4, 5, 3), (0, 1)) == 20
    assert static_count((None, 5, 3), (0, 1)) is None and static_count((4, None, 3), (0, 1)) is None
    assert static_count((None, 0, 3), (0, 1)) == 0  # a known 0 decides it
    assert static_count((4, 3, None), (0,)) == 4  # only the reduced axes count


def build(layer, shape, masked=False, training=True):
    """The ONNX model of one call of ``layer`` on an input of symbolic ``shape`` (``None``
    or named dimensions), as an onnxruntime session: ``y`` and the new state out."""
    x = ndx.argument(shape=shape, dtype=ndx.float32)
    fa = layer.config.feature_axis
    mask = ndx.argument(shape=tuple(d for i, d in enumerate(shape) if i != fa), dtype=ndx.bool) if masked else None
    y = layer(x, mask, training=training)
    inputs = {"x": x, **({"mask": mask} if masked else {})}
    model = ndx.build(inputs, {"y": y, **layer.state})
    session = ort.InferenceSession(model.SerializeToString())
    names = [o.name for o in session.get_outputs()]

    def run(x, mask=None):
        return dict(zip(names, session.run(None, {"x": x, **({"mask": mask} if masked else {})})))

    return run


CASES = {  # name: (layer arguments, symbolic shape, masked, concrete shapes run through one model)
    "(B, L, C)": ({}, (None, None, C), False, [(64, 256, C), (3, 1, C)]),
    "(B, L, C) named, masked": ({}, ("N", "L", C), True, [(64, 256, C), (2, 7, C)]),
    "(B, C, L) cumulative": ({"axis": (0, 2), "momentum": None}, ("N", C, 5), False, [(40, C, 5), (1, C, 5)]),
    "(B, C) fast variance, masked": ({"axis": 0, "fast_variance": True}, ("N", C), True, [(500, C), (9, C)]),
    "(B, L, C) no running statistics": ({"track_running_stats": False}, ("N", 6, C), False, [(20, 6, C)]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_model_with_unknown_dimensions_equals_numpy_bitwise(case):
    kwargs, shape, masked, sizes = CASES[case]
    kwargs = {"momentum": 0.0, **kwargs}  # momentum 0: the running statistics are the batch's (R2.7)
    layer = Layer(C, xp=ndx, **kwargs)
    run = build(layer, shape, masked)
    fa = layer.config.feature_axis
    for seed, size in enumerate(sizes):
        ratio = 3.0 if kwargs.get("fast_variance") else 1e3  # BrainPy's one-pass formula cancels (R2.7-exempt)
        x = raw_data(size, ratio, seed=seed).astype(np.float32)
        mask = np.random.default_rng(seed).random(np.delete(size, fa)) < 0.6 if masked else None
        got = run(x, mask)
        want = BatchNorm1d(C, **kwargs)
        np.testing.assert_array_equal(got["y"], want(x, mask))
        assert set(got) - {"y"} == set(want.state)
        for key, value in want.state.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        if not kwargs.get("fast_variance") and "track_running_stats" not in kwargs and kwargs["momentum"] == 0.0:
            errors = forward_errors(x, got["y"], got["running_mean"], got["running_var"], feature_axis=fa, mask=mask)
            assert max(errors.values()) <= RULE, errors


def test_inference_with_unknown_dimensions_equals_numpy_bitwise():
    state = {"running_mean": np.linspace(-1e3, 1e3, C, dtype=np.float32), "running_var": np.full(C, 4.0, np.float32)}
    layer, want = Layer(C, xp=ndx), BatchNorm1d(C)
    layer.load_state_dict({**layer.state_dict(), **{k: ndx.asarray(v) for k, v in state.items()}})
    want.load_state_dict({**want.state_dict(), **state})
    run = build(layer, ("N", None, C), training=False)
    x = raw_data((8, 30, C), 1e3, seed=3).astype(np.float32)
    np.testing.assert_array_equal(run(x)["y"], want(x, training=False))


def test_one_value_per_feature_is_decided_at_run_time():
    """R3.5: the shape does not say n == 1, the data do: no error and no Bessel factor,
    as for a mask keeping one value. A known shape with n == 1 still raises."""
    layer = Layer(3, xp=ndx, momentum=0.5, bias_initializer=0.25)
    run = build(layer, ("N", "L", 3))
    x = np.array([[[1.0, -2.0, 1e3]]], np.float32)
    got = run(x)
    np.testing.assert_array_equal(got["y"], np.full((1, 1, 3), 0.25, np.float32))
    np.testing.assert_array_equal(got["running_mean"], 0.5 * x[0, 0])
    np.testing.assert_array_equal(got["running_var"], np.full(3, 0.5, np.float32))  # 0.5 * 1 + 0.5 * 0, no factor
    masked = BatchNorm1d(3, momentum=0.5, bias_initializer=0.25)
    masked(np.concatenate([x, x + 1]), np.array([[True], [False]]))
    for key, value in masked.state.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    with pytest.raises(ValueError, match=r"^x: expected more than 1 value per feature when training, got \(1, 1, 3\)$"):
        Layer(3, xp=ndx)(ndx.asarray(x))


def test_the_analytic_gradients_with_unknown_dimensions():
    layer = Layer(C, xp=ndx)
    x_in, dy_in = (
        ndx.argument(shape=("N", "L", C), dtype=ndx.float32),
        ndx.argument(shape=("N", "L", C), dtype=ndx.float32),
    )
    grads = layer.vjp(x_in, dy_in, training=True)
    model = ndx.build({"x": x_in, "dy": dy_in}, {f"d{key}": value for key, value in grads.items()})
    session = ort.InferenceSession(model.SerializeToString())
    x = raw_data((16, 64, C), 1e2, seed=5).astype(np.float32)
    dy = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)
    outputs = zip([o.name[1:] for o in session.get_outputs()], session.run(None, {"x": x, "dy": dy}))
    got = dict(outputs)
    want = BatchNorm1d(C).vjp(x, dy)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    float64 = BatchNorm1d(C, dtype=np.float64).vjp(x.astype(np.float64), dy.astype(np.float64))
    errors = gradient_errors(x, dy, got, float64, feature_axis=2)
    assert max(errors.values()) <= RULE, errors


def test_an_eager_ndonnx_layer_equals_numpy_bitwise():
    x = raw_data((8, 16, C), 1e3, seed=7).astype(np.float32)
    layer, want = Layer(C, xp=ndx), BatchNorm1d(C)
    np.testing.assert_array_equal(layer(ndx.asarray(x)).unwrap_numpy(), want(x))
    for key, value in want.state.items():
        np.testing.assert_array_equal(layer.state[key].unwrap_numpy(), value, err_msg=key)


STATE = {
    "scale": np.array([1.5, -0.5, 2.0], np.float32),
    "bias": np.array([0.1, 0.2, 0.3], np.float32),
    "running_mean": np.array([1e3, -2.0, 3.0], np.float32),
    "running_var": np.array([1.0, 2.0, 3.0], np.float32),
    "num_batches_tracked": np.int64(4),
}


@pytest.mark.parametrize("make", [lambda: Layer(3, xp=ndx, momentum=None), lambda: BatchNorm1d(3, momentum=None)],
                         ids=["ndonnx", "numpy"])  # fmt: skip
def test_load_state_dict_takes_ndonnx_arrays(make):
    layer = make()
    layer.load_state_dict({key: ndx.asarray(value) for key, value in STATE.items()})
    for key, value in layer.state_dict().items():
        got = value.unwrap_numpy() if hasattr(value, "unwrap_numpy") else np.asarray(value)
        np.testing.assert_array_equal(got, STATE[key], err_msg=key)


BAD = [
    ("running_var", np.array([1.0, -2.0, 3.0], np.float32)),
    ("running_mean", np.array([True, False, True])),
    ("running_mean", np.array([1.0, 2.0], np.float32)),
    ("running_mean", np.array([1e300, 0.0, 0.0])),
    ("num_batches_tracked", np.float32(3.5)),
    ("num_batches_tracked", np.int32(-1)),
    ("num_batches_tracked", np.array([1, 2])),
]


@pytest.mark.parametrize("key, value", BAD, ids=[f"{k}-{v.dtype}-{v.shape}" for k, v in BAD])
def test_bad_ndonnx_entries_are_refused_with_the_numpy_entries_messages(key, value):
    """R7.1: the same error, word for word, as for the same values given as NumPy arrays."""
    messages = []
    for convert in (np.asarray, ndx.asarray):
        with pytest.raises((TypeError, ValueError)) as raised:
            BatchNorm1d(3, momentum=None).load_state_dict({**STATE, key: convert(value)})
        messages.append((raised.type, str(raised.value)))
    assert messages[0] == messages[1]


def test_an_ndonnx_array_without_values_is_not_an_array_to_load():
    lazy = ndx.argument(shape=(3,), dtype=ndx.float32)
    with pytest.raises(TypeError, match=r"^state_dict\['running_mean'\]: expected an array, got 'Array'$"):
        BatchNorm1d(3, momentum=None).load_state_dict({**STATE, "running_mean": lazy})
