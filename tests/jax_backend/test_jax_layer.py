"""The JAX layer against the NumPy specification on one device.

Forward, running statistics and ``jax.grad`` gradients are compared with the
float64 NumPy backend (``BatchNorm1d.__call__`` and the analytic ``vjp``), in
training and inference, with and without masks, for every layout of docs/spec.md
R1.3; then dtypes, edge counts, errors (docs/spec.md R7.1) and the protocol.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn1d.backends import numpy as spec
from bn1d.backends.jax import BatchNorm1d
from bn1d.protocol import BatchNormLayer

# Float32 against the float64 specification: inputs are ~3 +- 1.5 and statistics sum
# at most 30 values, float32 rounding at 6e-8 relative. Measured worst absolute errors
# over the layout/mask/mode grid: 7.3e-7 (y, |y| < 6), 4.9e-7 (dx), 1.8e-6 (dscale, a
# sum of 30 products), 1.6e-7 (running statistics). 2e-5 absolute plus 2e-5 relative
# is at least 10x that, and far below what a real mistake (a wrong count, Bessel
# factor or axis) changes (> 1e-3).
ATOL, RTOL = 2e-5, 2e-5

#: (name, axis, input shape): docs/spec.md R1.3's layouts, with negative axes.
LAYOUTS = [
    ("BLC", (0, 1), (4, 5, 3)),
    ("BC", 0, (6, 3)),
    ("BCL", (0, 2), (4, 3, 5)),
    ("BLC-negative", (-3, -2), (4, 5, 3)),
    ("BCL-negative", (0, -1), (4, 3, 5)),
    ("BC-negative", -2, (6, 3)),
]
STATE = {"running_mean": np.array([0.5, -1.0, 2.0]), "running_var": np.array([2.0, 0.5, 1.5])}
PARAMS = {"scale": np.array([1.5, -0.5, 2.0]), "bias": np.array([0.1, 0.2, -0.3])}
KWARGS = dict(momentum=0.9, scale_initializer=PARAMS["scale"], bias_initializer=PARAMS["bias"])


def data(shape, feature_axis, seed=0, masked=False):
    rng = np.random.default_rng(seed)
    x = (3.0 + 1.5 * rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    mask_shape = shape[:feature_axis] + shape[feature_axis + 1 :]
    mask = rng.random(mask_shape) < 0.6 if masked else None
    if masked:
        mask.flat[:2] = True  # at least 2 kept values
    return x, dy, mask


def layers(axis, affine=True, **extra):
    """The JAX layer (float32) and the NumPy specification (float64) in the same state."""
    kwargs = dict(KWARGS, **extra) if affine else dict(momentum=0.9, affine=False, **extra)
    state = {**STATE, **PARAMS} if affine else STATE
    jax_layer, spec_layer = BatchNorm1d(3, axis, **kwargs), spec.BatchNorm1d(3, axis, dtype=np.float64, **kwargs)
    jax_layer.load_state_dict(state)
    spec_layer.load_state_dict(state)
    return jax_layer, spec_layer


def assert_matches_spec(jax_layer, spec_layer, x, dy, mask, training, atol=ATOL, rtol=RTOL):
    """``apply`` under ``jit(grad)`` and the stateful call against the specification."""

    def loss(params, x):
        y, new_state = jax_layer.apply(params, jax_layer.state, x, mask=mask, training=training)
        return jnp.sum(y.astype(jnp.float32) * dy), (y, new_state)

    (grads, dx), (y, new_state) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(jax_layer.params, x)
    want_grads = spec_layer.vjp(x.astype(np.float64), dy, mask=mask, training=training)
    want_y = spec_layer(x.astype(np.float64), mask=mask, training=training)
    close = lambda got, want, what: np.testing.assert_allclose(
        np.asarray(got, np.float64), want, atol=atol, rtol=rtol, err_msg=what
    )
    close(y, want_y, "y")
    close(dx, want_grads["x"], "dx")
    for key in jax_layer.params:
        close(grads[key], want_grads[key], f"d{key}")
    for key in new_state:
        close(new_state[key], getattr(spec_layer, key), key)
    # The stateful protocol gives the same y and stores the same new state.
    stateful_y = jax_layer(x, mask=mask, training=training)
    np.testing.assert_allclose(np.asarray(stateful_y, np.float64), np.asarray(y, np.float64), atol=atol, rtol=rtol)
    for key in new_state:
        np.testing.assert_allclose(jax_layer.state[key], new_state[key], atol=atol, rtol=rtol)
    return y, new_state


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("name,axis,shape", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_forward_state_and_gradients_match_the_specification(name, axis, shape, masked, training):
    jax_layer, spec_layer = layers(axis)
    x, dy, mask = data(shape, jax_layer.config.feature_axis, masked=masked)
    y, new_state = assert_matches_spec(jax_layer, spec_layer, x, dy, mask, training)
    if not training:  # inference changes nothing
        np.testing.assert_array_equal(new_state["running_var"], np.float32(STATE["running_var"]))


@pytest.mark.parametrize("options", [{"fast_variance": True}, {"unbiased_running_var": False}, {"affine": False}])
def test_variance_options_and_non_affine_layer_match_the_specification(options):
    jax_layer, spec_layer = layers((0, 1), **options)
    x, dy, mask = data((4, 5, 3), 2, seed=1, masked=True)
    assert_matches_spec(jax_layer, spec_layer, x, dy, mask, training=True)
    if options.get("affine") is False:
        assert jax_layer.params == {} and set(jax_layer.state_dict()) == {"running_mean", "running_var"}


def test_spec_reference_numbers():
    """docs/spec.md R8.1 (BrainPy 2.8.2's numbers for this input)."""
    x = np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32)
    layer = BatchNorm1d(3)
    y = layer(x)
    np.testing.assert_allclose(layer.state["running_mean"], [0.000187764846, 0.000142188437, 0.00198892271], rtol=1e-5)
    np.testing.assert_allclose(layer.state["running_var"], [1.00352418, 0.99599659, 0.99568027], rtol=1e-6)
    np.testing.assert_allclose(y[3, 4], [0.59750485, -1.58767688, -1.17151904], rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_are_reduced_in_float32(dtype):
    """``y`` keeps the input dtype; statistics and state are float32. Against the
    specification run on the same (exactly upcast) values: ``y`` is rounded once to
    ``dtype`` at the end, so it is within one ulp of ``dtype`` (eps relative); the
    state is float32-accurate (measured: y within 0.48 eps, state within 1.3e-7
    relative; we allow eps and 1e-6). At mean 300 a float16 reduction would
    overflow (sum of squares > 65504): the float32 one stays finite."""
    eps = float(jnp.finfo(dtype).eps)
    for mean in (3.0, 300.0):
        x = jnp.asarray(mean + np.random.default_rng(2).standard_normal((8, 5, 3)), dtype)
        jax_layer, spec_layer = layers((0, 1))
        apply = jax.jit(jax_layer.apply, static_argnames="training")
        y, new_state = apply(jax_layer.params, jax_layer.state, x, training=True)
        want_y = spec_layer(np.asarray(x, np.float64))
        assert y.dtype == dtype and new_state["running_var"].dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(y, np.float32)))
        np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=eps, atol=ATOL)
        for key in new_state:
            np.testing.assert_allclose(new_state[key], getattr(spec_layer, key), rtol=1e-6, atol=ATOL)


def test_float64_with_x64_matches_the_specification_to_rounding():
    """With ``jax_enable_x64`` and float64 parameters the two backends compute the
    same float64 formulas: only summation order differs (1e-12 relative)."""
    with jax.enable_x64(True):
        jax_layer = BatchNorm1d(3, dtype=jnp.float64, **KWARGS)
        spec_layer = spec.BatchNorm1d(3, dtype=np.float64, **KWARGS)
        for layer in (jax_layer, spec_layer):
            layer.load_state_dict({**STATE, **PARAMS})
        x, dy, mask = data((4, 5, 3), 2, seed=3, masked=True)
        x = x.astype(np.float64) * 1.001  # values float32 cannot hold
        y, new_state = assert_matches_spec(jax_layer, spec_layer, x, dy, mask, True, atol=1e-12, rtol=1e-12)
        assert y.dtype == jnp.float64 and new_state["running_mean"].dtype == jnp.float64


def test_two_pass_variance_survives_a_large_mean_and_fast_variance_does_not():
    """Mean 1e4, std 1e-2 in float32 (docs/spec.md R2.2, R2.7): the one-pass formula cancels."""
    x = (1e4 + 1e-2 * np.random.default_rng(4).standard_normal((16, 8, 3))).astype(np.float32)
    true_var = np.var(x.astype(np.float64), axis=(0, 1))
    for fast in (False, True):
        layer = BatchNorm1d(3, momentum=0.0, unbiased_running_var=False, fast_variance=fast)
        layer(x)
        error = np.max(np.abs(np.asarray(layer.state["running_var"]) - true_var) / true_var)
        assert (error > 0.5) if fast else (error < 0.05), (fast, error)


def test_no_unmasked_position_behaves_as_inference():
    """n == 0 (docs/spec.md R3.6): y as in inference, state unchanged, nothing NaN."""
    jax_layer, spec_layer = layers((0, 1))
    x, dy, _ = data((4, 5, 3), 2, seed=5)
    mask = np.zeros((4, 5), bool)
    y, new_state = assert_matches_spec(jax_layer, spec_layer, x, dy, mask, training=True)
    inference_y, _ = jax_layer.apply(jax_layer.params, jax_layer.state, x, training=False)
    np.testing.assert_allclose(y, inference_y, atol=ATOL, rtol=RTOL)  # jit and eager round differently
    np.testing.assert_array_equal(new_state["running_mean"], np.float32(STATE["running_mean"]))
    empty_y, empty_state = jax_layer.apply(jax_layer.params, jax_layer.state, np.zeros((0, 5, 3), np.float32))
    assert empty_y.shape == (0, 5, 3)
    np.testing.assert_array_equal(empty_state["running_var"], np.float32(STATE["running_var"]))


def test_one_value_per_feature():
    """n == 1: an error when the shape says so, no Bessel factor when a mask does."""
    jax_layer, spec_layer = layers((0, 1))
    x = np.ones((1, 1, 3), np.float32)
    with pytest.raises(ValueError) as want:
        spec_layer(x)
    with pytest.raises(ValueError) as got:
        jax.jit(lambda x: jax_layer.apply(jax_layer.params, jax_layer.state, x, training=True))(x)
    assert str(got.value) == str(want.value) == "x: expected more than 1 value per feature when training, got (1, 1, 3)"
    x, dy, _ = data((2, 2, 3), 2, seed=6)
    mask = np.array([[False, True], [False, False]])
    _, new_state = assert_matches_spec(jax_layer, spec_layer, x, dy, mask, training=True)
    np.testing.assert_allclose(new_state["running_var"], 0.9 * STATE["running_var"], rtol=1e-6)  # batch var 0


BAD_INPUTS = {
    "int x": (np.ones((4, 5, 3), np.int32), None),
    "bool x": (np.ones((4, 5, 3), bool), None),
    "complex x": (np.ones((4, 5, 3), np.complex64), None),
    "2-D x for 3-D layer": (np.ones((4, 3), np.float32), None),
    "wrong feature size": (np.ones((4, 5, 2), np.float32), None),
    "float mask": (np.ones((4, 5, 3), np.float32), np.ones((4, 5), np.float32)),
    "mask with the feature axis": (np.ones((4, 5, 3), np.float32), np.ones((4, 5, 3), bool)),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_at_trace_time_with_the_specification_message(case):
    x, mask = BAD_INPUTS[case]
    jax_layer, spec_layer = layers((0, 1))
    with pytest.raises((TypeError, ValueError)) as want:
        spec_layer(x, mask=mask)
    traced = jax.jit(lambda x, mask: jax_layer.apply(jax_layer.params, jax_layer.state, x, mask=mask, training=True))
    with pytest.raises(type(want.value)) as got:
        traced(jnp.asarray(x), None if mask is None else jnp.asarray(mask))
    assert str(got.value) == str(want.value)
    before = jax_layer.state_dict()
    with pytest.raises(type(want.value)) as got:
        jax_layer(x, mask=mask)  # host inputs, stateful call: same message, nothing changed
    assert str(got.value) == str(want.value)
    assert all(np.array_equal(before[k], v) for k, v in jax_layer.state_dict().items())


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"^momentum: expected a finite float in \[0, 1\] or None, got 1.5$"):
        BatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match=r"^axis: expected no duplicate axes, got \(0, -3\)$"):
        BatchNorm1d(3, axis=(0, -3))
    with pytest.raises(TypeError, match=r"^dtype: expected jax.numpy.float32, or jax.numpy.float64 .*float16"):
        BatchNorm1d(3, dtype=jnp.float16)
    assert BatchNorm1d(3, dtype=None).dtype == jnp.float32  # None: the default, as on every backend
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match=r"^dtype: expected .*float64 with jax_enable_x64 on"):
            BatchNorm1d(3, dtype=jnp.float64)
    layer = BatchNorm1d(3)
    x = np.ones((4, 5, 3), np.float32)
    with pytest.raises(TypeError, match=r"^training: expected None or a bool, got 1$"):
        layer.apply(layer.params, layer.state, x, training=1)
    with pytest.raises(ValueError, match=r"^params: expected a mapping with exactly the keys \['scale', 'bias'\]"):
        layer.apply({"scale": layer.params["scale"]}, layer.state, x)
    with pytest.raises(ValueError, match=r"^state\['running_mean'\]: expected shape \(3,\), got \(4,\)$"):
        layer.apply(layer.params, {"running_mean": jnp.zeros(4), "running_var": jnp.ones(3)}, x)
    with pytest.raises(TypeError, match=r"^mode: expected a bool, got 'eval'$"):
        layer.train("eval")


def test_stateful_training_call_refuses_tracers_but_inference_composes():
    layer, _ = layers((0, 1))
    x = np.random.default_rng(8).standard_normal((4, 5, 3)).astype(np.float32)
    with pytest.raises(
        TypeError, match=r"^x: expected a concrete array for a stateful training call \(use layer.apply"
    ):
        jax.jit(lambda x: layer(x, training=True))(x)
    layer.eval()
    np.testing.assert_allclose(jax.jit(layer)(x), layer(x), rtol=1e-6)
    np.testing.assert_array_equal(layer.state["running_mean"], np.float32(STATE["running_mean"]))


def test_stateful_training_call_refuses_a_traced_mask():
    """A traced mask used to be stored in ``layer.state`` through the new running
    statistics, and every later call failed with ``UnexpectedTracerError``."""
    layer, _ = layers((0, 1))
    x = np.random.default_rng(9).standard_normal((4, 5, 3)).astype(np.float32)
    mask = np.ones((4, 5), bool)
    with pytest.raises(TypeError, match=r"^mask: expected a concrete array for a stateful training call"):
        jax.jit(lambda mask: layer(x, mask=mask, training=True))(mask)
    with pytest.raises(TypeError, match=r"^mask: expected a concrete array"):
        jax.vmap(lambda mask: layer(x[0], mask=mask, training=True), in_axes=0)(mask[:, None].repeat(4, 1))
    np.testing.assert_array_equal(layer.state["running_mean"], np.float32(STATE["running_mean"]))
    layer(x, mask=mask)  # the layer still works


def test_load_is_atomic_when_the_count_does_not_fit_jaxs_integer():
    """JAX's default integer (int32, or int64 with ``jax_enable_x64``): a count beyond it
    is refused before anything is assigned (the parameters used to change, then the count
    raised OverflowError)."""
    layer = BatchNorm1d(3, momentum=None)
    state = {key: np.asarray(value) for key, value in layer.state_dict().items()}
    top = int(np.iinfo(jnp.asarray(0).dtype).max)
    with pytest.raises(ValueError, match=rf"^state_dict\['num_batches_tracked'\]: expected .* up to {top}"):
        layer.load_state_dict({**state, "scale": np.full(3, 5.0), "num_batches_tracked": top + 1})
    np.testing.assert_array_equal(layer.scale, 1.0)


def test_vjp_and_apply_name_their_arguments():
    layer, _ = layers((0, 1))
    x = np.ones((4, 5, 3), np.float32)
    with pytest.raises(TypeError, match=r"^dy: expected a real floating-point array, got dtype\('int64'\)"):
        layer.vjp(x, x.astype(np.int64))
    with pytest.raises(ValueError, match=r"^dy: expected shape \(4, 5, 3\)"):
        layer.vjp(x, x[..., :2])
    y, _ = layer.apply({"scale": np.ones(3), "bias": [0.0, 0.0, 0.0]}, layer.state, x)  # host values, as JAX takes
    with pytest.raises(TypeError, match=r"^params\['scale'\]: expected an array"):
        layer.apply({"scale": "a", "bias": np.zeros(3)}, layer.state, x)


@pytest.mark.parametrize("options", [{"momentum": None}, {"track_running_stats": False}], ids=str)
def test_conversions_refuse_what_flax_and_brainpy_cannot_hold(options):
    layer = BatchNorm1d(3, **options)
    name = next(iter(options))
    with pytest.raises(ValueError, match=rf"^{name}: expected .* to convert to Flax linen BatchNorm"):
        layer.to_flax()
    with pytest.raises(ValueError, match=rf"^{name}: expected .* to convert to brainpy"):
        layer.to_brainpy(object())


def test_layers_pickle():
    """The compiled call is cached per configuration at module level, not on the layer."""
    import pickle

    fresh = pickle.loads(pickle.dumps(BatchNorm1d(3)))  # the reproducer
    assert fresh.config == BatchNorm1d(3).config
    layer, _ = layers((0, 1))
    x = np.random.default_rng(10).standard_normal((4, 5, 3)).astype(np.float32)
    layer(x)
    copy = pickle.loads(pickle.dumps(layer))
    assert copy.config == layer.config and copy.training == layer.training
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(copy.state_dict()[key], value)
    np.testing.assert_array_equal(copy(x), layer(x))


def test_host_bfloat16_inputs_and_state_are_taken():
    """NumPy arrays of ml_dtypes' bfloat16 (JAX's own host type) are inputs and
    loadable state, like JAX's bfloat16 arrays."""
    import ml_dtypes

    layer, _ = layers((0, 1))
    x = np.random.default_rng(11).standard_normal((4, 5, 3)).astype(ml_dtypes.bfloat16)
    y = layer(x, training=False)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, layer(jnp.asarray(x), training=False))
    state = {key: np.asarray(value).astype(ml_dtypes.bfloat16) for key, value in layer.state_dict().items()}
    layer.load_state_dict(state)
    np.testing.assert_array_equal(layer.state["running_var"], state["running_var"].astype(np.float32))


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_running_statistics_get_no_gradient(training):
    """Without stop_gradient, inference y depends on the running statistics and the
    new statistics depend on x in training: both gradients would be non-zero."""
    layer, _ = layers((0, 1))
    x = np.random.default_rng(9).standard_normal((4, 5, 3)).astype(np.float32)

    def y_sum(state):
        return jnp.sum(layer.apply(layer.params, state, x, training=training)[0])

    def new_state_sum(x):
        return sum(jnp.sum(v) for v in layer.apply(layer.params, layer.state, x, training=training)[1].values())

    assert all(not np.any(g) for g in jax.tree.leaves(jax.grad(y_sum)(layer.state)))
    assert not np.any(jax.grad(new_state_sum)(x))


def test_protocol_modes_and_state_dict():
    layer = BatchNorm1d(3, mode="inference")
    assert isinstance(layer, BatchNormLayer) and layer.training is False
    assert layer.train() is layer and layer.training is True and layer.eval().training is False
    x = np.random.default_rng(10).standard_normal((4, 5, 3)).astype(np.float32)
    layer.train()
    layer(x)
    saved = {k: np.asarray(v) for k, v in layer.state_dict().items()}
    assert set(saved) == {"scale", "bias", "running_mean", "running_var"}
    # A state saved from the NumPy backend gives the same inference outputs here.
    numpy_layer = spec.BatchNorm1d(3, mode="inference")
    numpy_layer.load_state_dict(saved)
    fresh = BatchNorm1d(3, mode="inference")
    fresh.load_state_dict(numpy_layer.state_dict())
    np.testing.assert_allclose(fresh(x), numpy_layer(x), atol=1e-6, rtol=1e-6)
    # Loading is strict and atomic: a bad state changes nothing.
    for bad, message in (
        ({k: v for k, v in saved.items() if k != "bias"}, r"^state_dict: expected exactly the keys"),
        ({**saved, "running_var": -saved["running_var"]}, r"^state_dict\['running_var'\]: expected non-negative"),
        ({**saved, "scale": np.ones(4)}, r"^state_dict\['scale'\]: expected shape \(3,\)"),
    ):
        with pytest.raises(ValueError, match=message):
            fresh.load_state_dict(bad)
        assert all(np.array_equal(fresh.state_dict()[k], saved[k]) for k in saved)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("position", [(0, 0, 0), (1, 2, 0)], ids=["first sample", "later sample"])
def test_a_non_finite_input_gives_the_specifications_non_finite_results(value, position):
    """Every result is non-finite exactly where the NumPy specification's is (a first
    sample that is not finite is no shift: the mean of data holding inf is inf)."""
    x = np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32)
    x[position] = value
    reference = spec.BatchNorm1d(3)
    want_y = reference(x)
    layer = BatchNorm1d(3)
    y = np.asarray(layer(jnp.asarray(x)))
    for name, got, expected in (("y", y, want_y), ("running_mean", layer.running_mean, reference.running_mean),
                                ("running_var", layer.running_var, reference.running_var)):  # fmt: skip
        got = np.asarray(got)
        assert np.array_equal(np.isnan(got), np.isnan(expected)), name
        assert np.array_equal(np.isposinf(got), np.isposinf(expected)), name
        assert np.array_equal(np.isneginf(got), np.isneginf(expected)), name
