"""One process of tests/test_jax_distributed.py: ``python distributed_worker.py HOST:PORT PROCESS_ID OUT_DIR``.

Two such processes, two CPU devices each, form a 4-device global mesh over
``jax.distributed`` (gloo collectives). Each process supplies only its own rows of
``replica_cases.X``, runs the jitted, shard-mapped training step and its gradient,
and writes the gathered global results to ``OUT_DIR/process_<id>.npz``.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from bn1d.backends.jax import BatchNorm1d  # noqa: E402
from bn1d.backends.jax_distributed import batch_partition_specs, global_batch, initialize, shard_map_apply  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from replica_cases import DY, LAYER_KWARGS, MASKS, NUM_REPLICAS, PARAMS, STATE, X  # noqa: E402

#: Groups that pair a device of process 0 with one of process 1.
CASES = {"all": None, "across_processes": [[0, 2], [1, 3]]}


def run_case(groups, mesh, local_rows: slice) -> dict[str, np.ndarray]:
    """A jitted training step and its gradient on the global batch; the gathered results."""
    layer = BatchNorm1d(3, axis_name="batch", axis_index_groups=groups, **LAYER_KWARGS)
    layer.load_state_dict({**STATE, **PARAMS})
    x_spec, mask_spec = batch_partition_specs(layer)
    x, dy = global_batch(X[local_rows], mesh, x_spec), global_batch(DY[local_rows], mesh, x_spec)
    mask = global_batch(MASKS["uneven"][local_rows], mesh, mask_spec)
    step = shard_map_apply(layer, mesh)

    def loss(params, x, mask, dy):  # global arrays are arguments: closing over them is not allowed
        y, new_state = step(params, layer.state, x, mask)
        return jnp.sum(y * dy), (y, new_state)

    (grads, dx), (y, state) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(layer.params, x, mask, dy)
    outputs = {"x": x, "y": y, "dx": dx, **state, **{f"d{key}": value for key, value in grads.items()}}
    return {key: np.asarray(multihost_utils.process_allgather(value, tiled=True)) for key, value in outputs.items()}


def main(coordinator: str, process_id: int, out_dir: str) -> None:
    initialize(coordinator, 2, process_id)
    mesh = jax.make_mesh((NUM_REPLICAS,), ("batch",))
    local_rows = slice(process_id * len(X) // 2, (process_id + 1) * len(X) // 2)
    results = {}
    for case, groups in CASES.items():
        results.update({f"{case}/{key}": value for key, value in run_case(groups, mesh, local_rows).items()})
    np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
