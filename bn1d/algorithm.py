r"""The batch-normalization algorithm, written once against the Array API standard.

:func:`batch_norm` is a pure function: it takes arrays of any Array API library
(NumPy, JAX, PyTorch, ``array_api_strict``...), gets ``xp`` from
``array_api_compat.array_namespace`` and never branches on the library. The
backends only add state handling and, for cross-replica statistics, an
``all_sum`` hook.

The maths, per feature ``c`` (the one axis that is not reduced), with ``M`` the
set of unmasked positions over all synced replicas and ``n = |M|``:

.. math::

    \mu = \frac{1}{n}\sum_{i\in M} x_i, \qquad
    \sigma^2 = \frac{1}{n}\sum_{i\in M} (x_i - \mu)^2 \quad\text{(two-pass, biased)}

    y = (x - \mu)\,\bigl(\gamma\,/\sqrt{\sigma^2 + \epsilon}\bigr) + \beta

    \hat\mu \leftarrow m\,\hat\mu + (1 - m)\,\mu, \qquad
    \hat\sigma^2 \leftarrow m\,\hat\sigma^2 + (1 - m)\,\sigma^2\,\frac{n}{n-1}

With ``fast_variance=True`` the variance is BrainPy's and Flax's one-pass
``max(0, sum(x**2)/n - mu**2)``, which cancels catastrophically when
``|mu| >> sigma``. With ``unbiased_running_var=False`` the Bessel factor
``n / (n - 1)`` is dropped (BrainPy <= 2.7, Flax, Keras). In inference ``mu`` and
``sigma**2`` are the running statistics and nothing is updated.

Edge cases: ``n == 1`` raises when the input's shape alone says so (no mask, no
sync); when ``n`` is only known at run time and is 1, the Bessel factor is 1.
``n == 0`` makes the call behave as inference: the running statistics are
returned unchanged and nothing is NaN.

float16 and bfloat16 inputs are reduced in float32, float64 inputs (or float64
statistics) in float64; ``y`` has the input's dtype and the new running
statistics keep their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from array_api_compat import array_namespace, device

from .config import argument_error

__all__ = [
    "AllSum",
    "BatchNormResult",
    "Moments",
    "batch_moments",
    "batch_norm",
    "check_inputs",
    "compute_dtype",
    "static_count",
]

Array = Any
#: The cross-replica hook: sums each array over the replicas of this replica's
#: group and returns the sums, in order and with the same shapes. The arrays are
#: per-feature vectors ``(C,)`` and scalar counts ``()``, in the compute dtype.
AllSum = Callable[[tuple[Array, ...]], Sequence[Array]]


class BatchNormResult(NamedTuple):
    """``y`` and the running statistics after the call (unchanged in inference)."""

    y: Array
    running_mean: Array
    running_var: Array


def check_inputs(x: Array, mask: Array | None, *, num_features: int, reduce_axes: Sequence[int]) -> Any:
    """Raise ``TypeError``/``ValueError`` for an input the layer cannot take; return
    ``x``'s Array API namespace.

    Only shapes and dtypes are read, so under ``jax.jit`` this runs at trace time.
    """
    try:
        xp = array_namespace(x)
    except TypeError as error:
        raise argument_error("x", "an array", type(x).__name__, TypeError) from error
    if not xp.isdtype(x.dtype, "real floating"):
        raise argument_error(
            "x", "a real floating-point array (float16, bfloat16, float32, float64)", x.dtype, TypeError
        )
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
    return xp


class Moments(NamedTuple):
    """Batch statistics: ``count`` (a Python int when the shape alone fixes it, else
    an array that may be 0), ``mean`` and the biased ``var``, per feature, and
    ``centered``, the input minus ``mean`` (``None`` with the fast variance, which
    never forms it)."""

    count: Any
    mean: Array
    var: Array
    centered: Array | None


def batch_moments(
    x: Array,
    mask: Array | None = None,
    *,
    reduce_axes: Sequence[int],
    fast_variance: bool = False,
    all_sum: AllSum | None = None,
) -> Moments:
    """The count, mean and biased variance that training normalises with, in the
    compute dtype. With a dynamic count of 0 the mean and variance are 0."""
    xp = array_namespace(x)
    xc = xp.astype(x, compute_dtype(xp, x.dtype), copy=False)
    return Moments(*_moments(xc, mask, reduce_axes=tuple(reduce_axes), fast_variance=fast_variance, all_sum=all_sum))


def _moments(
    xc: Array, mask: Array | None, *, reduce_axes: tuple[int, ...], fast_variance: bool, all_sum: AllSum | None
) -> tuple[Any, Array, Array, Array | None]:
    """(count, mean, var, x - mean or None) of ``xc`` (already in the compute dtype).

    The two-pass variance needs two rounds of ``all_sum``: the global mean first,
    then the centred squares around it, so it stays exact in sync.
    """
    xp = array_namespace(xc)
    feature_axis = next(a for a in range(xc.ndim) if a not in reduce_axes)
    n: Any = static_count(xc.shape, reduce_axes)
    if mask is None:
        keep = None
        x_kept = xc
    else:
        keep = xp.expand_dims(mask, axis=feature_axis)
        x_kept = xp.where(keep, xc, xp.zeros_like(xc))
        n = xp.sum(xp.astype(mask, xc.dtype))
    if all_sum is not None and isinstance(n, int):
        n = xp.asarray(n, dtype=xc.dtype, device=device(xc))
    total = xp.sum(x_kept, axis=reduce_axes)

    def safe(count: Any) -> Any:  # a divisor that is never 0
        return max(count, 1) if isinstance(count, int) else xp.where(count > 0, count, xp.ones_like(count))

    if fast_variance:
        total_sq = xp.sum(x_kept * x_kept, axis=reduce_axes)
        if all_sum is not None:
            n, total, total_sq = all_sum((n, total, total_sq))
        mean = total / safe(n)
        return n, mean, xp.clip(total_sq / safe(n) - mean * mean, min=0.0), None
    if all_sum is not None:
        n, total = all_sum((n, total))
    mean = total / safe(n)
    centered = xc - xp.reshape(mean, tuple(-1 if a == feature_axis else 1 for a in range(xc.ndim)))
    centered_kept = centered if keep is None else xp.where(keep, centered, xp.zeros_like(centered))
    total_sq_dev = xp.sum(centered_kept * centered_kept, axis=reduce_axes)
    if all_sum is not None:
        (total_sq_dev,) = all_sum((total_sq_dev,))
    return n, mean, total_sq_dev / safe(n), centered


def static_count(shape: Sequence[int], reduce_axes: Sequence[int]) -> int:
    """Values per feature that a shape alone implies (no mask, no sync)."""
    return math.prod([shape[a] for a in reduce_axes])  # a list: a generator breaks torch.compile graphs


def compute_dtype(xp: Any, *dtypes: Any) -> Any:
    """float64 if any operand is float64, else float32 (float16/bfloat16 are upcast)."""
    return xp.float64 if any(d == xp.float64 for d in dtypes) else xp.float32


def batch_norm(
    x: Array,
    running_mean: Array,
    running_var: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    reduce_axes: Sequence[int],
    epsilon: float = 1e-5,
    momentum: float = 0.99,
    training: bool = True,
    mask: Array | None = None,
    fast_variance: bool = False,
    unbiased_running_var: bool = True,
    all_sum: AllSum | None = None,
) -> BatchNormResult:
    """Normalise ``x`` over ``reduce_axes`` (non-negative) and update the running statistics.

    ``scale`` and ``bias`` are ``None`` when the layer is not affine. ``all_sum``
    makes the statistics those of the concatenated batches of a replica group;
    it is never called in inference. See the module docstring for the maths.
    """
    reduce_axes = tuple(reduce_axes)
    xp = check_inputs(x, mask, num_features=running_mean.shape[0], reduce_axes=reduce_axes)
    if not (type(x) is type(running_mean) is type(running_var)):  # one type: one namespace
        xp = array_namespace(x, running_mean, running_var)
    dtype = compute_dtype(xp, x.dtype, running_mean.dtype)
    feature_axis = next(a for a in range(x.ndim) if a not in reduce_axes)
    broadcast_shape = tuple(-1 if a == feature_axis else 1 for a in range(x.ndim))

    def cast(v: Array, to: Any = dtype) -> Array:  # astype(copy=False) without its call overhead
        return v if v.dtype == to else xp.astype(v, to)

    def per_feature(v: Array) -> Array:  # (C,) -> broadcastable against x
        return cast(v) if feature_axis == x.ndim - 1 else xp.reshape(cast(v), broadcast_shape)

    def normalize(centered: Array, var: Array) -> Array:
        factor = 1.0 / xp.sqrt(cast(var) + epsilon)
        if scale is not None:
            factor = cast(scale) * factor
        y = centered * per_feature(factor)
        if bias is not None:  # in place where the library allows it: no second input-sized array
            y += per_feature(bias)  # (immutable JAX arrays rebind; XLA fuses either form)
        return cast(y, x.dtype)

    xc = cast(x)
    n: Any = static_count(x.shape, reduce_axes)
    if not training or (mask is None and all_sum is None and n == 0):
        y = normalize(xc - per_feature(running_mean), running_var)
        return BatchNormResult(y, running_mean, running_var)
    if mask is None and all_sum is None and n == 1:
        raise argument_error("x", "more than 1 value per feature when training", tuple(x.shape))

    n, mean, var, centered = _moments(xc, mask, reduce_axes=reduce_axes, fast_variance=fast_variance, all_sum=all_sum)
    dynamic = not isinstance(n, int)
    # Synced without a mask, this replica's values alone make the global count >= its
    # static count, so it cannot be 0: no run-time fallback, and ``centered`` stays valid.
    may_be_empty = dynamic and (mask is not None or static_count(x.shape, reduce_axes) == 0)

    if unbiased_running_var:
        if dynamic:
            many = n > 1
            bessel = xp.where(many, n / xp.where(many, n - 1, xp.ones_like(n)), xp.ones_like(n))
        else:
            bessel = n / (n - 1)
    else:
        bessel = 1.0
    new_mean = momentum * cast(running_mean) + (1.0 - momentum) * mean
    new_var = momentum * cast(running_var) + (1.0 - momentum) * (var * bessel)

    if may_be_empty:  # n == 0 at run time: behave as inference, change nothing
        has_data = n > 0
        mean = xp.where(has_data, mean, cast(running_mean))
        var = xp.where(has_data, var, cast(running_var))
        centered = None  # the mean may now be the running mean
        new_mean = xp.where(has_data, new_mean, cast(running_mean))
        new_var = xp.where(has_data, new_var, cast(running_var))
    if centered is None:
        centered = xc - per_feature(mean)
    return BatchNormResult(
        normalize(centered, var),
        cast(new_mean, running_mean.dtype),
        cast(new_var, running_var.dtype),
    )
