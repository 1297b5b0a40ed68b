"""``examples/deployment_torch.py`` as a new user runs it: a convnet with bn1d's drop-ins trained,
its statistics recomputed, folded, exported to ONNX and run in onnxruntime, at
``|mean| / std`` of about 1, 1e2 and 1e4 at its first batch norm.

The stated factor (``docs/deployment.md``): every folded or exported model's error against
the unfolded model in float64 is at most twice the unfolded float32 model's, plus 4 float32
ulps of the output's scale. The errors are the convolutions' rounding at the size of the
mean (``bn1d.folding``): the fold, the export and onnxruntime's fusion change the order of
the same roundings, never their size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[2]
ULP = 2.0**-23


def test_train_recompute_fold_export_and_run_in_onnxruntime(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, "examples/deployment_torch.py", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    ratios = [row["mean / std at the first batch norm"] for row in rows]
    for ratio, target in zip(ratios, (1.0, 1e2, 1e4)):
        assert target / 3 <= ratio <= target * 3, ratios
    for row in rows:
        unfolded = row["unfolded float32"]
        for name in ("folded float32", "unfolded, onnxruntime", "folded, onnxruntime"):
            assert row[name] <= 2 * unfolded + 4 * ULP, (name, row)
