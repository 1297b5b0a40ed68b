"""Constructor arguments of ``BatchNorm1d``, validated once for every backend.

Every backend's constructor builds a :class:`BatchNormConfig` first, so a bad
argument raises the same ``ValueError``/``TypeError`` with the same message on
NumPy, JAX and PyTorch, before any parameter or statistic exists (``docs/spec.md`` R1 and R7.1). The core
(:func:`bn1d.algorithm.batch_norm`) takes the config itself: an option that only
the algorithm reads is a field here, its use there, and its conformance cases
(``docs/contributing.md`` lists the files an option touches).
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, cast

__all__ = ["BatchNormConfig", "MODES", "OPTIONS", "argument_error", "check_partition", "check_real", "is_int"]

#: Accepted values of ``mode``. ``None`` means training, as in BrainPy >= 2.8.
MODES = (None, "training", "inference")

#: The keyword-only options every backend accepts after BrainPy's arguments, with
#: their defaults (the behaviour is ``bn1d.algorithm``'s; ``docs/contributing.md`` lists
#: the files an option touches).
OPTIONS = {"fast_variance": False, "unbiased_running_var": True, "track_running_stats": True}


def argument_error(name: str, expected: str, given: Any, kind: type[Exception] = ValueError) -> Exception:
    """The project's one error format: the argument, what was expected, what was given."""
    return kind(f"{name}: expected {expected}, got {given!r}")


def is_int(value: Any) -> bool:
    """An integer, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_FLOAT_MAX = sys.float_info.max


def check_real(name: str, value: Any, expected: str, low: float, high: float, open_low: bool = False) -> float:
    """``value`` a real number (not a bool) in ``[low, high]`` (``(low, high]`` with
    ``open_low``) and a finite float (an int beyond float's range is not), else the error
    naming ``name`` and ``expected``. Comparisons only (NaN fails them): under
    ``torch.compile`` the value may be symbolic, which ``math.isfinite`` and ``float()``
    cannot take."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise argument_error(name, expected, value, TypeError)
    # a NumPy scalar as the Python number it holds: compared with float's max, a float32
    # would be cast to it (inf) with a RuntimeWarning
    number = cast(float, value.item() if hasattr(value, "item") else value)
    if not ((low < number if open_low else low <= number) and number <= high and -_FLOAT_MAX <= number <= _FLOAT_MAX):
        raise argument_error(name, expected, value)
    return number


def normalize_reduce_axes(axis: Any) -> tuple[int, ...]:
    """``axis`` as a sorted tuple of non-negative ints.

    The input always has ``len(axis) + 1`` dimensions (one feature axis), so
    negative axes are resolved at construction, unlike BrainPy 2.8.2, which
    fails on them.
    """
    axes = (axis,) if not isinstance(axis, (tuple, list)) else tuple(axis)
    if not axes or not all(is_int(a) for a in axes):
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
    where the axis is bound (:func:`check_partition`, at call time).
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
        if not isinstance(group, (tuple, list)) or not group or not all(is_int(i) for i in group):
            raise argument_error("axis_index_groups", expected, groups, TypeError)
        result.append(tuple(int(i) for i in group))
    flat = sorted(i for group in result for i in group)
    if len({len(g) for g in result}) != 1 or flat != list(range(len(flat))):
        raise argument_error("axis_index_groups", expected, groups)
    return tuple(result)


def check_partition(groups: Sequence[Sequence[int]] | None, size: int, where: str = "") -> None:
    """Raise ``ValueError`` unless ``groups`` (already normalised) partition
    ``range(size)``, the replicas actually present (``where``: e.g. the axis name)."""
    if groups is not None and sorted(i for g in groups for i in g) != list(range(size)):
        raise argument_error("axis_index_groups", f"a partition of range({size}){where}", groups)


@dataclass(frozen=True)
class BatchNormConfig:
    """The validated, normalised constructor arguments shared by every backend.

    ``reduce_axes`` is ``axis`` resolved against the input rank ``len(axis) + 1``;
    ``feature_axis`` is the one axis not reduced. ``momentum`` is the weight of the
    old statistic, or ``None``: PyTorch's cumulative moving average (the running
    statistics are the mean of every training call's statistics so far, counted in
    ``num_batches_tracked``). ``fast_variance`` selects BrainPy's one-pass formula,
    ``unbiased_running_var=False`` the biased running variance of BrainPy <= 2.7,
    Flax and Keras, ``track_running_stats=False`` no running statistics at all
    (batch statistics in inference too; PyTorch's option). See ``bn1d.algorithm``.
    """

    num_features: int
    reduce_axes: tuple[int, ...]
    epsilon: float
    momentum: float | None
    affine: bool
    axis_name: str | tuple[Hashable, ...] | None
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    training: bool
    name: str | None
    fast_variance: bool = False
    unbiased_running_var: bool = True
    track_running_stats: bool = True

    @property
    def ndim(self) -> int:
        return len(self.reduce_axes) + 1

    @property
    def feature_axis(self) -> int:
        return next(a for a in range(self.ndim) if a not in self.reduce_axes)

    @property
    def synced(self) -> bool:
        return self.axis_name is not None

    @property
    def param_keys(self) -> tuple[str, ...]:
        """The learnable parameters' names (none when not affine)."""
        return ("scale", "bias") if self.affine else ()

    @property
    def state_keys(self) -> tuple[str, ...]:
        """The running statistics' names: none without ``track_running_stats``, and
        ``num_batches_tracked`` (an integer count) with ``momentum=None``."""
        if not self.track_running_stats:
            return ()
        return ("running_mean", "running_var") + (("num_batches_tracked",) if self.momentum is None else ())

    @property
    def keys(self) -> tuple[str, ...]:
        """Every entry of the state dictionary, in order."""
        return self.param_keys + self.state_keys

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
        **options: Any,
    ) -> BatchNormConfig:
        """Validate BrainPy's arguments and the keyword-only :data:`OPTIONS`."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise argument_error(unknown[0], f"one of the options {sorted(OPTIONS)}", options[unknown[0]], TypeError)
        options = {**OPTIONS, **options}
        if not is_int(num_features):
            raise argument_error("num_features", "a positive int", num_features, TypeError)
        if num_features <= 0:
            raise argument_error("num_features", "a positive int", num_features)
        reduce_axes = normalize_reduce_axes(axis)
        check_real("epsilon", epsilon, "a finite float > 0", 0.0, math.inf, open_low=True)
        if momentum is not None:
            check_real("momentum", momentum, "a finite float in [0, 1] or None", 0.0, 1.0)
        for flag_name, flag in (("affine", affine), *options.items()):
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
            momentum=None if momentum is None else float(momentum),
            affine=affine,
            axis_name=axis_name,
            axis_index_groups=groups,
            training=mode != "inference",
            name=name,
            **options,
        )
