"""docs/spec.md section 4 on the NumPy specification: synced statistics are those of the
concatenated local batches of a replica group, weighted by counts.

Tolerance: float64 throughout; the synced sums add the same numbers in another
order than the concatenated reference, so ``rtol=atol=1e-12``.
"""

import threading

import numpy as np
import pytest
from reference import reference

from bn1d.backends.numpy import BatchNorm1d, run_replicas

F64 = dict(rtol=1e-12, atol=1e-12)


def synced_layers(count, groups=None, **kwargs):
    return [
        BatchNorm1d(3, axis_name="batch", axis_index_groups=groups, dtype=np.float64, **kwargs) for _ in range(count)
    ]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("groups", [None, [[0, 1], [2, 3]], [[0, 3], [1, 2]]])
def test_uneven_batches_and_masks_give_the_concatenated_statistics(groups, fast):
    rng = np.random.default_rng(0)
    xs = [rng.normal(r, 1 + r, (b, 5, 3)) for r, b in enumerate([2, 4, 1, 3])]
    masks = [rng.random((x.shape[0], 5)) < 0.5 + 0.1 * r for r, x in enumerate(xs)]
    layers = synced_layers(4, groups, fast_variance=fast)
    ys = run_replicas(lambda r: layers[r](xs[r], mask=masks[r]), 4)
    for group in groups or [[0, 1, 2, 3]]:
        ref_ys, rm, rv = reference(
            [xs[r] for r in group], [masks[r] for r in group], feature_axis=2, fast_variance=fast
        )
        for r, y_ref in zip(group, ref_ys):
            np.testing.assert_allclose(ys[r], y_ref, **F64)
            np.testing.assert_allclose(layers[r].running_mean, rm, **F64)
            np.testing.assert_allclose(layers[r].running_var, rv, **F64)
        # Members of a group hold bitwise-identical statistics.
        for r in group[1:]:
            np.testing.assert_array_equal(layers[r].running_var, layers[group[0]].running_var)


def test_count_weighting_differs_from_averaging_means():
    # Replica 0 holds 1 value per feature, replica 1 holds 9: equal-weight averaging
    # of the per-replica means (BrainPy, Flax) is wrong here; we are not.
    xs = [np.full((1, 1, 3), 10.0), np.zeros((9, 1, 3))]
    layers = synced_layers(2, momentum=0.0)
    run_replicas(lambda r: layers[r](xs[r]), 2)
    np.testing.assert_allclose(layers[0].running_mean, 1.0, **F64)  # (10 + 0*9) / 10, not 5


def test_a_replica_with_an_empty_batch_contributes_nothing():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(3, 5, 3)), np.zeros((0, 5, 3))]
    layers = synced_layers(2)
    ys = run_replicas(lambda r: layers[r](xs[r]), 2)
    (y_ref, _), rm, rv = reference(xs, feature_axis=2)
    np.testing.assert_allclose(ys[0], y_ref, **F64)
    assert ys[1].shape == (0, 5, 3)
    for layer in layers:
        np.testing.assert_allclose(layer.running_mean, rm, **F64)
        np.testing.assert_allclose(layer.running_var, rv, **F64)


def test_one_value_in_the_whole_group_is_no_error():
    # n == 1 is known only at run time under sync: no Bessel factor, no error.
    xs = [np.full((1, 1, 3), 2.0), np.zeros((0, 1, 3))]
    layers = synced_layers(2, momentum=0.0)
    with np.errstate(all="raise"):
        run_replicas(lambda r: layers[r](xs[r]), 2)
    np.testing.assert_allclose(layers[1].running_mean, 2.0, **F64)
    np.testing.assert_allclose(layers[1].running_var, 0.0, **F64)


def test_nothing_kept_anywhere_behaves_as_inference():
    xs = [np.ones((2, 5, 3)), np.ones((2, 5, 3))]
    layers = synced_layers(2)
    with np.errstate(all="raise"):
        ys = run_replicas(lambda r: layers[r](xs[r], mask=np.zeros((2, 5), bool)), 2)
    np.testing.assert_allclose(ys[0], 1 / np.sqrt(1 + 1e-5), **F64)
    np.testing.assert_array_equal(layers[0].running_var, 1.0)


def test_inference_never_communicates():
    # If inference touched the collective, the other replica (which never calls
    # the layer) would leave it waiting: the short timeout would then raise.
    layers = synced_layers(2)
    x = np.ones((2, 5, 3))
    ys = run_replicas(lambda r: layers[r](x, training=False) if r == 0 else None, 2, timeout=2.0)
    np.testing.assert_allclose(ys[0], 1 / np.sqrt(1 + 1e-5), **F64)


def test_a_replica_that_never_calls_raises_instead_of_hanging():
    layers = synced_layers(2)
    with pytest.raises(threading.BrokenBarrierError):
        run_replicas(lambda r: layers[r](np.ones((2, 5, 3))) if r == 0 else None, 2, timeout=1.0)


def test_groups_must_partition_the_replicas():
    layers = synced_layers(4, groups=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"axis_index_groups: expected a partition of range\(2\)"):
        run_replicas(lambda r: layers[r](np.ones((2, 5, 3))), 2)


def test_outside_run_replicas_a_synced_layer_is_a_single_replica():
    x = np.random.default_rng(2).normal(size=(2, 5, 3))
    synced, plain = synced_layers(1)[0], BatchNorm1d(3, dtype=np.float64)
    np.testing.assert_allclose(synced(x), plain(x), **F64)
    np.testing.assert_allclose(synced.running_var, plain.running_var, **F64)


def test_run_replicas_rejects_a_bad_count():
    with pytest.raises(ValueError, match="num_replicas: expected a positive int, got 0"):
        run_replicas(lambda r: r, 0)
