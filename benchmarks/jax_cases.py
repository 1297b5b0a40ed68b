"""JAX: ``layer.apply`` and the linen drop-in ``bn1d.backends.linen.BatchNorm``'s ``apply``, under
``jax.jit``, against Flax linen ``BatchNorm``'s ``apply`` under ``jax.jit``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bn1d.backends import linen as bn_linen
from bn1d.backends.jax import BatchNorm1d

from .results import PASSES, Row, Target
from .timing import Budget, interleaved_medians

MEMORY = "XLA's compiled memory_analysis(): temp + output buffers of the jitted function"
#: (bn1d variant, bn1d fast_variance, Flax use_fast_variance): bn1d's default (the shifted
#: one-pass statistics) against both of Flax's variance modes, the fast variance against
#: Flax's same formula, and the linen drop-in (exact by default) against both modes.
VARIANTS = (
    ("default", False, False), ("default", False, True), ("fast variance", True, True),
    ("drop-in", False, False), ("drop-in", False, True),
)  # fmt: skip
#: The issue's targets for the default variant at the large shape: (pass, Flax fast) -> ratio.
TARGETS = {("train fwd", False): 0.8, ("train fwd", True): 1.1, ("train fwd+bwd", False): 1.0,
           ("train fwd+bwd", True): 1.0}  # fmt: skip


def _compiled_bytes(jitted: Any, *args: Any) -> float | None:
    try:
        stats = jitted.lower(*args).compile().memory_analysis()
        return float(stats.temp_size_in_bytes + stats.output_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory analysis is optional on some platforms
        return None


def _blocking(jitted: Any, *args: Any):
    return lambda: jax.block_until_ready(jitted(*args))


def pair(
    shape: tuple[int, ...], fast: bool, pass_: str, flax_fast: bool | None = None, dropin: bool = False
) -> tuple[tuple[Any, tuple], tuple[Any, tuple], jax.Array]:
    """(bn1d jitted fn, args), (Flax jitted fn, args) and x for one case (``flax_fast``:
    Flax's variance mode, by default bn1d's; ``dropin``: bn1d's side is the linen drop-in,
    exact, called as Flax's module is)."""
    c = shape[-1]
    key_x, key_dy = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, shape, jnp.float32)
    dy = jax.random.normal(key_dy, shape, jnp.float32)
    flax_fast = fast if flax_fast is None else flax_fast
    flax = _linen(nn.BatchNorm(momentum=0.99, epsilon=1e-5, use_fast_variance=flax_fast), pass_, x, dy)
    if dropin:
        return _linen(bn_linen.BatchNorm(momentum=0.99, epsilon=1e-5), pass_, x, dy), flax, x
    layer = BatchNorm1d(c, fast_variance=fast)
    params, state = layer.params, layer.state
    if pass_ == "train fwd":
        return (jax.jit(lambda p, s, x: layer.apply(p, s, x, training=True)), (params, state, x)), flax, x
    if pass_ == "inference":
        return (jax.jit(lambda p, s, x: layer.apply(p, s, x, training=False)[0]), (params, state, x)), flax, x

    def our_loss(p, s, x, dy):  # the same loss on both sides: sum(y * dy)
        y, new_state = layer.apply(p, s, x, training=True)
        return jnp.sum(y * dy), new_state

    return (jax.jit(jax.grad(our_loss, argnums=(0, 2), has_aux=True)), (params, state, x, dy)), flax, x


def _linen(module: nn.Module, pass_: str, x: jax.Array, dy: jax.Array) -> tuple[Any, tuple]:
    """(jitted fn, args) of a linen batch norm's ``apply`` for one pass."""
    variables = module.init(jax.random.key(1), x, use_running_average=False)
    if pass_ == "train fwd":
        fn = jax.jit(lambda v, x: module.apply(v, x, use_running_average=False, mutable=["batch_stats"]))
        return fn, (variables, x)
    if pass_ == "inference":
        return jax.jit(lambda v, x: module.apply(v, x, use_running_average=True)), (variables, x)

    def loss(p, s, x, dy):
        y, updates = module.apply(
            {"params": p, "batch_stats": s}, x, use_running_average=False, mutable=["batch_stats"]
        )
        return jnp.sum(y * dy), updates

    return jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True)), (variables["params"], variables["batch_stats"], x, dy)


def _settle(fns: list[Any], copy: Callable[[], Any], limit_s: float = 5.0) -> None:
    """Run the first case's functions, untimed, until a plain copy runs at a steady
    bandwidth (at most ``limit_s``): the first input-sized XLA buffers of a process
    were measured at a fifth of the copy bandwidth for a few seconds (8.8-10 against
    47 GB/s), which made the first case's ratio meaningless."""
    deadline, previous = time.perf_counter() + limit_s, math.inf
    while time.perf_counter() < deadline:
        for fn in fns:
            fn()
        started = time.perf_counter()
        for _ in range(5):
            copy()
        elapsed = time.perf_counter() - started
        if elapsed > 0.8 * previous:  # no longer getting faster
            return
        previous = elapsed


def run(
    shapes: dict[str, tuple[int, ...]], budget: Budget, target: Target, passes: tuple[str, ...] = PASSES
) -> list[Row]:
    rows = []
    copy = jax.jit(lambda x: x + 1.0)  # a streaming read + write (an identity would be elided)
    for size, shape in shapes.items():
        for pass_ in passes:
            for variant, fast, flax_fast in VARIANTS:
                dropin = variant == "drop-in"
                if pass_ == "inference" and (fast or flax_fast) or passes != PASSES and (fast or flax_fast or dropin):
                    continue  # no variance in inference; the size sweep runs the default against two-pass
                (ours, our_args), (flax, flax_args), x = pair(shape, fast, pass_, flax_fast, dropin)
                fns = {"bn1d": _blocking(ours, *our_args), "peer": _blocking(flax, *flax_args)}
                if not rows:  # the first case of a process ran at a fifth of the copy bandwidth: settle first
                    _settle(list(fns.values()), _blocking(copy, x))
                times = interleaved_medians({**fns, "copy": _blocking(copy, x)}, budget)
                peer = f"flax.linen.BatchNorm(use_fast_variance={flax_fast})"
                goal = TARGETS.get((pass_, flax_fast)) if size == "large" and not fast else None
                rows.append(
                    Row(
                        "jax",
                        shape,
                        pass_,
                        variant if pass_ != "inference" or dropin else "",
                        peer,
                        times["bn1d"],
                        times["peer"],
                        int(np.prod(shape)) * 4,
                        copy_s=times["copy"],
                        bn1d_peak=_compiled_bytes(ours, *our_args),
                        peer_peak=_compiled_bytes(flax, *flax_args),
                        memory=MEMORY,
                        target=goal,
                    )  # fmt: skip
                )
    return rows
