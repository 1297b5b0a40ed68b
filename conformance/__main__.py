"""``python -m bn1d.conformance``: run the suite on every installed backend and
print a table (case x backend -> the worst error over its bound, pass/fail: a
value <= 1 passes; ``tolerances.py`` derives each bound from the contract's
accuracy rule). Exit status: 0 all passed, 1 a check failed, 2 a requested
backend is unknown or not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from .golden import load
from .registry import BackendUnavailable, load_backend, registered_backends
from .runner import Check, run_suite


def _cell(check: Check | None) -> str:
    if check is None:
        return "-"
    if check.passed is None:
        return f"n/a ({check.detail})"
    verdict = "ok" if check.passed else "FAIL"
    return verdict if check.error is None else f"{check.error:.3f} {verdict}"


def format_table(checks: list[Check], backend_names: list[str]) -> str:
    """One row per case, one column per backend: the worst error / bound (<= 1 passes),
    or ok/FAIL for the error cases."""
    rows: dict[str, dict[str, Check]] = {}
    kinds: dict[str, str] = {}
    for check in checks:
        rows.setdefault(check.case, {})[check.backend] = check
        if check.tolerance is not None:
            kinds[check.case] = "error/bound"
        elif check.passed is not None and check.error is None and check.case not in kinds:
            kinds[check.case] = "raises"
    header = ["case", "scored as", *backend_names]
    lines = [[case, kinds.get(case, ""), *(_cell(cells.get(b)) for b in backend_names)] for case, cells in rows.items()]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bn1d.conformance", description=__doc__)
    parser.add_argument("--backend", action="append", help="run only this backend (repeatable); default: all installed")
    parser.add_argument("--json", metavar="PATH", help="also write every check as JSON")
    parser.add_argument("--list", action="store_true", help="list the registered backends and exit")
    args = parser.parse_args(argv)

    registered = registered_backends()
    if args.list:
        for name, entry in sorted(registered.items()):
            print(f"{name}: {entry.value}")
        return 0
    backends, missing = [], []
    for name in args.backend or sorted(registered, key=lambda n: (n != "numpy", n)):
        try:
            backends.append(load_backend(name))
        except (ValueError, BackendUnavailable) as error:
            if args.backend:  # asked for explicitly: never pass silently
                print(f"error: {error}", file=sys.stderr)
                return 2
            missing.append(f"{name} ({error})")
    if not backends:
        print("error: no backend is installed", file=sys.stderr)
        return 2

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
    checks = run_suite(backends, load(), progress)
    if interactive:
        print("\r\033[K", end="", file=sys.stderr)
    print(format_table(checks, [b.name for b in backends]))
    failed = [c for c in checks if c.passed is False]
    for check in failed:
        print(f"FAIL {check.backend} {check.case}: {check.detail}")
    for name in missing:
        print(f"not installed: {name}")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump([asdict(c) for c in checks], stream, indent=1)
    passed = sum(c.passed is True for c in checks)
    not_applicable = sum(c.passed is None for c in checks)
    print(f"\nbackends: {', '.join(b.name for b in backends)} ({time.perf_counter() - started:.1f} s)")
    print(f"conformance: {passed} passed, {len(failed)} failed, {not_applicable} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
