"""Grouped cross-replica statistics at O(C) per replica (``replica_all_sum``).

1. Every formulation of the grouped sum (recursive doubling for power-of-two groups,
   the ordered gather for other sizes, the rows kept under ``vmap`` for few groups,
   a ``psum`` over the spanned axes of a tuple ``axis_name``) gives, on each replica,
   the statistics, outputs and input gradients of the float64 NumPy specification on
   its group's concatenated batch, and the same bits on every replica of a group.
2. The compiled HLO of a synced training step under ``jax.shard_map`` (forward and
   backward) moves the same collective operand bytes per replica whatever the number
   of groups: at most ``log2(g)`` times those of pairs, which are those of the
   ungrouped ``psum``; the old formulation, summing a
   ``(groups, C)`` array of rows, grows with the groups (the measurement's control).
   This part runs in a fresh interpreter with 16 CPU devices (the same file, as a
   script: ``python tests/jax_backend/test_grouped_sync.py --devices 2048
   --sizes 64,256,1024,2048`` prints the table of ``docs/jax-modules.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np

# float32 against the float64 specification: sums of <= 60 values of size ~4; the JAX
# layer's replica tests measure <= 2.5e-6 (tests/jax_backend/jax_workers/replica_cases.py),
# 2e-5 is 8x that, while a replica missing from its group moves values by > 1e-2.
ATOL = RTOL = 2e-5
C = 3
KWARGS = dict(momentum=0.9, scale_initializer=np.array([1.5, -0.5, 2.0]), bias_initializer=0.25)
ITEMSIZE = {"f64": 8, "f32": 4, "s64": 8, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "pred": 1}
COLLECTIVE = r"(all-reduce|collective-permute|all-gather|all-to-all|reduce-scatter)(-start)?"


def replicas(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` replicas of local (2, 4, C) batches with uneven masked counts (one of them
    empty), and cotangents."""
    rng = np.random.default_rng(seed)
    x = (3.0 + 1.5 * rng.standard_normal((count, 2, 4, C))).astype(np.float32)
    mask = rng.random((count, 2, 4)) < rng.uniform(0.2, 1.0, (count, 1, 1))
    mask[0] = False
    return x, mask, rng.standard_normal(x.shape).astype(np.float32)


def expected(groups, x, mask, dy):
    """Per replica: y, dx and the running statistics of one float64 specification call
    on its group's concatenated batch."""
    from bn1d.backends import numpy as spec

    y, dx = np.zeros(x.shape), np.zeros(x.shape)
    stats = {key: np.zeros((len(x), C)) for key in ("running_mean", "running_var")}
    for group in groups:
        layer = spec.BatchNorm1d(C, dtype=np.float64, **KWARGS)
        xs, ms, dys = (np.concatenate(a[list(group)]).astype(np.float64) for a in (x, mask, dy))
        grads = layer.vjp(xs, dys, mask=ms.astype(bool))
        ys = layer(xs, mask=ms.astype(bool))
        for i, r in enumerate(group):
            y[r], dx[r] = ys[2 * i : 2 * i + 2], grads["x"][2 * i : 2 * i + 2]
            stats["running_mean"][r], stats["running_var"][r] = layer.running_mean, layer.running_var
    return y, dx, stats


def synced_step(layer, x, mask, dy, axis_name):
    """``(y, dx, new_state)`` of every replica: the layer's training apply and the input
    gradient of the global loss ``sum(y * dy)``; replicas on the leading axis."""
    import jax
    import jax.numpy as jnp

    def loss(x):
        apply = lambda x, m: layer.apply(layer.params, layer.state, x, mask=m, training=True)  # noqa: E731
        y, state = jax.vmap(apply, axis_name=axis_name)(x, mask)
        return jnp.sum(y * dy), (y, state)

    dx, (y, state) = jax.jit(jax.grad(loss, has_aux=True))(x)
    return y, dx, state


def assert_groups(groups, x, mask, dy, y, dx, state):
    want_y, want_dx, want_state = expected(groups, x, mask, dy)
    np.testing.assert_allclose(np.asarray(y), want_y, atol=ATOL, rtol=RTOL, err_msg="y")
    np.testing.assert_allclose(np.asarray(dx), want_dx, atol=ATOL, rtol=RTOL, err_msg="dx")
    for key, want in want_state.items():
        got = np.asarray(state[key])
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=key)
        for group in groups:  # the core needs the same sums on every replica of a group
            assert all(np.array_equal(got[group[0]], got[r]) for r in group), (key, group)


def blocks(count: int, size: int) -> list[list[int]]:
    return [list(range(start, start + size)) for start in range(0, count, size)]


def interleaved(count: int, size: int) -> list[list[int]]:
    return [list(range(start, count, count // size)) for start in range(count // size)]


#: Under vmap, more than 8 groups take the O(C) rounds; up to 8, the rows.
FORMULATIONS = {
    "doubling, 9 pairs": blocks(18, 2),
    "doubling, 12 interleaved quads": interleaved(48, 4),
    "gather, 9 triples": blocks(27, 3),
    "rows, 2 triples": blocks(6, 3),
    "groups of one": blocks(4, 1),
}


def test_every_formulation_under_vmap_is_the_groups_concatenated_batch():
    from bn1d.backends.jax import BatchNorm1d

    for name, groups in FORMULATIONS.items():
        count = sum(len(g) for g in groups)
        x, mask, dy = replicas(count, seed=len(name))
        layer = BatchNorm1d(C, axis_name="i", axis_index_groups=groups, **KWARGS)
        y, dx, state = synced_step(layer, x, mask, dy, "i")
        assert_groups(groups, x, mask, dy, y, dx, state)


def test_replica_all_sum_of_unequal_groups_sums_each_group():
    """``replica_all_sum`` is public and takes any partition (the layers' configs take
    equal groups only): unequal groups sum as rows, under vmap and pmap."""
    import jax
    import jax.numpy as jnp

    from bn1d.backends.jax import replica_all_sum

    values = jnp.arange(1.0, 7.0)
    cases = (
        ([[0, 1], [2, 3, 4, 5]], [3, 3, 18, 18, 18, 18]),
        ([[0], [1, 2, 3, 4, 5]], [1, 20, 20, 20, 20, 20]),
        ([[0, 1, 2], [3, 4], [5]], [6, 6, 6, 9, 9, 6]),
    )
    for groups, want in cases:
        summed = jax.vmap(lambda v, g=groups: replica_all_sum("i", g)([v])[0], axis_name="i")(values)
        np.testing.assert_array_equal(summed, want, err_msg=str(groups))


def test_a_tuple_axis_name_sums_over_the_spanned_axes_or_falls_back_to_rows():
    """Nested vmap over ("a", "b") of sizes (3, 4); the replica index is a * 4 + b."""
    import jax

    from bn1d.backends.jax import BatchNorm1d

    x, mask, dy = replicas(12, seed=5)
    partitions = {
        "span b": blocks(12, 4),
        "span a": [[b, b + 4, b + 8] for b in range(4)],
        "neither (rows)": [[0, 5], [1, 4], [2, 7], [3, 6], [8, 9], [10, 11]],
    }
    for groups in partitions.values():
        layer = BatchNorm1d(C, axis_name=("a", "b"), axis_index_groups=groups, **KWARGS)

        def loss(x, layer=layer):
            apply = lambda x, m: layer.apply(layer.params, layer.state, x, mask=m, training=True)  # noqa: E731
            nested = jax.vmap(jax.vmap(apply, axis_name="b"), axis_name="a")
            y, state = nested(x.reshape(3, 4, 2, 4, C), mask.reshape(3, 4, 2, 4))
            return (y.reshape(x.shape) * dy).sum(), (
                y.reshape(x.shape),
                jax.tree.map(lambda v: v.reshape(12, C), state),
            )

        dx, (y, state) = jax.jit(jax.grad(loss, has_aux=True))(x)
        assert_groups(groups, x, mask, dy, y, dx, state)


def test_the_per_replica_collective_bytes_do_not_grow_with_the_number_of_groups():
    devices = 16
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, os.path.abspath(__file__), "--devices", str(devices), "--sizes", "4,8,16", "--check"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = json.loads(run.stdout.strip().splitlines()[-1])
    measured = {(row["devices"], row["group"]): row for row in table["bytes"]}
    unit = measured[(16, 2)]["bytes"]  # pairs: one round of each of the 3 exchanges
    # The doubling packs each exchange's count with its sums: one value more than the psum.
    assert unit <= measured[(16, None)]["bytes"] + 3 * 4, measured
    assert {measured[(n, 2)]["bytes"] for n in (4, 8, 16)} == {unit}  # 2, 4 and 8 pairs: the same bytes
    for (_, group), row in measured.items():
        if group is not None:  # bounded by the group size alone
            assert row["bytes"] <= np.log2(group) * unit + 8, row
    rows = [measured[(n, 2)]["rows_bytes"] for n in (4, 8, 16)]
    assert rows[1] > 1.9 * rows[0] and rows[2] > 1.9 * rows[1], rows  # the control grows with the groups
    assert len(table["errors"]) == 2, table["errors"]
    for name, error in table["errors"].items():  # shard_map on real (simulated) devices
        assert error <= 1.0, (name, error)


# -- the measurement, in a process with enough devices ---------------------------------------


def collective_bytes(hlo: str) -> tuple[int, int]:
    """(operand bytes, instructions) of the collectives of one compiled HLO module, per
    replica: each instruction's result shapes, which equal its operands' (halved for an
    asynchronous ``-start``, whose result holds both)."""
    total = count = 0
    for line in hlo.splitlines():
        match = re.search(r"=\s*(.*?)\s" + COLLECTIVE + r"\(", line)
        if match is None:
            continue
        shapes = re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))
        size = sum(ITEMSIZE[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1])) for t, dims in shapes)
        total += size // 2 if match.group(3) else size
        count += 1
    return total, count


def measure(devices: int, group: int | None, features: int, rows: bool = False) -> tuple[int, int]:
    """Collective bytes and instructions of one training step (forward and backward)
    under ``jax.shard_map`` on ``devices`` devices in groups of ``group`` (``None``:
    ungrouped); ``rows``: the old formulation, for the control."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import bn1d.backends.jax as backend
    from bn1d.backends import jax_collectives

    groups = None if group is None else blocks(devices, group)
    layer = backend.BatchNorm1d(features, axis_name="i", axis_index_groups=groups)
    mesh = jax.make_mesh((devices,), ("i",), devices=jax.devices()[:devices])

    def replica(params, x):
        def loss(params, x):
            y, state = layer.apply(params, layer.state, x, training=True)
            return jnp.sum(y * y), state

        (_, dx), state = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return dx, jax.tree.map(lambda v: v[None], state)

    step = jax.jit(jax.shard_map(replica, mesh=mesh, in_specs=(P(), P("i")), out_specs=(P("i"), P("i"))))
    x = jax.ShapeDtypeStruct((2 * devices, 5, features), jnp.float32, sharding=NamedSharding(mesh, P("i")))
    original = backend.replica_all_sum
    if rows and groups is not None:
        rows_all_sum = jax_collectives._rows_all_sum
        backend.replica_all_sum = lambda name, groups: rows_all_sum(name, tuple(map(tuple, groups)), devices)
    try:
        return collective_bytes(step.lower(layer.params, x).compile().as_text())
    finally:
        backend.replica_all_sum = original


def shard_map_errors() -> dict[str, float]:
    """The gather (groups of 3 on 12 devices) and doubling (interleaved groups of 4 on 16)
    formulations under ``jax.shard_map``, as the worst error / tolerance against
    :func:`expected`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from bn1d.backends.jax import BatchNorm1d

    errors = {}
    for name, devices, groups in (
        ("gather, 12 devices in triples", 12, blocks(12, 3)),
        ("doubling, 16 devices in interleaved quads", 16, interleaved(16, 4)),
    ):
        x, mask, dy = replicas(devices, seed=devices)
        layer = BatchNorm1d(C, axis_name="i", axis_index_groups=groups, **KWARGS)
        mesh = jax.make_mesh((devices,), ("i",), devices=jax.devices()[:devices])

        def replica(x, mask, dy, layer=layer):
            def loss(x):
                y, state = layer.apply(layer.params, layer.state, x[0], mask=mask[0], training=True)
                return jnp.sum(y * dy[0]), (y, state)

            dx, (y, state) = jax.grad(loss, has_aux=True)(x)
            return dx, y[None], jax.tree.map(lambda v: v[None], state)

        place = lambda a, mesh=mesh: jax.device_put(a, NamedSharding(mesh, P("i")))  # noqa: E731
        step = jax.jit(jax.shard_map(replica, mesh=mesh, in_specs=P("i"), out_specs=P("i")))
        dx, y, state = step(place(x), place(mask), place(dy))
        want_y, want_dx, want_state = expected(groups, x, mask, dy)
        pairs = [(y, want_y), (dx, want_dx)] + [(state[k], want_state[k]) for k in want_state]
        errors[name] = max(float(np.max(np.abs(np.asarray(g) - w) / (ATOL + RTOL * np.abs(w)))) for g, w in pairs)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, required=True, help="simulated CPU devices (set XLA_FLAGS to as many)")
    parser.add_argument("--sizes", default="4,8,16", help="device counts to measure")
    parser.add_argument("--groups", default="2,4,8", help="group sizes to measure")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--check", action="store_true", help="also run the shard_map correctness checks")
    args = parser.parse_args()
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    rows = []
    for devices in [int(n) for n in args.sizes.split(",")]:
        for group in [None, *(int(g) for g in args.groups.split(","))]:
            if group is not None and group >= devices:
                continue
            new, rounds = measure(devices, group, args.features)
            old, _ = measure(devices, group, args.features, rows=True)
            rows.append({"devices": devices, "group": group, "bytes": new, "rounds": rounds, "rows_bytes": old})
            size = group or devices
            print(f"devices {devices:5d}  group {size:5d}  groups {devices // size:5d}  bytes {new:8d} in "
                  f"{rounds:2d} collectives  (rows of groups: {old:9d})", file=sys.stderr)  # fmt: skip
    print(json.dumps({"bytes": rows, "errors": shard_map_errors() if args.check else {}}))


if __name__ == "__main__":
    main()
