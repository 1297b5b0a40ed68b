"""``docs/third-party.md`` runs as written: the package it describes is built here in a
scratch directory (its modules, its entry point), and the documented commands run the
suite on it with its expected failures, writing the JSON and JUnit reports."""

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

DOC = (Path(__file__).resolve().parents[1] / "docs" / "third-party.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)
TOML = re.findall(r"```toml\n(.*?)```", DOC, flags=re.S)
BASH = re.findall(r"```bash\n(.*?)```", DOC, flags=re.S)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    for block in PYTHON:  # each block names its file on its first line
        path = site / re.match(r"# (\S+)\n", block).group(1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.joinpath("__init__.py").touch()
        path.write_text(block)
    entry_points, xfail = TOML
    info = site / "mybn-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mybn\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        entry_points.replace('[project.entry-points."bn1d.conformance.backends"]', "[bn1d.conformance.backends]")
        .replace('"', "")
    )  # fmt: skip
    (site / re.match(r"# (\S+)\n", xfail).group(1)).write_text(xfail)
    return site


def run(command, site):
    program, *args = command.split()
    argv = [sys.executable, *args] if program == "python" else [sys.executable, "-m", program, *args]
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=site, timeout=600)


def test_the_table_json_and_junit_reports(package):
    result = run(BASH[0].splitlines()[0], package)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 failed" in result.stdout and "2 expected failures, 0 unexpected passes" in result.stdout
    assert re.search(r"^versions: bn1d .*suite .*spec 1\.0.*mybn 0\.1", result.stdout, re.M)
    assert re.search(r"^empty_batch .*xfail$", result.stdout, re.M)
    report = json.loads((package / "report.json").read_text())
    assert report["versions"]["mybn"] == "0.1" and report["versions"]["spec"] == "1.0"
    by_case = {c["case"]: c for c in report["checks"]}
    assert by_case["empty_batch"]["xfail"] and by_case["empty_batch"]["passed"] is False
    assert by_case["mask"]["passed"] is True
    assert by_case["sync_equal_counts"]["passed"] is None  # no collectives: not applicable, not passed
    suite = ElementTree.parse(package / "report.xml").getroot().find("testsuite")
    assert suite.get("name") == "mybn" and suite.get("failures") == "0"
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["spec"] == "1.0"
    skipped = {c.get("name") for c in suite.iter("testcase") if c.find("skipped") is not None}
    assert {"empty_batch", "mask_none_kept", "sync_equal_counts"} <= skipped


def test_the_pytest_runner_with_the_same_list(package):
    result = run(BASH[0].splitlines()[1] + " -q -p no:cacheprovider", package)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\b2 xfailed\b", result.stdout), result.stdout[-2000:]


def test_an_expected_failure_that_passes_fails_the_run(package, tmp_path):
    listed = tmp_path / "stale.toml"
    listed.write_text('[mybn]\nmask = "listed, but mybn handles masks"\n')
    result = run(f"python -m bn1d.conformance --backend mybn --case mask --xfail {listed}", package)
    assert result.returncode == 1 and "XPASS mybn mask" in result.stdout, result.stdout[-2000:]


def test_an_xfail_table_that_names_no_backend_of_the_run_is_noted(package, tmp_path):
    """A misspelt table (``[my_bn]`` for ``mybn``) is not an error (a shared file may
    list backends not installed here), but it is noted: otherwise its entries would
    silently not apply and the run would fail with no hint why."""
    listed = tmp_path / "misspelt.toml"
    listed.write_text('[my_bn]\nmask_none_kept = "the NaN bug"\n')
    result = run(f"python -m bn1d.conformance --backend mybn --case mask --xfail {listed}", package)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "note: xfail: [my_bn] names no backend of this run (mybn); its entries are not used" in result.stderr
    matched = tmp_path / "matched.toml"
    matched.write_text('[mybn]\nmask_none_kept = "the NaN bug"\n')
    result = run(f"python -m bn1d.conformance --backend mybn --case mask --xfail {matched}", package)
    assert result.returncode == 0 and "note: xfail" not in result.stderr, result.stderr[-2000:]
    # The pytest runner warns alike; there mybn's real bug (mask_none_kept, listed under
    # the misspelt table) fails unexpectedly, which is what the note explains.
    options = f"-p bn1d.conformance.plugin --bn1d-backend mybn --bn1d-xfail {listed} -k mask -q -p no:cacheprovider"
    result = run(f"pytest --pyargs bn1d.conformance {options}", package)
    assert result.returncode == 1 and "FAILED" in result.stdout and "mask_none_kept" in result.stdout
    assert "xfail: [my_bn] names no backend of this run (mybn)" in result.stdout, result.stdout[-3000:]
