r"""The batch-normalization algorithm, written once against the Array API standard.

:func:`batch_norm` is a pure function: it takes arrays of any Array API library
(NumPy, JAX, PyTorch, ``array_api_strict``...), gets ``xp`` from
``array_api_compat.array_namespace`` and never branches on the library. The
backends only add state handling and, for cross-replica statistics, one of two
hooks: ``all_sum`` (a sum over the replicas, two rounds: the shift, then the
shifted sums) or ``all_gather`` (every replica's count, shift and shifted sums:
one round). JAX's ``psum`` and the NumPy replicas use the first,
``torch.distributed`` the second; both give the statistics of the concatenated
batches, differing by rounding only.

The maths, per feature ``c`` (the one axis that is not reduced), with ``M`` the
set of unmasked positions over all synced replicas and ``n = |M|``:

.. math::

    \mu = \frac{1}{n}\sum_{i\in M} x_i, \qquad
    \sigma^2 = \frac{1}{n}\sum_{i\in M} (x_i - \mu)^2 \quad\text{(biased)}

    y = (x - \mu)\,\bigl(\gamma\,/\sqrt{\sigma^2 + \epsilon}\bigr) + \beta

    \hat\mu \leftarrow m\,\hat\mu + (1 - m)\,\mu, \qquad
    \hat\sigma^2 \leftarrow m\,\hat\sigma^2 + (1 - m)\,\sigma^2\,\frac{n}{n-1}

How it is computed (the default variance; ``docs/numerics.md`` has the error
analysis): the data are shifted by ``K``, one unmasked sample per feature
(the mean of the replicas' samples under ``all_sum``), and one pass gives
``S1 = sum(x - K)`` and ``S2 = sum((x - K)**2)``, accumulated in float64
wherever the array library has float64 on the input's device (else in the
compute dtype). Then ``d = S1 / n`` (the mean is ``K + d``, never rounded to
the input's precision), ``sigma**2 = S2 / n - d**2`` and
``y = (x - K) * f + (beta - d * f)`` with ``f = gamma / sqrt(sigma**2 + eps)``.
``x - K`` is exact when ``|mean| >> sigma`` (Sterbenz), and ``d`` is of the
order of ``sigma``, so nothing cancels; the shift receives no gradient
(``stop_gradient``, the adapter's hook), which is exact because the statistics
do not depend on ``K``.

With ``fast_variance=True`` the variance is BrainPy's and Flax's one-pass
``max(0, sum(x**2)/n - mu**2)`` in the compute dtype, which cancels
catastrophically when ``|mu| >> sigma``. With ``unbiased_running_var=False`` the
Bessel factor ``n / (n - 1)`` is dropped (BrainPy <= 2.7, Flax, Keras). In
inference ``mu`` and ``sigma**2`` are the running statistics and nothing is
updated.

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
    "accumulation_dtype",
    "batch_moments",
    "batch_norm",
    "check_inputs",
    "combine_moments",
    "combine_shifted",
    "compute_dtype",
    "running_statistics",
    "static_count",
]

Array = Any
#: The cross-replica hook: sums each array over the replicas of this replica's
#: group and returns the sums, in order and with the same shapes, identical on
#: every replica of the group (as an all-reduce is). The arrays are per-feature
#: vectors ``(C,)`` and scalar counts ``()``.
AllSum = Callable[[tuple[Array, ...]], Sequence[Array]]
#: The cross-replica gather hook, the one-round alternative to ``AllSum``: for each
#: array, the values of every replica of this replica's group stacked on a new
#: leading axis, ``(R, *shape)``, in the same replica order on every replica.
AllGather = Callable[[tuple[Array, ...]], Sequence[Array]]
#: The adapter's ``stop_gradient`` (``jax.lax.stop_gradient``, ``Tensor.detach``);
#: the identity for libraries without autodiff.
StopGradient = Callable[[Array], Array]


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
    """Batch statistics in the shifted representation.

    ``count``: values per feature (a Python int when the shape alone fixes it,
    else an array that may be 0); ``shift``: ``K`` per feature ``(C,)``, in the
    compute dtype; ``offset``: ``d = mean - K`` and ``var``: the biased variance,
    both in the accumulation dtype; ``centered``: ``x - K`` (every position, in
    the compute dtype). The mean is ``shift + offset`` (:meth:`mean`); with a
    run-time count of 0 the shift is the fallback, the offset and variance 0.
    """

    count: Any
    shift: Array
    offset: Array
    var: Array
    centered: Array

    def mean(self) -> Array:
        """``shift + offset`` in the accumulation dtype (not rounded to the input's precision)."""
        xp = array_namespace(self.offset)
        return xp.astype(self.shift, self.offset.dtype) + self.offset


def compute_dtype(xp: Any, *dtypes: Any) -> Any:
    """float64 if any operand is float64, else float32 (float16/bfloat16 are upcast)."""
    return xp.float64 if any(d == xp.float64 for d in dtypes) else xp.float32


def accumulation_dtype(xp: Any, dtype: Any, where: Any) -> Any:
    """The dtype sums are accumulated in: float64 when the library has it on the
    device ``where`` (NumPy, PyTorch on CPU and CUDA, JAX with ``jax_enable_x64``),
    else ``dtype`` (JAX's default float32, whose reductions XLA accumulates
    accurately; see ``docs/numerics.md``)."""
    if dtype == xp.float64:
        return dtype
    info = getattr(xp, "__array_namespace_info__", None)
    if info is None:
        return dtype
    available = info().dtypes(device=where, kind="real floating")
    return xp.float64 if "float64" in available else dtype


def static_count(shape: Sequence[int], reduce_axes: Sequence[int]) -> int:
    """Values per feature that a shape alone implies (no mask, no sync)."""
    return math.prod([shape[a] for a in reduce_axes])  # a list: a generator breaks torch.compile graphs


def _first_kept(xc: Array, mask: Array | None, reduce_axes: tuple[int, ...]) -> Array:
    """``x`` at the first unmasked position, per feature ``(C,)`` (position 0 when
    nothing is kept: the caller replaces that value)."""
    xp = array_namespace(xc)
    if mask is None:
        return xc[tuple(0 if a in reduce_axes else slice(None) for a in range(xc.ndim))]
    position = xp.argmax(xp.astype(xp.reshape(mask, (-1,)), xp.int8))  # the first True
    picked = xc
    for axis, size in zip(reversed(sorted(reduce_axes)), reversed(tuple(mask.shape))):  # unravel the position
        picked = xp.take(picked, xp.reshape(position % size, (1,)), axis=axis)
        position = position // size
    return xp.reshape(picked, (-1,))


def batch_moments(
    x: Array,
    mask: Array | None = None,
    *,
    reduce_axes: Sequence[int],
    fast_variance: bool = False,
    all_sum: AllSum | None = None,
    all_gather: AllGather | None = None,
    fallback: Array | None = None,
    stop_gradient: StopGradient | None = None,
    accumulate: Any = None,
) -> Moments:
    """The :class:`Moments` that training normalises with.

    ``x`` is cast to the compute dtype; ``fallback`` ``(C,)`` (default 0) is the
    shift used when no value is kept (the running mean, so that an empty batch
    normalises as inference does); ``accumulate`` overrides the accumulation
    dtype (default: :func:`accumulation_dtype`).
    """
    xp = array_namespace(x)
    dtype = compute_dtype(xp, x.dtype)
    xc = x if x.dtype == dtype else xp.astype(x, dtype)
    acc = accumulation_dtype(xp, dtype, device(xc)) if accumulate is None else accumulate
    feature_axis = next(a for a in range(xc.ndim) if a not in reduce_axes)
    if fallback is None:
        fallback = xp.zeros((xc.shape[feature_axis],), dtype=dtype, device=device(xc))
    elif fallback.dtype != dtype:
        fallback = xp.astype(fallback, dtype)
    return _moments(
        xc, mask, reduce_axes=tuple(reduce_axes), fast_variance=fast_variance, all_sum=all_sum,
        all_gather=all_gather, fallback=fallback, stop_gradient=stop_gradient or _identity, acc=acc,
    )  # fmt: skip


def _identity(value: Array) -> Array:
    return value


def _nonnegative(xp: Any, value: Array) -> Array:
    """``max(value, 0)`` (an array operand: a Python scalar makes array-api-compat call
    ``torch.result_type``, which ``torch.compile(fullgraph=True)`` cannot trace)."""
    return xp.maximum(value, xp.zeros_like(value))


def _moments(
    xc: Array,
    mask: Array | None,
    *,
    reduce_axes: tuple[int, ...],
    fast_variance: bool,
    all_sum: AllSum | None,
    all_gather: AllGather | None,
    fallback: Array,
    stop_gradient: StopGradient,
    acc: Any,
    recompute_shifted: bool = False,
) -> Moments:
    """:func:`batch_moments` of ``xc`` (already in the compute dtype)."""
    xp = array_namespace(xc)
    where = device(xc)
    feature_axis = next(a for a in range(xc.ndim) if a not in reduce_axes)
    broadcast = tuple(-1 if a == feature_axis else 1 for a in range(xc.ndim))
    keep = None if mask is None else xp.expand_dims(mask, axis=feature_axis)
    synced = all_sum is not None or all_gather is not None
    static_n = static_count(xc.shape, reduce_axes)
    count_dtype = xc.dtype if fast_variance else acc
    n: Any = static_n if mask is None else xp.sum(xp.astype(mask, count_dtype))
    if synced and isinstance(n, int):
        n = xp.asarray(n, dtype=count_dtype, device=where)

    def kept(v: Array) -> Array:
        return v if keep is None else xp.where(keep, v, xp.zeros_like(v))

    def safe(count: Any) -> Any:  # a divisor that is never 0
        return max(count, 1) if isinstance(count, int) else xp.where(count > 0, count, xp.ones_like(count))

    def wide(v: Array) -> Array:
        return v if v.dtype == acc else xp.astype(v, acc)

    if fast_variance:  # BrainPy's formula, in the compute dtype
        x_kept = kept(xc)
        total, total_sq = xp.sum(x_kept, axis=reduce_axes), xp.sum(x_kept * x_kept, axis=reduce_axes)
        if all_sum is not None:
            n, total, total_sq = all_sum((n, total, total_sq))
        elif all_gather is not None:  # every replica adds the same rows in the same order
            n, total, total_sq = (xp.sum(rows, axis=0) for rows in all_gather((n, total, total_sq)))
        mean = total / safe(n)
        var = _nonnegative(xp, total_sq / safe(n) - mean * mean)
        if not isinstance(n, int):
            mean = xp.where(n > 0, mean, fallback)
        zero = xp.zeros_like(wide(mean))
        return Moments(n, mean, zero, wide(var), xc - xp.reshape(mean, broadcast))

    # The local shift: one kept sample per feature (the fallback when nothing is kept).
    local = fallback if static_n == 0 else stop_gradient(_first_kept(xc, mask, reduce_axes))
    if mask is not None:
        local = xp.where(n > 0, local, fallback)
    if all_sum is not None:  # round 1: every replica of the group shifts by the same K
        has = xp.astype(n > 0, acc)
        shift_sum, nonempty = all_sum((has * wide(local), has))
        shift = xp.where(nonempty > 0, shift_sum / safe(nonempty), wide(fallback))
        local = stop_gradient(xp.astype(shift, xc.dtype))
    centered = xc - xp.reshape(local, broadcast)
    s1 = xp.sum(kept(centered), axis=reduce_axes, dtype=acc)
    if recompute_shifted:  # S2 around K2, y around K3: K's neighbours one ulp away, distinct
        # expressions that a compiler cannot merge into one materialised x - K (K - K2 and
        # K - K3 are exact in the accumulation dtype)
        k2, k3 = (xp.nextafter(local, xp.asarray(v, dtype=local.dtype, device=where)) for v in (math.inf, -math.inf))
        squared = kept(xc - xp.reshape(k2, broadcast))
        step2, step3 = wide(local) - wide(k2), wide(local) - wide(k3)
    else:
        k3, squared, step2, step3 = local, kept(centered), 0.0, 0.0
    s2 = xp.sum(squared * squared, axis=reduce_axes, dtype=acc)
    if all_gather is not None:  # one round: combine in the frame of replica 0's shift
        local_offset = s1 / safe(n)
        local_squares = _nonnegative(xp, s2 - n * (local_offset + step2) ** 2)
        n, offset, var, frame = combine_shifted(*all_gather((n, wide(local), s1, local_squares)))
        offset = offset + (frame - wide(local))
    else:
        if all_sum is not None:  # round 2
            n, s1, s2 = all_sum((n, s1, s2))
        offset = s1 / safe(n)
        var = _nonnegative(xp, s2 / safe(n) - (offset + step2) ** 2)
    if recompute_shifted:
        centered = xc - xp.reshape(k3, broadcast)
    return Moments(n, k3, offset + step3, var, centered)


def combine_moments(counts: Array, means: Array, squares: Array) -> tuple[Array, Array, Array]:
    r"""The count, mean and biased variance of a union of batches, from each
    batch's count ``counts`` ``(R,)``, mean ``means`` ``(R, C)`` and sum of squared
    deviations from its own mean ``squares`` ``(R, C)`` (Chan, Golub and LeVeque):

    .. math::

        n = \sum_r n_r, \quad \mu = \frac{1}{n}\sum_r n_r\mu_r, \quad
        \sigma^2 = \frac{1}{n}\Bigl(\sum_r M_r + \sum_r n_r(\mu_r - \mu)^2\Bigr)

    Every term is a sum of non-negative values: no cancellation, unlike
    ``E[x**2] - E[x]**2``. An empty batch (``n_r = 0``) contributes nothing; for
    ``n = 0`` the mean and variance are 0. The means may be given relative to
    any common reference (the core passes them relative to one replica's shift).
    """
    xp = array_namespace(counts, means, squares)
    n = xp.sum(counts, axis=0)
    safe_n = xp.where(n > 0, n, xp.ones_like(n))
    weights = xp.reshape(counts, (-1, 1))
    mean = xp.sum(weights * means, axis=0) / safe_n
    deviation = means - mean
    return n, mean, (xp.sum(squares, axis=0) + xp.sum(weights * deviation * deviation, axis=0)) / safe_n


def combine_shifted(counts: Array, shifts: Array, sums: Array, squares: Array) -> tuple[Array, Array, Array, Array]:
    """The gathered rows of every replica, each replica's count ``(R,)``, shift
    ``K_r``, sum ``S1_r = sum(x - K_r)`` and centred squares ``M_r`` ``(R, C)``,
    combined: ``(n, mean - K_0, var, K_0)``, in the frame of replica 0's shift,
    where ``K_r - K_0`` is small (and exact when the shifts are within a factor 2
    of each other) while ``K_r`` alone may be ``>> sigma``."""
    xp = array_namespace(counts, shifts)
    frame = shifts[0, ...]
    safe_counts = xp.where(counts > 0, counts, xp.ones_like(counts))
    n, offset, var = combine_moments(counts, (shifts - frame) + sums / xp.reshape(safe_counts, (-1, 1)), squares)
    return n, offset, var, frame


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
    stop_gradient: StopGradient | None = None,
    recompute_shifted: bool = False,
) -> BatchNormResult:
    """Normalise ``x`` over ``reduce_axes`` (non-negative) and update the running statistics.

    ``scale`` and ``bias`` are ``None`` when the layer is not affine. ``all_sum``
    or ``all_gather`` (at most one) makes the statistics those of the
    concatenated batches of a replica group; neither is called in inference.
    ``stop_gradient`` is the adapter's (the shift must not receive gradient);
    ``recompute_shifted=True`` suits compilers that fuse elementwise work into
    reductions (XLA): ``x - K`` is formed once per pass instead of materialised
    once and read three times, with shifts one ulp apart (``nextafter``, which has
    no derivative: differentiate it with ``stop_gradient`` given). See the module
    docstring for the maths.
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

    def per_feature(v: Array) -> Array:  # (C,) in the compute dtype, broadcastable against x
        return cast(v) if feature_axis == x.ndim - 1 else xp.reshape(cast(v), broadcast_shape)

    def normalize(centered: Array, offset: Array | None, var: Array) -> Array:
        """``centered * f + (bias - offset * f)``, ``f = scale / sqrt(var + eps)``:
        per-feature terms in ``var``'s dtype, the input-sized ones in the compute dtype."""
        factor = 1.0 / xp.sqrt(var + epsilon)
        if scale is not None:
            factor = cast(scale, var.dtype) * factor
        y = centered * per_feature(factor)
        constant = None if bias is None else cast(bias, var.dtype)
        if offset is not None:
            constant = -offset * factor if constant is None else constant - offset * factor
        if constant is not None:  # in place where the library allows it: no second input-sized array
            y += per_feature(constant)  # (immutable JAX arrays rebind; XLA fuses either form)
        return cast(y, x.dtype)

    xc = cast(x)
    synced = all_sum is not None or all_gather is not None
    n: Any = static_count(x.shape, reduce_axes)
    if not training or (mask is None and not synced and n == 0):
        y = normalize(xc - per_feature(running_mean), None, cast(running_var))
        return BatchNormResult(y, running_mean, running_var)
    if mask is None and not synced and n == 1:
        raise argument_error("x", "more than 1 value per feature when training", tuple(x.shape))

    acc = accumulation_dtype(xp, dtype, device(xc))
    moments = _moments(
        xc, mask, reduce_axes=reduce_axes, fast_variance=fast_variance, all_sum=all_sum, all_gather=all_gather,
        fallback=cast(running_mean), stop_gradient=stop_gradient or _identity, acc=acc,
        recompute_shifted=recompute_shifted,
    )  # fmt: skip
    count, offset, var = moments.count, moments.offset, moments.var
    # Synced without a mask, this replica's values alone make the global count >= its
    # static count, so it cannot be 0: no run-time fallback.
    may_be_empty = not isinstance(count, int) and (mask is not None or static_count(x.shape, reduce_axes) == 0)
    stats_dtype = var.dtype
    new_mean, new_var = running_statistics(
        cast(running_mean, stats_dtype), cast(running_var, stats_dtype), count, moments.mean(), var,
        momentum=momentum, unbiased_running_var=unbiased_running_var, may_be_empty=may_be_empty,
    )  # fmt: skip
    if may_be_empty:  # n == 0 at run time: the shift is the running mean; normalise as inference does
        has_data = count > 0
        offset = xp.where(has_data, offset, xp.zeros_like(offset))
        var = xp.where(has_data, var, cast(running_var, stats_dtype))
    return BatchNormResult(
        normalize(moments.centered, offset, var),
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
    values per feature with ``mean`` and biased ``var`` (all in one dtype):
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
