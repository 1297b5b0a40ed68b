"""A Flax NNX model with bn1d's BatchNorm1d, trained data-parallel on 4 CPU devices.

    python examples/nnx_data_parallel.py

Each device holds 16 rows of every global batch, of which only 16, 12, 8 and 4 are
real (a padding mask): bn1d's statistics are count-weighted, so each group of devices
([0, 1] and [2, 3], ``axis_index_groups``) normalises with the statistics of exactly
its real rows. ``jax.shard_map`` runs over ``nnx.split``/``nnx.merge``: the parameters
are replicated, the running statistics kept per device (each group has its own).
The script checks one step against bn1d's NumPy specification on each group's
concatenated rows, then trains and reports the accuracy.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bn1d.backends import numpy as spec  # noqa: E402
from bn1d.backends.nnx import BatchNorm1d  # noqa: E402

DEVICES, ROWS, GROUPS = 4, 16, [[0, 1], [2, 3]]
REAL_ROWS = [16, 12, 8, 4]


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.norm = BatchNorm1d(8, axis=0, axis_name="data", axis_index_groups=GROUPS)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x, mask):
        return self.out(jax.nn.relu(self.norm(self.hidden(x), mask)))


def batches(rng, count):
    """Synthetic data: the label is whether x0 + x1 exceeds x2 (features of scale 3)."""
    for _ in range(count):
        x = rng.normal(0.5, 3.0, (DEVICES * ROWS, 4)).astype(np.float32)
        labels = (x[:, 0] + x[:, 1] > x[:, 2]).astype(np.int32)
        mask = np.concatenate([np.arange(ROWS) < n for n in REAL_ROWS])
        yield x, labels, mask


def main():
    assert jax.device_count() >= DEVICES, f"needs {DEVICES} devices: XLA_FLAGS={_FLAG}"
    mesh = jax.make_mesh((DEVICES,), ("data",))
    model = Model(nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    place = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
    stats = jax.tree.map(lambda v: place(jnp.stack([v] * DEVICES)), stats)  # one row per device
    tx = optax.adam(0.03)
    opt_state = tx.init(params)

    def replica(params, stats, x, labels, mask):
        module = nnx.merge(graphdef, params, jax.tree.map(lambda v: v[0], stats))
        logits = module(x, mask)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        total = jax.lax.psum(jnp.sum(jnp.where(mask, losses, 0.0)), "data")
        loss = total / jax.lax.psum(jnp.sum(mask), "data")  # the mean over every real row
        return loss, jax.tree.map(lambda v: v[None], nnx.state(module, nnx.BatchStat))

    sharded = jax.shard_map(
        replica, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data"), P("data")), out_specs=(P(), P("data"))
    )

    @jax.jit
    def step(params, stats, opt_state, x, labels, mask):
        (loss, stats), grads = jax.value_and_grad(sharded, has_aux=True)(params, stats, x, labels, mask)
        updates, opt_state = tx.update(grads, opt_state)
        return loss, optax.apply_updates(params, updates), stats, opt_state

    rng = np.random.default_rng(0)
    x, labels, mask = next(batches(rng, 1))
    hidden = np.asarray(x @ params["hidden"]["kernel"][...] + params["hidden"]["bias"][...], np.float64)
    _, _, first, _ = step(params, stats, opt_state, place(x), place(labels), place(mask))
    for group in GROUPS:
        rows = np.concatenate([np.arange(r * ROWS, (r + 1) * ROWS) for r in group])
        reference = spec.BatchNorm1d(8, axis=0, dtype=np.float64)
        reference(hidden[rows], mask=mask[rows])
        for r in group:  # float32 against float64 on sums of <= 28 values of size ~5
            np.testing.assert_allclose(np.asarray(first["norm"]["mean"][...])[r], reference.running_mean, atol=2e-5)
            np.testing.assert_allclose(np.asarray(first["norm"]["var"][...])[r], reference.running_var, rtol=2e-5)
        print(f"group {group}: statistics of its {int(mask[rows].sum())} real rows (of {len(rows)}): ok")

    for x, labels, mask in batches(rng, 150):
        loss, params, stats, opt_state = step(params, stats, opt_state, place(x), place(labels), place(mask))
    print(f"final loss {float(loss):.3f}")

    model = nnx.merge(graphdef, params, jax.tree.map(lambda v: jnp.asarray(np.asarray(v)[0]), stats))  # group [0, 1]
    model.eval()  # running statistics: no collective, any batch size
    x, labels, _ = next(batches(rng, 1))
    accuracy = float(np.mean(np.argmax(model(x, None), axis=1) == labels))
    print(f"accuracy {accuracy:.2f}")
    assert accuracy > 0.9, accuracy


if __name__ == "__main__":
    main()
