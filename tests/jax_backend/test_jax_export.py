"""``jax.export`` of bn1d's JAX layer with symbolic batch and length dimensions (issue 24).

The pure ``apply``, its gradients and the Flax NNX, linen and Equinox modules (which call
it) are exported with ``jax.export.symbolic_shape("b, l, C")``, serialized and read back,
then run on concrete inputs of several sizes. Their results are compared with the same
function jitted at the concrete shape (the layer's ordinary call), and with the float64
NumPy specification through the accuracy rule (R2.7).

Tolerances: without a mask, exporting changes nothing but where the count comes from (an
integer counted at run time instead of a Python constant, the same value, exactly), and
the results are the jitted call's bit for bit: asserted. With a mask, XLA compiles the
refined program with other elementwise fusions (measured: ``y`` up to 1e-6 apart at
|y| < 5, the statistics bitwise); both programs meet R2.7 against float64 (asserted on
the exported one), so they differ by at most twice the rule: ``2 * RULE`` relative to
the values' scale (``sigma`` for the mean, 1 for ``y``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from bn1d.backends import numpy as spec
from bn1d.backends.jax import BatchNorm1d
from bn1d.conformance.accuracy import RULE, forward_errors, gradient_errors, raw_data

C = 32


def exported(function, *args):
    """``function`` jitted, exported for ``args`` (``ShapeDtypeStruct`` with symbolic
    dimensions, or pytrees of arrays), serialized and deserialized: what a user ships."""
    return export.deserialize(export.export(jax.jit(function))(*args).serialize())


def symbolic(layout: str, feature_axis: int | None = None):
    """The input's ``ShapeDtypeStruct``; with ``feature_axis``, also its mask's (the same
    symbols: one scope)."""
    dims = export.symbolic_shape(layout)
    x = jax.ShapeDtypeStruct(dims, jnp.float32)
    if feature_axis is None:
        return x
    return x, jax.ShapeDtypeStruct(tuple(d for i, d in enumerate(dims) if i != feature_axis), jnp.bool_)


def assert_same(got, want, exact: bool, scale: float = 1.0):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=0, atol=2 * RULE * scale)


LAYOUTS = {  # name: (axis, symbolic layout, concrete shapes run through one export)
    "(B, L, C)": ((0, 1), f"b, l, {C}", [(64, 256, C), (3, 5, C)]),
    "(B, C, L)": ((0, 2), f"b, {C}, l", [(16, C, 100), (2, C, 3)]),
    "(B, C)": (0, f"b, {C}", [(1000, C), (7, C)]),
}


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_exported_apply_equals_the_jitted_call_and_meets_the_rule(layout, masked):
    """Training and inference, un-centred raw data (|mean| / std = 1e3), one export for
    every size: the jitted call's results (bitwise without a mask) and R2.7 against float64."""
    axis, symbols, shapes = LAYOUTS[layout]
    layer = BatchNorm1d(C, axis, momentum=0.0)  # momentum 0: the running statistics are the batch's
    fa = layer.config.feature_axis
    params, state = layer.params, layer.state
    for training in (True, False):

        def call(params, state, x, mask, training=training):
            return layer.apply(params, state, x, mask=mask, training=training)

        x_spec, m_spec = symbolic(symbols, fa)
        ship = exported(call, params, state, x_spec, m_spec if masked else None)
        for seed, shape in enumerate(shapes):
            x = raw_data(shape, 1e3, seed=seed).astype(np.float32)
            mask = None
            if masked:
                mask = np.random.default_rng(seed).random(np.delete(shape, fa)) < 0.7
                mask.reshape(-1)[0] = False  # the shift is not position 0's sample
            got = ship.call(params, state, x, mask)
            want = jax.jit(call)(params, state, x, mask)
            sigma = float(np.std(x.astype(np.float64)))
            assert_same(got[0], want[0], exact=not masked)
            assert_same(got[1], want[1], exact=not masked, scale=sigma)
            if training:
                errors = forward_errors(x, got[0], got[1]["running_mean"], got[1]["running_var"], feature_axis=fa,
                                        mask=mask)  # fmt: skip
                assert max(errors.values()) <= RULE, errors


@pytest.mark.parametrize(
    "kwargs",
    [{"momentum": None, "fast_variance": True}, {"track_running_stats": False}, {"unbiased_running_var": False}],
    ids=["cumulative-fast", "no-running-stats", "biased"],
)
def test_the_options_export_bitwise(kwargs):
    layer = BatchNorm1d(C, **kwargs)
    x = (3.0 + 1.5 * np.random.default_rng(0).standard_normal((8, 9, C))).astype(np.float32)
    for training in (True, False):

        def call(params, state, x, training=training):
            return layer.apply(params, state, x, training=training)

        ship = exported(call, layer.params, layer.state, symbolic(f"b, l, {C}"))
        assert_same(ship.call(layer.params, layer.state, x), jax.jit(call)(layer.params, layer.state, x), exact=True)


def test_one_value_per_feature_is_decided_at_run_time_and_refused_when_the_shape_says_so():
    """R3.5: with symbolic dimensions the count is only known at run time; n == 1 then
    gives no Bessel factor and no error (the masked case's rule). A concrete shape with
    n == 1 still raises at trace time, exported or not."""
    layer = BatchNorm1d(3, momentum=0.5, scale_initializer=2.0, bias_initializer=0.25)

    def call(params, state, x):
        return layer.apply(params, state, x, training=True)

    ship = exported(call, layer.params, layer.state, symbolic("b, l, 3"))
    x = np.array([[[1.0, -2.0, 1e3]]], np.float32)
    y, state = ship.call(layer.params, layer.state, x)
    np.testing.assert_array_equal(y, np.full((1, 1, 3), 0.25, np.float32))  # variance 0: y is the bias
    np.testing.assert_array_equal(state["running_mean"], 0.5 * x[0, 0])
    np.testing.assert_array_equal(state["running_var"], np.full(3, 0.5, np.float32))  # 0.5 * 1 + 0.5 * 0 * 1
    masked = jax.jit(lambda p, s, x, m: layer.apply(p, s, x, mask=m, training=True))
    want = masked(layer.params, layer.state, np.concatenate([x, x + 5]), np.array([[True], [False]]))
    assert_same((y, state), (want[0][:1], want[1]), exact=True)  # the masked count's run-time rule
    y2, state2 = ship.call(layer.params, layer.state, np.concatenate([x, x + 2], axis=1))  # n = 2: factor 2
    np.testing.assert_array_equal(state2["running_var"], 0.5 + 0.5 * np.ones(3, np.float32) * 2)
    for spec_x in (jax.ShapeDtypeStruct((1, 1, 3), jnp.float32), x):
        with pytest.raises(
            ValueError, match=r"^x: expected more than 1 value per feature when training, got \(1, 1, 3\)"
        ):
            export.export(jax.jit(call))(layer.params, layer.state, spec_x)


def test_exported_gradients_meet_the_rule_and_equal_the_jitted_ones_within_twice_it():
    """``jax.grad`` exported: the backward program's sums are fused differently (measured:
    ``dscale`` 1-2 ulps from the jitted one's), so the comparison is R2.7's for gradients
    (``gradient_errors``' scales) against float64, and twice that against the jitted call."""
    layer = BatchNorm1d(C, momentum=0.9)
    x = raw_data((16, 40, C), 1e2, seed=4).astype(np.float32)
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)

    def grads(params, x, dy):
        def loss(params, x):
            return jnp.sum(layer.apply(params, layer.state, x, training=True)[0] * dy)

        scale, x_grad = jax.grad(loss, argnums=(0, 1))(params, x)
        return {"x": x_grad, **scale}

    x_spec = symbolic(f"b, l, {C}")
    got = exported(grads, layer.params, x_spec, x_spec).call(layer.params, x, dy)
    jitted = {k: np.asarray(v, np.float64) for k, v in jax.jit(grads)(layer.params, x, dy).items()}
    float64 = spec.BatchNorm1d(C, dtype=np.float64).vjp(x.astype(np.float64), dy.astype(np.float64))
    errors = gradient_errors(x, dy, got, float64, feature_axis=2)
    assert max(errors.values()) <= RULE, errors
    apart = gradient_errors(x, dy, got, jitted, feature_axis=2)
    assert max(apart.values()) <= 2 * RULE, apart


def test_synced_replicas_of_a_symbolic_batch_under_vmap():
    """Four replicas bound by ``vmap`` (a concrete axis), each of a symbolic batch."""
    layer = BatchNorm1d(C, axis_name="replicas", momentum=0.0)
    x = raw_data((4, 6, 10, C), 1e2, seed=6).astype(np.float32)

    def call(params, state, x):
        replica = lambda x: layer.apply(params, state, x, training=True)  # noqa: E731
        return jax.vmap(replica, axis_name="replicas", out_axes=(0, None))(x)

    ship = exported(call, layer.params, layer.state, symbolic(f"4, b, l, {C}"))
    got = ship.call(layer.params, layer.state, x)
    assert_same(got, jax.jit(call)(layer.params, layer.state, x), exact=True)
    whole = spec.BatchNorm1d(C, momentum=0.0, dtype=np.float64)
    whole(x.reshape(24, 10, C).astype(np.float64))
    np.testing.assert_allclose(got[1]["running_mean"], whole.running_mean, rtol=RULE)
    np.testing.assert_allclose(got[1]["running_var"], whole.running_var, rtol=RULE)


def test_flax_and_equinox_modules_export_bitwise():
    """The modules call the same ``apply``: exported in training with symbolic dimensions,
    each equals its jitted call bit for bit."""
    nnx = pytest.importorskip("flax.nnx")
    eqx = pytest.importorskip("equinox")
    from bn1d.backends import equinox as bn_equinox
    from bn1d.backends import linen as bn_linen
    from bn1d.backends import nnx as bn_nnx

    x = raw_data((16, 40, C), 1e3, seed=7).astype(np.float32)
    batch = symbolic(f"b, l, {C}")

    graphdef, params, stats = nnx.split(bn_nnx.BatchNorm1d(C), nnx.Param, nnx.BatchStat)

    def nnx_step(params, stats, x):
        module = nnx.merge(graphdef, params, stats)
        return module(x), nnx.state(module, nnx.BatchStat)

    got = export.export(jax.jit(nnx_step))(params, stats, batch).call(params, stats, x)
    assert_same(got, jax.jit(nnx_step)(params, stats, x), exact=True)

    module = bn_linen.BatchNorm1d(C)
    variables = module.init(jax.random.key(0), x)

    def linen_step(variables, x):
        return module.apply(variables, x, mutable=["batch_stats"])

    got = export.export(jax.jit(linen_step))(variables, batch).call(variables, x)
    assert_same(got, jax.jit(linen_step)(variables, x), exact=True)

    layer, state = eqx.nn.make_with_state(bn_equinox.BatchNorm1d)(C)
    arrays, static = eqx.partition(layer, eqx.is_array)

    def equinox_step(arrays, state, x):
        return eqx.combine(arrays, static)(x, state)

    got = export.export(jax.jit(equinox_step))(arrays, state, batch).call(arrays, state, x)
    assert_same(got, jax.jit(equinox_step)(arrays, state, x), exact=True)
