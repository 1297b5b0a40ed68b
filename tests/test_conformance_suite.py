"""The conformance suite itself: third-party registration through entry points, a
deliberately wrong backend makes it fail, a missing backend fails loudly."""

import re
import subprocess
import sys
import textwrap

import pytest

from bn1d.conformance.cases import CASES, ERROR_CASES, SYNC_CASES
from bn1d.conformance.registry import BackendUnavailable, load_backend, registered_backends

TOY = '''
import numpy as np
from bn1d.conformance.builtin import NumpyBackend


class Shifted(NumpyBackend):
    """A third-party backend with a bug: every output is off by 1e-3."""

    name = "toy_wrong"

    def make_layer(self, param_dtype="float32", **kwargs):
        layer = super().make_layer(param_dtype, **kwargs)
        call = layer.__call__
        return type("Wrong", (), {
            "__call__": lambda self, x, mask=None, training=None: call(x, mask=mask, training=training) + 1e-3,
            "state_dict": lambda self: layer.state_dict(),
            "load_state_dict": lambda self, state: layer.load_state_dict(state),
            "training": property(lambda self: layer.training),
            "vjp": lambda self, *a, **k: layer.vjp(*a, **k),
        })()


class Honest(NumpyBackend):
    name = "toy_right"


def wrong():
    return Shifted()


def right():
    return Honest()
'''


@pytest.fixture(scope="module")
def third_party(tmp_path_factory):
    """A directory that, on PYTHONPATH, installs a package registering three backends."""
    root = tmp_path_factory.mktemp("site")
    (root / "toy_bn1d.py").write_text(TOY)
    info = root / "toy_bn1d-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-bn1d\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [bn1d.conformance.backends]
            toy_wrong = toy_bn1d:wrong
            toy_right = toy_bn1d:right
            toy_missing = toy_bn1d_not_installed:backend
            """
        )
    )
    return root


def run(args, site, timeout=300):
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=site)


def test_a_correct_third_party_backend_passes(third_party):
    result = run(["-m", "bn1d.conformance", "--backend", "toy_right"], third_party)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout


def test_a_wrong_backend_fails_the_table(third_party):
    result = run(["-m", "bn1d.conformance", "--backend", "toy_wrong"], third_party)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL toy_wrong default_blc" in result.stdout
    # The error cases still pass: the bug is numerical only (the row, not just the name).
    assert re.search(r"^x_integer +raises +ok$", result.stdout, re.MULTILINE), result.stdout


def test_a_wrong_backend_fails_the_pytest_runner(third_party):
    plugin = ["-p", "bn1d.conformance.plugin"]  # opt-in: installing bn1d adds no pytest plugin
    result = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin, "--pyargs", "bn1d.conformance",
                  "--bn1d-backend", "toy_wrong", "-k", "default_blc or x_integer"], third_party)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 1 passed" in result.stdout


def test_a_requested_backend_that_is_not_installed_fails_loudly(third_party):
    for name in ("toy_missing", "no_such_backend"):
        result = run(["-m", "bn1d.conformance", "--backend", name], third_party)
        assert result.returncode == 2, result.stdout + result.stderr
        assert name in result.stderr
        result = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bn1d.conformance.plugin",
                      "--pyargs", "bn1d.conformance", "--bn1d-backend", name], third_party)  # fmt: skip
        assert result.returncode != 0 and "passed" not in result.stdout, result.stdout


def test_load_backend_errors():
    with pytest.raises(ValueError, match=r"backend: expected one of .*numpy.*, got 'nope'"):
        load_backend("nope")
    assert {"numpy", "jax", "torch"} <= set(registered_backends())
    assert load_backend("numpy").name == "numpy"


def test_unavailable_is_reported_not_raised_as_import_error(monkeypatch):
    class Entry:
        def load(self):
            raise ImportError("No module named 'cupy'")

    monkeypatch.setattr("bn1d.conformance.registry.registered_backends", lambda group=None: {"cupy": Entry()})
    with pytest.raises(BackendUnavailable, match="'cupy' is registered but cannot be loaded"):
        load_backend("cupy")


def test_catalogue_names_are_unique_and_cover_the_contract():
    from bn1d.conformance.cases import CHECK_CASES

    names = [c.name for c in (*CASES, *ERROR_CASES, *SYNC_CASES, *CHECK_CASES)]
    assert len(names) == len(set(names))
    dtypes = {c.dtype for c in CASES}
    assert dtypes == {"float16", "bfloat16", "float32", "float64"}
    assert {e.where for e in ERROR_CASES} == {"constructor", "call", "load"}
    assert any("axis_index_groups" in s.layer for s in SYNC_CASES)


def test_a_missing_state_entry_fails_the_case():
    """The suite compares the state's key set with the specification's, so an entry a
    backend leaves out is a failure, not an entry that is never scored."""
    from bn1d.conformance import golden
    from bn1d.conformance.builtin import NumpyBackend
    from bn1d.conformance.runner import run_case

    class Forgetful(NumpyBackend):
        name = "forgetful"

        def make_layer(self, param_dtype="float32", **kwargs):
            layer = super().make_layer(param_dtype, **kwargs)
            state_dict = layer.state_dict
            layer.state_dict = lambda: {k: v for k, v in state_dict().items() if k != "num_batches_tracked"}
            return layer

    case = next(c for c in CASES if c.name == "cumulative_average")
    vectors = golden.load_stored()
    assert run_case(NumpyBackend(), case, vectors).passed
    check = run_case(Forgetful(), case, vectors)
    assert check.passed is False and "keys" in check.detail, check


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_the_spec_document_and_the_rule_index_agree():
    """docs/spec.md's numbered rules are exactly conformance.spec.RULES, in order, and
    its coverage table is current (``python tools/docs_tables.py coverage docs/spec.md``)."""
    from bn1d.conformance import reports
    from bn1d.conformance.spec import RULES, SPEC_VERSION

    text = (ROOT / "docs" / "spec.md").read_text()
    assert re.findall(r"^- \*\*(R\d+\.\d+)\*\*", text, re.M) == list(RULES)
    assert f"Spec version: **{SPEC_VERSION}**" in text
    block = text.split(reports.COVERAGE_START)[1].split(reports.COVERAGE_END)[0].strip()
    assert block == reports.coverage_markdown(), "stale: python tools/docs_tables.py coverage docs/spec.md docs/spec.md"


def test_every_rule_has_a_case_and_coverage_says_so():
    result = subprocess.run([sys.executable, "-m", "bn1d.conformance", "--coverage"], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0 and "uncovered rules: none" in result.stdout, result.stdout


def test_a_rule_without_a_case_fails_coverage(monkeypatch):
    from bn1d.conformance import reports, spec

    monkeypatch.setitem(spec.RULES, "R9.9", "a rule nobody checks")
    text, uncovered = reports.coverage()
    assert uncovered == ["R9.9"] and "R9.9 a rule nobody checks: NO CASE" in text


def test_list_cases_names_every_case_with_its_rules():
    result = subprocess.run([sys.executable, "-m", "bn1d.conformance", "--list-cases"], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert set(lines) == {c.name for c in (*CASES, *ERROR_CASES, *SYNC_CASES)} | {
        c.name for c in __import__("bn1d.conformance.cases", fromlist=["CHECK_CASES"]).CHECK_CASES
    }
    assert lines["cumulative_average"].split() == ["R1.5", "R3.7", "R3.1", "R6.1", "R2.5"]


def test_the_readme_semantics_table_is_the_peers_report():
    """README's table is generated from docs/peers.json (``tox -e peers`` regenerates both)."""
    import json

    from bn1d.conformance import reports

    report = json.loads((ROOT / "docs" / "peers.json").read_text())["report"]
    readme = (ROOT / "README.md").read_text()
    block = readme.split(reports.START)[1].split(reports.END)[0].strip()
    assert block == reports.readme_table(report), "stale: python tools/docs_tables.py readme ..."
    assert set(report["peers"]) == {"brainpy", "equinox", "flax_linen", "flax_nnx", "keras", "torch_nn"}


def _numpy_variant(name, **methods):
    from bn1d.conformance.builtin import NumpyBackend

    return type(name.title(), (NumpyBackend,), {"name": name, **methods})()


def test_gradients_that_are_missing_fail_and_gradients_not_applicable_are_said_so():
    """A backend whose gradients come back empty fails the case; one that raises
    NotApplicable has its forward scored and the check says the gradients were not."""
    from bn1d.conformance import golden
    from bn1d.conformance.registry import NotApplicable
    from bn1d.conformance.runner import run_case

    def no_autodiff(self, *args):
        raise NotApplicable("no autodiff")

    case, vectors = next(c for c in CASES if c.name == "default_blc"), golden.load_stored()
    empty = run_case(_numpy_variant("empty", gradients=lambda self, *args: {}), case, vectors)
    assert empty.passed is False and "gradients of []" in empty.detail, empty
    unscored = run_case(_numpy_variant("unscored", gradients=no_autodiff), case, vectors)
    assert unscored.passed is True and "gradients not scored (no autodiff)" in unscored.detail, unscored


def test_statistics_in_another_dtype_than_the_parameters_fail():
    """R2.5, R3.1: a backend that keeps float64 statistics for float32 parameters."""
    from bn1d.conformance import golden
    from bn1d.conformance.builtin import NumpyBackend
    from bn1d.conformance.runner import run_case

    def make_layer(self, param_dtype="float32", **kwargs):
        return NumpyBackend.make_layer(self, "float64", **kwargs)

    case = next(c for c in CASES if c.name == "default_blc")
    check = run_case(_numpy_variant("wide", make_layer=make_layer), case, golden.load_stored())
    assert check.passed is False and check.differs == ("state dtype",), check


def test_a_short_replicated_result_fails_every_case_it_leaves_out():
    from bn1d.conformance import golden
    from bn1d.conformance.builtin import NumpyBackend
    from bn1d.conformance.runner import run_sync_cases

    def run_replicated(self, jobs):
        return NumpyBackend.run_replicated(self, jobs)[:1]

    from bn1d.conformance.cases import SYNC_CASES

    stored = [c for c in SYNC_CASES if c.stored]
    checks = run_sync_cases(_numpy_variant("short", run_replicated=run_replicated), golden.load_stored(), stored)
    assert len(checks) == len(stored) and all(c.passed is False and "results for" in c.detail for c in checks), checks


def test_the_cli_fails_a_backend_that_expresses_no_case_and_writes_strict_json(tmp_path, monkeypatch):
    import json

    from bn1d.conformance import __main__ as cli
    from bn1d.conformance.registry import NotApplicable

    def make_layer(self, param_dtype="float32", **kwargs):
        raise NotApplicable("nothing")

    def crash(self, param_dtype="float32", **kwargs):
        raise RuntimeError("boom")

    for name, method, why in (("nothing", make_layer, "no case applicable"), ("crashy", crash, "failed")):
        backend = _numpy_variant(name, make_layer=method)
        monkeypatch.setattr(cli, "load_backend", lambda n, group, b=backend: b)
        report = tmp_path / f"{name}.json"
        assert cli.main(["--backend", name, "--case", "default_blc", "--json", str(report)]) == 1, why
        json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


def test_state_transfer_blames_the_backend_that_failed_and_says_when_it_cannot_run():
    """R6.4's check: a source that cannot express the case is not applicable, not a
    failure of the target; a target whose load fails is the target's failure; a single
    backend gets a not-applicable check instead of none."""
    from bn1d.conformance import golden
    from bn1d.conformance.builtin import NumpyBackend
    from bn1d.conformance.registry import NotApplicable
    from bn1d.conformance.runner import cross_backend_checks

    def cannot(self, param_dtype="float32", **kwargs):
        raise NotApplicable("no such layer")

    def refusing(self, param_dtype="float32", **kwargs):
        layer = NumpyBackend.make_layer(self, param_dtype, **kwargs)
        layer.load_state_dict = lambda state: (_ for _ in ()).throw(RuntimeError("refused"))
        return layer

    vectors = golden.load_stored()
    checks = cross_backend_checks([_numpy_variant("cannot", make_layer=cannot), NumpyBackend()], vectors)
    assert [c.passed for c in checks if c.case == "state cannot -> numpy"] == [None], checks
    checks = cross_backend_checks([NumpyBackend(), _numpy_variant("refusing", make_layer=refusing)], vectors)
    failed = [c for c in checks if c.passed is False]
    assert [(c.case, c.backend) for c in failed] == [("state numpy -> refusing", "refusing")], checks
    (single,) = cross_backend_checks([NumpyBackend()], vectors)
    assert single.passed is None and "needs two backends" in single.detail
