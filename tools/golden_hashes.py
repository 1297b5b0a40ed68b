"""Fingerprint every backend's actual results on the conformance cases, bitwise, to show that a
refactor changed no number (a maintainer's tool, not part of the installed package):

    python tools/golden_hashes.py before.json              # on the old commit
    python tools/golden_hashes.py after.json               # on the new one
    python tools/golden_hashes.py --compare before.json after.json

Each compared quantity of each case (``y`` of every step, the state after it, the gradients)
as the conformance runner scores it, hashed with its dtype, for NumPy, JAX, PyTorch, NNX,
linen and Equinox (``--backends`` to choose). Deterministic on one machine (the runs of
``docs/architecture.md``'s refactors: run twice, identical).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

BACKENDS = ("numpy", "jax", "torch", "nnx", "linen", "equinox")


def fingerprints(backends: Sequence[str]) -> dict[str, str]:
    """``{"<backend>/<case>/<n>": hash}``, the ``n``-th quantity the runner compared."""
    from bn1d.conformance import golden, runner
    from bn1d.conformance.cases import CASES
    from bn1d.conformance.registry import load_backend

    found: dict[str, str] = {}
    where = [""]
    compare = runner.worst

    def recording(actual: Any, want: Any, bound: Any) -> Any:
        value = np.ascontiguousarray(np.asarray(actual))
        digest = hashlib.sha256(value.tobytes() + str(value.dtype).encode()).hexdigest()[:16]
        found[f"{where[0]}/{len(found)}"] = digest
        return compare(actual, want, bound)

    runner.worst = recording
    try:
        vectors = golden.load()
        for name in backends:
            backend = load_backend(name)
            for case in CASES:
                where[0] = f"{name}/{case.name}"
                try:
                    runner.run_case(backend, case, vectors)
                except Exception as error:  # not applicable here: recorded, so a change shows
                    found[f"{where[0]}/not-run"] = type(error).__name__
    finally:
        runner.worst = compare
    return found


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="OUT.json, or with --compare BEFORE.json AFTER.json")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.load(open(path)) for path in args.paths)
        differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        print(f"{len(before)} and {len(after)} fingerprints; {len(differ)} differ", *differ[:20], sep="\n")
        return 1 if differ else 0
    found = fingerprints(args.backends)
    with open(args.paths[0], "w") as stream:
        json.dump(found, stream, indent=0, sort_keys=True)
    print(f"{len(found)} fingerprints in {args.paths[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
