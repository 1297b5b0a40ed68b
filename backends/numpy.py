r"""The NumPy backend: the executable specification of ``BatchNorm1d``.

Read this module to learn what bn1d computes. For an input ``x`` whose feature
axis is the one axis *not* listed in ``axis`` (``(B, L, C)`` with the default
``axis=(0, 1)``; ``(B, C)`` with ``axis=0``; PyTorch's ``(B, C, L)`` with
``axis=(0, 2)``), per feature and over the ``n`` unmasked positions of all
synced replicas:

Training (``mode=None``, ``training=True`` or after ``.train()``)::

    mean = sum(x) / n
    var  = sum((x - mean) ** 2) / n              # biased
    y    = (x - mean) * (scale / sqrt(var + epsilon)) + bias
    running_mean = momentum * running_mean + (1 - momentum) * mean
    running_var  = momentum * running_var  + (1 - momentum) * var * n / (n - 1)

Inference (``mode="inference"``, ``training=False`` or after ``.eval()``)::

    y = (x - running_mean) * (scale / sqrt(running_var + epsilon)) + bias

computed as :mod:`bn1d.algorithm` says (shifted sums accumulated in float64, the
mean never rounded to the input's precision): the float32 results are within
~1e-6 of the float64 computation on raw data (|mean| / std up to 1e4, 2**18 values
per feature; ``docs/numerics.md``).

Deviations, on purpose:

* ``momentum`` is the weight of the *old* statistic (BrainPy, Flax, Keras):
  0.99 here is PyTorch's 0.01.
* The variance is exact; BrainPy and Flax use ``max(0, E[x^2] - mean^2)``,
  which returns 0 in float32 at mean 1e4 and std 1e-2. ``fast_variance=True``
  selects that formula and reproduces BrainPy's numbers.
* The running variance is unbiased (BrainPy >= 2.8, PyTorch); Flax, Keras and
  BrainPy <= 2.7 use the biased one: ``unbiased_running_var=False``. Under sync,
  ``n`` is the global count (BrainPy 2.8.2 uses the per-replica count).
* Synced statistics weight each replica by its count (BrainPy and Flax average
  per-replica means with equal weights, wrong when counts differ).
* float16/bfloat16 inputs are reduced in float32 (BrainPy and Haiku do not).
* A batch with no unmasked position behaves as inference and leaves the
  running statistics unchanged (Flax, Keras, Equinox and Haiku write NaN).
* Negative ``axis`` values work (BrainPy 2.8.2 fails on them) and any layout
  with one feature axis is accepted (BrainPy takes only ``(B, L, C)``).

Worked example (SPEC section 8)::

    >>> import numpy as np
    >>> from bn1d.backends.numpy import BatchNorm1d
    >>> x = np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32)
    >>> layer = BatchNorm1d(3)
    >>> y = layer(x)
    >>> np.round(layer.running_mean, 6)
    array([0.000188, 0.000142, 0.001989], dtype=float32)
    >>> np.round(y[3, 4], 5)
    array([ 0.5975 , -1.58768, -1.17152], dtype=float32)
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bn1d.algorithm import AllGather, AllSum, batch_moments, batch_norm, check_inputs, compute_dtype
from bn1d.config import BatchNormConfig, argument_error
from bn1d.initializers import Ones, Zeros, initial_value
from bn1d.protocol import TrainingSwitch
from bn1d.state import check_state, state_keys

__all__ = ["BatchNorm1d", "batch_norm_vjp", "run_replicas"]

_PARAM_DTYPES = (np.float32, np.float64)


class BatchNorm1d(TrainingSwitch):
    """1-D batch normalization with BrainPy's signature, on NumPy arrays.

    Parameters are those of ``brainpy.dnn.BatchNorm1d``; keyword-only extras:
    ``dtype`` of ``scale``, ``bias`` and the running statistics (float32 or
    float64), ``fast_variance`` and ``unbiased_running_var`` (see the module
    docstring). ``mode`` is ``None``/``"training"`` or ``"inference"``; ``train()``,
    ``eval()`` and each call's ``training=`` switch it too.

    With ``axis_name`` set, statistics are summed over the replicas that
    :func:`run_replicas` simulates (one replica outside it).
    """

    def __init__(
        self,
        num_features: int,
        axis: int | Sequence[int] = (0, 1),
        epsilon: float = 1e-5,
        momentum: float = 0.99,
        affine: bool = True,
        bias_initializer: Any = Zeros(),
        scale_initializer: Any = Ones(value=1.0),
        axis_name: str | Sequence[str] | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        mode: str | None = None,
        name: str | None = None,
        *,
        dtype: Any = np.float32,
        fast_variance: bool = False,
        unbiased_running_var: bool = True,
    ):
        self.config = BatchNormConfig.from_arguments(
            num_features, axis, epsilon, momentum, affine, axis_name, axis_index_groups, mode, name,
            fast_variance=fast_variance, unbiased_running_var=unbiased_running_var,
        )  # fmt: skip
        if not any(dtype is d or dtype == np.dtype(d) for d in _PARAM_DTYPES):
            raise argument_error("dtype", "numpy.float32 or numpy.float64", dtype, TypeError)
        self.dtype = np.dtype(dtype)
        c = self.config.num_features
        if affine:
            self.scale = initial_value(scale_initializer, "scale_initializer", c, self.dtype)
            self.bias = initial_value(bias_initializer, "bias_initializer", c, self.dtype)
        self.running_mean = np.zeros(c, self.dtype)
        self.running_var = np.ones(c, self.dtype)
        self.training = self.config.training

    # -- the uniform layer protocol -------------------------------------------------
    def __call__(self, x: Any, mask: Any = None, training: bool | None = None) -> np.ndarray:
        """``y`` for ``x``; in training also updates ``running_mean``/``running_var``."""
        x, mask, training = self._check_call(x, mask, training, check=False)  # batch_norm checks first
        result = batch_norm(
            x, self.running_mean, self.running_var, *self._affine_params(),
            reduce_axes=self.config.reduce_axes, epsilon=self.config.epsilon,
            momentum=self.config.momentum, training=training, mask=mask,
            fast_variance=self.config.fast_variance,
            unbiased_running_var=self.config.unbiased_running_var,
            **(self._replica_hooks() if training else {}),
        )  # fmt: skip
        self.running_mean, self.running_var = result.running_mean, result.running_var
        return result.y

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of ``scale``, ``bias`` (when affine), ``running_mean``, ``running_var``."""
        return {key: np.array(getattr(self, key)) for key in state_keys(self.config.affine)}

    def load_state_dict(self, state: Any) -> None:
        """Load a state strictly and atomically (see ``bn1d.state.check_state``)."""
        for key, value in check_state(
            state, num_features=self.config.num_features, affine=self.config.affine, dtype=self.dtype
        ).items():
            setattr(self, key, value)

    # -- the gradient specification -----------------------------------------------
    def vjp(self, x: Any, dy: Any, mask: Any = None, training: bool | None = None) -> dict[str, np.ndarray]:
        """Gradients of ``sum(y * dy)`` w.r.t. ``x``, ``scale`` and ``bias`` at the
        current state; no state changes. Under :func:`run_replicas` the ``x``
        gradient is that of the global-batch computation and the parameter
        gradients are this replica's share (sum them over replicas)."""
        x, mask, training = self._check_call(x, mask, training)
        dy = np.asarray(dy)
        if dy.shape != x.shape:
            raise argument_error("dy", f"shape {x.shape} (x's shape)", dy.shape)
        scale, _ = self._affine_params()
        dx, dscale, dbias = batch_norm_vjp(
            x, dy, scale, self.running_mean, self.running_var,
            reduce_axes=self.config.reduce_axes, epsilon=self.config.epsilon,
            training=training, mask=mask, fast_variance=self.config.fast_variance,
            **(self._replica_hooks() if training else {}),
        )  # fmt: skip
        grads = {"x": dx}
        if self.config.affine:
            grads["scale"], grads["bias"] = dscale.astype(self.dtype), dbias.astype(self.dtype)
        return grads

    # -- internals ----------------------------------------------------------------------
    def _affine_params(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        return (self.scale, self.bias) if self.config.affine else (None, None)

    def _check_call(self, x: Any, mask: Any, training: Any, check: bool = True) -> tuple[np.ndarray, Any, bool]:
        training = self.resolve_training(training)
        x = np.asarray(x)
        mask = None if mask is None else np.asarray(mask)
        if check:
            check_inputs(x, mask, num_features=self.config.num_features, reduce_axes=self.config.reduce_axes)
        return x, mask, training

    def _replica_hooks(self) -> dict[str, Any]:
        """The cross-replica hook of :func:`run_replicas` (none without ``axis_name``)."""
        return _replica_hooks(self.config.axis_index_groups) if self.config.synced else {}

    def __repr__(self) -> str:
        c = self.config
        return (
            f"BatchNorm1d({c.num_features}, axis={c.reduce_axes}, epsilon={c.epsilon}, "
            f"momentum={c.momentum}, affine={c.affine}, axis_name={c.axis_name!r}, training={self.training})"
        )


def batch_norm_vjp(
    x: np.ndarray,
    dy: np.ndarray,
    scale: np.ndarray | None,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    *,
    reduce_axes: Sequence[int],
    epsilon: float,
    training: bool,
    mask: np.ndarray | None = None,
    fast_variance: bool = False,
    all_sum: AllSum | None = None,
    all_gather: AllGather | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""The analytic backward pass: ``(dx, dscale, dbias)`` for cotangent ``dy``.

    With ``inv = 1 / sqrt(var + epsilon)``, ``xhat = (x - mean) * inv`` and
    ``g = dy * scale`` (``dy`` when not affine), summing over the reduced axes::

        dbias  = sum(dy)                 # every position, masked ones included
        dscale = sum(dy * xhat)
        dx     = inv * (g - keep / n * (G + xhat * H))   # training
        dx     = inv * g                                  # inference, or n == 0

    where ``G = sum(g)`` and ``H = sum(g * xhat)`` run over every position of every
    synced replica (masked positions are normalised too, so they send gradient
    into the statistics) and ``keep`` is 1 at the unmasked positions whose values
    entered ``mean`` and ``var``. The fast variance's clamp at 0 is ignored: its
    gradient is this one wherever the clamp is inactive.
    """
    dtype = compute_dtype(np, x.dtype, running_mean.dtype)
    xc, dyc = x.astype(dtype, copy=False), dy.astype(dtype, copy=False)
    axes = tuple(reduce_axes)
    feature_axis = next(a for a in range(x.ndim) if a not in axes)
    shape = tuple(-1 if a == feature_axis else 1 for a in range(x.ndim))
    n: Any = 0
    if training:  # the core's statistics, with the x - shift it computed
        moments = batch_moments(
            xc, mask, reduce_axes=axes, fast_variance=fast_variance, all_sum=all_sum, all_gather=all_gather,
            fallback=running_mean,
        )  # fmt: skip
        n = moments.count
    if training and np.asarray(n) > 0:
        xhat, offset, var = moments.centered, moments.offset, moments.var
    else:  # inference, or no data
        xhat, offset, var = xc - running_mean.astype(dtype).reshape(shape), 0.0, running_var.astype(np.float64)
    inv = 1.0 / np.sqrt(var + epsilon)  # per-feature factors in float64
    s = np.ones((), np.float64) if scale is None else scale.astype(np.float64)
    xhat -= np.asarray(offset, dtype).reshape(shape)  # x - mean, from the shifted x
    xhat *= inv.astype(dtype).reshape(shape)
    dbias = dyc.sum(axis=axes, dtype=np.float64)
    dscale = (dyc * xhat).sum(axis=axes, dtype=np.float64)
    if not training:
        return (dyc * (s * inv).astype(dtype).reshape(shape)).astype(x.dtype, copy=False), dscale, dbias
    # G = sum(g) and H = sum(g * xhat) with g = dy * scale: scale is per feature, so
    # they are scale * dbias and scale * dscale (no further pass over the input).
    local = (s * dbias, s * dscale)
    if all_sum is not None:
        G, H = all_sum(local)
    elif all_gather is not None:  # every replica adds the same rows in the same order
        G, H = (rows.sum(axis=0) for rows in all_gather(local))
    else:
        G, H = local
    weight = np.where(np.asarray(n) > 0, 1.0 / np.maximum(n, 1), 0.0)  # n == 0: inference
    # dx = inv * g - inv * weight * keep * (G + xhat * H), with the per-feature factors
    # folded; in place, so that at most two input-sized arrays are alive.
    correction = xhat  # xhat is not needed any more
    correction *= (inv * weight * H).astype(dtype).reshape(shape)
    correction += (inv * weight * G).astype(dtype).reshape(shape)
    if mask is not None:
        correction *= np.expand_dims(mask, feature_axis)
    dx = dyc * (s * inv).astype(dtype).reshape(shape)
    dx -= correction
    return dx.astype(x.dtype, copy=False), dscale, dbias


# -- simulated replicas ------------------------------------------------------------------


class _Replicas:
    """What the threads of one :func:`run_replicas` call share."""

    def __init__(self, count: int, timeout: float, hook: str):
        self.count, self.hook = count, hook
        self.barrier = threading.Barrier(count, timeout=timeout)
        self.slots: list[Any] = [None] * count


_thread_replica = threading.local()
_HOOKS = ("all_sum", "all_gather")


def run_replicas(
    fn: Callable[[int], Any], num_replicas: int, timeout: float = 60.0, *, hook: str = "all_sum"
) -> list[Any]:
    """Run ``fn(replica_index)`` for every replica, each in its own thread, and
    return the results in replica order.

    Inside, a layer with ``axis_name`` combines its statistics over the replicas
    of its ``axis_index_groups`` (all replicas by default): the statistics are
    those of the concatenated batches of the group, exactly as a data-parallel
    all-reduce computes them. ``hook`` picks the core's cross-replica hook:
    ``"all_sum"`` (two rounds of sums, as JAX's ``psum``) or ``"all_gather"`` (one
    round of every replica's rows, as ``torch.distributed``). Each replica owns
    its layer (as with data-parallel training); an error in any replica is
    re-raised here.
    """
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise argument_error("num_replicas", "a positive int", num_replicas)
    if hook not in _HOOKS:
        raise argument_error("hook", f"one of {_HOOKS}", hook)
    shared = _Replicas(num_replicas, timeout, hook)
    results: list[Any] = [None] * num_replicas
    errors: list[BaseException | None] = [None] * num_replicas

    def replica(index: int) -> None:
        _thread_replica.context = (shared, index)
        try:
            results[index] = fn(index)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller
            errors[index] = error
            shared.barrier.abort()

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(num_replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    raised = [e for e in errors if e is not None]
    if raised:
        raise next((e for e in raised if not isinstance(e, threading.BrokenBarrierError)), raised[0])
    return results


def _replica_hooks(groups: tuple[tuple[int, ...], ...] | None) -> dict[str, Any]:
    """``{"all_sum": ...}`` or ``{"all_gather": ...}`` over this thread's group of
    :func:`run_replicas` (a group of one outside it)."""
    context = getattr(_thread_replica, "context", None)
    if context is None:  # a single replica: the sums are the local ones
        return {"all_sum": tuple}
    shared, index = context
    groups = groups or (tuple(range(shared.count)),)
    if sorted(i for g in groups for i in g) != list(range(shared.count)):
        raise argument_error("axis_index_groups", f"a partition of range({shared.count})", groups)
    group = next(g for g in groups if index in g)

    def members(arrays: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Every group member's ``arrays``, in the group's order."""
        shared.slots[index] = arrays
        shared.barrier.wait()
        rows = [shared.slots[i] for i in group]
        shared.barrier.wait()
        return rows

    def all_sum(arrays: tuple[Any, ...]) -> tuple[Any, ...]:
        # Every member adds the same operands in the same order: bitwise-equal sums.
        rows = members(arrays)
        return tuple(functools.reduce(np.add, (row[k] for row in rows)) for k in range(len(arrays)))

    def all_gather(arrays: tuple[Any, ...]) -> tuple[Any, ...]:
        rows = members(arrays)
        return tuple(np.stack([np.asarray(row[k]) for row in rows]) for k in range(len(arrays)))

    return {"all_sum": all_sum} if shared.hook == "all_sum" else {"all_gather": all_gather}
