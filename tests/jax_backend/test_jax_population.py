"""``bn1d.backends.jax_population`` on Flax NNX, Flax linen and Equinox models (stock and
bn1d's layers) and on bn1d's BrainPy-signature layers, against the float64 statistics of each
batch norm's inputs, concatenated.

Each layer's inputs are captured by the test models themselves (a list, linen's ``sow``,
Equinox outputs) on a separate training-mode pass of an identical model, not by the
library's capture. The bound is R2.7's for float32 input: the mean within ``1e-5 * sigma``
and the variance within 1e-5 relative, beyond one ulp of the stored float32 statistic
(R2.7 exempts the storage: at ``|mean| / sigma = 1e4`` an ulp of the mean is ~1e-3 sigma).
The recomputation sums in float64 and merges ``log2(B)`` times (relative roundings of
~1e-16 each), so the only visible rounding is the float32 storage, half an ulp: the bound
holds with orders of margin.
"""

from __future__ import annotations

import os
import tempfile

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bn1d.backends import equinox as bn1d_equinox
from bn1d.backends import jax as jax_backend
from bn1d.backends import linen as bn1d_linen
from bn1d.backends import nnx as bn1d_nnx
from bn1d.backends import numpy as numpy_backend
from bn1d.backends.jax_population import (
    recompute_equinox_statistics,
    recompute_layer_statistics,
    recompute_linen_statistics,
    recompute_statistics,
)

RULE = 1e-5
SEEN: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None  # (layer, input, mask) when recording


#: Under ``--jax-strict`` (tests/conftest.py): each framework's capture of the inputs, masks,
#: errors and in-place writes under the strict modes. The pooled statistics at ~2**17 values
#: per feature (40 s and 11 s there) are NumPy float64 arithmetic, the same in both envs;
#: the tox env ``jax`` runs every test.
JAX_STRICT_RUNS = (
    "test_nnx_masks_keep_their_positions_only",
    "test_nnx_nothing_else_changes",
    "test_nnx_errors_name_the_argument_and_change_nothing",
    "test_linen_a_layer_built_in_inference_names_apply_kwargs",
    "test_equinox_per_example_layers_get_the_pooled_statistics_of_the_batch",
    "test_equinox_errors_name_the_argument",
    "test_bn1d_layers_one_given_its_inputs_and_a_plain_python_model",
    "test_bn1d_layer_errors_name_the_argument_and_change_nothing",
    "test_jax_layer_with_jnp_inputs",
)


def seen(name, x, mask=None):
    if SEEN is not None:
        SEEN.append((name, np.asarray(x), None if mask is None else np.asarray(mask)))


def data(sizes, length=8, ratio=1e4, seed=0, features=4):
    """Uneven batches ``(n, length, features)`` whose means drift (the spread between them is
    part of the variance), ``|mean| / std`` up to ``ratio``."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, length, features)) + ratio + 0.5 * i).astype(np.float32)
            for i, n in enumerate(sizes)]  # fmt: skip


def reference(inputs, feature_axis=-1):
    """float64 mean and unbiased variance per feature of the kept rows of every input."""
    rows = []
    for x, mask in inputs:
        x = np.moveaxis(np.asarray(x, np.float64), feature_axis, -1)
        rows.append(x.reshape(-1, x.shape[-1]) if mask is None else x[np.broadcast_to(mask, x.shape[:-1])])
    rows = np.concatenate(rows)
    return rows.mean(axis=0), rows.var(axis=0, ddof=1)


def by_layer(records, feature_axes=None):
    names = dict.fromkeys(name for name, _, _ in records)
    axes = feature_axes or {}
    return {name: reference([(x, m) for n, x, m in records if n == name], axes.get(name, -1)) for name in names}


def assert_statistics(mean, var, expected, what="", storage=(0.0, 0.0)):
    """R2.7 beyond one ulp of the stored float32 statistics (``storage``: more where what is
    stored is another value, as Equinox's scaled average)."""
    ref_mean, ref_var = expected
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    ulp_mean = np.spacing(np.abs(ref_mean).astype(np.float32)) + storage[0]
    ulp_var = np.spacing(ref_var.astype(np.float32)) + storage[1]
    assert np.all(np.abs(mean - ref_mean) <= RULE * np.sqrt(ref_var) + ulp_mean), (what, mean - ref_mean)
    assert np.all(np.abs(var - ref_var) <= RULE * ref_var + ulp_var), (what, var / ref_var - 1)


# -- Flax NNX ----------------------------------------------------------------------------------
class NNXNet(nnx.Module):
    """A batch norm on the raw data (features last), a linear map, another batch norm (masked
    when the batch carries a mask), dropout. ``kind``: stock Flax, bn1d's drop-in, or bn1d's
    BrainPy-signature ``BatchNorm1d`` for the second."""

    def __init__(self, kind="stock", features=4):
        rngs = nnx.Rngs(0)
        norm = bn1d_nnx.BatchNorm if kind == "dropin" else nnx.BatchNorm
        self.norm0 = norm(features, rngs=rngs)
        self.linear = nnx.Linear(features, 6, rngs=rngs)
        self.norm1 = bn1d_nnx.BatchNorm1d(6) if kind == "brainpy" else norm(6, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.brainpy = kind == "brainpy"

    def __call__(self, batch):
        x, mask = batch if isinstance(batch, tuple) else (batch, None)
        seen("norm0", x)
        h = self.linear(self.norm0(x))
        seen("norm1", h, mask)
        if mask is None:
            h = self.norm1(h)
        else:
            h = self.norm1(h, mask) if self.brainpy else self.norm1(h, mask=mask[..., None])  # Flax: broadcastable
        return self.dropout(h)


def nnx_reference(kind, batches):
    """Each batch norm's inputs on a training-mode pass of a fresh identical model."""
    global SEEN
    model, SEEN = NNXNet(kind), []
    model.eval()  # the dropout off, the batch norms training
    model.norm0.use_running_average = model.norm1.use_running_average = False
    try:
        for batch in batches:
            model(batch)
        return by_layer(SEEN)
    finally:
        SEEN = None


def test_nnx_stock_and_bn1d_layers_get_the_pooled_statistics_of_their_inputs():
    """Stock ``nnx.BatchNorm``, bn1d's drop-in and ``BatchNorm1d``: ~2**17 values per feature
    for the first layer (``|mean| / std`` = 1e4, 24 uneven batches of 3 to 200 rows of 64
    positions, drifting means), each layer against its own inputs; the first layer's inputs
    are the raw data, so its statistics are the same bits for every kind."""
    sizes = np.random.default_rng(1).permutation(np.repeat([3, 200, 57, 131, 9, 176], 4))  # few shapes: compiles
    batches = data(sizes, length=64)
    assert 2**17 < sum(sizes) * 64 < 2**18
    first = {}
    for kind in ("stock", "dropin", "brainpy"):
        expected = nnx_reference(kind, batches)
        model = NNXNet(kind)
        model.eval()
        assert recompute_statistics(model, batches) is model
        for name in ("norm0", "norm1"):
            layer = getattr(model, name)
            assert_statistics(layer.mean[...], layer.var[...], expected[name], (kind, name))
        first[kind] = (np.asarray(model.norm0.mean[...]), np.asarray(model.norm0.var[...]))
    for kind in ("dropin", "brainpy"):
        np.testing.assert_array_equal(first[kind][0], first["stock"][0])
        np.testing.assert_array_equal(first[kind][1], first["stock"][1])


@pytest.mark.parametrize("kind", ["stock", "brainpy"])
def test_nnx_masks_keep_their_positions_only(kind):
    """A Flax mask (broadcastable to the input) on the stock layer, bn1d's (the input's shape
    without the feature axis) on ``BatchNorm1d``; batches carry ``(x, mask)``."""
    rng = np.random.default_rng(2)
    batches = [(x, rng.random(x.shape[:-1]) < 0.6) for x in data([5, 40, 9], ratio=100.0)]
    expected = nnx_reference(kind, batches)
    model = NNXNet(kind)
    recompute_statistics(model, batches, input=lambda batch: batch)
    assert_statistics(model.norm1.mean[...], model.norm1.var[...], expected["norm1"], kind)


def flat(model, kind):
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, kind)))
    return {jax.tree_util.keystr(path): np.asarray(value) for path, value in leaves}


def test_nnx_nothing_else_changes():
    """Parameters, the dropout's RNG count and the other statistics bitwise, every mode flag
    (mixed), the layers' classes and attributes are as they were; only the statistics change.
    A layer the model holds in inference is recomputed in training."""
    model = NNXNet("brainpy", features=3)
    model.train()
    model.norm0.use_running_average = True  # mixed modes, dropout in training
    before = {kind: flat(model, kind) for kind in (nnx.Param, nnx.BatchStat, nnx.RngCount)}
    attributes = {name: set(vars(getattr(model, name))) for name in ("norm0", "norm1")}
    recompute_statistics(model, data([4, 6], features=3))
    for kind, values in before.items():
        for path, value in flat(model, kind).items():
            assert np.array_equal(value, values[path]) != path.endswith(("['mean']", "['var']")), path
    assert (model.norm0.use_running_average, model.norm1.use_running_average, model.dropout.deterministic) == (
        True, False, False
    )  # fmt: skip
    assert type(model.norm0) is nnx.BatchNorm and type(model.norm1) is bn1d_nnx.BatchNorm1d
    assert {name: set(vars(getattr(model, name))) for name in attributes} == attributes


def test_nnx_a_model_that_jits_inside_and_a_limit_and_progress():
    """The layers called inside ``nnx.jit`` record through a callback; ``limit`` pools the
    first batches only; ``progress`` is called after each; ``True`` is a tqdm bar."""

    class Jitted(nnx.Module):
        def __init__(self):
            self.net = NNXNet("dropin")

        def __call__(self, x):
            return nnx.jit(lambda net, x: net(x))(self.net, x)

    batches = data([7, 30, 11, 5], ratio=10.0)
    expected = nnx_reference("dropin", batches[:2])
    model, done = Jitted(), []
    recompute_statistics(model, batches, limit=2, progress=done.append)
    assert done == [1, 2]
    for name in ("norm0", "norm1"):
        layer = getattr(model.net, name)
        assert_statistics(layer.mean[...], layer.var[...], expected[name], name)
    recompute_statistics(NNXNet(), [(x, "label") for x in batches[:1]], progress=True)


def test_nnx_errors_name_the_argument_and_change_nothing():
    model = NNXNet()
    before = flat(model, nnx.BatchStat)
    batches = data([4, 4])
    for call, exception, pattern in (
        (lambda: recompute_statistics("net", batches), TypeError, r"^model: expected a flax\.nnx\.Module"),
        (lambda: recompute_statistics(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), batches), ValueError,
         r"^model: expected a model holding batch norms"),
        (lambda: recompute_statistics(model, batches, limit=0), ValueError, r"^limit: expected None or a positive"),
        (lambda: recompute_statistics(model, batches, progress="yes"), TypeError, r"^progress: expected a bool"),
        (lambda: recompute_statistics(model, batches, input=3), TypeError, r"^input: expected None or a callable"),
        (lambda: recompute_statistics(model, 5), TypeError, r"^batches: expected an iterable"),
        (lambda: recompute_statistics(model, []), ValueError, r"^batches: expected at least one batch"),
        (lambda: recompute_statistics(model, [{"x": x} for x in batches]), TypeError,
         r"^batches: expected arrays or \(input, \.\.\.\) tuples; pass input="),
        (lambda: recompute_statistics(model, batches + [np.ones((3, 8, 5), np.float32)]), TypeError,
         r"incompatible shapes"),  # Flax's own error, mid-pass: the model restored
    ):  # fmt: skip
        with pytest.raises(exception, match=pattern):
            call()
        assert all(np.array_equal(value, before[path]) for path, value in flat(model, nnx.BatchStat).items())
        assert type(model.norm0) is nnx.BatchNorm and "_bn1d_population_site" not in vars(model.norm0)


# -- Flax linen --------------------------------------------------------------------------------
class LinenNet(nn.Module):
    """The NNX net's layers in linen: each batch norm's input sown into ``intermediates``."""

    kind: str = "stock"

    @nn.compact
    def __call__(self, x, train=False):
        norm = bn1d_linen.BatchNorm if self.kind == "dropin" else nn.BatchNorm
        self.sow("intermediates", "input0", x)
        h = nn.Dense(6)(norm(use_running_average=not train, name="norm0")(x))
        self.sow("intermediates", "input1", h)
        if self.kind == "brainpy":
            return bn1d_linen.BatchNorm1d(6, name="norm1")(h)
        return norm(use_running_average=not train, name="norm1")(h)


def test_linen_stock_and_bn1d_layers_get_the_pooled_statistics_and_nothing_else_changes():
    batches = data([3, 57, 200, 12], seed=3)
    for kind in ("stock", "dropin", "brainpy"):
        module = LinenNet(kind)
        variables = module.init(jax.random.key(0), batches[0])
        sown = [module.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])[1]["intermediates"]
                for x in batches]  # fmt: skip
        expected = {f"norm{i}": reference([(s[f"input{i}"][0], None) for s in sown]) for i in (0, 1)}
        kept = jax.tree.map(np.asarray, variables)
        new = recompute_linen_statistics(module, variables, batches, apply_kwargs={"train": True})
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables), kept)  # not changed
        assert new["params"] is variables["params"]
        for name in ("norm0", "norm1"):
            stats = new["batch_stats"][name]
            assert_statistics(stats["mean"], stats["var"], expected[name], (kind, name))
        assert jax.tree.structure(new) == jax.tree.structure(variables)


def test_linen_a_layer_built_in_inference_names_apply_kwargs():
    module = LinenNet()
    variables = module.init(jax.random.key(0), data([2])[0])
    with pytest.raises(ValueError, match=r"^apply_kwargs: expected arguments under which every batch norm trains"):
        recompute_linen_statistics(module, variables, data([4]))
    for call, exception, pattern in (
        (lambda: recompute_linen_statistics("net", variables, data([4])), TypeError, r"^module: expected"),
        (lambda: recompute_linen_statistics(module, {"params": {}}, data([4])), ValueError,
         r"^variables: expected a mapping of variable collections with batch_stats"),
        (lambda: recompute_linen_statistics(module, variables, data([4]), apply_kwargs=[1]), TypeError,
         r"^apply_kwargs: expected None or a mapping"),
    ):  # fmt: skip
        with pytest.raises(exception, match=pattern):
            call()


# -- Equinox -----------------------------------------------------------------------------------
class EqxNet(eqx.Module):
    """One example ``(C, L)`` per vmap lane: a batch norm on the raw data, a 1x1 convolution,
    another batch norm; returns each batch norm's input too (the test's capture)."""

    norm0: eqx.Module
    conv: eqx.nn.Conv1d
    norm1: eqx.Module

    def __init__(self, kind="stock", mode="batch"):
        def norm(c):
            if kind == "brainpy":  # bn1d's layout for Equinox's: features on axis 1, reduced over (0, 2)
                return bn1d_equinox.BatchNorm1d(c, axis=(0, 2), axis_name="batch")
            norm = bn1d_equinox.BatchNorm if kind == "dropin" else eqx.nn.BatchNorm
            return norm(c, "batch", mode=mode, dtype=jnp.float32)  # float32 under jax_enable_x64 too

        self.norm0, self.norm1 = norm(4), norm(6)
        self.conv = eqx.nn.Conv1d(4, 6, 1, key=jax.random.key(0), dtype=jnp.float32)

    def __call__(self, x, state):
        h, state = self.norm0(x, state)
        h = self.conv(h)
        y, state = self.norm1(h, state)
        return y, state, (x, h)


def channel_first(batches):
    return [np.swapaxes(x, 1, 2) for x in batches]  # (n, C, L)


@eqx.filter_jit
def vmapped(model, x, state):
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None, 0), axis_name="batch")(x, state)


def eqx_reference(kind, batches, mode="batch"):
    model, state = eqx.nn.make_with_state(EqxNet)(kind, mode)
    inputs = [vmapped(model, x, state)[2] for x in batches]
    return [reference([(np.asarray(i[k]), None) for i in inputs], feature_axis=1) for k in (0, 1)]


@pytest.mark.parametrize("kind", ["stock", "dropin", "brainpy"])
def test_equinox_per_example_layers_get_the_pooled_statistics_of_the_batch(kind):
    """Each lane's example gathered into the batch: the statistics of the whole batches, in
    ``mode="batch"`` (the hidden average scaled so that inference's debiasing gives them,
    after a training step made the count 1) and bn1d's layer; ``state`` stays valid."""
    batches = channel_first(data([3, 64, 17, 120], seed=4, ratio=1e3))
    expected = eqx_reference(kind, batches)
    model, state = eqx.nn.make_with_state(EqxNet)(kind)
    state = vmapped(model, batches[0], state)[1]  # a training step: the count 1
    new = recompute_equinox_statistics(model, state, batches)
    for layer, want in zip((model.norm0, model.norm1), expected):
        storage = (0.0, 0.0)
        if kind == "brainpy":
            values = new.get(layer.state_index)
            mean, var = values["running_mean"], values["running_var"]
        else:
            count, (mean, var) = new.get(layer.batch_counter), new.get(layer.batch_state_index)
            assert count == state.get(layer.batch_counter) == 1
            scale = np.asarray(jnp.where(count == 0, 1, 1 - layer.momentum**count))  # Equinox's inference divides
            mean, var = np.asarray(mean), np.asarray(var)
            storage = (np.spacing(np.abs(mean)) / scale, np.spacing(var) / scale)  # an ulp of the stored average
            mean, var = mean / scale, var / scale
        assert_statistics(mean, var, want, kind, storage)
    jax.tree.map(np.testing.assert_array_equal, state, jax.tree.map(lambda v: v, state))  # still valid


def test_equinox_ema_mode_under_filter_jit_with_a_limit():
    """``mode="ema"``: the average itself; an ``apply`` under ``eqx.filter_jit`` records
    through the callback; ``limit`` pools the first batches only."""
    batches = channel_first(data([9, 33, 5], seed=5, ratio=50.0))
    expected = eqx_reference("stock", batches[:2], mode="ema")
    model, state = eqx.nn.make_with_state(EqxNet)("stock", "ema")
    run = eqx.filter_jit(lambda model, state, x: jax.vmap(model, in_axes=(0, None), axis_name="batch")(x, state))
    new = recompute_equinox_statistics(model, state, batches, apply=run, limit=2)
    for layer, want in zip((model.norm0, model.norm1), expected):
        assert_statistics(*new.get(layer.ema_state_index), want, "ema")
        assert bool(new.get(layer.ema_first_time_index)) is True  # as it was


def test_equinox_errors_name_the_argument():
    model, state = eqx.nn.make_with_state(EqxNet)()
    batches = channel_first(data([4]))
    for call, exception, pattern in (
        (lambda: recompute_equinox_statistics("net", state, batches), TypeError, r"^model: expected an equinox"),
        (lambda: recompute_equinox_statistics(model, {}, batches), TypeError, r"^state: expected an equinox\.nn"),
        (lambda: recompute_equinox_statistics(model, state, batches, apply=1), TypeError, r"^apply: expected None"),
        (lambda: recompute_equinox_statistics(eqx.nn.Linear(2, 2, key=jax.random.key(0)), state, batches),
         ValueError, r"^model: expected a model holding batch norms"),
        (lambda: recompute_equinox_statistics(model, state, [], limit=None), ValueError, r"^batches: expected at"),
    ):  # fmt: skip
        with pytest.raises(exception, match=pattern):
            call()


# -- bn1d's BrainPy-signature layers -----------------------------------------------------------
@pytest.mark.parametrize("backend", [numpy_backend, jax_backend])
def test_bn1d_layers_one_given_its_inputs_and_a_plain_python_model(backend):
    """One layer over its own input batches (masked through ``forward``), and two layers in a
    plain Python model; the pass's state updates undone, ``training`` as it was."""
    rng = np.random.default_rng(6)
    batches = data([3, 50, 7], ratio=1e4, seed=6)
    masks = [rng.random(x.shape[:-1]) < 0.7 for x in batches]
    layer = backend.BatchNorm1d(4)
    layer.eval()
    recompute_layer_statistics(layer, list(zip(batches, masks)), forward=lambda b: layer(*b), input=lambda b: b)
    assert_statistics(layer.running_mean, layer.running_var, reference(list(zip(batches, masks))), backend)
    assert not layer.training and type(layer) is backend.BatchNorm1d

    weight = rng.standard_normal((4, 3)).astype(np.float32)

    def model(first, second, x):
        seen("first", x)
        h = np.asarray(first(x)) @ weight
        seen("second", h)
        return second(h)

    global SEEN
    SEEN, fresh = [], (backend.BatchNorm1d(4), backend.BatchNorm1d(3))
    try:
        for x in batches:
            model(*fresh, x)
        expected = by_layer(SEEN)
    finally:
        SEEN = None
    layers = [backend.BatchNorm1d(4), backend.BatchNorm1d(3, unbiased_running_var=False)]
    recompute_layer_statistics(layers, batches, forward=lambda x: model(*layers, x))
    assert_statistics(layers[0].running_mean, layers[0].running_var, expected["first"], "first")
    n = sum(x.shape[0] * x.shape[1] for x in batches)
    biased = (expected["second"][0], expected["second"][1] * (n - 1) / n)  # R3.4: the layer's own choice
    assert_statistics(layers[1].running_mean, layers[1].running_var, biased, "second")


def test_bn1d_layer_errors_name_the_argument_and_change_nothing():
    layer = numpy_backend.BatchNorm1d(4)
    state = {k: np.array(v) for k, v in layer.state.items()}
    for call, exception, pattern in (
        (lambda: recompute_layer_statistics("layer", data([3])), TypeError, r"^layers: expected a bn1d Layer"),
        (lambda: recompute_layer_statistics([layer, layer], data([3])), TypeError, r"^forward: expected a callable"),
        (lambda: recompute_layer_statistics(layer, data([3]), forward=2), TypeError, r"^forward: expected None"),
        (lambda: recompute_layer_statistics(numpy_backend.BatchNorm1d(4, track_running_stats=False), data([3])),
         ValueError, r"^layers: expected layers with running statistics"),
        (lambda: recompute_layer_statistics(layer, data([3]) + [np.ones((2, 2, 5), np.float32)]), ValueError, r"x"),
    ):  # fmt: skip
        with pytest.raises(exception, match=pattern):
            call()
        for key, value in layer.state.items():
            np.testing.assert_array_equal(value, state[key])
        assert type(layer) is numpy_backend.BatchNorm1d and layer.training


def test_jax_layer_with_jnp_inputs():
    """JAX arrays in, float64 accumulation on the host whether or not x64 is on."""
    batches = [jnp.asarray(x) for x in data([6, 13], ratio=1e4, seed=7)]
    layer = jax_backend.BatchNorm1d(4)
    recompute_layer_statistics(layer, batches)
    assert_statistics(layer.running_mean, layer.running_var, reference([(np.asarray(x), None) for x in batches]))
    assert layer.running_mean.dtype == jnp.float32


# -- several JAX processes -------------------------------------------------------------------
@pytest.mark.dist
def test_two_processes_pool_as_one_process_over_all_their_batches():
    """Two ``jax.distributed`` processes on loopback (gloo), each over its own uneven share of
    the batches (one with none in the second case), ``sync=True``: both get what one process
    computes over every batch (R2.7's float32 bound: the merge order differs), for an NNX
    model (stock and bn1d's layers) and a NumPy layer. Bounded in time, both killed on failure."""
    from jax_backend.test_jax_distributed import run_workers

    with tempfile.TemporaryDirectory() as out:
        run_workers(out, "population_worker.py")
        results = [dict(np.load(os.path.join(out, f"process_{pid}.npz"))) for pid in (0, 1)]
    for pid, result in enumerate(results):
        for key in (k for k in result if "/synced/" in k and k.endswith("/mean")):
            alone = key.replace("/synced/", "/alone/")
            want = (result[alone].astype(np.float64), result[alone[: -len("mean")] + "var"].astype(np.float64))
            assert_statistics(result[key], result[key[: -len("mean")] + "var"], want, (pid, key))
