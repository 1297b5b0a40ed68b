"""Simulated replicas for any Array API library: threads that exchange their
statistics through a barrier, as a data-parallel all-reduce or all-gather would.

:func:`run_replicas` runs ``fn(replica_index)`` once per replica; inside it, a
:class:`bn1d.layer.Layer` with ``axis_name`` gets the group's hook from
:func:`replica_hooks` and its statistics are those of the concatenated batches
of its ``axis_index_groups`` group. Every member adds the same operands in the
same order, so synced results are bitwise equal within a group (``docs/spec.md``
R4).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

from array_api_compat import array_namespace

from .algorithm import Hooks
from .config import argument_error, check_partition

__all__ = ["HOOKS", "replica_hooks", "run_replicas"]

#: The two cross-replica hooks of the core that :func:`run_replicas` can simulate.
HOOKS = ("all_sum", "all_gather")


class _Replicas:
    """What the threads of one :func:`run_replicas` call share."""

    def __init__(self, count: int, timeout: float, hook: str):
        self.count, self.hook = count, hook
        self.barrier = threading.Barrier(count, timeout=timeout)
        self.slots: list[Any] = [None] * count


_thread_replica = threading.local()


def run_replicas(
    fn: Callable[[int], Any], num_replicas: int, timeout: float = 60.0, *, hook: str = "all_sum"
) -> list[Any]:
    """Run ``fn(replica_index)`` for every replica, each in its own thread, and
    return the results in replica order.

    ``hook`` picks the core's cross-replica hook: ``"all_sum"`` (two rounds of sums,
    as JAX's ``psum``) or ``"all_gather"`` (one round of every replica's rows, as
    ``torch.distributed``). Each replica owns its layer (as with data-parallel
    training); an error in any replica is re-raised here.
    """
    if not isinstance(num_replicas, int) or isinstance(num_replicas, bool) or num_replicas < 1:
        raise argument_error("num_replicas", "a positive int", num_replicas)
    if hook not in HOOKS:
        raise argument_error("hook", f"one of {HOOKS}", hook)
    shared = _Replicas(num_replicas, timeout, hook)
    results: list[Any] = [None] * num_replicas
    errors: list[BaseException | None] = [None] * num_replicas

    def replica(index: int) -> None:
        _thread_replica.context = (shared, index)
        try:
            results[index] = fn(index)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller
            errors[index] = error
            shared.barrier.abort()

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(num_replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    raised = [e for e in errors if e is not None]
    if raised:
        raise next((e for e in raised if not isinstance(e, threading.BrokenBarrierError)), raised[0])
    return results


def replica_hooks(groups: Sequence[Sequence[int]] | None, **extra: Any) -> Hooks:
    """The core's :class:`~bn1d.algorithm.Hooks` over this thread's group of
    :func:`run_replicas` (a group of one outside it); ``extra``: the other hooks."""
    context = getattr(_thread_replica, "context", None)
    if context is None:  # a single replica: the sums are the local ones
        return Hooks(all_sum=tuple, **extra)
    shared, index = context
    check_partition(groups, shared.count, " (the replicas of run_replicas)")
    group = next(g for g in (groups or (range(shared.count),)) if index in g)

    def members(arrays: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Every group member's ``arrays``, in the group's order."""
        shared.slots[index] = arrays
        shared.barrier.wait()
        rows = [shared.slots[i] for i in group]
        shared.barrier.wait()
        return rows

    def all_sum(arrays: tuple[Any, ...]) -> tuple[Any, ...]:
        rows = members(arrays)
        return tuple(functools.reduce(lambda a, b: a + b, (row[k] for row in rows)) for k in range(len(arrays)))

    def all_gather(arrays: tuple[Any, ...]) -> tuple[Any, ...]:
        rows = members(arrays)
        xp = array_namespace(*arrays)
        return tuple(xp.stack([row[k] for row in rows]) for k in range(len(arrays)))

    if shared.hook == "all_sum":
        return Hooks(all_sum=all_sum, **extra)
    return Hooks(all_gather=all_gather, **extra)
