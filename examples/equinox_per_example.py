"""An Equinox model with bn1d's BatchNorm1d, written per example as with eqx.nn.BatchNorm.

    python examples/equinox_per_example.py

``eqx.nn.make_with_state`` returns the model and its ``eqx.nn.State``; the model is
called on one example and ``jax.vmap(..., axis_name="batch")`` maps it over the batch,
the statistics being those of the whole batch (count-weighted: examples with no real
position, here the masked-out ones, contribute nothing). The state stays unmapped
(``out_axes=None``). The script checks one step against bn1d's NumPy specification on
the whole batch, then trains with optax and reports the accuracy in inference mode.
"""

import equinox as eqx
import jax
import numpy as np
import optax

from bn1d.backends import numpy as spec
from bn1d.backends.equinox import BatchNorm1d


class Model(eqx.Module):
    hidden: eqx.nn.Linear
    norm: BatchNorm1d
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(4, 8, key=k1)
        self.norm = BatchNorm1d(8, axis=0, axis_name="batch")  # a (B, 8) batch; one example is (8,)
        self.out = eqx.nn.Linear(8, 2, key=k2)

    def __call__(self, x, keep, state):
        h, state = self.norm(self.hidden(x), state, mask=keep)
        return self.out(jax.nn.relu(h)), state


def batch(rng, size=64):
    x = rng.normal(1.0, 2.0, (size, 4)).astype(np.float32)
    keep = rng.random(size) < 0.8  # examples left out of the statistics (still normalised)
    return x, keep, (x[:, 0] * x[:, 1] > 0).astype(np.int32)


def main():
    model, state = eqx.nn.make_with_state(Model)(jax.random.key(0))
    tx = optax.adam(0.02)
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

    def forward(model, state, x, keep):
        return jax.vmap(model, in_axes=(0, 0, None), out_axes=(0, None), axis_name="batch")(x, keep, state)

    @eqx.filter_jit
    def step(model, state, opt_state, x, keep, labels):
        def loss(model, state):
            logits, state = forward(model, state, x, keep)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state

        (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, state)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return value, eqx.apply_updates(model, updates), state, opt_state

    rng = np.random.default_rng(0)
    x, keep, labels = batch(rng)
    hidden = np.asarray(jax.vmap(model.hidden)(x), np.float64)
    _, _, first, _ = step(model, state, opt_state, x, keep, labels)
    reference = spec.BatchNorm1d(8, axis=0, dtype=np.float64)
    reference(hidden, mask=keep)
    got = model.norm.state_dict(first)  # float32 against float64, sums of ~50 values of size ~3
    np.testing.assert_allclose(got["running_mean"], reference.running_mean, atol=2e-5)
    np.testing.assert_allclose(got["running_var"], reference.running_var, rtol=2e-5)
    print(f"first step: statistics of the {int(keep.sum())} kept examples (of {len(keep)}): ok")

    for _ in range(300):
        x, keep, labels = batch(rng)
        loss, model, state, opt_state = step(model, state, opt_state, x, keep, labels)
    print(f"final loss {float(loss):.3f}")
    x, keep, labels = batch(rng, 512)
    logits, _ = forward(eqx.nn.inference_mode(model), state, x, keep)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    print(f"accuracy {accuracy:.2f}")
    assert accuracy > 0.9, accuracy


if __name__ == "__main__":
    main()
