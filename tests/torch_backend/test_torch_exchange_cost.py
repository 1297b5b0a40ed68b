"""The synced layer's messages per call, from 2 to 4096 ranks, counted on its code path.

``benchmarks/torch_exchange_cost.py``'s ``simulated_ranks`` runs a synced layer in this
process as rank 0 of ``R`` identical ranks (its collectives replaced by what that
many ranks would return, each one recorded). The counts must be the cost model of
``docs/torch-models.md``, on both paths (PyTorch's kernels, and the core with a
mask: ranks may take different paths), and the numbers must be right at any ``R``:
the statistics of ``R`` copies of a batch are the batch's own, with ``R`` times the
count. The multi-process tests (``test_torch_distributed.py``) check both exchanges
with ranks that differ.

Tolerance on y and the gradients against the unsynced layer: both float32 on the same
data, the statistics combined in float64 from sums that differ only in rounding: a
few float32 ulps of O(1) values (measured <= 5e-7); 2e-6. The running variance
differs by the Bessel factor of the global count, which is the point of the check.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_backend.exchange_cost import tool  # noqa: E402

from bn1d.backends import torch_distributed  # noqa: E402
from bn1d.backends.torch import BatchNorm1d  # noqa: E402

Message, exchange_cost, simulated_ranks, table, wire_bytes = (
    tool.Message,
    tool.exchange_cost,
    tool.simulated_ranks,
    tool.table,
    tool.wire_bytes,
)

C = 16
HEADER = 6 + 8  # the agreed entries and eight dims of the input's shape
FLOAT64 = 8
TOL = 2e-6


def model(ranks: int, exchange: str) -> dict[str, list[Message]]:
    """The cost model: per rank and synced call, the forward and backward messages."""
    if exchange == "all_gather":  # every rank's row (header, count, shift, sum, squares); their cotangents
        row = (HEADER + 1 + 3 * C) * FLOAT64
        cotangents = ranks * (1 + 3 * C) * FLOAT64
        return {"forward": [Message("all_gather", "the exchange of statistics", row, ranks * row)],
                "backward": [Message("all_reduce", "the exchange of gradients", cotangents, cotangents)]}  # fmt: skip
    sums = (1 + 2 * C + 2 * 3 * 8) * FLOAT64  # count, two sums, 24 checksum nibbles and their squares
    cotangents = 2 * C * FLOAT64  # of the two sums
    return {"forward": [Message("all_reduce", "the exchange of statistics", sums, sums)],
            "backward": [Message("all_reduce", "the exchange of gradients", cotangents, cotangents)]}  # fmt: skip


@pytest.mark.parametrize("ranks", [2, 8, 9, 64, 4096])
def test_each_call_sends_what_the_cost_model_says_on_both_paths(ranks):
    chosen = "all_gather" if ranks <= torch_distributed.ALL_GATHER_MAX_RANKS else "all_reduce"
    for mask in (False, True):
        assert exchange_cost(ranks, C, mask=mask) == model(ranks, chosen), (ranks, mask)


@pytest.mark.parametrize("ranks", [2, 64, 4096])
def test_the_all_gather_grows_with_the_ranks_and_the_all_reduce_does_not(ranks):
    for exchange in ("all_gather", "all_reduce"):
        assert exchange_cost(ranks, C, exchange=exchange) == model(ranks, exchange), exchange


@pytest.mark.parametrize("ranks", [4, 4096])
@pytest.mark.parametrize("masked", [False, True], ids=["kernels", "core"])
def test_simulated_ranks_give_the_statistics_of_the_global_batch(ranks, masked):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, C, generator=generator) * 2 + 3
    dy = torch.randn(4, 8, C, generator=generator)
    mask = torch.rand(4, 8, generator=generator) < 0.7 if masked else None
    kept = int(mask.sum()) if masked else 32
    synced, local = BatchNorm1d(C, momentum=0.0, axis_name="batch"), BatchNorm1d(C, momentum=0.0)
    results = []
    with simulated_ranks(ranks) as messages:
        for layer in (synced, local):
            xt = x.clone().requires_grad_(True)
            layer(xt, mask).backward(dy)
            results.append((layer, xt.grad))
    assert messages, "the synced layer exchanged"
    (synced, dx_synced), (local, dx_local) = results
    torch.testing.assert_close(dx_synced, dx_local, rtol=TOL, atol=TOL)
    for name in ("scale", "bias"):  # each rank's share: its own batch's
        torch.testing.assert_close(getattr(synced, name).grad, getattr(local, name).grad, rtol=TOL, atol=TOL)
    torch.testing.assert_close(synced.running_mean, local.running_mean, rtol=TOL, atol=TOL)
    n = ranks * kept  # momentum 0: the unbiased variance of the global batch, R copies of this one
    biased = local.running_var * (kept - 1) / kept
    torch.testing.assert_close(synced.running_var, biased * n / (n - 1), rtol=TOL, atol=TOL)


def test_the_table_command_lists_both_exchanges_for_every_group_size():
    text = table([2, 16], C)
    for ranks, chosen in ((2, "all-gather"), (16, "all-reduce")):
        cells = []
        for exchange in ("all_gather", "all_reduce"):
            messages = model(ranks, exchange)
            wire = sum(wire_bytes(m, ranks) for m in messages["forward"] + messages["backward"])
            cells.append(
                f"1 + 1 | {messages['forward'][0].received:,} | {messages['backward'][0].sent:,} | {wire:,.0f}"
            )
        assert f"| {ranks} | {chosen} | {cells[0]} | {cells[1]} |" in text.splitlines(), text


@pytest.mark.parametrize("native_kernel", [True, False], ids=["kernels", "core"])
def test_an_inf_batch_does_not_poison_the_agreed_shift(native_kernel):
    """Reduce carries the previous call's mean as the next shift; a batch with an inf (an
    overflowing AMP step, which GradScaler skips) must not make every later call NaN."""
    generator = torch.Generator().manual_seed(5)
    synced = BatchNorm1d(C, axis_name="batch", native_kernel=native_kernel)
    local = BatchNorm1d(C, native_kernel=native_kernel)
    bad = torch.randn(4, 8, C, generator=generator)
    bad[0, 0, 0] = float("inf")
    with simulated_ranks(4096):
        synced(bad)
        assert torch.isfinite(synced._sync.agreed_shift).all()
        for _ in range(2):
            x = torch.randn(4, 8, C, generator=generator) * 2 + 3
            torch.testing.assert_close(synced(x), local(x), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("native_kernel", [True, False], ids=["kernels", "core"])
def test_float64_statistics_fall_back_to_the_gather_where_the_reduce_would_cancel(native_kernel):
    """R2.7 in float64: Reduce's cancellation, u64 (|mean - K| / std)**2, is 5e-9 at
    |mean| / std = 1e4 on a first call (K = 0), far over float64's bound; such a call
    gathers, and the next, shifted by the first's mean, keeps its one all-reduce. 4096
    gathered rows are combined by cascaded sums (row after row costs 4096 u64: 2e-13
    was measured on the kernels' path). Bound: R2.7's 1e-5 * 2**-29 (1.9e-14) on O(1)
    outputs plus y's own roundings, 8 * 2**-53 * |y| (tolerances.py)."""
    from bn1d.backends.numpy import BatchNorm1d as Spec

    generator = torch.Generator().manual_seed(0)
    layer = BatchNorm1d(3, axis_name="batch", dtype=torch.float64, native_kernel=native_kernel)
    for step, kinds in enumerate((["all_reduce", "all_gather"], ["all_reduce"])):
        x = (1e4 + torch.randn(64, 32, 3, generator=generator)).double()
        want = torch.from_numpy(Spec(3, dtype=np.float64)(x.numpy()))  # R copies of x: its own statistics
        with simulated_ranks(4096) as messages:
            y = layer(x)
        assert [m.kind for m in messages if m.what == "the exchange of statistics"] == kinds, (step, messages)
        bound = 1e-5 * 2.0**-29 + 8 * 2.0**-53 * want.abs()
        assert ((y - want).abs() <= bound).all(), (step, float((y - want).abs().max()))
