"""Two processes on loopback (``jax.distributed`` + gloo) give the single-process
global-batch result (issue item 4), with and without ``axis_index_groups`` that
span both processes.

The worker is ``tests/jax_backend/jax_workers/distributed_worker.py``; each process holds two
CPU devices and half of the global batch. Both run under a hard timeout and are
killed on any failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jax_workers")
sys.path.insert(0, WORKERS)
from replica_cases import MASKS, X, assert_matches  # noqa: E402

TIMEOUT_S = 120
#: Ports the PyTorch tests use: never take one of these.
TORCH_PORTS = range(29400, 29601)


def free_port() -> int:
    """A port the OS says is free now (bind to port 0), outside the PyTorch range."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in TORCH_PORTS:
            return port


def run_workers(out_dir: str, worker: str = "distributed_worker.py") -> list[str]:
    """Start both processes of ``jax_workers/<worker>``, wait at most ``TIMEOUT_S`` in all;
    kill both on failure."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # the worker sets its own
    processes = [
        subprocess.Popen(
            [sys.executable, os.path.join(WORKERS, worker), coordinator, str(pid), out_dir],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        for pid in (0, 1)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the 2-process run took more than {TIMEOUT_S} s")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for pid, (process, log) in enumerate(zip(processes, logs)):
        assert process.returncode == 0, f"process {pid} exited with {process.returncode}:\n{log[-6000:]}"
    return logs


@pytest.mark.dist
def test_two_processes_give_the_global_batch_result():
    with tempfile.TemporaryDirectory() as out_dir:
        run_workers(out_dir)
        results = [dict(np.load(os.path.join(out_dir, f"process_{pid}.npz"))) for pid in (0, 1)]
    mask = MASKS["uneven"]
    for pid, result in enumerate(results):
        for case, groups in (("all", None), ("across_processes", [[0, 2], [1, 3]])):
            get = lambda key, case=case, result=result: result[f"{case}/{key}"]
            # Process p's rows sit on mesh positions 2p and 2p + 1: the global array is X itself.
            np.testing.assert_array_equal(get("x"), X, err_msg=f"process {pid}: rows out of place")
            state = {key: get(key) for key in ("running_mean", "running_var")}
            grads = {key: get(f"d{key}") for key in ("scale", "bias")}
            assert_matches(groups, mask, get("y"), get("dx"), state, grads)
