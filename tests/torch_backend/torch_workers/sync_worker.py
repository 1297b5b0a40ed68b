"""One rank of a multi-process test of ``bn1d.backends.torch`` on gloo (CPU).

Usage: ``python sync_worker.py RANK WORLD_SIZE WORKDIR``. Reads ``WORKDIR/job.pkl``
(written by tests/test_torch_distributed.py), joins the process group through
``file://WORKDIR/init`` and writes ``WORKDIR/rank{RANK}.pkl``. Every check of one
launch runs here, so torch is imported once per process. The test process
compares the results with the NumPy specification.

Sections of the job (each optional):

* ``cases``: synced training steps (forward, backward with a given cotangent)
  and one inference call per case; outputs, gradients, running statistics, the
  exchanges made and the agreed shift after each step. A case may force the
  ``all_reduce`` exchange (``torch_distributed.Reduce``) at any group size, and
  perturb one rank's agreed shift before a step (the exchange must fall back).
* ``eval_silent``: rank 0 alone calls a synced layer in inference while the
  others wait at a barrier: it must not communicate (a collective would time out).
* ``ddp``: a Linear + synced BatchNorm1d model under DistributedDataParallel,
  its gradients, and those of the same model on the concatenated global batch.
* ``compiled``: a synced layer under ``torch.compile(fullgraph=True)``, eagerly, and
  compiled on rank 0 only, with each exchange.
* ``layer_order`` (2 ranks, run with ``TORCH_DISTRIBUTED_DEBUG=DETAIL``): two
  layers whose first calls agree, then called in a rank-dependent order.
* ``faults`` (2 ranks): a num_features mismatch, a dtype mismatch (on a first
  and on a later call), a rank that never calls the layer, and a rank that dies; rank 0 records each error and how
  long it took.
"""

from __future__ import annotations

import copy
import datetime
import os
import pickle
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bn1d.backends import torch_distributed, torch_kernels
from bn1d.backends.torch import BatchNorm1d

torch.set_num_threads(1)
native_calls = [0]  # synced calls that took the native-kernel path
_native_apply = torch_kernels.NativeBatchNorm.apply


def _counted(*args, **kwargs):
    native_calls[0] += 1
    return _native_apply(*args, **kwargs)


torch_kernels.NativeBatchNorm.apply = _counted
exchanges: list[str] = []  # the class of each synced call's exchange
_make_exchange = torch_distributed.make_exchange


def _recorded(*args, **kwargs):
    exchange = _make_exchange(*args, **kwargs)
    exchanges.append(type(exchange).__name__)
    return exchange


torch_distributed.make_exchange = _recorded


def run_case(case: dict, rank: int) -> dict:
    limit = torch_distributed.ALL_GATHER_MAX_RANKS
    if case.get("exchange") == "all_reduce":
        torch_distributed.ALL_GATHER_MAX_RANKS = 0
    try:
        return _run_case(case, rank)
    finally:
        torch_distributed.ALL_GATHER_MAX_RANKS = limit


def _run_case(case: dict, rank: int) -> dict:
    layer = BatchNorm1d(
        case["num_features"], axis=case["axis"], momentum=case["momentum"], axis_name="batch",
        axis_index_groups=case["groups"], fast_variance=case["fast_variance"],
        scale_initializer=case["scale"], bias_initializer=case["bias"],
        dtype=getattr(torch, case["param_dtype"]), timeout=60,
    )  # fmt: skip
    steps = []
    native_before, exchanges_before = native_calls[0], len(exchanges)
    for step, (x, mask, dy) in enumerate(case["steps"][rank]):
        if case.get("perturb") == (rank, step):  # this rank's agreed shift differs from the others'
            layer._sync.agreed_shift = layer._sync.agreed_shift + 1.0
        xt = torch.tensor(x, requires_grad=case["x_grad"])
        y = layer(xt, None if mask is None else torch.tensor(mask))
        y.backward(torch.tensor(dy))
        steps.append(
            {
                "y": y.detach().numpy(),
                "dx": None if xt.grad is None else xt.grad.numpy(),
                "dscale": layer.scale.grad.numpy().copy(),
                "dbias": layer.bias.grad.numpy().copy(),
                "running_mean": layer.running_mean.numpy().copy(),
                "running_var": layer.running_var.numpy().copy(),
                "agreed_shift": None if layer._sync.agreed_shift is None else layer._sync.agreed_shift.numpy().copy(),
            }
        )
        layer.zero_grad(set_to_none=True)
    eval_y = layer(torch.tensor(case["eval_x"][rank]), training=False).detach().numpy()
    return {"steps": steps, "eval_y": eval_y, "native_calls": native_calls[0] - native_before,
            "exchanges": exchanges[exchanges_before:]}  # fmt: skip


def eval_is_silent(rank: int) -> dict:
    layer = BatchNorm1d(3, axis_name="batch", timeout=5)
    start = time.monotonic()
    if rank == 0:  # the other ranks are already waiting in the barrier below
        layer(torch.randn(4, 5, 3), training=False)
    dist.barrier()
    return {"seconds": time.monotonic() - start}


def run_ddp(job: dict, rank: int, world: int) -> dict:
    torch.manual_seed(0)  # the same initial model on every rank
    linear = nn.Linear(job["in_features"], job["num_features"])
    model = nn.Sequential(linear, BatchNorm1d(job["num_features"], axis_name="batch", timeout=60))
    reference = nn.Sequential(copy.deepcopy(linear), BatchNorm1d(job["num_features"]))
    ddp = nn.parallel.DistributedDataParallel(model)
    x, dy = torch.tensor(job["xs"][rank]), torch.tensor(job["dys"][rank])
    (ddp(x) * dy).sum().backward()
    # DDP averages over ranks; the global loss is the sum of the local losses.
    grads = {name: p.grad.numpy() * world for name, p in ddp.module.named_parameters()}
    global_x, global_dy = torch.tensor(np.concatenate(job["xs"])), torch.tensor(np.concatenate(job["dys"]))
    (reference(global_x) * global_dy).sum().backward()
    expected = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    return {"grads": grads, "expected": expected, "running_var": model[1].running_var.numpy().copy(),
            "expected_running_var": reference[1].running_var.numpy().copy()}  # fmt: skip


def run_compiled(job: dict, rank: int) -> dict:
    """A synced layer under ``torch.compile(fullgraph=True)`` and eagerly, for each exchange,
    on the same uneven batches; ``mixed``: rank 0 compiled, rank 1 eager (the same
    collectives). Per run and step: y, dx, the parameter gradients, the running statistics."""
    limit = torch_distributed.ALL_GATHER_MAX_RANKS
    out: dict = {}
    for exchange in ("all_gather", "all_reduce"):
        torch_distributed.ALL_GATHER_MAX_RANKS = limit if exchange == "all_gather" else 0
        for mode in ("eager", "compiled", "mixed"):
            layer = BatchNorm1d(job["num_features"], momentum=0.9, axis_name="batch", timeout=60,
                                scale_initializer=job["scale"], bias_initializer=job["bias"])  # fmt: skip
            compiled = mode == "compiled" or (mode == "mixed" and rank == 0)
            call = torch.compile(layer, fullgraph=True, backend=job["backend"]) if compiled else layer
            steps = []
            for x, dy in job["steps"][rank]:
                xt = torch.tensor(x, requires_grad=True)
                y = call(xt)
                y.backward(torch.tensor(dy))
                values = {"y": y, "dx": xt.grad, "dscale": layer.scale.grad, "dbias": layer.bias.grad,
                          "running_mean": layer.running_mean, "running_var": layer.running_var}  # fmt: skip
                steps.append({key: value.detach().numpy().copy() for key, value in values.items()})
                layer.zero_grad(set_to_none=True)
            out[(exchange, mode)] = steps
    torch_distributed.ALL_GATHER_MAX_RANKS = limit
    return out


def rank_dependent_layer_order(rank: int) -> dict:
    first, second = (BatchNorm1d(c, axis=0, axis_name="batch", timeout=30) for c in (3, 4))
    first(torch.randn(5, 3))
    second(torch.randn(5, 4))
    order = (first, second) if rank == 0 else (second, first)
    return timed_error(lambda: [layer(torch.randn(5, layer.config.num_features)) for layer in order])


def timed_error(fn) -> dict:
    start = time.monotonic()
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - recorded for the test to judge
        return {"type": type(error).__name__, "message": str(error), "seconds": time.monotonic() - start}
    return {"type": None, "message": "", "seconds": time.monotonic() - start}


def run_faults(rank: int, workdir: str, out: dict, out_path: str) -> None:
    never_group, dead_group = dist.new_group([0, 1]), dist.new_group([0, 1])
    # 0. groups that partition one rank, on two: a ValueError on every rank before any exchange.
    lone = BatchNorm1d(3, axis_name="batch", axis_index_groups=[[0]], timeout=30)
    out["groups_wrong_size"] = timed_error(lambda: lone(torch.randn(4, 5, 3)))
    # 1. num_features differs between ranks: every rank gets a ValueError naming both.
    c = 3 + rank
    mismatched = BatchNorm1d(c, axis_name="batch", timeout=30)
    out["mismatch"] = timed_error(lambda: mismatched(torch.randn(4, 5, c)))
    # 2. float32 input on rank 0, float64 on rank 1: float32 and float64 statistics.
    layer = BatchNorm1d(3, axis_name="batch", timeout=30)
    out["dtype_mismatch"] = timed_error(lambda: layer(torch.randn(4, 5, 3, dtype=(torch.float32, torch.float64)[rank])))
    # 3. the same, on the second call of a layer whose first call agreed.
    layer = BatchNorm1d(3, axis_name="batch", timeout=30)
    layer(torch.randn(4, 5, 3))
    out["later_dtype_mismatch"] = timed_error(
        lambda: layer(torch.randn(4, 5, 3, dtype=(torch.float32, torch.float64)[rank]))
    )
    # 3b. the same under the all-reduce exchange: its checksum differs, every rank falls back
    # to the all-gather, whose headers name both ranks.
    limit, torch_distributed.ALL_GATHER_MAX_RANKS = torch_distributed.ALL_GATHER_MAX_RANKS, 0
    layer = BatchNorm1d(3, axis_name="batch", timeout=30)
    layer(torch.randn(4, 5, 3))
    out["later_dtype_mismatch_all_reduce"] = timed_error(
        lambda: layer(torch.randn(4, 5, 3, dtype=(torch.float32, torch.float64)[rank]))
    )
    out["later_dtype_mismatch_all_reduce"]["exchanges"] = exchanges[-2:]
    torch_distributed.ALL_GATHER_MAX_RANKS = limit
    dist.barrier()
    marker = os.path.join(workdir, "rank0_done_waiting")
    if rank == 0:
        # 4. rank 1 never calls the layer.
        layer = BatchNorm1d(3, axis_name="batch", process_group=never_group, timeout=2)
        out["never_calls"] = timed_error(lambda: layer(torch.randn(4, 5, 3)))
        open(marker, "w").close()
        # 5. rank 1 dies (after writing its results) instead of calling the layer.
        layer = BatchNorm1d(3, axis_name="batch", process_group=dead_group, timeout=30)
        out["dies"] = timed_error(lambda: layer(torch.randn(4, 5, 3)))
        save(out, out_path)
        os._exit(0)  # the process groups are broken: skip their teardown
    deadline = time.monotonic() + 60
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    save(out, out_path)
    os._exit(0)  # dies without calling the layer


def save(out: dict, path: str) -> None:
    with open(path + ".tmp", "wb") as file:
        pickle.dump(out, file)
    os.replace(path + ".tmp", path)


def main() -> None:
    rank, world, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    with open(os.path.join(workdir, "job.pkl"), "rb") as file:
        job = pickle.load(file)
    dist.init_process_group(
        "gloo", init_method="file://" + os.path.join(workdir, "init"), rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    out: dict = {"cases": [run_case(case, rank) for case in job.get("cases", [])]}
    if job.get("eval_silent"):
        out["eval_silent"] = eval_is_silent(rank)
    if job.get("layer_order"):
        out["layer_order"] = rank_dependent_layer_order(rank)
        save(out, os.path.join(workdir, f"rank{rank}.pkl"))
        os._exit(0)  # the process group saw mismatched collectives: skip its teardown
    if job.get("ddp"):
        out["ddp"] = run_ddp(job["ddp"], rank, world)
    if job.get("compiled"):
        out["compiled"] = run_compiled(job["compiled"], rank)
    out_path = os.path.join(workdir, f"rank{rank}.pkl")
    if job.get("faults"):
        run_faults(rank, workdir, out, out_path)
    save(out, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
