"""One rank of DistributedDataParallel training of a converted classifier on gloo (CPU).

Usage: ``python ddp_worker.py RANK WORLD_SIZE WORKDIR``. Reads ``WORKDIR/job.pkl``
(written by tests/torch_backend/test_torch_ddp.py): per step, every rank's batch
(uneven sizes). Joins the process group through ``file://WORKDIR/init`` and writes
``WORKDIR/rank{RANK}.pkl``:

* ``synced_broadcast`` / ``synced_local``: the state (parameters and buffers) after the
  steps of the model converted by ``convert_batchnorm(model, sync=True)`` under DDP with
  ``broadcast_buffers=True`` / ``False``;
* ``unsynced`` (with ``job["unsynced"]``): the running statistics of the model converted
  by ``convert_batchnorm`` (no sync) under DDP with ``broadcast_buffers=True`` (``broadcast_buffers``),
  and with ``False`` (``before``), then after ``sync_running_statistics`` with
  ``how="mean"`` and, from the same state, ``"broadcast"``;
* ``reference`` (rank 0): the unconverted model trained in this one process on the
  concatenated batches.
"""

from __future__ import annotations

import copy
import datetime
import os
import pickle
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bn1d.backends.torch_nn import convert_batchnorm, sync_running_statistics

torch.set_num_threads(1)


class Classifier(nn.Module):
    """A Conv2d block and a Conv1d block with PyTorch's batch norms, then a linear head
    with a BatchNorm1d on its (N, C) features."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.sequence = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, H, W)
        h = self.image(x).flatten(2)  # (N, 4, H * W): a sequence
        return self.head(self.sequence(h).mean(2))


def train(model: nn.Module, steps: list[tuple[torch.Tensor, torch.Tensor]], total: list[int], world: int) -> None:
    """SGD with momentum on the mean cross-entropy of the global batch: each rank's loss is
    its share, summed, times ``world`` (DDP averages the gradients over the ranks)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for (x, target), n in zip(steps, total):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target, reduction="sum") * world / n
        loss.backward()
        optimizer.step()


def state(model: nn.Module) -> dict[str, np.ndarray]:
    """The state (a drop-in's keys are PyTorch's)."""
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def statistics(model: nn.Module) -> dict[str, np.ndarray]:
    return {key: value for key, value in state(model).items() if "running" in key or "num_batches" in key}


def main() -> None:
    rank, world, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    with open(os.path.join(workdir, "job.pkl"), "rb") as file:
        job = pickle.load(file)
    dist.init_process_group(
        "gloo", init_method="file://" + os.path.join(workdir, "init"), rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    torch.manual_seed(0)  # the same initial model on every rank
    base = Classifier()
    local = [(torch.tensor(step[rank][0]), torch.tensor(step[rank][1])) for step in job["steps"]]
    total = [sum(len(b[1]) for b in step) for step in job["steps"]]
    out: dict = {}
    for name, broadcast in (("synced_broadcast", True), ("synced_local", False)):
        model = convert_batchnorm(copy.deepcopy(base), sync=True, timeout=60)
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast)
        train(ddp, local, total, world)
        out[name] = state(model)
    if job.get("unsynced"):
        model = convert_batchnorm(copy.deepcopy(base))
        train(nn.parallel.DistributedDataParallel(model, broadcast_buffers=True), local, total, world)
        buffers_broadcast = statistics(model)
        model = convert_batchnorm(copy.deepcopy(base))
        train(nn.parallel.DistributedDataParallel(model, broadcast_buffers=False), local, total, world)
        before = statistics(model)
        broadcast = copy.deepcopy(model)
        out["unsynced"] = {
            "broadcast_buffers": buffers_broadcast,
            "before": before,
            "mean": statistics(sync_running_statistics(model, how="mean", timeout=60)),
            "broadcast": statistics(sync_running_statistics(broadcast, how="broadcast", src=1, timeout=60)),
        }
    if rank == 0:
        reference = copy.deepcopy(base)
        whole = [(torch.cat([torch.tensor(b[0]) for b in step]), torch.cat([torch.tensor(b[1]) for b in step]))
                 for step in job["steps"]]  # fmt: skip
        train(reference, whole, total, 1)
        out["reference"] = state(reference)
    with open(os.path.join(workdir, f"rank{rank}.pkl.tmp"), "wb") as file:
        pickle.dump(out, file)
    os.replace(os.path.join(workdir, f"rank{rank}.pkl.tmp"), os.path.join(workdir, f"rank{rank}.pkl"))
    # Every rank done with every collective (rank 0 trained the reference alone) before any
    # closes its connections; then exit without the interpreter's teardown of DDP's and
    # gloo's C++ objects, which aborted a rank now and then ("terminate called without an
    # active exception", rc -6) on a loaded machine after its results were written.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
