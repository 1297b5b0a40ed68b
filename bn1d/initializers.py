"""Initializers for ``scale`` and ``bias``, and the rule that turns any accepted
initializer into a validated NumPy array of shape ``(num_features,)``.

An initializer is a callable ``(shape, dtype) -> array``, an array of shape
``(num_features,)`` or a real scalar (BrainPy accepts the same three forms).
Results are materialised on the host with NumPy and then handed to the backend,
so one initializer works on every backend.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from .config import argument_error

__all__ = ["Zeros", "Ones", "Constant", "initial_value"]


class Constant:
    """``(shape, dtype) -> full(shape, value)``."""

    def __init__(self, value: float = 0.0):
        self.value = value

    def __call__(self, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        return np.full(shape, self.value, dtype=dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.value!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.value == self.value  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.value))


class Zeros(Constant):
    """BrainPy's ``ZeroInit``: the default ``bias_initializer``."""

    def __init__(self) -> None:
        super().__init__(0.0)

    def __repr__(self) -> str:
        return "Zeros()"


class Ones(Constant):
    """BrainPy's ``OneInit(value=1.0)``: the default ``scale_initializer``."""

    def __init__(self, value: float = 1.0):
        super().__init__(value)


def _to_host(value: Any) -> np.ndarray:
    """An array of any backend as a NumPy array (via ``__array__``; an Array API array that
    NumPy cannot read, such as ndonnx's, through :func:`_from_array_api`).

    torch tensors are detached and moved to the CPU first, and a bfloat16 tensor
    (which NumPy cannot represent) is widened to float32, exactly.
    """
    if hasattr(value, "detach"):  # torch tensors refuse __array__ while requiring grad
        value = value.detach()
    if hasattr(value, "cpu"):
        value = value.cpu()
    try:
        host = np.asarray(value)
    except TypeError:
        if hasattr(value, "float"):  # torch.bfloat16
            return np.asarray(value.float())
        raise
    if host.dtype != object:
        return host
    try:
        array_namespace(value)
    except TypeError:
        return host  # no array: the caller names its dtype (object)
    return _from_array_api(value)


def _from_array_api(value: Any) -> np.ndarray:
    """An Array API array as NumPy by the standard's means only: DLPack, else one element
    at a time through the 0-D conversions (``__float__``, ``__int__``, ...: a call per
    element, slow but exact), with the NumPy dtype of the same kind and size
    (bfloat16's values, exactly, as float32). Raises for an array without values (a
    lazy or symbolic one)."""
    try:
        return np.from_dlpack(value)
    except Exception:  # DLPack is optional (ndonnx raises BufferError), and NumPy lacks some dtypes
        pass
    xp, dtype = array_namespace(value), value.dtype
    convert: Any
    host: np.dtype[Any]
    if xp.isdtype(dtype, "bool"):
        convert, host = bool, np.dtype(bool)
    elif xp.isdtype(dtype, "integral"):
        info = xp.iinfo(dtype)
        convert, host = int, np.dtype(f"{'i' if info.min < 0 else 'u'}{info.bits // 8}")
    else:
        info = xp.finfo(dtype)  # real or complex floating
        complex_ = xp.isdtype(dtype, "complex floating")
        half = info.bits == 16 and float(info.eps) == 2.0**-10
        convert = complex if complex_ else float
        host = np.dtype(np.float16 if half else f"{'c' if complex_ else 'f'}{max(info.bits, 32) // 8}")
    flat = xp.reshape(value, (-1,))
    values = [convert(flat[i]) for i in range(math.prod(value.shape))]
    return np.asarray(values, dtype=host).reshape(tuple(value.shape))


def initial_value(initializer: Any, name: str, num_features: int, dtype: Any = np.float32) -> np.ndarray:
    """Resolve ``initializer`` into a finite NumPy array of shape ``(num_features,)``.

    ``name`` is the constructor argument (``scale_initializer``/``bias_initializer``)
    that the error messages name.
    """
    shape = (num_features,)
    expected = f"a callable (shape, dtype) -> array, an array of shape {shape} or a real scalar"
    if isinstance(initializer, bool):
        raise argument_error(name, expected, initializer, TypeError)
    if callable(initializer) and not hasattr(initializer, "shape"):
        value = initializer(shape, dtype)
    else:
        value = initializer
    try:
        array = _to_host(value)
    except Exception as error:  # anything that is no array at all
        raise argument_error(name, expected, initializer, TypeError) from error
    if array.dtype.kind not in "fiu":
        raise argument_error(name, expected, initializer, TypeError)
    if array.ndim == 0:
        array = np.full(shape, array)
    if array.shape != shape:
        raise argument_error(name, f"shape {shape}", tuple(array.shape))
    array = array.astype(dtype)
    if not np.all(np.isfinite(array)):
        raise argument_error(name, "finite values", initializer)
    return array
