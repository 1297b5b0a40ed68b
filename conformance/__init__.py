"""The conformance suite: every backend proven equal to the NumPy specification.

* ``cases``: the named catalogue covering every rule of ``docs/spec.md``;
* ``golden``: inputs and expected results from the float64 specification;
* ``accuracy``, ``tolerances``: the contract's accuracy rule as metrics, and the
  bound it implies for every quantity a case compares;
* ``registry``: backends registered under the ``bn1d.conformance.backends``
  entry-point group, and the narrow interface they implement;
* ``runner``: scoring a backend against the golden vectors;
* ``python -m bn1d.conformance``: every installed backend, as a table;
* ``pytest [-p bn1d.conformance.plugin] --pyargs bn1d.conformance [--bn1d-backend NAME]``:
  the same as tests (the plugin, loaded only when asked, adds the options).
"""

from .cases import CASES, ERROR_CASES, SYNC_CASES
from .registry import ENTRY_POINT_GROUP, BackendUnavailable, ConformanceBackend, load_backend, registered_backends
from .runner import Check, run_suite

__all__ = [
    "CASES",
    "ERROR_CASES",
    "SYNC_CASES",
    "ENTRY_POINT_GROUP",
    "BackendUnavailable",
    "Check",
    "ConformanceBackend",
    "load_backend",
    "registered_backends",
    "run_suite",
]
