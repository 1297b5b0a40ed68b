"""The synced layer's messages per call, counted on its code path with simulated ranks.

    python -m benchmarks.torch_exchange_cost --num-features 2048

:func:`simulated_ranks` runs a synced ``BatchNorm1d`` in this one process as rank 0
of ``ranks`` ranks whose data equal its own: ``torch_distributed``'s collectives
(``all_gather_rows``, ``all_reduce_sum``, the only calls that send messages) are
replaced by functions that return what that many identical ranks would send back
(``ranks`` copies of the row; ``ranks`` times the buffer) and record each one's
kind, purpose and bytes. So the layer's real code path runs, forward and
backward, on either path (PyTorch's kernels, or the core with a mask), and its
messages are counted exactly for any number of ranks; and the results stay
checkable, since the statistics of copies of one batch are that batch's own.

:func:`exchange_cost` counts one steady-state call (after the first call's
agreement of headers, :func:`~bn1d.backends.torch_distributed.check_peers`).
``docs/torch-models.md`` states the cost model, with the table this command prints.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple
from unittest import mock

import torch

from bn1d.backends import torch_distributed
from bn1d.backends.torch import BatchNorm1d
from bn1d.backends.torch_distributed import Sync

__all__ = ["Message", "exchange_cost", "simulated_ranks", "table", "wire_bytes"]

_SIMULATED_GROUP = "simulated group"


class Message(NamedTuple):
    """One collective of rank 0: ``kind`` (``"all_gather"``, ``"all_reduce"``), what it
    exchanges, the bytes this rank contributes and the bytes it gets back."""

    kind: str
    what: str
    sent: int
    received: int


def wire_bytes(message: Message, ranks: int) -> float:
    """Bytes a rank sends over the wire for ``message`` with ring algorithms (gloo's
    and NCCL's for large buffers): ``(R - 1) / R`` of the gathered rows, ``2 (R - 1) /
    R`` of a reduced buffer (a reduce-scatter, then an all-gather)."""
    if message.kind == "all_gather":
        return message.received * (ranks - 1) / ranks
    return 2.0 * message.sent * (ranks - 1) / ranks


@contextlib.contextmanager
def simulated_ranks(ranks: int) -> Iterator[list[Message]]:
    """Within it, synced ``BatchNorm1d`` layers (``axis_name`` set, ``process_group`` and
    ``axis_index_groups`` ignored) are rank 0 of ``ranks`` identical ranks; yields the
    list of their messages, in order."""
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise ValueError(f"ranks: expected a positive int, got {ranks!r}")
    messages: list[Message] = []

    def all_gather_rows(row: torch.Tensor, group: Any, timeout: Any, what: str) -> torch.Tensor:
        size = row.numel() * row.element_size()
        messages.append(Message("all_gather", what, size, ranks * size))
        return row.reshape(1, -1).expand(ranks, -1).clone()

    def all_reduce_sum(buffer: torch.Tensor, group: Any, timeout: Any, what: str) -> torch.Tensor:
        size = buffer.numel() * buffer.element_size()
        messages.append(Message("all_reduce", what, size, size))
        return buffer.mul_(ranks)  # in place, as the eager collective

    with contextlib.ExitStack() as stack:
        for name, value in (("group_size", lambda group: ranks), ("group_rank", lambda group: 0),
                            ("all_gather_rows", all_gather_rows), ("all_reduce_sum", all_reduce_sum)):  # fmt: skip
            stack.enter_context(mock.patch.object(torch_distributed, name, value))
        stack.enter_context(mock.patch.object(Sync, "group", lambda self: _SIMULATED_GROUP))
        yield messages


def exchange_cost(
    ranks: int, num_features: int, *, exchange: str = "auto", batch: Sequence[int] = (4, 8), mask: bool = False
) -> dict[str, list[Message]]:
    """The messages of one synced training call of ``BatchNorm1d(num_features,
    axis_name=...)`` on ``(*batch, num_features)`` input, after its first call:
    ``{"forward": [...], "backward": [...]}`` (the backward of the input's gradient).
    ``exchange``: ``"auto"`` (the layer's choice), or ``"all_gather"`` /
    ``"all_reduce"`` for that exchange at any group size; ``mask=True`` takes the
    core path, else PyTorch's kernels."""
    limits = {"auto": torch_distributed.ALL_GATHER_MAX_RANKS, "all_gather": ranks, "all_reduce": 0}
    if exchange not in limits:
        raise ValueError(f"exchange: expected one of {sorted(limits)}, got {exchange!r}")
    generator = torch.Generator().manual_seed(0)
    shape = (*batch, num_features)
    layer = BatchNorm1d(num_features, axis_name="batch")
    keep = torch.rand(shape[:-1], generator=generator) < 0.75 if mask else None
    with (
        simulated_ranks(ranks) as messages,
        mock.patch.object(torch_distributed, "ALL_GATHER_MAX_RANKS", limits[exchange]),
    ):
        for _ in range(2):
            x = torch.randn(shape, generator=generator).requires_grad_(True)
            before = len(messages)
            y = layer(x, keep)
            forward = len(messages)
            y.backward(torch.randn(shape, generator=generator))
    return {"forward": messages[before:forward], "backward": messages[forward:]}


def _cells(cost: dict[str, list[Message]], ranks: int) -> str:
    forward, backward = cost["forward"], cost["backward"]
    wire = sum(wire_bytes(m, ranks) for m in forward + backward)
    received = sum(m.received for m in forward)
    return f"{len(forward)} + {len(backward)} | {received:,} | {sum(m.sent for m in backward):,} | {wire:,.0f}"


def table(ranks: Sequence[int], num_features: int) -> str:
    """The Markdown table of both exchanges' messages per synced call for each group size."""
    lines = [
        f"num_features = {num_features}; per rank and synced training call (forward, then the backward of the "
        "input's gradient): rounds, bytes received forward, bytes reduced backward, bytes sent on the wire "
        "(ring algorithms, both directions)",
        "",
        "| ranks | chosen | all-gather: rounds | received | reduced | wire | all-reduce: rounds | received | "
        "reduced | wire |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ranks:
        chosen = "all-gather" if r <= torch_distributed.ALL_GATHER_MAX_RANKS else "all-reduce"
        gathered, reduced = (
            _cells(exchange_cost(r, num_features, exchange=e), r) for e in ("all_gather", "all_reduce")
        )
        lines.append(f"| {r} | {chosen} | {gathered} | {reduced} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-features", type=int, default=2048)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2**k for k in range(1, 13)])
    args = parser.parse_args(argv)
    print(table(args.ranks, args.num_features))


if __name__ == "__main__":
    main()
