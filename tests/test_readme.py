"""Every ```python block of README.md, docs/deployment.md and docs/population.md runs as written.

A block that imports a framework that is not installed here is skipped (the
tox envs `jax`, `torch` and `conformance` install them and run this file).
"""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = [block for page in (ROOT / "README.md", ROOT / "docs" / "deployment.md", ROOT / "docs" / "population.md")
          for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]  # fmt: skip
FRAMEWORKS = ("jax", "torch", "flax", "optax", "equinox", "array_api_strict")


def needs(block):
    return sorted({m for m in FRAMEWORKS if re.search(rf"^\s*(import|from) {m}\b", block, flags=re.M)})


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    block = BLOCKS[index]
    missing = [m for m in needs(block) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    exec(compile(block, f"README.md block {index}", "exec"), {"__name__": f"readme_{index}"})
