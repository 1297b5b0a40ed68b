"""``python -m benchmarks.jax_agreement``: how far bn1d's JAX drop-ins are from the classes they
replace, and both from the float64 specification, in one training call (a markdown table).

Flax: ``bn1d.backends.linen.BatchNorm`` against ``flax.linen.BatchNorm`` with the same
``use_fast_variance`` (``True``: both Flax's one-pass formula; ``False``: bn1d's exact
statistics against Flax's two float32 passes), momentum 0.9, on float32 ``x = loc +
N(0, 2)``: ``|mean| / std = 0.5`` and ``50``. Equinox: ``bn1d.backends.equinox.BatchNorm``
against ``eqx.nn.BatchNorm`` in both modes, two training calls and one in inference, one
example per ``vmap`` lane. Columns: the largest absolute difference of ``y`` and of the new
running statistics, and each side's ``max|y - y64|`` (Flax only: Equinox's statistics are
kept as a moving average the specification has no single value for).
"""

from __future__ import annotations

import itertools

import equinox as eqx
import flax.linen as nn
import jax
import numpy as np

from bn1d.backends import equinox as bn_eqx
from bn1d.backends import linen as bn_linen

FLAX_CASES = (((16, 8), -1), ((4, 5, 3), -1), ((8, 3, 5), 1), ((64, 256), -1))
EQUINOX_SHAPES = ((16, 8), (16, 8, 5), (16, 3, 4, 4))


def _specification(x: np.ndarray, axis: int, eps: float = 1e-5) -> np.ndarray:
    x = x.astype(np.float64)
    reduced = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    return (x - x.mean(reduced, keepdims=True)) / np.sqrt(x.var(reduced, keepdims=True) + eps)


def _linen(cls: type, x: np.ndarray, axis: int, fast: bool) -> tuple[np.ndarray, ...]:
    module = cls(use_running_average=False, axis=axis, momentum=0.9, use_fast_variance=fast)
    y, updates = module.apply(module.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    return tuple(np.asarray(v) for v in (y, updates["batch_stats"]["mean"], updates["batch_stats"]["var"]))


def _equinox(cls: type, x: np.ndarray, mode: str) -> tuple[np.ndarray, ...]:
    layer, state = eqx.nn.make_with_state(cls)(x.shape[1], "batch", mode=mode, momentum=0.9)
    lanes = dict(in_axes=(0, None), out_axes=(0, None), axis_name="batch")
    first, state = jax.vmap(layer, **lanes)(x, state)
    second, state = jax.vmap(layer, **lanes)(0.5 * x + 1.0, state)
    inference, _ = jax.vmap(eqx.nn.inference_mode(layer), **lanes)(x, state)
    return tuple(np.asarray(v) for v in (first, second, inference))


def flax_rows() -> list[str]:
    rows = []
    for (shape, axis), fast, loc in itertools.product(FLAX_CASES, (True, False), (1.0, 100.0)):
        x = np.random.default_rng(0).normal(loc, 2.0, shape).astype(np.float32)
        ours, flax = _linen(bn_linen.BatchNorm, x, axis, fast), _linen(nn.BatchNorm, x, axis, fast)
        y64 = _specification(x, axis)
        differences = [float(np.abs(a - b).max()) for a, b in zip(ours, flax)]
        errors = [float(np.abs(y - y64).max()) for y in (ours[0], flax[0])]
        cells = [str(shape), str(axis), str(fast), f"{loc / 2.0:g}", *(f"{v:.1e}" for v in differences + errors)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def equinox_rows() -> list[str]:
    rows = []
    for mode, shape in itertools.product(("batch", "ema"), EQUINOX_SHAPES):
        x = np.random.default_rng(2).normal(1.0, 2.0, shape).astype(np.float32)
        differences = [
            np.abs(a - b).max()
            for a, b in zip(_equinox(bn_eqx.BatchNorm, x, mode), _equinox(eqx.nn.BatchNorm, x, mode))
        ]
        rows.append(f"| {mode} | {shape} | " + " | ".join(f"{v:.1e}" for v in differences) + " |")
    return rows


def main() -> None:
    print("| shape | Flax axis | use_fast_variance | abs(mean)/std | y | mean | var | bn1d y - y64 | Flax y - y64 |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(flax_rows()))
    print()
    print("| Equinox mode | examples | y, call 1 | y, call 2 | y, inference |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(equinox_rows()))


if __name__ == "__main__":
    main()
