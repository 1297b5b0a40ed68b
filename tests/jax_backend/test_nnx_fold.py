"""``bn1d.backends.nnx_fold``: a Flax NNX batch norm folded into the layer before it.

The reference is the unfolded pair in float64, ``a (K x + b - mean) + bias``: the very
modules, their values cast exactly to float64, run under ``jax.enable_x64``. A folded
float32 layer computes ``fl(K') x + fl(b')`` with ``K' = K a``, ``b' = a b + bias - a mean``
rounded once from float64: each output is a dot product of ``k + 1`` terms (``k`` the
fan-in, ``prod(window) * in / groups`` for a convolution; the bias the last), so with ``u =
2**-24`` its error is at most ``(gamma_{k+1} + u) (sum |K'| |x| + |b'|)``, ``gamma_n = n u /
(1 - n u)`` (Higham, Accuracy and Stability, 3.1: any order of summation; the ``+ u`` is the
rounding of ``K'`` and ``b'``). That is the tolerance, computed per output by running the
folded layer with ``|K'|``, ``|b'|`` on ``|x|`` in float64, as the PyTorch tests do: a fold
on the wrong axis or with the wrong statistics or epsilon is off by O(1) of the output's
spread, far outside it.
"""

from __future__ import annotations

import os

_DEVICES = "--xla_force_host_platform_device_count=4"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from bn1d.backends import nnx as bn1d_nnx  # noqa: E402
from bn1d.backends.nnx_fold import Identity, fold_batchnorm, fold_model  # noqa: E402

# Under --jax-strict only the whole-model folds run: they call the layers under every strict
# mode, and the folds' arithmetic is NumPy's, the same in both envs (tests/conftest.py).
JAX_STRICT_RUNS = ("test_fold_model_folds_the_sequential_pairs",)

U = 2.0**-24

LAYERS = {  # the layer, the norm's options, the batch's shape; no zero padding (it would spread the means)
    "linear": (lambda r: nnx.Linear(64, 32, rngs=r), {}, (512, 64)),
    "conv1d": (lambda r: nnx.Conv(8, 16, (5,), padding="CIRCULAR", rngs=r), {}, (16, 48, 8)),
    "conv2d_groups": (
        lambda r: nnx.Conv(8, 16, (3, 3), padding="VALID", feature_group_count=2, rngs=r), {}, (8, 12, 12, 8),
    ),
    "conv2d_no_bias": (
        lambda r: nnx.Conv(4, 8, (3, 3), strides=2, padding="VALID", use_bias=False, rngs=r), {}, (8, 13, 13, 4),
    ),
    "linear_norm_without_scale_bias": (
        lambda r: nnx.Linear(48, 16, rngs=r), {"use_scale": False, "use_bias": False, "epsilon": 0.1}, (256, 48),
    ),
}  # fmt: skip


def float64(module):
    """``module`` with every value cast exactly to float64 (call it under ``jax.enable_x64``)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda v: jnp.asarray(np.asarray(v, np.float64)), state))


def run64(module, x):
    with jax.enable_x64(True):
        return np.asarray(float64(module)(jnp.asarray(np.asarray(x, np.float64))))


def pair(kind, ratio, norm_class=nnx.BatchNorm, seed=0):
    """A float32 layer and its batch norm in inference, the norm's statistics the exact
    (float64) ones of the layer's output on un-centred data, ``|mean| / std`` about
    ``ratio``: every weight of an output one sign, the inputs shifted; an input ``x``."""
    make_layer, norm_options, shape = LAYERS[kind]
    rngs = nnx.Rngs(seed)
    layer = make_layer(rngs)
    layer.kernel[...] = jnp.abs(layer.kernel[...])
    x = (jax.random.normal(jax.random.key(seed + 1), shape, jnp.float32) + ratio / 4).astype(jnp.float32)
    z = run64(layer, x).reshape(-1, layer.out_features)
    norm = norm_class(layer.out_features, use_running_average=True, rngs=rngs, **norm_options)
    norm.mean[...] = jnp.asarray(z.mean(0), jnp.float32)
    norm.var[...] = jnp.asarray(z.var(0), jnp.float32)
    generator = np.random.default_rng(seed)
    if norm.scale is not None:
        norm.scale[...] = jnp.asarray(generator.uniform(0.5, 2.0, layer.out_features), jnp.float32)
    if norm.bias is not None:
        norm.bias[...] = jnp.asarray(generator.uniform(-1.0, 1.0, layer.out_features), jnp.float32)
    return layer, norm, x


def reference(layer, norm, x):
    """The unfolded pair in float64."""
    with jax.enable_x64(True):
        return np.asarray(float64(norm)(float64(layer)(jnp.asarray(np.asarray(x, np.float64)))))


def bound(folded, x):
    """``(gamma_{k+1} + u) (|K'| |x| + |b'|)`` per output, in float64 (module docstring)."""
    absolute = nnx.clone(folded)
    absolute.kernel[...] = jnp.abs(absolute.kernel[...])
    absolute.bias[...] = jnp.abs(absolute.bias[...])
    k = folded.kernel[...][..., 0].size + 1
    return (k * U / (1 - k * U) + U) * run64(absolute, jnp.abs(x))


def values(module):
    return {"/".join(map(str, path)): np.array(v) for path, v in nnx.to_flat_state(nnx.state(module))}


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("ratio", [1.0, 1e2, 1e4])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_fold_is_the_float64_pair_within_the_dot_product_bound(kind, ratio):
    layer, norm, x = pair(kind, ratio)
    before = values(layer), values(norm)
    folded = fold_batchnorm(layer, norm)
    assert type(folded) is type(layer) and folded is not layer and folded.use_bias
    assert folded.kernel[...].dtype == jnp.float32 and folded.bias[...].dtype == jnp.float32
    error = np.abs(np.asarray(folded(x), np.float64) - reference(layer, norm, x))
    tolerance = bound(folded, x)
    assert (error <= tolerance).all(), float((error / tolerance).max())
    assert same(values(layer), before[0]) and same(values(norm), before[1]), "the layer or norm changed"
    assert layer.use_bias == (kind != "conv2d_no_bias")


@pytest.mark.parametrize("kind", ["linear", "conv2d_groups"])
def test_stock_and_bn1d_batch_norms_fold_alike(kind):
    layer, stock, x = pair(kind, 1e2)
    ours = bn1d_nnx.BatchNorm(stock.num_features, use_running_average=True, rngs=nnx.Rngs(0))
    nnx.update(ours, nnx.state(stock))
    a, b = fold_batchnorm(layer, stock), fold_batchnorm(layer, ours)
    assert np.array_equal(a.kernel[...], b.kernel[...]) and np.array_equal(a.bias[...], b.bias[...])


def test_errors_name_the_argument():
    layer, norm, _ = pair("linear", 1.0)
    rngs = nnx.Rngs(0)
    training = nnx.clone(norm)
    training.train()
    cases = [
        ((nnx.Dropout(0.5), norm), TypeError, r"^layer: expected a flax\.nnx\.Linear or Conv .*, got 'Dropout'$"),
        ((nnx.LoRALinear(64, 32, lora_rank=2, rngs=rngs), norm), TypeError, r"^layer: .*, got 'LoRALinear'$"),
        ((layer, nnx.LayerNorm(32, rngs=rngs)), TypeError,
         r"^norm: expected a flax\.nnx\.BatchNorm .*, got 'LayerNorm'$"),
        ((layer, bn1d_nnx.BatchNorm1d(32)), TypeError, r"^norm: .*, got 'BatchNorm1d'$"),
        ((layer, training), ValueError,
         r"^norm: expected a batch norm in inference mode .*, got 'use_running_average=False'$"),
        ((layer, nnx.BatchNorm(32, axis=0, use_running_average=True, rngs=rngs)), ValueError,
         r"^norm: expected axis=-1 \(the layer's output features, last in NNX\), got 'axis=0'$"),
        ((layer, nnx.BatchNorm(16, use_running_average=True, rngs=rngs)), ValueError,
         r"^norm: expected num_features=32 \(the layer's outputs\), got 16$"),
    ]  # fmt: skip
    for args, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            fold_batchnorm(*args)
    with pytest.raises(TypeError, match=r"^model: expected a flax\.nnx\.Module, got 'function'$"):
        fold_model(lambda x: x)
    model = nnx.Sequential(nnx.Linear(4, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs))
    with pytest.raises(ValueError, match=r"^model: expected a model in inference mode \(call model\.eval\(\) first\), "
                       r"got 'use_running_average=False at layers/1'$"):  # fmt: skip
        fold_model(model)


class Net(nnx.Module):
    """Pairs that fold inside (nested) ``nnx.Sequential``s; a pair of attributes and a batch
    norm on axis 0 (not the features) that do not."""

    def __init__(self, rngs):
        inner = nnx.Sequential(nnx.Conv(8, 8, (3, 3), feature_group_count=2, use_bias=False, rngs=rngs),
                               nnx.BatchNorm(8, rngs=rngs))  # fmt: skip
        self.body = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs), nnx.relu, inner)
        self.head = nnx.Linear(8, 6, rngs=rngs)
        self.head_norm = nnx.BatchNorm(6, rngs=rngs)
        self.tail = nnx.Sequential(nnx.Linear(6, 6, rngs=rngs), nnx.BatchNorm(6, axis=0, rngs=rngs))

    def __call__(self, x):
        h = nnx.relu(self.body(x)).mean((1, 2))
        return self.tail(self.head_norm(self.head(h)))


def trained(converted):
    """A ``Net`` trained on three un-centred batches (Flax's statistics: the same values either
    way), then in inference; ``converted``: its batch norms then made bn1d's drop-ins."""
    model = Net(nnx.Rngs(0))
    for seed in range(3):
        model(3 * jax.random.normal(jax.random.key(seed), (6, 8, 8, 3), jnp.float32) + 20)
    model.eval()
    return bn1d_nnx.replace_batchnorm(model) if converted else model


def norms(model):
    return sorted("/".join(map(str, path)) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm))


@pytest.mark.parametrize("converted", [False, True], ids=["stock", "bn1d"])
def test_fold_model_folds_the_sequential_pairs(converted):
    """Three float32 layers deep, fan-in <= 72, on inputs with ``|mean| / std`` about 7: each
    layer's error is within ``(gamma_73 + u) |K'| |x|`` (< 5e-6 of ``|K'| |x|``, a few times the
    outputs here), folded and unfolded alike; 1e-4 of the largest output covers three."""
    model = trained(converted)
    before = values(model)
    x = 3 * jax.random.normal(jax.random.key(9), (6, 8, 8, 3), jnp.float32) + 20
    folded = fold_model(model)
    assert norms(folded) == ["head_norm", "tail/layers/1"]
    assert isinstance(folded.body.layers[1], Identity) and isinstance(folded.body.layers[3].layers[1], Identity)
    assert norms(model) == ["body/layers/1", "body/layers/3/layers/1", "head_norm", "tail/layers/1"]
    expected = run64(model, x)
    np.testing.assert_allclose(folded(x), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(folded, x), folded(x), rtol=1e-6, atol=1e-6)
    assert same(values(model), before), "the model changed"


def test_stock_and_converted_models_fold_alike():
    assert same(values(fold_model(trained(False))), values(fold_model(trained(True))))
