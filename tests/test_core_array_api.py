"""The core function runs unchanged on every Array API library that is installed
(NumPy, array_api_strict, jax.numpy, torch), with float64 results equal to the
NumPy backend within 1e-12.

1e-12: the same float64 algorithm on another library only differs by the
summation order of its reductions (at most ~ulp * log2(60) relative here).
``array_api_strict`` proves the core uses nothing outside the standard.
"""

import contextlib
import importlib.util

import numpy as np
import pytest

from bn1d import batch_norm
from bn1d.backends.numpy import BatchNorm1d


def _strict():
    import array_api_strict

    return array_api_strict, contextlib.nullcontext()


def _jax():
    import jax
    import jax.numpy as jnp

    return jnp, jax.enable_x64(True)


def _torch():
    import array_api_compat.torch as xp

    return xp, contextlib.nullcontext()


LIBRARIES = {
    "numpy": lambda: (np, contextlib.nullcontext()),
    "array_api_strict": _strict,
    "jax": _jax,
    "torch": _torch,
}
INSTALLED = [name for name in LIBRARIES if name == "numpy" or importlib.util.find_spec(name) is not None]

CASES = [
    # (axis, shape, feature_axis, masked, training, fast)
    ((0, 1), (4, 5, 3), 2, False, True, False),
    ((0, 1), (4, 5, 3), 2, True, True, False),
    ((0, 1), (4, 5, 3), 2, True, True, True),
    ((0, 2), (4, 3, 5), 1, True, True, False),
    ((0,), (6, 3), 1, False, True, True),
    ((0, 1), (4, 5, 3), 2, False, False, False),
]


@pytest.mark.parametrize("library", INSTALLED)
@pytest.mark.parametrize("axis, shape, feature_axis, masked, training, fast", CASES)
def test_core_on_library_equals_numpy_backend(library, axis, shape, feature_axis, masked, training, fast):
    xp, precision = LIBRARIES[library]()
    rng = np.random.default_rng(0)
    c = shape[feature_axis]
    x = rng.normal(3.0, 2.0, shape)
    mask = rng.random(shape[:feature_axis] + shape[feature_axis + 1 :]) < 0.7 if masked else None
    scale, bias = rng.uniform(0.5, 2, c), rng.normal(size=c)
    spec = BatchNorm1d(
        c, axis=axis, dtype=np.float64, fast_variance=fast, scale_initializer=scale, bias_initializer=bias,
        mode=None if training else "inference",
    )  # fmt: skip
    spec.load_state_dict({**spec.state_dict(), "running_mean": rng.normal(size=c), "running_var": rng.uniform(1, 2, c)})
    state = spec.state_dict()
    y_spec = spec(x, mask=mask)
    with precision:
        as_xp = lambda a: xp.asarray(a, dtype=xp.float64)  # noqa: E731
        result = batch_norm(
            as_xp(x), as_xp(state["running_mean"]), as_xp(state["running_var"]), as_xp(scale), as_xp(bias),
            reduce_axes=spec.config.reduce_axes, training=training, fast_variance=fast,
            mask=None if mask is None else xp.asarray(mask),
        )  # fmt: skip
        assert result.y.dtype == xp.float64
        for got, want in zip(result, (y_spec, spec.running_mean, spec.running_var)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("library", INSTALLED)
def test_core_with_sum_hook_on_library(library):
    """The all_sum hook receives arrays of the input's library (here: a fake
    two-replica group whose other member holds the same batch)."""
    xp, precision = LIBRARIES[library]()
    x = np.random.default_rng(1).normal(size=(4, 5, 3))
    with precision:
        calls = []

        def doubled(arrays):
            calls.append(len(arrays))
            return tuple(a * 2 for a in arrays)

        result = batch_norm(
            xp.asarray(x), xp.zeros(3, dtype=xp.float64), xp.ones(3, dtype=xp.float64),
            reduce_axes=(0, 1), momentum=0.0, all_sum=doubled,
        )  # fmt: skip
        assert calls == [2, 3]  # two rounds: the shift (sum of samples, replicas with data), then (count, S1, S2)
        n = 2 * 20  # the same batch twice: same mean and variance, twice the count
        np.testing.assert_allclose(
            np.asarray(result.running_var), x.reshape(-1, 3).var(axis=0) * n / (n - 1), rtol=1e-12
        )


@pytest.mark.parametrize("library", INSTALLED)
@pytest.mark.parametrize("fast", [False, True])
def test_core_with_gather_hook_on_library(library, fast):
    """The all_gather hook and combine_moments on each library (here: a fake
    two-replica group whose other member holds the same batch)."""
    xp, precision = LIBRARIES[library]()
    x = np.random.default_rng(2).normal(size=(4, 5, 3))
    with precision:
        calls = []

        def twice(arrays):
            calls.append(len(arrays))
            return tuple(xp.stack([a, a]) for a in arrays)

        result = batch_norm(
            xp.asarray(x), xp.zeros(3, dtype=xp.float64), xp.ones(3, dtype=xp.float64),
            reduce_axes=(0, 1), momentum=0.0, fast_variance=fast, all_gather=twice,
        )  # fmt: skip
        assert calls == [3 if fast else 4]  # one round: (count, sum, sum of squares) or (count, shift, S1, S2)
        n = 2 * 20
        flat = x.reshape(-1, 3)
        y_want = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
        np.testing.assert_allclose(np.asarray(result.y).reshape(-1, 3), y_want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(result.running_var), flat.var(axis=0) * n / (n - 1), rtol=1e-12)
