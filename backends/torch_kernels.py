r"""PyTorch's batch-norm kernels, used only where the contract's accuracy rule holds.

PyTorch's CPU kernels sum channel-first ``(N, C, L)`` float32 input in float64, but
channel-last input (``(N, C)``, and bn1d's ``(B, L, C)`` seen as ``(B*L, C)``) in float32
partial sums of ``N / threads`` rows, store the mean in the input's precision and form
``y = x * a + b``: beyond the rule's 1e-5 already at moderate ``|mean| / std``. So the fused
training kernel runs where :func:`predicted_error` accepts its result, and otherwise
:class:`NativeBatchNorm` (unsynced and synced alike) takes the statistics split (partial
sums of at most :data:`CHAIN_ROWS` rows, combined in float64 by Chan's formula), shifted by
the float32 mean where the model asks for it, and the backward from float64 sums taken the
same way. The model is probabilistic
(independent roundings of at most ``u`` each, ``LAMBDA`` standard deviations,
``|x - mean| / std`` below :data:`MAX_XHAT`); ``docs/numerics.md`` derives it and compares it
with measurements.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from bn1d.algorithm import combine_shifted, running_statistics

__all__ = ["FusedBatchNorm", "NativeBatchNorm", "batch_statistics", "check_coefficient", "fused_accumulation",
           "fused_is_accurate", "gradient_sums", "inference_is_accurate", "predicted_error"]  # fmt: skip

#: The contract's accuracy rule (on y, mean / std and var) in each compute dtype: float64's
#: is float32's times the ratio of their unit roundoffs.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5 * 2.0**-29}
LAMBDA = 5.0  # standard deviations of the rounding-error model
MAX_XHAT = 6.0  # the largest |x - mean| / std the model assumes for y
CHAIN_ROWS = 256  # rows per float32 partial sum in the split statistics
#: The longest float32 chain whose backward sums PyTorch's kernel may take: a gradient
#: constant along the batch (equal terms, the worst case) errs by ~``rows u / 4``
#: (``docs/numerics.md``), within the rule here; :class:`FusedBatchNorm` beyond.
BACKWARD_CHAIN_ROWS = 512
_UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _quiet(method: Any) -> Any:
    """``method`` without NumPy's warnings: non-finite input gives non-finite results, as
    in the core, and says so in them, not in ``RuntimeWarning``s (a new ``errstate`` per
    call: NumPy 1.26's instance is neither re-entrant nor thread-safe)."""

    @functools.wraps(method)
    def quiet(*args: Any) -> Any:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return method(*args)

    return quiet


def _threads(x: torch.Tensor) -> int:
    return max(1, torch.get_num_threads()) if x.is_cpu else 1


def predicted_error(unit: float, rows: int, chains: int, ratio: float) -> float:
    r"""The model's bound on the worst of the three metrics of the rule for
    statistics summed in ``chains`` partial sums of ``rows`` terms each (``rows =
    0``: float64 sums, exact here) with the mean stored in the input's precision,
    and ``y = x * a + b`` formed by the kernel, at ``|mean| / std = ratio``::

        mean: LAMBDA * u * sqrt((rows * ratio**2 / 3 + 1/2) / (3 * chains)) + u * ratio
        var:  LAMBDA * u * sqrt(rows / (9 * chains)) + 3 u
        y:    mean + 2 u * ratio + MAX_XHAT * var / 2 + 3 u * MAX_XHAT
    """
    if not math.isfinite(ratio):
        return math.inf
    acc_mean = LAMBDA * unit * math.sqrt((rows * ratio**2 / 3 + 0.5) / (3 * chains)) if rows else 0.0
    acc_var = LAMBDA * unit * math.sqrt(rows / (9 * chains)) if rows else 0.0
    mean = acc_mean + unit * ratio
    var = acc_var + 3 * unit
    return max(mean, var, mean + 2 * unit * ratio + MAX_XHAT * var / 2 + 3 * unit * MAX_XHAT)


def _ratio(mean: np.ndarray, var: np.ndarray) -> float:
    """``max |mean| / std`` over the features (inf for a zero variance beside a nonzero mean)."""
    if not mean.size:
        return 0.0
    std = np.sqrt(np.maximum(var, 0.0))
    scaled = np.abs(mean) / np.where(std > 0, std, 1.0)
    return float(np.max(np.where(std > 0, scaled, np.where(mean != 0, np.inf, 0.0))))


def _host(t: torch.Tensor) -> np.ndarray:
    """Per-feature values as float64 NumPy (synchronises with an accelerator)."""
    return t.detach().to("cpu", torch.float64).numpy()


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's NumPy view (the kernels' statistics take no gradient: no detach to pay)."""
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _device(a: Any, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-feature NumPy values as a tensor on ``like``'s device, in ``dtype`` (default ``like``'s)."""
    return torch.as_tensor(np.array(a, order="C"), dtype=dtype or like.dtype, device=like.device)


@functools.lru_cache(maxsize=256)
def fused_accumulation(shape: tuple[int, ...], dtype: torch.dtype, threads: int) -> tuple[int, int, float] | None:
    """The CPU fused training kernel's ``(rows, chains)`` on input of ``shape`` and
    ``dtype`` run on ``threads`` threads (see :func:`predicted_error`) and the coefficient
    of :func:`fused_is_accurate` where it meets the rule, or ``None`` where its
    accumulation alone, at ``|mean| / std = 0``, already misses the rule: a cheap test
    before running it, computed once for each."""
    rows, chains = _accumulation_of(shape, dtype, "cpu", threads, split=1)
    if predicted_error(_unit(dtype), rows, chains, 0.0) > _tolerance(dtype):
        return None
    return rows, chains, check_coefficient(largest_ratio(dtype, rows, chains), math.prod(shape) // shape[1], dtype)


def check_coefficient(ratio: float, n: int, dtype: torch.dtype) -> float:
    """The coefficient with which :func:`fused_is_accurate` judges ``|mean| / std <= ratio``
    on ``n`` rows from the unbiased variance: ``n / ((n - 1) * (ratio * (1 - 8 u))**2)``."""
    return n / ((n - 1) * (ratio * (1.0 - 8.0 * _unit(dtype))) ** 2)


_statistics = threading.local()


def batch_statistics(features: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's buffers ``(mean, var)`` of ``features`` values, into which the fused
    training kernel writes a batch's mean and unbiased variance as running statistics at
    momentum 1 (exactly: ``(1 - 1) * old`` is 0 for any finite ``old``), for
    :func:`fused_is_accurate` to judge before any running statistic changes (above a
    factor of 0.5 they then take the update, which the next kernel call overwrites); on
    the CPU whatever the default device. Whoever rejects them zeroes them (a NaN would
    stay)."""
    cache = _statistics.__dict__.setdefault("buffers", {})
    found = cache.get((features, dtype))
    if found is None:
        if len(cache) >= 64:
            cache.clear()
        with torch.inference_mode(False):  # ordinary tensors: the kernel's node saves them for backward
            found = cache[features, dtype] = tuple(torch.zeros(2, features, dtype=dtype, device="cpu"))
    return found


def fused_is_accurate(mean: torch.Tensor, var: torch.Tensor, coefficient: float, running: Any = None) -> bool:
    """Whether every feature's ``|mean| / std`` meets the kernel's limit, judged from the
    batch's mean and unbiased variance as the kernel wrote them (:func:`batch_statistics`):
    ``var - coefficient * mean**2 >= tiny`` (:func:`check_coefficient` of the
    :func:`largest_ratio`, from :func:`fused_accumulation`; the smallest normal number
    ``tiny``, so that a square or a variance below the normal range, whose roundings are
    absolute, never passes; the operations round by ``2 u`` on the product, and the
    comparison is exact). A feature whose mean is exactly 0 (a dead ReLU channel) passes on
    a second look: ``y = x * a + bias`` then rounds at ``|x - mean| * a``. NaN fails, and
    so does every infinity: of the mean (``-inf`` or ``inf - inf``), of a square that
    overflows (``-inf``: the core then runs), of the variance and of the running statistics
    ``running = (running_mean, running_var)``, if given (adding ``0 * margin * other``
    makes them NaN), where ``running += m * (batch - running)`` would give NaN for
    PyTorch's and the core's inf."""
    tiny = _TINY[var.dtype]
    margin = torch.addcmul(var, mean, mean, value=-coefficient)
    for other in (var,) if running is None else running:
        margin.addcmul_(margin, other, value=0.0)
    if margin.min().item() >= tiny:
        return True
    return bool(margin.add_(mean == 0, alpha=tiny).min().item() >= tiny)  # there margin is var: NaN stays


_TINY = {dtype: torch.finfo(dtype).tiny for dtype in (torch.float32, torch.float64)}


@functools.lru_cache(maxsize=256)
def largest_ratio(dtype: torch.dtype, rows: int, chains: int) -> float:
    """The largest ``|mean| / std`` at which :func:`predicted_error` of this accumulation
    meets the rule (it grows with the ratio), to within a relative 1e-12; 0 where none does."""
    unit, tolerance = _unit(dtype), _tolerance(dtype)
    if predicted_error(unit, rows, chains, 0.0) > tolerance:
        return 0.0
    low, high = 0.0, 1.0
    while predicted_error(unit, rows, chains, high) <= tolerance:
        low, high = high, 2 * high
    while high - low > 1e-12 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if predicted_error(unit, rows, chains, middle) <= tolerance else (low, middle)
    return low


def inference_is_accurate(running_mean: torch.Tensor, running_var: torch.Tensor, epsilon: float) -> bool:
    """Whether the inference kernel's ``y = x * a + b`` meets the rule for these running
    statistics: its rounding is ``~3 u |running_mean| / sqrt(running_var + eps)``. Judged on
    every call (CPU tensors: NumPy views, a few microseconds): running statistics change
    behind every cache's back (``.data`` writes, ``torch.distributed.broadcast``, PyTorch's
    own kernels, none of which bumps a version)."""
    mean, var = numpy_view(running_mean), numpy_view(running_var)
    with np.errstate(invalid="ignore", over="ignore"):
        # ratio**2 <= limit with var + eps > 0, in the statistics' dtype: an overflow or a NaN
        # fails the comparison (the core then runs), and the limit has the model's margin
        bound = var + epsilon
        bound *= _inference_limit(running_mean.dtype)
        return bool((mean * mean <= bound).all())


@functools.lru_cache(maxsize=8)
def _inference_limit(dtype: torch.dtype) -> float:
    """The largest ``(|running_mean| / std)**2`` at which the inference kernel meets the rule."""
    return (_tolerance(dtype) / (3 * _unit(dtype)) - MAX_XHAT) ** 2


def _tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def _unit(dtype: torch.dtype) -> float:
    """The unit roundoff of the kernels' arithmetic: float32's for half inputs (opmath)."""
    return _UNIT.get(dtype, _UNIT[torch.float32])


def _accumulation(x: torch.Tensor, split: int) -> tuple[int, int]:
    """:func:`_accumulation_of` on ``x``."""
    return _accumulation_of(tuple(x.shape), x.dtype, x.device.type, _threads(x), split)


def _accumulation_of(
    shape: tuple[int, ...], dtype: torch.dtype, device: str, threads: int, split: int
) -> tuple[int, int]:
    """(rows per float32 partial sum, partial sums per feature) of PyTorch's statistics
    kernel on ``shape`` seen with ``split`` rows folded into the features; rows = 0 where it
    sums in float64 (float64 input, or float32 channel-first input on the CPU). Half inputs
    sum in float32: channel-first in one sequential sum per feature, channel-last like
    float32. CUDA kernels reduce in trees: counted as chains of 64 rows."""
    numel = math.prod(shape)
    positions = numel // shape[1] if numel else 0
    channel_first = len(shape) > 2 and math.prod(shape[2:]) > 1
    if device != "cpu":
        return min(positions, 64), max(1, positions // 64)
    if dtype == torch.float64 or (channel_first and dtype == torch.float32):
        return 0, 1
    if channel_first:
        return positions, 1
    rows = shape[0] // split
    threads = max(1, min(threads, rows))
    return -(-rows // threads), threads * split


def _split_factor(x: torch.Tensor) -> int:
    """The smallest ``k`` dividing N with at most :data:`CHAIN_ROWS` rows per
    partial sum (1 where the kernel needs no split)."""
    rows, _ = _accumulation(x, 1)
    if rows <= CHAIN_ROWS:
        return 1
    return _divisor_at_least(x.shape[0], -(-x.shape[0] // (_threads(x) * CHAIN_ROWS)))


@functools.lru_cache(maxsize=256)
def _divisor_at_least(n: int, lowest: int) -> int:
    """The smallest divisor of ``n`` from ``lowest`` to ``8 * lowest``, else the largest
    divisor below ``lowest`` (the error model then judges the longer sums)."""
    for k in range(lowest, min(n, 8 * lowest) + 1):
        if n % k == 0:
            return k
    return next(k for k in range(lowest - 1, 0, -1) if n % k == 0)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(N, C, 1, ...)`` as the ``(N, C)`` it is in memory (a converted
    ``nn.BatchNorm1d`` sees ``(N, C)`` input so): the split statistics need 2-D."""
    return x.view(x.shape[0], x.shape[1]) if x.dim() > 2 and math.prod(x.shape[2:]) == 1 else x


def local_moments(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """This rank's mean and biased variance per feature (float64 NumPy) of ``x`` ``(N,
    C, ...)`` contiguous, and the :func:`predicted_error` of the kernel's result; taken in
    float64 where the kernel's float32 sums of squares overflow beside a finite mean (data
    of ``|x - mean|`` ~1e18: their variance, ~1e36, is a float32 one)."""
    n, c = x.shape[0], x.shape[1]
    if x.numel() == 0:
        return np.zeros(c), np.zeros(c), 0.0
    x = _rows(x)
    k = _split_factor(x) if x.dim() == 2 else 1
    means, variances = torch.ops.aten.batch_norm_update_stats(x.view(n // k, k * c) if k > 1 else x, None, None, 0.0)
    means, variances = _host(means).reshape(k, c), _host(variances).reshape(k, c)
    mean = means.mean(axis=0)
    var = variances.mean(axis=0) + np.square(means - mean).mean(axis=0)  # Chan's formula, equal counts
    if x.dtype != torch.float64 and np.any(np.isfinite(mean) & ~np.isfinite(var)):
        return local_moments(x.double())  # the kernel's float32 sums of squares overflowed: float64's
    rows, chains = _accumulation(x, k)
    return mean, var, predicted_error(_unit(x.dtype), rows, chains, _ratio(mean, var))


def chained(x: torch.Tensor) -> bool:
    """Whether PyTorch's kernels sum ``x``'s features in float32 chains of more than
    :data:`BACKWARD_CHAIN_ROWS` rows: their backward's sums then miss the rule."""
    return _accumulation(x, 1)[0] > BACKWARD_CHAIN_ROWS


def local_sums(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor) -> tuple[Any, Any]:
    """``(sum(dy), sum(dy * (x - mean) * invstd))`` per feature (float64 NumPy), the
    sums of ``native_batch_norm_backward`` taken the split way of :func:`local_moments`, or
    :func:`gradient_sums`' where the split leaves longer chains than
    :data:`BACKWARD_CHAIN_ROWS` (a prime N: one chain of ``N / threads`` rows)."""
    n, c = x.shape[0], x.shape[1]
    if x.numel() == 0:
        return np.zeros(c), np.zeros(c)
    dy, x = _rows(dy), _rows(x)
    k = _split_factor(x) if x.dim() == 2 else 1
    if _accumulation(x, k)[0] > BACKWARD_CHAIN_ROWS:
        _, sum_dy, sum_dy_centred = gradient_sums(dy, x, mean)
        return _host(sum_dy), _host(sum_dy_centred) * _host(invstd)
    view = (n // k, k * c)
    dy_, x_ = (dy.view(view), x.view(view)) if k > 1 else (dy, x)
    mean_, invstd_ = (mean.repeat(k), invstd.repeat(k)) if k > 1 else (mean, invstd)
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy_, x_, None, None, None, mean_, invstd_, True, 0.0, [False, True, True]
    )
    return _host(sum_dy).reshape(k, c).sum(axis=0), _host(sum_dy_xhat).reshape(k, c).sum(axis=0)


def gradient_sums(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x - mean, sum(dy), sum(dy * (x - mean)))`` per feature of ``(N, C, *)`` tensors,
    the sums ``torch.sum``'s: cascaded, ``O(u log N)``, where PyTorch's backward kernel sums
    channel-last input in the forward's float32 chains (``docs/numerics.md``)."""
    dims = [0, *range(2, x.dim())]
    centred = x - mean.view((-1,) + (1,) * (x.dim() - 2))
    return centred, dy.sum(dims), (dy * centred).sum(dims)


def float64_forward(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], epsilon: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """The training forward in float64 torch operations (TorchScript compiles it):
    ``(y64, mean, biased var)``, differentiable."""
    shape: List[int] = [1, -1] + [1] * (x.dim() - 2)
    wide = x.double()
    var, mean = torch.var_mean(wide, [0] + list(range(2, x.dim())), correction=0)
    y = (wide - mean.view(shape)) * torch.rsqrt(var + epsilon).view(shape)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y, mean, var


def graph_gradients(
    x: torch.Tensor, scale: Any, bias_dtype: Any, dy: torch.Tensor, epsilon: float, running: Any = None
) -> tuple[Any, ...]:
    """``(dx, dscale, dbias)`` (``None`` for what takes no gradient; ``dbias`` where
    ``bias_dtype`` is given) as a graph, for a backward under ``create_graph=True``
    (PyTorch's batch norm is twice differentiable): the forward in float64 torch operations,
    differentiated by autograd: :func:`float64_forward` in training, ``(x - mean) * invstd
    * scale`` with ``running = (mean, invstd)`` in inference."""
    if running is None:
        y = float64_forward(x, scale, None, epsilon)[0]
    else:
        shape = (-1,) + (1,) * (x.dim() - 2)
        y = (x.double() - running[0].double().view(shape)) * running[1].view(shape)
        y = y if scale is None else y * scale.double().view(shape)
    wanted = [t for t in (x, scale) if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, dy.double(), create_graph=True) if wanted else ())
    dx, dscale = (next(grads).to(t.dtype) if t is not None and t.requires_grad else None for t in (x, scale))
    dbias = None if bias_dtype is None else dy.sum([0, *range(2, x.dim())]).to(bias_dtype)
    return dx, dscale, dbias


class FusedBatchNorm(torch.autograd.Function):
    """PyTorch's fused kernel (``torch.native_batch_norm``'s arguments) on chained input
    (float32 sums of more than :data:`BACKWARD_CHAIN_ROWS` rows per chain, :func:`chained`),
    with a backward of its own from :func:`gradient_sums`, not PyTorch's, which sums in the
    forward's chains (in inference, ``mean`` and ``invstd`` are the running statistics')::

        dbias = sum(dy),  dscale = sum(dy * (x - mean)) * invstd,  a = scale * invstd
        dx = a * dy - (x - mean) * a * invstd * dscale / n - a * dbias / n   (training)
        dx = a * dy                                                           (inference)

    Returns the kernel's ``(y, save_mean, save_invstd)`` (``y`` alone in inference); under
    ``create_graph=True`` the backward is :func:`graph_gradients`. No forward-mode AD (the
    route sends dual tensors to the core)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, scale: Any, bias: Any, running_mean: Any, running_var: Any, training: bool,
        momentum: float, epsilon: float,
    ) -> Any:  # fmt: skip
        y, mean, invstd = torch.native_batch_norm(
            x, scale, bias, running_mean, running_var, training, momentum, epsilon
        )
        if not training:
            mean, invstd = running_mean, torch.rsqrt(running_var.double() + epsilon)
        ctx.save_for_backward(x, scale, mean, invstd)
        ctx.training, ctx.epsilon, ctx.bias_dtype = training, epsilon, None if bias is None else bias.dtype
        if not training:
            return y
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple[Any, ...]:  # type: ignore[override]
        x, scale, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            running = None if ctx.training else (mean, invstd)
            return (*graph_gradients(x, scale, ctx.bias_dtype, dy, ctx.epsilon, running), None, None, None, None, None)
        wide = mean.dtype  # the statistics': float32 for half input
        centred, dbias, dscale = gradient_sums(dy.to(wide), x.to(wide), mean)
        invstd = invstd.to(wide)
        dscale.mul_(invstd)
        a = invstd if scale is None else scale * invstd
        shape = (-1,) + (1,) * (x.dim() - 2)
        if ctx.training:
            k = a / -(x.numel() // x.shape[1])
            dx = (
                centred.mul_((k * invstd * dscale).view(shape))
                .add_((k * dbias).view(shape))
                .addcmul_(dy, a.view(shape))
            )
        else:
            dx = dy * a.view(shape)
        dscale_, dbias_ = (
            None if scale is None else dscale,
            None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype),
        )
        return dx.to(x.dtype), dscale_, dbias_, None, None, None, None, None


class NativeBatchNorm(torch.autograd.Function):
    """Training on PyTorch's kernels, as the module docstring says, for input ``(N, C, ...)``
    contiguous in the compute dtype (no mask, the default variance); ``state``: the running
    statistics (``config.state_keys``), synced by ``exchange`` (``torch_distributed.Gather``
    or ``Reduce``) unless ``None``. Returns ``y`` and the new state in ``config.state_keys``
    order (the core's :func:`~bn1d.algorithm.running_statistics`).

    Forward: local statistics, shifted by ``K`` (the float32 mean) where
    :func:`predicted_error` asks for it, then (synced) one exchange of ``(count, K,
    sum(x - K), centred squares)`` merged by :func:`bn1d.algorithm.combine_shifted`; ``y =
    (x - K) * f + (bias - d * f)``. Backward, with ``a = scale * invstd`` and float64 sums
    over this rank (synced: their global values from one all-reduce of the cotangents of
    every rank's row, as on the core path)::

        dx = a * (dy - sum_all(dy) / n - xhat * sum_all(dy * xhat) / n)

    Parameter gradients are this rank's share (DDP all-reduces them). Under
    ``create_graph=True`` the backward is :func:`graph_gradients`; synced, it is once
    differentiable (as ``nn.SyncBatchNorm``'s: a second derivative raises).
    """

    @staticmethod
    @_quiet
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        state: dict[str, torch.Tensor],
        exchange: Any,
        config: Any,
    ) -> tuple[torch.Tensor, ...]:
        # The per-feature arithmetic is float64 NumPy; the kernels run on x's device.
        per_feature = (-1,) + (1,) * (x.dim() - 2)
        n_local = x.numel() // x.shape[1]
        mean, var, error = local_moments(x)
        # K: the mean in the input's precision, where finite (a non-finite mean is the
        # core's too: inf stays inf, as K + d there, and is never a shift)
        shift = _device(np.where(np.isfinite(mean), mean, 0.0), x)
        shift64 = _host(shift)
        shifted = error > _tolerance(x.dtype)
        if shifted:  # statistics of x - K (exact there): |d| << std, nothing cancels
            local_offset, var, _ = local_moments(x - shift.view(per_feature))
        else:
            local_offset = mean - shift64
        n: Any = n_local
        offset, deviations, counts = local_offset, None, None
        if exchange is not None:
            row = (np.asarray(float(n_local)), shift64, local_offset * n_local, var * n_local)
            rows = exchange.rows(tuple(_device(a, x, torch.float64) for a in row))
            counts, shifts, sums, squares = (_host(t) for t in rows)
            # Combined by torch (on the rows' device): its reductions over the ranks are
            # cascaded, NumPy's over a non-contiguous axis add row after row (an error of
            # ranks * u64: 2e-13 at 4096 float64 ranks, 10x float64's bound of R2.7).
            n, global_offset, var, frame = (_host(v) for v in combine_shifted(*(r.to(torch.float64) for r in rows)))
            safe_counts = np.where(counts > 0, counts, 1.0)[:, None]
            deviations = (shifts - frame) + sums / safe_counts - global_offset  # each rank's mean - the mean
            offset = global_offset + (frame - shift64)
        host_state = {key: _host(value) for key, value in state.items()}
        new_state = {}  # no running statistics: nothing to update
        if host_state:
            new_state = running_statistics(
                host_state, n, shift64 + offset, var, config, may_be_empty=exchange is not None
            )
        invstd = 1.0 / np.sqrt(var + config.epsilon)
        shifted = shifted or predicted_error(_unit(x.dtype), 0, 1, _ratio(shift64 + offset, var)) > _tolerance(x.dtype)
        # y = (xu - centre) * f + bias, formed as xu * f + (bias - centre * f): xu = x - K
        # when shifted (centre = d, small), else x (|centre| / std small enough).
        xu = x - shift.view(per_feature) if shifted else x
        centre, local_centre = (offset, local_offset) if shifted else (shift64 + offset, shift64 + local_offset)
        factor = invstd if scale is None else _host(scale) * invstd
        constant = -centre * factor if bias is None else _host(bias) - centre * factor
        y = torch.addcmul(_device(constant, x).view(per_feature), xu, _device(factor, x).view(per_feature))
        ctx.save_for_backward(x, scale)  # xu is recomputed: one saved input, as before the create_graph path
        ctx.shift = shift.view(per_feature) if shifted else None
        ctx.bias_like = None if bias is None else (bias.dtype, bias.device)
        ctx.exchange, ctx.n, ctx.n_local, ctx.per_feature = exchange, n, n_local, per_feature
        ctx.epsilon = config.epsilon
        ctx.numbers = centre, local_centre, invstd, counts, deviations
        new_stats = tuple(_device(new_state[key], state[key]) for key in config.state_keys)
        ctx.mark_non_differentiable(*new_stats)
        return (y, *new_stats)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple[Any, ...]:  # type: ignore[override]
        if torch.is_grad_enabled() and ctx.exchange is None:  # create_graph=True
            x, scale = ctx.saved_tensors
            bias_dtype = None if ctx.bias_like is None else ctx.bias_like[0]
            return (*graph_gradients(x, scale, bias_dtype, dy, ctx.epsilon), None, None, None)
        return NativeBatchNorm.first_derivatives(ctx, dy)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_quiet
    def first_derivatives(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, scale = ctx.saved_tensors
        xu = x if ctx.shift is None else x - ctx.shift
        centre, local_centre, invstd, counts, deviations = ctx.numbers
        dyc = dy.to(xu.dtype).contiguous()
        sum_dy, sum_dy_xhat = local_sums(dyc, xu, _device(centre, xu), _device(invstd, xu))
        a = invstd if scale is None else _host(scale) * invstd
        dx = None
        if ctx.needs_input_grad[0]:  # dx = a * dy + slope * (xu - local_centre) + intercept
            d_mean, d_var = -a * sum_dy, -0.5 * a * invstd * sum_dy_xhat  # of this rank's loss
            if ctx.exchange is None:
                n = max(ctx.n, 1)
                slope, intercept = 2.0 * d_var / n, d_mean / n
            else:  # the cotangents of every rank's (count, K, S1, M2) row, summed over ranks
                safe_n = max(float(np.sum(counts)), 1.0)
                d_sums = (counts[:, None] > 0) * (d_mean + 2.0 * d_var * deviations) / safe_n
                d_squares = np.broadcast_to(d_var / safe_n, deviations.shape)
                cotangents = (np.zeros_like(counts), np.zeros_like(d_sums), d_sums, d_squares)
                own = ctx.exchange.own_cotangents(tuple(_device(c, xu, torch.float64) for c in cotangents))
                intercept, slope = _host(own[2]), 2.0 * _host(own[3])
            if ctx.n_local:
                shape = ctx.per_feature
                dx = torch.addcmul(_device(intercept - slope * local_centre, xu).view(shape), xu,
                                   _device(slope, xu).view(shape))  # fmt: skip
                dx = dx.addcmul_(dyc, _device(a, xu).view(shape)).to(dy.dtype)
            else:
                dx = torch.zeros_like(dy)
        # A gradient for each parameter that was given (a scale without a bias, or the reverse).
        dscale = None if scale is None else _device(sum_dy_xhat, scale)
        dbias = None
        if ctx.bias_like is not None:
            dbias = torch.as_tensor(np.array(sum_dy, order="C"), dtype=ctx.bias_like[0], device=ctx.bias_like[1])
        return dx, dscale, dbias, None, None, None
