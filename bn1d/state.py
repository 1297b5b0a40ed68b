"""The state dictionary shared by every backend.

A state is a flat mapping with the keys of ``BatchNormConfig.keys``: ``scale``
and ``bias`` when affine, ``running_mean`` and ``running_var`` when running
statistics are tracked (arrays of shape ``(num_features,)``), and the integer
``num_batches_tracked`` for the cumulative average (``momentum=None``).
:func:`check_state` validates a whole mapping into NumPy arrays before a backend
assigns anything, which is what makes every ``load_state_dict`` strict and
atomic (``docs/spec.md`` R6).
The peers' formats (PyTorch's keys, Flax's collections, BrainPy's variables) are the
adapters' business: ``bn1d.backends.formats``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import BatchNormConfig, argument_error
from .initializers import _to_host

__all__ = ["check_state"]


def _real(value: np.ndarray) -> bool:
    """A real array, bfloat16 (ml_dtypes' NumPy extension, kind ``V``) included."""
    return value.dtype.kind in "fiu" or value.dtype.name == "bfloat16"


def check_state(
    state: Any,
    config: BatchNormConfig,
    dtype: Any = np.float32,
    count_dtype: Any = np.int64,
    names: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Validate a whole state mapping against ``config.keys``; return it as NumPy
    arrays of ``dtype`` (``num_batches_tracked``: a scalar of ``count_dtype``, the
    layer's integer dtype). Entries: arrays of any Array API library, ndonnx's included
    (read through ``__array__``, DLPack or the standard's 0-D conversions). ``names``:
    the key by which an error names an entry (``state_dict['<name>']``), where it is
    not the entry's own (a parent's full key ``prefix + key``, or PyTorch's ``weight``
    for ``scale``).

    Raises ``TypeError`` for a non-mapping or non-numeric entry and ``ValueError``
    for a missing, unexpected or wrongly shaped entry, a finite value that ``dtype``
    cannot hold (it would become inf), a negative ``running_var`` or a count that is
    not a non-negative integer that ``count_dtype`` holds. Non-finite values load, with a ``RuntimeWarning`` naming the
    entry: a checkpoint of a diverged run must load for inspection, and a layer's
    own ``state_dict()`` always loads back into it, bit for bit. Nothing is returned
    (so nothing can be assigned) unless every entry is valid.
    """
    if not isinstance(state, Mapping):
        raise argument_error("state_dict", "a mapping", type(state).__name__, TypeError)
    expected = config.keys
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise argument_error(
            "state_dict", f"exactly the keys {list(expected)}", f"missing {missing}, unexpected {unexpected}"
        )
    result = {}
    for key in expected:
        name = f"state_dict[{(names or {}).get(key, key)!r}]"
        try:
            value = _to_host(state[key])
        except Exception as error:
            raise argument_error(name, "an array", type(state[key]).__name__, TypeError) from error
        if not _real(value):
            raise argument_error(name, "a real array (float, int or bfloat16)", value.dtype, TypeError)
        if key == "num_batches_tracked":
            top = np.iinfo(count_dtype).max
            if value.shape != () or not np.isfinite(value) or not 0 <= value <= top or value != np.floor(value):
                raise argument_error(name, f"a non-negative integer count up to {top} (a scalar)", value)
            result[key] = np.asarray(int(value), count_dtype)
            continue
        value = value.astype(np.float64) if value.dtype.name == "bfloat16" else value
        if value.shape != (config.num_features,):
            raise argument_error(name, f"shape ({config.num_features},)", value.shape)
        with np.errstate(over="ignore"):  # an overflow is reported below, as an argument error
            converted = value.astype(dtype)
        if np.any(np.isfinite(value) & ~np.isfinite(converted)):
            raise argument_error(name, f"finite values that {np.dtype(dtype).name} can hold", value)
        if not np.all(np.isfinite(value)):
            warnings.warn(f"{name} holds non-finite values (a diverged run?): {value}", RuntimeWarning, stacklevel=3)
        result[key] = converted
    if "running_var" in result and np.any(result["running_var"] < 0):
        name = f"state_dict[{(names or {}).get('running_var', 'running_var')!r}]"
        raise argument_error(name, "non-negative values", result["running_var"])
    return result
