"""A converted PyTorch model trained with DistributedDataParallel on CPU: 2 gloo processes.

    python examples/torch_ddp_cpu.py

A small classifier with PyTorch's batch norms (a Conv2d block with BatchNorm2d, a
Conv1d block with BatchNorm1d, a BatchNorm1d on the (N, C) features of its head) is
converted by ``convert_batchnorm(model, sync=True)``: every batch norm stays PyTorch's class
and syncs its statistics over the ranks with gloo, which ``nn.SyncBatchNorm`` refuses on
CPU (and DDP refuses any ``SyncBatchNorm`` in a CPU module). The ranks hold different
numbers of images (3 and 5 per step). After three SGD
steps each rank checks that its parameters and running statistics equal those of the
unconverted model trained in one process on all 8 images, then evaluates, and rank 0
reverts the model to PyTorch's classes for export.

For a real job, replace mp.spawn by torchrun and the file:// rendezvous by
init_method="env://" (and "nccl" on GPUs); nothing in the model changes.
"""

import copy
import inspect
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bn1d.backends.torch_nn import convert_batchnorm, revert_batchnorm

STEPS, SIZES = 3, (3, 5)  # images per step on rank 0 and rank 1


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.sequence = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):  # (N, 1, H, W)
        return self.head(self.sequence(self.image(x).flatten(2)).mean(2))


def data(step: int, rank: int):
    generator = torch.Generator().manual_seed(100 * step + rank)
    x = rank + (1 + rank) * torch.randn(SIZES[rank], 1, 6, 6, generator=generator)  # the ranks' data differ
    return x, torch.randint(0, 3, (SIZES[rank],), generator=generator)


def train(model, batches, world):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, target in batches:  # the global batch's mean loss: each rank's share, DDP averages over ranks
        optimizer.zero_grad()
        (nn.functional.cross_entropy(model(x), target, reduction="sum") * world / sum(SIZES)).backward()
        optimizer.step()


def run(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial model on every rank
        original = Classifier()
        model = convert_batchnorm(copy.deepcopy(original), sync=True, timeout=60)
        # The synced statistics are the same on every rank: no need to broadcast rank 0's buffers
        # before each forward (PyTorch 2.13 renamed broadcast_buffers=False, now deprecated).
        renamed = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_broadcast = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        ddp = nn.parallel.DistributedDataParallel(model, **no_broadcast)
        train(ddp, [data(step, rank) for step in range(STEPS)], world)

        reference = copy.deepcopy(original)  # one process, the concatenated batches, PyTorch's layers
        whole = [tuple(torch.cat(parts) for parts in zip(*(data(step, r) for r in range(world)))) for step in
                 range(STEPS)]  # fmt: skip
        train(reference, whole, 1)
        ours = model.state_dict()  # PyTorch's keys
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-5, msg=key)
        print(f"rank {rank}: {SIZES[rank]} images per step, parameters and running statistics of all "
              f"{sum(SIZES)}: ok", flush=True)  # fmt: skip

        model.eval()  # inference: running statistics, no communication
        x, target = data(STEPS, rank)
        accuracy = (model(x).argmax(1) == target).float().mean().item()
        print(f"rank {rank}: evaluated {len(x)} images (accuracy {accuracy:.2f})", flush=True)
        if rank == 0:
            exported = revert_batchnorm(copy.deepcopy(model))  # PyTorch's classes again, the same state
            kinds = sorted({type(m).__name__ for m in exported.modules() if "BatchNorm" in type(m).__name__})
            torch.testing.assert_close(exported(x), model(x))
            print(f"rank 0: reverted for export: {', '.join(kinds)}", flush=True)
        dist.barrier()  # every rank done with its collectives before any closes its connections
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(run, args=(len(SIZES), os.path.join(scratch, "rendezvous")), nprocs=len(SIZES))
