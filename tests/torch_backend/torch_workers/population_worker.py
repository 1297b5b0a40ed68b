"""One rank of ``recompute_statistics(model, batches, sync=True)`` on gloo (CPU).

Usage: ``python population_worker.py RANK WORLD_SIZE WORKDIR``. Reads ``WORKDIR/job.pkl``
(written by tests/torch_backend/test_torch_population.py): every rank's list of batches
(uneven, possibly none). Writes ``WORKDIR/rank{RANK}.pkl``: the model's running statistics
after the synced recompute and, on rank 0, after the same recompute in this one process
over every rank's batches.
"""

from __future__ import annotations

import datetime
import os
import pickle
import sys

import torch
import torch.distributed as dist
from torch import nn

from bn1d.backends.torch_nn import convert_batchnorm
from bn1d.backends.torch_population import recompute_statistics

torch.set_num_threads(1)


def model() -> nn.Module:
    torch.manual_seed(0)
    return convert_batchnorm(nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(),
                                           nn.Linear(24, 5), nn.BatchNorm1d(5)))  # fmt: skip


def statistics(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def main() -> None:
    rank, world, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    with open(os.path.join(workdir, "job.pkl"), "rb") as file:
        job = pickle.load(file)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(workdir, "init"), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    net = model()
    recompute_statistics(net, job["batches"][rank], sync=True, timeout=30)
    result = {"synced": statistics(net)}
    if rank == 0:
        alone = model()
        recompute_statistics(alone, [x for share in job["batches"] for x in share])
        result["one_process"] = statistics(alone)
    dist.destroy_process_group()
    with open(os.path.join(workdir, f"rank{rank}.pkl"), "wb") as file:
        pickle.dump(result, file)


if __name__ == "__main__":
    main()
