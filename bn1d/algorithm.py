r"""The batch-normalization algorithm, written once against the Array API standard.

:func:`batch_norm` is a pure function: it takes arrays of any Array API library
(NumPy, JAX, PyTorch, ``array_api_strict``...), gets ``xp`` from
``array_api_compat.array_namespace`` and never branches on the library. The
backends only add state handling and, for cross-replica statistics, one of two
hooks: ``all_sum`` (a sum over the replicas; the two-pass variance takes two
rounds: the global mean, then the centred squares around it) or ``all_gather``
(each replica's count, mean and centred squares, merged by
:func:`combine_moments`: one round). JAX's ``psum`` and the NumPy replicas use
the first, ``torch.distributed`` the second; both give the statistics of the
concatenated batches, differing by rounding only.

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
    "AllGather",
    "AllSum",
    "BatchNormResult",
    "Moments",
    "batch_moments",
    "batch_norm",
    "check_inputs",
    "combine_moments",
    "compute_dtype",
    "running_statistics",
    "static_count",
]

Array = Any
#: The cross-replica hook: sums each array over the replicas of this replica's
#: group and returns the sums, in order and with the same shapes. The arrays are
#: per-feature vectors ``(C,)`` and scalar counts ``()``, in the compute dtype.
AllSum = Callable[[tuple[Array, ...]], Sequence[Array]]
#: The cross-replica gather hook, the one-round alternative to ``AllSum``: for each
#: array, the values of every replica of this replica's group stacked on a new
#: leading axis, ``(R, *shape)``, in the same replica order on every replica.
AllGather = Callable[[tuple[Array, ...]], Sequence[Array]]


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
    all_gather: AllGather | None = None,
) -> Moments:
    """The count, mean and biased variance that training normalises with, in the
    compute dtype. With a dynamic count of 0 the mean and variance are 0."""
    xp = array_namespace(x)
    xc = xp.astype(x, compute_dtype(xp, x.dtype), copy=False)
    return Moments(
        *_moments(
            xc, mask, reduce_axes=tuple(reduce_axes), fast_variance=fast_variance, all_sum=all_sum,
            all_gather=all_gather,
        )
    )  # fmt: skip


def _moments(
    xc: Array,
    mask: Array | None,
    *,
    reduce_axes: tuple[int, ...],
    fast_variance: bool,
    all_sum: AllSum | None,
    all_gather: AllGather | None = None,
) -> tuple[Any, Array, Array, Array | None]:
    """(count, mean, var, x - mean or None) of ``xc`` (already in the compute dtype).

    Synced, the two-pass variance needs either two rounds of ``all_sum`` (the
    global mean first, then the centred squares around it) or one ``all_gather``
    of each replica's (count, mean, centred squares), combined by
    :func:`combine_moments`; both stay exact where the one-pass formula cancels.
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
    synced = all_sum is not None or all_gather is not None
    if synced and isinstance(n, int):
        n = xp.asarray(n, dtype=xc.dtype, device=device(xc))
    total = xp.sum(x_kept, axis=reduce_axes)

    def safe(count: Any) -> Any:  # a divisor that is never 0
        return max(count, 1) if isinstance(count, int) else xp.where(count > 0, count, xp.ones_like(count))

    def centered_squares(mean: Array) -> tuple[Array, Array]:
        centered = xc - xp.reshape(mean, tuple(-1 if a == feature_axis else 1 for a in range(xc.ndim)))
        centered_kept = centered if keep is None else xp.where(keep, centered, xp.zeros_like(centered))
        return centered, xp.sum(centered_kept * centered_kept, axis=reduce_axes)

    if fast_variance:
        total_sq = xp.sum(x_kept * x_kept, axis=reduce_axes)
        if all_sum is not None:
            n, total, total_sq = all_sum((n, total, total_sq))
        elif all_gather is not None:  # every replica adds the same rows in the same order
            n, total, total_sq = (xp.sum(rows, axis=0) for rows in all_gather((n, total, total_sq)))
        mean = total / safe(n)
        return n, mean, xp.clip(total_sq / safe(n) - mean * mean, min=0.0), None
    if all_gather is not None:
        local_mean = total / safe(n)
        _, local_squares = centered_squares(local_mean)
        n, mean, var = combine_moments(*all_gather((n, local_mean, local_squares)))
        return n, mean, var, None  # x - mean is formed from the global mean by the caller
    if all_sum is not None:
        n, total = all_sum((n, total))
    mean = total / safe(n)
    centered, total_sq_dev = centered_squares(mean)
    if all_sum is not None:
        (total_sq_dev,) = all_sum((total_sq_dev,))
    return n, mean, total_sq_dev / safe(n), centered


def combine_moments(counts: Array, means: Array, squares: Array) -> tuple[Array, Array, Array]:
    r"""The count, mean and biased variance of a union of batches, from each
    batch's count ``counts`` ``(R,)``, mean ``means`` ``(R, C)`` and sum of squared
    deviations from its own mean ``squares`` ``(R, C)`` (Chan, Golub and LeVeque):

    .. math::

        n = \sum_r n_r, \quad \mu = \frac{1}{n}\sum_r n_r\mu_r, \quad
        \sigma^2 = \frac{1}{n}\Bigl(\sum_r M_r + \sum_r n_r(\mu_r - \mu)^2\Bigr)

    Every term is a sum of non-negative values: no cancellation, unlike
    ``E[x**2] - E[x]**2``. An empty batch (``n_r = 0``) contributes nothing; for
    ``n = 0`` the mean and variance are 0.
    """
    xp = array_namespace(counts, means, squares)
    n = xp.sum(counts, axis=0)
    safe_n = xp.where(n > 0, n, xp.ones_like(n))
    weights = xp.reshape(counts, (-1, 1))
    mean = xp.sum(weights * means, axis=0) / safe_n
    deviation = means - mean
    return n, mean, (xp.sum(squares, axis=0) + xp.sum(weights * deviation * deviation, axis=0)) / safe_n


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
    all_gather: AllGather | None = None,
) -> BatchNormResult:
    """Normalise ``x`` over ``reduce_axes`` (non-negative) and update the running statistics.

    ``scale`` and ``bias`` are ``None`` when the layer is not affine. ``all_sum``
    or ``all_gather`` (at most one) makes the statistics those of the
    concatenated batches of a replica group; neither is called in inference.
    See the module docstring for the maths.
    """
    if all_sum is not None and all_gather is not None:
        raise argument_error("all_gather", "None when all_sum is given (one cross-replica hook)", all_gather)
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
    synced = all_sum is not None or all_gather is not None
    n: Any = static_count(x.shape, reduce_axes)
    if not training or (mask is None and not synced and n == 0):
        y = normalize(xc - per_feature(running_mean), running_var)
        return BatchNormResult(y, running_mean, running_var)
    if mask is None and not synced and n == 1:
        raise argument_error("x", "more than 1 value per feature when training", tuple(x.shape))

    n, mean, var, centered = _moments(
        xc, mask, reduce_axes=reduce_axes, fast_variance=fast_variance, all_sum=all_sum, all_gather=all_gather
    )
    # Synced without a mask, this replica's values alone make the global count >= its
    # static count, so it cannot be 0: no run-time fallback, and ``centered`` stays valid.
    may_be_empty = not isinstance(n, int) and (mask is not None or static_count(x.shape, reduce_axes) == 0)
    new_mean, new_var = running_statistics(
        cast(running_mean), cast(running_var), n, mean, var, momentum=momentum,
        unbiased_running_var=unbiased_running_var, may_be_empty=may_be_empty,
    )  # fmt: skip
    if may_be_empty:  # n == 0 at run time: normalise as inference does
        has_data = n > 0
        mean = xp.where(has_data, mean, cast(running_mean))
        var = xp.where(has_data, var, cast(running_var))
        centered = None  # the mean may now be the running mean
    if centered is None:
        centered = xc - per_feature(mean)
    return BatchNormResult(
        normalize(centered, var),
        cast(new_mean, running_mean.dtype),
        cast(new_var, running_var.dtype),
    )


def running_statistics(
    running_mean: Array,
    running_var: Array,
    count: Any,
    mean: Array,
    var: Array,
    *,
    momentum: float,
    unbiased_running_var: bool = True,
    may_be_empty: bool = False,
) -> tuple[Array, Array]:
    """The running statistics after a training step on a batch of ``count``
    values per feature with ``mean`` and biased ``var`` (all in the compute dtype):
    ``momentum * old + (1 - momentum) * new``, the variance times ``n / (n - 1)``
    when unbiased (1 for a run-time count of 1). ``count`` is a Python int when
    the shape alone fixes it, else an array; ``may_be_empty``: it may be 0 at run
    time, and then the running statistics are returned unchanged."""
    xp = array_namespace(mean, running_mean)
    dynamic = not isinstance(count, int)
    if not unbiased_running_var:
        bessel: Any = 1.0
    elif dynamic:
        many = count > 1
        bessel = xp.where(many, count / xp.where(many, count - 1, xp.ones_like(count)), xp.ones_like(count))
    else:
        bessel = count / (count - 1)
    new_mean = momentum * running_mean + (1.0 - momentum) * mean
    new_var = momentum * running_var + (1.0 - momentum) * (var * bessel)
    if may_be_empty:
        has_data = count > 0
        new_mean = xp.where(has_data, new_mean, running_mean)
        new_var = xp.where(has_data, new_var, running_var)
    return new_mean, new_var
