"""NumPy: the bn1d specification backend against a minimal hand-written two-pass batch norm."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np

from bn1d.backends.numpy import BatchNorm1d

from .results import PASSES, Row, Target
from .timing import Budget, interleaved_medians

AXES = (0, 1)
EPS, MOMENTUM = 1e-5, 0.99
MEMORY = "tracemalloc peak during one call (NumPy reports its buffers to it), output included"


def hand_forward(x, scale, bias, running_mean, running_var, training=True):
    """What a user writes by hand: two-pass statistics, then one normalising expression."""
    if not training:
        return (x - running_mean) * (scale / np.sqrt(running_var + EPS)) + bias, running_mean, running_var
    n = x.shape[0] * x.shape[1]
    mean = x.mean(axis=AXES)
    xm = x - mean
    var = np.mean(xm * xm, axis=AXES)
    y = xm * (scale / np.sqrt(var + EPS)) + bias
    running_mean = MOMENTUM * running_mean + (1 - MOMENTUM) * mean
    running_var = MOMENTUM * running_var + (1 - MOMENTUM) * var * (n / (n - 1))
    return y, running_mean, running_var


def hand_vjp(x, dy, scale):
    """The matching stateless backward pass ``(dx, dscale, dbias)`` of ``sum(y * dy)``
    (like bn1d's ``layer.vjp(x, dy)``, it recomputes the batch statistics)."""
    n = x.shape[0] * x.shape[1]
    mean = x.mean(axis=AXES)
    xm = x - mean
    inv = 1.0 / np.sqrt(np.mean(xm * xm, axis=AXES) + EPS)
    xm *= inv  # xhat
    dbias = dy.sum(axis=AXES)
    dscale = np.sum(dy * xm, axis=AXES)
    dx = dy * (scale * inv) - (xm * (scale * inv * dscale / n) + scale * inv * dbias / n)
    return dx, dscale, dbias


def _peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def cases(shape: tuple[int, ...]) -> tuple[dict[str, tuple[Callable[[], object], Callable[[], object]]], np.ndarray]:
    """``{pass: (bn1d, hand-written)}`` and x for one shape."""
    c = shape[-1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    layer = BatchNorm1d(c)
    scale, bias = np.ones(c, np.float32), np.zeros(c, np.float32)
    stats = {"rm": np.zeros(c, np.float32), "rv": np.ones(c, np.float32)}

    def hand_train():
        _, stats["rm"], stats["rv"] = hand_forward(x, scale, bias, stats["rm"], stats["rv"])

    return {
        "train fwd": (lambda: layer(x), hand_train),
        "train fwd+bwd": (lambda: (layer(x), layer.vjp(x, dy)), lambda: (hand_train(), hand_vjp(x, dy, scale))),
        "inference": (
            lambda: layer(x, training=False),
            lambda: hand_forward(x, scale, bias, stats["rm"], stats["rv"], training=False),
        ),
    }, x


def run(
    shapes: dict[str, tuple[int, ...]], budget: Budget, target: Target, passes: tuple[str, ...] = PASSES
) -> list[Row]:
    rows = []
    for size, shape in shapes.items():
        pairs, x = cases(shape)
        for pass_ in passes:
            ours, peer = pairs[pass_]
            times = interleaved_medians({"bn1d": ours, "peer": peer, "copy": x.copy}, budget)
            rows.append(
                Row(
                    "numpy",
                    shape,
                    pass_,
                    "default",
                    "hand-written NumPy",
                    times["bn1d"],
                    times["peer"],
                    x.nbytes,
                    copy_s=times["copy"],
                    bn1d_peak=_peak(ours),
                    peer_peak=_peak(peer),
                    memory=MEMORY,
                    target=target(pass_, size),
                )  # fmt: skip
            )
    return rows
