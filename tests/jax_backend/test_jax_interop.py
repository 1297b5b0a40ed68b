"""The JAX layer with Flax linen, BrainPy and optax (docs/spec.md section 6, issue items 2 and 6).

Flax and optax are test dependencies (``pytest.importorskip``: the package itself
never needs them). BrainPy is optional too: the test against the real
``brainpy.dnn.BatchNorm1d`` runs where BrainPy is installed; the converters'
plumbing is also checked on a stand-in that has BrainPy's attributes.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn1d.backends import numpy as spec
from bn1d.backends.jax import BatchNorm1d

# Two float32 implementations of the same formulas that sum in different orders: the
# measured worst difference from Flax is 1.7e-6 (y of size < 6, incl. the one-pass
# variance); 2e-5 absolute plus 2e-5 relative is over 10x that.
ATOL, RTOL = 2e-5, 2e-5

STATE = {"running_mean": np.array([0.5, -1.0, 2.0]), "running_var": np.array([2.0, 0.5, 1.5])}
PARAMS = {"scale": np.array([1.5, -0.5, 2.0]), "bias": np.array([0.1, 0.2, -0.3])}


def batch(seed: int, shape=(4, 5, 3)) -> np.ndarray:
    return (3.0 + 1.5 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def flax_variables(use_scale=True, use_bias=True):
    variables = {"batch_stats": {"mean": STATE["running_mean"], "var": STATE["running_var"]}}
    params = {key: PARAMS[key] for key, used in (("scale", use_scale), ("bias", use_bias)) if used}
    if params:
        variables["params"] = params
    return jax.tree.map(jnp.float32, variables)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_converted_flax_batchnorm_gives_flax_outputs_and_running_stats(use_fast_variance, masked):
    linen = pytest.importorskip("flax.linen")
    module = linen.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3, use_fast_variance=use_fast_variance)
    x = batch(0)
    mask = np.random.default_rng(1).random((4, 5)) < 0.6 if masked else None
    variables = flax_variables()
    flax_mask = None if mask is None else np.broadcast_to(mask[..., None], x.shape)
    flax_y, updates = module.apply(variables, x, mask=flax_mask, mutable=["batch_stats"])

    layer = BatchNorm1d.from_flax(variables, momentum=0.9, epsilon=1e-3, fast_variance=use_fast_variance)
    assert layer.config.unbiased_running_var is False  # Flax's biased update, by default
    y, new_state = layer.apply(layer.params, layer.state, x, mask=mask, training=True)
    np.testing.assert_allclose(y, flax_y, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(new_state["running_mean"], updates["batch_stats"]["mean"], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(new_state["running_var"], updates["batch_stats"]["var"], atol=ATOL, rtol=RTOL)

    # Back to Flax: the updated state gives Flax the same inference outputs.
    layer.state = new_state
    flax_inference = linen.BatchNorm(use_running_average=True, epsilon=1e-3).apply(layer.to_flax(), x)
    np.testing.assert_allclose(flax_inference, layer(x, training=False), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("use_scale,use_bias", [(False, False), (False, True)])
def test_flax_without_scale_or_bias(use_scale, use_bias):
    linen = pytest.importorskip("flax.linen")
    module = linen.BatchNorm(use_running_average=False, use_scale=use_scale, use_bias=use_bias)
    x = batch(2)
    variables = flax_variables(use_scale, use_bias)
    flax_y, _ = module.apply(variables, x, mutable=["batch_stats"])
    layer = BatchNorm1d.from_flax(variables)
    assert layer.config.affine is use_bias  # a missing scale becomes ones; no params at all: not affine
    np.testing.assert_allclose(layer(x), flax_y, atol=ATOL, rtol=RTOL)


def test_optax_training_loop_follows_the_specification():
    """Three jitted SGD steps: the parameters follow the specification's analytic
    gradients and the running statistics its updates, step by step."""
    optax = pytest.importorskip("optax")
    layer = BatchNorm1d(3, momentum=0.9, scale_initializer=PARAMS["scale"], bias_initializer=PARAMS["bias"])
    reference = spec.BatchNorm1d(3, momentum=0.9, dtype=np.float64, scale_initializer=PARAMS["scale"],
                                 bias_initializer=PARAMS["bias"])  # fmt: skip
    optimizer = optax.sgd(0.1)

    @jax.jit
    def train_step(params, state, opt_state, x, dy):
        def loss(params):
            y, new_state = layer.apply(params, state, x, training=True)
            return jnp.sum(y * dy), new_state

        grads, new_state = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state

    params, state, opt_state = layer.params, layer.state, optimizer.init(layer.params)
    for step in range(3):
        x, dy = batch(10 + step), np.random.default_rng(20 + step).standard_normal((4, 5, 3)).astype(np.float32)
        params, state, opt_state = train_step(params, state, opt_state, x, dy)
        grads = reference.vjp(x.astype(np.float64), dy)
        reference(x.astype(np.float64))
        reference.scale, reference.bias = reference.scale - 0.1 * grads["scale"], reference.bias - 0.1 * grads["bias"]
        for key in ("scale", "bias"):
            np.testing.assert_allclose(params[key], getattr(reference, key), atol=ATOL, rtol=RTOL, err_msg=key)
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(state[key], getattr(reference, key), atol=ATOL, rtol=RTOL, err_msg=key)


def test_brainpy_converters_on_a_stand_in():
    """``from_brainpy`` reads BrainPy's attributes and variables (``.value``);
    ``to_brainpy`` writes the variables back, validated."""
    variable = lambda value: types.SimpleNamespace(value=np.asarray(value, np.float32))
    stand_in = types.SimpleNamespace(
        num_features=3, axis=(0, 2), epsilon=np.float32(1e-3), momentum=0.9, affine=True,
        axis_name=None, axis_index_groups=None,
        **{key: variable(value) for key, value in {**STATE, **PARAMS}.items()},
    )  # fmt: skip
    layer = BatchNorm1d.from_brainpy(stand_in)
    config = layer.config
    assert (config.reduce_axes, config.momentum, config.fast_variance, config.unbiased_running_var) == (
        (0, 2),
        0.9,
        True,
        True,
    )
    assert config.epsilon == pytest.approx(1e-3)
    for key, value in {**STATE, **PARAMS}.items():
        np.testing.assert_array_equal(layer.state_dict()[key], np.float32(value))
    layer(batch(3, (4, 3, 5)))
    layer.to_brainpy(stand_in)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(getattr(stand_in, key).value, value)
    with pytest.raises(ValueError, match=r"^state_dict\['running_var'\]: expected non-negative values"):
        BatchNorm1d.from_brainpy(types.SimpleNamespace(**{**vars(stand_in), "running_var": variable([-1.0, 1, 1])}))


def test_real_brainpy_batchnorm_round_trip():
    bp = pytest.importorskip("brainpy", reason="BrainPy is optional; the stand-in test covers the plumbing")
    x = batch(4)
    brainpy_layer = bp.dnn.BatchNorm1d(3, epsilon=1e-3, momentum=0.9, scale_initializer=PARAMS["scale"],
                                       bias_initializer=PARAMS["bias"])  # fmt: skip
    for key, value in STATE.items():
        getattr(brainpy_layer, key).value = jnp.asarray(value, jnp.float32)
    layer = BatchNorm1d.from_brainpy(brainpy_layer)
    fit_before = bp.share.load("fit", None)  # BrainPy's global training flag
    try:
        bp.share.save(fit=True)
        brainpy_y = brainpy_layer(bp.math.asarray(x))
        y = layer(x)
        np.testing.assert_allclose(y, brainpy_y, atol=ATOL, rtol=RTOL)
        for key in STATE:
            np.testing.assert_allclose(layer.state[key], getattr(brainpy_layer, key).value, atol=ATOL, rtol=RTOL)
        fresh = bp.dnn.BatchNorm1d(3, epsilon=1e-3)
        layer.to_brainpy(fresh)
        bp.share.save(fit=False)
        np.testing.assert_allclose(fresh(bp.math.asarray(x)), layer(x, training=False), atol=ATOL, rtol=RTOL)
    finally:
        bp.share.save(fit=fit_before)
