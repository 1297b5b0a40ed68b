"""Launching the multi-process workers of ``torch_workers/`` (one process per rank over
gloo on loopback), bounded in time and cleaned up: the multi-process tests' one launcher."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKERS = Path(__file__).parent / "torch_workers"


def launch(worker: str, job: dict, world: int, workdir: Path, *, timeout_s: float, **extra_env: str) -> list[dict]:
    """Run ``world`` processes of ``torch_workers/<worker>`` on ``job`` (pickled into
    ``workdir``) and return their pickled results in rank order. Every process still alive
    after ``timeout_s`` is killed, and the test fails with each rank's log tail."""
    workdir.mkdir(parents=True)
    with open(workdir / "job.pkl", "wb") as file:
        pickle.dump(job, file)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra_env)
    logs = [open(workdir / f"rank{r}.log", "w") for r in range(world)]
    command = [sys.executable, str(WORKERS / worker)]
    procs = [subprocess.Popen([*command, str(r), str(world), str(workdir)], stdout=log, stderr=subprocess.STDOUT,
                              env=env) for r, log in enumerate(logs)]  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        timed_out = [p.poll() is None for p in procs]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    if any(timed_out) or any(p.returncode != 0 for p in procs):
        text = "\n".join(f"--- rank {r} (rc {p.returncode}) ---\n{(workdir / f'rank{r}.log').read_text()[-3000:]}"
                         for r, p in enumerate(procs))  # fmt: skip
        pytest.fail(f"workers failed or outlived {timeout_s}s (timed out: {timed_out}):\n{text}")
    results = []
    for r in range(world):
        with open(workdir / f"rank{r}.pkl", "rb") as file:
            results.append(pickle.load(file))
    return results
