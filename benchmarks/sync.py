"""The overhead of synced statistics: bn1d synced against bn1d unsynced, in subprocesses.

* JAX: one process with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``; the
  global batch is split over 4 CPU devices with ``jax.shard_map`` under ``jax.jit``,
  and the same program runs with ``axis_name="batch"`` (``psum`` of the statistics)
  and without (per-device statistics). Both are measured in that one process.
* PyTorch: 2 processes over gloo on 127.0.0.1 (``torch.set_num_threads(1)`` each);
  each holds half of the global batch. The synced layer (``axis_name`` set: the
  native kernels around one exchange per pass) runs against the unsynced layer
  (the native kernel) and against the unsynced core path (``native_kernel=False``).
  Twice: with the processes placed by the OS, and, where Linux affinity allows,
  each bound to a CPU of its own (``--pin``; what a launcher that binds ranks to
  cores does). On 2 vCPUs, one rank is sometimes delayed by a few milliseconds
  (the ranks and gloo's threads share the CPUs), and a synced step waits for the
  slower rank.

The parent starts the workers with a bounded timeout and kills them on expiry;
each worker prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from .results import Row
from .timing import Budget, interleaved_medians, pin_allocator

RESULT = "RESULT "


def _budget(name: str) -> Budget:
    return Budget.quick() if name == "quick" else Budget.default()


# -- workers ---------------------------------------------------------------------------------


def jax_worker(shape: tuple[int, ...], budget: Budget) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from bn1d.backends.jax import BatchNorm1d

    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("batch",))
    sharding = NamedSharding(mesh, P("batch"))
    key_x, key_dy = jax.random.split(jax.random.key(0))
    x = jax.device_put(jax.random.normal(key_x, shape, jnp.float32), sharding)
    dy = jax.device_put(jax.random.normal(key_dy, shape, jnp.float32), sharding)
    fns: dict[str, dict[str, Any]] = {"train fwd": {}, "train fwd+bwd": {}}
    for label, axis_name in (("synced", "batch"), ("unsynced", None)):
        layer = BatchNorm1d(shape[-1], axis_name=axis_name)

        def local(p, s, x, layer=layer):
            y, state = layer.apply(p, s, x, training=True)
            return y, jax.tree.map(lambda v: v[None], state)  # per-device rows: the same specs for both

        step = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("batch")), out_specs=(P("batch"), P("batch")))

        def loss(p, s, x, dy, step=step):
            y, state = step(p, s, x)
            return jnp.sum(y * dy), state

        fwd = jax.jit(step)
        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True))
        p, s = layer.params, layer.state
        fns["train fwd"][label] = lambda f=fwd, p=p, s=s: jax.block_until_ready(f(p, s, x))
        fns["train fwd+bwd"][label] = lambda f=fwd_bwd, p=p, s=s: jax.block_until_ready(f(p, s, x, dy))
    out = []
    for pass_, pair in fns.items():
        times = interleaved_medians(pair, budget)
        out.append({"pass": pass_, "variant": f"{devices} devices", "peer": "bn1d unsynced", **times})
    return out


def torch_worker(shape: tuple[int, ...], budget: Budget, rank: int, world: int, port: int, timeout_s: float, pin: bool):
    import datetime

    if pin:  # before torch and the process group start threads: they inherit the CPU
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})

    import torch
    import torch.distributed as dist

    from bn1d.backends.torch import BatchNorm1d

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip
    try:
        local = (shape[0] // world, *shape[1:])
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(local, generator=gen)
        dy = torch.randn(local, generator=gen)
        xg = x.clone().requires_grad_(True)
        c = shape[-1]
        layers = {
            "synced": BatchNorm1d(c, axis_name="batch", timeout=timeout_s),
            "unsynced": BatchNorm1d(c),
            "unsynced core": BatchNorm1d(c, native_kernel=False),
        }
        fwd: dict[str, Callable[..., Any]] = {k: (lambda m=m: m(x)) for k, m in layers.items()}
        fwd_bwd = {k: (lambda m=m: torch.autograd.grad(m(xg), [xg, m.scale, m.bias], dy)) for k, m in layers.items()}
        hand, hand_running = hand_synced_forward(x, world, momentum=0.99, epsilon=1e-5)
        fwd["hand-written synced"] = hand
        # The floor computes what the layer computes. float32: |y| <= ~5 for randn input, so a
        # few ulp of 5 (~1e-6; bitwise equal in a one-rank run); running statistics ~1, 1.2e-7 apart.
        synced = layers["synced"]
        failure = ""
        try:
            torch.testing.assert_close(hand(), synced(x), rtol=0, atol=1e-5)
            torch.testing.assert_close(hand_running, (synced.running_mean, synced.running_var), rtol=0, atol=1e-6)
        except AssertionError as error:
            failure = str(error)
        agreed = torch.tensor([0 if failure else 1])
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # every rank raises, none waits for the others
        if not agreed.item():
            raise AssertionError(f"hand_synced_forward disagrees with bn1d: {failure or 'on another rank'}")

        def agree(number: dict[str, int]) -> dict[str, int]:
            t = torch.tensor(list(number.values()))
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return dict(zip(number, t.tolist()))

        out = []
        variant = f"{world} processes" + (", 1 CPU each" if pin else "")
        for pass_, fns in (("train fwd", fwd), ("train fwd+bwd", fwd_bwd)):
            times = interleaved_medians(fns, budget, agree=agree, before_sample=dist.barrier)
            for peer in [k for k in fns if k != "synced"]:
                label = peer if peer.startswith("hand") else f"bn1d {peer}"
                row = {"pass": pass_, "variant": variant, "peer": label}
                out.append({**row, "synced": times["synced"], "unsynced": times[peer]})
        return out
    finally:
        dist.destroy_process_group()


def hand_synced_forward(
    x: Any, world: int, *, momentum: float, epsilon: float
) -> tuple[Callable[[], Any], tuple[Any, Any]]:
    """The floor of a synced training forward on PyTorch's CPU kernels, hand-written
    for ``(..., C)`` float32 input with unit scale and zero bias and more than one
    value per feature in all: this rank's statistics, one all_gather of ``(count,
    mean, variance)``, their combination (Chan, Golub and LeVeque), the inference
    kernel with the global statistics and the running statistics' update. No checks,
    no casts, no autograd: what any synced forward on these kernels must do, so
    bn1d's synced layer against it is bn1d's own overhead, and it against the
    unsynced layer is the exchange's and the split kernels'. Returns the forward
    and its ``(running_mean, running_var)``, updated in place."""
    import torch
    import torch.distributed as dist

    c = x.shape[-1]
    view = x.reshape(-1, c)
    weight, bias = torch.ones(c), torch.zeros(c)
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    count = torch.tensor([float(view.shape[0])])
    rows = torch.empty(world, 1 + 2 * c)

    def forward() -> Any:
        mean, var = torch.ops.aten.batch_norm_update_stats(view, None, None, 0.0)
        dist.all_gather(list(rows.unbind(0)), torch.cat([count, mean, var]))
        counts, means, variances = rows[:, :1], rows[:, 1 : c + 1], rows[:, c + 1 :]
        n = counts.sum()
        global_mean = (counts * means).sum(0) / n
        global_var = (counts * (variances + (means - global_mean) ** 2)).sum(0) / n
        y = torch.batch_norm(view, weight, bias, global_mean, global_var, False, 0.0, epsilon, False)
        running_mean.lerp_(global_mean, 1.0 - momentum)
        running_var.lerp_(global_var * (n / (n - 1)), 1.0 - momentum)
        return y.view(x.shape)

    return forward, (running_mean, running_var)


# -- the parent side ---------------------------------------------------------------------------


def _can_pin(ranks: int) -> bool:
    """Whether each of ``ranks`` processes can have a CPU of its own (Linux affinity)."""
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(stdout: str) -> list[dict[str, Any]]:
    for line in stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    raise RuntimeError("no RESULT line in the worker's output")


def _launch(args: list[str], env: dict[str, str], timeout_s: float, count: int = 1) -> list[str]:
    """Start ``count`` workers, wait at most ``timeout_s`` seconds, always reap them."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.sync", *args, "--rank", str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for rank in range(count)
    ]
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout_s)
            if proc.returncode != 0:
                raise RuntimeError(f"sync worker {args[0]} failed ({proc.returncode}):\n{stderr[-3000:]}")
            outputs.append(stdout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def _rows(backend: str, results: list[dict[str, Any]], shape, size: str, target: float | None) -> list[Row]:
    rows = []
    for r in results:
        peer = r["peer"]
        rows.append(
            Row(
                backend,
                shape,
                r["pass"],
                r["variant"],
                peer,
                r["synced"],
                r["unsynced"],
                int(shape[0] * shape[1] * shape[2]) * 4,
                target=target if size == "large" and peer == "bn1d unsynced" else None,
            )  # fmt: skip
        )
    return rows


def run(shapes: dict[str, tuple[int, ...]], budget_name: str, timeout_s: float, target: float) -> list[Row]:
    rows = []
    base_env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for size, shape in shapes.items():
        spec = ["--shape", ",".join(map(str, shape)), "--budget", budget_name, "--timeout", str(timeout_s)]
        env = {**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        try:
            (out,) = _launch(["jax", *spec], env, timeout_s)
            rows += _rows("jax sync (shard_map)", _result(out), shape, size, target)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as error:
            print(f"[benchmarks] JAX sync benchmark skipped: {error}", file=sys.stderr)
        for pin in (False, True) if _can_pin(2) else (False,):
            extra = ["--port", str(_free_port())] + (["--pin"] if pin else [])
            try:
                outs = _launch(["torch", *spec, *extra], base_env, timeout_s, count=2)
                rows += _rows("torch sync (gloo)", _result(outs[0]), shape, size, target)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as error:
                print(f"[benchmarks] PyTorch sync benchmark skipped: {error}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend", choices=("jax", "torch"))
    parser.add_argument("--shape", required=True)
    parser.add_argument("--budget", default="default")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pin", action="store_true", help="torch: bind rank r to the r-th allowed CPU")
    args = parser.parse_args()
    if os.environ.get("BN1D_BENCH_PIN_MALLOC") == "1":
        pin_allocator()
    shape = tuple(int(s) for s in args.shape.split(","))
    budget = _budget(args.budget)
    if args.backend == "jax":
        results = jax_worker(shape, budget)
    else:
        results = torch_worker(shape, budget, args.rank, 2, args.port, args.timeout, args.pin)
    if args.rank == 0:
        print(RESULT + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
