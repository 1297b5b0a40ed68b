"""The checkout's layout (``bn1d/``, ``backends/``, ``conformance/`` side by side, with
``bn1d/backends`` and ``bn1d/conformance`` links to the last two) and the installed package
(``bn1d``, ``bn1d.backends``, ``bn1d.conformance``) agree on what ``bn1d`` is: run from the
checkout's root, where its ``bn1d/`` shadows an installed bn1d, or from a checkout that is
not installed at all, the adapters and the suite import from ``../backends`` and
``../conformance``, and nothing else of the checkout becomes part of the package
(``bn1d.bn1d`` would be a second copy of every module, with classes that are not the
package's). No import hook does it: importing bn1d adds nothing to ``sys.meta_path``, and
installing it adds no pytest plugin to other projects' sessions."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

NOT_INSTALLED = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]  # no editable install
sys.path[:] = [p for p in sys.path if "site-packages" not in p or "bn1d" not in p]
sys.path.insert(0, {root!r})
"""

PROBE = """
import importlib, sys
finders = list(sys.meta_path)
import bn1d, bn1d.backends.numpy, bn1d.conformance.cases
assert sys.meta_path == finders, "importing bn1d added an import hook"
print(bn1d.backends.numpy.__file__)
assert bn1d.backends.numpy.BatchNorm1d.__mro__[1] is bn1d.Layer
for name in ("bn1d.bn1d", "bn1d.bn1d.config", "bn1d.tests", "bn1d.benchmarks", "bn1d.docs"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"{name} imported: the checkout's root became part of the package")
"""


def run(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("where", ["checkout root", "checkout, not installed", "elsewhere"])
def test_the_package_is_the_same_from_everywhere(where, tmp_path):
    code = (NOT_INSTALLED.format(root=str(ROOT)) if where == "checkout, not installed" else "") + PROBE
    result = run(code, ROOT if where == "checkout root" else tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    backends = Path(result.stdout.strip().splitlines()[0]).resolve()
    if where != "elsewhere":  # an installed wheel lives in site-packages
        assert backends == ROOT / "backends" / "numpy.py"


def test_installing_bn1d_adds_no_pytest_plugin():
    """The conformance suite's options are opt-in (``-p bn1d.conformance.plugin``): an
    entry point in the ``pytest11`` group would load bn1d into every pytest session of any
    project installed beside it."""
    from importlib.metadata import distribution

    assert "pytest11" not in {entry.group for entry in distribution("bn1d").entry_points}


FRAMEWORKS = ("torch", "jax", "flax", "equinox", "keras", "brainpy")
IMPORTS_ONLY = """
import importlib, sys
for name in {modules!r}:
    importlib.import_module(name)
print(sorted(f for f in {frameworks!r} if f in sys.modules))
"""


@pytest.mark.parametrize(
    "modules, allowed",
    [
        (("bn1d", "bn1d.algorithm", "bn1d.validation", "bn1d.population", "bn1d.folding", "bn1d.layer",
          "bn1d.replicas", "bn1d.state", "bn1d.backends.formats", "bn1d.backends.numpy", "bn1d.conformance",
          "bn1d.conformance.checks"), ()),
        (("bn1d.backends.jax", "bn1d.backends.jax_collectives", "bn1d.backends.jax_modules",
          "bn1d.backends.jax_population"), ("jax",)),
        (("bn1d.backends.nnx", "bn1d.backends.linen", "bn1d.backends.nnx_fold"), ("jax", "flax")),
        (("bn1d.backends.equinox", "bn1d.backends.equinox_fold"), ("jax", "equinox")),
        (("bn1d.backends.torch_nn", "bn1d.backends.torch", "bn1d.backends.torch_func",
          "bn1d.backends.torch_population", "bn1d.backends.torch_fold"), ("torch",)),
    ],
    ids=["core", "jax", "flax", "equinox", "torch"],
)  # fmt: skip
def test_the_core_imports_no_framework_and_an_adapter_only_its_own(modules, allowed, tmp_path):
    """docs/architecture.md's rules, in a fresh interpreter: importing the core (and the
    suite) loads no framework; an adapter loads its own (and what that framework itself
    loads: Flax and Equinox load JAX) and no other."""
    import importlib.util

    missing = [f for f in allowed if importlib.util.find_spec(f) is None]
    if missing:
        pytest.skip(f"{missing} not installed in this environment")
    result = run(IMPORTS_ONLY.format(modules=modules, frameworks=FRAMEWORKS), tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = set(ast.literal_eval(result.stdout.strip().splitlines()[-1]))
    assert loaded <= set(allowed), f"{modules} loaded {sorted(loaded - set(allowed))}"


def test_the_core_exports_its_two_checked_entries_and_few_more_each_documented():
    """docs/architecture.md: ``bn1d.algorithm`` exports eight names, the two checked entries
    among them; every exported function documents Parameters and Returns (the checked
    entries Raises too), with numpydoc's section headers; the checks live apart, in
    ``bn1d.validation``, and the maths module defines none of them."""
    import inspect

    from bn1d import algorithm, validation

    assert set(algorithm.__all__) == {"AllGather", "AllSum", "BatchNormResult", "Hooks", "batch_norm",
                                      "batch_norm_vjp", "combine_moments", "combine_shifted"}  # fmt: skip
    for name in algorithm.__all__:
        obj = getattr(algorithm, name)
        doc = inspect.getdoc(obj) or ""
        assert doc, name
        if inspect.isfunction(obj):
            sections = ["Parameters", "Returns"] + (["Raises"] if name.startswith("batch_norm") else [])
            for section in sections:
                assert f"\n{section}\n{'-' * len(section)}\n" in doc, (name, section)
    for name in validation.__all__:
        assert getattr(validation, name).__module__ == "bn1d.validation"
        assert not any(n == name for n, f in vars(algorithm).items() if inspect.isfunction(f) and
                       f.__module__ == "bn1d.algorithm")  # fmt: skip
