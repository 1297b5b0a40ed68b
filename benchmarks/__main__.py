"""``python -m benchmarks [--quick] [--markdown PATH] [--json PATH] [--plot PATH]`` from the repository root."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from typing import Any

from .results import Row, markdown_table, memory_notes, write_json
from .timing import Budget, pin_allocator

LARGE, SMALL = (32, 1024, 256), (8, 128, 64)
QUICK_LARGE = (8, 256, 128)  # --quick: the same table on a smaller "large" shape
SWEEP = [(8, 128, 64), (8, 256, 128), (16, 512, 128), (16, 512, 256), (32, 1024, 256)]
BACKENDS = ("numpy", "jax", "torch")


def target_for(backend: str):
    """The issue's targets, as ``target(pass, size) -> max ratio or None`` (JAX's depend
    on Flax's variance mode too: ``jax_cases.TARGETS``)."""

    def target(pass_: str, size: str) -> float | None:
        if backend == "numpy":
            return 1.3
        if pass_ == "inference":
            return None
        if backend == "torch":
            return 1.1 if size == "large" else 1.5
        return None

    return target


def machine() -> dict[str, Any]:
    import numpy

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "numpy": numpy.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for name in ("jax", "flax", "torch"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def sweep(backends: list[str], budget: Budget) -> list[dict[str, Any]]:
    """Training-forward time against input size, bn1d and its peer, per backend."""
    points = []
    for backend in backends:
        module = _module(backend)
        for shape in SWEEP:
            rows = module.run({"sweep": shape}, budget, lambda *_: None, passes=("train fwd",))
            for row in rows:
                if row.variant in ("", "default") and "use_fast_variance=True" not in row.peer:
                    points.append(
                        {"backend": backend, "shape": shape, "bytes": row.input_bytes, "bn1d_s": row.bn1d_s,
                         "peer_s": row.peer_s, "peer": row.peer}
                    )  # fmt: skip
    return points


def plot(points: list[dict[str, Any]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[benchmarks] matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, backend in enumerate(sorted({p["backend"] for p in points})):
        mine = [p for p in points if p["backend"] == backend]
        sizes = [p["bytes"] / 2**20 for p in mine]
        color = f"C{i}"
        ax.plot(sizes, [p["bn1d_s"] * 1e3 for p in mine], "o-", color=color, label=f"bn1d {backend}")
        ax.plot(sizes, [p["peer_s"] * 1e3 for p in mine], "s--", color=color, label=mine[0]["peer"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("input size (MiB, float32)")
    ax.set_ylabel("training forward, median ms")
    ax.set_title("bn1d against native batch norm (lower is better)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _module(backend: str) -> Any:
    """The case module of a backend (imported on demand: each needs only its own framework)."""
    return importlib.import_module(f".{backend}_cases", __package__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (small shapes, 3 repeats)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of numpy,jax,torch")
    parser.add_argument("--no-sync", action="store_true", help="skip the synced-statistics overhead")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads (both sides)")
    parser.add_argument("--repeats", type=int, help="samples per candidate (median over them)")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    parser.add_argument("--json", metavar="PATH", help="write the rows (and the sweep) as JSON")
    parser.add_argument("--plot", metavar="PATH", help="time against input size per backend (needs matplotlib)")
    parser.add_argument("--sync-timeout", type=float, default=300.0, help="seconds before sync workers are killed")
    parser.add_argument(
        "--no-pin-malloc", action="store_true", help="keep glibc's adaptive mmap threshold (see timing.pin_allocator)"
    )
    args = parser.parse_args(argv)
    pinned = False if args.no_pin_malloc else pin_allocator()
    if pinned:
        os.environ["BN1D_BENCH_PIN_MALLOC"] = "1"  # the sync workers pin theirs too

    budget = Budget.quick() if args.quick else Budget.default()
    if args.repeats:
        budget = Budget(args.repeats, budget.sample_s, budget.warmup)
    shapes: dict[str, tuple[int, ...]] = {"large": QUICK_LARGE if args.quick else LARGE, "small": SMALL}
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}")
    if "torch" in backends:
        import torch

        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    rows: list[Row] = []
    for backend in backends:
        rows += _module(backend).run(shapes, budget, target_for(backend))
        print(f"[benchmarks] {backend} done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    if not args.no_sync:
        from . import sync

        rows += sync.run(shapes, "quick" if args.quick else "default", args.sync_timeout, target=1.2)
        print(f"[benchmarks] sync done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    points = sweep(backends, Budget.quick() if args.quick else Budget(7, 0.01, 2)) if args.plot else []

    meta: dict[str, Any] = {"command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])}
    meta.update(machine(), torch_threads=args.threads, malloc_pinned=pinned)
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    table = markdown_table(rows)
    print(table)
    print("\nPeak memory:\n" + "\n".join(memory_notes(rows)))
    missed = [r for r in rows if r.met is False]
    print(f"\n{sum(r.met is True for r in rows)} targets met, {len(missed)} not met; {meta['elapsed_s']}s")
    if args.markdown:
        with open(args.markdown, "w") as f:
            machine_line = ", ".join(f"{k}={v}" for k, v in meta.items() if k != "command")
            f.write(f"Command: `{meta['command']}`\n\nMachine: {machine_line}\n\n{table}\n")
    if args.json:
        write_json(args.json, rows, points, meta)
    if args.plot and points:
        plot(points, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
