"""Worker for the PyTorch conformance adapter's synced cases: one process per rank.

``python -m bn1d.conformance.torch_replicas JOBS RANK WORLD INIT_FILE OUT_DIR``
joins a gloo process group (file:// rendezvous), runs every pickled
:class:`~bn1d.conformance.registry.ReplicaJob` as rank ``RANK`` (one synced training
call, then ``backward`` of ``sum(y * dy)``) and writes ``OUT_DIR/RANK.npz``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bn1d.backends.torch import BatchNorm1d


def run_job(job, rank: int) -> dict[str, np.ndarray]:
    layer_kwargs = dict(job.layer)
    dtype = torch.float64 if layer_kwargs.pop("param_dtype", "float32") == "float64" else torch.float32
    layer = BatchNorm1d(**layer_kwargs, dtype=dtype, timeout=120)
    x = torch.from_numpy(np.asarray(job.xs[rank], dtype=np.float64)).to(dtype).requires_grad_()
    mask = None if job.masks[rank] is None else torch.from_numpy(job.masks[rank])
    y = layer(x, mask=mask)
    (y * torch.from_numpy(job.dys[rank]).to(dtype)).sum().backward()
    assert x.grad is not None
    result = {"y": y.detach().double().numpy(), "grad/x": x.grad.double().numpy()}
    for key, value in layer.state_dict().items():
        result[f"state/{key}"] = value.detach().double().numpy()
    return result


def main(jobs_path: str, rank: str, world: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=int(rank), world_size=int(world),
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        with open(jobs_path, "rb") as stream:
            jobs = pickle.load(stream)
        arrays: dict[str, Any] = {}
        for index, job in enumerate(jobs):
            for key, value in run_job(job, int(rank)).items():
                arrays[f"{index}/{key}"] = value
        np.savez(f"{out_dir}/{rank}.npz", **arrays)
        dist.barrier()  # nobody tears down while a peer still communicates
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalization: gloo's threads can abort it with SIGABRT
    # while they still hold tensors (pytorch/pytorch#179291). The results are on disk.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
