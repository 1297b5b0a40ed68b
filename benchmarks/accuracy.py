"""``python -m benchmarks.accuracy``: error against ``|mean| / std`` and ``n`` for every
bn1d backend (synced too) and the batch norms users run instead, in one process.

Input: ``(B, L, 4)`` float32, ``x = ratio + N(0, 1)`` per feature, one training call
with momentum 0 (the running statistics are then the batch's), scale 1, bias 0.
Metrics (``bn1d.conformance.accuracy``): ``y`` = ``max|y - y64|``, ``mean`` =
error of the stored mean beyond one float32 ulp over ``std``, ``var`` = relative
error of the running variance, against the float64 computation on the same
float32 values. The contract's rule is 1e-5 on each.

Synced rows: 4 replicas of ``(B / 4, L, 4)`` that keep 100%, 50%, 75% and 25% of
their positions (masks: uneven counts), so ``n`` is 5/8 of ``B * L``; PyTorch's
over gloo in 4 processes. Peers run with their own conventions (Flax's running
variance is biased, PyTorch's momentum is 1 - ours) and are skipped when not
installed.

Options: ``--quick`` (n up to 2**14, fewer ratios), ``--markdown PATH``,
``--json PATH``, ``--plot PATH`` (needs matplotlib), ``--no-sync``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # before JAX starts: shard_map

from bn1d.conformance.accuracy import RULE, forward_errors, raw_data  # noqa: E402

C = 4
RATIOS = (0.25, 1.0, 10.0, 100.0, 1e3, 1e4)
SIZES = {"1024": (1, 1024), "2**14": (16, 1024), "2**18": (64, 4096)}  # n = B * L values per feature
QUICK_RATIOS, QUICK_SIZES = (0.25, 100.0, 1e4), {"1024": (1, 1024), "2**14": (16, 1024)}
KEEP = (1.0, 0.5, 0.75, 0.25)  # per replica, synced rows

Result = tuple[Any, Any, Any]  # y, running_mean, running_var


class Implementation:
    """One line of the table: ``run(x)`` on a float32 ``(B, L, C)`` array (or, synced,
    ``run(xs, masks)`` on the replicas) returns ``(y, running_mean, running_var)``."""

    def __init__(self, name: str, run: Callable[..., Any], *, unbiased: bool = True, synced: bool = False):
        self.name, self.run, self.unbiased, self.synced = name, run, unbiased, synced


def _numpy() -> list[Implementation]:
    from bn1d.backends.numpy import BatchNorm1d, run_replicas

    def plain(x):
        layer = BatchNorm1d(C, momentum=0.0)
        return layer(x), layer.running_mean, layer.running_var

    def synced(xs, masks):
        layers = [BatchNorm1d(C, momentum=0.0, axis_name="r") for _ in xs]
        ys = run_replicas(lambda r: layers[r](xs[r], mask=masks[r]), len(xs))
        return np.concatenate(ys), layers[0].running_mean, layers[0].running_var

    return [Implementation("bn1d numpy", plain), Implementation("bn1d numpy, 4 replicas", synced, synced=True)]


def _jax() -> list[Implementation]:
    import jax
    import jax.numpy as jnp

    from bn1d.backends.jax import BatchNorm1d

    def plain(x):
        layer = BatchNorm1d(C, momentum=0.0)
        y, state = jax.jit(lambda x: layer.apply(layer.params, layer.state, x, training=True))(jnp.asarray(x))
        return y, state["running_mean"], state["running_var"]

    def vmapped(xs, masks):
        layer = BatchNorm1d(C, momentum=0.0, axis_name="r")
        step = jax.vmap(lambda x, m: layer.apply(layer.params, layer.state, x, mask=m, training=True), axis_name="r")
        ys, states = jax.jit(step)(jnp.stack(xs), jnp.stack(masks))
        return np.concatenate(list(ys)), states["running_mean"][0], states["running_var"][0]

    def sharded(xs, masks):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        layer = BatchNorm1d(C, momentum=0.0, axis_name="r")
        mesh = Mesh(np.array(jax.devices()[: len(xs)]), ("r",))
        spec = NamedSharding(mesh, PartitionSpec("r"))
        x = jax.device_put(jnp.concatenate(xs), spec)
        mask = jax.device_put(jnp.concatenate(masks), spec)

        def local(x, m):
            y, state = layer.apply(layer.params, layer.state, x, mask=m, training=True)
            return y, jax.tree.map(lambda v: v[None], state)

        step = jax.shard_map(
            local, mesh=mesh, in_specs=(PartitionSpec("r"), PartitionSpec("r")), out_specs=PartitionSpec("r")
        )
        y, states = jax.jit(step)(x, mask)
        return y, states["running_mean"][0], states["running_var"][0]

    found = [Implementation("bn1d jax", plain), Implementation("bn1d jax, vmap 4 replicas", vmapped, synced=True)]
    if len(jax.devices()) >= len(KEEP):
        found.append(Implementation("bn1d jax, shard_map 4 devices", sharded, synced=True))
    return found


def _torch() -> list[Implementation]:
    import torch

    from bn1d.backends.torch import BatchNorm1d
    from bn1d.conformance.builtin import TorchBackend
    from bn1d.conformance.registry import ReplicaJob

    def layer_run(native: bool):
        def run(x):
            layer = BatchNorm1d(C, momentum=0.0, native_kernel=native)
            with torch.no_grad():
                y = layer(torch.from_numpy(x))
            return y, layer.running_mean, layer.running_var

        return run

    def gloo(xs, masks):  # 4 processes; one launch per call
        job = ReplicaJob(
            {"num_features": C, "axis_name": "r", "momentum": 0.0}, xs, masks, [np.zeros_like(x) for x in xs]
        )
        (result,) = TorchBackend().run_replicated([job])
        return np.concatenate(result.ys), result.states[0]["running_mean"], result.states[0]["running_var"]

    return [
        Implementation("bn1d torch", layer_run(True)),
        Implementation("bn1d torch, native_kernel=False", layer_run(False)),
        Implementation("bn1d torch, gloo 4 ranks", gloo, synced=True),
    ]


def _peers() -> list[Implementation]:
    found = []
    if importlib.util.find_spec("torch"):
        import torch

        def torch_native(x):
            module = torch.nn.BatchNorm1d(C, eps=1e-5, momentum=1.0)  # PyTorch's 1.0 is our momentum 0
            with torch.no_grad():
                y = module(torch.from_numpy(x).reshape(-1, C)).reshape(x.shape)
            return y, module.running_mean, module.running_var

        found.append(Implementation("torch.nn.BatchNorm1d", torch_native))
    if importlib.util.find_spec("flax"):
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        def flax_run(fast: bool):
            module = nn.BatchNorm(momentum=0.0, epsilon=1e-5, use_fast_variance=fast)

            def run(x):
                variables = module.init(jax.random.key(0), jnp.zeros((2, 1, C)), use_running_average=False)
                y, updates = module.apply(variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
                return y, updates["batch_stats"]["mean"], updates["batch_stats"]["var"]

            return run

        found.append(Implementation("flax.linen.BatchNorm", flax_run(False), unbiased=False))
        found.append(Implementation("flax.linen.BatchNorm(use_fast_variance=True)", flax_run(True), unbiased=False))
    if importlib.util.find_spec("brainpy"):
        import brainpy as bp

        def brainpy_run(x):
            layer = bp.dnn.BatchNorm1d(C, momentum=0.0)
            bp.share.save(fit=True)
            y = layer(x)
            return y, layer.running_mean.value, layer.running_var.value

        found.append(Implementation("brainpy.dnn.BatchNorm1d", brainpy_run))
    return found


def implementations(sync: bool = True) -> tuple[list[Implementation], list[str]]:
    """Every implementation that can run here, and the ones that cannot (why)."""
    found, missing = [], []
    for module, factory in (("numpy", _numpy), ("jax", _jax), ("torch", _torch), (None, _peers)):
        if module is not None and module != "numpy" and importlib.util.find_spec(module) is None:
            missing.append(f"bn1d {module} (not installed)")
            continue
        found += factory()
    for peer, package in (("flax.linen.BatchNorm", "flax"), ("brainpy.dnn.BatchNorm1d", "brainpy")):
        if importlib.util.find_spec(package) is None:
            missing.append(f"{peer} ({package} not installed)")
    if not sync:
        found = [impl for impl in found if not impl.synced]
    return found, missing


def measure(impls: list[Implementation], sizes: dict[str, tuple[int, int]], ratios: tuple[float, ...]) -> list[dict]:
    """One record per (implementation, n, ratio): the three metrics."""
    records = []
    for size, (b, length) in sizes.items():
        for ratio in ratios:
            x = raw_data((b * len(KEEP), length, C), ratio, seed=int(ratio * 7) + b).astype(np.float32)
            rng = np.random.default_rng(b)
            masks = [rng.random((b, length)) < keep for keep in KEEP]
            for mask in masks:
                mask[0, 0] = True
            parts = np.split(x, len(KEEP))
            for impl in impls:
                started = time.perf_counter()
                if impl.synced:
                    y, rm, rv = impl.run(parts, masks)
                    errors = forward_errors(x, np.asarray(y), np.asarray(rm), np.asarray(rv), feature_axis=2,
                                            mask=np.concatenate(masks), unbiased=impl.unbiased)  # fmt: skip
                else:
                    y, rm, rv = impl.run(x)
                    errors = forward_errors(x, _host(y), _host(rm), _host(rv), feature_axis=2, unbiased=impl.unbiased)
                n = int(np.concatenate(masks).sum()) if impl.synced else x.shape[0] * x.shape[1]
                records.append({"implementation": impl.name, "size": size, "n": n, "ratio": ratio, **errors,
                                "seconds": time.perf_counter() - started})  # fmt: skip
    return records


def _host(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().double()
    return np.asarray(value, np.float64)


def table(records: list[dict], impls: list[Implementation], ratios: tuple[float, ...]) -> str:
    """Markdown: for each n, one row per implementation and metric, one column per ratio."""
    lines = []
    for size in dict.fromkeys(r["size"] for r in records):
        mine = [r for r in records if r["size"] == size]
        lines += [f"\n**n = {size}** values per feature (synced rows: 5/8 of it, over 4 replicas)\n"]
        lines += ["| implementation | metric | " + " | ".join(f"{r:g}" for r in ratios) + " |"]
        lines += ["|---|---|" + "---|" * len(ratios)]
        for impl in impls:
            cells = {r["ratio"]: r for r in mine if r["implementation"] == impl.name}
            for metric in ("y", "mean", "var"):
                values = [cells[ratio][metric] for ratio in ratios]
                marked = [f"**{v:.1e}**" if v > RULE else f"{v:.1e}" for v in values]
                lines.append(f"| {impl.name} | {metric} | " + " | ".join(marked) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> bool:
    """Worst of the three metrics against ``|mean| / std`` at the largest n, log-log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[accuracy] matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    size = list(dict.fromkeys(r["size"] for r in records))[-1]
    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(r["implementation"] for r in records))
    ours = [n for n in names if n.startswith("bn1d")]
    shades = plt.get_cmap("Blues")([0.45 + 0.55 * i / max(1, len(ours) - 1) for i in range(len(ours))])
    peers = iter((("tab:red", "s"), ("tab:orange", "^"), ("tab:purple", "D"), ("tab:brown", "x"), ("tab:pink", "v")))
    for name in names:
        mine = [r for r in records if r["implementation"] == name and r["size"] == size]
        worst = [max(r["y"], r["mean"], r["var"], 1e-9) for r in mine]
        if name in ours:
            style = {"color": shades[ours.index(name)], "linestyle": "-", "linewidth": 1.2, "marker": "o"}
        else:  # peers that coincide (Flax's fast variance is BrainPy's formula) stay visible by marker
            color, marker = next(peers)
            style = {"color": color, "linestyle": "--", "linewidth": 1.6, "marker": marker, "markersize": 6}
        ax.plot([r["ratio"] for r in mine], worst, label=name, **{"markersize": 3, **style})
    ax.axhline(RULE, color="black", linewidth=1, linestyle=":", label="the rule (1e-5)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("|mean| / std of the input")
    ax.set_ylabel("worst of y, mean/std, var errors")
    ax.set_title(f"float32 batch norm against float64, n = {size} per feature (lower is better)")
    ax.legend(fontsize=6.5, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="n up to 2**14 and three ratios (a smoke run)")
    parser.add_argument("--no-sync", action="store_true", help="skip the synced rows")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    parser.add_argument("--json", metavar="PATH", help="write every record as JSON")
    parser.add_argument("--plot", metavar="PATH", help="the worst error against |mean|/std (needs matplotlib)")
    args = parser.parse_args(argv)
    sizes, ratios = (QUICK_SIZES, QUICK_RATIOS) if args.quick else (SIZES, RATIOS)
    impls, missing = implementations(sync=not args.no_sync)
    started = time.perf_counter()
    records = measure(impls, sizes, ratios)
    text = table(records, impls, ratios)
    print(text)
    ours = [r for r in records if r["implementation"].startswith("bn1d")]
    worst = max(ours, key=lambda r: max(r["y"], r["mean"], r["var"]))
    worst_value = max(worst["y"], worst["mean"], worst["var"])
    for line in missing:
        print(f"not installed: {line}")
    summary = (
        f"\nbn1d's worst: {worst_value:.1e} ({worst['implementation']}, n = {worst['size']}, ratio {worst['ratio']:g})"
        f"; the rule: {RULE:.0e}; {time.perf_counter() - started:.1f} s"
    )
    print(summary)
    if args.markdown:
        with open(args.markdown, "w") as stream:
            stream.write(
                f"Command: `python -m benchmarks.accuracy {' '.join(argv or sys.argv[1:])}`\n{text}\n{summary}\n"
            )
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"records": records, "missing": missing, "rule": RULE}, stream, indent=1)
    if args.plot:
        plot(records, args.plot)
    return 0 if worst_value <= RULE else 1


if __name__ == "__main__":
    sys.exit(main())
