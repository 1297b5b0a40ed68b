"""The contract's accuracy rule on the JAX backend with JAX's defaults (x64 off:
float32 sums, accumulated by XLA): raw float32 data, n = 2**18 values per feature,
|mean| / std up to 1e4, every layout, masks, jax.grad, bfloat16. Synced runs
(vmap, pmap, shard_map with groups) are in ``test_jax_replicas.py``.

Tolerance: the rule itself (1e-5 in ``bn1d.conformance.accuracy``'s metrics): it
is the contract; measured errors are 2-20x below it. float32 accumulation makes
JAX the backend closest to it (XLA's reductions are pairwise-like: 1e-7 relative
over 2**18 terms, where NumPy's sequential float32 sums lose 1e-5; see
``docs/numerics.md``), so this is the test that would catch XLA changing them.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn1d.backends import numpy as spec
from bn1d.backends.jax import BatchNorm1d
from bn1d.conformance.accuracy import RULE, forward_errors, gradient_errors, raw_data

N = 2**18
LAYOUTS = {
    "(B, L, C)": ((0, 1), (64, 4096, 4), 2),
    "(B, C, L)": ((0, 2), (64, 4, 4096), 1),
    "(B, C)": (0, (N, 4), 1),
}


@pytest.fixture(autouse=True)
def default_precision():
    if jax.config.read("jax_enable_x64"):  # --jax-strict: the sums are float64, the rule then holds trivially
        pytest.skip("these tests measure JAX's default float32 accumulation (jax_enable_x64 is on)")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ratio", [0.25, 1e2, 1e4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_and_gradients_meet_the_rule(layout, ratio, masked):
    axis, shape, fa = LAYOUTS[layout]
    x = raw_data(shape, ratio, seed=3).astype(np.float32)
    dy = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    mask = None
    if masked:
        mask = np.random.default_rng(5).random(tuple(s for a, s in enumerate(shape) if a != fa)) < 0.4
    layer = BatchNorm1d(4, axis, momentum=0.0)

    def loss(params, x):
        y, state = layer.apply(params, layer.state, x, mask=None if mask is None else jnp.asarray(mask), training=True)
        return jnp.sum(y * dy), (y, state)

    (grads, dx), (y, state) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(layer.params, jnp.asarray(x))
    errors = forward_errors(x, y, state["running_mean"], state["running_var"], feature_axis=fa, mask=mask)
    want = spec.BatchNorm1d(4, axis, dtype=np.float64).vjp(x.astype(np.float64), dy.astype(np.float64), mask)
    errors.update(gradient_errors(x, dy, {"x": dx, **grads}, want, feature_axis=fa, mask=mask))
    assert max(errors.values()) <= RULE, errors


def test_bfloat16_input_meets_the_rule_in_its_float32_statistics():
    x = raw_data((64, 4096, 4), 30.0, seed=6, dtype="bfloat16")
    layer = BatchNorm1d(4, momentum=0.0)
    y, state = jax.jit(lambda x: layer.apply(layer.params, layer.state, x, training=True))(jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and state["running_var"].dtype == jnp.float32
    errors = forward_errors(x, np.asarray(y, np.float64), state["running_mean"], state["running_var"], feature_axis=2,
                            y_dtype="bfloat16")  # fmt: skip
    assert max(errors.values()) <= RULE, errors


def _input_sized_fusions(fn, shape):
    """The fusions of ``fn``'s compiled entry computation that write an array of ``shape``."""
    text = jax.jit(fn).lower(jnp.zeros(shape)).compile().as_text()
    entry = text[text.index("ENTRY") :]
    pattern = re.compile(rf"^\s*(ROOT )?%\S+ = f32\[{','.join(map(str, shape))}\]\S* fusion\(")
    return [line.strip()[:80] for line in entry.splitlines() if pattern.match(line)]


def test_the_shift_is_formed_per_pass_for_xla():
    """``recompute_shifted``: XLA must not materialise ``x - K`` for its reductions
    (its YNNPACK fusions then read the input directly), which keeps the forward at
    Flax's fast-variance cost: the compiled forward writes one input-sized array,
    y. Without the option the core's shared ``x - K`` is written once more."""
    from bn1d.algorithm import batch_norm

    layer, shape = BatchNorm1d(4), (64, 512, 4)
    assert len(_input_sized_fusions(lambda x: layer.apply(layer.params, layer.state, x, training=True)[0], shape)) == 1
    shared = lambda x: batch_norm(x, layer.params, layer.state, layer.config, training=True).y  # noqa: E731
    assert len(_input_sized_fusions(shared, shape)) == 2
