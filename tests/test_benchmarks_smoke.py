"""``python -m benchmarks --quick`` runs and prints the full table (a smoke test, not a timing)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASSES = ("train fwd", "train fwd+bwd", "inference")


def _have(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


def test_quick_benchmark_table(tmp_path):
    backends = ["numpy"] + (["jax"] if _have("jax", "flax") else []) + (["torch"] if _have("torch") else [])
    sync = _have("jax", "torch")
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--backends", ",".join(backends), "--json", str(out)]
    if not sync:
        command.append("--no-sync")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| backend | shape | pass |" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    seen = {(r["backend"], r["pass"]) for r in rows}
    for backend in backends:
        for pass_ in PASSES:
            assert (backend, pass_) in seen
            assert sum(1 for r in rows if (r["backend"], r["pass"]) == (backend, pass_)) >= 2  # both shapes
    for row in rows:
        assert row["bn1d_s"] > 0 and row["peer_s"] > 0 and row["ratio"] > 0
    if "jax" in backends:  # the linen drop-in is timed against Flax in every pass
        assert {r["pass"] for r in rows if r["backend"] == "jax" and r["variant"] == "drop-in"} == set(PASSES)
    if sync:
        assert {r["backend"] for r in rows} >= {"jax sync (shard_map)", "torch sync (gloo)"}
        variants = {r["variant"] for r in rows if r["backend"] == "torch sync (gloo)"}
        assert "2 processes" in variants
        assert any(r["peer"] == "hand-written synced" for r in rows)  # it agreed with bn1d on every rank
        if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:  # as benchmarks.sync._can_pin
            assert "2 processes, 1 CPU each" in variants


def test_quick_accuracy_table(tmp_path):
    """``python -m benchmarks.accuracy --quick``: every installed implementation in the
    table, bn1d's rows within the rule (its exit status says so), peers reported."""
    out = tmp_path / "accuracy.json"
    command = [sys.executable, "-m", "benchmarks.accuracy", "--quick", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| implementation | metric |" in result.stdout and "bn1d's worst:" in result.stdout
    data = json.loads(out.read_text())
    names = {r["implementation"] for r in data["records"]}
    assert {"bn1d numpy", "bn1d numpy, 4 replicas"} <= names
    if _have("jax"):
        assert {"bn1d jax", "bn1d jax, vmap 4 replicas"} <= names
    if _have("torch"):
        assert {"bn1d torch", "bn1d torch, gloo 4 ranks", "torch.nn.BatchNorm1d"} <= names
    for record in data["records"]:
        if record["implementation"].startswith("bn1d"):
            assert max(record["y"], record["mean"], record["var"]) <= data["rule"], record
    assert all("not installed" in m for m in data["missing"]) or data["missing"] == []
