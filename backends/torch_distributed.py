r"""Cross-replica statistics for ``bn1d.backends.torch`` over ``torch.distributed``.

One exchange per synced training call, device-agnostic (gloo on CPU, NCCL on
GPU): every rank of a group contributes its count, shift ``K``, shifted sum
``sum(x - K)`` and sum of squared deviations, which
:func:`bn1d.algorithm.combine_shifted` merges in the frame of rank 0's shift
(Chan, Golub and LeVeque: no cancellation), or, with ``fast_variance``, its
count, sum and sum of squares, which are added. The backward pass makes one more
exchange, of the cotangents, when the input needs a gradient.

* :func:`sync_group` resolves the group of this rank: ``process_group`` (WORLD by
  default), or, with ``axis_index_groups``, the subgroup (``dist.new_group``) that
  holds this rank. Subgroups are created once per (process group, groups) and
  cached while the process group lives; ``dist.new_group`` must be entered by every rank of the default group,
  in the same order, so the first synced training call must run on every rank.
* :func:`check_peers` all-gathers a small header (:func:`make_header`:
  num_features, rank of the input, feature axis, compute dtype, variance
  formula, groups and options) on a layer's first synced call and raises a ``ValueError``
  naming every disagreeing rank: the exchanges' sizes depend on num_features,
  so a mismatch must be an error before them, not a hang or garbage. Exchanges
  whose sizes differ later (e.g. layers called in a rank-dependent order) cannot
  be reported on every rank from inside one collective (gloo aborts the rank that
  receives the longer row): ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` (PyTorch's check of
  every collective's shapes) reports them on every rank.
* :class:`Gather` makes the exchange: one all-gather of this rank's row
  (header, then values) in float64. Each call's headers are
  compared again, so a dtype or option that changes on one rank later is also a
  ``ValueError`` on every rank. Local batch sizes may differ: the statistics are
  count-weighted.
* Two paths make the same exchanges, so ranks may take different ones (e.g. a
  mask on some ranks only): the core (:func:`make_all_gather`, the core's
  differentiable ``all_gather`` hook; its backward all-reduces the cotangents,
  because :math:`\partial L/\partial a_r = \sum_q \partial L_q/\partial
  \mathrm{rows}[r]` for a loss :math:`L = \sum_q L_q` summed over ranks), and
  PyTorch's native kernels around the exchange
  (:class:`bn1d.backends.torch_kernels.NativeBatchNorm`).

Every collective waits at most ``timeout`` seconds (``None``: the process group's
own timeout): a rank that died or never calls the layer gives a ``RuntimeError``
on the others instead of a hang.
"""

from __future__ import annotations

import datetime
import time
import weakref
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from bn1d.algorithm import AllGather
from bn1d.config import OPTIONS, BatchNormConfig, argument_error, check_partition

__all__ = ["Gather", "check_peers", "fingerprint", "make_all_gather", "make_header", "sync_group"]

_MAX_HEADER_DIMS = 8
_AGREED = 6  # header entries every rank must share; the dims after them may differ
#: Subgroups per parent process group and ``axis_index_groups``. Weakly keyed: when
#: ``destroy_process_group`` drops a parent, its entry (and the subgroups, destroyed
#: with it) goes too; a process that holds destroyed groups aborts at exit.
_subgroups: weakref.WeakKeyDictionary[Any, dict[tuple[tuple[int, ...], ...], list[Any]]] = weakref.WeakKeyDictionary()


def _wait(work: Any, timeout: float | None, what: str, group: Any) -> None:
    start = time.monotonic()
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout))
    except RuntimeError as error:
        raise RuntimeError(
            f"BatchNorm1d: {what} over a process group of {dist.get_world_size(group)} ranks failed after "
            f"{time.monotonic() - start:.1f}s (timeout={timeout}); a rank may have died or not called the "
            f"layer: {error}"
        ) from error


def sync_group(process_group: Any, axis_index_groups: tuple[tuple[int, ...], ...] | None, timeout: float | None) -> Any:
    """The process group whose ranks this rank's statistics are summed over."""
    parent = dist.group.WORLD if process_group is None else process_group
    if axis_index_groups is None:
        return parent
    check_partition(axis_index_groups, dist.get_world_size(parent), " (the ranks of the process group)")
    cached = _subgroups.setdefault(parent, {})
    if axis_index_groups not in cached:  # every rank creates every subgroup, in the same order
        ranks = dist.get_process_group_ranks(parent)
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        cached[axis_index_groups] = [dist.new_group([ranks[i] for i in g], **kwargs) for g in axis_index_groups]
    me = dist.get_rank(parent)
    return next(sub for g, sub in zip(axis_index_groups, cached[axis_index_groups]) if me in g)


def fingerprint(config: BatchNormConfig) -> int:
    """One number for what else the ranks must share: ``axis_index_groups`` and every
    option of ``bn1d.config.OPTIONS`` (an option may change what is exchanged)."""
    options = tuple(getattr(config, option) for option in OPTIONS)
    return zlib.crc32(repr((config.axis_index_groups, options)).encode())


def _describe(ranks: list[int], header: Sequence[int]) -> str:
    num_features, ndim, feature_axis, dtype_code, fast_variance, digest, *dims = header
    shape = tuple(dims[: min(ndim, _MAX_HEADER_DIMS)]) + (("...",) if ndim > _MAX_HEADER_DIMS else ())
    return (
        f"ranks {ranks}: num_features={num_features} on axis {feature_axis} of a {ndim}-D input (rank {ranks[0]}: "
        f"shape {shape}), {('float32', 'float64')[dtype_code]} statistics, fast_variance={bool(fast_variance)}, "
        f"axis_index_groups and options #{digest}"
    )


def make_header(x: torch.Tensor, config: BatchNormConfig, *, float64: bool) -> list[int]:
    """What every rank of a group must agree on (all but the batch sizes), then the input's shape."""
    dims = list(x.shape[:_MAX_HEADER_DIMS]) + [-1] * (_MAX_HEADER_DIMS - min(x.dim(), _MAX_HEADER_DIMS))
    agreed = [config.num_features, x.dim(), config.feature_axis, int(float64), int(config.fast_variance)]
    return [*agreed, fingerprint(config), *dims]


def _raise_on_mismatch(headers: list[list[int]]) -> None:
    signatures: dict[tuple[int, ...], list[int]] = {}
    for rank, h in enumerate(headers):  # the batch sizes (dims other than the feature axis) may differ
        signatures.setdefault(tuple(h[:_AGREED]), []).append(rank)
    if len(signatures) > 1:
        given = "; ".join(_describe(ranks, headers[ranks[0]]) for ranks in signatures.values())
        raise argument_error("x", "the same num_features, input rank, dtype and options on every rank", given)


def check_peers(header: list[int], *, device: Any, group: Any, timeout: float | None) -> None:
    """Raise ``ValueError`` on every rank unless all ranks of ``group`` have the same
    header (:func:`make_header`): run before the first exchange of statistics, whose
    size depends on num_features."""
    local = torch.tensor(header, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    _wait(dist.all_gather(gathered, local, group=group, async_op=True), timeout, "the all_gather of shapes", group)
    _raise_on_mismatch([h.tolist() for h in gathered])


class Gather:
    """The exchange of per-rank statistics in one collective.

    Each rank all-gathers its row (the header, then the arrays flattened) in
    float64: every rank gets every row, exactly (float32 and float64 values and
    the integer header are exact in float64). An all-gather is one round of
    messages; the all-reduce of a zero ``(ranks, row)`` buffer that gives the
    same rows takes two with gloo (measured in ``docs/performance.md``). Every
    synced training call, on either path, makes this same exchange for its
    ``(count, mean, centred squares)`` (or ``(count, sum, sum of squares)``), and
    its backward pass one all-reduce of the
    ``(ranks, values)`` cotangents (each rank needs the sum over ranks of its
    row: a reduce-scatter, which gloo runs slower than the all-reduce): the
    collectives match whatever path each rank takes. The headers are compared
    on every call.
    """

    def __init__(self, group: Any, header: list[int], timeout: float | None):
        self.group, self.header, self.timeout = group, header, timeout
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def rows(self, arrays: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Every rank's ``arrays``, stacked: ``(ranks, *a.shape)`` each, in ``a``'s dtype."""
        h, device = len(self.header), arrays[0].device
        header = torch.tensor(self.header, dtype=torch.float64, device=device)
        row = torch.cat([header, *(a.detach().reshape(-1).to(torch.float64) for a in arrays)])
        buffer = row.new_empty(self.size, row.numel())
        work = dist.all_gather(list(buffer.unbind(0)), row, group=self.group, async_op=True)
        _wait(work, self.timeout, "the exchange of statistics", self.group)
        _raise_on_mismatch(buffer[:, :h].long().tolist())
        return self._split(buffer[:, h:], arrays)

    def own_cotangents(self, cotangents: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's row of the sum over ranks of each rank's ``(ranks, *shape)`` cotangents."""
        buffer = torch.cat([c.reshape(self.size, -1).to(torch.float64) for c in cotangents], dim=1)
        work = dist.all_reduce(buffer, group=self.group, async_op=True)
        _wait(work, self.timeout, "the exchange of gradients", self.group)
        return self._split(buffer[self.rank], tuple(c[0] for c in cotangents))

    def _split(self, values: torch.Tensor, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        lead = values.shape[:-1]
        parts = values.split([a.numel() for a in like], dim=-1)
        return tuple(p.reshape((*lead, *a.shape)).to(a.dtype) for p, a in zip(parts, like))


class _AllGather(torch.autograd.Function):
    """:meth:`Gather.rows` for the core's ``all_gather`` hook. Its backward all-reduces
    the cotangents and keeps this rank's row: for a loss summed over ranks, the
    gradient of rank r's arrays is the sum over ranks q of dL_q / d rows[r]."""

    @staticmethod
    def forward(ctx: Any, gather: Gather, *arrays: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.gather = gather
        return gather.rows(arrays)

    @staticmethod
    def backward(ctx: Any, *cotangents: torch.Tensor) -> tuple[Any, ...]:
        return (None, *ctx.gather.own_cotangents(cotangents))


def make_all_gather(gather: Gather) -> AllGather:
    """The core's differentiable ``all_gather`` hook over ``gather``."""
    return lambda arrays: _AllGather.apply(gather, *arrays)
