"""What ``python -m bn1d.conformance`` writes besides its table: rule coverage,
expected-failure lists, versions, JUnit XML, and the peers' report (and the README
semantics table generated from it; ``tools/docs_tables.py``, outside the package, writes
the tables into the docs).

Expected failures (``--xfail FILE``) are TOML, a table per backend, a reason per case::

    [mybackend]
    float16 = "no half-precision kernels yet"

A listed case that fails is reported as ``xfail``; one that passes as ``XPASS``, a
failure of the run (the list must be kept current).
"""

from __future__ import annotations

import math
import platform
import xml.etree.ElementTree as ElementTree
from collections.abc import Collection, Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .cases import CASES, CHECK_CASES, ERROR_CASES, SYNC_CASES, Case
from .checks import Check
from .spec import RULES, SPEC_VERSION, SUITE_VERSION

__all__ = [
    "ASPECTS",
    "case_rules",
    "coverage",
    "format_peers",
    "junit",
    "peers_markdown",
    "peers_report",
    "read_xfail",
    "readme_table",
    "unmatched_xfail",
    "version_line",
    "versions",
]

#: Rules every numeric case checks through the runner's own checks (the initial
#: state and the state's keys before and after each call, the output dtype).
IMPLICIT = ("R3.1", "R6.1", "R2.5")
#: Every case of the catalogue, of every kind.
ALL_CASES: tuple[Any, ...] = (*CASES, *ERROR_CASES, *SYNC_CASES, *CHECK_CASES)


def case_rules(case: Any) -> tuple[str, ...]:
    rules = tuple(case.rules)
    return rules + tuple(r for r in IMPLICIT if r not in rules) if isinstance(case, Case) else rules


def _covering(rules_of: Any) -> tuple[dict[str, list[str]], list[str]]:
    """Each rule of ``docs/spec.md`` with the names of the cases ``rules_of(case)`` says
    check it, in catalogue order; and ``"case: rule"`` for every rule cited that is unknown."""
    covering: dict[str, list[str]] = {rule: [] for rule in RULES}
    unknown = []
    for case in ALL_CASES:
        for rule in rules_of(case):
            if rule in covering:
                covering[rule].append(case.name)
            else:
                unknown.append(f"{case.name}: {rule}")
    return covering, unknown


def coverage() -> tuple[str, list[str]]:
    """Each rule of ``docs/spec.md`` with the cases covering it; and the uncovered rules."""
    covering, unknown = _covering(case_rules)
    lines = [f"docs/spec.md {SPEC_VERSION}: {len(RULES)} rules"]
    for rule, names in covering.items():
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        lines.append(f"{rule} {RULES[rule]}: {shown or 'NO CASE'}")
    uncovered = [rule for rule, names in covering.items() if not names]
    lines += [f"case names an unknown rule: {u}" for u in unknown]
    lines.append(f"uncovered rules: {', '.join(uncovered) if uncovered else 'none'}")
    return "\n".join(lines), uncovered + unknown


COVERAGE_START, COVERAGE_END = (
    "<!-- coverage:start (generated: python tools/docs_tables.py coverage docs/spec.md) -->",
    "<!-- coverage:end -->",
)


def coverage_markdown() -> str:
    """The coverage table of ``docs/spec.md``: each rule, its cases."""
    covering, _ = _covering(lambda case: case.rules)  # an unknown rule fails coverage()
    cells = {rule: [f"`{name}`" for name in names] for rule, names in covering.items()}
    for rule in IMPLICIT:  # the runner checks these on every numeric case
        cells[rule].append(f"every one of the {len(CASES)} numeric cases")
    lines = ["| rule | checked by the cases |", "|---|---|"]
    lines += [f"| {rule} | {', '.join(names)} |" for rule, names in cells.items()]
    return "\n".join(lines)


def read_xfail(path: str) -> dict[str, dict[str, str]]:
    """The expected failures of a TOML file: ``{backend: {case: reason}}``."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as stream:
        data = tomllib.load(stream)
    known = {c.name for c in ALL_CASES}
    for backend, cases in data.items():
        if not isinstance(cases, dict) or not all(isinstance(r, str) and r for r in cases.values()):
            raise ValueError(f"[{backend}]: expected a table of case = 'reason', got {cases!r}")
        unknown = sorted(set(cases) - known)
        if unknown:
            raise ValueError(f"[{backend}]: unknown cases {unknown} (see --list-cases)")
    return data


def unmatched_xfail(xfail: Mapping[str, Any], backends: Collection[str]) -> list[str]:
    """A note per table of ``xfail`` that names no backend of this run: a table for a
    backend that is not installed here is legitimate, but a misspelt one would leave
    its failures unexpected without a hint."""
    return [
        f"xfail: [{table}] names no backend of this run ({', '.join(backends)}); its entries are not used"
        for table in sorted(set(xfail) - set(backends))
    ]


def _distribution(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def versions(backends: Iterable[Any]) -> dict[str, str]:
    """The suite, the spec, Python and each backend's library."""
    found = {"bn1d": _distribution("bn1d") or "source", "suite": SUITE_VERSION, "spec": SPEC_VERSION,
             "python": platform.python_version()}  # fmt: skip
    defaults = {"numpy": "numpy", "jax": "jax", "torch": "torch", "array_api_strict": "array-api-strict"}
    for backend in backends:
        reported = getattr(backend, "versions", None)
        if reported is not None:
            found.update(reported())
        elif backend.name in defaults:
            found[defaults[backend.name]] = _distribution(defaults[backend.name]) or "?"
    return found


def version_line(found: dict[str, str]) -> str:
    return "versions: " + ", ".join(f"{k} {v}" for k, v in found.items())


def junit(checks: Sequence[Check], found: dict[str, str], elapsed: float) -> str:
    """A JUnit XML report: a test suite per backend, a test case per check (skipped:
    not applicable or an expected failure), the versions as properties."""
    root = ElementTree.Element("testsuites", name="bn1d.conformance", time=f"{elapsed:.3f}")
    for backend in dict.fromkeys(c.backend for c in checks):
        mine = [c for c in checks if c.backend == backend]
        failures = [c for c in mine if (c.passed is False and c.xfail is None) or (c.passed and c.xfail)]
        skipped = [c for c in mine if c.passed is None or (c.passed is False and c.xfail is not None)]
        suite = ElementTree.SubElement(root, "testsuite", name=backend, tests=str(len(mine)),
                                       failures=str(len(failures)), skipped=str(len(skipped)))  # fmt: skip
        properties = ElementTree.SubElement(suite, "properties")
        for key, value in found.items():
            ElementTree.SubElement(properties, "property", name=key, value=value)
        for check in mine:
            case = ElementTree.SubElement(suite, "testcase", classname=f"bn1d.conformance.{backend}", name=check.case)
            if check.passed is None:
                ElementTree.SubElement(case, "skipped", message=f"not applicable: {check.detail}")
            elif check.passed is False and check.xfail is not None:
                ElementTree.SubElement(case, "skipped", message=f"expected failure: {check.xfail}")
            elif check.passed is False:
                ElementTree.SubElement(case, "failure", message=check.detail)
            elif check.xfail is not None:
                ElementTree.SubElement(case, "failure", message=f"unexpected pass (listed: {check.xfail})")
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


# -- the peers' report ----------------------------------------------------------------------
#: The README's rows: what bn1d specifies, and the cases that measure it.
ASPECTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("training statistics, y",
     "batch mean, biased two-pass variance, `y = (x - mean) * scale / sqrt(var + eps) + bias` (R2.1)",
     ("default_blc", "epsilon_large", "epsilon_tiny", "initializers", "affine_false")),
    ("momentum", "weight of the old statistic, default 0.99 (PyTorch's `m` is `1 - m`) (R1.5)",
     ("three_steps_then_inference", "momentum_zero", "momentum_one")),
    ("running variance", "unbiased `n/(n-1)` with the global `n`; `unbiased_running_var=False` biased (R3.3, R3.4)",
     ("default_blc", "biased_running_var")),
    ("raw data (mean / std up to 1e4)", "within 1e-5 of float64, n up to 2**18 (R2.7)",
     ("accuracy_blc_mean_1e4", "accuracy_blc_mean_100", "accuracy_channel_first", "accuracy_bc",
      "ill_conditioned_float32", "accuracy_then_inference")),
    ("one-pass variance", "`fast_variance=True`: BrainPy's formula, clamped at 0 (R2.2)",
     ("fast_variance", "fast_variance_cancels")),
    ("layouts", "any rank; `axis` lists the reduced axes; negative axes (R1.3)",
     ("axis0_bc", "channel_first_bcl", "negative_axes", "feature_axis_first", "rank4")),
    ("float16 / bfloat16", "statistics in float32, `y` in the input's dtype (R2.5)",
     ("float16", "bfloat16", "accuracy_float16", "accuracy_bfloat16")),
    ("float64", "computed in float64, also with float32 statistics (R2.5)",
     ("float64", "ill_conditioned_float64", "float64_input_float32_params")),
    ("masks", "`mask` without the feature axis (R5.1)", ("mask", "mask_channel_first", "accuracy_mask")),
    ("empty batch / nothing kept", "behaves as inference, nothing is NaN (R3.6)", ("empty_batch", "mask_none_kept")),
    ("one value per feature", "`ValueError` from the shape; no Bessel factor at run time (R3.5)",
     ("x_single_value_training", "mask_single_value")),
    ("cumulative average", "`momentum=None`, counted in `num_batches_tracked` (R3.7)", ("cumulative_average",)),
    ("no running statistics", "`track_running_stats=False`: batch statistics always (R3.8)",
     ("no_running_stats", "no_running_stats_affine_false")),
    ("modes", "`mode`, `train()`/`eval()`, per-call `training=` (R1.8)",
     ("inference_mode", "training_flag_in_inference_mode", "per_call_training_flag")),
    ("synced statistics", "count-weighted over replicas, groups under vmap/pmap/shard_map and torch.distributed (R4)",
     tuple(c.name for c in SYNC_CASES)),
    ("bad arguments", "`ValueError`/`TypeError` naming the argument, before any change (R7.1)",
     tuple(c.name for c in ERROR_CASES if c.where != "load")),
    ("bad checkpoints", "strict, atomic; overflow is an error (R6.2, R6.3, R6.6)",
     tuple(c.name for c in ERROR_CASES if c.where == "load")),
    ("state round trip", "a NaN state loads back with a warning (R6.5)", ("round_trip_after_nan",)),
    ("BrainPy 2.8.2's numbers", "reproduced (R8.1)", ("brainpy_reference_numbers",)),
)  # fmt: skip


def _verdict(checks: list[Check]) -> dict[str, Any]:
    """One aspect on one peer: counts, and what differs most."""
    agree = [c for c in checks if c.passed]
    differ = [c for c in checks if c.passed is False]
    cannot = [c for c in checks if c.passed is None]
    worst = max(differ, key=lambda c: c.error if c.error is not None else float("inf"), default=None)
    quantities = list(dict.fromkeys(q for c in differ for q in c.differs))
    reasons = list(dict.fromkeys(c.detail for c in cannot))
    return {"agree": len(agree), "differ": len(differ), "cannot": len(cannot), "quantities": quantities,
            "worst": None if worst is None else {"case": worst.case, "error": worst.error, "detail": worst.detail},
            "reasons": reasons}  # fmt: skip


def peers_report(checks: Sequence[Check], peers: Sequence[str]) -> dict[str, Any]:
    """Per peer: every case's status, and a verdict per :data:`ASPECTS` row."""
    by_peer = {p: {c.case: c for c in checks if c.backend == p} for p in peers}
    cases = {
        p: {name: {"status": "agrees" if c.passed else "differs" if c.passed is False else "cannot express",
                   "error": c.error, "detail": c.detail, "differs": list(c.differs)} for name, c in mine.items()}
        for p, mine in by_peer.items()
    }  # fmt: skip
    aspects = {
        label: {p: _verdict([by_peer[p][n] for n in names if n in by_peer[p]]) for p in peers}
        for label, _, names in ASPECTS
    }
    return {"peers": list(peers), "cases": cases, "aspects": aspects}


def _cell(verdict: dict[str, Any]) -> str:
    """A README cell: agrees / differs (in what) / cannot express."""
    total = verdict["agree"] + verdict["differ"]
    if total == 0:
        return f"cannot express ({verdict['reasons'][0]})" if verdict["reasons"] else "-"
    if verdict["differ"] == 0:
        text = "agrees" if verdict["cannot"] == 0 else f"agrees in {total} of {total + verdict['cannot']}"
    else:
        what = ", ".join(verdict["quantities"][:3]) or "errors"
        text = f"differs in {verdict['differ']} of {total} ({what})"
    return text


def readme_table(report: dict[str, Any]) -> str:
    """The semantics table: what bn1d specifies, and each peer's measured verdict."""
    descriptions = {label: text for label, text, _ in ASPECTS}
    peers = report["peers"]
    lines = ["| | bn1d (docs/spec.md) | " + " | ".join(f"`{p}`" for p in peers) + " |",
             "|---" * (len(peers) + 2) + "|"]  # fmt: skip
    for label, verdicts in report["aspects"].items():
        cells = [_cell(verdicts[p]) for p in peers]
        lines.append(f"| {label} | {descriptions[label]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


START, END = "<!-- semantics-table:start (generated: tox -e peers) -->", "<!-- semantics-table:end -->"


def format_peers(report: dict[str, Any]) -> str:
    lines = []
    for peer in report["peers"]:
        cases = report["cases"][peer]
        counts = {s: sum(c["status"] == s for c in cases.values()) for s in ("agrees", "differs", "cannot express")}
        lines.append(f"{peer}: agrees {counts['agrees']}, differs {counts['differs']}, "
                     f"cannot express {counts['cannot express']}")  # fmt: skip
        for name, case in cases.items():
            if case["status"] == "differs":
                ratio = "" if case["error"] is None else f" (error/bound {case['error']:.3g})"
                lines.append(f"  differs {name}{ratio}: {case['detail']}")
    return "\n".join(lines)


def peers_markdown(report: dict[str, Any], found: dict[str, str], missing: Sequence[str]) -> str:
    peers = report["peers"]
    out = ["# The peers against the specification", "",
           f"Generated by `tox -e peers` (`python -m bn1d.conformance --peers`); {version_line(found)}.", "",
           "Each peer runs the conformance cases with the case's configuration mapped onto its own conventions "
           "(`bn1d/conformance/peers.py`). *agrees*: within the bound the accuracy rule gives; *differs*: the worst "
           "error over its bound; *cannot express*: the library has no such configuration.", "",
           readme_table(report), ""]  # fmt: skip
    for name in missing:
        out.append(f"Missing (not installed, not counted as passed): {name}")
    out += ["", "## Every case", "", "| case | " + " | ".join(peers) + " |", "|---" * (len(peers) + 1) + "|"]
    names = list(dict.fromkeys(n for p in peers for n in report["cases"][p]))
    for name in names:
        cells = []
        for peer in peers:
            case = report["cases"][peer].get(name)
            if case is None:
                cells.append("-")
            elif case["status"] == "differs" and case["error"] is not None:
                cells.append(f"differs ({case['error']:.3g}x bound: {', '.join(case['differs'])})")
            elif case["status"] == "cannot express":
                cells.append(f"cannot express: {case['detail']}")
            elif case["status"] == "agrees" and "gradients not scored" in case["detail"]:
                cells.append("agrees (no gradients measured)")
            else:
                cells.append(case["status"] if case["status"] != "differs" else f"differs: {case['detail']}")
        out.append(f"| {name} | " + " | ".join(cells).replace("\n", " ") + " |")
    return "\n".join(out) + "\n"


def finite(value: Any) -> Any:
    """``value`` (a report's nested dicts and lists) with every non-finite float written
    as the string ``"inf"``, ``"-inf"`` or ``"nan"``: strict JSON has no infinity, and an
    error of ``inf`` (a shape or key mismatch, a crash) is what a failure reports."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value
