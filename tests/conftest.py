"""``--jax-strict``: the JAX tests under every strict mode JAX has, together (tox env
``jax-strict``): ``jax_numpy_rank_promotion="raise"``, ``jax_numpy_dtype_promotion="strict"``,
``jax_enable_x64`` and ``jax.checking_leaks()`` around each test. Many codebases set them,
and Equinox's own tests run with rank promotion raising."""

from __future__ import annotations

import contextlib

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--jax-strict", action="store_true", help="run under all of JAX's strict modes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "jax_leak_checker_false_positive: under --jax-strict, run without jax.checking_leaks() (JAX 0.10.2's "
        "checker reports jax.checkpoint inside shard_map under grad as a leak: "
        "tests/jax_backend/test_jax_strict_modes.py reproduces it without bn1d)",
    )
    config.addinivalue_line(
        "markers",
        "jax_leak_check_only(**params): under --jax-strict, jax.checking_leaks() wraps only the cases of a "
        "parametrized test with these parameter values (the checker turns JAX's caches off: an eager test takes "
        "~15x its time); the strict promotion modes still run on every case",
    )
    if config.getoption("--jax-strict"):
        import jax

        jax.config.update("jax_numpy_rank_promotion", "raise")
        jax.config.update("jax_numpy_dtype_promotion", "strict")
        jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True)
def _jax_leak_check(request: pytest.FixtureRequest):
    only = request.node.get_closest_marker("jax_leak_check_only")
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if (
        not request.config.getoption("--jax-strict")
        or request.node.get_closest_marker("jax_leak_checker_false_positive")
        or (only is not None and any(params.get(name) != value for name, value in only.kwargs.items()))
    ):
        yield
        return
    import jax

    with jax.checking_leaks() if hasattr(jax, "checking_leaks") else contextlib.nullcontext():
        yield


@pytest.fixture(autouse=True)
def _jax_strict_runs(request: pytest.FixtureRequest) -> None:
    """Under ``--jax-strict``, a module that names ``JAX_STRICT_RUNS`` (test function names)
    runs those only: the rest check arithmetic that the strict modes do not touch, and the
    tox env ``jax`` runs every test (this keeps CI's time)."""
    wanted = getattr(request.module, "JAX_STRICT_RUNS", None)
    if wanted is not None and request.config.getoption("--jax-strict") and request.node.originalname not in wanted:
        pytest.skip(f"the tox env jax runs it; --jax-strict runs {', '.join(wanted)} here")
