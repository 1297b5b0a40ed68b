"""``python -m bn1d.conformance``: run the suite on every installed backend and
print a table (case x backend -> the worst error over its bound, pass/fail: a
value <= 1 passes; ``tolerances.py`` derives each bound from the spec's accuracy
rule). Exit status: 0 all passed, 1 a check failed (or a rule has no case, with
``--coverage``), 2 a requested backend is unknown or not installed.

``--peers`` runs other libraries' batch norms instead (``bn1d.conformance.peers``)
and reports, per peer, which cases agree, which differ and by how much, and which
it cannot express; it never fails on a difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from . import reports
from .cases import ERROR_CASES
from .golden import load
from .registry import ENTRY_POINT_GROUP, PEERS_GROUP, BackendUnavailable, load_backend, registered_backends
from .runner import Check, run_suite


def _cell(check: Check | None) -> str:
    if check is None:
        return "-"
    if check.passed is None:
        return f"n/a ({check.detail})"
    verdict = "ok" if check.passed else "FAIL"
    if check.xfail is not None:
        verdict = "XPASS" if check.passed else "xfail"
    return verdict if check.error is None else f"{check.error:.3f} {verdict}"


def format_table(checks: list[Check], backend_names: list[str]) -> str:
    """One row per case, one column per backend: the worst error / bound (<= 1 passes),
    or ok/FAIL for the error cases and checks."""
    rows: dict[str, dict[str, Check]] = {}
    kinds: dict[str, str] = {}
    for check in checks:
        rows.setdefault(check.case, {})[check.backend] = check
        if check.tolerance is not None:
            kinds[check.case] = "error/bound"
        elif check.passed is not None and check.error is None and check.case not in kinds:
            kinds[check.case] = "raises" if any(c.name == check.case for c in ERROR_CASES) else "property"
    header = ["case", "scored as", *backend_names]
    lines = [[case, kinds.get(case, ""), *(_cell(cells.get(b)) for b in backend_names)] for case, cells in rows.items()]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])


def _load_backends(names: Sequence[str] | None, group: str) -> tuple[list, list[str]] | int:
    registered = registered_backends(group)
    backends, missing = [], []
    for name in names or sorted(registered, key=lambda n: (n != "numpy", n)):
        try:
            backends.append(load_backend(name, group))
        except (ValueError, BackendUnavailable) as error:
            if names:  # asked for explicitly: never pass silently
                print(f"error: {error}", file=sys.stderr)
                return 2
            missing.append(f"{name} ({error})")
    return backends, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bn1d.conformance", description=__doc__)
    parser.add_argument("--backend", action="append", help="run only this backend (repeatable); default: all installed")
    parser.add_argument("--case", action="append", help="run only this case (repeatable; see --list-cases)")
    parser.add_argument("--peers", action="store_true", help="run the peers (other libraries' batch norms) instead")
    parser.add_argument("--xfail", metavar="PATH", help="expected failures: a TOML file [backend] case = 'reason'")
    parser.add_argument("--json", metavar="PATH", help="also write every check as JSON (with the versions)")
    parser.add_argument("--junit", metavar="PATH", help="also write a JUnit XML report")
    parser.add_argument("--markdown", metavar="PATH", help="with --peers: also write the peers' report as Markdown")
    parser.add_argument("--list", action="store_true", help="list the registered backends (and peers) and exit")
    parser.add_argument("--list-cases", action="store_true", help="list the cases with their rules and exit")
    parser.add_argument("--coverage", action="store_true", help="list each rule of docs/spec.md with its cases")
    args = parser.parse_args(argv)

    if args.list:
        for group, label in ((ENTRY_POINT_GROUP, "backend"), (PEERS_GROUP, "peer")):
            for name, entry in sorted(registered_backends(group).items()):
                print(f"{label} {name}: {entry.value}")
        return 0
    if args.list_cases:
        for case in reports.ALL_CASES:
            print(f"{case.name}: {' '.join(reports.case_rules(case))}")
        return 0
    if args.coverage:
        text, uncovered = reports.coverage()
        print(text)
        return 1 if uncovered else 0
    known = {c.name for c in reports.ALL_CASES}
    unknown = sorted(set(args.case or ()) - known)
    if unknown:
        print(f"error: case: expected one of --list-cases, got {unknown}", file=sys.stderr)
        return 2
    try:
        xfail = reports.read_xfail(args.xfail) if args.xfail else {}
    except (OSError, ValueError) as error:
        print(f"error: xfail: {error}", file=sys.stderr)
        return 2
    loaded = _load_backends(args.backend, PEERS_GROUP if args.peers else ENTRY_POINT_GROUP)
    if isinstance(loaded, int):
        return loaded
    backends, missing = loaded
    if not backends:
        print("error: no backend is installed", file=sys.stderr)
        return 2
    for note in reports.unmatched_xfail(xfail, [b.name for b in backends]):
        print(f"note: {note}", file=sys.stderr)

    interactive = sys.stderr.isatty()
    last_backend = [""]

    def progress(message: str) -> None:
        if interactive:
            print(f"\r\033[K{message}", end="", file=sys.stderr, flush=True)
        else:  # a log: one line per backend, not per case
            backend = message.split("] ", 1)[-1].split(":")[0]
            if backend != last_backend[0]:
                last_backend[0] = backend
                print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    checks = run_suite(backends, load(), progress, xfail=xfail, cases=args.case)
    elapsed = time.perf_counter() - started
    if interactive:
        print("\r\033[K", end="", file=sys.stderr)
    versions = reports.versions(backends)
    print(reports.version_line(versions))
    names = [b.name for b in backends]
    if args.peers:
        report = reports.peers_report(checks, names)
        print(reports.format_peers(report))
        for name in missing:
            print(f"not installed (reported as missing, not as passed): {name}")
        if args.markdown:
            with open(args.markdown, "w") as stream:
                stream.write(reports.peers_markdown(report, versions, missing))
    else:
        print(format_table(checks, names))
    failed = [c for c in checks if c.passed is False and c.xfail is None]
    unexpected = [c for c in checks if c.passed is True and c.xfail is not None]
    if not args.peers:
        for check in failed:
            print(f"FAIL {check.backend} {check.case}: {check.detail}")
        for check in unexpected:
            print(f"XPASS {check.backend} {check.case}: listed as an expected failure ({check.xfail}), but passes")
        for name in missing:
            print(f"not installed: {name}")
    if args.json:
        document: dict = {"versions": versions}
        if args.peers:  # the report holds every case's result
            document.update(report=report, missing=missing)
        else:
            document["checks"] = [c.as_dict() for c in checks]
        with open(args.json, "w") as stream:
            json.dump(reports.finite(document), stream, indent=1, allow_nan=False)
    if args.junit:
        with open(args.junit, "w") as stream:
            stream.write(reports.junit(checks, versions, elapsed))
    passed = sum(c.passed is True for c in checks)
    not_applicable = sum(c.passed is None for c in checks)
    expected = sum(c.passed is False and c.xfail is not None for c in checks)
    print(f"\n{'peers' if args.peers else 'backends'}: {', '.join(names)} ({elapsed:.1f} s)")
    summary = f"{passed} passed, {len(failed)} failed, {not_applicable} not applicable"
    if args.peers:
        summary = f"{passed} agree, {len(failed) + expected} differ, {not_applicable} cannot be expressed"
    if expected or unexpected:
        summary += f", {expected} expected failures, {len(unexpected)} unexpected passes"
    print(f"{'peers' if args.peers else 'conformance'}: {summary}")
    if args.peers:
        return 0
    idle = [name for name in names if not any(c.backend == name and c.passed is not None for c in checks)]
    if idle:  # a backend that expresses no case has shown nothing
        print(f"conformance: no case applicable on {', '.join(idle)}")
    return 1 if failed or unexpected or idle else 0


if __name__ == "__main__":
    sys.exit(main())
