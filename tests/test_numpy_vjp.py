"""The analytic backward pass of the NumPy specification against central finite
differences in float64.

Central differences with step h have truncation error ~h**2 * |f'''| and rounding
error ~eps * |f| / h; with h = 1e-5 on O(1) data both are ~1e-10 relative, so the
contract's bound of 1e-7 relative error has three orders of margin.
"""

import numpy as np
import pytest

from bn1d.backends.numpy import BatchNorm1d, run_replicas

H = 1e-5
BOUND = 1e-7


def relative_error(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def numeric_gradient(f, value):
    """d f / d value by central differences, one element at a time."""
    grad = np.zeros_like(value)
    for index in np.ndindex(value.shape):
        saved = value[index]
        value[index] = saved + H
        up = f()
        value[index] = saved - H
        down = f()
        value[index] = saved
        grad[index] = (up - down) / (2 * H)
    return grad


def fresh_layer(c, axis, affine=True, fast=False, **kwargs):
    rng = np.random.default_rng(11)
    layer = BatchNorm1d(
        c, axis=axis, affine=affine, dtype=np.float64, fast_variance=fast, epsilon=1e-3,
        scale_initializer=rng.uniform(0.5, 2, c), bias_initializer=rng.normal(size=c), **kwargs,
    )  # fmt: skip
    layer.load_state_dict(
        {**layer.state_dict(), "running_mean": rng.normal(size=c), "running_var": rng.uniform(0.5, 2, c)}
    )
    return layer


CASES = [
    # (axis, shape, feature_axis)
    ((0, 1), (3, 4, 2), 2),
    (0, (5, 3), 1),
    ((0, 2), (3, 2, 4), 1),
    ((-3, -2), (3, 4, 2), 2),
]


@pytest.mark.parametrize("axis, shape, feature_axis", CASES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_vjp_matches_finite_differences(axis, shape, feature_axis, training, masked, affine):
    rng = np.random.default_rng(0)
    c = shape[feature_axis]
    x = rng.normal(1.0, 2.0, shape)
    dy = rng.normal(size=shape)
    mask = None
    if masked:
        mask = rng.random(shape[:feature_axis] + shape[feature_axis + 1 :]) < 0.7
        mask.flat[:2] = True
    layer = fresh_layer(c, axis, affine)
    running = layer.running_mean.copy(), layer.running_var.copy()

    def loss():
        layer.running_mean, layer.running_var = running  # no running update leaks between evaluations
        return float(np.sum(layer(x, mask=mask, training=training) * dy))

    grads = layer.vjp(x, dy, mask=mask, training=training)
    assert relative_error(grads["x"], numeric_gradient(loss, x)) < BOUND
    if affine:
        for name in ("scale", "bias"):
            assert relative_error(grads[name], numeric_gradient(loss, getattr(layer, name))) < BOUND
    else:
        assert set(grads) == {"x"}


def test_vjp_with_everything_masked_is_the_inference_gradient():
    x = np.random.default_rng(1).normal(size=(3, 4, 2))
    dy = np.random.default_rng(2).normal(size=(3, 4, 2))
    layer = fresh_layer(2, (0, 1))
    none_kept = np.zeros((3, 4), bool)
    with np.errstate(all="raise"):
        train = layer.vjp(x, dy, mask=none_kept, training=True)
    infer = layer.vjp(x, dy, training=False)
    for name in train:
        np.testing.assert_allclose(train[name], infer[name], rtol=1e-14)


def test_vjp_fast_variance_equals_two_pass_gradient_on_well_conditioned_data():
    # Both variance formulas are the same function of x wherever var > 0.
    x = np.random.default_rng(3).normal(size=(3, 4, 2))
    dy = np.random.default_rng(4).normal(size=(3, 4, 2))
    a = fresh_layer(2, (0, 1), fast=True).vjp(x, dy)
    b = fresh_layer(2, (0, 1)).vjp(x, dy)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("groups", [None, [[0, 1], [2, 3]], [[0, 2], [1, 3]]])
def test_replica_vjp_is_the_global_batch_gradient(groups):
    """Each replica's x gradient is that of the group's global-batch loss; its
    parameter gradients are its share (their sum is the global one)."""
    rng = np.random.default_rng(5)
    batch_sizes = [2, 3, 1, 2]  # uneven local batches
    xs = [rng.normal(size=(b, 3, 2)) for b in batch_sizes]
    dys = [rng.normal(size=x.shape) for x in xs]
    masks = [rng.random(x.shape[:2]) < 0.8 for x in xs]
    for m in masks:
        m.flat[0] = True
    layers = [fresh_layer(2, (0, 1), axis_name="replicas", axis_index_groups=groups) for _ in xs]
    running = layers[0].running_mean.copy(), layers[0].running_var.copy()

    def group_loss():
        for layer in layers:
            layer.running_mean, layer.running_var = running
        ys = run_replicas(lambda r: layers[r](xs[r], mask=masks[r]), 4)
        return float(sum(np.sum(y * dy) for y, dy in zip(ys, dys)))

    grads = run_replicas(lambda r: layers[r].vjp(xs[r], dys[r], mask=masks[r]), 4)
    for r in range(4):
        np.testing.assert_array_less(relative_error(grads[r]["x"], numeric_gradient(group_loss, xs[r])), BOUND)
    scale = layers[0].scale  # every replica holds the same parameters: perturb them all at once

    def loss_of_scale():
        for layer in layers:
            layer.scale = scale
        return group_loss()

    total = sum(g["scale"] for g in grads)
    assert relative_error(total, numeric_gradient(loss_of_scale, scale)) < BOUND
