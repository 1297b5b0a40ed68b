"""The conformance suite as tests: ``pytest --pyargs bn1d.conformance``.

Backends: ``--bn1d-backend NAME`` (repeatable) or ``BN1D_BACKEND=a,b``; by default
every registered backend that is installed. A backend named explicitly that is
not installed is a collection error, never a silent pass.
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import pytest

from bn1d.conformance import golden as golden_vectors
from bn1d.conformance import reports
from bn1d.conformance.cases import CASES, CHECK_CASES, ERROR_CASES, SYNC_CASES, Case, Step
from bn1d.conformance.checks import CHECKS
from bn1d.conformance.registry import BackendUnavailable, load_backend, registered_backends
from bn1d.conformance.runner import cross_backend_checks, run_case, run_check_case, run_error_case, run_sync_cases


def _selected_names(config: pytest.Config) -> tuple[list[str], bool]:
    names = config.getoption("--bn1d-backend", default=None)
    if not names and os.environ.get("BN1D_BACKEND"):
        names = [n.strip() for n in os.environ["BN1D_BACKEND"].split(",") if n.strip()]
    return (list(names), True) if names else (sorted(registered_backends()), False)


@functools.cache
def _backend(name: str):
    return load_backend(name)


def _backends(config: pytest.Config) -> list[str]:
    names, explicit = _selected_names(config)
    available = []
    for name in names:
        try:
            _backend(name)
            available.append(name)
        except (ValueError, BackendUnavailable) as error:
            if explicit:
                raise pytest.UsageError(f"conformance backend {name!r} requested but unavailable: {error}") from error
    if not available:
        raise pytest.UsageError("no conformance backend is installed")
    return available


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", _backends(metafunc.config))


@pytest.fixture(scope="session")
def golden():
    return golden_vectors.load()


@functools.cache
def _sync_checks(name: str):
    # Run every synced case in one go: a backend may start processes for them.
    return {c.case: c for c in run_sync_cases(_backend(name), golden_vectors.load())}


@pytest.fixture(scope="session")
def xfail(request):
    """The expected failures of ``--bn1d-xfail FILE`` (``reports.read_xfail``)."""
    path = request.config.getoption("--bn1d-xfail", default=None)
    listed = reports.read_xfail(path) if path else {}
    for note in reports.unmatched_xfail(listed, _backends(request.config)):
        warnings.warn(note, stacklevel=1)
    return listed


def _assert(check, xfail=None):
    reason = (xfail or {}).get(check.backend, {}).get(check.case)
    if check.passed is None:
        pytest.skip(f"not applicable to {check.backend}: {check.detail}")
    if reason is not None:
        if check.passed:
            pytest.fail(f"{check.backend} {check.case} passes but is listed as an expected failure: {reason}")
        pytest.xfail(reason)
    error = "" if check.error is None else f"error / bound {check.error:.2f} > 1 "
    assert check.passed, f"{check.backend} {check.case}: {error}({check.detail})"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case(backend_name, case, golden, xfail):
    _assert(run_case(_backend(backend_name), case, golden), xfail)


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.name)
def test_error(backend_name, case, xfail):
    _assert(run_error_case(_backend(backend_name), case), xfail)


@pytest.mark.parametrize("case", SYNC_CASES, ids=lambda c: c.name)
def test_synced(backend_name, case, xfail):
    _assert(_sync_checks(backend_name)[case.name], xfail)


@pytest.mark.parametrize("name", [c.name for c in CHECK_CASES if c.name in CHECKS])
def test_check(backend_name, name, xfail):
    _assert(run_check_case(_backend(backend_name), name), xfail)


def _random_cases(dtypes):
    """Hypothesis's cases: any rank and layout, masks, momentum (or the cumulative
    average), epsilon, affine, un-centred data, then inference; sizes small enough to
    shrink fast."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        ndim = draw(st.integers(2, 4))
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
        feature_axis = draw(st.integers(0, ndim - 1))
        reduced = [a for a in range(ndim) if a != feature_axis]
        if int(np.prod([shape[a] for a in reduced])) < 2:  # one value per feature: an error case
            shape = tuple(s + 2 if a == reduced[0] else s for a, s in enumerate(shape))
        negative = draw(st.booleans())
        axis = tuple(a - ndim if negative else a for a in reduced)
        layer = {"axis": axis, "momentum": draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
                 "epsilon": draw(st.floats(1e-6, 1.0)), "affine": draw(st.booleans()),
                 "unbiased_running_var": draw(st.booleans())}  # fmt: skip
        loc, scale = draw(st.floats(-1e3, 1e3)), draw(st.floats(1e-2, 1e2))
        keep = draw(st.one_of(st.none(), st.floats(0.3, 1.0)))
        steps = (Step(loc=loc, scale=scale, keep=keep), Step(loc=-loc, scale=scale), Step(training=False, loc=loc))
        dtype = draw(st.sampled_from([d for d in ("float32", "float64") if d in dtypes]))
        name = f"random_{draw(st.integers(0, 2**31 - 1))}"
        return Case(name, shape, layer, steps, dtype, dtype)

    return cases()


def test_random_cases(backend_name):
    """Property: every backend equals the float64 specification within the rule's
    bounds on cases drawn by hypothesis; a failure is shrunk to a minimal case, which
    the report names."""
    hypothesis = pytest.importorskip("hypothesis")
    backend = _backend(backend_name)

    @hypothesis.settings(max_examples=int(os.environ.get("BN1D_HYPOTHESIS_EXAMPLES", "25")), deadline=None,
                         database=None, suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
    @hypothesis.given(_random_cases(backend.dtypes))
    def check(case):
        result = run_case(backend, case, golden_vectors.case_golden(case))
        assert result.passed is not False, f"{case}: {result.detail}"

    check()


def test_state_transfers_between_backends(request, golden):
    names = _backends(request.config)
    if len(names) < 2:
        pytest.skip("needs two backends")
    for check in cross_backend_checks([_backend(n) for n in names], golden):
        _assert(check)


def test_golden_vectors_are_current(golden):
    """Fails when the stored vectors no longer match the specification
    (regenerate with ``python -m bn1d.conformance.golden``)."""
    fresh, stored = golden_vectors.generate(), golden_vectors.load_stored()
    assert sorted(fresh) == sorted(stored)
    for key, value in fresh.items():
        # Same algorithm, same float64 inputs: only a different NumPy build's
        # summation order may differ, by a few ulps.
        np.testing.assert_allclose(stored[key], value, rtol=1e-13, atol=1e-13, err_msg=key)
