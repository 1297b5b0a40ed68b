"""bn1d: BrainPy's ``BatchNorm1d``, written once against the Array API standard.

The core (this package) never imports a framework: :func:`batch_norm` is the
algorithm, :class:`Layer` the stateful layer over any Array API library. The
backends live in ``bn1d.backends.numpy`` (the executable specification),
``bn1d.backends.jax`` and ``bn1d.backends.torch``; the conformance suite in
``bn1d.conformance`` (in a checkout, ``bn1d/backends`` and ``bn1d/conformance`` are links
to the top-level ``backends/`` and ``conformance/``). The contract is ``docs/spec.md``.
"""

from __future__ import annotations

from .algorithm import AllGather, AllSum, BatchNormResult, Hooks, batch_norm, batch_norm_vjp
from .config import OPTIONS, BatchNormConfig
from .initializers import Constant, Ones, Zeros
from .layer import Layer
from .protocol import BatchNormLayer
from .replicas import run_replicas
from .state import check_state
from .validation import check_inputs

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
