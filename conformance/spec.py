"""The numbered rules of ``docs/spec.md``, as data: what ``--coverage`` maps to cases.

``docs/spec.md`` is the normative text; this is its index (a test keeps the two in
step). Every case of the catalogue names the rules it checks (``Case.rules``), and
``python -m bn1d.conformance --coverage`` fails when a rule has no case.
"""

from __future__ import annotations

__all__ = ["RULES", "SPEC_VERSION", "SUITE_VERSION"]

#: The version of ``docs/spec.md`` the suite checks.
SPEC_VERSION = "1.0"
#: The suite's own version (its cases, bounds and adapters).
SUITE_VERSION = "1.2"

RULES: dict[str, str] = {
    "R1.1": "BrainPy's signature and defaults on every backend",
    "R1.2": "num_features: a positive int",
    "R1.3": "axis: the reduced axes, any layout, negative axes",
    "R1.4": "epsilon: finite and > 0, inside the square root",
    "R1.5": "momentum: the old statistic's weight, in [0, 1] or None",
    "R1.6": "affine=False: no scale or bias at all",
    "R1.7": "initializers: callable, array or scalar",
    "R1.8": "mode, train()/eval() and the per-call training flag",
    "R1.9": "keyword-only options; unknown keywords are a TypeError",
    "R2.1": "training: batch mean, biased two-pass variance, BrainPy's y",
    "R2.2": "fast_variance: BrainPy's one-pass formula, clamped at 0",
    "R2.3": "gradients through mean and var, none into the running statistics",
    "R2.4": "inference: the running statistics, nothing changes",
    "R2.5": "dtypes: half reduced in float32, float64 in float64, y in the input's dtype",
    "R2.6": "integer, boolean or complex input: TypeError",
    "R2.7": "the accuracy rule: 1e-5 on raw float32 data up to n = 2**18, |mean|/std = 1e4",
    "R3.1": "running statistics start at mean 0, variance 1",
    "R3.2": "running mean update with momentum",
    "R3.3": "unbiased running variance with the global count",
    "R3.4": "unbiased_running_var=False: the biased update",
    "R3.5": "n == 1: ValueError from the shape; no Bessel factor at run time",
    "R3.6": "n == 0: inference for the call, nothing NaN",
    "R3.7": "momentum=None: the cumulative average, counted in num_batches_tracked",
    "R3.8": "track_running_stats=False: batch statistics always, no running statistics",
    "R4.1": "synced statistics: the concatenated batches, count-weighted",
    "R4.2": "synced variance as stable as unsynced",
    "R4.3": "axis_index_groups: each group separately; bad groups are a ValueError",
    "R4.4": "synced input gradients: those of the global batch",
    "R4.5": "inference never communicates",
    "R5.1": "masks exclude positions from the statistics; all positions are normalised",
    "R5.2": "mask errors: wrong shape ValueError, non-boolean TypeError",
    "R6.1": "the state's keys",
    "R6.2": "strict loading",
    "R6.3": "atomic loading",
    "R6.4": "a state moves between backends",
    "R6.5": "a layer's own state_dict always loads back, bit for bit",
    "R6.6": "finite values a dtype cannot hold are an error",
    "R6.7": "PyTorch, Flax and BrainPy state converters",
    "R7.1": "errors name the argument, the expectation and the value, before any change",
    "R8.1": "BrainPy 2.8.2's reference numbers",
}
