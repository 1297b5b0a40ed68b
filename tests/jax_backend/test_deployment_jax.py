"""``examples/deployment_jax.py`` as a new user runs it: NNX and Equinox convnets with bn1d's
drop-ins trained, their statistics recomputed, folded, exported by ``jax.export`` with a
symbolic batch, serialized, read back and run (and, with jax2onnx installed, as the tox env
``jax`` has it, converted to ONNX and run in onnxruntime), at ``|mean| / std`` of about 1, 1e2 and 1e4 at
the first batch norm.

The stated factor (``docs/deployment.md``): the folded, exported model's error against the
unfolded model in float64 is at most twice the unfolded float32 model's, plus 4 float32 ulps
of the output's scale (measured: 0.02 to 1.5 times). The fold changes the order of the
convolutions' roundings, not their size, and cancels a bias against the running mean in
float64 where the unfolded model rounds it at its size (``bn1d.folding``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flax")
pytest.importorskip("equinox")

ROOT = Path(__file__).resolve().parents[2]
JAX_STRICT_RUNS = ()  # a subprocess: --jax-strict's modes would not reach it (tests/conftest.py)
ULP = 2.0**-23


def test_train_recompute_fold_export_and_run(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    command = [sys.executable, "examples/deployment_jax.py", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    converter = importlib.util.find_spec("jax2onnx") is not None and importlib.util.find_spec("onnxruntime") is not None
    assert [row["library"] for row in rows] == ["nnx"] * 3 + ["equinox"] * 3
    for row, target in zip(rows, (1.0, 1e2, 1e4) * 2):
        assert target / 3 <= row["mean / std at the first batch norm"] <= target * 3, row
        assert row["folded, exported"] <= 2 * row["unfolded float32"] + 4 * ULP, row
        if converter:  # the folded model converted to ONNX and run in onnxruntime
            assert row["folded, onnxruntime"] <= 2 * row["unfolded float32"] + 4 * ULP, row
