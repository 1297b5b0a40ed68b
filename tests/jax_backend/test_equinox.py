"""bn1d's Equinox module (``bn1d.backends.equinox``): ``eqx.nn.BatchNorm``'s
conventions (``make_with_state``, ``(y, state)``, ``inference_mode``, one example per
``vmap`` lane), bn1d's numbers: equal to bn1d's JAX ``apply`` on a whole batch and,
per example, to the float64 NumPy specification on the concatenated batch.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn1d.backends import jax as jax_backend
from bn1d.backends import numpy as spec
from bn1d.backends.equinox import BatchNorm1d

# See tests/jax_backend/test_nnx.py: the same ops in another XLA program (1e-6), and
# float32 against the float64 specification (2e-5, 8x the JAX layer's measured worst).
SAME = dict(atol=1e-6, rtol=1e-6)
SPEC = dict(atol=2e-5, rtol=2e-5)
KWARGS = dict(momentum=0.9, scale_initializer=np.array([1.5, -0.5, 2.0]), bias_initializer=0.25)


def data(seed: int, shape=(8, 5, 3)) -> np.ndarray:
    return (3.0 + 1.5 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def uneven_mask() -> np.ndarray:
    """(8, 5): example r keeps 5, 2, 0, 4, 1, 5, 3, 1 positions."""
    return np.arange(5)[None, :] < np.array([5, 2, 0, 4, 1, 5, 3, 1])[:, None]


def test_make_with_state_holds_the_running_statistics_in_the_state():
    module, state = eqx.nn.make_with_state(BatchNorm1d)(3, **KWARGS)
    assert isinstance(module, eqx.nn.StatefulLayer) and module.is_stateful()
    np.testing.assert_array_equal(module.weight, KWARGS["scale_initializer"].astype(np.float32))
    assert set(state.get(module.state_index)) == {"running_mean", "running_var"}
    assert BatchNorm1d(3, affine=False).weight is None
    assert BatchNorm1d(3, track_running_stats=False).state_index is None
    cumulative, counted = eqx.nn.make_with_state(BatchNorm1d)(3, momentum=None)
    assert int(counted.get(cumulative.state_index)["num_batches_tracked"]) == 0
    _, counted = cumulative(data(0), counted)
    assert int(counted.get(cumulative.state_index)["num_batches_tracked"]) == 1


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_a_whole_batch_equals_the_jax_layers_apply_and_inference_mode_switches(masked):
    reference = jax_backend.BatchNorm1d(3, **KWARGS)
    module, state = eqx.nn.make_with_state(BatchNorm1d)(3, **KWARGS)
    x, mask = data(0), uneven_mask() if masked else None
    step = eqx.filter_jit(lambda m, x, s, k: m(x, s, mask=k))
    y, state = step(module, x, state, mask)
    want_y, want_state = reference.apply(reference.params, reference.state, x, mask=mask, training=True)
    np.testing.assert_allclose(y, want_y, **SAME)
    for key, value in want_state.items():
        np.testing.assert_allclose(module.state_dict(state)[key], value, **SAME, err_msg=key)

    frozen = eqx.nn.inference_mode(module)
    assert frozen.inference is True and module.inference is False
    before = module.state_dict(state)
    y_eval, state = frozen(x, state)
    want_eval, _ = reference.apply(reference.params, want_state, x, training=False)
    np.testing.assert_allclose(y_eval, want_eval, **SAME)
    assert all(np.array_equal(before[k], v) for k, v in module.state_dict(state).items())
    _, state = frozen(x, state, inference=False)  # the call wins over the field
    assert not np.array_equal(before["running_mean"], module.state_dict(state)["running_mean"])
    assert BatchNorm1d(3, mode="inference").inference is True


def test_one_example_per_vmap_lane_is_the_concatenated_batch():
    """As eqx.nn.BatchNorm: ``jax.vmap(model, axis_name=...)`` over examples, the state
    unmapped (out_axes=None): count-weighted over uneven masks, one example empty."""
    x, mask = data(1), uneven_mask()
    module, state = eqx.nn.make_with_state(BatchNorm1d)(3, axis_name="batch", **KWARGS)
    batched = jax.vmap(
        lambda x, s, k: module(x, s, mask=k), in_axes=(0, None, 0), out_axes=(0, None), axis_name="batch"
    )
    y, state = eqx.filter_jit(batched)(x, state, mask)
    whole = spec.BatchNorm1d(3, dtype=np.float64, **KWARGS)
    np.testing.assert_allclose(y, whole(x.astype(np.float64), mask=mask), **SPEC)
    for key, value in whole.state_dict().items():
        np.testing.assert_allclose(module.state_dict(state)[key], value, **SPEC, err_msg=key)

    # Groups: each pair of examples has its own statistics, so the state is mapped.
    grouped, state = eqx.nn.make_with_state(BatchNorm1d)(
        3, axis_name="batch", axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]], **KWARGS
    )
    per_group = jax.vmap(lambda x, s: grouped(x, s), in_axes=(0, None), out_axes=(0, 0), axis_name="batch")
    y, states = per_group(x, state)
    for rows in (slice(0, 4), slice(4, 8)):
        want = spec.BatchNorm1d(3, dtype=np.float64, **KWARGS)
        np.testing.assert_allclose(y[rows], want(x[rows].astype(np.float64)), **SPEC)
        np.testing.assert_allclose(states.get(grouped.state_index)["running_var"][rows], np.broadcast_to(
            want.running_var, (4, 3)), **SPEC)  # fmt: skip


def test_the_rank_decides_between_a_per_lane_batch_and_one_example():
    """The documented rule (``docs/decisions.md``): under ``vmap`` an input of the batch's
    rank (``len(axis) + 1``) is each lane's batch, one of ``len(axis)`` one example. So
    ``(C, C)`` inputs to a layer built with ``axis=0`` are per-lane batches of C rows: the
    statistics of all lanes' rows, features on the last axis; a ``(C, C)`` example in
    Equinox's channel-first sense needs the drop-in (``bn1d.backends.equinox.BatchNorm``)."""
    x = data(4, (4, 3, 3))
    module, state = eqx.nn.make_with_state(BatchNorm1d)(3, axis=0, axis_name="batch", **KWARGS)
    lanes = jax.vmap(module, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
    y, state = lanes(x, state)
    whole = spec.BatchNorm1d(3, axis=0, dtype=np.float64, **KWARGS)
    np.testing.assert_allclose(np.reshape(y, (12, 3)), whole(x.reshape(12, 3).astype(np.float64)), **SPEC)
    with pytest.raises(ValueError, match=r"^x: expected a 2-D batch .* or a 1-D example .* got \(3, 3, 3\)"):
        lanes(data(5, (4, 3, 3, 3)), state)


def test_errors_name_the_argument_before_the_state_changes():
    module, state = eqx.nn.make_with_state(BatchNorm1d)(3)
    with pytest.raises(ValueError, match=r"^x: expected a 3-D batch for reduced axes \(0, 1\), got \(5, 3\)"):
        module(data(2)[0], state)  # one example without axis_name: no batch to normalise over
    synced, state = eqx.nn.make_with_state(BatchNorm1d)(3, axis_name="batch")
    with pytest.raises(ValueError, match=r"or a 2-D example under jax.vmap\(\.\.\., axis_name='batch'\), got \(3,\)"):
        synced(np.ones(3, np.float32), state)
    with pytest.raises(TypeError, match=r"^inference: expected None or a bool, got 1"):
        module(data(2), state, inference=1)
    loaded, state = module.load_state_dict(spec.BatchNorm1d(3, scale_initializer=2.0).state_dict(), state)
    np.testing.assert_array_equal(loaded.weight, np.full(3, 2.0, np.float32))
    with pytest.raises(ValueError, match=r"^state_dict: expected exactly the keys"):
        module.load_state_dict({"scale": np.ones(3)}, state)
    assert module.state_dict(state)["running_var"].shape == (3,)  # the state is still valid


class Model(eqx.Module):
    linear: eqx.nn.Linear
    norm: BatchNorm1d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.linear = eqx.nn.Linear(3, 6, key=k1, dtype=jnp.float32)  # float32 under jax_enable_x64 too
        self.norm = BatchNorm1d(6, axis=0, axis_name="batch")  # per example: (6,) under vmap
        self.head = eqx.nn.Linear(6, 2, key=k2, dtype=jnp.float32)

    def __call__(self, x, state):
        h, state = self.norm(self.linear(x), state)
        return self.head(jax.nn.relu(h)), state


def test_a_model_trains_per_example_with_make_with_state():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    labels = (x[:, 0] - x[:, 2] > 0).astype(np.int32)
    model, state = eqx.nn.make_with_state(Model)(jax.random.key(0))
    tx = optax.sgd(0.05, momentum=0.9)
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, opt_state):
        def loss(model, state):
            batched = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
            logits, state = batched(x, state)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state

        (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, state)
        updates, opt_state = tx.update(grads, opt_state)
        return value, eqx.apply_updates(model, updates), state, opt_state

    losses = []
    for _ in range(30):
        value, model, state, opt_state = step(model, state, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0], losses
    frozen = eqx.nn.inference_mode(model)
    logits, _ = jax.vmap(frozen, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, state)
    assert np.mean(np.argmax(np.asarray(logits), axis=1) == np.asarray(labels)) > 0.9


def test_nested_vmap_over_two_named_axes_and_an_empty_batch():
    """equinox#707: BatchNorm under two nested ``vmap``s. With ``axis_name=("a", "b")``
    the statistics are those of every example of both axes (count-weighted, one example
    empty); a batch with every position masked changes nothing and gives no NaN."""
    x, mask = data(3), uneven_mask()
    module, state = eqx.nn.make_with_state(BatchNorm1d)(3, axis_name=("a", "b"), **KWARGS)
    inner = jax.vmap(lambda x, s, k: module(x, s, mask=k), in_axes=(0, None, 0), out_axes=(0, None), axis_name="b")
    outer = jax.vmap(inner, in_axes=(0, None, 0), out_axes=(0, None), axis_name="a")
    y, new = eqx.filter_jit(outer)(x.reshape(2, 4, 5, 3), state, mask.reshape(2, 4, 5))
    whole = spec.BatchNorm1d(3, dtype=np.float64, **KWARGS)
    np.testing.assert_allclose(np.asarray(y).reshape(x.shape), whole(x.astype(np.float64), mask=mask), **SPEC)
    for key, value in whole.state_dict().items():
        np.testing.assert_allclose(module.state_dict(new)[key], value, **SPEC, err_msg=key)

    local, state = eqx.nn.make_with_state(BatchNorm1d)(3, **KWARGS)
    before = local.state_dict(state)
    y, empty = local(x, state, mask=np.zeros((8, 5), bool))  # docs/spec.md R3.6: as inference
    assert np.isfinite(np.asarray(y)).all()
    for key, value in local.state_dict(empty).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
