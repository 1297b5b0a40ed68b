"""Cross-replica sums for the JAX backend: the core's ``all_sum`` hook over a bound axis.

:func:`replica_all_sum` is the hook of every JAX layer and module of bn1d when
``axis_name`` is set: one ``lax.psum`` over the axis (a str, or a tuple of names bound by
``vmap``, ``pmap`` or ``shard_map``), and with ``axis_index_groups`` one of the grouped
strategies of this module (its docstring says which when; ``docs/jax-modules.md``
measures them). A training call whose ``axis_name`` names no bound axis raises
:class:`UnboundAxisError`.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn1d.algorithm import AllSum
from bn1d.config import argument_error, check_partition

__all__ = ["UnboundAxisError", "replica_all_sum"]


class UnboundAxisError(ValueError, NameError):
    """A training call's ``axis_name`` names no bound axis: bn1d's ``ValueError`` (R7.1), and the
    ``NameError`` that ``lax.psum`` raises, which Flax and Equinox code catches."""


def replica_all_sum(axis_name: str | tuple[Hashable, ...], axis_index_groups: Sequence[Sequence[int]] | None) -> AllSum:
    """The core's ``all_sum`` hook over a bound JAX axis.

    Call it where ``axis_name`` is bound (inside ``vmap``/``pmap``/``shard_map``);
    it reads the axis size there and checks that ``axis_index_groups`` partition
    ``range(size)``, raising ``ValueError`` at trace time otherwise. Without
    groups it is one ``lax.psum``. JAX's ``psum`` takes groups only under
    ``pmap``, so the groups are implemented here, each replica exchanging only
    ``O(C)`` values whatever the number of groups (``docs/jax-modules.md`` has
    the cost model and the measured HLO bytes):

    * groups of one replica: no exchange; one group of every replica: ``psum``;
    * groups of a power-of-two size ``g``: recursive doubling, ``log2(g)``
      ``lax.ppermute`` rounds, each replica adding its partner's partial sums
      (floating-point addition commutes, so both partners hold the same bits
      and every replica of a group ends with the same sums, as the core needs);
    * other sizes: ``g - 1`` ``ppermute`` rounds gather the group's values,
      which every replica adds in the group's order (the same bits again);
    * at most as many groups as those rounds: one ``psum`` of a ``(groups, ...)``
      array of rows, each replica writing its group's row (as many bytes or fewer,
      in one collective instead of several);
    * a tuple ``axis_name``: groups that fix some of the named axes and span the
      others are one ``psum`` over the spanned axes; other groups fall back to
      summing a ``(groups, ...)`` array of rows (``O(groups * C)``: JAX's
      ``ppermute`` cannot permute over several ``vmap``-ped axes);
    * under ``vmap``, where nothing is communicated, up to 8 groups also sum rows.

    Per replica and exchange that is ``min(groups, log2(g))`` (or ``g - 1``) times
    the ungrouped ``psum``'s bytes: bounded by the group size, never by the number
    of groups.
    """
    try:
        size = lax.axis_size(axis_name)
    except NameError as error:
        raise argument_error(
            "axis_name",
            "an axis bound by jax.vmap, jax.pmap or jax.shard_map around this training call",
            axis_name,
            UnboundAxisError,
        ) from error
    if axis_index_groups is None:
        return lambda arrays: lax.psum(tuple(arrays), axis_name)
    check_partition(axis_index_groups, size, f", the size of axis {axis_name!r}")
    groups = tuple(tuple(int(i) for i in group) for group in axis_index_groups)
    if len({len(group) for group in groups}) > 1:  # any partition: the layers' configs take equal groups only
        return _rows_all_sum(axis_name, groups, size)
    group_size = len(groups[0])
    if group_size == size:
        return lambda arrays: lax.psum(tuple(arrays), axis_name)
    if group_size == 1:
        return lambda arrays: tuple(arrays)
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    if len(names) > 1:
        spanned = _spanned_axes(names, groups)
        if spanned is not None:
            return lambda arrays: lax.psum(tuple(arrays), spanned)
        return _rows_all_sum(axis_name, groups, size)
    doubling = group_size & (group_size - 1) == 0
    rounds = group_size.bit_length() - 1 if doubling else group_size - 1
    if len(groups) <= rounds or (len(groups) <= _VMAP_ROWS_LIMIT and _mapped_by_vmap(names[0])):
        return _rows_all_sum(axis_name, groups, size)  # no more bytes than the rounds, in one collective
    return (_doubling_all_sum if doubling else _gathering_all_sum)(names[0], groups)


#: Under ``vmap`` nothing is communicated (the replicas are one array), and up to this
#: many groups the sum of rows, one reduction over the mapped axis, is kept: its extra
#: memory is at most this many times the ungrouped reduction's.
_VMAP_ROWS_LIMIT = 8


def _mapped_by_vmap(axis_name: Hashable) -> bool:
    """Whether ``axis_name`` is bound by ``jax.vmap`` (its index is a batched value there;
    under ``pmap`` and ``shard_map`` the replicas are devices). A wrong answer costs
    speed only: every formulation gives the same sums."""
    return type(lax.axis_index(axis_name)).__name__ == "BatchTracer"


def _packed(arrays: Sequence[jax.Array]) -> tuple[list[jax.Array], Any]:
    """``arrays`` as one flat vector per dtype (one message per round, not one per
    array), and the function that splits such vectors back into ``arrays``' shapes."""
    arrays = [jnp.asarray(a) for a in arrays]
    dtypes = list(dict.fromkeys(a.dtype for a in arrays))
    buffers = [jnp.concatenate([jnp.ravel(a) for a in arrays if a.dtype == d]) for d in dtypes]

    def unpack(summed: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        offsets = dict.fromkeys(dtypes, 0)
        result = []
        for a in arrays:
            start, offsets[a.dtype] = offsets[a.dtype], offsets[a.dtype] + a.size
            result.append(jnp.reshape(summed[dtypes.index(a.dtype)][start : start + a.size], a.shape))
        return tuple(result)

    return buffers, unpack


def _doubling_all_sum(axis_name: Hashable, groups: tuple[tuple[int, ...], ...]) -> AllSum:
    """Recursive doubling within groups of a power-of-two size ``g``: in round ``k``
    the replica at position ``p`` of its group adds the partial sums of position
    ``p XOR 2**k``; ``log2(g)`` rounds of one ``(C,)``-sized message each."""
    size = len(groups[0])
    rounds = []
    distance = 1
    while distance < size:
        rounds.append([(group[p], group[p ^ distance]) for group in groups for p in range(size)])
        distance *= 2

    def all_sum(arrays: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        buffers, unpack = _packed(arrays)
        for perm in rounds:  # mine + theirs on one side, theirs + mine on the other: the same bits
            buffers = [b + lax.ppermute(b, axis_name, perm) for b in buffers]
        return unpack(buffers)

    return all_sum


def _gathering_all_sum(axis_name: Hashable, groups: tuple[tuple[int, ...], ...]) -> AllSum:
    """Groups of any size ``g``: ``g - 1`` rounds in which the replica at position ``p``
    receives the values of position ``(p + k) % g``; every replica then adds the ``g``
    values in the group's order, so all get the same bits."""
    size = len(groups[0])
    rounds = [[(group[(p + k) % size], group[p]) for group in groups for p in range(size)] for k in range(1, size)]
    position = np.empty(sum(len(g) for g in groups), np.int32)
    for group in groups:
        position[list(group)] = np.arange(size)

    def all_sum(arrays: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        buffers, unpack = _packed(arrays)
        mine = jnp.asarray(position)[lax.axis_index(axis_name)]
        order = (jnp.arange(size, dtype=mine.dtype) - mine) % size  # position q's values arrived in round (q - p) % g
        totals = []
        for b in buffers:
            arrived = jnp.stack([b, *(lax.ppermute(b, axis_name, perm) for perm in rounds)])[order]
            total = arrived[0]
            for q in range(1, size):
                total = total + arrived[q]
            totals.append(total)
        return unpack(totals)

    return all_sum


def _spanned_axes(names: tuple[Hashable, ...], groups: tuple[tuple[int, ...], ...]) -> tuple[Hashable, ...] | None:
    """The named axes the groups span, when each group is the replicas that share
    their indices on the other axes (the replica index is row-major over ``names``,
    as ``lax.axis_index`` numbers it); ``None`` for any other partition."""
    sizes = [lax.axis_size(name) for name in names]
    coordinates = np.stack(np.unravel_index(np.arange(int(np.prod(sizes))), sizes), axis=1)
    wanted = {frozenset(group) for group in groups}
    for count in range(1, len(names)):
        for spanned in itertools.combinations(range(len(names)), count):
            fixed = [a for a in range(len(names)) if a not in spanned]
            blocks: dict[tuple[int, ...], set[int]] = {}
            for index, coordinate in enumerate(coordinates):
                blocks.setdefault(tuple(coordinate[fixed]), set()).add(index)
            if {frozenset(block) for block in blocks.values()} == wanted:
                return tuple(names[a] for a in spanned)
    return None


def _rows_all_sum(axis_name: Any, groups: tuple[tuple[int, ...], ...], size: int) -> AllSum:
    """Any partition, over any axes: each replica writes its sums into its group's row
    of a ``(groups, ...)`` array of zeros, the array is summed over the axes and each
    replica reads its row back (``O(groups * C)`` per replica)."""
    group_of_index = np.empty(size, np.int32)
    for group_id, group in enumerate(groups):
        group_of_index[list(group)] = group_id
    row = jnp.asarray(group_of_index)[lax.axis_index(axis_name)]

    def all_sum(arrays: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        rows = tuple(jnp.zeros((len(groups), *jnp.shape(a)), a.dtype).at[row].set(a) for a in arrays)
        return tuple(summed[row] for summed in lax.psum(rows, axis_name))

    return all_sum
