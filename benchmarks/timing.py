"""Interleaved timing: every candidate of a case runs in each round, in a rotating order.

Each sample times ``number`` back-to-back calls (calibrated so that a sample lasts
about ``sample_s``), and the reported time is the median over ``repeats`` samples
of the per-call time. Interleaving the candidates spreads clock and thermal drift
evenly over them, so the ratios are fairer than those of consecutive runs.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """How long to measure: ``repeats`` samples of about ``sample_s`` seconds each,
    after ``warmup`` untimed calls (compilation and caches are excluded)."""

    repeats: int
    sample_s: float
    warmup: int

    @classmethod
    def quick(cls) -> Budget:
        return cls(repeats=3, sample_s=0.002, warmup=1)

    @classmethod
    def default(cls) -> Budget:
        return cls(repeats=15, sample_s=0.02, warmup=3)


def _calls_per_sample(fn: Callable[[], object], sample_s: float) -> int:
    start = time.perf_counter()
    fn()
    single = max(time.perf_counter() - start, 1e-7)
    return max(1, min(10_000, math.ceil(sample_s / single)))


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]],
    budget: Budget,
    *,
    agree: Callable[[dict[str, int]], dict[str, int]] | None = None,
    before_sample: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each function. Each ``fn`` must finish its work
    before returning (``block_until_ready`` for JAX).

    For collectives across processes: ``agree`` makes every process use the same
    calls per sample (e.g. the maximum over ranks) and ``before_sample`` (e.g. a
    barrier) lines the processes up before each sample.
    """
    names = list(fns)
    for name in names:
        for _ in range(budget.warmup):
            fns[name]()
    number = {name: _calls_per_sample(fns[name], budget.sample_s) for name in names}
    if agree is not None:
        number = agree(number)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(budget.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, k = fns[name], number[name]
            if before_sample is not None:
                before_sample()
            start = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - start) / k)
    return {name: statistics.median(values) for name, values in samples.items()}


def pin_allocator() -> bool:
    """Make glibc reuse freed memory instead of returning it to the OS.

    By default glibc serves each input-sized temporary with a fresh ``mmap`` (its
    adaptive threshold moves with the allocation history), so a call pays page faults
    that depend on what ran before it: timings then measure the allocator's state
    more than the kernels. Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``
    applies to every library in the process (NumPy, PyTorch, XLA) alike. Returns
    whether it took effect (glibc only).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31))
    except (OSError, AttributeError):
        return False
