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
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .cases import CASES, CHECK_CASES, ERROR_CASES, SYNC_CASES, Case, ErrorCase, SyncCase
from .checks import CHECKS, Check, score
from .registry import ConformanceBackend, NotApplicable, ReplicaJob
from .tolerances import Bounds, rule_for, spacing, worst

__all__ = [
    "Check",
    "cross_backend_checks",
    "run_case",
    "run_check_case",
    "run_error_case",
    "run_suite",
    "run_sync_cases",
]


def dtype_name(array: Any) -> str:
    """``array``'s dtype as a NumPy-style name ("float32", "bfloat16") on any library."""
    dtype = array.dtype
    return getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1]


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
        try:
            return _run_case(backend, case, golden)
        except NotApplicable as reason:
            return _not_applicable(case.name, backend, str(reason))


def _initial_state(backend: ConformanceBackend, layer: Any, spec: Any, stats_dtype: str) -> list[Any]:
    """R3.1 and R6.1 before any call: the keys, and the values within one ulp."""
    state = layer.state_dict()
    if set(state) != set(spec.config.keys):
        raise _Failed(f"initial state keys: expected {list(spec.config.keys)}, got {list(state)}", "state keys")
    _check_state_dtypes(state, stats_dtype, "initial")
    want = spec.state_dict()
    return [
        (worst(backend.to_numpy(v), want[k], spacing(want[k], stats_dtype)), f"initial/{k}") for k, v in state.items()
    ]


def _check_state_dtypes(state: dict[str, Any], param_dtype: str, where: str) -> None:
    """R2.5, R3.1: parameters and running statistics keep the parameters' dtype (the
    count is an integer), whatever the input's."""
    for key, value in state.items():
        got = dtype_name(value)
        if key == "num_batches_tracked" and not got.startswith(("int", "uint")):
            raise _Failed(f"{where}/{key} is {got}, expected an integer", "state dtype")
        if key != "num_batches_tracked" and got != param_dtype:
            raise _Failed(f"{where}/{key} is {got}, expected the parameters' {param_dtype}", "state dtype")


class _Failed(Exception):
    """A case failed in a way that is not a number: ``what`` (the state's keys, the
    output dtype, the gradients' keys)."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


def _run_case(backend: ConformanceBackend, case: Case, golden: dict[str, np.ndarray]) -> Check:
    scored: list[tuple[tuple[float, float, float], str]] = []
    unscored = ""
    try:
        bounds, spec = _bounds(case.constructor(), case.dtype, case.param_dtype)
        layer = backend.make_layer(param_dtype=case.param_dtype, **case.constructor())
        scored.extend(_initial_state(backend, layer, spec, case.param_dtype))
        x = mask = None
        for i, step in enumerate(case.steps):
            x64 = golden[f"{case.name}/x{i}"]
            x = backend.asarray(x64, case.dtype)
            raw_mask = golden.get(f"{case.name}/mask{i}")
            mask = None if raw_mask is None else backend.asarray(raw_mask)
            y = layer(x, mask=mask, training=step.training)
            if dtype_name(y) != case.dtype:
                raise _Failed(f"y{i} is {dtype_name(y)}, expected the input's {case.dtype}", "output dtype")
            want_y = golden[f"{case.name}/y{i}"]
            training = spec.training if step.training is None else step.training
            bound = bounds.step(x64, raw_mask, training, want_y)
            scored.append((worst(backend.to_numpy(y), want_y, bound["y"]), f"y{i}"))
            got_state = layer.state_dict()
            if set(got_state) != set(spec.config.keys):  # a missing or extra entry is never scored
                raise _Failed(f"state{i} keys: expected {list(spec.config.keys)}, got {list(got_state)}", "state keys")
            _check_state_dtypes(got_state, case.param_dtype, f"state{i}")
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
            try:
                grads = backend.gradients(layer, x, dy, mask, training)
            except NotApplicable as reason:  # a backend without gradients: the rest is scored, and says so
                unscored, grads = f"gradients not scored ({reason})", None
            want_keys = {"x", *spec.config.param_keys}
            if grads is not None and set(grads) != want_keys:
                raise _Failed(f"gradients of {sorted(grads)}, expected {sorted(want_keys)}", "gradient keys")
            for key, value in (grads or {}).items():
                scored.append((worst(value, golden[f"{case.name}/grad/{key}"], grad_bounds[key]), f"grad/{key}"))
    except NotApplicable:
        raise
    except _Failed as failure:
        return Check(case.name, backend.name, float("inf"), 1.0, False, str(failure), differs=(failure.what,))
    except Exception as error:  # a crash is a failure of the backend, reported in the table
        return _crashed(case.name, backend, error)
    check = score(case.name, backend.name, scored)
    if unscored:
        check.detail = f"{check.detail}; {unscored}"
    return check


def _crashed(case: str, backend: ConformanceBackend, error: Exception) -> Check:
    return Check(case, backend.name, float("inf"), 1.0, False, f"{type(error).__name__}: {error}",
                 differs=(f"raised {type(error).__name__}",))  # fmt: skip


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
        except NotApplicable as reason:
            return _not_applicable(case.name, backend, str(reason))
        except case.exception as error:
            if not re.match(rf"{re.escape(case.argument)}: expected .+, got .+", str(error), re.S):
                return Check(
                    case.name, backend.name, None, None, False,
                    f"message is not '{case.argument}: expected ..., got ...': {error}", differs=("message",),
                )  # fmt: skip
            if before is not None:
                after = {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
                if set(after) != set(before) or any(not np.array_equal(before[k], after[k]) for k in before):
                    return Check(case.name, backend.name, None, None, False, "state changed before the error",
                                 differs=("state changed",))  # fmt: skip
            return Check(case.name, backend.name, None, None, True, case.exception.__name__)
        except Exception as error:
            return Check(case.name, backend.name, None, None, False, f"raised {type(error).__name__}: {error}",
                         differs=(f"raised {type(error).__name__}",))  # fmt: skip
        return Check(case.name, backend.name, None, None, False, f"no {case.exception.__name__} raised",
                     differs=("not raised",))  # fmt: skip

    with _precision(backend, "float32"):
        try:
            return _run_error_case(backend, case, check)
        except NotApplicable as reason:
            return _not_applicable(case.name, backend, str(reason))


def _run_error_case(backend: ConformanceBackend, case: ErrorCase, check: Callable[..., Check]) -> Check:
    if case.where == "constructor":
        return check(lambda: backend.make_layer(**{"num_features": 3, **case.layer}))
    layer = backend.make_layer(num_features=3, **case.layer)  # here case.layer holds valid extra arguments
    layer(backend.asarray(np.random.default_rng(1).normal(size=(4, 5, 3)), "float32"))  # a state worth protecting
    if case.where == "call":
        x, mask = _bad_input(case, backend)
        return check(lambda: layer(x, mask=mask), layer)
    # Every other entry differs from the current state, so a load that applies some
    # entries before it raises shows (R6.3).
    state = {k: backend.to_numpy(v) + 1 for k, v in layer.state_dict().items()}
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
        results = _replicated(backend, jobs)
    except Exception as error:
        return checks + [
            Check(c.name, backend.name, float("inf"), 1.0, False, f"{type(error).__name__}: {error}")
            for c in applicable
        ]
    if len(results) != len(jobs):  # a case without a result would vanish from the report
        detail = f"run_replicated returned {len(results)} results for {len(jobs)} jobs"
        return checks + [Check(c.name, backend.name, float("inf"), 1.0, False, detail) for c in applicable]
    for case, result in zip(applicable, results):
        if isinstance(result, NotApplicable):
            checks.append(_not_applicable(case.name, backend, str(result)))
            continue
        sizes = {len(result.ys), len(result.x_grads), len(result.states)}
        if sizes != {case.replicas}:
            detail = f"results for {sorted(sizes)} replicas, expected {case.replicas}"
            checks.append(Check(case.name, backend.name, float("inf"), 1.0, False, detail))
            continue
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
        checks.append(score(case.name, backend.name, scored))
    return checks


def _replicated(backend: ConformanceBackend, jobs: list[ReplicaJob]) -> list[Any]:
    """Every job's result, all in one call (a backend may start processes for them);
    when some cannot be expressed, each job alone, those as :class:`NotApplicable`."""
    try:
        return list(backend.run_replicated(jobs))
    except NotApplicable:
        results: list[Any] = []
        for job in jobs:
            try:
                results.extend(backend.run_replicated([job]))
            except NotApplicable as reason:
                results.append(reason)
        return results


def cross_backend_checks(backends: Sequence[ConformanceBackend], golden: dict[str, np.ndarray]) -> list[Check]:
    """R6.4: a state trained on one backend, loaded into another, gives the same outputs:
    both compute inference from the same float32 state, each within ``RULE * |scale|``
    of the exact result, so within twice that of each other. A failure is the backend's
    whose step raised (the source's training and ``state_dict``, or the target's load and
    call); with fewer than two backends the check is reported as not applicable."""
    case = next(c for c in CASES if c.name == "three_steps_then_inference")
    if len(backends) < 2:
        return [_not_applicable(f"state {b.name} -> another", b, "needs two backends") for b in backends]
    checks = []
    for source, target in itertools.permutations(backends, 2):
        name = f"state {source.name} -> {target.name}"
        side = source
        try:
            trained = source.make_layer(**case.constructor())
            for i in range(3):
                trained(source.asarray(golden[f"{case.name}/x{i}"], case.dtype))
            state = {k: source.to_numpy(v) for k, v in trained.state_dict().items()}
            x = golden[f"{case.name}/x3"]
            want = source.to_numpy(trained(source.asarray(x, case.dtype), training=False))
            side = target
            loaded = target.make_layer(**case.constructor())
            loaded.load_state_dict(state)
            got = target.to_numpy(loaded(target.asarray(x, case.dtype), training=False))
            bound = 2 * rule_for(case.dtype) * np.abs(state.get("scale", np.ones(1)))
            scored = [(worst(got, want, bound), "y")]
        except NotApplicable as reason:
            checks.append(_not_applicable(name, side, str(reason)))
            continue
        except Exception as exc:
            checks.append(Check(name, side.name, float("inf"), 1.0, False, f"{type(exc).__name__}: {exc}"))
            continue
        checks.append(score(name, target.name, scored))
    return checks


def run_check_case(backend: ConformanceBackend, name: str) -> Check:
    """One of ``cases.CHECK_CASES`` (but ``state_transfer``) on ``backend``."""
    with _precision(backend, "float32"):
        try:
            return CHECKS[name](backend)
        except NotApplicable as reason:
            return _not_applicable(name, backend, str(reason))
        except Exception as error:
            return _crashed(name, backend, error)


def _expected(check: Check, xfail: Mapping[str, Mapping[str, str]]) -> Check:
    """Mark a check that the backend's expected-failure list names."""
    reason = xfail.get(check.backend, {}).get(check.case)
    if reason is not None:
        check.xfail = reason
    return check


def run_suite(
    backends: Sequence[ConformanceBackend],
    golden: dict[str, np.ndarray],
    progress: Callable[[str], None] = lambda message: None,
    xfail: Mapping[str, Mapping[str, str]] | None = None,
    cases: Iterable[str] | None = None,
) -> list[Check]:
    """Every case (or those named in ``cases``) on every backend, then the synced and
    cross-backend checks; ``xfail``: per backend, the expected failures and why."""
    selected = None if cases is None else set(cases)
    keep = (lambda name: True) if selected is None else (lambda name: name in selected)
    checks: list[Check] = []
    singles = [c.name for c in CHECK_CASES if c.name in CHECKS and keep(c.name)]
    syncs = [c for c in SYNC_CASES if keep(c.name)]
    work: list[tuple[str, Callable[[], Any]]] = [
        *[(f"{b.name}: {c.name}", lambda b=b, c=c: [run_case(b, c, golden)]) for b in backends for c in CASES
          if keep(c.name)],
        *[(f"{b.name}: {c.name}", lambda b=b, c=c: [run_error_case(b, c)]) for b in backends for c in ERROR_CASES
          if keep(c.name)],
        *[(f"{b.name}: {n}", lambda b=b, n=n: [run_check_case(b, n)]) for b in backends for n in singles],
        *[(f"{b.name}: synced cases", lambda b=b: run_sync_cases(b, golden, syncs)) for b in backends if syncs],
    ]  # fmt: skip
    if keep("state_transfer"):
        work.append(("state transfer between backends", lambda: cross_backend_checks(backends, golden)))
    for i, (label, job) in enumerate(work, 1):
        progress(f"[{i}/{len(work)}] {label}")
        checks.extend(_expected(check, xfail or {}) for check in job())
    return checks
