"""The catalogue's checks that are not a sequence of calls against golden vectors
(``cases.CHECK_CASES``): one function per check, each ``(backend) -> Check``.

Bounds come from the same accuracy rule (``tolerances.py``); a check that asserts a
property rather than a value says why in its docstring.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np

from bn1d.backends.formats import (
    from_brainpy,
    from_flax_variables,
    from_torch_state_dict,
    to_brainpy,
    to_flax_variables,
    to_torch_state_dict,
)

from .registry import ConformanceBackend
from .tolerances import Bounds, worst

__all__ = ["CHECKS", "Check", "quantity", "score"]

Scored = list[tuple[tuple[float, float, float], str]]


class Check:
    """One result: a case on a backend. ``error`` is the worst error / bound (``None``
    for a pass/fail check), ``passed`` ``None`` when not applicable; ``xfail`` the
    reason when the backend's expected-failure list names the case."""

    __slots__ = ("case", "backend", "error", "tolerance", "passed", "detail", "xfail", "differs")

    def __init__(self, case: str, backend: str, error: float | None, tolerance: float | None,
                 passed: bool | None, detail: str = "", xfail: str | None = None,
                 differs: tuple[str, ...] = ()):  # fmt: skip
        self.case, self.backend, self.error, self.tolerance = case, backend, error, tolerance
        self.passed, self.detail, self.xfail, self.differs = passed, detail, xfail, differs

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"Check({self.as_dict()})"


def quantity(label: str) -> str:
    """What a scored label measures, without its step or replica: ``state2/running_var``
    is ``running_var``, ``y0`` is ``y``, ``grad/x[3]`` is ``grad x``."""
    label = re.sub(r"\[\d+\]", "", label)
    label = re.sub(r"^state\d*/", "", label)
    label = re.sub(r"^(y)\d+$", r"\1", label)
    return label.replace("/", " ")


def score(case: str, backend: str, scored: Scored) -> Check:
    """The worst of ``((error / bound, error, bound), what)``; ``differs`` lists the
    quantities over their bounds."""
    (ratio, error, bound), where = max(scored, key=lambda item: item[0][0])
    differs = tuple(dict.fromkeys(quantity(label) for (r, _, _), label in scored if not r <= 1.0))
    detail = f"{where}: {error:.1e} against a bound of {bound:.1e}"
    return Check(case, backend, ratio, 1.0, ratio <= 1.0, detail, differs=differs)


def _spec(**constructor: Any) -> Any:
    from bn1d.backends.numpy import BatchNorm1d

    return BatchNorm1d(**constructor, dtype=np.float64)


def _state(backend: ConformanceBackend, layer: Any) -> dict[str, np.ndarray]:
    return {key: backend.to_numpy(value) for key, value in layer.state_dict().items()}


def brainpy_reference_numbers(backend: ConformanceBackend) -> Check:
    """R8.1: BrainPy 2.8.2's float32 numbers for its documented input, and BrainPy
    2.7.8's biased running variance (``unbiased_running_var=False``). BrainPy's own
    float32 error here (sums of 20 values of O(1): ~1e-7 relative) is far inside the
    rule's bounds, so its numbers are scored against them like the specification's."""
    x = np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32)
    x64 = x.astype(np.float64)
    references: list[tuple[dict[str, Any], Any, Any]] = [
        ({}, [0.000187764846, 0.000142188437, 0.00198892271], [1.00352418, 0.99599659, 0.99568027]),
        ({"fast_variance": True, "unbiased_running_var": False}, None, [1.00284791, 0.99569672, 0.99539626]),
    ]
    y_reference = [0.59750485, -1.58767688, -1.17151904]
    scored: Scored = []
    for options, mean, var in references:
        spec = _spec(num_features=3, **options)
        bounds = Bounds(dtype="float32", stats_dtype="float32", state=spec.state_dict(), config=spec.config)
        bound = bounds.step(x64, None, True, spec(x64))
        layer = backend.make_layer(num_features=3, **options)
        y = backend.to_numpy(layer(backend.asarray(x, "float32")))
        state = _state(backend, layer)
        label = "default" if not options else "fast, biased"
        if mean is not None:
            scored.append((worst(state["running_mean"], np.array(mean), bound["running_mean"]), f"{label} mean"))
            scored.append((worst(y[3, 4], np.array(y_reference), bound["y"][3, 4]), f"{label} y[3, 4]"))
        scored.append((worst(state["running_var"], np.array(var), bound["running_var"]), f"{label} var"))
    return score("brainpy_reference_numbers", backend.name, scored)


def fast_variance_cancels(backend: ConformanceBackend) -> Check:
    """R2.2 as properties: at ``|mean| / std = 1e6`` in float32 the one-pass formula is
    a difference of two values near 1e12 whose ulp is 65536, so it cannot come within a
    factor 2 of the true variance (about 1) on any feature, and it is clamped: never
    negative, ``y`` finite. An exact variance, float64 sums or a missing clamp fail it
    (without the clamp about half of 16 features go negative)."""
    rng = np.random.default_rng(7)
    x = (1e6 + rng.standard_normal((4, 256, 16))).astype(np.float32)
    true_var = x.astype(np.float64).reshape(-1, 16).var(axis=0, ddof=1)
    layer = backend.make_layer(num_features=16, fast_variance=True, momentum=0.0)
    y = backend.to_numpy(layer(backend.asarray(x, "float32")))
    var = _state(backend, layer)["running_var"]
    accurate = np.abs(var - true_var) < 0.5 * true_var
    problems = {}  # label: message
    if np.any(accurate):
        problems["exact variance"] = (f"the variance is accurate on {int(np.sum(accurate))} features: "
                                      "not the one-pass formula in float32")  # fmt: skip
    if np.any(var < 0):
        problems["no clamp"] = f"negative variance {float(var.min()):.3g}: not clamped at 0"
    if not np.all(np.isfinite(y)):
        problems["non-finite y"] = "non-finite y"
    return Check("fast_variance_cancels", backend.name, None, None, not problems,
                 "; ".join(problems.values()) or "ok", differs=tuple(problems))  # fmt: skip


def round_trip_after_nan(backend: ConformanceBackend) -> Check:
    """R6.5: a layer that trained on NaN loads its own state_dict, bit for bit, with a
    RuntimeWarning; so does a fresh layer."""
    x = np.random.default_rng(3).standard_normal((4, 5, 3)).astype(np.float32)
    x[0, 0, 1] = np.nan
    layer = backend.make_layer(num_features=3)
    layer(backend.asarray(x, "float32"))
    saved = layer.state_dict()
    before = _state(backend, layer)
    if not np.isnan(before["running_mean"][1]):
        return Check("round_trip_after_nan", backend.name, None, None, False, "a NaN input left the statistics finite",
                     differs=("NaN ignored",))  # fmt: skip
    for target, label in ((layer, "itself"), (backend.make_layer(num_features=3), "a fresh layer")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                target.load_state_dict(saved)
            except Exception as error:
                return Check("round_trip_after_nan", backend.name, None, None, False,
                             f"loading into {label} raised {type(error).__name__}: {error}",
                             differs=(f"raised {type(error).__name__}",))  # fmt: skip
        if not any(issubclass(w.category, RuntimeWarning) for w in caught):
            return Check("round_trip_after_nan", backend.name, None, None, False, f"no RuntimeWarning ({label})",
                         differs=("no warning",))  # fmt: skip
        after = _state(backend, target)
        if any(not np.array_equal(before[k], after[k], equal_nan=True) for k in before):
            return Check("round_trip_after_nan", backend.name, None, None, False, f"values changed ({label})",
                         differs=("values changed",))  # fmt: skip
    return Check("round_trip_after_nan", backend.name, None, None, True, "loads, warns, bit for bit")


def _brainpy_round_trip(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our state written into a BrainPy-like layer (variables with ``.value``) and read back."""
    layer = SimpleNamespace(affine="scale" in state)
    for key in state:
        setattr(layer, key, SimpleNamespace(value=np.zeros_like(state[key])))
    to_brainpy(state, layer)
    return from_brainpy(layer)


def state_through_converters(backend: ConformanceBackend) -> Check:
    """R6.7: a trained state through PyTorch's keys, Flax's variables and a BrainPy
    layer's variables loads back and gives the same inference outputs (the same
    float32 state on the same backend: equal within twice the rule)."""
    from .accuracy import RULE

    rng = np.random.default_rng(4)
    layer = backend.make_layer(num_features=3, momentum=0.5)
    for loc in (1.0, -2.0):
        layer(backend.asarray(loc + rng.standard_normal((4, 5, 3)), "float32"))
    state = _state(backend, layer)
    x = backend.asarray(rng.standard_normal((4, 5, 3)), "float32")
    want = backend.to_numpy(layer(x, training=False))
    converters: dict[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] = {
        "pytorch": lambda s: from_torch_state_dict(to_torch_state_dict(s, 2)),
        "flax": lambda s: from_flax_variables(to_flax_variables(s)),
        "brainpy": _brainpy_round_trip,
    }
    scored: Scored = []
    for name, convert in converters.items():
        loaded = backend.make_layer(num_features=3, momentum=0.5)
        loaded.load_state_dict(convert(state))
        got = backend.to_numpy(loaded(x, training=False))
        scored.append((worst(got, want, 2 * RULE * np.abs(state["scale"])), name))
    return score("state_through_converters", backend.name, scored)


def per_call_training_flag(backend: ConformanceBackend) -> Check:
    """R1.8, R2.4: ``eval()``, a call, ``training=True`` for one call, ``train()``, a
    ``training=False`` call, a call; each output and state against the specification
    driven the same way (the mode after each step must be the expected one)."""
    spec = _spec(num_features=3, momentum=0.6)
    bounds = Bounds(dtype="float32", stats_dtype="float32", state=spec.state_dict(), config=spec.config)
    layer = backend.make_layer(num_features=3, momentum=0.6)
    rng = np.random.default_rng(5)
    scored: Scored = []
    steps: list[tuple[str, bool | None, bool]] = [
        ("eval", None, False), ("call", True, False), ("train", None, True), ("call", False, True), ("call", None, True)
    ]  # fmt: skip
    for i, (action, training, mode) in enumerate(steps):
        if action in ("eval", "train"):
            getattr(layer, action)()
            getattr(spec, action)()
        x = (1.0 + i + rng.standard_normal((4, 5, 3))).astype(np.float32)
        x64 = x.astype(np.float64)
        want = spec(x64, training=training)
        got = backend.to_numpy(layer(backend.asarray(x, "float32"), training=training))
        bound = bounds.step(x64, None, spec.training if training is None else training, want)
        if bool(layer.training) != mode:
            return Check("per_call_training_flag", backend.name, float("inf"), 1.0, False,
                         f"step {i}: training is {layer.training}, expected {mode}")  # fmt: skip
        scored.append((worst(got, want, bound["y"]), f"y{i}"))
        for key, value in _state(backend, layer).items():
            scored.append((worst(value, spec.state_dict()[key], bound[key]), f"state{i}/{key}"))
    return score("per_call_training_flag", backend.name, scored)


#: The single-backend checks by case name (``state_transfer`` needs two backends:
#: ``runner.cross_backend_checks``).
CHECKS: dict[str, Callable[[ConformanceBackend], Check]] = {
    "brainpy_reference_numbers": brainpy_reference_numbers,
    "fast_variance_cancels": fast_variance_cancels,
    "round_trip_after_nan": round_trip_after_nan,
    "state_through_converters": state_through_converters,
    "per_call_training_flag": per_call_training_flag,
}
