"""The accuracy rule of the contract, as metrics: one definition for the tests, the
conformance cases and ``python -m benchmarks.accuracy``.

For float32 input (and half input, in its float32 statistics), against the
float64 computation on the same values, with ``sigma = sqrt(var64)``:

* ``y``: ``max|y - y64|`` (``y`` is O(1): scale 1, bias 0); for float16 and
  bfloat16 outputs the error beyond one ulp of the output dtype (the rounding of
  ``y64`` to it is not the implementation's error);
* ``mean``: ``max(|mean - mean64| - ulp(mean64)) / sigma``, the error of the
  stored statistic beyond one ulp of its storage dtype: a float32 running mean
  cannot hold ``mean64`` closer than half an ulp, 5e-4 sigma at ``|mean| / sigma =
  1e4``, so the rule asks for a faithful rounding of a mean within ``RULE * sigma``;
* ``var``: ``max|var - var64| / var64`` of the running variance after one call
  with ``momentum=0`` (unbiased ``var64 * n / (n - 1)``, or biased for a peer
  whose running variance is biased).

Each must be at most :data:`RULE` for ``|mean| / sigma`` up to 1e4 and ``n`` up to
2**18 values per feature. Gradients, against the float64 specification's vjp:
``dx`` relative to ``|scale| * max|dy| / sqrt(var + eps)`` per feature (its natural
scale), ``dscale`` and ``dbias`` relative to ``sum|dy * xhat|`` and ``sum|dy|``
(the condition of a sum: a relative error of a sum of cancelling terms measures
the cancellation, not the implementation).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["RULE", "gradient_errors", "raw_data", "forward_errors", "spacing", "statistics64"]

#: The contract's accuracy rule, for each metric.
RULE = 1e-5


def raw_data(shape: tuple[int, ...], ratio: float, seed: int, dtype: str = "float32") -> np.ndarray:
    """``ratio + N(0, 1)`` rounded to ``dtype`` (un-centred: ``|mean| / std = ratio``),
    returned as float64 holding exactly the values a backend will see."""
    x = ratio + np.random.default_rng(seed).standard_normal(shape)
    return _round(x, dtype)


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return rounded.astype(np.uint32).view(np.float32).astype(np.float64)
    return np.asarray(x).astype(dtype).astype(np.float64)


def spacing(values: np.ndarray, dtype: str) -> np.ndarray:
    """One ulp of ``dtype`` at ``values`` (bfloat16: float32's times 2**16)."""
    if dtype == "bfloat16":
        return np.spacing(np.abs(np.asarray(values, np.float32))).astype(np.float64) * 2.0**16
    return np.spacing(np.abs(np.asarray(values).astype(dtype))).astype(np.float64)


def _rows(x: np.ndarray, mask: np.ndarray | None, feature_axis: int) -> np.ndarray:
    flat = np.moveaxis(np.asarray(x, np.float64), feature_axis, -1).reshape(-1, x.shape[feature_axis])
    return flat if mask is None else flat[np.asarray(mask).reshape(-1)]


def statistics64(x: np.ndarray, mask: np.ndarray | None, feature_axis: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n, mean, biased var)`` per feature in float64 (two-pass, of the kept values)."""
    rows = _rows(x, mask, feature_axis)
    mean = rows.mean(axis=0)
    return rows.shape[0], mean, np.square(rows - mean).mean(axis=0)


def forward_errors(
    x: np.ndarray,
    y: Any,
    running_mean: Any,
    running_var: Any,
    *,
    feature_axis: int,
    mask: np.ndarray | None = None,
    epsilon: float = 1e-5,
    unbiased: bool = True,
    y_dtype: str = "float32",
    stats_dtype: str = "float32",
) -> dict[str, float]:
    """The three metrics for one training call with ``momentum=0``, scale 1 and bias 0
    (``x``, ``mask`` as given to the layer; ``y`` and the running statistics as it returned)."""
    n, mean, var = statistics64(x, mask, feature_axis)
    shape = [1] * np.ndim(x)
    shape[feature_axis] = -1
    y64 = (np.asarray(x, np.float64) - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
    y_err = np.abs(np.asarray(y, np.float64) - y64)
    if y_dtype in ("float16", "bfloat16"):
        y_err = np.maximum(y_err - spacing(y64, y_dtype), 0.0)
    sigma = np.sqrt(var)
    mean_err = np.maximum(np.abs(np.asarray(running_mean, np.float64) - mean) - spacing(mean, stats_dtype), 0.0)
    var_ref = var * (n / (n - 1) if unbiased else 1.0)
    var_err = np.abs(np.asarray(running_var, np.float64) - var_ref) / var_ref
    return {"y": float(y_err.max()), "mean": float(np.max(mean_err / sigma)), "var": float(var_err.max())}


def gradient_errors(
    x: np.ndarray,
    dy: np.ndarray,
    grads: dict[str, Any],
    want: dict[str, np.ndarray],
    *,
    feature_axis: int,
    mask: np.ndarray | None = None,
    epsilon: float = 1e-5,
) -> dict[str, float]:
    """``dx``, ``dscale`` and ``dbias`` errors against the float64 specification's
    ``want`` (scale 1: ``|scale|`` drops out of the normalisation)."""
    _, mean, var = statistics64(x, mask, feature_axis)
    axes = tuple(a for a in range(np.ndim(x)) if a != feature_axis)
    shape = [1] * np.ndim(x)
    shape[feature_axis] = -1
    invstd = 1.0 / np.sqrt(var + epsilon)
    xhat = (np.asarray(x, np.float64) - mean.reshape(shape)) * invstd.reshape(shape)
    dy = np.asarray(dy, np.float64)
    scale_dx = (invstd * np.abs(dy).max(axis=axes)).reshape(shape)
    errors = {"dx": float(np.max(np.abs(np.asarray(grads["x"], np.float64) - want["x"]) / scale_dx))}
    for key, terms in (("scale", dy * xhat), ("bias", dy)):
        if key in grads:
            error = np.abs(np.asarray(grads[key], np.float64) - want[key]) / np.abs(terms).sum(axis=axes)
            errors[f"d{key}"] = float(error.max())
    return errors
