r"""Cross-replica statistics for PyTorch over ``torch.distributed``, on any device (gloo on
the CPU, NCCL on GPUs): one exchange forward per synced training call, and one backward
when the input needs a gradient (``docs/torch-models.md`` counts their rounds and bytes).

:class:`Gather` (groups of at most :data:`ALL_GATHER_MAX_RANKS` ranks) all-gathers every
rank's row; :class:`Reduce` (larger groups) all-reduces sums around a shift that every rank
holds bitwise, checksummed, and falls back to :class:`Gather`. Both serve the core's
``all_gather`` hook (:func:`make_all_gather`, differentiable) and PyTorch's kernels
(``torch_kernels.NativeBatchNorm``), so ranks may take different paths. :class:`Sync` is
what a synced layer keeps between calls. Every collective waits at most ``timeout``
seconds: a rank that died or never calls gives the others a ``RuntimeError``. Compiled,
the collectives are PyTorch's functional ones and a disagreement is
``torch._assert_async``'s error (no fallback, no rank names: those need the host).
"""

from __future__ import annotations

import datetime
import math
import time
import weakref
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from bn1d.algorithm import AllGather, combine_shifted
from bn1d.config import OPTIONS, BatchNormConfig, argument_error, check_partition, check_real

__all__ = [
    "ALL_GATHER_MAX_RANKS",
    "FLOAT64_REDUCE_MAX_RATIO",
    "Gather",
    "Reduce",
    "Sync",
    "check_process_group",
    "check_sync",
    "check_timeout",
    "make_all_gather",
]

#: The largest group that exchanges with :class:`Gather` (one round, ``O(ranks x C)``
#: bytes); larger groups use :class:`Reduce` (one round, ``O(C)`` bytes). Every rank
#: of a group must have the same value.
ALL_GATHER_MAX_RANKS = 8
_MAX_HEADER_DIMS = 8
_AGREED = 6  # header entries every rank must share; the dims after them may differ
_PRIME = 2**31 - 1  # the checksum of the agreed shift is taken modulo this prime
#: Subgroups per parent process group and ``axis_index_groups``. Weakly keyed: when
#: ``destroy_process_group`` drops a parent, its entry (and the subgroups, destroyed
#: with it) goes too; a process that holds destroyed groups aborts at exit.
_subgroups: weakref.WeakKeyDictionary[Any, dict[tuple[tuple[int, ...], ...], list[Any]]] = weakref.WeakKeyDictionary()


#: The eager all-gather into one tensor (``all_gather_single`` from PyTorch 2.13 on); the
#: functional collective of compiled graphs makes the same collective.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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


# -- the collectives (the only calls into torch.distributed's messages) -------------------
def group_size(group: Any) -> int:
    """The number of ranks of ``group``."""
    return dist.get_world_size(group)


def group_rank(group: Any) -> int:
    """This process's rank in ``group``."""
    return dist.get_rank(group)


def all_gather_rows(row: torch.Tensor, group: Any, timeout: float | None, what: str) -> torch.Tensor:
    """Every rank's 1-D ``row``, stacked ``(ranks, row.numel())`` in rank order: one round."""
    size = group_size(group)
    if torch.compiler.is_compiling():
        return funcol.all_gather_single(row, 0, group).view(size, -1)
    buffer = row.new_empty(size * row.numel())
    _wait(_ALL_GATHER_SINGLE(buffer, row, group=group, async_op=True), timeout, what, group)
    return buffer.view(size, -1)


def all_reduce_sum(buffer: torch.Tensor, group: Any, timeout: float | None, what: str) -> torch.Tensor:
    """The sum over the ranks of ``group`` of ``buffer`` (contiguous; summed in place
    eagerly), identical on every rank: one round."""
    if torch.compiler.is_compiling():
        return funcol.all_reduce(buffer, "sum", group)
    _wait(dist.all_reduce(buffer, group=group, async_op=True), timeout, what, group)
    return buffer


# -- headers ----------------------------------------------------------------------------------
@torch.compiler.assume_constant_result
def _digest(axis_index_groups: Any, options: tuple[bool, ...]) -> int:
    """One number for what else the ranks must share: ``axis_index_groups`` and every option
    of ``bn1d.config.OPTIONS``, in its order (an option may change what is exchanged).
    ``torch.compile`` takes it as a constant, calling this at trace time (it cannot trace ``zlib``)."""
    return zlib.crc32(repr((axis_index_groups, options)).encode())


def make_header(shape: Sequence[int], config: BatchNormConfig, *, float64: bool) -> list[int]:
    """What every rank of a group must agree on (all but the batch sizes), then the input's ``shape``."""
    ndim = len(shape)
    dims = list(shape[:_MAX_HEADER_DIMS]) + [-1] * (_MAX_HEADER_DIMS - min(ndim, _MAX_HEADER_DIMS))
    digest = _digest(config.axis_index_groups, tuple(getattr(config, option) for option in OPTIONS))
    return [config.num_features, ndim, config.feature_axis, int(float64), int(config.fast_variance), digest, *dims]


def _describe(ranks: list[int], header: Sequence[int]) -> str:
    num_features, ndim, feature_axis, dtype_code, fast_variance, digest, *dims = header
    shape = tuple(dims[: min(ndim, _MAX_HEADER_DIMS)]) + (("...",) if ndim > _MAX_HEADER_DIMS else ())
    return (
        f"ranks {ranks}: num_features={num_features} on axis {feature_axis} of a {ndim}-D input (rank {ranks[0]}: "
        f"shape {shape}), {('float32', 'float64')[dtype_code]} statistics, fast_variance={bool(fast_variance)}, "
        f"axis_index_groups and options #{digest}"
    )


_COMPILED_MISMATCH = (
    "x: expected the same num_features, input rank, dtype and options on every rank, got ranks that differ "
    "(under torch.compile the ranks are not named: run the call eagerly to see them)"
)


def _check_headers(headers: torch.Tensor) -> None:
    """Raise unless the rows of ``headers`` (integers) share their agreed entries; eagerly
    a ``ValueError`` naming every group of ranks that agree (the batch sizes may differ)."""
    if torch.compiler.is_compiling():  # no host round trip in a graph: an assertion on the device
        agreed = headers[:, :_AGREED]
        torch._assert_async((agreed == agreed[0]).all(), _COMPILED_MISMATCH)
        return
    rows = headers.long().tolist()
    signatures: dict[tuple[int, ...], list[int]] = {}
    for rank, row in enumerate(rows):
        signatures.setdefault(tuple(row[:_AGREED]), []).append(rank)
    if len(signatures) > 1:
        given = "; ".join(_describe(ranks, rows[ranks[0]]) for ranks in signatures.values())
        raise argument_error("x", "the same num_features, input rank, dtype and options on every rank", given)


def check_peers(header: list[int], *, device: Any, group: Any, timeout: float | None) -> None:
    """Raise ``ValueError`` on every rank unless all ranks of ``group`` have the same
    header: run before the first exchange of statistics, whose size depends on num_features."""
    local = torch.tensor(header, dtype=torch.int64, device=device)
    _check_headers(all_gather_rows(local, group, timeout, "the all_gather of shapes"))


def _split(values: torch.Tensor, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``values`` (``(..., sum of sizes)``) as arrays shaped and typed like ``like``."""
    lead = values.shape[:-1]
    parts = values.split([a.numel() for a in like], dim=-1)
    return tuple(p.reshape((*lead, *a.shape)).to(a.dtype) for p, a in zip(parts, like))


# -- the two exchanges ------------------------------------------------------------------------
class Gather:
    """The exchange of small groups: one all-gather of every rank's row (the header, then
    the arrays), in float64, which holds float32 and float64 values and the integer header
    exactly; the headers are compared on every call. Its backward is one all-reduce of the
    ``(ranks, values)`` cotangents (each rank needs the sum over ranks of its own row)."""

    def __init__(self, group: Any, header: list[int], timeout: float | None):
        self.group, self.header, self.timeout = group, header, timeout
        self.rank, self.size = group_rank(group), group_size(group)
        self.next_shift: torch.Tensor | None = None  # no shift to agree on

    def rows(self, arrays: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Every rank's ``arrays``, stacked: ``(ranks, *a.shape)`` each, in ``a``'s dtype."""
        h = len(self.header)
        header = torch.tensor(self.header, dtype=torch.float64, device=arrays[0].device)
        row = torch.cat([header, *(a.detach().reshape(-1).to(torch.float64) for a in arrays)])
        buffer = all_gather_rows(row, self.group, self.timeout, "the exchange of statistics")
        _check_headers(buffer[:, :h])
        return _split(buffer[:, h:], arrays)

    def own_cotangents(self, cotangents: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's row of the sum over ranks of each rank's ``(ranks, *shape)`` cotangents."""
        buffer = torch.cat([c.reshape(self.size, -1).to(torch.float64) for c in cotangents], dim=1)
        buffer = all_reduce_sum(buffer, self.group, self.timeout, "the exchange of gradients")
        return _split(buffer[self.rank], tuple(c[0] for c in cotangents))


def _nibbles(values: torch.Tensor) -> torch.Tensor:
    """Integers ``0 <= v < 2**32`` as their eight 4-bit pieces, in float64."""
    offsets = torch.arange(0, 32, 4, device=values.device, dtype=torch.int64)
    return ((values.reshape(-1, 1) >> offsets) & 0xF).reshape(-1).to(torch.float64)


def _shift_checksum(shift: torch.Tensor) -> torch.Tensor:
    """Two weighted sums modulo :data:`_PRIME` of the bits of ``shift`` (float64 ``(C,)``):
    computed on its device, with no overflow (every product is below ``2**62``)."""
    bits = shift.contiguous().view(torch.int64)
    weights = torch.arange(1, shift.numel() + 1, device=shift.device, dtype=torch.int64) % _PRIME
    halves = torch.stack([bits & 0xFFFFFFFF, (bits >> 32) & 0xFFFFFFFF]) % _PRIME
    return (halves * weights % _PRIME).sum(dim=1) % _PRIME


#: With float64 statistics, the largest ``|mean - K| / std`` at which :class:`Reduce`
#: keeps its sums: the cancellation of ``B - A**2 / n`` then costs ``u64 * 16``
#: relative, a tenth of R2.7's float64 bound (``1e-5 * 2**-29``, about ``168 u64``).
FLOAT64_REDUCE_MAX_RATIO = 4.0


def _cancels(offset: torch.Tensor, centred: torch.Tensor, n: torch.Tensor) -> bool:
    """Whether ``|mean - K| / std`` exceeds :data:`FLOAT64_REDUCE_MAX_RATIO` for a
    feature (eager only: it reads the values)."""
    limit = FLOAT64_REDUCE_MAX_RATIO**2 * centred / torch.where(n > 0, n, 1.0)
    return bool((offset * offset > limit).any())


def _next_shift(shift: torch.Tensor, count: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The agreed shift after a call: the call's global ``mean`` where it saw data and is
    finite, else the current ``shift`` (one inf or NaN batch must not poison every later
    call: the same bits on every rank, so no checksum would see it)."""
    return torch.where((count > 0) & torch.isfinite(mean), mean, shift)


class Reduce:
    r"""The exchange of large groups: one all-reduce of sums around an agreed shift.

    ``shift`` ``K`` ``(C,)`` (float64) holds the same bits on every rank: zeros on a layer's
    first synced call, then :attr:`next_shift`, the previous call's global finite mean.
    Rank ``r`` (count ``n_r``, local shift ``K_r``, ``S1_r = sum(x - K_r)``, centred squares
    ``M_r``) sends, with ``e_r = S1_r / n_r + (K_r - K)``::

        n_r,   n_r * e_r,   M_r + n_r * e_r**2,   checksum nibbles c,   c**2

    whose sums are ``n``, ``A = n (mean - K)`` and ``B``; the group's centred squares are
    ``B - A**2 / n``, off by ``u64 (|mean - K| / std)**2`` relative: within float32's bound
    of R2.7 at any shift, so float64 statistics fall back to :class:`Gather` beyond
    :data:`FLOAT64_REDUCE_MAX_RATIO` (every rank sees the same sums, so every rank falls
    back; compiled, float64 calls always do). ``R sum(c**2) == (sum c)**2`` holds only when
    every rank sent the same checksum of the agreed header and ``K``; else the call falls
    back too. :meth:`rows` gives the combined row ``(n, K, A, B - A**2 / n)`` for
    :func:`~bn1d.algorithm.combine_shifted`; the backward all-reduces the cotangents of
    ``A`` and ``M``, rank ``r``'s own being ``dA + 2 (mean_r - mean) dM`` and ``dM``.
    ``docs/torch-models.md`` has the costs.
    """

    def __init__(
        self, group: Any, header: list[int], timeout: float | None, *, fast_variance: bool, shift: torch.Tensor
    ):
        self.group, self.header, self.timeout, self.fast_variance = group, header, timeout, fast_variance
        self.rank, self.size = group_rank(group), group_size(group)
        self.shift = shift
        self.next_shift: torch.Tensor | None = shift
        self.fallback: Gather | None = None
        self.deviation: torch.Tensor | None = None  # this rank's mean - the global mean, for the backward

    def _checksum(self, device: Any) -> torch.Tensor:
        digest = 7
        for value in self.header[:_AGREED]:  # Python integers: traced as constants under torch.compile
            digest = (digest * 1_000_003 + value) % _PRIME
        agreed = torch.tensor([digest], dtype=torch.int64, device=device)
        if self.fast_variance:  # no shift: only the header is checked
            return _nibbles(agreed)
        return _nibbles(torch.cat([agreed, _shift_checksum(self.shift)]))

    def rows(self, arrays: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The combined row, ``(1, *a.shape)`` for each of ``arrays``, in ``a``'s dtype
        (or, after a fallback, every rank's rows)."""
        wide = tuple(a.detach().to(torch.float64) for a in arrays)
        if self.fast_variance:  # count, sum and sum of squares: added
            terms = [w.reshape(-1) for w in wide]
        else:
            count, shift, sums, squares = wide
            count = count.reshape(())
            has = count > 0
            local_offset = torch.where(has, sums / torch.where(has, count, 1.0), 0.0) + (shift - self.shift)
            terms = [count.reshape(1), count * local_offset, squares + count * local_offset * local_offset]
        check = self._checksum(wide[0].device)
        sizes = [t.numel() for t in terms]
        buffer = torch.cat([*terms, check, check * check])
        buffer = all_reduce_sum(buffer, self.group, self.timeout, "the exchange of statistics")
        *totals, check_sum, check_squares = buffer.split([*sizes, check.numel(), check.numel()])
        agreed = (self.size * check_squares == check_sum * check_sum).all()
        if torch.compiler.is_compiling():
            torch._assert_async(agreed, _COMPILED_MISMATCH + " or in the agreed shift")
        elif not bool(agreed):  # every rank sees the same sums, so every rank falls back
            return self._fall_back(arrays)
        if self.fast_variance:
            return tuple(t.reshape(1, *a.shape).to(a.dtype) for t, a in zip(totals, arrays))
        n, a_total, b_total = totals[0].reshape(()), totals[1], totals[2]
        offset = a_total / torch.where(n > 0, n, 1.0)  # the global mean - K
        centred = torch.clamp(b_total - a_total * offset, min=0.0)
        if self.header[3] and (torch.compiler.is_compiling() or _cancels(offset, centred, n)):  # float64 statistics
            return self._fall_back(arrays)
        self.deviation = torch.where(has, local_offset - offset, 0.0)
        self.next_shift = _next_shift(self.shift, n, self.shift + offset)
        combined = (n, self.shift, a_total, centred)
        return tuple(v.reshape(1, *a.shape).to(a.dtype) for v, a in zip(combined, arrays))

    def _fall_back(self, arrays: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The call's exchange as :class:`Gather` (which raises, naming the ranks, when the
        headers differ) and, from its rows, a new agreed shift: their global mean."""
        self.fallback = Gather(self.group, self.header, self.timeout)
        rows = self.fallback.rows(arrays)
        if not self.fast_variance:
            n, offset, _, frame = combine_shifted(*(r.to(torch.float64) for r in rows))
            self.next_shift = _next_shift(self.shift, n, frame + offset)
        return rows

    def own_cotangents(self, cotangents: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's cotangents of its own arrays, from each rank's cotangents of the
        combined row: one all-reduce of ``2C`` values (``2C + 1`` with ``fast_variance``)."""
        if self.fallback is not None:
            return self.fallback.own_cotangents(cotangents)
        one_row = tuple(c[0] for c in cotangents)
        if self.fast_variance:  # a sum: the derivative of the total by each rank's term is 1
            buffer = torch.cat([c.reshape(-1).to(torch.float64) for c in one_row])
            return _split(all_reduce_sum(buffer, self.group, self.timeout, "the exchange of gradients"), one_row)
        d_sums, d_squares = one_row[2], one_row[3]
        buffer = torch.cat([d_sums.reshape(-1), d_squares.reshape(-1)]).to(torch.float64)
        buffer = all_reduce_sum(buffer, self.group, self.timeout, "the exchange of gradients")
        total_sums, total_squares = buffer.split(d_sums.numel())
        deviation = self.deviation
        assert deviation is not None, "rows() ran before own_cotangents()"
        own_sums = total_sums + 2.0 * deviation * total_squares
        own = (torch.zeros_like(one_row[0]), torch.zeros_like(one_row[1]), own_sums, total_squares)
        return tuple(v.reshape(c.shape).to(c.dtype) for v, c in zip(own, one_row))


def make_exchange(
    group: Any,
    header: list[int],
    timeout: float | None,
    *,
    fast_variance: bool,
    shift: torch.Tensor | None,
    device: Any,
) -> Gather | Reduce:
    """:class:`Gather` up to :data:`ALL_GATHER_MAX_RANKS` ranks, else :class:`Reduce` around
    ``shift`` (zeros when ``None`` or on another device): every rank of a group chooses alike."""
    if group_size(group) <= ALL_GATHER_MAX_RANKS:
        return Gather(group, header, timeout)
    if shift is None or shift.device != torch.device(device):
        shift = torch.zeros(header[0], dtype=torch.float64, device=device)
    return Reduce(group, header, timeout, fast_variance=fast_variance, shift=shift)


# -- a layer's sync, kept between its calls ----------------------------------------------------
def check_timeout(timeout: Any) -> float | None:
    """``timeout`` (seconds each collective may wait) checked, as a float, or ``None`` (R7.1)."""
    expected = "None or a finite number of seconds > 0"
    return None if timeout is None else float(check_real("timeout", timeout, expected, 0.0, math.inf, open_low=True))


def check_process_group(process_group: Any) -> Any:
    """``process_group`` checked: ``None`` or a ``torch.distributed.ProcessGroup`` (R7.1)."""
    if process_group is not None and not (
        torch.distributed.is_available() and isinstance(process_group, torch.distributed.ProcessGroup)
    ):
        raise argument_error("process_group", "None or a torch.distributed.ProcessGroup", process_group, TypeError)
    return process_group


def check_sync(sync: Any) -> Any:
    """A ``sync`` argument: ``False``, ``True`` (over WORLD) or a process group (R7.1)."""
    if not isinstance(sync, bool):
        check_process_group(sync)
        if sync is None:
            raise argument_error("sync", "False, True or a torch.distributed.ProcessGroup", sync, TypeError)
    return sync


class Sync:
    """What a synced layer keeps between its calls: its group (``process_group``, WORLD by
    default, split by ``axis_index_groups``), the collectives' ``timeout``, whether its
    ranks agreed on what sizes the exchanges (checked by the first call: a ``ValueError``
    naming every disagreeing rank, not a hang) and the shift of :class:`Reduce`. Without an
    initialised ``torch.distributed`` a synced call uses its local batch (as ``nn.SyncBatchNorm``)."""

    def __init__(self, process_group: Any = None, axis_index_groups: Any = None, timeout: Any = None):
        self.process_group = check_process_group(process_group)
        self.axis_index_groups = axis_index_groups
        self.timeout = check_timeout(timeout)
        self.peers_checked = False
        self.agreed_shift: torch.Tensor | None = None
        #: The input shape and config the headers describe where the call's view differs from
        #: the user's input (the BrainPy-signature layer's), set by the layer before each call.
        self.described: tuple[tuple[int, ...], BatchNormConfig] | None = None

    def group(self) -> Any:
        """The process group to sum statistics over, or ``None`` without ``torch.distributed``.
        ``axis_index_groups`` subgroups are created once, by every rank in the same order."""
        if self.process_group is None and not (dist.is_available() and dist.is_initialized()):
            return None
        parent, groups = dist.group.WORLD if self.process_group is None else self.process_group, self.axis_index_groups
        if groups is None:
            return parent
        check_partition(groups, dist.get_world_size(parent), " (the ranks of the process group)")
        cached = _subgroups.setdefault(parent, {})
        if groups not in cached:
            ranks = dist.get_process_group_ranks(parent)
            timeout = None if self.timeout is None else datetime.timedelta(seconds=self.timeout)
            cached[groups] = [dist.new_group([ranks[i] for i in g], timeout=timeout) for g in groups]
        me = dist.get_rank(parent)
        return next(sub for g, sub in zip(groups, cached[groups]) if me in g)

    def exchange(self, x: torch.Tensor, config: BatchNormConfig, float64: bool, group: Any) -> Any:
        """The exchange of one synced training call over ``group`` (:meth:`group`)."""
        shape, layout = (tuple(x.shape), config) if self.described is None else self.described
        header = make_header(shape, layout, float64=float64)
        if not self.peers_checked:  # the exchanges' sizes depend on num_features: agree on it first
            parent = dist.group.WORLD if self.process_group is None else self.process_group
            check_peers(header, device=x.device, group=parent, timeout=self.timeout)
            self.peers_checked = True
        return make_exchange(
            group, header, self.timeout, fast_variance=config.fast_variance, shift=self.agreed_shift, device=x.device
        )


class _AllGather(torch.autograd.Function):
    """An exchange's ``rows`` for the core's ``all_gather`` hook. Its backward gives
    this rank's cotangents (``own_cotangents``): for a loss summed over ranks, the
    gradient of rank r's arrays is the sum over ranks q of dL_q / d rows[r]."""

    @staticmethod
    def forward(exchange: Gather | Reduce, *arrays: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return exchange.rows(arrays)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:  # torch.func.grad needs this form
        ctx.exchange = inputs[0]

    @staticmethod
    def backward(ctx: Any, *cotangents: torch.Tensor) -> tuple[Any, ...]:
        return (None, *ctx.exchange.own_cotangents(cotangents))


def make_all_gather(exchange: Gather | Reduce) -> AllGather:
    """The core's differentiable ``all_gather`` hook over ``exchange``."""
    return lambda arrays: _AllGather.apply(exchange, *arrays)
