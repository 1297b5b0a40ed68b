"""The NumPy backend: the executable specification of ``BatchNorm1d``.

:class:`BatchNorm1d` is the core's :class:`bn1d.Layer` on NumPy arrays: what it
computes is :mod:`bn1d.algorithm` (its docstring is the maths, its code the
algorithm, in float64 sums wherever NumPy runs), what it promises is the contract
(``docs/spec.md``), and where it departs from BrainPy, Flax and PyTorch is the
table in the README. It adds NumPy's conversions, the analytic ``vjp`` (the
gradients' specification) and synced statistics over simulated replicas
(:func:`bn1d.replicas.run_replicas`, re-exported here, with either of the core's
two cross-replica hooks).

Worked example (the contract's reference numbers, BrainPy 2.8.2's)::

    >>> import numpy as np
    >>> from bn1d.backends.numpy import BatchNorm1d
    >>> x = np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32)
    >>> layer = BatchNorm1d(3)
    >>> y = layer(x)
    >>> np.round(layer.running_mean, 6)
    array([0.000188, 0.000142, 0.001989], dtype=float32)
    >>> np.round(y[3, 4], 5)
    array([ 0.5975 , -1.58768, -1.17152], dtype=float32)
"""

from __future__ import annotations

import functools
from typing import Any

import array_api_compat.numpy as xp
import numpy as np

from bn1d.algorithm import Tuning
from bn1d.config import argument_error
from bn1d.layer import Layer
from bn1d.replicas import run_replicas

__all__ = ["BatchNorm1d", "run_replicas"]

_QUIET = functools.partial(np.errstate, invalid="ignore", over="ignore", divide="ignore")


class BatchNorm1d(Layer):
    """1-D batch normalization with BrainPy's signature, on NumPy arrays.

    ``bn1d.Layer``'s constructor and protocol; ``dtype`` is ``numpy.float32`` (the
    default) or ``numpy.float64``. Inputs are anything ``numpy.asarray`` takes.
    With ``axis_name`` set, statistics are combined over the replicas that
    :func:`run_replicas` simulates (a group of one outside it).
    """

    xp = xp
    #: NumPy's float64 sums of float32 data folded (the same sums, faster:
    #: ``bn1d.algorithm._feature_sums``).
    _tuning = Tuning(fold_rows=True)

    def _parameter_dtype(self, dtype: Any) -> Any:
        if dtype is None:
            return np.dtype(np.float32)
        if not any(dtype is d or dtype == np.dtype(d) for d in (np.float32, np.float64)):
            raise argument_error("dtype", "numpy.float32 or numpy.float64", dtype, TypeError)
        return np.dtype(dtype)

    def _inputs(self, x: Any, mask: Any) -> tuple[Any, Any]:
        return np.asarray(x), None if mask is None else np.asarray(mask)

    def _forward(self, params: Any, state: Any, x: Any, mask: Any, training: bool) -> Any:
        with _QUIET():  # non-finite input gives non-finite results, as on every backend, without NumPy's warnings
            return super()._forward(params, state, x, mask, training)

    def vjp(self, x: Any, dy: Any, mask: Any = None, training: bool | None = None) -> dict[str, Any]:
        with _QUIET():
            return super().vjp(x, dy, mask, training)

    def _cotangent(self, dy: Any) -> Any:
        return np.asarray(dy)

    def _copy(self, value: Any) -> Any:
        return np.array(value)
