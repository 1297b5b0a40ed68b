"""bn1d's Flax NNX module (``bn1d.backends.nnx``): NNX's conventions, bn1d's numbers.

Every number is compared with bn1d's JAX ``BatchNorm1d.apply`` on the same inputs
(the module runs it: equal up to XLA compiling it in another program) and, for the
synced and ported cases, with the float64 NumPy specification or Flax's own
``nnx.BatchNorm``. Four CPU devices (``XLA_FLAGS``, set by tox) for ``shard_map``.
"""

from __future__ import annotations

import os

_DEVICES = "--xla_force_host_platform_device_count=4"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bn1d.backends import jax as jax_backend  # noqa: E402
from bn1d.backends import numpy as spec  # noqa: E402
from bn1d.backends.nnx import BatchNorm, BatchNorm1d, replace_batchnorm  # noqa: E402

# The module against the JAX layer's apply: the same core operations, compiled in a
# different XLA program (nnx.jit) may round float32 sums differently: values O(5),
# 1e-6 absolute is ~10 ulps of them, far below any semantic difference (> 1e-3).
SAME = dict(atol=1e-6, rtol=1e-6)
# Against the float64 specification: sums of <= 40 float32 values of size ~4; the JAX
# layer's own tests measure <= 2.5e-6 (tests/jax_backend/test_jax_replicas.py), 2e-5 is
# 8x that.
SPEC = dict(atol=2e-5, rtol=2e-5)
PARAMS = {"scale": np.array([1.5, -0.5, 2.0]), "bias": np.array([0.1, 0.2, -0.3])}
KWARGS = dict(momentum=0.9, scale_initializer=PARAMS["scale"], bias_initializer=PARAMS["bias"])


def data(seed: int, shape=(4, 5, 3)) -> np.ndarray:
    return (3.0 + 1.5 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def uneven_mask(replicas: int = 4, rows: int = 2, length: int = 5) -> np.ndarray:
    counts = [10, 3, 1, 7][:replicas]
    order = np.random.default_rng(3).permutation(rows * length)
    return np.concatenate([np.isin(np.arange(rows * length), order[:k]).reshape(rows, length) for k in counts])


def test_variables_are_those_of_nnx_batchnorm():
    ours, flax = BatchNorm1d(3), nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    for kind in (nnx.Param, nnx.BatchStat):
        assert jax.tree.structure(nnx.state(ours, kind)) == jax.tree.structure(nnx.state(flax, kind))
    assert set(nnx.to_pure_dict(nnx.state(BatchNorm1d(3, momentum=None), nnx.BatchStat))) == {
        "mean", "var", "num_batches_tracked"
    }  # fmt: skip
    assert not nnx.to_pure_dict(nnx.state(BatchNorm1d(3, affine=False), nnx.Param))
    assert not nnx.to_pure_dict(nnx.state(BatchNorm1d(3, track_running_stats=False), nnx.BatchStat))


@pytest.mark.parametrize(
    "kwargs, shape, masked",
    [
        ({}, (4, 5, 3), False),
        ({"axis": (0, 2)}, (4, 3, 5), True),
        ({"momentum": None, "fast_variance": True}, (6, 3), True),
    ],
    ids=["BLC", "BCL-masked", "cumulative-fast-masked"],
)
def test_calls_equal_the_jax_layers_apply_eagerly_and_under_nnx_jit(kwargs, shape, masked):
    kwargs = {**KWARGS, **kwargs, "axis": kwargs.get("axis", 0 if len(shape) == 2 else (0, 1))}
    reference = jax_backend.BatchNorm1d(3, **kwargs)
    params, state = reference.params, reference.state
    eager, jitted = BatchNorm1d(3, **kwargs), BatchNorm1d(3, **kwargs)
    step = nnx.jit(lambda module, x, mask: module(x, mask))
    for seed in range(2):
        x = data(seed, shape)
        feature = reference.config.feature_axis
        mask = np.random.default_rng(seed).random(np.delete(shape, feature)) < 0.6 if masked else None
        want_y, state = reference.apply(params, state, x, mask=mask, training=True)
        np.testing.assert_allclose(eager(x, mask), want_y, **SAME)  # eager: the JAX layer's jitted call
        np.testing.assert_allclose(step(jitted, x, mask), want_y, **SAME)
        for module in (eager, jitted):
            got = module.state_dict()
            for key in state:
                np.testing.assert_allclose(got[key], state[key], **SAME, err_msg=key)
    want_y, _ = reference.apply(params, state, x, training=False)
    np.testing.assert_allclose(eager(x, use_running_average=True), want_y, **SAME)


def test_train_eval_view_and_call_override_switch_the_mode():
    module = BatchNorm1d(3, **KWARGS)
    x = data(0)
    module.eval()
    assert module.use_running_average is True
    before = module.state_dict()
    y = module(x)
    inference = spec.BatchNorm1d(3, dtype=np.float64, mode="inference", **KWARGS)
    np.testing.assert_allclose(y, inference(x.astype(np.float64)), **SPEC)
    assert all(np.array_equal(before[k], v) for k, v in module.state_dict().items())  # nothing changed
    module(x, use_running_average=False)  # the call wins over the attribute
    assert not np.array_equal(before["running_mean"], module.state_dict()["running_mean"])
    module.train()
    assert module.use_running_average is False
    assert nnx.view(module, use_running_average=True).use_running_average is True
    assert BatchNorm1d(3, mode="inference").use_running_average is True
    assert BatchNorm1d(3, mode="inference", use_running_average=False).use_running_average is False
    with pytest.raises(TypeError, match=r"^use_running_average: expected None or a bool, got 1"):
        module(x, use_running_average=1)
    with pytest.raises(TypeError, match=r"^mask: expected None or a boolean array"):
        module(x, True)  # NNX's positional use_running_average: here the mask comes second
    with pytest.raises(ValueError, match=r"^momentum: expected a finite float in \[0, 1\]"):
        BatchNorm1d(3, momentum=1.5)
    with pytest.raises(TypeError, match=r"^use_fast_variance: expected one of the options"):
        BatchNorm1d(3, use_fast_variance=True)


def test_state_dict_loads_from_another_backend_strictly():
    trained = spec.BatchNorm1d(3, momentum=0.5)
    trained(data(1))
    module = BatchNorm1d(3, momentum=0.5)
    module.load_state_dict(trained.state_dict())
    x = data(2)
    np.testing.assert_allclose(module(x, use_running_average=True), trained(x, training=False), **SPEC)
    before = module.state_dict()
    bad = {**trained.state_dict(), "running_var": -np.ones(3, np.float32)}
    with pytest.raises(ValueError, match=r"^state_dict\['running_var'\]: expected non-negative values"):
        module.load_state_dict(bad)
    assert all(np.array_equal(before[k], v) for k, v in module.state_dict().items())


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, **bn):
        self.linear = nnx.Linear(4, 3, rngs=rngs)
        self.norm = BatchNorm1d(3, axis=0, **bn)

    def __call__(self, x, mask=None):
        return self.norm(self.linear(x), mask)


def test_a_model_trains_under_nnx_jit_with_the_numbers_of_the_jax_layers_apply():
    """nnx.Optimizer + nnx.value_and_grad under nnx.jit, against the same three optax steps
    written with bn1d's JAX apply on the same linear weights."""
    rng = np.random.default_rng(4)
    batches = [(rng.normal(2.0, 1.5, (16, 4)).astype(np.float32), rng.random(16) < 0.7) for _ in range(3)]
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    weights = {"kernel": model.linear.kernel[...], "bias": model.linear.bias[...]}

    @nnx.jit
    def step(model, optimizer, x, mask):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jnp.tanh(m(x, mask)) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    layer = jax_backend.BatchNorm1d(3, axis=0)
    params = {"linear": weights, "norm": layer.params}
    state, opt_state = layer.state, optax.sgd(0.05, momentum=0.9).init(params)

    @jax.jit
    def reference_step(params, state, opt_state, x, mask):
        def loss(params):
            h = x @ params["linear"]["kernel"] + params["linear"]["bias"][None]  # rank-explicit: strict modes
            y, new_state = layer.apply(params["norm"], state, h, mask=mask, training=True)
            return jnp.mean(jnp.tanh(y) ** 2), new_state

        (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optax.sgd(0.05, momentum=0.9).update(grads, opt_state, params)
        return value, optax.apply_updates(params, updates), new_state, opt_state

    for x, mask in batches:
        loss = step(model, optimizer, x, mask)
        want, params, state, opt_state = reference_step(params, state, opt_state, x, mask)
        np.testing.assert_allclose(loss, want, **SAME)
    np.testing.assert_allclose(model.linear.kernel[...], params["linear"]["kernel"], **SAME)
    got = model.norm.state_dict()
    for key, value in {**params["norm"], **state}.items():
        np.testing.assert_allclose(got[key], value, **SAME, err_msg=key)


def test_nnx_vmap_with_axis_name_shares_count_weighted_statistics():
    """The model broadcast (in_axes=None): 4 replicas of uneven masked counts give the
    statistics of their concatenated batch, stored once; with groups the statistics
    are mapped (StateAxes), one row per replica, each its group's."""
    x, mask = data(5, (8, 5, 3)), uneven_mask()
    module = BatchNorm1d(3, axis_name="i", **KWARGS)
    ys = nnx.vmap(lambda m, x, k: m(x, k), in_axes=(None, 0, 0), axis_name="i")(
        module, x.reshape(4, 2, 5, 3), mask.reshape(4, 2, 5)
    )
    whole = spec.BatchNorm1d(3, dtype=np.float64, **KWARGS)
    np.testing.assert_allclose(np.asarray(ys).reshape(x.shape), whole(x.astype(np.float64), mask=mask), **SPEC)
    for key, value in module.state_dict().items():
        np.testing.assert_allclose(value, whole.state_dict()[key], **SPEC, err_msg=key)

    grouped = BatchNorm1d(3, axis_name="i", axis_index_groups=[[0, 1], [2, 3]], **KWARGS)
    graphdef, stats, rest = nnx.split(grouped, nnx.BatchStat, ...)
    stacked = nnx.merge(graphdef, jax.tree.map(lambda v: jnp.stack([v] * 4), stats), rest)
    axes = nnx.StateAxes({nnx.BatchStat: 0, ...: None})
    nnx.vmap(lambda m, x, k: m(x, k), in_axes=(axes, 0, 0), axis_name="i")(
        stacked, x.reshape(4, 2, 5, 3), mask.reshape(4, 2, 5)
    )
    for group in ([0, 1], [2, 3]):
        rows = slice(2 * group[0], 2 * group[-1] + 2)
        want = spec.BatchNorm1d(3, dtype=np.float64, **KWARGS)
        want(x[rows].astype(np.float64), mask=mask[rows])
        for r in group:
            np.testing.assert_allclose(stacked.mean[...][r], want.running_mean, **SPEC)
            np.testing.assert_allclose(stacked.var[...][r], want.running_var, **SPEC)


def test_shard_map_over_four_devices_nnx_and_jax_with_groups():
    assert jax.device_count() >= 4, f"needs 4 devices (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})"
    mesh = jax.make_mesh((4,), ("data",))
    x, mask = data(6, (8, 5, 3)), uneven_mask()
    place = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731

    module = BatchNorm1d(3, axis_name="data", **KWARGS)  # nnx.shard_map, the model replicated
    y = nnx.shard_map(lambda m, x, k: m(x, k), mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P("data"))(
        module, place(x), place(mask)
    )
    whole = spec.BatchNorm1d(3, dtype=np.float64, **KWARGS)
    np.testing.assert_allclose(y, whole(x.astype(np.float64), mask=mask), **SPEC)
    np.testing.assert_allclose(module.state_dict()["running_var"], whole.running_var, **SPEC)

    grouped = BatchNorm1d(3, axis_name="data", axis_index_groups=[[0, 2], [1, 3]], **KWARGS)
    graphdef, params, stats = nnx.split(grouped, nnx.Param, nnx.BatchStat)

    def replica(params, stats, x, mask):  # jax.shard_map over split/merge; stats: one row per device
        model = nnx.merge(graphdef, params, jax.tree.map(lambda v: v[0], stats))
        y = model(x, mask)
        return y, jax.tree.map(lambda v: v[None], nnx.state(model, nnx.BatchStat))

    per_device = jax.tree.map(lambda v: place(jnp.stack([v] * 4)), stats)
    specs = dict(in_specs=(P(), P("data"), P("data"), P("data")), out_specs=(P("data"), P("data")))
    y, new = jax.jit(jax.shard_map(replica, mesh=mesh, **specs))(params, per_device, place(x), place(mask))
    for group in ([0, 2], [1, 3]):
        rows = np.concatenate([np.arange(2 * r, 2 * r + 2) for r in group])
        want = spec.BatchNorm1d(3, dtype=np.float64, **KWARGS)
        np.testing.assert_allclose(np.asarray(y)[rows], want(x[rows].astype(np.float64), mask=mask[rows]), **SPEC)
        for r in group:
            np.testing.assert_allclose(np.asarray(new["mean"][...])[r], want.running_mean, **SPEC)


class FlaxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 3, rngs=rngs)
        self.norm = nnx.BatchNorm(3, momentum=0.8, rngs=rngs)
        self.blocks = nnx.List([nnx.BatchNorm(3, use_scale=False, rngs=rngs)])
        self.alias = self.norm  # a shared layer stays shared

    def __call__(self, x):
        return self.blocks[0](self.alias(self.linear(x)))


def test_replace_batchnorm_makes_each_layer_the_drop_in_in_place():
    """The same objects, their class swapped: values, options, sharing and ``nnx.state``
    paths stay (an old checkpoint loads with ``nnx.update``); the statistics become exact
    (``use_fast_variance=False``) unless Flax's formula is asked for."""
    rng = np.random.default_rng(7)
    model = FlaxModel(nnx.Rngs(0))
    for _ in range(2):  # statistics and parameters away from their initial values
        model(rng.normal(1.0, 2.0, (16, 4)).astype(np.float32))
    model.norm.scale[...] = jnp.asarray([0.5, 2.0, -1.0], jnp.float32)
    x = rng.normal(1.0, 2.0, (16, 4)).astype(np.float32)
    checkpoint = nnx.state(model)
    norm, block = model.norm, model.blocks[0]
    fast, exact = nnx.clone(model), nnx.clone(model)
    for layer in (exact.norm, exact.blocks[0]):
        layer.use_fast_variance = False  # Flax's two-pass variance: the reference for bn1d's exact one
    assert replace_batchnorm(model) is model
    assert model.norm is norm and model.alias is norm and model.blocks[0] is block
    assert type(norm) is BatchNorm and type(block) is BatchNorm and norm.use_fast_variance is False
    assert (norm.momentum, norm.epsilon, block.use_scale) == (0.8, 1e-5, False)
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(checkpoint)
    nnx.update(model, checkpoint)  # the stock model's state loads unchanged
    # Inference: the same statistics, both x - mean first. Training: bn1d's exact moments
    # against Flax's two float32 passes over 16 values of size ~3 (each within a few ulps
    # of the exact ones); 2e-6 is ~20 ulps of |y| < 5 and of the variances (~4).
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(exact, mode)()
        np.testing.assert_allclose(model(x), exact(x), atol=2e-6, rtol=2e-6)
    for ours, theirs in ((model.norm, exact.norm), (model.blocks[0], exact.blocks[0])):
        np.testing.assert_allclose(ours.mean[...], theirs.mean[...], atol=2e-6, rtol=2e-6)
        np.testing.assert_allclose(ours.var[...], theirs.var[...], atol=2e-6, rtol=2e-6)  # biased, as Flax
    flaxs = replace_batchnorm(nnx.clone(fast), use_fast_variance=True)
    assert flaxs.norm.use_fast_variance is True
    # Both Flax's one-pass float32 formula (E[x^2] - E[x]^2, clamped): measured bitwise equal.
    np.testing.assert_allclose(flaxs(x), fast(x), atol=2e-6, rtol=2e-6)


def test_replace_batchnorm_reaches_containers_is_atomic_and_leaves_subclasses():
    """Layers in ``nnx.data`` tuples, lists and dicts and in ``nnx.List`` are replaced; a
    layer whose options bn1d refuses (R7.1) raises before any is replaced; a subclass of
    ``nnx.BatchNorm`` keeps its class (its overrides would be lost)."""

    class Own(nnx.BatchNorm):
        pass

    class Net(nnx.Module):
        def __init__(self, momentum=0.99):
            self.t = nnx.data((nnx.BatchNorm(3, rngs=nnx.Rngs(0)),))
            self.l = nnx.data([nnx.BatchNorm(3, rngs=nnx.Rngs(0))])
            self.d = nnx.data({"bn": nnx.BatchNorm(3, rngs=nnx.Rngs(0))})
            self.L = nnx.List([nnx.BatchNorm(3, momentum=momentum, rngs=nnx.Rngs(0))])
            self.own = Own(3, rngs=nnx.Rngs(0))

    net = replace_batchnorm(Net())
    assert all(type(layer) is BatchNorm for layer in (net.t[0], net.l[0], net.d["bn"], net.L[0]))
    assert type(net.own) is Own
    bad = Net(momentum=1.5)  # Flax's constructor accepts it; bn1d's rule R7.1 does not
    with pytest.raises(ValueError, match=r"^momentum: expected .*got 1\.5"):
        replace_batchnorm(bad)
    assert all(type(layer) is nnx.BatchNorm for layer in (bad.t[0], bad.l[0], bad.d["bn"], bad.L[0]))
    with pytest.raises(TypeError, match=r"^use_fast_variance: expected a bool, got 'no'"):
        replace_batchnorm(Net(), use_fast_variance="no")


def test_nested_nnx_vmap_over_two_named_axes_and_an_empty_batch():
    """Nested ``nnx.vmap`` (the model broadcast at both levels) with
    ``axis_name=("a", "b")``: the statistics of all 2 x 2 replicas' rows,
    count-weighted; an all-masked batch updates nothing and gives no NaN."""
    x, mask = data(11, (8, 5, 3)), uneven_mask()
    module = BatchNorm1d(3, axis_name=("a", "b"), **KWARGS)
    inner = nnx.vmap(lambda m, x, k: m(x, k), in_axes=(None, 0, 0), axis_name="b")
    outer = nnx.vmap(lambda m, x, k: inner(m, x, k), in_axes=(None, 0, 0), axis_name="a")
    ys = outer(module, x.reshape(2, 2, 2, 5, 3), mask.reshape(2, 2, 2, 5))
    whole = spec.BatchNorm1d(3, dtype=np.float64, **KWARGS)
    np.testing.assert_allclose(np.asarray(ys).reshape(x.shape), whole(x.astype(np.float64), mask=mask), **SPEC)
    for key, value in module.state_dict().items():
        np.testing.assert_allclose(value, whole.state_dict()[key], **SPEC, err_msg=key)

    local = BatchNorm1d(3, **KWARGS)
    before = local.state_dict()
    y = nnx.jit(lambda m, x, k: m(x, k))(local, x, np.zeros((8, 5), bool))
    assert np.isfinite(np.asarray(y)).all()
    for key, value in local.state_dict().items():  # docs/spec.md R3.6: unchanged
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_the_brainpy_signature_modules_forward_the_one_written_out_signature():
    """NNX's and Equinox's ``BatchNorm1d`` forward BrainPy's arguments to the JAX layer (written
    once, ``bn1d.Layer``'s) and show them: ``inspect.signature`` and ``help`` list BrainPy's
    parameters with their defaults, then the module's own keywords; a bad argument is the
    layer's error."""
    import inspect

    from bn1d import Layer
    from bn1d.backends import equinox as bn_eqx

    brainpy = [p for p in inspect.signature(Layer.__init__).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    for cls, own in (
        (BatchNorm1d, ["dtype", "use_running_average", "rngs"]),
        (bn_eqx.BatchNorm1d, ["dtype", "inference"]),
    ):
        parameters = list(inspect.signature(cls.__init__).parameters.values())
        assert parameters[: len(brainpy)] == brainpy
        assert [p.name for p in parameters[len(brainpy) :]] == [*own, "options"]
        layer = cls(3, 0, 1e-3, 0.9, False, name="bn", fast_variance=True)
        assert (layer.config.reduce_axes, layer.config.epsilon, layer.config.momentum, layer.config.affine,
                layer.config.name, layer.config.fast_variance) == ((0,), 1e-3, 0.9, False, "bn", True)  # fmt: skip
        with pytest.raises(ValueError, match=r"^epsilon: expected"):
            cls(3, epsilon=-1.0)
