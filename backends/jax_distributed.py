"""Data-parallel ``BatchNorm1d`` over several devices and processes (multi-host JAX).

A launcher to copy. Start one process per host (here: two on one machine, CPU)::

    python -m bn1d.backends.jax_distributed --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0 &
    python -m bn1d.backends.jax_distributed --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 1

Every process runs the same program (SPMD):

1. :func:`initialize` joins the job. On CPU the cross-process collectives need
   ``jax_cpu_collectives_implementation = "gloo"``, set *before*
   ``jax.distributed.initialize``; on GPU/TPU pass ``cpu_collectives=None``.
2. A mesh over ``jax.devices()`` (every process's devices) with one axis named
   like the layer's ``axis_name``.
3. Each process supplies only its own rows of the global batch
   (:func:`global_batch`).
4. :func:`shard_map_apply` runs ``layer.apply`` under ``jax.jit(jax.shard_map(...))``:
   the statistics, the running statistics and the gradients are those of the
   global batch, exactly as in one process (``axis_index_groups`` too).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bn1d.backends.jax import BatchNorm1d
from bn1d.config import argument_error

__all__ = ["initialize", "batch_partition_specs", "global_batch", "shard_map_apply", "main"]


def initialize(
    coordinator_address: str, num_processes: int, process_id: int, *, cpu_collectives: str | None = "gloo"
) -> None:
    """Join a ``jax.distributed`` job (call before any other JAX call)."""
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def batch_partition_specs(layer: BatchNorm1d) -> tuple[PartitionSpec, PartitionSpec]:
    """Partition specs of ``x`` and ``mask``: the first reduced axis (the batch axis)
    is split over the mesh axes named by the layer's ``axis_name``."""
    config = layer.config
    if config.axis_name is None:
        raise argument_error("layer", "a BatchNorm1d with axis_name naming the mesh axes", layer)
    batch_axis = config.reduce_axes[0]
    mask_batch_axis = batch_axis - (config.feature_axis < batch_axis)
    x_spec: list[Any] = [None] * config.ndim
    mask_spec: list[Any] = [None] * (config.ndim - 1)
    x_spec[batch_axis] = mask_spec[mask_batch_axis] = config.axis_name
    return PartitionSpec(*x_spec), PartitionSpec(*mask_spec)


def global_batch(local_rows: Any, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """The global array whose rows on this process's devices are ``local_rows``."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(local_rows))


def shard_map_apply(layer: BatchNorm1d, mesh: Mesh, *, training: bool = True) -> Callable[..., tuple[jax.Array, Any]]:
    """``step(params, state, x, mask=None) -> (y, new_state)`` on global arrays.

    ``x`` and ``mask`` (global arrays, or host arrays that every process holds
    whole) are split along their batch axis (the layer's first reduced axis) over
    the mesh axes ``layer.axis_name``; ``params`` and ``state`` are replicated.
    ``new_state`` is replicated too, except with ``axis_index_groups``, where each
    group has its own: its leaves then have a leading axis with one row per replica.
    Jit the caller's training step around it (meshes with explicit axis types
    need a jitted caller, or ``jax.set_mesh``, for their gradients).
    """
    x_spec, mask_spec = batch_partition_specs(layer)
    grouped = layer.config.axis_index_groups is not None
    state_spec = PartitionSpec(layer.config.axis_name) if grouped else PartitionSpec()

    def local_step(params: Any, state: Any, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, Any]:
        y, new_state = layer.apply(params, state, x, mask=mask, training=training)
        return y, jax.tree.map(lambda v: v[None], new_state) if grouped else new_state

    sharded = jax.shard_map(
        local_step, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(), x_spec, mask_spec),
        out_specs=(x_spec, state_spec),
    )  # fmt: skip
    jitted = jax.jit(sharded)
    x_sharding, mask_sharding = NamedSharding(mesh, x_spec), NamedSharding(mesh, mask_spec)

    def step(params: Any, state: Any, x: Any, mask: Any = None) -> tuple[jax.Array, Any]:
        # shard_map takes inputs already split as in_specs says (a no-op for global arrays).
        x = jax.device_put(x, x_sharding)
        return jitted(params, state, x, None if mask is None else jax.device_put(mask, mask_sharding))

    return step


def main(argv: list[str] | None = None) -> None:
    """A demo step: each process normalises its rows of a global (8 * processes, 5, 3) batch."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coordinator", required=True, help="HOST:PORT of process 0")
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--cpu-collectives", default="gloo", help="'gloo' on CPU, 'none' on GPU/TPU")
    args = parser.parse_args(argv)
    initialize(
        args.coordinator, args.num_processes, args.process_id,
        cpu_collectives=None if args.cpu_collectives == "none" else args.cpu_collectives,
    )  # fmt: skip
    mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    layer = BatchNorm1d(3, axis_name="batch")
    x_spec, _ = batch_partition_specs(layer)
    local_rows = np.random.default_rng(args.process_id).standard_normal((8, 5, 3)).astype(np.float32)
    step = shard_map_apply(layer, mesh)
    _, layer.state = step(layer.params, layer.state, global_batch(local_rows, mesh, x_spec))
    if jax.process_index() == 0:
        print("global running_mean:", np.asarray(layer.state["running_mean"]))
        print("global running_var: ", np.asarray(layer.state["running_var"]))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
