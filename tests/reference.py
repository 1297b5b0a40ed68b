"""An independent float64 re-derivation of batch normalization for the tests.

It shares no code with bn1d: the feature axis is moved last, the unmasked rows
are selected, and NumPy's own ``mean``/``var`` give the statistics. Replicas
are handled by concatenating the rows of a group, which is what the synced
statistics are defined to be.
"""

from __future__ import annotations

import numpy as np


def rows(x, mask, feature_axis):
    """(positions, C) float64 rows of x, only the unmasked positions."""
    moved = np.moveaxis(np.asarray(x, dtype=np.float64), feature_axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    if mask is None:
        return flat
    return flat[np.asarray(mask).reshape(-1)]


def reference(
    xs,
    masks=None,
    *,
    feature_axis,
    scale=None,
    bias=None,
    running_mean=None,
    running_var=None,
    epsilon=1e-5,
    momentum=0.99,
    training=True,
    fast_variance=False,
    unbiased=True,
):
    """Outputs for each batch in ``xs`` (one group of replicas) and the new running stats.

    ``xs`` is a list of local batches; ``masks`` a matching list or None.
    """
    masks = masks if masks is not None else [None] * len(xs)
    c = np.shape(xs[0])[feature_axis]
    rm = np.zeros(c) if running_mean is None else np.asarray(running_mean, np.float64)
    rv = np.ones(c) if running_var is None else np.asarray(running_var, np.float64)
    data = np.concatenate([rows(x, m, feature_axis) for x, m in zip(xs, masks)])
    n = data.shape[0]
    if training and n > 0:
        mean = data.mean(axis=0)
        var = np.maximum((data**2).mean(axis=0) - mean**2, 0) if fast_variance else data.var(axis=0)
        bessel = n / (n - 1) if unbiased and n > 1 else 1.0
        new_rm = momentum * rm + (1 - momentum) * mean
        new_rv = momentum * rv + (1 - momentum) * var * bessel
    else:
        mean, var, new_rm, new_rv = rm, rv, rm, rv
    shape = [1] * np.ndim(xs[0])
    shape[feature_axis] = c
    g = np.ones(c) if scale is None else np.asarray(scale, np.float64)
    b = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
    ys = [
        (np.asarray(x, np.float64) - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon) * g.reshape(shape)
        + b.reshape(shape)
        for x in xs
    ]
    return ys, new_rm, new_rv
