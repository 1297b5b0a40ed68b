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

from bn1d import BatchNormConfig, Hooks, Layer, batch_norm
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
    # (axis, shape, feature_axis, masked, training, options)
    ((0, 1), (4, 5, 3), 2, False, True, {}),
    ((0, 1), (4, 5, 3), 2, True, True, {}),
    ((0, 1), (4, 5, 3), 2, True, True, {"fast_variance": True}),
    ((0, 2), (4, 3, 5), 1, True, True, {}),
    ((0,), (6, 3), 1, False, True, {"fast_variance": True}),
    ((0, 1), (4, 5, 3), 2, False, False, {}),
    ((0, 1), (4, 5, 3), 2, True, True, {"momentum": None}),
    ((0, 1), (4, 5, 3), 2, True, False, {"track_running_stats": False}),
    ((0, 2), (4, 3, 5), 1, False, True, {"unbiased_running_var": False}),
]


def _spec(c, axis, training, options, rng):
    """The NumPy backend in float64 with random parameters and running statistics."""
    scale, bias = rng.uniform(0.5, 2, c), rng.normal(size=c)
    spec = BatchNorm1d(
        c, axis=axis, dtype=np.float64, scale_initializer=scale, bias_initializer=bias,
        mode=None if training else "inference", **options,
    )  # fmt: skip
    stats = {"running_mean": rng.normal(size=c), "running_var": rng.uniform(1, 2, c), "num_batches_tracked": 3}
    spec.load_state_dict({**spec.state_dict(), **{k: v for k, v in stats.items() if k in spec.state}})
    return spec


@pytest.mark.parametrize("library", INSTALLED)
@pytest.mark.parametrize("axis, shape, feature_axis, masked, training, options", CASES)
def test_core_on_library_equals_numpy_backend(library, axis, shape, feature_axis, masked, training, options):
    """``batch_norm`` on the library's arrays, and ``bn1d.Layer`` over the library
    (no adapter), give the NumPy backend's results."""
    xp, precision = LIBRARIES[library]()
    rng = np.random.default_rng(0)
    c = shape[feature_axis]
    x = rng.normal(3.0, 2.0, shape)
    mask = rng.random(shape[:feature_axis] + shape[feature_axis + 1 :]) < 0.7 if masked else None
    spec = _spec(c, axis, training, options, rng)
    before = spec.state_dict()
    y_spec = spec(x, mask=mask)
    with precision:
        as_xp = lambda a: xp.asarray(a, dtype=xp.float64 if a.dtype.kind == "f" else None)  # noqa: E731
        params = {k: as_xp(v) for k, v in spec.params.items()}
        state = {k: as_xp(np.asarray(before[k])) for k in spec.state}
        xm = None if mask is None else xp.asarray(mask)
        y, new_state = batch_norm(as_xp(x), params, state, spec.config, training=training, mask=xm)
        assert y.dtype == xp.float64
        np.testing.assert_allclose(np.asarray(y), y_spec, rtol=1e-12, atol=1e-12)
        assert sorted(new_state) == sorted(spec.state)
        for key, value in new_state.items():
            np.testing.assert_allclose(np.asarray(value), spec.state[key], rtol=1e-12, atol=1e-12)
        layer = Layer(c, axis=axis, dtype=xp.float64, xp=xp, mode=None if training else "inference", **options)
        layer.load_state_dict(before)
        np.testing.assert_allclose(np.asarray(layer(as_xp(x), mask=xm)), y_spec, rtol=1e-12, atol=1e-12)
        for key, value in layer.state_dict().items():
            np.testing.assert_allclose(np.asarray(value), spec.state_dict()[key], rtol=1e-12, atol=1e-12)


def _two_replicas(xp):
    """A config and float64 state of 3 features for the hook tests."""
    config = BatchNormConfig.from_arguments(3, momentum=0.0)
    state = {"running_mean": xp.zeros(3, dtype=xp.float64), "running_var": xp.ones(3, dtype=xp.float64)}
    params = {"scale": xp.ones(3, dtype=xp.float64), "bias": xp.zeros(3, dtype=xp.float64)}
    return config, params, state


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

        config, params, state = _two_replicas(xp)
        _, new_state = batch_norm(xp.asarray(x), params, state, config, training=True, hooks=Hooks(all_sum=doubled))
        assert calls == [2, 3]  # two rounds: the shift (sum of samples, replicas with data), then (count, S1, S2)
        n = 2 * 20  # the same batch twice: same mean and variance, twice the count
        np.testing.assert_allclose(
            np.asarray(new_state["running_var"]), x.reshape(-1, 3).var(axis=0) * n / (n - 1), rtol=1e-12
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

        config, params, state = _two_replicas(xp)
        config = BatchNormConfig.from_arguments(3, momentum=0.0, fast_variance=fast)
        y, new_state = batch_norm(xp.asarray(x), params, state, config, training=True, hooks=Hooks(all_gather=twice))
        assert calls == [3 if fast else 4]  # one round: (count, sum, sum of squares) or (count, shift, S1, S2)
        n = 2 * 20
        flat = x.reshape(-1, 3)
        y_want = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
        np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), y_want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(new_state["running_var"]), flat.var(axis=0) * n / (n - 1), rtol=1e-12)
