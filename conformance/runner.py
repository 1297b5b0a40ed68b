"""Running the catalogue against a backend and scoring it against the golden vectors.

Every result is a :class:`Check`: a case, a backend, and over everything the
case compares (outputs after each call, the state after each call, gradients)
the worst ``|got - want| / bound``, each quantity's bound being the one the
contract's accuracy rule implies for it (``tolerances.py``); it passes at <= 1.
``detail`` names the worst quantity with its error and bound. Error cases score
whether the expected exception type was raised, naming the argument, with the
state unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cases import CASES, ERROR_CASES, SYNC_CASES, Case, ErrorCase, SyncCase
from .registry import ConformanceBackend, ReplicaJob
from .tolerances import Bounds, rule_for, worst

__all__ = ["Check", "run_case", "run_error_case", "run_sync_cases", "cross_backend_checks", "run_suite"]


@dataclass
class Check:
    case: str
    backend: str
    error: float | None  # worst error / bound; None: not applicable, or an error case
    tolerance: float | None  # 1.0 for scored cases: the bound itself
    passed: bool | None  # None: not applicable to this backend
    detail: str = ""


def _score(case: str, backend: str, scored: list[tuple[tuple[float, float, float], str]]) -> Check:
    """The worst of ``((error / bound, error, bound), what)``."""
    (ratio, error, bound), where = max(scored, key=lambda item: item[0][0])
    return Check(case, backend, ratio, 1.0, ratio <= 1.0, f"{where}: {error:.1e} against a bound of {bound:.1e}")


def _spec_layer(constructor: dict[str, Any]) -> Any:
    from bn1d.backends.numpy import BatchNorm1d

    return BatchNorm1d(**constructor, dtype=np.float64)


def _bounds(constructor: dict[str, Any], dtype: str, param_dtype: str) -> tuple[Bounds, Any]:
    spec = _spec_layer(constructor)
    bounds = Bounds(dtype=dtype, stats_dtype=param_dtype, state=spec.state_dict(), config=spec.config)
    return bounds, spec


def _not_applicable(case: str, backend: ConformanceBackend, why: str) -> Check:
    return Check(case, backend.name, None, None, None, why)


def _precision(backend: ConformanceBackend, dtype: str) -> Any:
    precision = getattr(backend, "precision", None)
    return contextlib.nullcontext() if precision is None else precision(dtype)


def run_case(backend: ConformanceBackend, case: Case, golden: dict[str, np.ndarray]) -> Check:
    if case.dtype not in backend.dtypes:
        return _not_applicable(case.name, backend, f"no {case.dtype}")
    with _precision(backend, case.dtype):
        return _run_case(backend, case, golden)


def _run_case(backend: ConformanceBackend, case: Case, golden: dict[str, np.ndarray]) -> Check:
    scored: list[tuple[tuple[float, float, float], str]] = []
    try:
        bounds, spec = _bounds(case.constructor(), case.dtype, case.param_dtype)
        layer = backend.make_layer(param_dtype=case.param_dtype, **case.constructor())
        x = mask = None
        for i, step in enumerate(case.steps):
            x64 = golden[f"{case.name}/x{i}"]
            x = backend.asarray(x64, case.dtype)
            raw_mask = golden.get(f"{case.name}/mask{i}")
            mask = None if raw_mask is None else backend.asarray(raw_mask)
            y = layer(x, mask=mask, training=step.training)
            want_y = golden[f"{case.name}/y{i}"]
            training = spec.training if step.training is None else step.training
            bound = bounds.step(x64, raw_mask, training, want_y)
            scored.append((worst(backend.to_numpy(y), want_y, bound["y"]), f"y{i}"))
            got_state = layer.state_dict()
            if set(got_state) != set(spec.config.keys):  # a missing or extra entry is never scored
                detail = f"state{i} keys: expected {list(spec.config.keys)}, got {list(got_state)}"
                return Check(case.name, backend.name, float("inf"), 1.0, False, detail)
            for key, value in got_state.items():
                want = golden[f"{case.name}/state{i}/{key}"]
                scored.append((worst(backend.to_numpy(value), want, bound[key]), f"state{i}/{key}"))
        if case.gradients:
            last = len(case.steps) - 1
            training = case.steps[-1].training
            training = layer.training if training is None else training
            dy64 = golden[f"{case.name}/dy"]
            dy = backend.asarray(dy64, case.dtype)
            raw_mask = golden.get(f"{case.name}/mask{last}")
            grad_bounds = bounds.gradients(
                golden[f"{case.name}/x{last}"], raw_mask, dy64, golden[f"{case.name}/grad/x"]
            )
            for key, value in backend.gradients(layer, x, dy, mask, training).items():
                scored.append((worst(value, golden[f"{case.name}/grad/{key}"], grad_bounds[key]), f"grad/{key}"))
    except Exception as error:  # a crash is a failure of the backend, reported in the table
        return Check(case.name, backend.name, float("inf"), 1.0, False, f"{type(error).__name__}: {error}")
    return _score(case.name, backend.name, scored)


def _bad_input(case: ErrorCase, backend: ConformanceBackend) -> tuple[Any, Any]:
    recipe = case.input
    rng = np.random.default_rng(0)
    x = rng.normal(size=recipe["shape"])
    x = backend.asarray(x.astype(recipe["dtype"]) if "dtype" in recipe else x, recipe.get("dtype", "float32"))
    mask = None
    if "mask_dtype" in recipe or "mask_shape" in recipe:
        shape = recipe.get("mask_shape", recipe["shape"][:-1])
        mask = backend.asarray(np.ones(shape, dtype=recipe.get("mask_dtype", "bool")))
    return x, mask


def _bad_state(case: ErrorCase, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    recipe = case.state
    state = dict(state)
    if "drop" in recipe:
        del state[recipe["drop"]]
    if "add" in recipe:
        state[recipe["add"]] = np.zeros(3)
    if "resize" in recipe:
        state[recipe["resize"]] = np.ones(4)
    if "negate" in recipe:
        state[recipe["negate"]] = -np.ones(3)
    if "overflow" in recipe:  # finite, but beyond float32: it would load as inf
        state[recipe["overflow"]] = np.full(3, 1e39)
    if "set" in recipe:
        key, value = recipe["set"]
        state[key] = np.asarray(value)
    return state


def run_error_case(backend: ConformanceBackend, case: ErrorCase) -> Check:
    def check(fn: Callable[[], Any], layer: Any = None) -> Check:
        before = None if layer is None else {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
        try:
            fn()
        except case.exception as error:
            if not str(error).startswith(f"{case.argument}:"):
                return Check(
                    case.name, backend.name, None, None, False, f"message does not name {case.argument}: {error}"
                )
            if before is not None:
                after = {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
                if any(not np.array_equal(before[k], after[k]) for k in before):
                    return Check(case.name, backend.name, None, None, False, "state changed before the error")
            return Check(case.name, backend.name, None, None, True, case.exception.__name__)
        except Exception as error:
            return Check(case.name, backend.name, None, None, False, f"raised {type(error).__name__}: {error}")
        return Check(case.name, backend.name, None, None, False, f"no {case.exception.__name__} raised")

    with _precision(backend, "float32"):
        return _run_error_case(backend, case, check)


def _run_error_case(backend: ConformanceBackend, case: ErrorCase, check: Callable[..., Check]) -> Check:
    if case.where == "constructor":
        return check(lambda: backend.make_layer(**{"num_features": 3, **case.layer}))
    layer = backend.make_layer(num_features=3, **case.layer)  # here case.layer holds valid extra arguments
    layer(backend.asarray(np.random.default_rng(1).normal(size=(4, 5, 3)), "float32"))  # a state worth protecting
    if case.where == "call":
        x, mask = _bad_input(case, backend)
        return check(lambda: layer(x, mask=mask), layer)
    state = {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
    return check(lambda: layer.load_state_dict(_bad_state(case, state)), layer)


def run_sync_cases(
    backend: ConformanceBackend, golden: dict[str, np.ndarray], cases: Sequence[SyncCase] = SYNC_CASES
) -> list[Check]:
    applicable = [c for c in cases if c.dtype in backend.dtypes]
    checks = [_not_applicable(c.name, backend, f"no {c.dtype}") for c in cases if c not in applicable]
    if not hasattr(backend, "run_replicated"):
        return checks + [_not_applicable(c.name, backend, "no collectives") for c in applicable]
    jobs = []
    for case in applicable:
        per = [f"{case.name}/{r}" for r in range(case.replicas)]
        jobs.append(
            ReplicaJob(
                layer={**case.constructor(), "param_dtype": case.dtype if case.dtype == "float64" else "float32"},
                xs=[golden[f"{p}/x"].astype(case.dtype) for p in per],
                masks=[golden.get(f"{p}/mask") for p in per],
                dys=[golden[f"{p}/dy"] for p in per],
            )
        )
    try:
        results = backend.run_replicated(jobs)
    except Exception as error:
        return checks + [
            Check(c.name, backend.name, float("inf"), 1.0, False, f"{type(error).__name__}: {error}")
            for c in applicable
        ]
    for case, result in zip(applicable, results):
        scored = []
        groups = case.layer.get("axis_index_groups") or [list(range(case.replicas))]
        for r in range(case.replicas):
            prefix = f"{case.name}/{r}"
            group = next(g for g in groups if r in g)
            xs = [golden[f"{case.name}/{q}/x"] for q in group]
            masks = [golden.get(f"{case.name}/{q}/mask") for q in group]
            group_mask = None
            if any(m is not None for m in masks):
                group_mask = np.concatenate(
                    [np.ones(x.shape[:-1], bool) if m is None else m for x, m in zip(xs, masks)]
                )
            param_dtype = case.dtype if case.dtype == "float64" else "float32"
            bounds, spec = _bounds(case.constructor(), case.dtype, param_dtype)
            if set(result.states[r]) != set(spec.config.keys):
                detail = f"state[{r}] keys: expected {list(spec.config.keys)}, got {list(result.states[r])}"
                scored.append(((float("inf"), float("inf"), 0.0), detail))
                continue
            bound = bounds.step(np.concatenate(xs), group_mask, True, golden[f"{prefix}/y"])
            grad_bound = bounds.gradients(golden[f"{prefix}/x"], golden.get(f"{prefix}/mask"), golden[f"{prefix}/dy"],
                                          golden[f"{prefix}/grad/x"])  # fmt: skip
            scored.append((worst(result.ys[r], golden[f"{prefix}/y"], bound["y"]), f"y[{r}]"))
            scored.append((worst(result.x_grads[r], golden[f"{prefix}/grad/x"], grad_bound["x"]), f"grad/x[{r}]"))
            for key, value in result.states[r].items():
                scored.append((worst(value, golden[f"{prefix}/state/{key}"], bound[key]), f"state[{r}]/{key}"))
        checks.append(_score(case.name, backend.name, scored))
    return checks


def cross_backend_checks(backends: Sequence[ConformanceBackend], golden: dict[str, np.ndarray]) -> list[Check]:
    """A state trained on one backend, loaded into another, gives the same outputs:
    both compute inference from the same float32 state, each within ``RULE * |scale|``
    of the exact result, so within twice that of each other."""
    case = next(c for c in CASES if c.name == "three_steps_then_inference")
    checks = []
    for source, target in itertools.permutations(backends, 2):
        name = f"state {source.name} -> {target.name}"
        try:
            trained = source.make_layer(**case.constructor())
            for i in range(3):
                trained(source.asarray(golden[f"{case.name}/x{i}"], case.dtype))
            state = {k: source.to_numpy(v) for k, v in trained.state_dict().items()}
            loaded = target.make_layer(**case.constructor())
            loaded.load_state_dict(state)
            x = golden[f"{case.name}/x3"]
            bound = 2 * rule_for(case.dtype) * np.abs(state.get("scale", np.ones(1)))
            got = target.to_numpy(loaded(target.asarray(x, case.dtype), training=False))
            want = source.to_numpy(trained(source.asarray(x, case.dtype), training=False))
            scored = [(worst(got, want, bound), "y")]
        except Exception as exc:
            checks.append(Check(name, target.name, float("inf"), 1.0, False, f"{type(exc).__name__}: {exc}"))
            continue
        checks.append(_score(name, target.name, scored))
    return checks


def run_suite(
    backends: Sequence[ConformanceBackend],
    golden: dict[str, np.ndarray],
    progress: Callable[[str], None] = lambda message: None,
) -> list[Check]:
    """Every case on every backend, then the synced and cross-backend checks."""
    checks: list[Check] = []
    work: Iterable[tuple[str, Callable[[], Any]]] = [
        *[(f"{b.name}: {c.name}", lambda b=b, c=c: [run_case(b, c, golden)]) for b in backends for c in CASES],
        *[(f"{b.name}: {c.name}", lambda b=b, c=c: [run_error_case(b, c)]) for b in backends for c in ERROR_CASES],
        *[(f"{b.name}: synced cases", lambda b=b: run_sync_cases(b, golden)) for b in backends],
        ("state transfer between backends", lambda: cross_backend_checks(backends, golden)),
    ]
    work = list(work)
    for i, (label, job) in enumerate(work, 1):
        progress(f"[{i}/{len(work)}] {label}")
        checks.extend(job())
    return checks
