"""bn1d against the layers it replaces, on random cases (tox env ``peers``):

* ``brainpy.dnn.BatchNorm1d`` 2.8.2 with ``fast_variance=True`` (BrainPy's formula;
  unbiased running variance with the local count, as BrainPy >= 2.8 without sync);
* Flax linen ``BatchNorm`` with ``unbiased_running_var=False`` (Flax's running
  variance is biased), in both of Flax's variance modes;
* ``torch.nn.BatchNorm1d`` through the converter ``BatchNorm1d.from_torch``.

Each comparison runs several training steps and then inference, and prints the
largest difference. Tolerance: both sides compute in float32 with sums of at most
a few hundred terms (relative error ~1e-6 on unit data), and their orders of
operations differ, so outputs and statistics agree within 2e-5.
"""

import numpy as np
import pytest

from bn1d.backends import jax as bn1d_jax
from bn1d.backends import numpy as bn1d_numpy
from bn1d.backends import torch as bn1d_torch

TOL = 2e-5
SHAPES = [(4, 5, 3), (8, 16, 6), (2, 33, 5)]


def batches(shape, seed, steps=3):
    rng = np.random.default_rng(seed)
    return [rng.normal(rng.uniform(-2, 2), rng.uniform(0.5, 3), shape).astype(np.float32) for _ in range(steps)]


def report(peer, diffs):
    worst = max(diffs)
    print(f"\n{peer}: largest difference {worst:.2e} over {len(diffs)} comparisons (tolerance {TOL:.0e})")
    assert worst <= TOL


def diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_brainpy(shape, seed):
    import brainpy as bp
    import brainpy.math as bm  # noqa: F401  (BrainPy's arrays)

    c = shape[-1]
    rng = np.random.default_rng(seed + 100)
    peer = bp.dnn.BatchNorm1d(c, momentum=0.9, epsilon=1e-4)
    peer.scale.value = rng.uniform(0.5, 2, c).astype(np.float32)
    peer.bias.value = rng.normal(size=c).astype(np.float32)
    spec = bn1d_numpy.BatchNorm1d(c, momentum=0.9, epsilon=1e-4, fast_variance=True)
    spec.load_state_dict(bn1d_jax.BatchNorm1d.from_brainpy(peer).state_dict())
    ported = bn1d_jax.BatchNorm1d.from_brainpy(peer)
    diffs = []
    for x in batches(shape, seed):
        bp.share.save(fit=True)
        y_peer = np.asarray(peer(x))
        for ours in (spec(x), ported(x)):
            diffs.append(diff(ours, y_peer))
        for key in ("running_mean", "running_var"):
            want = np.asarray(getattr(peer, key).value)
            diffs += [diff(spec.state_dict()[key], want), diff(ported.state_dict()[key], want)]
    bp.share.save(fit=False)
    x = batches(shape, seed + 7, 1)[0]
    y_peer = np.asarray(peer(x))
    diffs += [diff(spec(x, training=False), y_peer), diff(ported(x, training=False), y_peer)]
    report("brainpy.dnn.BatchNorm1d", diffs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fast", [True, False])
def test_flax(shape, fast):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    c = shape[-1]
    module = nn.BatchNorm(momentum=0.9, epsilon=1e-4, use_fast_variance=fast)
    xs = batches(shape, 3)
    variables = module.init(jax.random.key(0), jnp.asarray(xs[0]), use_running_average=False)
    rng = np.random.default_rng(4)
    variables = {
        "params": {
            "scale": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=c), jnp.float32),
        },
        "batch_stats": variables["batch_stats"],
    }
    ported = bn1d_jax.BatchNorm1d.from_flax(variables, momentum=0.9, epsilon=1e-4, fast_variance=fast)
    spec = bn1d_numpy.BatchNorm1d(c, momentum=0.9, epsilon=1e-4, fast_variance=fast, unbiased_running_var=False)
    spec.load_state_dict(ported.state_dict())
    diffs = []
    for x in xs:
        y_peer, updates = module.apply(variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
        variables = {**variables, **updates}
        diffs += [diff(spec(x), y_peer), diff(ported(x), y_peer)]
        flax_state = ported.from_flax(variables, momentum=0.9, epsilon=1e-4).state_dict()
        for key in ("running_mean", "running_var"):
            diffs += [diff(spec.state_dict()[key], flax_state[key]), diff(ported.state_dict()[key], flax_state[key])]
    x = batches(shape, 9, 1)[0]
    y_peer = module.apply(variables, jnp.asarray(x), use_running_average=True)
    diffs += [diff(spec(x, training=False), y_peer), diff(ported(x, training=False), y_peer)]
    report(f"flax.linen.BatchNorm(use_fast_variance={fast})", diffs)


@pytest.mark.parametrize("shape", [(4, 3, 5), (8, 6, 16), (16, 5)])
def test_torch_nn(shape):
    import torch

    c = shape[1]
    torch.manual_seed(0)
    peer = torch.nn.BatchNorm1d(c, momentum=0.2, eps=1e-4)
    with torch.no_grad():
        peer.weight.uniform_(0.5, 2)
        peer.bias.normal_()
    ported = bn1d_torch.BatchNorm1d.from_torch(peer, axis=(0, 2) if len(shape) == 3 else 0)
    axis = (0, 2) if len(shape) == 3 else 0
    spec = bn1d_numpy.BatchNorm1d(c, axis=axis, momentum=0.8, epsilon=1e-4)
    spec.load_state_dict({k: v.detach().numpy() for k, v in ported.state_dict().items()})
    diffs = []
    for x in batches(shape, 5, steps=4):
        y_peer = peer(torch.from_numpy(x)).detach().numpy()
        diffs += [diff(spec(x), y_peer), diff(ported(torch.from_numpy(x)).detach().numpy(), y_peer)]
        for key in ("running_mean", "running_var"):
            want = getattr(peer, key).numpy()
            diffs += [diff(spec.state_dict()[key], want), diff(ported.state_dict()[key].numpy(), want)]
    peer.eval()
    ported.eval()
    x = batches(shape, 11, 1)[0]
    y_peer = peer(torch.from_numpy(x)).detach().numpy()
    diffs += [diff(spec(x, training=False), y_peer), diff(ported(torch.from_numpy(x)).detach().numpy(), y_peer)]
    back = ported.to_torch()
    for key in ("weight", "bias", "running_mean", "running_var"):
        diffs.append(diff(getattr(back, key).detach().numpy(), getattr(peer, key).detach().numpy()))
    assert int(back.num_batches_tracked) == int(peer.num_batches_tracked) == 4
    report("torch.nn.BatchNorm1d", diffs)
