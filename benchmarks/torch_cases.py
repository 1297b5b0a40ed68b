"""PyTorch, two variants, each against ``torch.nn.BatchNorm1d`` in the same process:

* ``drop-in``: ``bn1d.backends.torch_nn.BatchNorm1d`` (PyTorch's class, bn1d's
  arithmetic) and ``torch.nn.BatchNorm1d`` on the same ``(N, C, L)`` input, the shape read
  in PyTorch's layout;
* ``BrainPy signature``: ``bn1d.backends.torch.BatchNorm1d`` on ``(B, L, C)`` and
  ``torch.nn.BatchNorm1d`` on the ``(B*L, C)`` view.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from typing import Any

import torch

from bn1d.backends import torch_nn
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


#: The drop-in issue's targets (bn1d / PyTorch): forward and forward+backward at the small
#: shape, forward at the large one, and the measured floor of the large forward+backward.
DROP_IN_TARGETS = {("small", "train fwd"): 1.2, ("small", "train fwd+bwd"): 1.2, ("large", "train fwd"): 1.1,
                   ("large", "train fwd+bwd"): 1.3}  # fmt: skip
VARIANTS = {"drop-in": "torch.nn.BatchNorm1d on the same (N, C, L)",
            "BrainPy signature": "torch.nn.BatchNorm1d on (B*L, C)"}  # fmt: skip


def pair(
    shape: tuple[int, ...], pass_: str, variant: str = "BrainPy signature"
) -> tuple[Callable[[], Any], Callable[[], Any], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    dy = torch.randn(shape, generator=gen)
    if variant == "drop-in":
        c = shape[1]
        ours: torch.nn.Module = torch_nn.BatchNorm1d(c)
        peer = torch.nn.BatchNorm1d(c)

        def view(t: torch.Tensor) -> torch.Tensor:
            return t
    else:
        c = shape[-1]
        ours = BatchNorm1d(c)
        peer = torch.nn.BatchNorm1d(c, eps=1e-5, momentum=0.01)  # PyTorch's momentum is 1 - ours

        def view(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1, c)

    if pass_ == "inference":
        ours.eval(), peer.eval()

        def run_ours():
            with torch.no_grad():
                return ours(x)

        def run_peer():
            with torch.no_grad():
                return peer(view(x)).view(shape)

        return run_ours, run_peer, x
    if pass_ == "train fwd":
        return lambda: ours(x), lambda: peer(view(x)).view(shape), x
    xg = x.clone().requires_grad_(True)
    our_inputs = [xg, *ours.parameters()]
    peer_inputs = [xg, peer.weight, peer.bias]

    def fwd_bwd_ours():  # the same loss on both sides: sum(y * dy), i.e. backward with cotangent dy
        return torch.autograd.grad(ours(xg), our_inputs, dy)

    def fwd_bwd_peer():
        return torch.autograd.grad(peer(view(xg)).view(shape), peer_inputs, dy)

    return fwd_bwd_ours, fwd_bwd_peer, x


def run(
    shapes: dict[str, tuple[int, ...]], budget: Budget, target: Target, passes: tuple[str, ...] = PASSES
) -> list[Row]:
    rows = []
    for variant, peer_name in VARIANTS.items():
        for size, shape in shapes.items():
            for pass_ in passes:
                rows.append(_row(variant, peer_name, size, shape, pass_, budget, target))
    return rows


def _row(
    variant: str, peer_name: str, size: str, shape: tuple[int, ...], pass_: str, budget: Budget, target: Target
) -> Row:
    ours, peer, x = pair(shape, pass_, variant)
    times = interleaved_medians({"bn1d": ours, "peer": peer, "copy": x.clone}, budget)
    goal = DROP_IN_TARGETS.get((size, pass_)) if variant == "drop-in" else target(pass_, size)
    return Row(
        "torch",
        shape,
        pass_,
        variant,
        peer_name,
        times["bn1d"],
        times["peer"],
        x.numel() * x.element_size(),
        copy_s=times["copy"],
        bn1d_peak=profiled_peak(ours),
        peer_peak=profiled_peak(peer),
        memory=MEMORY,
        target=goal,
        note=f"torch.get_num_threads()={torch.get_num_threads()}",
    )
