"""A Flax linen model with bn1d's BatchNorm1d on padded sequences, trained with optax.

    python examples/linen_sequences.py

Sequences of lengths 3 to 12 are padded to 12; the padding mask keeps the padded
positions out of the batch statistics (``mask=``), and the running statistics live in
the ``batch_stats`` collection, named as in ``flax.linen.BatchNorm``. The script checks
the first step's running statistics against bn1d's NumPy specification on the real
positions only, then trains and reports the accuracy.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bn1d.backends import numpy as spec
from bn1d.backends.linen import BatchNorm1d

LENGTH, FEATURES = 12, 6


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x, mask, train: bool):
        h = nn.Dense(FEATURES)(x)  # (B, L, C)
        h = BatchNorm1d(FEATURES, momentum=0.9)(h, not train, mask=mask)
        h = jnp.sum(jnp.where(mask[..., None], nn.relu(h), 0.0), axis=1) / jnp.sum(mask, axis=1, keepdims=True)
        return nn.Dense(2)(h)


def batch(rng, size=32):
    """The label is whether the sequence's mean of feature 0 exceeds that of feature 1."""
    lengths = rng.integers(3, LENGTH + 1, size)
    mask = np.arange(LENGTH)[None, :] < lengths[:, None]
    x = rng.normal(2.0, 1.5, (size, LENGTH, 3)).astype(np.float32)
    x[~mask] = 0.0  # padding
    means = (x * mask[..., None]).sum(axis=1) / lengths[:, None]
    return x, mask, (means[:, 0] > means[:, 1]).astype(np.int32)


def main():
    rng = np.random.default_rng(0)
    model = Classifier()
    x, mask, labels = batch(rng)
    variables = model.init(jax.random.key(0), x, mask, train=False)  # init updates no statistic
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(0.02)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state, x, mask, labels):
        def loss(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, mask, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]

        (value, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return value, optax.apply_updates(params, updates), batch_stats, opt_state

    dense = params["Dense_0"]
    hidden = np.asarray(x @ dense["kernel"] + dense["bias"], np.float64)
    _, _, first, _ = step(params, batch_stats, opt_state, x, mask, labels)
    reference = spec.BatchNorm1d(FEATURES, momentum=0.9, dtype=np.float64)
    reference(hidden, mask=mask)  # the real positions only
    stats = first["BatchNorm1d_0"]  # float32 against float64, sums of ~250 values of size ~5
    np.testing.assert_allclose(stats["mean"], reference.running_mean, atol=2e-5)
    np.testing.assert_allclose(stats["var"], reference.running_var, rtol=2e-5)
    print(f"first step: statistics of the {int(mask.sum())} real positions (of {mask.size}): ok")

    for _ in range(200):
        x, mask, labels = batch(rng)
        loss, params, batch_stats, opt_state = step(params, batch_stats, opt_state, x, mask, labels)
    print(f"final loss {float(loss):.3f}")
    x, mask, labels = batch(rng, 256)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x, mask, train=False)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    print(f"accuracy {accuracy:.2f}")
    assert accuracy > 0.9, accuracy


if __name__ == "__main__":
    main()
