"""The conformance suite as tests: ``pytest --pyargs bn1d.conformance``.

Backends: ``--bn1d-backend NAME`` (repeatable) or ``BN1D_BACKEND=a,b``; by default
every registered backend that is installed. A backend named explicitly that is
not installed is a collection error, never a silent pass.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

from bn1d.conformance import golden as golden_vectors
from bn1d.conformance.cases import CASES, ERROR_CASES, SYNC_CASES
from bn1d.conformance.registry import BackendUnavailable, load_backend, registered_backends
from bn1d.conformance.runner import cross_backend_checks, run_case, run_error_case, run_sync_cases


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


def _assert(check):
    if check.passed is None:
        pytest.skip(f"not applicable to {check.backend}: {check.detail}")
    assert check.passed, f"{check.backend} {check.case}: error / bound {check.error:.2f} > 1 ({check.detail})"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case(backend_name, case, golden):
    _assert(run_case(_backend(backend_name), case, golden))


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.name)
def test_error(backend_name, case):
    _assert(run_error_case(_backend(backend_name), case))


@pytest.mark.parametrize("case", SYNC_CASES, ids=lambda c: c.name)
def test_synced(backend_name, case):
    _assert(_sync_checks(backend_name)[case.name])


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
