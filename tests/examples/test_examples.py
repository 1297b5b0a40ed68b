"""The multi-process commands of README.md, run as a user would (tox env ``dist``).

Each launch is bounded in time and its processes are killed on failure.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.dist


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(commands, timeout=180):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    processes = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for c in commands
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out
    return outputs


def test_torch_distributed_example():
    (output,) = launch([[sys.executable, str(ROOT / "examples" / "torch_distributed.py")]])
    assert "rank 0: 3 local sequences, statistics of all 8: ok" in output
    assert "rank 1: 5 local sequences, statistics of all 8: ok" in output


def test_torch_ddp_cpu_example():
    # Each rank asserts its parameters and running statistics against one process on all 8
    # images before printing "ok"; rank 0 reverts the model to PyTorch's classes.
    (output,) = launch([[sys.executable, str(ROOT / "examples" / "torch_ddp_cpu.py")]])
    assert "rank 0: 3 images per step, parameters and running statistics of all 8: ok" in output
    assert "rank 1: 5 images per step, parameters and running statistics of all 8: ok" in output
    assert "rank 0: reverted for export: BatchNorm1d, BatchNorm2d" in output


def test_jax_distributed_launcher_gives_the_global_batch_statistics():
    port = free_port()
    command = [sys.executable, "-m", "bn1d.backends.jax_distributed", "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", "2", "--process-id"]  # fmt: skip
    first, _ = launch([command + ["0"], command + ["1"]])
    # The demo's global batch: each process's rows come from default_rng(process_id).
    rows = np.concatenate([np.random.default_rng(p).standard_normal((8, 5, 3)).astype(np.float32) for p in (0, 1)])
    flat = rows.reshape(-1, 3).astype(np.float64)
    n = len(flat)
    printed = {
        name: np.array([float(v) for v in re.search(rf"{name}:\s*\[([^\]]*)\]", first).group(1).split()])
        for name in ("running_mean", "running_var")
    }
    # numpy prints 8 significant digits: that is the tolerance.
    np.testing.assert_allclose(printed["running_mean"], 0.01 * flat.mean(axis=0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(printed["running_var"], 0.99 + 0.01 * flat.var(axis=0) * n / (n - 1), rtol=1e-6)


@pytest.mark.parametrize(
    "script, checks",
    [
        ("nnx_data_parallel.py", ["group [0, 1]: statistics of its 28 real rows (of 32): ok",
                                  "group [2, 3]: statistics of its 12 real rows (of 32): ok"]),
        ("linen_sequences.py", ["first step: statistics of the 251 real positions (of 384): ok"]),
        ("equinox_per_example.py", ["first step: statistics of the 48 kept examples (of 64): ok"]),
    ],
)  # fmt: skip
def test_jax_module_examples_train_with_the_specifications_statistics(script, checks):
    """Each checks one step against the NumPy specification (an assertion, then the line
    printed) and asserts an accuracy above 0.9 after training (the exit status)."""
    (output,) = launch([[sys.executable, str(ROOT / "examples" / script)]])
    for line in checks:
        assert line in output, output
    accuracy = float(re.search(r"accuracy (\d\.\d+)", output).group(1))
    assert accuracy > 0.9, output
