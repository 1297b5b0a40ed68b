"""Constructor arguments of ``BatchNorm1d``, validated once for every backend.

Every backend's constructor builds a :class:`BatchNormConfig` first, so a bad
argument raises the same ``ValueError``/``TypeError`` with the same message on
NumPy, JAX and PyTorch, before any parameter or statistic exists.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

__all__ = ["BatchNormConfig", "argument_error", "MODES"]

#: Accepted values of ``mode``. ``None`` means training, as in BrainPy >= 2.8.
MODES = (None, "training", "inference")


def argument_error(name: str, expected: str, given: Any, kind: type[Exception] = ValueError) -> Exception:
    """The project's one error format: the argument, what was expected, what was given."""
    return kind(f"{name}: expected {expected}, got {given!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def normalize_reduce_axes(axis: Any) -> tuple[int, ...]:
    """``axis`` as a sorted tuple of non-negative ints.

    The input always has ``len(axis) + 1`` dimensions (one feature axis), so
    negative axes are resolved at construction, unlike BrainPy 2.8.2, which
    fails on them.
    """
    axes = (axis,) if not isinstance(axis, (tuple, list)) else tuple(axis)
    if not axes or not all(_is_int(a) for a in axes):
        raise argument_error("axis", "an int or a non-empty sequence of ints", axis, TypeError)
    ndim = len(axes) + 1
    resolved = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise argument_error("axis", f"axes in [-{ndim}, {ndim}) for a {ndim}-D input", axis)
        resolved.append(int(a) % ndim)
    if len(set(resolved)) != len(resolved):
        raise argument_error("axis", "no duplicate axes", axis)
    return tuple(sorted(resolved))


def normalize_axis_name(axis_name: Any) -> str | tuple[Hashable, ...] | None:
    if axis_name is None or isinstance(axis_name, str):
        return axis_name
    if isinstance(axis_name, (tuple, list)) and axis_name and all(isinstance(n, str) for n in axis_name):
        return tuple(axis_name)
    raise argument_error("axis_name", "None, a str or a non-empty sequence of str", axis_name, TypeError)


def normalize_axis_index_groups(groups: Any, axis_name: Any) -> tuple[tuple[int, ...], ...] | None:
    """Groups as a tuple of equal-size tuples that partition ``range(total)``.

    Whether ``total`` equals the size of the named axis can only be checked
    where the axis is bound (the backends do it at call time).
    """
    if groups is None:
        return None
    if axis_name is None:
        raise argument_error("axis_index_groups", "None when axis_name is None", groups)
    expected = "a non-empty list of equal-size, non-empty lists of ints partitioning range(total)"
    if not isinstance(groups, (tuple, list)) or not groups:
        raise argument_error("axis_index_groups", expected, groups, TypeError)
    result = []
    for group in groups:
        if not isinstance(group, (tuple, list)) or not group or not all(_is_int(i) for i in group):
            raise argument_error("axis_index_groups", expected, groups, TypeError)
        result.append(tuple(int(i) for i in group))
    flat = sorted(i for group in result for i in group)
    if len({len(g) for g in result}) != 1 or flat != list(range(len(flat))):
        raise argument_error("axis_index_groups", expected, groups)
    return tuple(result)


@dataclass(frozen=True)
class BatchNormConfig:
    """The validated, normalised constructor arguments shared by every backend.

    ``reduce_axes`` is ``axis`` resolved against the input rank
    ``len(axis) + 1``; ``feature_axis`` is the one axis not reduced.
    ``fast_variance`` selects BrainPy's one-pass variance formula and
    ``unbiased_running_var=False`` the biased running-variance update of
    BrainPy <= 2.7, Flax and Keras (see ``bn1d.algorithm``).
    """

    num_features: int
    reduce_axes: tuple[int, ...]
    epsilon: float
    momentum: float
    affine: bool
    axis_name: str | tuple[Hashable, ...] | None
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    training: bool
    name: str | None
    fast_variance: bool
    unbiased_running_var: bool

    @property
    def ndim(self) -> int:
        return len(self.reduce_axes) + 1

    @property
    def feature_axis(self) -> int:
        return next(a for a in range(self.ndim) if a not in self.reduce_axes)

    @property
    def synced(self) -> bool:
        return self.axis_name is not None

    @classmethod
    def from_arguments(
        cls,
        num_features: Any,
        axis: Any = (0, 1),
        epsilon: Any = 1e-5,
        momentum: Any = 0.99,
        affine: Any = True,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        mode: Any = None,
        name: Any = None,
        *,
        fast_variance: Any = False,
        unbiased_running_var: Any = True,
    ) -> BatchNormConfig:
        if not _is_int(num_features):
            raise argument_error("num_features", "a positive int", num_features, TypeError)
        if num_features <= 0:
            raise argument_error("num_features", "a positive int", num_features)
        reduce_axes = normalize_reduce_axes(axis)
        if not _is_real(epsilon):
            raise argument_error("epsilon", "a finite float > 0", epsilon, TypeError)
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise argument_error("epsilon", "a finite float > 0", epsilon)
        if not _is_real(momentum):
            raise argument_error("momentum", "a finite float in [0, 1]", momentum, TypeError)
        if not (math.isfinite(momentum) and 0 <= momentum <= 1):
            raise argument_error("momentum", "a finite float in [0, 1]", momentum)
        for flag_name, flag in (
            ("affine", affine),
            ("fast_variance", fast_variance),
            ("unbiased_running_var", unbiased_running_var),
        ):
            if not isinstance(flag, bool):
                raise argument_error(flag_name, "a bool", flag, TypeError)
        axis_name = normalize_axis_name(axis_name)
        groups = normalize_axis_index_groups(axis_index_groups, axis_name)
        if mode not in MODES:
            raise argument_error("mode", f"one of {MODES}", mode)
        if name is not None and not isinstance(name, str):
            raise argument_error("name", "None or a str", name, TypeError)
        return cls(
            num_features=int(num_features),
            reduce_axes=reduce_axes,
            epsilon=float(epsilon),
            momentum=float(momentum),
            affine=affine,
            axis_name=axis_name,
            axis_index_groups=groups,
            training=mode != "inference",
            name=name,
            fast_variance=fast_variance,
            unbiased_running_var=unbiased_running_var,
        )
