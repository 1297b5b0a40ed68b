"""Data and expected results shared by the JAX replica tests and the 2-process worker.

Four replicas hold two rows each of a global ``(8, 5, 3)`` batch. The expected
values of a replica are those of ONE call of the NumPy specification (float64) on
the concatenated batch of its group: the single-device global-batch result.
Imports no JAX, so a test module can set ``XLA_FLAGS`` after importing it.
"""

from __future__ import annotations

import numpy as np

from bn1d.backends import numpy as spec

NUM_REPLICAS, ROWS_PER_REPLICA = 4, 2

# Float32 against the float64 specification. The statistics sum at most 40 values of
# size ~4; float32 rounds each step at 6e-8 relative. Measured worst absolute errors
# (shard_map, all masks and groups): 6.5e-7 (y), 4e-7 (dx), 1.5e-7 (running
# statistics), 2.5e-6 (dscale, a sum of 40 products of size ~5). 2e-5 absolute plus
# 2e-5 relative leaves at least 8x headroom, while a wrong count, a missing replica
# or an equal-weight mean moves values by > 1e-2.
ATOL, RTOL = 2e-5, 2e-5

GROUPS = {"all": None, "pairs": [[0, 1], [2, 3]]}
_rng = np.random.default_rng(7)
X = (3.0 + 1.5 * _rng.standard_normal((NUM_REPLICAS * ROWS_PER_REPLICA, 5, 3))).astype(np.float32)  # (B, L, C)
DY = _rng.standard_normal(X.shape).astype(np.float32)


def mask_with_counts(counts: list[int]) -> np.ndarray:
    """An (8, 5) mask whose replica r (rows 2r and 2r + 1) keeps ``counts[r]`` scattered positions."""
    order = np.random.default_rng(3).permutation(10)
    return np.concatenate([np.isin(np.arange(10), order[:k]).reshape(2, 5) for k in counts])


MASKS = {
    "none": None,
    "uneven": mask_with_counts([10, 3, 1, 7]),  # uneven within and across the pairs
    "empty_group": mask_with_counts([6, 4, 0, 0]),  # the second pair has n = 0: it behaves as inference
}
STATE = {"running_mean": np.array([0.5, -1.0, 2.0]), "running_var": np.array([2.0, 0.5, 1.5])}
PARAMS = {"scale": np.array([1.5, -0.5, 2.0]), "bias": np.array([0.1, 0.2, -0.3])}
LAYER_KWARGS = dict(momentum=0.9, scale_initializer=PARAMS["scale"], bias_initializer=PARAMS["bias"])


def replica_rows(replica: int) -> np.ndarray:
    return np.arange(replica * ROWS_PER_REPLICA, (replica + 1) * ROWS_PER_REPLICA)


def expected(groups, mask, x=X, dy=DY):
    """``(y, dx, state, grads)``: per-row ``y`` and ``dx``, per-replica running
    statistics ``(4, 3)``, and the parameter gradients summed over all replicas."""
    y, dx = np.zeros(x.shape), np.zeros(x.shape)
    state = {key: np.zeros((NUM_REPLICAS, 3)) for key in STATE}
    grads = {key: np.zeros(3) for key in PARAMS}
    for group in groups or [list(range(NUM_REPLICAS))]:
        rows = np.concatenate([replica_rows(r) for r in group])
        layer = spec.BatchNorm1d(3, dtype=np.float64, **LAYER_KWARGS)
        layer.load_state_dict({**STATE, **PARAMS})
        group_mask = None if mask is None else mask[rows]
        vjp = layer.vjp(x[rows].astype(np.float64), dy[rows].astype(np.float64), mask=group_mask, training=True)
        y[rows] = layer(x[rows].astype(np.float64), mask=group_mask, training=True)
        dx[rows] = vjp["x"]
        for key in grads:
            grads[key] += vjp[key]
        for r in group:
            for key in state:
                state[key][r] = getattr(layer, key)
    return y, dx, state, grads


def assert_matches(groups, mask, y, dx, state, grads) -> None:
    """Outputs of a replicated run (``y``/``dx`` reshapeable to ``X.shape``; ``state``
    per replica or replicated) against :func:`expected`."""
    want_y, want_dx, want_state, want_grads = expected(groups, mask)
    close = lambda got, want, what: np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=what)
    close(np.asarray(y).reshape(X.shape), want_y, "y")
    close(np.asarray(dx).reshape(X.shape), want_dx, "dx")
    for key in want_state:
        close(np.broadcast_to(np.asarray(state[key]), (NUM_REPLICAS, 3)), want_state[key], key)
    for key in want_grads:
        close(np.asarray(grads[key]), want_grads[key], f"d{key}")
