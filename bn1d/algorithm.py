r"""The batch-normalization algorithm, written once against the Array API standard.

This docstring is the one statement of the maths; the backends refer to it. The
rules it implements are those of ``docs/spec.md``: R2 (the statistics and ``y``,
R2.7 the accuracy rule), R3 (running statistics), R4 (synced statistics) and R5
(masks).

:func:`batch_norm` is a pure function: it takes arrays of any Array API library
(NumPy, JAX, PyTorch, ``array_api_strict``...), gets ``xp`` from
``array_api_compat.array_namespace`` and never branches on the library. It takes
the validated :class:`~bn1d.config.BatchNormConfig`, the parameters and the state
as mappings, and returns ``y`` and the new state. The backends add state
handling and lend it :class:`Hooks`: a cross-replica hook (``all_sum``, a sum over
the replicas in two rounds: the shift, then the shifted sums; or ``all_gather``,
every replica's count, shift and shifted sums in one round) and their autodiff's
``stop_gradient``. :func:`batch_norm_vjp` is the analytic backward pass.

Those two are the checked public entries (``bn1d.validation`` holds the checks). The
layers check at their own boundary and call the trusted :func:`forward` and
:func:`backward`, with their backend's private :class:`Tuning` (speed settings that
leave the numbers unchanged); the rest of this module is their machinery, shared with
the adapters but not exported.

The maths, per feature ``c`` (the one axis that is not reduced), with ``M`` the
set of unmasked positions over all synced replicas and ``n = |M|``:

.. math::

    \mu = \frac{1}{n}\sum_{i\in M} x_i, \qquad
    \sigma^2 = \frac{1}{n}\sum_{i\in M} (x_i - \mu)^2 \quad\text{(biased)}

    y = (x - \mu)\,\bigl(\gamma\,/\sqrt{\sigma^2 + \epsilon}\bigr) + \beta

    \hat\mu \leftarrow m\,\hat\mu + (1 - m)\,\mu, \qquad
    \hat\sigma^2 \leftarrow m\,\hat\sigma^2 + (1 - m)\,\sigma^2\,\frac{n}{n-1}

``momentum=None`` is PyTorch's cumulative average: ``m = 1 - 1/k`` for the
``k``-th training call that saw data (``num_batches_tracked`` in the state). With
``unbiased_running_var=False`` the Bessel factor ``n / (n - 1)`` is dropped
(BrainPy <= 2.7, Flax, Keras). In inference ``mu`` and ``sigma**2`` are the
running statistics and nothing is updated; with ``track_running_stats=False``
there are none: batch statistics normalise in inference too (local ones, with
no communication), and the state is empty.

How it is computed (``docs/numerics.md`` has the error analysis): the data are
shifted by ``K``, one unmasked sample per feature (the mean of the replicas'
samples under ``all_sum``), and one pass gives ``S1 = sum(x - K)`` and
``S2 = sum((x - K)**2)``, accumulated in float64 wherever the array library has
float64 on the input's device (else in the compute dtype). Then ``d = S1 / n``
(the mean is ``K + d``, never rounded to the input's precision),
``sigma**2 = S2 / n - d**2`` and ``y = (x - K) * f + (beta - d * f)`` with
``f = gamma / sqrt(sigma**2 + eps)``. ``x - K`` is exact when ``|mean| >> sigma``
(Sterbenz) and ``d`` is of the order of ``sigma``, so nothing cancels; the shift
receives no gradient (the statistics do not depend on it). With
``fast_variance=True`` the variance is BrainPy's and Flax's one-pass
``max(0, sum(x**2)/n - mu**2)`` in the compute dtype, which cancels
catastrophically when ``|mu| >> sigma``.

Edge cases: ``n == 1`` raises where the batch's statistics normalise (training, or
no running statistics) and the input's shape alone says so (no mask, no sync, every
reduced dimension known); when ``n`` is only known at run time and is 1, the Bessel
factor is 1. A reduced dimension unknown at trace time (``None`` in the Array API, a
symbolic one under ``jax.export``) makes ``n`` a run-time count: the known sizes times
the others counted from the data (:func:`static_count`). ``n == 0`` makes
the call behave as inference: the running statistics are returned unchanged and
nothing is NaN (without running statistics, mean 0 and variance 1 normalise).

float16 and bfloat16 inputs are reduced in float32, float64 inputs (or float64
statistics) in float64; ``y`` has the input's dtype and the new statistics keep
theirs.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from array_api_compat import array_namespace, device

from .config import BatchNormConfig
from .validation import check_call, refuse_one_value

__all__ = [
    "AllGather",
    "AllSum",
    "BatchNormResult",
    "Hooks",
    "batch_norm",
    "batch_norm_vjp",
    "combine_moments",
    "combine_shifted",
]

Array = Any


class AllSum(Protocol):
    """Sums each array over the replicas of this replica's group and returns the sums,
    in order and with the same shapes, identical on every replica of the group (as an
    all-reduce is). The arrays are per-feature vectors ``(C,)`` and scalar counts."""

    def __call__(self, arrays: tuple[Array, ...], /) -> Sequence[Array]: ...


class AllGather(Protocol):
    """The one-round alternative to :class:`AllSum`: for each array, the values of every
    replica of this replica's group stacked on a new leading axis, ``(R, *shape)``, in
    the same replica order on every replica."""

    def __call__(self, arrays: tuple[Array, ...], /) -> Sequence[Array]: ...


def _identity(value: Array) -> Array:
    return value


class Hooks(NamedTuple):
    """What a backend lends the algorithm.

    Attributes
    ----------
    all_sum, all_gather : AllSum or AllGather, optional
        At most one cross-replica hook, used in training only.
    stop_gradient : callable
        The backend's autodiff barrier (``jax.lax.stop_gradient``, ``Tensor.detach``):
        the shift must not receive gradient. The identity by default.
    """

    all_sum: AllSum | None = None
    all_gather: AllGather | None = None
    stop_gradient: Callable[[Array], Array] = _identity

    @property
    def synced(self) -> bool:
        return self.all_sum is not None or self.all_gather is not None


class Tuning(NamedTuple):
    """A backend's private speed settings for the trusted entries :func:`forward` and
    :func:`backward` (the numbers are the same with or without them):
    ``recompute_shifted`` for compilers that fuse elementwise work into reductions (XLA):
    ``x - K`` is then formed once per pass, with shifts one ulp apart (``nextafter``,
    which has no derivative: the backend's ``stop_gradient`` covers it), instead of
    materialised once and read three times; ``fold_rows`` for libraries whose casting
    sums run a loop per row (NumPy; see :func:`_feature_sums`)."""

    recompute_shifted: bool = False
    fold_rows: bool = False


_UNTUNED = Tuning()


class BatchNormResult(NamedTuple):
    """``y`` and the state after the call (the same mapping in inference)."""

    y: Array
    state: Mapping[str, Array]


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

    def mean(self, xp: Any = None) -> Array:
        """``shift + offset`` in the accumulation dtype (not rounded to the input's
        precision); ``xp``: the arrays' namespace, if the caller has it."""
        xp = array_namespace(self.offset) if xp is None else xp
        return _cast(xp, self.shift, self.offset.dtype) + self.offset


def compute_dtype(xp: Any, *dtypes: Any) -> Any:
    """float64 if any operand is float64, else float32 (float16/bfloat16 are upcast)."""
    return xp.float64 if any(d == xp.float64 for d in dtypes) else xp.float32


def call_dtype(xp: Any, dtype: Any, params: Mapping[str, Array], state: Mapping[str, Array]) -> Any:
    """The compute dtype of a call on input of ``dtype``: :func:`compute_dtype` of it and
    the running statistics' dtype (the parameters' without running statistics)."""
    reference = state.get("running_mean")
    reference = params.get("scale") if reference is None else reference
    return compute_dtype(xp, dtype, *([] if reference is None else [reference.dtype]))


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


def _known(size: Any) -> bool:
    """Whether a dimension is a number at trace time: not ``None`` (the Array API's unknown
    dimension, ndonnx's symbolic ones) nor a symbolic expression (``jax.export``'s)."""
    return isinstance(size, int) or isinstance(size, numbers.Integral)  # int first: torch.compile traces it


def static_count(shape: Sequence[Any], reduce_axes: Sequence[int]) -> int | None:
    """Values per feature that a shape alone implies (no mask, no sync); ``None`` when a
    reduced dimension is unknown until run time (:func:`_known`) and no known one is 0."""
    sizes = [shape[a] for a in reduce_axes]  # lists: a generator breaks torch.compile graphs
    known = math.prod([size for size in sizes if _known(size)])
    return known if known == 0 or all([_known(size) for size in sizes]) else None


def _size(xp: Any, v: Array, axis: int, dtype: Any) -> Any:
    """``v.shape[axis]``: the int where it is known, else counted from the data at run
    time, an array of ``dtype`` (a sum of ones along one line of ``v``: exact while the
    size is an integer of ``dtype``)."""
    size = v.shape[axis]
    if _known(size):
        return size
    line = v[tuple(slice(None) if a == axis else 0 for a in range(v.ndim))]
    return xp.sum(xp.ones_like(line, dtype=dtype), dtype=dtype)


def _run_time_count(xp: Any, v: Array, reduce_axes: Sequence[int], dtype: Any) -> Any:
    """Values per feature of ``v`` over ``reduce_axes`` when :func:`static_count` is ``None``:
    the known sizes times the others counted at run time (:func:`_size`), an array of ``dtype``."""
    count: Any = 1
    for axis in reduce_axes:
        count = count * _size(xp, v, axis, dtype)
    return count


@functools.lru_cache(maxsize=64)
def _layout(reduce_axes: tuple[int, ...]) -> tuple[int, tuple[int, ...], tuple[Any, ...]]:
    """For an input whose axes other than ``reduce_axes`` are one feature axis: that
    axis, the broadcastable shape of a per-feature vector, and the index of the
    first position (computed once per layout: a call on small inputs is mostly such
    bookkeeping)."""
    ndim = len(reduce_axes) + 1
    feature_axis = next(a for a in range(ndim) if a not in reduce_axes)
    broadcast = tuple(-1 if a == feature_axis else 1 for a in range(ndim))
    first = tuple(0 if a in reduce_axes else slice(None) for a in range(ndim))
    return feature_axis, broadcast, first


def _first_kept(xp: Any, xc: Array, mask: Array | None, reduce_axes: tuple[int, ...]) -> Array:
    """``x`` at the first unmasked position, per feature ``(C,)`` (position 0 when
    nothing is kept: the caller replaces that value)."""
    if mask is None:
        return xc[_layout(reduce_axes)[2]]
    position = xp.argmax(xp.astype(xp.reshape(mask, (-1,)), xp.int8))  # the first True
    picked = xc
    for axis, mask_axis in zip(reversed(sorted(reduce_axes)), reversed(range(mask.ndim))):  # unravel the position
        size = _size(xp, mask, mask_axis, position.dtype)
        picked = xp.take(picked, xp.reshape(position % size, (1,)), axis=axis)
        position = position // size
    return xp.reshape(picked, (-1,))


#: Values per row that :func:`_feature_sums` folds rows into: where NumPy's float64 sums of
#: float32 data were fastest (``docs/performance.md`` has the measurements).
FOLD_WIDTH = 2048


def _feature_sums(xp: Any, v: Array, reduce_axes: tuple[int, ...], acc: Any, fold: bool) -> Array:
    """``sum(v)`` over ``reduce_axes`` in the accumulation dtype ``acc``, ``(C,)``.

    With ``fold`` (``Hooks.fold_rows``): NumPy's sum that casts (float32 values into
    float64) runs through its casting loop, one short loop per row of ``C`` values;
    with the features last, ``k`` rows
    (``k`` a power of two dividing their number, ``k * C <= FOLD_WIDTH``) are seen as one
    row of ``k * C`` (a reshape of the leading axes), summed, then the ``k`` partial sums
    of each feature are added: the same float64 sum in another order, and the same
    error bound (``docs/numerics.md``), faster for NumPy (``docs/performance.md``).
    Other sums are the plain ``xp.sum``. (A library that compiles for
    symbolic shapes must not fold: ``k`` is a decision on the batch size, a guard under
    ``torch.compile``, which recompiled for each power of two dividing it.)"""
    ndim = v.ndim
    if not fold or v.dtype == acc or reduce_axes != tuple(range(ndim - 1)):
        return xp.sum(v, axis=reduce_axes, dtype=acc)
    c = v.shape[-1]
    rows = math.prod(v.shape[:-1])
    k = 1
    while 2 * k <= rows and rows % (2 * k) == 0 and 2 * k * c <= FOLD_WIDTH:
        k *= 2
    if k == 1:
        return xp.sum(v, axis=reduce_axes, dtype=acc)
    partial = xp.sum(xp.reshape(v, (rows // k, k * c)), axis=0, dtype=acc)
    return xp.sum(xp.reshape(partial, (k, c)), axis=0)


def _broadcastable(xp: Any, v: Array, broadcast: tuple[int, ...]) -> Array:
    """A per-feature ``(C,)`` vector reshaped to ``broadcast`` (from :func:`_layout`): of
    the input's rank, so that no operation relies on rank promotion (which JAX's
    ``jax_numpy_rank_promotion="raise"`` refuses)."""
    return xp.reshape(v, broadcast)


def _cast(xp: Any, v: Array, dtype: Any) -> Array:
    """``v`` in ``dtype``: ``astype(copy=False)`` without its call where the dtype matches."""
    return v if v.dtype == dtype else xp.astype(v, dtype)


def _nonnegative(xp: Any, value: Array) -> Array:
    """``max(value, 0)`` (an array operand: a Python scalar makes array-api-compat call
    ``torch.result_type``, which ``torch.compile(fullgraph=True)`` cannot trace)."""
    return xp.maximum(value, xp.zeros_like(value))


def batch_moments(
    x: Array,
    mask: Array | None = None,
    *,
    reduce_axes: Sequence[int],
    fast_variance: bool = False,
    hooks: Hooks = Hooks(),
    fallback: Array | None = None,
    accumulate: Any = None,
    tuning: Tuning = _UNTUNED,
) -> Moments:
    """The :class:`Moments` that training normalises with.

    ``x`` is cast to the compute dtype; ``fallback`` ``(C,)`` (default 0) is the
    shift used when no value is kept (the running mean, so that an empty batch
    normalises as inference does); ``accumulate`` overrides the accumulation
    dtype (default: :func:`accumulation_dtype`).
    """
    xp = array_namespace(x)
    dtype = compute_dtype(xp, x.dtype)
    xc = _cast(xp, x, dtype)
    acc = accumulation_dtype(xp, dtype, device(xc)) if accumulate is None else accumulate
    reduce_axes = tuple(reduce_axes)
    if fallback is None:
        fallback = xp.zeros((xc.shape[_layout(reduce_axes)[0]],), dtype=dtype, device=device(xc))
    return _moments(xp, xc, mask, reduce_axes, fast_variance, hooks, _cast(xp, fallback, dtype), acc, tuning)


def _moments(
    xp: Any,
    xc: Array,
    mask: Array | None,
    reduce_axes: tuple[int, ...],
    fast: bool,
    hooks: Hooks,
    fallback: Array,
    acc: Any,
    tuning: Tuning,
) -> Moments:
    """:func:`batch_moments` of ``xc`` (already in the compute dtype; ``xp`` its namespace)."""
    where = device(xc)
    feature_axis, broadcast, _ = _layout(reduce_axes)
    keep = None if mask is None else xp.expand_dims(mask, axis=feature_axis)
    all_sum, all_gather, stop_gradient = hooks.all_sum, hooks.all_gather, hooks.stop_gradient
    static_n = static_count(xc.shape, reduce_axes)
    count_dtype = xc.dtype if fast else acc
    n: Any = static_n if mask is None else xp.sum(xp.astype(mask, count_dtype))
    if n is None:  # a dimension known only at run time (unknown or symbolic): counted there
        n = _run_time_count(xp, xc, reduce_axes, count_dtype)
    if hooks.synced and isinstance(n, int):
        n = xp.asarray(n, dtype=count_dtype, device=where)

    def kept(v: Array) -> Array:
        return v if keep is None else xp.where(keep, v, xp.zeros_like(v))

    def safe(count: Any) -> Any:  # a divisor that is never 0
        return max(count, 1) if isinstance(count, int) else xp.where(count > 0, count, xp.ones_like(count))

    def wide(v: Array) -> Array:
        return _cast(xp, v, acc)

    if fast:  # BrainPy's formula, in the compute dtype
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
        return Moments(n, mean, xp.zeros_like(wide(mean)), wide(var), xc - _broadcastable(xp, mean, broadcast))

    # The local shift: one kept sample per feature; the fallback when nothing is kept or the
    # sample is not finite (an inf shift would make every x - K NaN, where the mean is inf).
    local = fallback if static_n == 0 else stop_gradient(_first_kept(xp, xc, mask, reduce_axes))
    usable = xp.isfinite(local) if mask is None else (n > 0) & xp.isfinite(local)
    local = xp.where(usable, local, fallback)
    if all_sum is not None:  # round 1: every replica of the group shifts by the same K
        has = xp.astype(n > 0, acc)
        shift_sum, nonempty = all_sum((has * wide(local), has))
        shift = xp.where(nonempty > 0, shift_sum / safe(nonempty), wide(fallback))
        local = stop_gradient(xp.astype(shift, xc.dtype))
    centered = xc - _broadcastable(xp, local, broadcast)
    s1 = _feature_sums(xp, kept(centered), reduce_axes, acc, tuning.fold_rows)
    if tuning.recompute_shifted:  # S2 around K2, y around K3: K's neighbours one ulp away, distinct
        # expressions that a compiler cannot merge into one materialised x - K (K - K2 and
        # K - K3 are exact in the accumulation dtype)
        k2, k3 = (xp.nextafter(local, xp.asarray(v, dtype=local.dtype, device=where)) for v in (math.inf, -math.inf))
        squared = kept(xc - _broadcastable(xp, k2, broadcast))
        step2, step3 = wide(local) - wide(k2), wide(local) - wide(k3)
    else:
        k3, squared, step2, step3 = local, kept(centered), None, None
    s2 = _feature_sums(xp, squared * squared, reduce_axes, acc, tuning.fold_rows)

    def around_k2(offset: Array) -> Array:  # the offset from K2, whose squares S2 summed
        return offset if step2 is None else offset + step2

    if all_gather is not None:  # one round: combine in the frame of replica 0's shift
        local_offset = s1 / safe(n)
        local_offset2 = around_k2(local_offset)
        local_squares = _nonnegative(xp, s2 - n * (local_offset2 * local_offset2))
        n, offset, var, frame = combine_shifted(*all_gather((n, wide(local), s1, local_squares)))
        offset = offset + (frame - wide(local))
    else:
        if all_sum is not None:  # round 2
            n, s1, s2 = all_sum((n, s1, s2))
        offset = s1 / safe(n)
        offset2 = around_k2(offset)
        var = _nonnegative(xp, s2 / safe(n) - offset2 * offset2)
    if tuning.recompute_shifted:
        centered = xc - _broadcastable(xp, k3, broadcast)
    return Moments(n, k3, offset if step3 is None else offset + step3, var, centered)


def combine_moments(counts: Array, means: Array, squares: Array) -> tuple[Array, Array, Array]:
    r"""The count, mean and biased variance of a union of batches (Chan, Golub and LeVeque).

    Parameters
    ----------
    counts : array, shape (R,)
        Each batch's count.
    means : array, shape (R, C)
        Each batch's mean.
    squares : array, shape (R, C)
        Each batch's sum of squared deviations from its own mean.

    Returns
    -------
    n, mean, var : arrays, shapes () and (C,)
        The union's count, mean and biased variance.

    Notes
    -----
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
    deviation = means - xp.reshape(mean, (1, -1))
    return n, mean, (xp.sum(squares, axis=0) + xp.sum(weights * deviation * deviation, axis=0)) / safe_n


def combine_shifted(counts: Array, shifts: Array, sums: Array, squares: Array) -> tuple[Array, Array, Array, Array]:
    """Every replica's shifted moments combined, in the frame of replica 0's shift.

    Parameters
    ----------
    counts : array, shape (R,)
        Each replica's count.
    shifts : array, shape (R, C)
        Each replica's shift ``K_r``.
    sums : array, shape (R, C)
        ``S1_r = sum(x - K_r)``.
    squares : array, shape (R, C)
        The centred squares ``M_r``, around each replica's own mean.

    Returns
    -------
    n, offset, var, frame : arrays, shapes () and (C,)
        The count, ``mean - K_0``, the biased variance and ``K_0``. ``K_r - K_0`` is
        small (and exact when the shifts are within a factor 2 of each other) while
        ``K_r`` alone may be ``>> sigma``: nothing cancels (:func:`combine_moments`).
    """
    xp = array_namespace(counts, shifts)
    frame = shifts[0, ...]
    safe_counts = xp.where(counts > 0, counts, xp.ones_like(counts))
    relative = (shifts - xp.reshape(frame, (1, -1))) + sums / xp.reshape(safe_counts, (-1, 1))
    n, offset, var = combine_moments(counts, relative, squares)
    return n, offset, var, frame


def batch_norm(
    x: Array,
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    config: BatchNormConfig,
    *,
    training: bool,
    mask: Array | None = None,
    hooks: Hooks = Hooks(),
) -> BatchNormResult:
    """Batch normalization of ``x`` as ``config`` says (the maths: this module's docstring).

    Parameters
    ----------
    x : array
        Input of ``config.ndim`` dimensions, ``num_features`` on the axis that
        ``config.reduce_axes`` leaves; any Array API library, real floating point.
    params : mapping
        ``{"scale", "bias"}`` of shape ``(num_features,)``, or empty when not affine
        (``config.param_keys``).
    state : mapping
        The running statistics, exactly ``config.state_keys`` (``num_batches_tracked``, a
        scalar, with ``momentum=None``; empty without ``track_running_stats``).
    config : BatchNormConfig
        The validated configuration (``BatchNormConfig.from_arguments``).
    training : bool
        Normalise with the batch's statistics and update the state (R2, R3), or with
        the running statistics (inference).
    mask : array of bool, optional
        ``x``'s shape without the feature axis; positions where it is False are
        normalised but not counted in the statistics (R5).
    hooks : Hooks, optional
        The backend's cross-replica hook and ``stop_gradient`` (R4).

    Returns
    -------
    BatchNormResult
        ``y`` (``x``'s dtype and shape) and the new state (the same mapping in inference).

    Raises
    ------
    TypeError, ValueError
        Naming the argument, what was expected and what was given (R7.1), before
        anything is computed; under ``jax.jit`` at trace time.
    """
    xp = check_call(x, mask, params, state, config, training, hooks)
    return forward(xp, x, params, state, config, training=training, mask=mask, hooks=hooks)


def forward(
    xp: Any,
    x: Array,
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    config: BatchNormConfig,
    *,
    training: bool,
    mask: Array | None = None,
    hooks: Hooks = Hooks(),
    tuning: Tuning = _UNTUNED,
) -> BatchNormResult:
    """:func:`batch_norm` on arguments already checked, ``xp`` being ``x``'s namespace:
    the trusted entry of the layers, which check at their own boundary."""
    reduce_axes = config.reduce_axes
    scale, bias = params.get("scale"), params.get("bias")
    tracked = config.track_running_stats
    dtype = call_dtype(xp, x.dtype, params, state)
    broadcast_shape = _layout(reduce_axes)[1]

    def per_feature(v: Array) -> Array:  # (C,) in the compute dtype, broadcastable against x
        return _broadcastable(xp, _cast(xp, v, dtype), broadcast_shape)

    def normalize(centered: Array, offset: Array | None, var: Array) -> Array:
        """``centered * f + (bias - offset * f)``, ``f = scale / sqrt(var + eps)``:
        per-feature terms in ``var``'s dtype, the input-sized ones in the compute dtype."""
        factor = 1.0 / xp.sqrt(var + config.epsilon)
        if scale is not None:
            factor = _cast(xp, scale, var.dtype) * factor
        y = centered * per_feature(factor)
        constant = None if bias is None else _cast(xp, bias, var.dtype)
        if offset is not None:
            constant = -offset * factor if constant is None else constant - offset * factor
        if constant is not None:  # in place where the library allows it: no second input-sized array
            y += per_feature(constant)  # (immutable JAX arrays rebind; XLA fuses either form)
        return _cast(xp, y, x.dtype)

    xc = _cast(xp, x, dtype)
    where = device(xc)
    mean0, var0 = _fallback_statistics(xp, state, config, dtype, where)
    if not training and hooks.synced:  # inference never communicates
        hooks = hooks._replace(all_sum=None, all_gather=None)
    n: Any = static_count(x.shape, reduce_axes)
    batch = training or not tracked  # whether the batch's statistics normalise
    if not batch or (mask is None and not hooks.synced and n == 0):
        return BatchNormResult(normalize(xc - per_feature(mean0), None, var0), state)
    if mask is None and not hooks.synced and n == 1:
        refuse_one_value(x, training)

    acc = accumulation_dtype(xp, dtype, where)
    moments = _moments(xp, xc, mask, reduce_axes, config.fast_variance, hooks, mean0, acc, tuning)
    count, offset, var = moments.count, moments.offset, moments.var
    # Synced without a mask, this replica's values alone make the global count >= its
    # static count, so it cannot be 0 (unless that is 0, or unknown): no run-time fallback.
    may_be_empty = not isinstance(count, int) and (mask is not None or n is None or n == 0)
    new_state = dict(state)
    if training and tracked:
        new_state.update(
            running_statistics(state, count, moments.mean(xp), var, config, may_be_empty=may_be_empty, xp=xp)
        )
    if may_be_empty:  # n == 0 at run time: the shift is the running mean; normalise as inference does
        has_data = count > 0
        offset = xp.where(has_data, offset, xp.zeros_like(offset))
        var = xp.where(has_data, var, _cast(xp, var0, var.dtype))
    return BatchNormResult(normalize(moments.centered, offset, var), new_state)


def _fallback_statistics(xp: Any, state: Mapping[str, Array], config: BatchNormConfig, dtype: Any, where: Any) -> Any:
    """What normalises where the batch's statistics do not (inference, no data): the
    running statistics in ``dtype``, or mean 0 and variance 1 without them."""
    if config.track_running_stats:
        stats = state["running_mean"], state["running_var"]
        return tuple(_cast(xp, v, dtype) for v in stats)
    c = config.num_features
    return xp.zeros((c,), dtype=dtype, device=where), xp.ones((c,), dtype=dtype, device=where)


def running_statistics(
    state: Mapping[str, Array],
    count: Any,
    mean: Array,
    var: Array,
    config: BatchNormConfig,
    *,
    may_be_empty: bool = False,
    xp: Any = None,
) -> dict[str, Array]:
    """The state after a training step on a batch of ``count`` values per feature with
    ``mean`` and biased ``var`` (in one dtype, at least the statistics'): ``m * old +
    (1 - m) * new``, ``m = momentum`` or, with ``momentum=None``, ``1 - 1/k`` for the
    ``k``-th call with data (``num_batches_tracked``); the variance times ``n / (n - 1)``
    when unbiased (1 for a run-time count of 1). ``count`` is a Python int when the shape
    alone fixes it, else an array; ``may_be_empty``: it may be 0 at run time, and then the
    state is returned unchanged. New values keep the state's dtypes. ``xp``: the
    arrays' namespace, if the caller has it."""
    xp = array_namespace(mean) if xp is None else xp
    running_mean, running_var = state["running_mean"], state["running_var"]
    wide = mean.dtype
    dynamic = not isinstance(count, int)
    if not config.unbiased_running_var:
        bessel: Any = 1.0
    elif dynamic:  # in the statistics' dtype (a count may be the compute dtype's: JAX's strict promotion)
        wide_count = _cast(xp, count, wide)
        many = wide_count > 1
        ones = xp.ones_like(wide_count)
        bessel = xp.where(many, wide_count / xp.where(many, wide_count - 1, ones), ones)
    else:
        bessel = count / (count - 1)
    updated: dict[str, Array] = {}
    momentum: Any = config.momentum
    if momentum is None:  # the cumulative average: the k-th call with data weighs 1/k
        tracked = state["num_batches_tracked"]
        calls = tracked + (xp.astype(count > 0, tracked.dtype) if dynamic else int(count > 0))
        updated["num_batches_tracked"] = calls
        momentum = 1.0 - 1.0 / xp.astype(xp.where(calls > 0, calls, xp.ones_like(calls)), wide)
    old_mean, old_var = _cast(xp, running_mean, wide), _cast(xp, running_var, wide)
    new_mean = momentum * old_mean + (1.0 - momentum) * mean
    new_var = momentum * old_var + (1.0 - momentum) * (var * bessel)
    if may_be_empty:
        has_data = count > 0
        new_mean = xp.where(has_data, new_mean, old_mean)
        new_var = xp.where(has_data, new_var, old_var)
    updated["running_mean"] = _cast(xp, new_mean, running_mean.dtype)
    updated["running_var"] = _cast(xp, new_var, running_var.dtype)
    return updated


def batch_norm_vjp(
    x: Array,
    dy: Array,
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    config: BatchNormConfig,
    *,
    training: bool,
    mask: Array | None = None,
    hooks: Hooks = Hooks(),
) -> dict[str, Array]:
    r"""The analytic backward pass: gradients of ``sum(y * dy)`` with respect to ``x``
    and (when affine) ``scale`` and ``bias``, at the given parameters and state.

    Parameters
    ----------
    x, params, state, config, training, mask, hooks
        As :func:`batch_norm`'s.
    dy : array
        The cotangent of ``y``: ``x``'s library and shape, real floating point.

    Returns
    -------
    dict
        ``{"x"}`` in ``x``'s dtype, with ``"scale"`` and ``"bias"`` in the parameters'
        dtype when affine. The state is not updated.

    Raises
    ------
    TypeError, ValueError
        As :func:`batch_norm`, and for ``dy``.

    Notes
    -----

    With ``inv = 1 / sqrt(var + epsilon)``, ``xhat = (x - mean) * inv`` and
    ``g = dy * scale`` (``dy`` when not affine), summing over the reduced axes::

        dbias  = sum(dy)                 # every position, masked ones included
        dscale = sum(dy * xhat)
        dx     = inv * (g - keep / n * (G + xhat * H))   # batch statistics
        dx     = inv * g                                  # running statistics, or n == 0

    where ``G = sum(g)`` and ``H = sum(g * xhat)`` run over every position of every
    synced replica (masked positions are normalised too, so they send gradient into
    the statistics) and ``keep`` is 1 at the unmasked positions whose values entered
    ``mean`` and ``var``. ``xhat`` comes from the shifted input and the sums are
    accumulated as the forward's (float64 where the library has it). Under a
    cross-replica hook ``dx`` is that of the global-batch computation and the
    parameter gradients are this replica's share (sum them over replicas). The fast
    variance's clamp at 0 is ignored: its gradient is this one wherever the clamp is
    inactive.
    """
    xp = check_call(x, mask, params, state, config, training, hooks, dy, backward=True)
    return backward(xp, x, dy, params, state, config, training=training, mask=mask, hooks=hooks)


def backward(
    xp: Any,
    x: Array,
    dy: Array,
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    config: BatchNormConfig,
    *,
    training: bool,
    mask: Array | None = None,
    hooks: Hooks = Hooks(),
    tuning: Tuning = _UNTUNED,
) -> dict[str, Array]:
    """:func:`batch_norm_vjp` on arguments already checked (the layers' trusted entry)."""
    scale = params.get("scale")
    tracked = config.track_running_stats
    dtype = call_dtype(xp, x.dtype, params, state)
    xc, dyc = _cast(xp, x, dtype), _cast(xp, dy, dtype)
    axes, feature_axis = config.reduce_axes, config.feature_axis
    shape = _layout(axes)[1]
    where = device(xc)
    acc = accumulation_dtype(xp, dtype, where)
    n_static = static_count(x.shape, axes)
    batch = training or not tracked
    if batch and mask is None and not hooks.synced and n_static == 1:
        refuse_one_value(x, training)
    if not training:
        hooks = Hooks(stop_gradient=hooks.stop_gradient)
    mean0, var0 = _fallback_statistics(xp, state, config, dtype, where)
    weight: Any = 0.0
    if batch and (n_static is None or n_static > 0 or mask is not None or hooks.synced):
        moments = _moments(xp, xc, mask, axes, config.fast_variance, hooks, mean0, acc, tuning)
        n, offset, var = moments.count, moments.offset, moments.var
        xhat = moments.centered
        if isinstance(n, int):
            weight = 1.0 / n
        else:  # n == 0 at run time: the running statistics, as inference
            has_data = n > 0
            weight = xp.where(has_data, 1.0 / xp.where(has_data, n, xp.ones_like(n)), xp.zeros_like(n))
            offset = xp.where(has_data, offset, xp.zeros_like(offset))
            var = xp.where(has_data, var, _cast(xp, var0, var.dtype))
        xhat -= _broadcastable(xp, _cast(xp, offset, dtype), shape)  # x - mean, from the shifted x
    else:
        batch = False
        xhat, var = xc - _broadcastable(xp, mean0, shape), _cast(xp, var0, acc)
    inv = 1.0 / xp.sqrt(_cast(xp, var, acc) + config.epsilon)  # per-feature factors in acc
    s = xp.ones((), dtype=acc, device=where) if scale is None else _cast(xp, scale, acc)
    xhat *= _broadcastable(xp, _cast(xp, inv, dtype), shape)
    dbias = _feature_sums(xp, dyc, axes, acc, tuning.fold_rows)
    dscale = _feature_sums(xp, dyc * xhat, axes, acc, tuning.fold_rows)
    dx = dyc * _broadcastable(xp, _cast(xp, s * inv, dtype), shape)
    if batch:
        # G = sum(g) and H = sum(g * xhat) with g = dy * scale: scale is per feature, so
        # they are scale * dbias and scale * dscale (no further pass over the input).
        local = (s * dbias, s * dscale)
        if hooks.all_sum is not None:
            G, H = hooks.all_sum(local)
        elif hooks.all_gather is not None:  # every replica adds the same rows in the same order
            G, H = (xp.sum(rows, axis=0) for rows in hooks.all_gather(local))
        else:
            G, H = local
        # dx = inv * g - inv * weight * keep * (G + xhat * H), the per-feature factors folded
        # and applied in place: at most two input-sized arrays alive.
        correction = xhat  # xhat is not needed any more
        correction *= _broadcastable(xp, _cast(xp, inv * weight * H, dtype), shape)
        correction += _broadcastable(xp, _cast(xp, inv * weight * G, dtype), shape)
        if mask is not None:
            correction = xp.where(xp.expand_dims(mask, axis=feature_axis), correction, xp.zeros_like(correction))
        dx -= correction
    grads: dict[str, Array] = {"x": _cast(xp, dx, x.dtype)}
    if scale is not None:
        grads["scale"], grads["bias"] = _cast(xp, dscale, scale.dtype), _cast(xp, dbias, scale.dtype)
    return grads
