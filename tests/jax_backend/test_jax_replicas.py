"""Cross-replica statistics of the JAX backend over 4 CPU devices (docs/spec.md section 4).

Under ``jax.vmap``, ``jax.pmap`` and ``jax.shard_map``, with and without
``axis_index_groups=[[0, 1], [2, 3]]`` and with uneven masked counts, every
replica's output, running statistics and gradients must equal those of ONE call
of the NumPy specification (float64) on the concatenated batch of its group.

XLA_FLAGS must give 4 host devices before JAX's backend starts. This module sets
it; if JAX was started earlier with fewer devices (another test module used it
first), the decorated tests run once more in a fresh interpreter and each test
here reports its own outcome there. A fresh interpreter that still sees fewer
than 4 devices fails: nothing is skipped.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "jax_workers"))
from replica_cases import (  # noqa: E402  (imports no JAX)
    ATOL,
    DY,
    GROUPS,
    LAYER_KWARGS,
    MASKS,
    NUM_REPLICAS,
    PARAMS,
    RTOL,
    STATE,
    X,
    assert_matches,
    expected,
)  # fmt: skip

NUM_DEVICES = NUM_REPLICAS
_DEVICE_FLAG = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from bn1d.backends import numpy as spec  # noqa: E402
from bn1d.backends.jax import BatchNorm1d  # noqa: E402
from bn1d.backends.jax_distributed import shard_map_apply  # noqa: E402

_IN_FRESH_PROCESS = "BN1D_JAX_FRESH_PROCESS"


@functools.cache
def _failures_in_fresh_process() -> dict[str, str | None]:
    """Run this module once in a new interpreter; {test name: failure text, None if passed}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        env = {**os.environ, "XLA_FLAGS": _DEVICE_FLAG, _IN_FRESH_PROCESS: "1"}
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", __file__],
            env=env, capture_output=True, text=True, timeout=300,  # this cwd: under tox, the installed bn1d
        )  # fmt: skip
        if not os.path.exists(report):
            return {"": f"the fresh process wrote no report:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"}
        failures: dict[str, str | None] = {}
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
            failures[case.get("name", "")] = None if problem is None else f"{problem.tag}: {problem.text}"
        return failures


def on_four_devices(test):
    """Run ``test`` here when JAX has 4 devices, else take its outcome from a fresh process."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        if jax.device_count() >= NUM_DEVICES:
            return test(*args, **kwargs)
        if os.environ.get(_IN_FRESH_PROCESS):
            pytest.fail(
                f"{jax.device_count()} JAX devices with XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}; need {NUM_DEVICES}"
            )
        name = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].rsplit(" ", 1)[0]
        failures = _failures_in_fresh_process()
        failure = failures.get(name, f"{name} did not run in the fresh process: {failures}")
        if failure is not None:
            pytest.fail(f"in a fresh {NUM_DEVICES}-device process: {failure}")

    return run


def jax_layer(groups, axis_name="i") -> BatchNorm1d:
    layer = BatchNorm1d(3, axis_name=axis_name, axis_index_groups=groups, **LAYER_KWARGS)
    layer.load_state_dict({**STATE, **PARAMS})
    return layer


def per_replica(a):  # (8, ...) -> (4, 2, ...)
    return None if a is None else a.reshape(NUM_DEVICES, -1, *a.shape[1:])


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("groups_name", GROUPS)
@on_four_devices
def test_vmap_equals_global_batch(groups_name, mask_name):
    groups, mask = GROUPS[groups_name], MASKS[mask_name]
    layer = jax_layer(groups)

    def loss(params, xs):
        apply = lambda x, m: layer.apply(params, layer.state, x, mask=m, training=True)
        ys, states = jax.vmap(apply, axis_name="i")(xs, None if mask is None else per_replica(mask))
        return jnp.sum(ys * per_replica(DY)), (ys, states)

    (grads, dx), (y, state) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(layer.params, per_replica(X))
    assert_matches(groups, mask, y, dx, state, grads)


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("groups_name", GROUPS)
@on_four_devices
def test_pmap_equals_global_batch(groups_name, mask_name):
    groups, mask = GROUPS[groups_name], MASKS[mask_name]
    layer = jax_layer(groups)

    def replica(params, x, dy, *m):  # the mask is left out, not None: jax 0.10.2's pmap
        # mis-sizes its device mesh for a None argument in this function (IndivisibleError).
        def loss(params, x):
            y, new_state = layer.apply(params, layer.state, x, mask=m[0] if m else None, training=True)
            return jnp.sum(y * dy), (y, new_state)

        (grads, dx), (y, new_state) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, dx, new_state, grads

    masks = () if mask is None else (per_replica(mask),)
    y, dx, state, grads = jax.pmap(replica, axis_name="i", in_axes=(None, 0, 0) + (0,) * len(masks))(
        layer.params, per_replica(X), per_replica(DY), *masks
    )
    # Under pmap each replica differentiates its own loss: dx is the global gradient
    # (psum's transpose is psum), the parameter gradients are per-replica shares.
    assert_matches(groups, mask, y, dx, state, jax.tree.map(lambda g: g.sum(axis=0), grads))


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize(
    "groups_name",
    [pytest.param(name, marks=pytest.mark.jax_leak_checker_false_positive if name == "all" else ()) for name in GROUPS],
)  # ungrouped: one psum inside the jax.checkpoint, which JAX 0.10.2's leak checker misreports
@on_four_devices
def test_shard_map_equals_global_batch(groups_name, mask_name):
    groups, mask = GROUPS[groups_name], MASKS[mask_name]
    layer = jax_layer(groups, axis_name="batch")
    mesh = jax.make_mesh((NUM_DEVICES,), ("batch",))
    step = shard_map_apply(layer, mesh)

    def loss(params, x):
        y, new_state = step(params, layer.state, x, mask)
        return jnp.sum(y * DY), (y, new_state)

    (grads, dx), (y, state) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(layer.params, X)
    assert y.sharding.spec[0] == "batch"  # the output stays split over the devices
    assert_matches(groups, mask, y, dx, state, grads)


@pytest.mark.parametrize("groups_name", GROUPS)
@on_four_devices
def test_tuple_axis_name_on_a_2x2_mesh_and_nested_vmap(groups_name):
    """``axis_name=("a", "b")`` spans both axes; replica index = a * 2 + b in both forms."""
    groups, mask = GROUPS[groups_name], MASKS["uneven"]
    layer = jax_layer(groups, axis_name=("a", "b"))
    want_y, _, want_state, _ = expected(groups, mask)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((2, 2), ("a", "b"), axis_types=(axis_type,) * 2)
        y, state = shard_map_apply(layer, mesh)(layer.params, layer.state, X, mask)
        np.testing.assert_allclose(np.asarray(y), want_y, atol=ATOL, rtol=RTOL)
        got = np.broadcast_to(np.asarray(state["running_var"]), (NUM_DEVICES, 3))
        np.testing.assert_allclose(got, want_state["running_var"], atol=ATOL, rtol=RTOL)

    apply = lambda x, m: layer.apply(layer.params, layer.state, x, mask=m, training=True)
    nested = jax.vmap(jax.vmap(apply, axis_name="b"), axis_name="a")
    y, state = jax.jit(nested)(X.reshape(2, 2, 2, 5, 3), mask.reshape(2, 2, 2, 5))
    np.testing.assert_allclose(np.asarray(y).reshape(X.shape), want_y, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(state["running_mean"]).reshape(4, 3), want_state["running_mean"], atol=ATOL)


@on_four_devices
def test_channel_first_layout_under_shard_map():
    """``axis=(0, 2)`` on ``(B, C, L)``: the batch axis is split, the mask follows it."""
    mask = MASKS["uneven"]
    layer = BatchNorm1d(3, axis=(0, 2), axis_name="batch", **LAYER_KWARGS)
    layer.load_state_dict({**STATE, **PARAMS})
    mesh = jax.make_mesh((NUM_DEVICES,), ("batch",))
    y, state = shard_map_apply(layer, mesh)(layer.params, layer.state, X.transpose(0, 2, 1), mask)
    want_y, _, want_state, _ = expected(None, mask)
    np.testing.assert_allclose(np.asarray(y), want_y.transpose(0, 2, 1), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(state["running_mean"]), want_state["running_mean"][0], atol=ATOL)


@pytest.mark.parametrize("transform", ["vmap", "pmap", "shard_map"])
@on_four_devices
def test_groups_that_do_not_partition_the_axis_raise_at_trace_time(transform):
    layer = jax_layer([[0, 1]])  # valid on its own (a partition of range(2)); the axis has 4 replicas
    apply = lambda x: layer.apply(layer.params, layer.state, x, training=True)
    with pytest.raises(ValueError, match=r"^axis_index_groups: expected a partition of range\(4\)"):
        if transform == "vmap":
            jax.jit(jax.vmap(apply, axis_name="i"))(per_replica(X))
        elif transform == "pmap":
            jax.pmap(apply, axis_name="i")(per_replica(X))
        else:
            shard_map_apply(layer, jax.make_mesh((NUM_DEVICES,), ("i",)))(layer.params, layer.state, X)


@on_four_devices
def test_inference_runs_no_collective_and_ignores_the_batch():
    layer = jax_layer(GROUPS["pairs"])
    jaxpr = lambda training: str(
        jax.make_jaxpr(jax.vmap(lambda x: layer.apply(layer.params, layer.state, x, training=training), axis_name="i"))(
            per_replica(X)
        )
    )
    assert "psum" in jaxpr(True) and "psum" not in jaxpr(False)
    apply = lambda x: layer.apply(layer.params, layer.state, x, training=False)
    y, state = jax.pmap(apply, axis_name="i")(per_replica(X))
    inference = spec.BatchNorm1d(3, dtype=np.float64, mode="inference", **LAYER_KWARGS)
    inference.load_state_dict({**STATE, **PARAMS})
    np.testing.assert_allclose(np.asarray(y).reshape(X.shape), inference(X.astype(np.float64)), atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(np.asarray(state["running_var"][2]), np.float32(STATE["running_var"]))


def test_unbound_axis_name_is_a_clear_error():
    layer = jax_layer(None, axis_name="not_bound")
    with pytest.raises(ValueError, match=r"^axis_name: expected an axis bound by jax.vmap, jax.pmap or jax.shard_map"):
        jax.jit(lambda x: layer.apply(layer.params, layer.state, x, training=True))(X)
    y, _ = layer.apply(layer.params, layer.state, X, training=False)  # inference needs no axis
    assert y.shape == X.shape


# -- the accuracy rule on raw data, synced ------------------------------------------------

RAW_ROWS, RAW_LENGTH = 16, 4096  # per replica: 2**16 values per feature, 2**17 per group of two


def raw_replicas():
    """4 replicas of un-centred float32 data (means 1e4 + r, std 1), keeping 100/50/75/25%."""
    from bn1d.conformance.accuracy import raw_data

    x = np.concatenate([raw_data((RAW_ROWS, RAW_LENGTH, 4), 1e4 + r, seed=40 + r) for r in range(4)])
    rng = np.random.default_rng(50)
    mask = np.concatenate([rng.random((RAW_ROWS, RAW_LENGTH)) < keep for keep in (1.0, 0.5, 0.75, 0.25)])
    dy = rng.standard_normal(x.shape)
    return x.astype(np.float32), mask, dy.astype(np.float32)


def assert_rule(groups, x, mask, dy, y, dx, state, grads, totals=False):
    """Each group against the float64 specification on its concatenated batch, in the
    rule's metrics (``bn1d.conformance.accuracy``; 1e-5 each, JAX's float32 sums).
    ``grads`` are per replica, or (``totals``: shard_map's gradient of a replicated
    parameter) every device's sum over all replicas."""
    from bn1d.conformance.accuracy import RULE, forward_errors, gradient_errors, statistics64

    rows = RAW_ROWS
    want_totals = {k: 0.0 for k in grads}
    scales = {k: 0.0 for k in grads}
    for group in groups or [list(range(NUM_REPLICAS))]:
        index = np.concatenate([np.arange(r * rows, (r + 1) * rows) for r in group])
        x_g, m_g, dy_g = x[index], mask[index], dy[index].astype(np.float64)
        want = spec.BatchNorm1d(4, dtype=np.float64).vjp(x_g.astype(np.float64), dy_g, mask=m_g)
        got = {"x": np.asarray(dx)[index]}
        if not totals:
            got.update({k: np.asarray(v)[group].sum(axis=0) for k, v in grads.items()})
        for r in group:
            errors = forward_errors(x_g, np.asarray(y)[index], np.asarray(state["running_mean"])[r],
                                    np.asarray(state["running_var"])[r], feature_axis=2, mask=m_g)  # fmt: skip
            errors.update(gradient_errors(x_g, dy_g, got, want, feature_axis=2, mask=m_g))
            assert max(errors.values()) <= RULE, (group, errors)
        _, mean, var = statistics64(x_g, m_g, 2)
        xhat = (x_g - mean) / np.sqrt(var + 1e-5)
        for key, terms in (("scale", dy_g * xhat), ("bias", dy_g)):
            want_totals[key] += want[key]
            scales[key] += np.abs(terms).sum(axis=(0, 1))
    if totals:  # the same metric, for the sums over all replicas
        for key in grads:
            error = np.abs(np.asarray(grads[key])[0] - want_totals[key]) / scales[key]
            assert error.max() <= RULE, (key, error)


@pytest.mark.parametrize("transform", ["vmap", "pmap", "shard_map"])
@on_four_devices
def test_raw_data_meet_the_accuracy_rule_under_every_transform_with_groups(transform):
    x, mask, dy = raw_replicas()
    groups = GROUPS["pairs"]
    layer = BatchNorm1d(4, momentum=0.0, axis_name="i", axis_index_groups=groups)

    def replica(params, x, dy, m):  # one replica's loss and gradients
        def loss(params, x):
            y, new_state = layer.apply(params, layer.state, x, mask=m, training=True)
            return jnp.sum(y * dy), (y, new_state)

        (grads, dx), (y, new_state) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, dx, new_state, grads

    split = lambda a: a.reshape(NUM_DEVICES, -1, *a.shape[1:])  # noqa: E731
    if transform == "shard_map":
        mesh = jax.make_mesh((NUM_DEVICES,), ("i",))
        spec_ = jax.sharding.PartitionSpec("i")
        step = jax.shard_map(
            lambda p, x, dy, m: jax.tree.map(lambda v: v[None] if v.ndim == 1 else v, replica(p, x, dy, m)),
            mesh=mesh, in_specs=(jax.sharding.PartitionSpec(), spec_, spec_, spec_), out_specs=spec_,
        )  # fmt: skip
        place = lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec_))  # noqa: E731
        y, dx, state, grads = jax.jit(step)(layer.params, place(x), place(dy), place(mask))
        np.testing.assert_array_equal(np.asarray(grads["scale"])[0], np.asarray(grads["scale"])[3])  # psummed
    else:
        mapped = (jax.vmap if transform == "vmap" else jax.pmap)(replica, axis_name="i", in_axes=(None, 0, 0, 0))
        y, dx, state, grads = (jax.jit(mapped) if transform == "vmap" else mapped)(
            layer.params, split(x), split(dy), split(mask)
        )
        y, dx = np.asarray(y).reshape(x.shape), np.asarray(dx).reshape(x.shape)
    assert_rule(groups, x, mask, dy, y, dx, state, grads, totals=transform == "shard_map")
