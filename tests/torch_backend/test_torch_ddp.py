"""A converted classifier under DistributedDataParallel on gloo (CPU): 2 and 4 ranks.

``torch_workers/ddp_worker.py`` trains a model with ``nn.BatchNorm2d`` and
``nn.BatchNorm1d`` layers (a Conv2d block, a Conv1d block, a linear head), converted
by ``convert_batchnorm(model, sync=True)``, for three SGD steps (momentum 0.9)
on uneven per-rank batches (one rank of the 4 holds one image), with
``broadcast_buffers=True`` and ``False``; rank 0 also trains the unconverted model in
one process on the concatenated batches. Each launch is one process per rank,
bounded by a hard timeout and killed on failure.

Tolerance on parameters and running statistics after three steps: both sides are
float32 and differ only in summation order (DDP sums the ranks' gradients, then
averages them in float32) and in the statistics' rounding (bn1d combines them in
float64). A float32 sum of n terms differs between two orders by at most about
n * 2**-24 of the sum of the terms' magnitudes; the largest sums here have n <= 8
images x 25 pixels = 200 terms of O(1), so each gradient differs by <= ~1.2e-5
relative, and three steps of SGD (lr 0.1, momentum 0.9: weights 1 + 1.9 + 2.71 on
the gradients, times lr, ~0.56) move a parameter by <= ~7e-6: hence 1e-5 absolute
and relative (the bound, not a multiple of the measurement). Measured (2026-12-01,
2 shared CPU cores): max |difference| 3.0e-7 on 2 ranks, 1.2e-7 on 4. A wrong
exchange is far outside it: unsynced statistics (each rank's own batch) differ from
the global ones by > 1e-2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch_backend import worker_launch

pytest.importorskip("torch")

pytestmark = pytest.mark.dist

LAUNCH_TIMEOUT_S = 180
TOL = 1e-5


def launch(job: dict, world: int, workdir: Path) -> list[dict]:
    return worker_launch.launch("ddp_worker.py", job, world, workdir, timeout_s=LAUNCH_TIMEOUT_S)


def job(sizes: list[int], *, unsynced: bool, steps: int = 3, seed: int = 0) -> dict:
    """Per step, per rank: images ``(n, 1, 5, 5)`` whose mean and spread depend on the rank
    (so that the global statistics differ from each rank's), and class labels."""
    rng = np.random.default_rng(seed)
    batches = [[((rank + (1 + rank) * rng.standard_normal((n, 1, 5, 5))).astype(np.float32),
                 rng.integers(0, 3, n)) for rank, n in enumerate(sizes)] for _ in range(steps)]  # fmt: skip
    return {"steps": batches, "unsynced": unsynced}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return launch(job([3, 5], unsynced=True), 2, tmp_path_factory.mktemp("ddp2") / "run")


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return launch(job([1, 2, 4, 3], unsynced=False, seed=1), 4, tmp_path_factory.mktemp("ddp4") / "run")


@pytest.mark.parametrize("ranks", ["two_ranks", "four_ranks"])
@pytest.mark.parametrize("run", ["synced_broadcast", "synced_local"])
def test_ddp_training_equals_one_process_on_the_concatenated_batch(request, ranks, run):
    results = request.getfixturevalue(ranks)
    reference = results[0]["reference"]
    for rank, result in enumerate(results):
        assert result[run].keys() == reference.keys()
        for key, value in result[run].items():
            np.testing.assert_allclose(value, reference[key], rtol=TOL, atol=TOL, err_msg=f"rank {rank} {key}")
            # DDP keeps the parameters equal; synced statistics are the same bits on every rank.
            np.testing.assert_array_equal(value, results[0][run][key], err_msg=f"rank {rank} {key}")
    assert int(results[0][run]["head.1.num_batches_tracked"]) == 3


def test_broadcast_buffers_changes_nothing_for_synced_layers(two_ranks, four_ranks):
    # Every rank holds the same statistics after each synced call, so DDP's broadcast of
    # rank 0's buffers before each forward (broadcast_buffers=True) only costs a collective.
    for results in (two_ranks, four_ranks):
        for rank, result in enumerate(results):
            for key, value in result["synced_broadcast"].items():
                np.testing.assert_array_equal(value, result["synced_local"][key], err_msg=f"rank {rank} {key}")


def test_unsynced_statistics_differ_until_sync_running_statistics(two_ranks):
    before = [r["unsynced"]["before"] for r in two_ranks]
    # Each rank's own data: the first layer sees the ranks' different means, the later ones less so.
    assert np.abs(before[0]["image.1.running_mean"] - before[1]["image.1.running_mean"]).max() > 0.1
    for key in (k for k in before[0] if "running" in k):
        assert np.abs(before[0][key] - before[1][key]).max() > 1e-4, key
    for key in before[0]:
        average = (before[0][key].astype(np.float64) + before[1][key]) / 2
        if "num_batches" in key:
            average = np.round(average)
        for result in two_ranks:
            # the mean formed in float64, stored in float32: within half an ulp
            np.testing.assert_allclose(result["unsynced"]["mean"][key], average, rtol=2**-24, atol=0, err_msg=key)
            np.testing.assert_array_equal(result["unsynced"]["broadcast"][key], before[1][key], err_msg=key)


def test_unsynced_layers_with_broadcast_buffers_keep_rank_0s_statistics_but_still_differ(two_ranks):
    """``broadcast_buffers=True`` broadcasts rank 0's buffers before each forward; the
    training outputs of unsynced layers do not read the running statistics, so the
    parameters, and rank 0's statistics, are those of ``broadcast_buffers=False``
    bitwise. The other ranks then update rank 0's statistics with their own batch: after
    training they still differ from rank 0's (by ``(1 - m)`` times the last step's
    difference of batch statistics), so evaluation needs ``sync_running_statistics``."""
    ours, theirs = (r["unsynced"]["broadcast_buffers"] for r in two_ranks)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, two_ranks[0]["unsynced"]["before"][key], err_msg=key)
        if "running" in key:
            assert np.abs(theirs[key] - value).max() > 1e-4, key
        else:
            np.testing.assert_array_equal(theirs[key], value, err_msg=key)
