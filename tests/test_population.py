"""``bn1d.population.PopulationStatistics``: the pooled statistics of every batch seen,
against the statistics of the concatenated data in extended precision.

The bound is R2.7's in the compute dtype: the mean within ``rule * sigma`` plus a few ulps
of its storage, the variance within ``rule`` relative; ``rule`` is 1e-5 for float32 batches
(whose ``x - K`` the core forms in float32) and ``RULE64 = 1e-5 * 2**-29`` for float64 ones.
The merges are pairwise (a binary counter): ``B`` batches add at most ``log2(B)`` roundings
of each value."""

from __future__ import annotations

import numpy as np
import pytest

from bn1d.population import PopulationStatistics

RULE = 1e-5
RULE64 = RULE * 2.0**-29


def pooled(batches, masks=None, axis=(0, 1)):
    """The mean and biased variance of the concatenation, in long double."""
    rows = []
    for i, x in enumerate(batches):
        x = np.asarray(x, np.longdouble)
        feature = next(a for a in range(x.ndim) if a not in axis)
        moved = np.moveaxis(x, feature, -1).reshape(-1, x.shape[feature])
        if masks is not None and masks[i] is not None:
            moved = moved[np.asarray(masks[i]).reshape(-1)] if feature == x.ndim - 1 else moved[
                np.moveaxis(np.expand_dims(masks[i], feature), feature, -1).reshape(-1)]  # fmt: skip
        rows.append(moved)
    data = np.concatenate(rows)
    mean = data.mean(axis=0)
    return len(data), mean, ((data - mean) ** 2).mean(axis=0)


def assert_pooled(stats, n, mean, var, what="", rule=RULE):
    got_mean, got_var = np.asarray(stats.mean, np.float64), np.asarray(stats.var, np.float64)
    sigma = np.sqrt(np.asarray(var, np.float64))
    assert float(stats.count) == n, what
    mean_error = np.abs(got_mean - np.asarray(mean, np.float64))
    assert np.all(mean_error <= rule * sigma + 4 * np.spacing(np.abs(got_mean))), (what, mean_error / sigma)
    var_error = np.abs(got_var - np.asarray(var, np.float64))
    assert np.all(var_error <= rule * np.asarray(var, np.float64)), (what, var_error / var)


def test_uneven_shifting_batches_pool_as_their_concatenation():
    """The issue's example: 64, 64 and 5 rows around 0, 2 and 5 (std 1). The pooled variance
    counts the spread between the batch means, which an average of the batches' statistics
    (``update_bn``) drops: about 2.3 here against its 0.8."""
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((size, 1)) + loc).astype(np.float32) for size, loc in ((64, 0), (64, 2), (5, 5))]
    stats = PopulationStatistics(1, axis=0)
    for x in batches:
        stats.update(x)
    n, mean, var = pooled(batches, axis=(0,))
    assert_pooled(stats, n, mean, var)
    averaged = np.mean([x.astype(np.float64).var(ddof=1) for x in batches])
    assert float(var[0]) > 2.0 > 1.0 > averaged


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ratio", [1.0, 1e2, 1e4])
def test_many_uneven_batches_of_raw_data_meet_the_rule(ratio, dtype):
    """2**18 values per feature in 1000 batches of 1 to 523 rows (layout (B, L, C)), means
    drifting by a tenth of a std per batch, ``|mean| / std`` up to 1e4: within R2.7 (the
    float32 rule for float32 batches, float64's for float64 ones)."""
    rng = np.random.default_rng(int(ratio))
    sizes = rng.integers(1, 524, size=1000)
    sizes[-1] += 2**18 - sizes.sum() if sizes.sum() < 2**18 else 0
    batches = [(rng.standard_normal((int(s), 1, 3)) * 0.5 + ratio * 0.5 + 0.05 * i).astype(dtype)
               for i, s in enumerate(sizes)]  # fmt: skip
    stats = PopulationStatistics(3)
    for x in batches:
        stats.update(x)
    n, mean, var = pooled(batches)
    assert n >= 2**18 and stats.batches == 1000
    assert_pooled(stats, n, mean, var, f"ratio {ratio}", RULE if dtype == np.float32 else RULE64)


def test_masks_count_only_the_kept_values_and_an_empty_batch_changes_nothing():
    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((8, 16, 4)) * 2 + 100).astype(np.float32) for _ in range(5)]
    masks = [rng.random((8, 16)) < 0.6 for _ in range(5)]
    masks[2][:] = False  # nothing kept
    stats = PopulationStatistics(4)
    for x, mask in zip(batches, masks):
        stats.update(x, mask)
    n, mean, var = pooled(batches, masks)
    assert_pooled(stats, n, mean, var)
    first_empty = PopulationStatistics(4).update(batches[2], masks[2])
    for x, mask in zip(batches, masks):
        first_empty.update(x, mask)
    assert_pooled(first_empty, n, mean, var, "an empty batch first")


def test_merged_accumulators_equal_one_over_all_the_data():
    """Ranks or chunks accumulate apart and merge: the union's statistics (uneven shares,
    one of them empty)."""
    rng = np.random.default_rng(4)
    batches = [(rng.standard_normal((int(s), 3)) + 1e3).astype(np.float32) for s in rng.integers(1, 200, size=37)]
    parts = [PopulationStatistics(3, axis=0) for _ in range(4)]
    for i, x in enumerate(batches):
        parts[min(i % 5, 2)].update(x)  # the fourth part sees nothing
    total = PopulationStatistics(3, axis=0)
    for part in parts:
        total.merge(part)
    n, mean, var = pooled(batches, axis=(0,))
    assert_pooled(total, n, mean, var)
    assert total.batches == 37
    unbiased = np.asarray(total.running_var) / np.asarray(total.var)  # R3.3's Bessel factor
    np.testing.assert_allclose(unbiased, n / (n - 1), rtol=4 * 2.0**-53)


@pytest.mark.parametrize("library", ["array_api_strict", "torch"])
def test_any_array_api_library_gives_numpys_numbers(library):
    """The same batches as NumPy arrays and as another library's: equal within the rule
    (float64 accumulation on both)."""
    module = pytest.importorskip(library)
    rng = np.random.default_rng(5)
    batches = [(rng.standard_normal((int(s), 6, 2)) * 3 + 50).astype(np.float32) for s in rng.integers(1, 40, size=20)]
    ours = PopulationStatistics(2)
    for x in batches:
        ours.update(module.asarray(x))
    n, mean, var = pooled(batches)
    assert_pooled(ours, n, mean, var, library)


def test_bad_input_is_named_before_anything_changes():
    stats = PopulationStatistics(3).update(np.ones((2, 4, 3), np.float32))
    for call, exception, pattern in (
        (lambda: PopulationStatistics(0), ValueError, r"^num_features: expected a positive int, got 0$"),
        (lambda: PopulationStatistics(3, axis=(0, 0)), ValueError, r"^axis: expected no duplicate axes"),
        (lambda: stats.update(np.ones((2, 4, 5), np.float32)), ValueError, r"^x: expected num_features=3 on axis 2"),
        (lambda: stats.update(np.ones((2, 4, 3), np.int32)), TypeError, r"^x: expected a real floating-point"),
        (lambda: stats.merge(PopulationStatistics(4)), ValueError, r"^other: expected num_features=3"),
        (lambda: stats.merge(object()), TypeError, r"^other: expected a PopulationStatistics"),
        (lambda: PopulationStatistics(3).mean, ValueError, r"^batches: expected at least one batch"),
    ):  # fmt: skip
        with pytest.raises(exception, match=pattern):
            call()
    assert stats.batches == 1 and float(stats.count) == 8


def test_moments_computed_elsewhere_add_as_a_batch():
    """``add`` takes a batch's row (count, shift, mean - shift, squared deviations) as a
    framework's kernels or another rank give it: the same statistics as ``update`` on the
    batches, within the rule; a row of the wrong shape is named before anything changes."""
    rng = np.random.default_rng(5)
    batches = [(rng.standard_normal((n, 3)) * 0.5 + 1e3).astype(np.float32) for n in (7, 40, 2)]
    stats = PopulationStatistics(3, axis=0)
    for x in batches:
        wide = x.astype(np.float64)
        shift = wide[0]
        offset = (wide - shift).mean(axis=0)
        stats.add(len(x), shift, offset, ((wide - shift - offset) ** 2).sum(axis=0))
    assert stats.batches == 3
    assert_pooled(stats, *pooled(batches, axis=(0,)))
    with pytest.raises(ValueError, match=r"^offset: expected shape \(3,\), got \(2,\)$"):
        stats.add(4, np.zeros(3), np.zeros(2), np.zeros(3))
    assert stats.batches == 3


def test_the_docs_example_runs_and_gives_the_pooled_statistics():
    """``docs/population.md``'s example runs as written, and its numbers are the pooled ones."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "population.md"
    block = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)[0]  # the NumPy one
    scope: dict = {}
    exec(compile(block, "docs/population.md", "exec"), scope)
    batches = [np.random.default_rng(i).standard_normal((4 + i, 5, 3)).astype(np.float32) for i in range(3)]
    n, mean, var = pooled(batches)
    assert_pooled(scope["stats"], n, mean, var)
    np.testing.assert_allclose(scope["running_var"], np.asarray(var, np.float64) * n / (n - 1), rtol=RULE)


DASK_SCRIPT = """
import json, resource, sys
import numpy as np, dask, dask.array as da
from bn1d.population import PopulationStatistics

rows, chunk = 2**22, 2**15  # (rows, 32, 4) float32: 2 GiB in 128 chunks of 16 MiB
flat = da.arange(rows * 128, chunks=chunk * 128, dtype=np.float32)
x = (da.sin(flat) * 0.5 + da.floor(flat / 2**20) * 0.01 + 1000.0).astype(np.float32).reshape(rows, 32, 4)
x = x.rechunk((chunk, 32, 4))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
lazy = PopulationStatistics(4).update(x)  # one dask array: a lazy graph, computed by dask chunk by chunk
count, mean, var = dask.compute(lazy.count, lazy.mean, lazy.var)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
eager = PopulationStatistics(4)
for block in x.blocks:  # NumPy: each chunk materialised in turn
    eager.update(np.asarray(block.compute()))
print(json.dumps({"gib": x.nbytes / 2**30, "peak_mib": peak / 1024, "count": float(count),
                  "mean": np.asarray(mean).tolist(), "var": np.asarray(var).tolist(),
                  "numpy": [float(eager.count), np.asarray(eager.mean).tolist(), np.asarray(eager.var).tolist()]}))
"""


def test_a_dask_array_of_2_gib_is_reduced_chunk_by_chunk_to_numpys_numbers(tmp_path):
    """A Dask array far larger than its chunks (2 GiB of float32, 128 chunks of 16 MiB) goes
    through ``update`` as it is: Dask reduces it chunk by chunk, the process's peak memory
    grows by well under 300 MiB (measured in a fresh process: the peak resident size
    before and after), and the statistics equal NumPy's, accumulated chunk after chunk,
    within float32's rule (R2.7; the two sum in different orders)."""
    pytest.importorskip("dask")
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", DASK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["gib"] == 2.0 and found["peak_mib"] < 250, found["peak_mib"]
    count, mean, var = found["numpy"]
    assert found["count"] == count == 2**22 * 32
    sigma = np.sqrt(var)
    assert np.all(np.abs(np.subtract(found["mean"], mean)) <= RULE * sigma + 4 * np.spacing(np.abs(mean)))
    assert np.all(np.abs(np.subtract(found["var"], var)) <= RULE * np.asarray(var))
