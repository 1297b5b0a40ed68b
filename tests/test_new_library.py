"""``docs/new-library.md`` runs as written: its layer example, then the package it
describes (built here in a scratch directory: the module, the entry point), on which
the documented commands run the conformance suite and pass."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("array_api_strict")

DOC = (Path(__file__).resolve().parents[1] / "docs" / "new-library.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)
TOML = re.findall(r"```toml\n(.*?)```", DOC, flags=re.S)
BASH = re.findall(r"```bash\n(.*?)```", DOC, flags=re.S)


def test_the_layer_example_runs():
    exec(compile(PYTHON[0], "docs/new-library.md block 0", "exec"), {"__name__": "new_library_example"})


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The documented package, installed by path: its module and its entry point."""
    site = tmp_path_factory.mktemp("site")
    module = PYTHON[1]
    path = re.match(r"# (\S+)\n", module).group(1)  # the block names its file
    (site / path).parent.mkdir(parents=True)
    (site / path).parent.joinpath("__init__.py").write_text("")
    (site / path).write_text(module)
    info = site / "mylib_bn1d-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mylib-bn1d\nVersion: 0.1\n")
    # pyproject.toml's table as the installed entry_points.txt: INI, values unquoted
    entry_points = TOML[0].replace('[project.entry-points."bn1d.conformance.backends"]', "[bn1d.conformance.backends]")
    entry_points = entry_points.replace('"', "")
    (info / "entry_points.txt").write_text(entry_points)
    return site


@pytest.mark.parametrize("command", [line for line in BASH[0].splitlines() if line.strip()])
def test_the_documented_commands_pass_on_the_package(package, command):
    program, *args = command.split()
    argv = [sys.executable, *args] if program == "python" else [sys.executable, "-m", program, *args]
    env = {"PYTHONPATH": str(package), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=package, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if program == "python":
        assert "0 failed" in result.stdout and re.search(r"^float16 .*n/a \(no float16\)$", result.stdout, re.M)
