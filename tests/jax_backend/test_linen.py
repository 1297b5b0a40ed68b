"""bn1d's Flax linen module (``bn1d.backends.linen``): linen's variables and mode,
bn1d's numbers.

A ``flax.linen.BatchNorm`` variable tree loads as it is and, with Flax's numerics
(``fast_variance=True``, biased running variance), reproduces Flax's outputs; with
bn1d's defaults the module equals bn1d's JAX ``apply`` and, synced, the float64 NumPy
specification on the concatenated batch.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict
from flax.errors import ModifyScopeVariableError

from bn1d.backends import jax as jax_backend
from bn1d.backends import numpy as spec
from bn1d.backends.linen import BatchNorm1d

# Against Flax's float32 one-pass formula: the same formula summed in another order
# (sums of 20 values of size ~4). Measured worst differences: 1.2e-6 (y), 5.7e-6 (y
# masked: Flax's masked mean sums in yet another order; 1e-6 of |y| = 5.6), 7e-7 (var).
# 2e-5 absolute is 3.5x the worst; an unbiased running variance would move var by 0.09.
FLAX = dict(atol=2e-5, rtol=0)
# Against bn1d's JAX apply (another XLA program of the same ops) and the float64
# specification: see tests/jax_backend/test_nnx.py.
SAME = dict(atol=1e-6, rtol=1e-6)
SPEC = dict(atol=2e-5, rtol=2e-5)


def data(seed: int, shape=(4, 5, 3), loc=3.0) -> np.ndarray:
    return (loc + 1.5 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def trained_flax_variables(module):
    """Flax's own BatchNorm after two training steps, its scale and bias moved."""
    variables = module.init(jax.random.key(0), data(0))
    for seed in (1, 2):
        _, updates = module.apply(variables, data(seed), mutable=["batch_stats"])
        variables = {**variables, **updates}
    params = {"scale": jnp.asarray([0.5, 2.0, -1.0], jnp.float32), "bias": jnp.asarray([0.1, 0.2, -0.3], jnp.float32)}
    return {**variables, "params": params}


def test_a_flax_batchnorm_variable_tree_loads_and_gives_flax_outputs():
    flax = nn.BatchNorm(use_running_average=False, momentum=0.8, epsilon=1e-3)
    variables = trained_flax_variables(flax)
    ours = BatchNorm1d(3, momentum=0.8, epsilon=1e-3, fast_variance=True, unbiased_running_var=False)
    assert jax.tree.structure(ours.init(jax.random.key(0), data(0))) == jax.tree.structure(
        flax.init(jax.random.key(0), data(0))
    )
    x = data(3)
    mask = np.random.default_rng(3).random((4, 5)) < 0.6
    for kwargs in ({}, {"mask": mask}):
        flax_mask = None if "mask" not in kwargs else np.broadcast_to(mask[..., None], x.shape)
        want, want_updates = flax.apply(variables, x, mask=flax_mask, mutable=["batch_stats"])
        got, got_updates = ours.apply(variables, x, **kwargs, mutable=["batch_stats"])
        np.testing.assert_allclose(got, want, **FLAX)
        for name in ("mean", "var"):
            np.testing.assert_allclose(got_updates["batch_stats"][name], want_updates["batch_stats"][name], **FLAX)
    np.testing.assert_allclose(
        ours.apply(variables, x, True), flax.clone(use_running_average=True).apply(variables, x), **FLAX
    )
    assert BatchNorm1d.state_dict(FrozenDict(variables)).keys() == {"scale", "bias", "running_mean", "running_var"}


def test_init_updates_nothing_and_training_needs_mutable_batch_stats():
    module = BatchNorm1d(3, axis_name="not bound at init")  # init runs no collective
    x = data(4)
    variables = module.init(jax.random.key(0), x)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))
    local = BatchNorm1d(3)
    with pytest.raises(ModifyScopeVariableError):
        local.apply(variables, x)  # training, batch_stats immutable: Flax's own error
    y, updates = local.apply(variables, x, mutable=["batch_stats"])
    want_y, want_state = jax_backend.BatchNorm1d(3).apply(
        {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
        {"running_mean": jnp.zeros(3), "running_var": jnp.ones(3)}, x, training=True,
    )  # fmt: skip
    np.testing.assert_allclose(y, want_y, **SAME)
    np.testing.assert_allclose(updates["batch_stats"]["var"], want_state["running_var"], **SAME)


def test_use_running_average_attribute_call_argument_and_mode():
    x = data(5)
    trained = spec.BatchNorm1d(3, dtype=np.float64, momentum=0.5)
    trained(data(6).astype(np.float64))
    state = trained.state_dict()
    module = BatchNorm1d(3, momentum=0.5)
    variables = module.variables_from_state_dict(state)
    inference = trained(x.astype(np.float64), training=False)
    for frozen in (module.clone(use_running_average=True), BatchNorm1d(3, momentum=0.5, mode="inference")):
        np.testing.assert_allclose(frozen.apply(variables, x), inference, **SPEC)  # no mutable needed
        _, updates = frozen.apply(variables, x, False, mutable=["batch_stats"])  # the call wins
        assert not np.allclose(updates["batch_stats"]["mean"], variables["batch_stats"]["mean"])
    np.testing.assert_allclose(module.apply(variables, x, True), inference, **SPEC)
    with pytest.raises(TypeError, match=r"^use_running_average: expected None or a bool, got 'yes'"):
        module.apply(variables, x, "yes")
    with pytest.raises(TypeError, match=r"^use_fast_variance: expected one of the options"):
        BatchNorm1d(3, use_fast_variance=True)
    with pytest.raises(ValueError, match=r"^state_dict: expected exactly the keys"):
        module.variables_from_state_dict({"running_mean": np.zeros(3)})
    with pytest.raises(ValueError, match=r"^epsilon: expected a finite float > 0"):
        BatchNorm1d(3, epsilon=0.0).init(jax.random.key(0), x)


def test_cumulative_average_and_no_running_statistics_variables():
    x = data(7)
    cumulative = BatchNorm1d(3, momentum=None)
    variables = cumulative.init(jax.random.key(0), x)
    assert set(variables["batch_stats"]) == {"mean", "var", "num_batches_tracked"}
    _, updates = cumulative.apply(variables, x, mutable=["batch_stats"])
    assert int(updates["batch_stats"]["num_batches_tracked"]) == 1
    np.testing.assert_allclose(updates["batch_stats"]["mean"], x.reshape(-1, 3).mean(axis=0), **SPEC)  # weight 1/1
    stateless = BatchNorm1d(3, track_running_stats=False).init(jax.random.key(0), x)
    assert set(stateless) == {"params"}


def test_synced_under_vmap_with_masks_is_the_concatenated_batch():
    x = data(8, (8, 5, 3))
    counts, order = [10, 3, 1, 7], np.random.default_rng(3).permutation(10)
    mask = np.concatenate([np.isin(np.arange(10), order[:k]).reshape(2, 5) for k in counts])
    module = BatchNorm1d(3, axis_name="i", momentum=0.9)
    variables = module.init(jax.random.key(0), x[:2])

    def replica(x, mask):
        return module.apply(variables, x, mask=mask, mutable=["batch_stats"])

    ys, updates = jax.jit(jax.vmap(replica, axis_name="i", out_axes=(0, None)))(
        x.reshape(4, 2, 5, 3), mask.reshape(4, 2, 5)
    )
    whole = spec.BatchNorm1d(3, dtype=np.float64, momentum=0.9)
    np.testing.assert_allclose(np.asarray(ys).reshape(x.shape), whole(x.astype(np.float64), mask=mask), **SPEC)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], whole.running_mean, **SPEC)
    np.testing.assert_allclose(updates["batch_stats"]["var"], whole.running_var, **SPEC)


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Dense(6)(x)
        h = BatchNorm1d(6, axis=0)(h, use_running_average=not train)
        return nn.Dense(2)(nn.relu(h))


def test_a_linen_model_trains_with_optax_and_batch_stats():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    labels = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    model = Classifier()
    variables = model.init(jax.random.key(0), x, train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.05, momentum=0.9)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
        changes, opt_state = tx.update(grads, opt_state)
        return value, optax.apply_updates(params, changes), updates["batch_stats"], opt_state

    losses = []
    for _ in range(30):
        value, params, batch_stats, opt_state = step(params, batch_stats, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0], losses
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    assert np.mean(np.argmax(np.asarray(logits), axis=1) == np.asarray(labels)) > 0.9


def test_nested_vmap_over_two_named_axes_and_an_empty_batch():
    """flax#3319: BatchNorm under two nested ``vmap``s. With ``axis_name=("a", "b")``
    the statistics are those of all 2 x 2 replicas' rows (count-weighted, uneven masks);
    an all-masked batch updates nothing and gives no NaN (Flax writes NaN there)."""
    x = data(9, (8, 5, 3))
    counts, order = [10, 3, 0, 7], np.random.default_rng(4).permutation(10)
    mask = np.concatenate([np.isin(np.arange(10), order[:k]).reshape(2, 5) for k in counts])
    module = BatchNorm1d(3, axis_name=("a", "b"), momentum=0.9)
    variables = module.init(jax.random.key(0), x[:2])

    def replica(x, mask):
        return module.apply(variables, x, mask=mask, mutable=["batch_stats"])

    nested = jax.vmap(jax.vmap(replica, axis_name="b", out_axes=(0, None)), axis_name="a", out_axes=(0, None))
    ys, updates = jax.jit(nested)(x.reshape(2, 2, 2, 5, 3), mask.reshape(2, 2, 2, 5))
    whole = spec.BatchNorm1d(3, dtype=np.float64, momentum=0.9)
    np.testing.assert_allclose(np.asarray(ys).reshape(x.shape), whole(x.astype(np.float64), mask=mask), **SPEC)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], whole.running_mean, **SPEC)
    np.testing.assert_allclose(updates["batch_stats"]["var"], whole.running_var, **SPEC)

    local = BatchNorm1d(3, momentum=0.9)
    y, updates = local.apply(variables, x, mask=np.zeros((8, 5), bool), mutable=["batch_stats"])
    assert np.isfinite(np.asarray(y)).all()
    for key in ("mean", "var"):  # docs/spec.md R3.6: unchanged
        np.testing.assert_array_equal(updates["batch_stats"][key], variables["batch_stats"][key])
