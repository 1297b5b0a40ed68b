"""The synced native-kernel path of ``bn1d.backends.torch`` equals the core path.

``torch_workers/one_rank_worker.py`` runs, in a one-rank gloo group (one
subprocess, a hard timeout), a synced layer (which takes the native path: its
own statistics kernel, the exchange, ``combine_moments`` and a hand-written
backward) and an unsynced ``native_kernel=False`` layer (the core under
autograd) on the same data: two training steps, every layout it takes and every
dtype pair. The 4-rank tests (``test_torch_distributed.py``) check the exchange
itself against the specification.

Tolerances, on ``y``, ``dx``, parameter gradients and running statistics, all
O(1): float64 computations differ by summation order (1e-12); float32 ones by a
few float32 roundings of sums of <= 24 terms (1e-5); half inputs compute in
float32 and round the outputs to half, where a different float32 rounding can
flip one half ulp: 2**-8 * 8 for bfloat16 and 2**-11 * 8 for float16 at |y| <= 8.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.dist

WORKER = Path(__file__).parent / "torch_workers" / "one_rank_worker.py"
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2**-8 * 8, "float16": 2**-11 * 8}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_rank")
    done = subprocess.run(
        [sys.executable, str(WORKER), str(workdir)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def compute_dtype(name: str) -> str:
    if "float64" in name:
        return "float64"
    return next(d for d in ("bfloat16", "float16", "float32") if d in name)


def test_every_layout_and_dtype_pair_takes_the_native_path_and_equals_the_core(one_rank):
    assert len(one_rank["errors"]) == 18
    for name, result in one_rank["errors"].items():
        assert result["native"], name
        assert result["dtypes_match"], name
        assert result["error"] <= TOLERANCE[compute_dtype(name)], (name, result["error"])


def test_a_second_derivative_is_a_clear_error(one_rank):
    assert "once_differentiable" in one_rank["double_backward"] or "twice" in one_rank["double_backward"], one_rank
