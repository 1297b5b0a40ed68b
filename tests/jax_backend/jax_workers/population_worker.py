"""One process of test_jax_population's 2-process test: ``python population_worker.py HOST:PORT PROCESS_ID OUT_DIR``.

Two such processes (one CPU device each, gloo collectives over ``jax.distributed``) recompute
the same models over their own shares of the batches with ``sync=True``; each also recomputes
over every batch alone (unsynced), and writes both to ``OUT_DIR/process_<id>.npz``.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bn1d.backends import nnx as bn1d_nnx  # noqa: E402
from bn1d.backends.jax_distributed import initialize  # noqa: E402
from bn1d.backends.jax_population import recompute_layer_statistics, recompute_statistics  # noqa: E402
from bn1d.backends.numpy import BatchNorm1d  # noqa: E402

RNG = np.random.default_rng(0)
SIZES = (5, 40, 3, 17, 60)
BATCHES = [(RNG.standard_normal((n, 8, 3)) * 2 + 1e3 + 3 * i).astype(np.float32) for i, n in enumerate(SIZES)]
#: Each process's batches: uneven shares, and one process without any.
SHARES = {"uneven": ([0, 1, 2], [3, 4]), "one_empty": ([0, 1, 2, 3, 4], [])}


def model() -> nnx.Module:
    rngs = nnx.Rngs(0)
    return nnx.Sequential(nnx.BatchNorm(3, rngs=rngs), nnx.Linear(3, 4, rngs=rngs), bn1d_nnx.BatchNorm1d(4))


def statistics(net: nnx.Module, layer: BatchNorm1d) -> dict[str, np.ndarray]:
    values = {f"nnx{i}/{k}": np.asarray(getattr(net.layers[i], k)[...]) for i in (0, 2) for k in ("mean", "var")}
    return {**values, "layer/mean": layer.running_mean, "layer/var": layer.running_var}


def main(coordinator: str, process_id: int, out_dir: str) -> None:
    initialize(coordinator, 2, process_id)
    results = {}
    for case, shares in SHARES.items():
        mine = [BATCHES[i] for i in shares[process_id]]
        synced, layer = model(), BatchNorm1d(3)
        recompute_statistics(synced, mine, sync=True)
        recompute_layer_statistics(layer, mine, sync=True)
        alone, alone_layer = model(), BatchNorm1d(3)
        recompute_statistics(alone, BATCHES)
        recompute_layer_statistics(alone_layer, BATCHES)
        results.update({f"{case}/synced/{k}": v for k, v in statistics(synced, layer).items()})
        results.update({f"{case}/alone/{k}": v for k, v in statistics(alone, alone_layer).items()})
    np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
