"""Which backends the conformance suite can run, and the narrow interface they implement.

A backend registers a factory under the entry-point group
``bn1d.conformance.backends``; the factory takes no argument and returns an
object with the :class:`ConformanceBackend` interface. bn1d registers its own
NumPy, JAX and PyTorch adapters the same way (see ``pyproject.toml``), so a
third-party package (CuPy, MLX...) joins the suite by declaring, e.g.::

    [project.entry-points."bn1d.conformance.backends"]
    cupy = "bn1d_cupy.conformance:backend"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

import numpy as np

__all__ = [
    "ENTRY_POINT_GROUP",
    "ConformanceBackend",
    "BackendUnavailable",
    "NotApplicable",
    "PEERS_GROUP",
    "ReplicaJob",
    "ReplicaResult",
    "registered_backends",
    "load_backend",
]

ENTRY_POINT_GROUP = "bn1d.conformance.backends"
#: Other libraries' batch norms, run with ``--peers``: a report of where they differ.
PEERS_GROUP = "bn1d.conformance.peers"


class BackendUnavailable(RuntimeError):
    """A registered backend whose framework is not installed (or failed to load)."""


class NotApplicable(Exception):
    """Raised by a backend (``make_layer``, ``asarray``, a call, ``gradients``) for what
    it cannot express at all (a layout, masks, an option): the case is reported as not
    applicable, with this reason, never as passed. From ``gradients`` it leaves the
    gradients of the case unscored."""


@dataclass(frozen=True)
class ReplicaJob:
    """One synced training call on ``len(xs)`` replicas, then the gradients of
    ``sum(y_r * dys[r])`` (summed over replicas) at the same inputs."""

    layer: dict[str, Any]
    xs: Sequence[np.ndarray]
    masks: Sequence[np.ndarray | None]
    dys: Sequence[np.ndarray]


@dataclass
class ReplicaResult:
    ys: list[np.ndarray]
    states: list[dict[str, np.ndarray]]
    x_grads: list[np.ndarray]


class ConformanceBackend(Protocol):
    """What the suite needs from a backend (arrays cross it as NumPy arrays)."""

    name: str
    #: Input dtypes it supports, from "float16", "bfloat16", "float32", "float64".
    dtypes: Sequence[str]

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> Any:
        """A layer of the uniform protocol (``bn1d.protocol``) with BrainPy's
        constructor arguments; ``param_dtype`` names the dtype of its parameters
        and statistics ("float32" or "float64")."""

    def asarray(self, array: np.ndarray, dtype: str | None = None) -> Any:
        """A backend array of ``array`` (cast to ``dtype``, a NumPy or "bfloat16" name)."""

    def to_numpy(self, array: Any) -> np.ndarray:
        """A float64 (or bool/int) NumPy copy of a backend array."""

    def gradients(self, layer: Any, x: Any, dy: Any, mask: Any, training: bool) -> dict[str, np.ndarray]:
        """Gradients of ``sum(layer(x) * dy)`` w.r.t. ``x`` (and ``scale``/``bias`` when affine),
        computed by the backend's own autodiff; the layer's running statistics may change."""

    def run_replicated(self, jobs: Sequence[ReplicaJob]) -> list[ReplicaResult]:
        """Run every job on the backend's real collectives (all jobs at once, so that a
        backend that must start processes starts them once)."""

    # Optional: ``precision(dtype) -> context manager`` that a case of input dtype
    # ``dtype`` runs in (JAX's float64 needs jax_enable_x64; the others run without);
    # ``versions() -> dict[str, str]``: the library versions a report prints.


def registered_backends(group: str = ENTRY_POINT_GROUP) -> dict[str, Any]:
    """Entry points by name (nothing is imported yet): the backends, or the peers."""
    return {ep.name: ep for ep in entry_points(group=group)}


def load_backend(name: str, group: str = ENTRY_POINT_GROUP) -> ConformanceBackend:
    """The backend (or peer) registered as ``name``; raise if unknown or not installed."""
    registered = registered_backends(group)
    if name not in registered:
        raise ValueError(f"backend: expected one of {sorted(registered)}, got {name!r}")
    try:
        factory: Callable[[], ConformanceBackend] = registered[name].load()
        return factory()
    except ImportError as error:
        raise BackendUnavailable(f"backend {name!r} is registered but cannot be loaded: {error}") from error
