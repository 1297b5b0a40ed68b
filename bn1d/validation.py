"""The checks of the core's public entry points, apart from the maths (``bn1d.algorithm``).

Each raises ``TypeError``/``ValueError`` through :func:`bn1d.config.argument_error`
(R7.1: the argument, what was expected, what was given) and reads only shapes, dtypes
and devices, so under ``jax.jit`` it runs at trace time. The public entries
(:func:`bn1d.algorithm.batch_norm`, :func:`bn1d.algorithm.batch_norm_vjp`) call
:func:`check_call`; a layer checks at its own boundary with :func:`check_inputs` and
then calls the core's trusted entry, ``bn1d.algorithm.forward``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from array_api_compat import array_namespace, device

from .config import BatchNormConfig, argument_error

__all__ = ["check_call", "check_cotangent", "check_inputs", "check_variables", "refuse_one_value"]

Array = Any


def check_inputs(x: Array, mask: Array | None, *, num_features: int, reduce_axes: Sequence[int]) -> Any:
    """Raise ``TypeError``/``ValueError`` for an input the layer cannot take; return
    ``x``'s Array API namespace.

    Only shapes, dtypes and devices are read, so under ``jax.jit`` this runs at
    trace time.
    """
    try:
        xp = array_namespace(x)
    except TypeError as error:
        raise argument_error("x", "an array", type(x).__name__, TypeError) from error
    if not _is_real_float(xp, x.dtype):
        expected_dtype = "a real floating-point array (float16, bfloat16, float32, float64)"
        raise argument_error("x", expected_dtype, x.dtype, TypeError)
    ndim = len(reduce_axes) + 1
    shape = tuple(x.shape)
    if len(shape) != ndim:
        raise argument_error("x", f"a {ndim}-D input for reduced axes {tuple(reduce_axes)}", shape)
    feature_axis = next(a for a in range(ndim) if a not in reduce_axes)
    if shape[feature_axis] != num_features:
        raise argument_error("x", f"num_features={num_features} on axis {feature_axis}", shape)
    if mask is None:
        return xp
    try:
        array_namespace(mask, x)
    except TypeError as error:
        raise argument_error(
            "mask", "a boolean array of the same library as x", type(mask).__name__, TypeError
        ) from error
    if mask.dtype != xp.bool:
        raise argument_error("mask", "a boolean array", mask.dtype, TypeError)
    expected = shape[:feature_axis] + shape[feature_axis + 1 :]
    if tuple(mask.shape) != expected:
        raise argument_error("mask", f"shape {expected} (x's shape without the feature axis)", tuple(mask.shape))
    where, mask_where = device(x), device(mask)
    if where is not None and mask_where is not None and mask_where != where:  # None: traced, placed later
        raise argument_error("mask", f"an array on x's device ({where})", mask_where)
    return xp


def _is_real_float(xp: Any, dtype: Any, *, sized: bool = True) -> bool:
    """Whether ``dtype`` is a real floating-point dtype of ``xp`` (``sized``: of 16, 32
    or 64 bits)."""
    return bool(xp.isdtype(dtype, "real floating") and (not sized or xp.finfo(dtype).bits in (16, 32, 64)))


def _require_same_library(value: Any, x: Array, name: str) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is an array of ``x``'s
    library (the same type decides it without a namespace lookup)."""
    if type(value) is type(x):
        return
    if value is None:  # array_namespace skips None
        raise argument_error(name, "an array of the same library as x", "None", TypeError)
    try:
        array_namespace(value, x)
    except TypeError as error:
        raise argument_error(name, "an array of the same library as x", type(value).__name__, TypeError) from error


def check_cotangent(dy: Array, x: Array) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``dy`` is a real floating-point array of
    ``x``'s library and shape."""
    _require_same_library(dy, x, "dy")
    if not _is_real_float(array_namespace(x), dy.dtype, sized=False):
        raise argument_error("dy", "a real floating-point array", dy.dtype, TypeError)
    if tuple(dy.shape) != tuple(x.shape):
        raise argument_error("dy", f"shape {tuple(x.shape)} (x's shape)", tuple(dy.shape))


def check_variables(params: Any, state: Any, config: BatchNormConfig, x: Array) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``params`` and ``state`` are mappings
    with exactly the config's keys, each an array of ``x``'s library of shape
    ``(num_features,)`` (the count: a scalar)."""
    shape = (config.num_features,)
    for name, tree, keys in (("params", params, config.param_keys), ("state", state, config.state_keys)):
        if not isinstance(tree, Mapping) or sorted(tree) != sorted(keys):
            given = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise argument_error(name, f"a mapping with exactly the keys {list(keys)}", given)
        for key in keys:
            _require_same_library(tree[key], x, f"{name}[{key!r}]")
            want = () if key == "num_batches_tracked" else shape
            if tuple(tree[key].shape) != want:
                raise argument_error(f"{name}[{key!r}]", f"shape {want}", tuple(tree[key].shape))


def refuse_one_value(x: Array, training: bool) -> None:
    """The batch's statistics of one value per feature, known from the shape: a
    variance of 0, which normalises everything to ``bias`` (PyTorch raises too).

    R3.5 refuses ``n == 1`` only where the shape alone says so, which a shape with an
    unknown reduced dimension does not (``None`` in the Array API, a symbolic dimension
    of ``jax.export.symbolic_shape``: ``bn1d.algorithm.static_count`` is ``None``). The
    count is then taken from the data at run time and ``n == 1`` is decided there, as
    R3.5 says for counts only known at run time (a mask, sync): no Bessel factor and no
    error. A concrete shape with ``n == 1`` still raises this ``ValueError``, at trace time."""
    when = "when training" if training else "without running statistics (the batch's normalise)"
    raise argument_error("x", f"more than 1 value per feature {when}", tuple(x.shape))


def check_call(
    x: Array, mask: Array | None, params: Any, state: Any, config: BatchNormConfig, training: Any, hooks: Any,
    dy: Array = None,
    *,
    backward: bool = False,
) -> Any:  # fmt: skip
    """Every argument of a call of the core checked: at most one cross-replica hook, the
    input and mask (:func:`check_inputs`), for a ``backward`` call the cotangent ``dy``
    (:func:`check_cotangent`), the variables (:func:`check_variables`) and ``training`` a
    bool. Returns ``x``'s namespace."""
    if hooks.all_sum is not None and hooks.all_gather is not None:
        raise argument_error("hooks", "at most one of all_sum and all_gather", hooks)
    xp = check_inputs(x, mask, num_features=config.num_features, reduce_axes=config.reduce_axes)
    if backward:
        check_cotangent(dy, x)
    check_variables(params, state, config, x)
    if not isinstance(training, bool):
        raise argument_error("training", "a bool", training, TypeError)
    return xp
