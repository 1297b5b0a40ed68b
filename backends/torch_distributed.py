r"""Cross-replica statistics for ``bn1d.backends.torch`` over ``torch.distributed``.

The core (:func:`bn1d.algorithm.batch_norm`) asks for sums over the replicas of a
group through its ``all_sum`` hook; this module provides that hook on a process
group, device-agnostically (gloo on CPU, NCCL on GPU):

* :func:`sync_group` resolves the group of this rank: ``process_group`` (WORLD by
  default), or, with ``axis_index_groups``, the subgroup (``dist.new_group``) that
  holds this rank. Subgroups are created once per (process group, groups) and
  cached; ``dist.new_group`` must be entered by every rank of the default group,
  in the same order, so the first synced training call must run on every rank.
* :func:`check_peers` all-gathers a small header (num_features, rank of the
  input, feature axis, compute dtype, variance formula, groups) and raises a
  ``ValueError`` naming every disagreeing rank, so that a mismatch is an error,
  not a hang or garbage. Local batch sizes may differ: the statistics are
  count-weighted (the core all-sums counts, sums and centred sums).
* :func:`make_all_sum` returns the hook. Its sums are differentiable: the
  backward pass all-reduces the cotangents, because
  :math:`\partial L/\partial s_r = \sum_q \partial L_q/\partial S` for
  :math:`S = \sum_r s_r` and a loss :math:`L = \sum_q L_q` summed over ranks, so
  each rank's input gradient is that of the global-batch computation.

Every collective waits at most ``timeout`` seconds (``None``: the process group's
own timeout): a rank that died or never calls the layer gives a ``RuntimeError``
on the others instead of a hang.
"""

from __future__ import annotations

import datetime
import time
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from bn1d.algorithm import AllSum
from bn1d.config import argument_error

__all__ = ["check_peers", "groups_fingerprint", "make_all_sum", "sync_group"]

_MAX_HEADER_DIMS = 8
_subgroups: dict[tuple[Any, tuple[tuple[int, ...], ...]], list[Any]] = {}


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
    size = dist.get_world_size(parent)
    if sorted(i for g in axis_index_groups for i in g) != list(range(size)):
        raise argument_error("axis_index_groups", f"a partition of range({size})", axis_index_groups)
    key = (parent, axis_index_groups)
    if key not in _subgroups:  # every rank creates every subgroup, in the same order
        ranks = dist.get_process_group_ranks(parent)
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        _subgroups[key] = [dist.new_group([ranks[i] for i in g], **kwargs) for g in axis_index_groups]
    me = dist.get_rank(parent)
    return next(sub for g, sub in zip(axis_index_groups, _subgroups[key]) if me in g)


def groups_fingerprint(axis_index_groups: tuple[tuple[int, ...], ...] | None) -> int:
    return 0 if axis_index_groups is None else zlib.crc32(repr(axis_index_groups).encode())


def _describe(ranks: list[int], header: Sequence[int]) -> str:
    num_features, ndim, feature_axis, dtype_code, fast_variance, fingerprint, *dims = header
    shape = tuple(dims[: min(ndim, _MAX_HEADER_DIMS)]) + (("...",) if ndim > _MAX_HEADER_DIMS else ())
    return (
        f"ranks {ranks}: num_features={num_features} on axis {feature_axis} of a {ndim}-D input (rank {ranks[0]}: "
        f"shape {shape}), {('float32', 'float64')[dtype_code]} statistics, fast_variance={bool(fast_variance)}, "
        f"axis_index_groups #{fingerprint}"
    )


def check_peers(
    x: torch.Tensor,
    *,
    num_features: int,
    feature_axis: int,
    float64: bool,
    fast_variance: bool,
    fingerprint: int,
    group: Any,
    timeout: float | None,
) -> None:
    """Raise ``ValueError`` on every rank unless all ranks of ``group`` run the same
    collectives on the same sizes (batch sizes may differ)."""
    dims = list(x.shape[:_MAX_HEADER_DIMS]) + [-1] * (_MAX_HEADER_DIMS - min(x.dim(), _MAX_HEADER_DIMS))
    header = [num_features, x.dim(), feature_axis, int(float64), int(fast_variance), fingerprint, *dims]
    local = torch.tensor(header, dtype=torch.int64, device=x.device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    _wait(dist.all_gather(gathered, local, group=group, async_op=True), timeout, "the all_gather of shapes", group)
    headers = [h.tolist() for h in gathered]
    signatures: dict[tuple[int, ...], list[int]] = {}
    for rank, h in enumerate(headers):  # the batch sizes (dims other than the feature axis) may differ
        signatures.setdefault(tuple(h[:6]), []).append(rank)
    if len(signatures) > 1:
        given = "; ".join(_describe(ranks, headers[ranks[0]]) for ranks in signatures.values())
        raise argument_error("x", "the same num_features, input rank, dtype and options on every rank", given)


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` whose backward all-reduces the cotangent (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any, timeout: float | None) -> torch.Tensor:
        ctx.group, ctx.timeout = group, timeout
        result = tensor.clone(memory_format=torch.contiguous_format)
        _wait(dist.all_reduce(result, group=group, async_op=True), timeout, "the all_reduce of statistics", group)
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        _wait(
            dist.all_reduce(grad, group=ctx.group, async_op=True), ctx.timeout, "the all_reduce of gradients", ctx.group
        )
        return grad, None, None


def make_all_sum(group: Any, timeout: float | None) -> AllSum:
    """The core's ``all_sum`` hook: one differentiable all-reduce per call, on the
    arrays flattened into one buffer."""

    def all_sum(arrays: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        flat = torch.cat([a.reshape(-1) for a in arrays])
        summed = _AllReduceSum.apply(flat, group, timeout)
        return tuple(s.reshape(a.shape) for s, a in zip(summed.split([a.numel() for a in arrays]), arrays))

    return all_sum
