"""bn1d: BrainPy's ``BatchNorm1d``, written once against the Array API standard.

The core (this package) never imports a framework: :func:`batch_norm` is the
algorithm, :class:`Layer` the stateful layer over any Array API library. The
backends live in ``bn1d.backends.numpy`` (the executable specification),
``bn1d.backends.jax`` and ``bn1d.backends.torch``; the conformance suite in
``bn1d.conformance``. The contract is ``docs/spec.md``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os as _os
import sys as _sys

from .algorithm import AllGather, AllSum, BatchNormResult, Hooks, batch_norm, batch_norm_vjp, check_inputs
from .config import OPTIONS, BatchNormConfig
from .initializers import Constant, Ones, Zeros
from .layer import Layer
from .protocol import BatchNormLayer
from .replicas import run_replicas
from .state import check_state


class _CheckoutSubpackages(importlib.abc.MetaPathFinder):
    """In a source checkout the adapters and the suite sit beside this folder, in
    ../backends and ../conformance; setuptools maps exactly those two to
    bn1d.backends and bn1d.conformance when it installs the package (an editable
    install too). When bn1d is imported from a checkout that is not installed
    (e.g. ``python -m ...`` from its root), this finder maps the same two names and
    nothing else: the checkout's root is not a part of the package (no
    ``bn1d.tests``, ``bn1d.benchmarks`` or ``bn1d.bn1d``)."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        prefix, _, name = fullname.partition(".")
        if prefix != "bn1d" or name not in ("backends", "conformance"):
            return None
        init = _os.path.join(self.root, name, "__init__.py")
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[_os.path.dirname(init)]
        )


_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "backends")) and _os.path.isfile(
    _os.path.join(_root, "backends", "numpy.py")
):
    _sys.meta_path.append(_CheckoutSubpackages(_root))

__all__ = [
    "AllGather",
    "AllSum",
    "BatchNormConfig",
    "BatchNormLayer",
    "BatchNormResult",
    "Constant",
    "Hooks",
    "Layer",
    "OPTIONS",
    "Ones",
    "Zeros",
    "batch_norm",
    "batch_norm_vjp",
    "check_inputs",
    "check_state",
    "run_replicas",
]
__version__ = "0.1.0"
