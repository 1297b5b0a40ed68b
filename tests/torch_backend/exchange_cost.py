"""``benchmarks/torch_exchange_cost.py`` (a tool of the checkout, not of the package),
loaded by its path: a test imports the installed bn1d, which putting the checkout's root
on ``sys.path`` would shadow with the source tree."""

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "torch_exchange_cost.py"
_spec = importlib.util.spec_from_file_location("torch_exchange_cost", _PATH)
assert _spec is not None and _spec.loader is not None, _PATH
tool = importlib.util.module_from_spec(_spec)
sys.modules["torch_exchange_cost"] = tool
_spec.loader.exec_module(tool)
