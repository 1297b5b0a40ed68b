"""Run from the checkout's root, where its bn1d/ shadows an installed bn1d, the
adapters and the suite still import (they live in ../backends and ../conformance
of the source tree and are mapped into bn1d.* only by the install)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_from_the_checkout_root():
    code = "import bn1d, bn1d.backends.numpy, bn1d.conformance.cases; print(bn1d.backends.numpy.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == ROOT / "backends" / "numpy.py"
