"""The Flax NNX, Flax linen and Equinox drop-ins: the libraries' own classes, bn1d's arithmetic.

Each test compares a drop-in with the class it stands for, an independent implementation of
the same semantics, in float32 (so under ``jax_enable_x64`` and strict dtype promotion too,
where the peers refuse mixed float32 and float64 operands). Tolerance against it on O(1)
data: both compute in float32 and differ in summation order and in bn1d's shifted sums (the
peers' two-pass float32 statistics round the mean at ``u |mean|``): a few float32 ulps of
O(1) values (``python -m benchmarks.jax_agreement`` measures at most 1.9e-6); 1e-5 leaves
room for other XLA versions, while a wrong momentum, variance convention, axis or count
moves a result by more than 1e-2. Against the float64 specification on raw data: the rule's
bounds (R2.7).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
eqx = pytest.importorskip("equinox")

from bn1d.backends import equinox as bn_eqx  # noqa: E402
from bn1d.backends import linen as bn_linen  # noqa: E402
from bn1d.backends import nnx as bn_nnx  # noqa: E402
from bn1d.backends import numpy as spec  # noqa: E402

TOL = 1e-5


def close(actual, expected, what, tol=TOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=tol, atol=tol,
                               err_msg=what)  # fmt: skip


def data(shape, seed, loc=1.0, scale=2.0):
    return (jax.random.normal(jax.random.key(seed), shape) * scale + loc).astype(jnp.float32)


# -- Flax NNX ----------------------------------------------------------------------------------
class Model(nnx.Module):
    """A convolution, a batch norm and a dense head, with the batch-norm class given."""

    def __init__(self, norm, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.norm = norm(4, momentum=0.9, use_fast_variance=False, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.norm(self.conv(x))).mean((1, 2)))


def test_nnx_drop_in_is_flaxs_class_with_flaxs_state_and_numbers():
    """The new user's NNX scenario: the same model with ``nnx.BatchNorm`` or bn1d's (the
    one import that changes); Flax's trained state loads with ``nnx.update``; three
    optax steps under ``nnx.jit`` and an evaluation give Flax's numbers; the state trees
    line up."""
    theirs, ours = Model(nnx.BatchNorm, nnx.Rngs(0)), Model(bn_nnx.BatchNorm, nnx.Rngs(0))
    assert isinstance(ours.norm, nnx.BatchNorm)
    assert jax.tree.structure(nnx.state(theirs)) == jax.tree.structure(nnx.state(ours))
    nnx.update(ours, nnx.state(theirs))
    # SGD: the convolution's bias has a zero gradient up to rounding (the batch norm removes it),
    # which Adam would scale up to a step of the learning rate's size in a random direction.
    optimizers = [nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param) for m in (theirs, ours)]

    @nnx.jit
    def step(model, optimizer, x, target):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), target).mean()

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    for i in range(3):
        x, target = data((8, 6, 6, 2), i), jax.random.randint(jax.random.key(10 + i), (8,), 0, 3)
        losses = [step(m, o, x, target) for m, o in zip((theirs, ours), optimizers)]
        close(losses[1], losses[0], f"step {i} loss")
    ours_state = dict(nnx.to_flat_state(nnx.state(ours)))
    for path, theirs_value in nnx.to_flat_state(nnx.state(theirs)):
        close(ours_state[path][...], theirs_value[...], f"state {path}")
    theirs.eval(), ours.eval()
    x = data((4, 6, 6, 2), 7)
    close(ours(x), theirs(x), "evaluation")


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("axis, shape", [(-1, (10, 5)), (1, (4, 5, 3)), ((1, 2), (4, 3, 2, 5))], ids=str)
@pytest.mark.jax_leak_check_only(axis=1)  # both variances once
def test_nnx_and_linen_drop_ins_compute_what_flax_computes(fast, axis, shape):
    """Every axis form (negative, middle, several feature axes: linen's, which NNX's own
    class cannot run) and both variance formulas: training (outputs, running statistics,
    gradients) then inference, against Flax."""
    features = int(np.prod([shape[a] for a in np.atleast_1d(axis)]))
    theirs = nnx.BatchNorm(features, axis=axis, use_fast_variance=fast, rngs=nnx.Rngs(0))
    ours = bn_nnx.BatchNorm(features, axis=axis, use_fast_variance=fast, rngs=nnx.Rngs(0))
    linen_theirs = linen.BatchNorm(use_running_average=False, axis=axis, use_fast_variance=fast)
    linen_ours = bn_linen.BatchNorm(use_running_average=False, axis=axis, use_fast_variance=fast)
    several = isinstance(axis, tuple)
    for step in range(2):
        x = data(shape, step)
        if several:  # Flax's NNX class fails there (its flat scale meets a (3, 2) feature shape)
            break
        grads = [nnx.grad(lambda m, x: jnp.sum(m(x) ** 2), argnums=1)(m, x) for m in (theirs, ours)]
        close(grads[1], grads[0], f"step {step} dx")
        close(ours.mean[...], theirs.mean[...], f"step {step} mean")
        close(ours.var[...], theirs.var[...], f"step {step} var")
    variables = linen_theirs.init(jax.random.key(1), x)
    assert jax.tree.structure(linen_ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    (y_theirs, stats_theirs), (y_ours, stats_ours) = (
        module.apply(variables, x, mutable=["batch_stats"]) for module in (linen_theirs, linen_ours)
    )
    close(y_ours, y_theirs, "linen y")
    close(stats_ours["batch_stats"]["var"], stats_theirs["batch_stats"]["var"], "linen var")
    if several:
        y_nnx = ours(x)  # bn1d's NNX class flattens the feature axes: linen's numbers
        close(y_nnx, y_ours, "nnx with several feature axes")
        return
    theirs.eval(), ours.eval()
    close(ours(x), theirs(x), "inference")


def test_linen_drop_in_takes_a_linen_models_variables_and_trains_as_flax():
    """linen: the module definition is the conversion; a model's variables (Flax's) train
    three optax steps to Flax's numbers."""

    def make(norm):
        class Net(linen.Module):
            @linen.compact
            def __call__(self, x, train: bool):
                x = linen.Dense(6)(x)
                x = norm(use_running_average=not train, momentum=0.8, use_fast_variance=False)(x)
                return linen.Dense(2)(linen.relu(x))

        return Net()

    theirs, ours = make(linen.BatchNorm), make(bn_linen.BatchNorm)
    x = data((16, 4), 0)
    variables = theirs.init(jax.random.key(0), x, train=False)
    tx = optax.sgd(0.1)
    states = [(variables["params"], variables["batch_stats"], tx.init(variables["params"])) for _ in range(2)]
    for i in range(3):
        x, target = data((16, 4), i + 1), data((16, 2), 20 + i, loc=0.0, scale=1.0)
        for k, module in enumerate((theirs, ours)):
            params, stats, opt = states[k]

            def loss(params, stats=stats, module=module, x=x, target=target):
                y, updates = module.apply({"params": params, "batch_stats": stats}, x, train=True,
                                          mutable=["batch_stats"])  # fmt: skip
                return jnp.mean((y - target) ** 2), updates["batch_stats"]

            (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
            updates, opt = tx.update(grads, opt)
            states[k] = (optax.apply_updates(params, updates), stats, opt)
        for a, b in zip(jax.tree.leaves(states[1][:2]), jax.tree.leaves(states[0][:2])):
            close(a, b, f"step {i}")
    y = [m.apply({"params": s[0], "batch_stats": s[1]}, x, train=False) for m, s in zip((theirs, ours), states)]
    close(y[1], y[0], "evaluation")


# -- Equinox ------------------------------------------------------------------------------------
def per_lane(module, training=True):
    module = module if training else eqx.nn.inference_mode(module)
    return jax.vmap(module, in_axes=(0, None), out_axes=(0, None), axis_name="batch")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no affine"])
@pytest.mark.parametrize("mode", ["batch", "ema"])
@pytest.mark.parametrize("example", [(3,), (3, 7), (3, 4, 5)], ids=str)
@pytest.mark.jax_leak_check_only(example=(3, 7), affine=True)  # each mode once: 290 s -> ~60 s under --jax-strict
def test_equinox_drop_in_computes_what_equinox_computes_in_each_mode(mode, example, affine):
    """Equinox's modes, exactly as defined there (``"batch"``: batch statistics in
    training, their zero-debiased average in inference; ``"ema"``: the average itself, the
    batch's on the first call), every example rank, with and without ``channelwise_affine``:
    three training calls then inference."""
    options = dict(mode=mode, momentum=0.9, channelwise_affine=affine, dtype=jnp.float32)
    theirs, their_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", **options)
    ours, our_state = eqx.nn.make_with_state(bn_eqx.BatchNorm)(3, "batch", **options)
    assert isinstance(ours, eqx.nn.BatchNorm)
    for step in range(3):
        x = data((8, *example), step)
        # The gradient reaches x through the batch's statistics in both modes ("ema": through the
        # batch's share of the new average, which normalises).
        grads = [jax.grad(lambda x, m=m, s=s: jnp.sum(jnp.sin(per_lane(m)(x, s)[0])))(x)
                 for m, s in ((theirs, their_state), (ours, our_state))]  # fmt: skip
        close(grads[1], grads[0], f"step {step} dx")
        y_theirs, their_state = per_lane(theirs)(x, their_state)
        y_ours, our_state = per_lane(ours)(x, our_state)
        close(y_ours, y_theirs, f"step {step} y")
    for a, b in zip(jax.tree.leaves(our_state), jax.tree.leaves(their_state)):
        close(a, b, "state")
    close(per_lane(ours, False)(x, our_state)[0], per_lane(theirs, False)(x, their_state)[0], "inference")


def test_equinox_models_move_by_replace_batchnorm_with_their_state_and_files():
    """``replace_batchnorm`` keeps every field and the ``StateIndex`` markers: the model's
    state and a file written by ``eqx.tree_serialise_leaves`` from the stock model are the
    new model's; three steps then give Equinox's numbers."""
    key = jax.random.key(0)
    layers = [
        eqx.nn.Linear(4, 3, key=key, dtype=jnp.float32),
        eqx.nn.BatchNorm(3, "batch", mode="batch", dtype=jnp.float32),
    ]
    stock = eqx.nn.Sequential(layers)
    stock, state = eqx.nn.make_with_state(lambda: stock)()
    ours = bn_eqx.replace_batchnorm(stock)
    assert type(ours.layers[1]) is bn_eqx.BatchNorm and type(stock.layers[1]) is eqx.nn.BatchNorm
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, (stock, state))
    buffer.seek(0)
    loaded, loaded_state = eqx.tree_deserialise_leaves(buffer, (ours, state))
    assert type(loaded.layers[1]) is bn_eqx.BatchNorm
    states = [state, loaded_state]
    for i in range(3):
        x = data((8, 4), i)
        ys = []
        for k, model in enumerate((stock, loaded)):
            y, states[k] = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, states[k])
            ys.append(y)
        close(ys[1], ys[0], f"step {i}")


def test_one_example_per_call_or_per_lane_as_flax_and_an_unbound_axis_is_flaxs_error():
    """Flax takes an input with no axis but the features: one example in inference, or one
    per lane of ``jax.vmap(axis_name=...)`` in training (the lanes are the batch); bn1d
    refuses one value per feature in training without a sync (R3.5). A training call whose
    ``axis_name`` is not bound raises what ``lax.psum`` raises (``NameError``, which Flax
    and Equinox code catches), as a ``ValueError`` naming ``axis_name`` (R7.1)."""
    x = data((8, 3), 11)
    variables = linen.BatchNorm().init(jax.random.key(0), x, use_running_average=True)
    _, updates = linen.BatchNorm(momentum=0.5).apply(  # running statistics away from (0, 1)
        variables, x * 2.0 + 1.0, use_running_average=False, mutable=["batch_stats"]
    )
    variables = {**variables, **updates}
    inference = [m(use_running_average=True).apply(variables, x[0]) for m in (linen.BatchNorm, bn_linen.BatchNorm)]
    close(inference[1], inference[0], "one example, inference")
    lanes = []
    for module in (linen.BatchNorm, bn_linen.BatchNorm):
        synced = module(use_running_average=False, axis_name="batch", momentum=0.5)
        lanes.append(jax.vmap(lambda e, m=synced: m.apply(variables, e, mutable=["batch_stats"]), axis_name="batch")(x))
    close(lanes[1][0], lanes[0][0], "one example per lane, y")
    close(lanes[1][1]["batch_stats"]["var"], lanes[0][1]["batch_stats"]["var"], "one example per lane, var")
    with pytest.raises(ValueError, match=r"^x: expected more than 1 value per feature when training, got \(3,\)"):
        bn_linen.BatchNorm(use_running_average=False).apply(variables, x[0], mutable=["batch_stats"])
    layer = bn_nnx.BatchNorm(3, use_running_average=False, axis_name="nowhere", rngs=nnx.Rngs(0))
    for error in (NameError, ValueError):
        with pytest.raises(error, match=r"^axis_name: expected an axis bound by jax.vmap"):
            layer(x)
    eqx_layer, state = eqx.nn.make_with_state(bn_eqx.BatchNorm)(3, "batch", mode="batch", dtype=jnp.float32)
    with pytest.raises(NameError, match=r"^axis_name: expected an axis bound by jax.vmap"):
        eqx_layer(x[0], state)  # one example outside the vmap


def test_flax_dtypes_masks_axes_and_init_follow_flax():
    """What Flax decides besides the statistics, against Flax: NNX promotes the input with
    every variable (``promote_dtype``, the statistics included; linen: the parameters only),
    an integer input gives float32, repeated feature axes count once, a mask is ignored in
    inference and a concrete one is checked under ``jit`` too, and linen's ``init`` runs on
    a dummy batch of one value per feature."""
    x = data((8, 5, 4), 30)
    for kwargs, given in (
        (dict(param_dtype=jnp.bfloat16), x.astype(jnp.bfloat16)),
        (dict(use_scale=False, use_bias=False), jnp.round(x).astype(jnp.int32)),
        (
            dict(
                promote_dtype=lambda args, dtype=None: tuple(
                    None if a is None else jnp.asarray(a, jnp.float16) for a in args
                )
            ),
            x,
        ),  # fmt: skip
        (dict(axis=(-1, 2)), x),
    ):
        theirs = nnx.BatchNorm(4, **kwargs, rngs=nnx.Rngs(0))
        ours = bn_nnx.BatchNorm(4, **kwargs, rngs=nnx.Rngs(0))
        try:
            y_theirs = theirs(given)
        except jax.dtypes.TypePromotionError:  # Flax's own class mixes dtypes, refused under --jax-strict
            assert jax.config.jax_numpy_dtype_promotion == "strict", kwargs
            continue
        y_ours = ours(given)
        assert y_ours.dtype == y_theirs.dtype and ours.mean[...].dtype == theirs.mean[...].dtype, kwargs
        close(y_ours, y_theirs, f"{kwargs}", tol=1e-2 if y_theirs.dtype != jnp.float32 else TOL)
    rows = jnp.asarray(np.random.default_rng(31).random((8, 5, 1)) < 0.7)
    full = jnp.broadcast_to(rows, x.shape)  # the same positions for every feature
    varying = jnp.asarray(np.random.default_rng(32).random(x.shape) < 0.7)
    theirs, ours = (cls(4, use_fast_variance=False, rngs=nnx.Rngs(0)) for cls in (nnx.BatchNorm, bn_nnx.BatchNorm))
    captured = [nnx.jit(lambda m, x: m(x, mask=full))(m, x) for m in (theirs, ours)]  # a concrete mask, not traced
    close(captured[1], captured[0], "a concrete full-shape mask under jit")
    theirs.eval(), ours.eval()
    close(ours(x, mask=varying), theirs(x, mask=varying), "inference ignores the mask")
    dummy = jnp.ones((1, 4), jnp.float32)
    for module in (linen.BatchNorm, bn_linen.BatchNorm):  # Flax's init on a dummy input
        variables = module(use_running_average=False, axis_name="batch").init(jax.random.key(0), dummy)
        assert jax.tree.map(jnp.shape, variables) == {"batch_stats": {"mean": (4,), "var": (4,)},
                                                      "params": {"bias": (4,), "scale": (4,)}}  # fmt: skip


# -- bn1d's arithmetic where the peers' misses the rule --------------------------------------------
@pytest.mark.parametrize("ratio", [1.0, 1e4])
def test_raw_data_meet_the_rule_on_every_drop_in(ratio):
    """``|mean| / std`` up to 1e4, 2**16 values per feature: ``y`` within 1e-5 of the float64
    specification and the running variance within 1e-5 relative (Flax's default one-pass
    variance and Equinox's float32 two-pass miss it: measured below)."""
    x = np.asarray((np.random.default_rng(3).standard_normal((2**16, 3)) * 0.5 + 0.5 * ratio).astype(np.float32))
    reference = spec.BatchNorm1d(3, axis=0, momentum=0.0, unbiased_running_var=False, dtype=np.float64)
    want = reference(x.astype(np.float64))
    nnx_layer = bn_nnx.BatchNorm(3, momentum=0.0, rngs=nnx.Rngs(0))
    y_nnx = nnx_layer(jnp.asarray(x))
    module = bn_linen.BatchNorm(use_running_average=False, momentum=0.0)
    variables = module.init(jax.random.key(0), x)
    y_linen, updates = module.apply(variables, x, mutable=["batch_stats"])
    eqx_layer, state = eqx.nn.make_with_state(bn_eqx.BatchNorm)(
        3, "batch", mode="batch", momentum=0.0, dtype=jnp.float32
    )
    y_eqx, state = per_lane(eqx_layer)(jnp.asarray(x), state)
    var = x.astype(np.float64).var(axis=0)
    for name, y, running_var in (
        ("nnx", y_nnx, nnx_layer.var[...]),
        ("linen", y_linen, updates["batch_stats"]["var"]),
        ("equinox", y_eqx, state.get(eqx_layer.batch_state_index)[1]),
    ):
        assert np.abs(np.asarray(y, np.float64) - want).max() <= 1e-5, name
        assert (np.abs(np.asarray(running_var, np.float64) - var) <= 1e-5 * var).all(), name


# -- masks and errors ------------------------------------------------------------------------------
def test_flax_masks_that_select_positions_equal_the_specification_and_feature_masks_are_refused():
    """A Flax mask broadcast over the features (``(N, 1)`` or ``(N, C)`` equal along C)
    selects positions, as bn1d's (R5.1); one that varies along the features gives each
    feature its own count, which bn1d cannot express: a ``ValueError``, eagerly and, for a
    traced mask of the features' size, at trace time."""
    x = np.asarray(data((12, 5), 4))
    rows = np.random.default_rng(5).random(12) < 0.6
    reference = spec.BatchNorm1d(5, axis=0, momentum=0.9, unbiased_running_var=False, dtype=np.float64)
    want = reference(x.astype(np.float64), rows)
    for mask in (rows[:, None], np.repeat(rows[:, None], 5, axis=1)):
        layer = bn_nnx.BatchNorm(5, momentum=0.9, rngs=nnx.Rngs(0))
        close(layer(jnp.asarray(x), mask=jnp.asarray(mask)), want, f"mask {mask.shape}")
        close(layer.var[...], reference.running_var, "running var")
    layer = bn_nnx.BatchNorm(5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^mask: expected the same positions for every feature"):
        layer(jnp.asarray(x), mask=jnp.asarray([True, False, True, False, True]))
    with pytest.raises(
        ValueError, match=r"^mask: expected the same positions .* got 'a traced mask of shape \(12, 5\)'"
    ):
        nnx.jit(lambda layer, m: layer(jnp.asarray(x), mask=m))(layer, jnp.asarray(np.repeat(rows[:, None], 5, 1)))
    assert float(layer.var[...][0]) == 1.0, "nothing changed"


def test_the_drop_ins_check_their_arguments():
    for build, exception, pattern in (
        (lambda: bn_nnx.BatchNorm(0, rngs=nnx.Rngs(0)), ValueError, r"^num_features: expected a positive int"),
        (lambda: bn_nnx.BatchNorm(3, momentum=1.5, rngs=nnx.Rngs(0)), ValueError, r"^momentum: expected"),
        (lambda: bn_nnx.BatchNorm(3, epsilon=-1.0, rngs=nnx.Rngs(0)), ValueError, r"^epsilon: expected"),
        (lambda: bn_nnx.BatchNorm(3, axis_index_groups=[[0]], rngs=nnx.Rngs(0)), ValueError,
         r"^axis_index_groups: expected None when axis_name is None"),
        (lambda: bn_linen.BatchNorm(momentum=None), TypeError, r"^momentum: expected a finite float in \[0, 1\]"),
        (lambda: bn_linen.BatchNorm(use_bias=1), TypeError, r"^use_bias: expected a bool, got 1$"),
        (lambda: bn_eqx.BatchNorm(3, None), TypeError, r"^axis_name: expected the name of the vmap/pmap axis"),
        (lambda: bn_eqx.BatchNorm(3, "batch", mode="fast"), ValueError, r"^mode: expected 'ema' or 'batch'"),
        (lambda: bn_eqx.BatchNorm(3, "batch", momentum=2.0, mode="batch"), ValueError, r"^momentum: expected"),
        (lambda: bn_eqx.BatchNorm(0, "batch", mode="batch"), ValueError, r"^num_features: expected a positive int"),
    ):  # fmt: skip
        with pytest.raises(exception, match=pattern):
            build()
    layer, state = eqx.nn.make_with_state(bn_eqx.BatchNorm)(3, "batch", mode="batch", dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"^x: expected one example \(input_size=3, \*spatial\) per vmap lane"):
        per_lane(layer)(jnp.ones((8, 4, 3)), state)
    with warnings.catch_warnings():  # Equinox's own warning for its legacy default, kept
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="defaults to 'ema'"):
            bn_eqx.BatchNorm(3, "batch")
