"""The core's one-round ``all_gather`` hook (what ``torch.distributed`` uses) gives
the statistics of the concatenated batches, like the two-round ``all_sum`` spec.

Replicas are the NumPy specification's threads (``run_replicas(..., hook=...)``),
each a synced float64 layer. Tolerance: float64 throughout; the
gathered statistics add the same numbers in another order than the
concatenated reference (``tests/reference.py``), so ``rtol=atol=1e-12``.
"""

import numpy as np
import pytest
from reference import reference

from bn1d import BatchNormConfig, Hooks, batch_norm
from bn1d.algorithm import combine_moments
from bn1d.backends.numpy import BatchNorm1d, run_replicas

F64 = dict(rtol=1e-12, atol=1e-12)


def gathered_replicas(xs, masks, *, hook="all_gather", **options):
    """One float64 synced training call per replica through ``hook``; returns the
    outputs, the layers and how many arrays each exchange carried."""
    layers = [BatchNorm1d(3, axis_name="r", dtype=np.float64, **options) for _ in xs]
    calls = [[] for _ in xs]

    def replica(r):
        layer = layers[r]
        original = layer._hooks

        def counted(training):  # count what each exchange carries
            hooks = original(training)
            exchange = getattr(hooks, hook)

            def counting(arrays):
                calls[r].append(len(arrays))
                return exchange(arrays)

            return hooks._replace(**{hook: counting})

        layer._hooks = counted
        return layer(xs[r], mask=masks[r])

    return run_replicas(replica, len(xs), hook=hook), layers, calls


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_gather_gives_the_concatenated_statistics(fast, masked):
    rng = np.random.default_rng(0)
    xs = [rng.normal(r, 1 + r, (b, 5, 3)) for r, b in enumerate([2, 4, 0, 3])]  # replica 2 is empty
    masks = [rng.random((x.shape[0], 5)) < 0.6 for x in xs] if masked else [None] * 4
    ys, layers, calls = gathered_replicas(xs, masks, fast_variance=fast)
    ref_ys, rm, rv = reference(xs, None if not masked else masks, feature_axis=2, fast_variance=fast)
    summed, summed_layers, _ = gathered_replicas(xs, masks, hook="all_sum", fast_variance=fast)
    for r, (y, layer, y_ref) in enumerate(zip(ys, layers, ref_ys)):
        np.testing.assert_allclose(y, y_ref, **F64, err_msg=f"replica {r}")
        np.testing.assert_allclose(layer.running_mean, rm, **F64)
        np.testing.assert_allclose(layer.running_var, rv, **F64)
        np.testing.assert_array_equal(layer.running_var, layers[0].running_var)  # bitwise-equal across replicas
        np.testing.assert_allclose(y, summed[r], **F64)  # the one-round hook gives what the two-round one gives
        np.testing.assert_allclose(layer.running_var, summed_layers[r].running_var, **F64)
    assert calls == [[3 if fast else 4]] * 4  # one round: (count, sum, sum of squares) or (count, shift, S1, S2)


def test_gather_with_nothing_kept_anywhere_behaves_as_inference():
    xs = [np.ones((2, 5, 3)), np.ones((1, 5, 3))]
    with np.errstate(all="raise"):
        ys, layers, _ = gathered_replicas(xs, [np.zeros((2, 5), bool), np.zeros((1, 5), bool)])
    np.testing.assert_allclose(ys[0], 1 / np.sqrt(1 + 1e-5), **F64)
    np.testing.assert_array_equal(layers[1].running_var, 1.0)
    np.testing.assert_array_equal(layers[1].running_mean, 0.0)


def test_gather_with_one_value_in_the_group_has_no_bessel_factor():
    xs = [np.full((1, 1, 3), 2.0), np.zeros((0, 1, 3))]
    with np.errstate(all="raise"):
        _, layers, _ = gathered_replicas(xs, [None, None], momentum=0.0)
    np.testing.assert_allclose(layers[1].running_mean, 2.0, **F64)
    np.testing.assert_allclose(layers[1].running_var, 0.0, **F64)


def test_combine_moments_is_stable_where_the_one_pass_formula_cancels():
    # Mean 1e3, standard deviation 1e-1, float32 per-batch statistics: E[x^2] - E[x]^2
    # loses every digit (eps * mean^2 / var = 6e-8 * 1e8 = 6 relative); the
    # combination only adds non-negative terms. Its error comes from the float32
    # means, off by up to half an ulp (d = 3e-5 at 1e3): each n_r (mu_r - mu)^2 moves
    # by about n_r (2 |mu_r - mu| d + d^2), against n * var = n * 1e-2. Measured:
    # 2.4e-6 relative; rtol 1e-4 leaves a factor 40.
    rng = np.random.default_rng(2)
    batches = [(1e3 + 1e-1 * rng.standard_normal((n, 2))) for n in (1000, 10, 1, 0)]
    counts = np.array([len(b) for b in batches], np.float32)
    means = np.stack([b.mean(0) if len(b) else np.zeros(2) for b in batches]).astype(np.float32)
    squares = np.stack([((b - b.mean(0)) ** 2).sum(0) if len(b) else np.zeros(2) for b in batches]).astype(np.float32)
    n, mean, var = combine_moments(counts, means, squares)
    everything = np.concatenate(batches)
    assert n == len(everything)
    np.testing.assert_allclose(mean, everything.mean(0), rtol=1e-7)
    np.testing.assert_allclose(var, everything.var(0), rtol=1e-4)
    one_pass = (counts[:, None] * (means.astype(np.float32) ** 2)).sum(0) / n - mean**2
    assert np.max(np.abs(one_pass - everything.var(0)) / everything.var(0)) > 1  # what the combination avoids


def test_combine_moments_of_no_values_is_zero():
    n, mean, var = combine_moments(np.zeros(2), np.zeros((2, 3)), np.zeros((2, 3)))
    assert n == 0
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(var, 0.0)


def test_one_hook_at_a_time():
    config = BatchNormConfig.from_arguments(3, axis=0)
    state = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    params = {"scale": np.ones(3), "bias": np.zeros(3)}
    with pytest.raises(ValueError, match="^hooks: expected at most one of all_sum and all_gather"):
        batch_norm(np.ones((2, 3)), params, state, config, training=True, hooks=Hooks(all_sum=tuple, all_gather=tuple))
