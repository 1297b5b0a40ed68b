"""``bn1d.backends.equinox_fold``: an Equinox batch norm folded into the layer before it.

The reference is the unfolded pair in float64, ``a (W x + b - mean) + bias``: the very
modules and state, their floating values cast exactly to float64, run under
``jax.enable_x64``. A folded float32 layer computes ``fl(W') x + fl(b')`` with ``W' = a W``,
``b' = a b + bias - a mean`` rounded once from float64: each output is a dot product of ``k +
1`` terms (``k`` the fan-in, ``in / groups * prod(kernel)`` for a convolution; the bias the
last), so with ``u = 2**-24`` its error is at most ``(gamma_{k+1} + u) (sum |W'| |x| +
|b'|)``, ``gamma_n = n u / (1 - n u)`` (Higham, Accuracy and Stability, 3.1: any order of
summation; the ``+ u`` is the rounding of ``W'`` and ``b'``). That is the tolerance, computed
per output by running the folded layer with ``|W'|``, ``|b'|`` on ``|x|`` in float64, as the
PyTorch tests do: a fold on the wrong axis or with the wrong statistics or epsilon is off by
O(1) of the output's spread, far outside it.
"""

from __future__ import annotations

import os

_DEVICES = "--xla_force_host_platform_device_count=4"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bn1d.backends import equinox as bn1d_eqx  # noqa: E402
from bn1d.backends.equinox_fold import fold_batchnorm, fold_model  # noqa: E402

# Under --jax-strict only the whole-model folds run: they call the layers under every strict
# mode, and the folds' arithmetic is NumPy's, the same in both envs (tests/conftest.py).
JAX_STRICT_RUNS = ("test_fold_model_folds_the_sequential_pairs",)

U = 2.0**-24
F32 = jnp.float32
KEY = jax.random.key(0)

LAYERS = {  # the layer, the norm's options, the batch's shape; no zero padding (it would spread the means)
    "linear": (lambda: eqx.nn.Linear(64, 32, dtype=F32, key=KEY), {}, (512, 64)),
    "conv1d_batch_mode": (lambda: eqx.nn.Conv1d(8, 16, 5, padding=2, padding_mode="CIRCULAR", dtype=F32,
                                                         key=KEY), {"mode": "batch"},
                          (16, 8, 48)),
    "conv2d_groups": (lambda: eqx.nn.Conv2d(8, 16, 3, groups=2, dtype=F32, key=KEY), {}, (8, 8, 12, 12)),
    "conv2d_no_bias": (lambda: eqx.nn.Conv(2, 4, 8, 3, stride=2, use_bias=False, dtype=F32, key=KEY), {},
                       (8, 4, 13, 13)),
    "linear_norm_without_affine": (lambda: eqx.nn.Linear(48, 16, dtype=F32, key=KEY),
                                   {"channelwise_affine": False, "eps": 0.1}, (256, 48)),
}  # fmt: skip


def float64(tree):
    """``tree`` with every floating array cast exactly to float64 (use under ``jax.enable_x64``)."""
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)) if eqx.is_inexact_array(a) else a, tree)


def apply(layers, x, state):
    """``layers`` (a layer or batch norm, or a list of them) on the batch ``x``, one example per lane."""
    for layer in layers if isinstance(layers, list) else [layers]:
        if isinstance(layer, eqx.nn.StatefulLayer):
            x = jax.vmap(layer, in_axes=(0, None), out_axes=(0, None))(x, state)[0]
        else:
            x = jax.vmap(layer)(x)
    return x


def run64(layers, x, state=None):
    with jax.enable_x64(True):
        return np.asarray(apply(float64(layers), jnp.asarray(np.asarray(x, np.float64)), float64(state)))


def pair(kind, ratio, norm_class=eqx.nn.BatchNorm, seed=0):
    """A float32 layer and its batch norm in inference, with its state, the statistics the
    exact (float64) ones of the layer's output on un-centred data, ``|mean| / std`` about
    ``ratio``: every weight of an output one sign, the inputs shifted; an input ``x``. Mode
    ``"batch"`` holds them zero-biased after 3 updates, ``hidden = stat (1 - 0.99**3)``."""
    make_layer, options, shape = LAYERS[kind]
    layer = make_layer()
    layer = eqx.tree_at(lambda m: m.weight, layer, jnp.abs(layer.weight))
    x = (jax.random.normal(jax.random.key(seed + 1), shape, F32) + ratio / 4).astype(F32)
    z = np.moveaxis(run64(layer, x), 1, -1)
    channels = z.shape[-1]
    z = z.reshape(-1, channels)
    options = {"mode": "ema", "inference": True, "dtype": F32, **options}
    norm, state = eqx.nn.make_with_state(norm_class)(channels, "batch", **options)
    if norm.mode == "ema":
        state = state.set(norm.ema_state_index, (jnp.asarray(z.mean(0), F32), jnp.asarray(z.var(0), F32)))
    else:
        hidden = 1 - 0.99**3
        state = state.set(norm.batch_counter, state.get(norm.batch_counter) + 3)
        state = state.set(norm.batch_state_index, (jnp.asarray(z.mean(0) * hidden, F32),
                                                   jnp.asarray(z.var(0) * hidden, F32)))  # fmt: skip
    if norm.channelwise_affine:
        generator = np.random.default_rng(seed)
        affine = (jnp.asarray(generator.uniform(0.5, 2.0, channels), F32),
                  jnp.asarray(generator.uniform(-1.0, 1.0, channels), F32))  # fmt: skip
        norm = eqx.tree_at(lambda n: (n.weight, n.bias), norm, affine)
    return layer, norm, state, x


def bound(folded, x):
    """``(gamma_{k+1} + u) (|W'| |x| + |b'|)`` per output, in float64 (module docstring)."""
    absolute = eqx.tree_at(lambda m: (m.weight, m.bias), folded, (jnp.abs(folded.weight), jnp.abs(folded.bias)))
    k = folded.weight[0].size + 1
    return (k * U / (1 - k * U) + U) * run64(absolute, np.abs(x))


def same(a, b):
    """The same leaves, equal (the classes may differ: stock and bn1d batch norms)."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(np.array_equal(p, q) for p, q in zip(leaves_a, leaves_b))


@pytest.mark.parametrize("ratio", [1.0, 1e2, 1e4])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_fold_is_the_float64_pair_within_the_dot_product_bound(kind, ratio):
    layer, norm, state, x = pair(kind, ratio)
    folded = fold_batchnorm(layer, norm, state)
    assert type(folded) is type(layer) and folded.use_bias
    assert folded.bias.shape == (folded.weight.shape[0],) + (1,) * (folded.weight.ndim - 2)
    assert folded.weight.dtype == F32 and folded.bias.dtype == F32
    error = np.abs(np.asarray(apply(folded, x, None), np.float64) - run64([layer, norm], x, state))
    tolerance = bound(folded, x)
    assert (error <= tolerance).all(), float((error / tolerance).max())


@pytest.mark.parametrize("kind", ["linear", "conv1d_batch_mode"])
def test_stock_and_bn1d_batch_norms_fold_alike(kind):
    layer, stock, state, x = pair(kind, 1e2)
    ours = bn1d_eqx.replace_batchnorm(stock)
    assert type(ours) is bn1d_eqx.BatchNorm
    assert same(fold_batchnorm(layer, stock, state), fold_batchnorm(layer, ours, state))


def test_errors_name_the_argument():
    layer, norm, state, _ = pair("linear", 1.0)

    class Subclass(eqx.nn.Linear):
        pass

    cases = [
        ((eqx.nn.Identity(), norm, state), TypeError,
         r"^layer: expected an equinox\.nn\.Linear or Conv.*, got 'Identity'$"),
        ((eqx.nn.ConvTranspose1d(64, 32, 1, key=KEY), norm, state), TypeError, r"^layer: .*, got 'ConvTranspose1d'$"),
        ((Subclass(64, 32, use_bias=False, key=KEY), norm, state), TypeError,
         r"^layer: expected a layer with a bias, or a stock Linear/Conv \(rebuilt with one\), got 'Subclass'$"),
        ((layer, eqx.nn.LayerNorm(32), state), TypeError,
         r"^norm: expected an equinox\.nn\.BatchNorm .*, got 'LayerNorm'$"),
        ((layer, bn1d_eqx.BatchNorm1d(32), state), TypeError, r"^norm: .*, got 'BatchNorm1d'$"),
        ((layer, eqx.nn.inference_mode(norm, False), state), ValueError,
         r"^norm: expected a batch norm in inference mode .*, got 'inference=False'$"),
        ((layer, eqx.nn.BatchNorm(16, "batch", mode="batch", inference=True), state), ValueError,
         r"^norm: expected input_size=32 \(the layer's outputs\), got 16$"),
    ]  # fmt: skip
    for args, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            fold_batchnorm(*args)
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([layer, eqx.nn.BatchNorm(32, "batch", mode="batch")])
    with pytest.raises(TypeError, match=r"^state: expected an equinox\.nn\.State, got 'dict'$"):
        fold_model(model, {})
    with pytest.raises(ValueError, match=r"^model: expected a model in inference mode \(call eqx\.nn\.inference_mode"
                       r"\(model\) first\), got 'inference=False at layer 1'$"):  # fmt: skip
        fold_model(model, state)


class Net(eqx.Module):
    """Pairs that fold inside (nested) ``eqx.nn.Sequential``s; a pair of fields and a batch norm
    after an activation that do not."""

    body: eqx.nn.Sequential
    head: eqx.nn.Linear
    head_norm: eqx.nn.BatchNorm
    tail: eqx.nn.Sequential

    def __init__(self, key):
        k = jax.random.split(key, 4)
        inner = eqx.nn.Sequential([eqx.nn.Conv2d(8, 8, 3, groups=2, use_bias=False, dtype=F32, key=k[0]),
                                   eqx.nn.BatchNorm(8, "batch", mode="batch", dtype=F32)])  # fmt: skip
        self.body = eqx.nn.Sequential([eqx.nn.Conv2d(3, 8, 3, dtype=F32, key=k[1]),
                                       eqx.nn.BatchNorm(8, "batch", mode="batch", dtype=F32),
                                       eqx.nn.Lambda(jax.nn.relu), inner])  # fmt: skip
        self.head = eqx.nn.Linear(8, 6, dtype=F32, key=k[2])
        self.head_norm = eqx.nn.BatchNorm(6, "batch", mode="batch", dtype=F32)
        self.tail = eqx.nn.Sequential([eqx.nn.Linear(6, 6, dtype=F32, key=k[3]), eqx.nn.Lambda(jax.nn.relu),
                                       eqx.nn.BatchNorm(6, "batch", mode="batch", dtype=F32)])  # fmt: skip

    def __call__(self, x, state):
        h, state = self.body(x, state)
        h, state = self.head_norm(self.head(jax.nn.relu(h).mean((1, 2))), state)
        return self.tail(h, state)


def trained(converted):
    """A ``Net`` trained on three un-centred batches (Equinox's statistics: the same values
    either way), then in inference; ``converted``: its batch norms then made bn1d's drop-ins."""
    model, state = eqx.nn.make_with_state(Net)(KEY)
    step = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    for seed in range(3):
        _, state = step(3 * jax.random.normal(jax.random.key(seed), (6, 3, 8, 8), F32) + 20, state)
    model = eqx.nn.inference_mode(model)
    return (bn1d_eqx.replace_batchnorm(model) if converted else model), state


def norms(model):
    paths = jax.tree_util.tree_flatten_with_path(model, is_leaf=lambda n: isinstance(n, eqx.nn.BatchNorm))[0]
    return sorted(jax.tree_util.keystr(path) for path, leaf in paths if isinstance(leaf, eqx.nn.BatchNorm))


def call(model, x, state):
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(x, state)[0]


@pytest.mark.parametrize("converted", [False, True], ids=["stock", "bn1d"])
def test_fold_model_folds_the_sequential_pairs(converted):
    """Three float32 layers deep, fan-in <= 72, on inputs with ``|mean| / std`` about 7: each
    layer's error is within ``(gamma_73 + u) |W'| |x|`` (< 5e-6 of ``|W'| |x|``, a few times the
    outputs here), folded and unfolded alike; 1e-4 of the largest output covers three."""
    model, state = trained(converted)
    kept = jax.tree.map(np.array, (model, state))
    x = 3 * jax.random.normal(jax.random.key(9), (6, 3, 8, 8), F32) + 20
    folded, folded_state = fold_model(model, state)
    assert norms(folded) == [".head_norm", ".tail.layers[2]"]
    assert isinstance(folded.body.layers[1], eqx.nn.Identity)
    assert isinstance(folded.body.layers[3].layers[1], eqx.nn.Identity)
    assert (
        len(jax.tree.leaves(folded_state)) == len(jax.tree.leaves(state)) - 6
    )  # two norms: count, hidden mean and var
    with jax.enable_x64(True):
        expected = np.asarray(call(float64(model), jnp.asarray(np.asarray(x, np.float64)), float64(state)))
    np.testing.assert_allclose(call(folded, x, folded_state), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert jax.tree.structure(kept) == jax.tree.structure((model, state)) and same((model, state), kept), "changed"


def test_stock_and_converted_models_fold_alike():
    assert same(fold_model(*trained(False)), fold_model(*trained(True)))
