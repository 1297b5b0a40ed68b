"""Regenerate the tables the docs carry from the conformance suite (a maintainer's tool, not
part of the installed package):

    python tools/docs_tables.py readme docs/peers.json README.md   # the README's semantics table
    python tools/docs_tables.py coverage docs/spec.md              # the spec's rule coverage

``tests/test_conformance_suite.py`` fails while either table is stale.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from bn1d.conformance import reports


def replace_block(text: str, start: str, end: str, content: str) -> str:
    """``text`` with what lies between the markers ``start`` and ``end`` replaced."""
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{content}\n{end}{tail}"


def main(argv: Sequence[str]) -> None:
    if argv[:1] == ["readme"] and len(argv) == 3:
        with open(argv[1]) as stream:
            content = reports.readme_table(json.load(stream)["report"])
        path, start, end = argv[2], reports.START, reports.END
    elif argv[:1] == ["coverage"] and len(argv) == 2:
        path, content, start, end = argv[1], reports.coverage_markdown(), reports.COVERAGE_START, reports.COVERAGE_END
    else:
        raise SystemExit(f"arguments: expected 'readme REPORT.json README.md' or 'coverage docs/spec.md', got {argv}")
    with open(path) as stream:
        text = stream.read()
    with open(path, "w") as stream:
        stream.write(replace_block(text, start, end, content))


if __name__ == "__main__":
    main(sys.argv[1:])
