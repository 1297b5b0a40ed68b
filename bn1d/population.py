r"""Exact population statistics: the pooled mean and variance of every batch seen, streamed.

After training, and always after weight averaging (SWA, an EMA of the weights), the running
statistics no longer describe the model's activations; PreciseBN (Wu and Johnson, 2021,
"Rethinking 'Batch' in BatchNorm") recomputes them over a pass of data. What
:class:`PopulationStatistics` gives is the statistics of the concatenation of every batch
it was given, per feature: with ``N`` the kept values of all batches,

.. math::

    \mu = \frac{1}{N}\sum_b n_b\mu_b, \qquad
    \sigma^2 = \frac{1}{N}\Bigl(\sum_b M_b + \sum_b n_b(\mu_b - \mu)^2\Bigr)

(``M_b``: batch ``b``'s squared deviations from its own mean), so uneven batches weigh by
their size and the variance between batch means is counted, where an average of the
batches' statistics (``torch.optim.swa_utils.update_bn``'s ``momentum=None``) drops it.

Each batch's moments are the core's (``bn1d.algorithm``: shifted by one of its values,
summed in float64 where the library has it), kept as ``(count, shift K, mean - K, M)``.
Two such rows merge as the core merges replicas' rows (:func:`bn1d.algorithm.combine_moments`
in the frame of a non-empty row's shift: the shifts' differences are exact, nothing cancels),
and rows merge pairwise as a binary counter does, so ``B`` batches cost at most ``log2(B)``
roundings per value (a bound independent of how many batches; a chain of merges has ``B``)
and memory is ``log2(B)`` rows of ``C``. Any Array API library: NumPy, PyTorch, JAX, ``array_api_strict``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from array_api_compat import array_namespace

from .algorithm import _cast, batch_moments, combine_moments
from .config import argument_error, normalize_reduce_axes
from .validation import check_inputs

__all__ = ["PopulationStatistics"]

Row = tuple[Any, Any, Any, Any]  # count (), shift (C,), mean - shift (C,), squared deviations (C,)


def _merge(xp: Any, a: Row, b: Row) -> Row:
    """Two rows' union, in the frame of ``a``'s shift unless ``a`` is empty."""
    (na, ka, da, qa), (nb, kb, db, qb) = a, b
    frame = xp.where(na > 0, ka, kb)
    means = xp.stack([(ka - frame) + da, (kb - frame) + db])
    n, offset, var = combine_moments(xp.stack([na, nb]), means, xp.stack([qa, qb]))
    return n, frame, offset, var * n


class PopulationStatistics:
    """The pooled count, mean and variance per feature of every batch given to :meth:`update`.

    Parameters
    ----------
    num_features : int
        Features per batch (``C``).
    axis : int or sequence of int, optional
        The reduced axes, as the layers' (BrainPy's) ``axis``: ``(0, 1)`` for ``(B, L, C)``.

    Raises
    ------
    TypeError, ValueError
        For a bad argument, naming it (R7.1).

    Notes
    -----
    ``count``, ``mean`` and ``var`` (biased) are arrays of the batches' library, in the
    accumulation dtype (float64 where the library has it); ``running_var`` is the variance
    times ``N / (N - 1)`` (unbiased, R3.3), as a layer's running statistics hold it.
    Accumulators of disjoint data (ranks, chunks) :meth:`merge` into the statistics of
    their union.
    """

    def __init__(self, num_features: int, axis: int | Sequence[int] = (0, 1)):
        if isinstance(num_features, bool) or not isinstance(num_features, int):
            raise argument_error("num_features", "a positive int", num_features, TypeError)
        if num_features <= 0:
            raise argument_error("num_features", "a positive int", num_features)
        self.num_features = num_features
        self.reduce_axes = normalize_reduce_axes(axis)
        self.batches = 0
        self._levels: list[tuple[int, Row]] = []  # (level, row): row merges 2**level batches

    def update(self, x: Any, mask: Any = None) -> PopulationStatistics:
        """Add a batch ``x`` (its positions where ``mask`` is True, ``x``'s shape without the
        feature axis); returns ``self``."""
        xp = check_inputs(x, mask, num_features=self.num_features, reduce_axes=self.reduce_axes)
        if self._levels:
            self._require_library(xp, "x")
        moments = batch_moments(x, mask, reduce_axes=self.reduce_axes)
        acc = moments.offset.dtype
        count = moments.count
        count = xp.asarray(count, dtype=acc) if isinstance(count, int) else xp.astype(count, acc)
        self._push(xp, (count, _cast(xp, moments.shift, acc), moments.offset, moments.var * count), 0)
        self.batches += 1
        return self

    def add(self, count: Any, shift: Any, offset: Any, squares: Any) -> PopulationStatistics:
        """Add one batch's moments computed elsewhere (a framework's own kernels, another
        rank's total): its ``count`` (0-d), ``shift`` ``K``, ``offset`` (its mean minus ``K``)
        and ``squares`` (its squared deviations from its mean), ``(C,)`` each, in the
        accumulation dtype, exact to within R2.7; returns ``self``."""
        xp = array_namespace(shift, offset, squares)
        for name, value in (("shift", shift), ("offset", offset), ("squares", squares)):
            if tuple(value.shape) != (self.num_features,):
                raise argument_error(name, f"shape ({self.num_features},)", tuple(value.shape))
        if self._levels:
            self._require_library(xp, "shift")
        self._push(xp, (xp.asarray(count, dtype=offset.dtype), shift, offset, squares), 0)
        self.batches += 1
        return self

    def merge(self, other: PopulationStatistics) -> PopulationStatistics:
        """Add what ``other`` has seen (another rank's or chunk's accumulator, of the same
        features and axes); returns ``self``."""
        if not isinstance(other, PopulationStatistics):
            raise argument_error("other", "a PopulationStatistics", type(other).__name__, TypeError)
        if (other.num_features, other.reduce_axes) != (self.num_features, self.reduce_axes):
            expected = f"num_features={self.num_features}, axis={self.reduce_axes}"
            given = f"num_features={other.num_features}, axis={other.reduce_axes}"
            raise argument_error("other", expected, given)
        row = other._total()
        if row is not None:
            xp = array_namespace(row[1])
            if self._levels:
                self._require_library(xp, "other")
            self._push(xp, row, max((level for level, _ in other._levels), default=0))
            self.batches += other.batches
        return self

    # -- the statistics -----------------------------------------------------------------
    @property
    def count(self) -> Any:
        """Values per feature seen (kept by the masks)."""
        return self._result()[0]

    @property
    def mean(self) -> Any:
        """The pooled mean, ``(C,)``."""
        return self._result()[1]

    @property
    def var(self) -> Any:
        """The pooled biased variance, ``(C,)``."""
        return self._result()[2]

    @property
    def running_var(self) -> Any:
        """The pooled variance times ``N / (N - 1)`` (R3.3; the biased one for ``N <= 1``)."""
        n, _, var = self._result()
        xp = array_namespace(var)
        return xp.where(n > 1, var * (n / xp.where(n > 1, n - 1, xp.ones_like(n))), var)

    def _result(self) -> tuple[Any, Any, Any]:
        row = self._total()
        if row is None:
            raise argument_error("batches", "at least one batch (update was never called)", 0)
        n, shift, offset, squares = row
        xp = array_namespace(shift)
        return n, shift + offset, squares / xp.where(n > 0, n, xp.ones_like(n))

    # -- the binary counter -------------------------------------------------------------
    def _push(self, xp: Any, row: Row, level: int) -> None:
        levels = self._levels
        levels.append((level, row))
        while len(levels) > 1 and levels[-2][0] <= levels[-1][0]:
            (low, older), (high, newer) = levels[-2], levels.pop()
            levels[-1] = (max(low, high) + 1, _merge(xp, older, newer))

    def _total(self) -> Row | None:
        if not self._levels:
            return None
        rows = [row for _, row in self._levels]
        xp = array_namespace(rows[0][1])
        total = rows[-1]
        for row in reversed(rows[:-1]):  # the smallest first: each merge of similar weights
            total = _merge(xp, row, total)
        return total

    def _require_library(self, xp: Any, name: str) -> None:
        kept = array_namespace(self._levels[0][1][1])
        if xp is not kept:
            raise argument_error(name, f"an array of the library of the earlier batches ({kept.__name__})",
                                 xp.__name__, TypeError)  # fmt: skip


# -- what every framework's recompute shares ----------------------------------------------------
def check_pass(input: Any, limit: Any, progress: Any) -> None:
    """The recompute functions' ``input``, ``limit`` and ``progress`` checked (R7.1)."""
    if input is not None and not callable(input):
        raise argument_error("input", "None or a callable batch -> model input", type(input).__name__, TypeError)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise argument_error("limit", "None or a positive int", limit)
    if not (isinstance(progress, bool) or callable(progress)):
        raise argument_error("progress", "a bool or a callable", progress, TypeError)


def input_picker(input: Callable[[Any], Any] | None, arrays: tuple[type, ...], what: str) -> Callable[[Any], Any]:
    """``input`` (``batch -> model input``), or by default: a batch that is one of ``arrays``
    itself, a tuple or list of them its first."""
    if input is not None:
        return input

    def pick(batch: Any) -> Any:
        if isinstance(batch, arrays):
            return batch
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], arrays):
            return batch[0]
        raise argument_error(
            "batches", f"{what} or (input, ...) tuples; pass input= to pick the input of other batches",
            type(batch).__name__, TypeError,
        )  # fmt: skip

    return pick


def progress_step(progress: bool | Callable[[int], None], total: int | None) -> tuple[Callable[[int], None], Any]:
    """A per-batch callback and the bar to close: ``progress`` itself, a ``tqdm`` bar
    (``True``, when tqdm is installed; else nothing), or nothing."""
    if callable(progress):
        return progress, None
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return lambda done: None, None
        bar = tqdm(total=total, desc="recompute_statistics", unit="batch")
        return lambda done: bar.update(1), bar
    return lambda done: None, None
