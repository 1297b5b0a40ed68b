"""The pytest plugin behind ``pytest -p bn1d.conformance.plugin --pyargs bn1d.conformance
--bn1d-backend NAME``: loaded only where it is asked for (``-p``, or ``pytest_plugins`` in a
conftest), never by installing bn1d, so an unrelated project's pytest sessions stay as they
were.

It only adds the options; ``test_conformance.py`` reads them (``--bn1d-backend``, or the
``BN1D_BACKEND`` environment variable: comma-separated names). Without either, every
registered backend that is installed runs.
"""

from __future__ import annotations

from typing import Any


def pytest_addoption(parser: Any) -> None:
    parser.addoption(
        "--bn1d-backend",
        action="append",
        default=None,
        help="conformance backend to test (repeatable; default: $BN1D_BACKEND or every installed backend)",
    )
    parser.addoption(
        "--bn1d-xfail",
        default=None,
        help="expected failures: a TOML file, a [backend] table of case = 'reason' (see bn1d.conformance.reports)",
    )
