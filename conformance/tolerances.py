"""Every tolerance of the suite, derived from the contract's accuracy rule.

The rule (``bn1d.conformance.accuracy``) bounds three errors of a float32
training call by ``RULE = 1e-5``: ``y`` (absolute, at scale 1), the mean (in units
of the batch's ``sigma``, beyond one ulp of its storage) and the variance
(relative). A case compares more than that (several steps, inference, the
running statistics, gradients, any scale), so each compared quantity gets the
bound that the rule implies for it, carried through the case's steps:

* ``y`` of a training call: ``RULE * |scale|``; of an inference call (or one that
  sees no data), the running statistics' bounds propagated through
  ``(x - mean) * scale / sqrt(var + eps)`` plus ``RULE * |scale|`` for the
  arithmetic; float16/bfloat16 outputs add one ulp of the output dtype;
* ``running_mean`` after a training call with momentum ``m`` (``1 - 1/k`` for the
  ``k``-th call with data of the cumulative average, ``momentum=None``):
  ``m * (its bound before) + (1 - m) * RULE * sigma + 2 u (m |old| + (1 - m) |mean|)
  + ulp``; ``running_var``: ``m * (before) + (1 - m) * RULE * var * n / (n - 1) + 2 u
  (its two terms) + ulp`` (``2 u`` of the terms: the update's products and the
  momentum's rounding in the compute dtype, which a backend without float64 computes
  in; ulp: of the statistic's dtype, the storage rounding the rule excludes); ``scale``/``bias``
  one ulp (a forward call never changes them); ``num_batches_tracked`` exactly;
  without running statistics (``track_running_stats=False``) every call is scored
  as a training call;
* gradients, in the rule's gradient metrics: ``dx`` within ``RULE * |scale| *
  max|dy| / sqrt(var + eps)`` per feature (plus the running variance's bound in
  inference), ``dscale`` and ``dbias`` within ``RULE`` times ``sum|dy * xhat|`` and
  ``sum|dy|``.

float64 computations get the same bounds with ``RULE64 = RULE * 2**-29`` (the
ratio of the unit roundoffs, 2**-53 / 2**-24). A case whose data lie beyond the
rule's range (``|mean| / sigma`` above 1e4) scales ``RULE`` by its ratio over 1e4:
errors of the shifted algorithm grow no faster than that.

The report prints each error over its bound: a backend's worst errors sit well inside
them, while a 1e-5 relative error in the momentum arithmetic or a per-replica Bessel
factor is far over (``tests/mutants`` plants such bugs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .accuracy import RULE, _rows, spacing

__all__ = ["RULE64", "Bounds", "rule_for", "worst"]

RULE64 = RULE * 2.0**-29
_RANGE = 1e4  # the rule's |mean| / sigma range


def rule_for(compute_dtype: str, ratio: float = 0.0) -> float:
    """The rule in the compute dtype, scaled beyond the rule's ``|mean| / sigma`` range."""
    base = RULE64 if compute_dtype == "float64" else RULE
    return base * max(1.0, ratio / _RANGE)


class Bounds:
    """Tolerances for one layer's sequence of calls.

    ``dtype``: the input's; ``stats_dtype``: the running statistics' (and the
    parameters'). Call :meth:`step` once per call, in order, with the float64
    inputs; it returns the tolerances of that call's ``y`` and of the state after
    it; :meth:`gradients` those of the gradients at the last call's inputs.
    """

    def __init__(self, *, dtype: str, stats_dtype: str, state: dict[str, np.ndarray], config: Any):
        self.dtype, self.stats_dtype, self.feature_axis = dtype, stats_dtype, config.feature_axis
        self.compute = "float64" if "float64" in (dtype, stats_dtype) else "float32"
        num_features = config.num_features
        self.scale = np.asarray(state.get("scale", np.ones(num_features)), np.float64)
        self.bias = np.asarray(state.get("bias", np.zeros(num_features)), np.float64)
        self.epsilon, self.momentum, self.unbiased = config.epsilon, config.momentum, config.unbiased_running_var
        self.fast, self.tracked = config.fast_variance, config.track_running_stats
        self.calls = 0  # training calls with data: the cumulative average's k
        # Without running statistics, mean 0 and variance 1 stand in for them, exactly.
        self.mean = np.asarray(state.get("running_mean", np.zeros(num_features)), np.float64)
        self.var = np.asarray(state.get("running_var", np.ones(num_features)), np.float64)
        # Bounds on the running statistics' errors so far, their storage roundings included.
        exact = np.zeros(num_features)
        self.mean_bound = spacing(self.mean, stats_dtype) if self.tracked else exact
        self.var_bound = spacing(self.var, stats_dtype) if self.tracked else exact
        self.last: dict[str, Any] = {}

    def _shape(self, ndim: int) -> list[int]:
        shape = [1] * ndim
        shape[self.feature_axis] = -1
        return shape

    def _rounding(self, want_y: np.ndarray) -> np.ndarray:
        """The rule is stated for O(1) outputs; beyond, ``y = (x - K) * f + (bias - d * f)``
        carries the compute dtype's relative rounding: 8 u |y - bias| (about six roundings)."""
        unit = 2.0**-53 if self.compute == "float64" else 2.0**-24
        return 8 * unit * np.abs(want_y - self.bias.reshape(self._shape(want_y.ndim)))

    def step(self, x: np.ndarray, mask: np.ndarray | None, training: bool, want_y: np.ndarray) -> dict[str, Any]:
        """Tolerances of ``y`` (elementwise) and of the state after this call."""
        rows = _rows(x, mask, self.feature_axis)
        n = rows.shape[0]
        shape = self._shape(x.ndim)
        scale = np.maximum(np.abs(self.scale), 1e-30)
        if (training or not self.tracked) and n > 0:  # the batch's statistics normalise
            mean = rows.mean(axis=0)
            var = np.square(rows - mean).mean(axis=0)
            sigma = np.sqrt(var)
            ratio = float(np.max(np.where(sigma > 0, np.abs(mean) / np.where(sigma > 0, sigma, 1.0), 0.0)))
            rule = rule_for(self.compute, ratio) * ((1.0 + ratio * ratio) if self.fast else 1.0)
            y_bound = (rule * scale).reshape(shape) + self._rounding(want_y)
            if training and self.tracked:
                self.calls += 1
                m = 1.0 - 1.0 / self.calls if self.momentum is None else self.momentum
                bessel = n / (n - 1) if self.unbiased and n > 1 else 1.0
                # the update's own arithmetic in the compute dtype (a backend without float64,
                # JAX by default, forms m * old + (1 - m) * new in float32): each product and
                # the momentum's rounding, 2 u of each term's size
                unit = 2.0**-53 if self.compute == "float64" else 2.0**-24
                mean_terms = m * np.abs(self.mean) + (1 - m) * np.abs(mean)
                var_terms = m * self.var + (1 - m) * var * bessel
                self.mean = m * self.mean + (1 - m) * mean
                self.var = m * self.var + (1 - m) * var * bessel
                self.mean_bound = (
                    m * self.mean_bound + (1 - m) * rule * sigma + 2 * unit * mean_terms
                    + spacing(self.mean, self.stats_dtype)
                )  # fmt: skip
                self.var_bound = (
                    m * self.var_bound + (1 - m) * rule * var * bessel + 2 * unit * var_terms
                    + spacing(self.var, self.stats_dtype)
                )  # fmt: skip
            self.last = {"mean": mean, "var": var, "rule": rule, "training": True}
        else:  # the running statistics' bounds, through y
            rule = rule_for(self.compute)
            s2 = (self.var + self.epsilon).reshape(shape)
            y_bound = (scale.reshape(shape) / np.sqrt(s2)) * self.mean_bound.reshape(shape)
            y_bound = y_bound + np.abs(want_y - self.bias.reshape(shape)) / (2 * s2) * self.var_bound.reshape(shape)
            y_bound = y_bound + (rule * scale).reshape(shape) + self._rounding(want_y)
            self.last = {"mean": self.mean, "var": self.var, "rule": rule, "training": False}
        if self.dtype in ("float16", "bfloat16"):
            y_bound = y_bound + spacing(want_y, self.dtype)
        return {
            "y": y_bound,
            "running_mean": self.mean_bound,
            "running_var": self.var_bound,
            "num_batches_tracked": 0.0,  # an integer count: exact
            "scale": spacing(self.scale, self.stats_dtype),
            "bias": spacing(self.bias, self.stats_dtype),
        }

    def gradients(self, x: np.ndarray, mask: np.ndarray | None, dy: np.ndarray, want_dx: np.ndarray) -> dict[str, Any]:
        """Tolerances of the gradients at the last call's inputs (``x``, ``mask``, ``dy``)."""
        last = self.last
        shape = self._shape(x.ndim)
        axes = tuple(a for a in range(x.ndim) if a != self.feature_axis)
        s = np.sqrt(last["var"] + self.epsilon)
        xhat = (np.asarray(x, np.float64) - last["mean"].reshape(shape)) / s.reshape(shape)
        dy = np.asarray(dy, np.float64)
        rule = last["rule"]
        sum_dy, sum_dy_xhat = np.abs(dy).sum(axis=axes), np.abs(dy * xhat).sum(axis=axes)
        dx_bound = rule * np.maximum(np.abs(self.scale), 1e-30) * np.abs(dy).max(axis=axes) / s
        dx_bound = np.broadcast_to(dx_bound.reshape(shape), want_dx.shape)
        dscale_bound = rule * sum_dy_xhat
        if not last["training"]:  # the running statistics' bounds, through the gradients
            relative_var = self.var_bound / (2 * s * s)
            dx_bound = dx_bound + np.abs(want_dx) * relative_var.reshape(shape)
            dscale_bound = dscale_bound + sum_dy * self.mean_bound / s + sum_dy_xhat * relative_var
        if self.dtype in ("float16", "bfloat16"):
            dx_bound = dx_bound + spacing(want_dx, self.dtype)
        return {
            "x": dx_bound,
            "scale": dscale_bound + spacing(sum_dy_xhat, self.stats_dtype),
            "bias": rule * sum_dy + spacing(sum_dy, self.stats_dtype),
        }


def worst(got: Any, want: np.ndarray, bound: Any) -> tuple[float, float, float]:
    """``(max |got - want| / bound, |got - want| there, bound there)``; inf for a shape
    mismatch or a non-finite value where the reference is finite."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf"), float("inf"), 0.0
    if want.size == 0:
        return 0.0, 0.0, 0.0
    error = np.abs(got - want)
    bound = np.broadcast_to(np.asarray(bound, np.float64), error.shape)
    ratio = np.where(error == 0, 0.0, error / np.maximum(bound, 1e-300))
    ratio = np.where(np.isfinite(ratio), ratio, np.inf)
    i = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    return float(ratio[i]), float(error[i]), float(bound[i])
