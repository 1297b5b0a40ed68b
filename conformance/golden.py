"""Golden vectors: every case's inputs and its expected outputs, running statistics
and gradients, computed by the NumPy specification in float64. The small cases
are stored in ``golden.npz`` next to this file; the large ones (``Case.stored``
is false: up to 2**18 values per feature) are computed from their seeds when
loaded, in about a second.

Regenerate the stored ones with ``python -m bn1d.conformance.golden``; the test
suite fails when the stored file no longer matches what the specification
computes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from bn1d.backends.numpy import BatchNorm1d

from .builtin import NumpyBackend
from .cases import CASES, SYNC_CASES, Case, case_inputs, sync_inputs
from .registry import ReplicaJob

__all__ = ["GOLDEN_PATH", "case_golden", "generate", "load", "save"]

GOLDEN_PATH = Path(__file__).with_name("golden.npz")


def _spec_layer(constructor: dict[str, Any]) -> BatchNorm1d:
    return BatchNorm1d(**constructor, dtype=np.float64)


def case_golden(case: Case) -> dict[str, np.ndarray]:
    """One case's inputs and the float64 specification's results, keyed ``<case>/<what>``."""
    golden: dict[str, np.ndarray] = {}
    xs, masks, dy = case_inputs(case)
    layer = _spec_layer(case.constructor())
    for i, (x, mask, step) in enumerate(zip(xs, masks, case.steps)):
        golden[f"{case.name}/x{i}"] = x
        if mask is not None:
            golden[f"{case.name}/mask{i}"] = mask
        golden[f"{case.name}/y{i}"] = layer(x, mask=mask, training=step.training)
        for key, value in layer.state_dict().items():
            golden[f"{case.name}/state{i}/{key}"] = value
    if case.gradients:
        golden[f"{case.name}/dy"] = dy
        training = case.steps[-1].training
        for key, value in layer.vjp(xs[-1], dy, mask=masks[-1], training=training).items():
            golden[f"{case.name}/grad/{key}"] = value
    return golden


def generate(stored: bool = True) -> dict[str, np.ndarray]:
    """The golden arrays of the stored cases (``stored=False``: of the others), keyed
    ``<case>/<what>``."""
    golden: dict[str, np.ndarray] = {}
    for case in (c for c in CASES if c.stored == stored):
        golden.update(case_golden(case))
    jobs = []
    syncs = [c for c in SYNC_CASES if c.stored == stored]
    for sync in syncs:
        xs, masks, dys = sync_inputs(sync)
        jobs.append(ReplicaJob({**sync.constructor(), "param_dtype": "float64"}, xs, masks, dys))
    for sync, job, result in zip(syncs, jobs, NumpyBackend().run_replicated(jobs)):
        for r in range(sync.replicas):
            prefix = f"{sync.name}/{r}"
            golden[f"{prefix}/x"], golden[f"{prefix}/dy"], golden[f"{prefix}/y"] = job.xs[r], job.dys[r], result.ys[r]
            mask = job.masks[r]
            if mask is not None:
                golden[f"{prefix}/mask"] = mask
            golden[f"{prefix}/grad/x"] = result.x_grads[r]
            for key, value in result.states[r].items():
                golden[f"{prefix}/state/{key}"] = value
    return golden


def save(golden: dict[str, Any], path: Path = GOLDEN_PATH) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **golden)
    path.write_bytes(buffer.getvalue())


def load(path: Path = GOLDEN_PATH) -> dict[str, np.ndarray]:
    """The stored golden arrays and those computed from the seeds."""
    with np.load(path) as stored:
        golden = {key: stored[key] for key in stored.files}
    return {**golden, **generate(stored=False)}


def load_stored(path: Path = GOLDEN_PATH) -> dict[str, np.ndarray]:
    with np.load(path) as stored:
        return {key: stored[key] for key in stored.files}


if __name__ == "__main__":
    vectors = generate()
    save(vectors)
    print(f"wrote {len(vectors)} arrays to {GOLDEN_PATH} ({GOLDEN_PATH.stat().st_size} bytes)")
