"""Synced BatchNorm1d over torch.distributed, gloo on CPU: 2 processes on this host.

    python examples/torch_distributed.py

The ranks hold different numbers of sequences (3 and 5); the synced statistics,
outputs and input gradients equal those of one layer on the concatenated batch.
For a real job, replace mp.spawn by torchrun and the file:// rendezvous by
init_method="env://" (and "nccl" on GPUs); nothing in the layer changes.
"""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bn1d.backends.torch import BatchNorm1d


def run(rank: int, world: int, init_file: str, batches: list[torch.Tensor]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layer = BatchNorm1d(8, axis_name="data", timeout=60)  # syncs over WORLD
        x = batches[rank].clone().requires_grad_()
        y = layer(x)
        y.square().sum().backward()  # the collectives are differentiable

        reference = BatchNorm1d(8)  # one process, the whole batch
        whole = torch.cat(batches).requires_grad_()
        y_whole = reference(whole)
        y_whole.square().sum().backward()
        start = sum(len(b) for b in batches[:rank])
        rows = slice(start, start + len(x))
        torch.testing.assert_close(y, y_whole[rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, whole.grad[rows], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-5, atol=1e-6)
        print(f"rank {rank}: {len(x)} local sequences, statistics of all {len(whole)}: ok")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    world = 2
    batches = [torch.randn(3 + 2 * r, 16, 8) for r in range(world)]  # uneven: 3 and 5 sequences
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(run, args=(world, os.path.join(scratch, "rendezvous"), batches), nprocs=world)
