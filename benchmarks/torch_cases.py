"""PyTorch: the bn1d ``nn.Module`` on ``(B, L, C)`` against ``torch.nn.BatchNorm1d`` on the ``(B*L, C)`` view."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from typing import Any

import torch

from bn1d.backends.torch import BatchNorm1d

from .results import PASSES, Row, Target
from .timing import Budget, interleaved_medians

MEMORY = "peak of the CPU allocator's live bytes during one call, from the PyTorch profiler's memory events"


def profiled_peak(fn: Callable[[], Any]) -> float | None:
    """Peak bytes allocated (net of frees) while ``fn`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted(
            (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
        )
    except Exception:  # noqa: BLE001 - the profiler is optional
        return None
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return float(peak)


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints its start/stop lines on file descriptor 2."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def pair(shape: tuple[int, ...], pass_: str) -> tuple[Callable[[], Any], Callable[[], Any], torch.Tensor]:
    c = shape[-1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    dy = torch.randn(shape, generator=gen)
    ours = BatchNorm1d(c)
    peer = torch.nn.BatchNorm1d(c, eps=1e-5, momentum=0.01)  # PyTorch's momentum is 1 - ours
    if pass_ == "inference":
        ours.eval(), peer.eval()

        def run_ours():
            with torch.no_grad():
                return ours(x)

        def run_peer():
            with torch.no_grad():
                return peer(x.reshape(-1, c)).view(shape)

        return run_ours, run_peer, x
    if pass_ == "train fwd":
        return lambda: ours(x), lambda: peer(x.reshape(-1, c)).view(shape), x
    xg = x.clone().requires_grad_(True)
    our_inputs = [xg, ours.scale, ours.bias]
    peer_inputs = [xg, peer.weight, peer.bias]

    def fwd_bwd_ours():  # the same loss on both sides: sum(y * dy), i.e. backward with cotangent dy
        return torch.autograd.grad(ours(xg), our_inputs, dy)

    def fwd_bwd_peer():
        return torch.autograd.grad(peer(xg.reshape(-1, c)).view(shape), peer_inputs, dy)

    return fwd_bwd_ours, fwd_bwd_peer, x


def run(
    shapes: dict[str, tuple[int, ...]], budget: Budget, target: Target, passes: tuple[str, ...] = PASSES
) -> list[Row]:
    rows = []
    for size, shape in shapes.items():
        for pass_ in passes:
            ours, peer, x = pair(shape, pass_)
            times = interleaved_medians({"bn1d": ours, "peer": peer, "copy": x.clone}, budget)
            rows.append(
                Row(
                    "torch",
                    shape,
                    pass_,
                    "default",
                    "torch.nn.BatchNorm1d on (B*L, C)",
                    times["bn1d"],
                    times["peer"],
                    x.numel() * x.element_size(),
                    copy_s=times["copy"],
                    bn1d_peak=profiled_peak(ours),
                    peer_peak=profiled_peak(peer),
                    memory=MEMORY,
                    target=target(pass_, size),
                    note=f"torch.get_num_threads()={torch.get_num_threads()}",
                )  # fmt: skip
            )
    return rows
