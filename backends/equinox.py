"""``BatchNorm1d`` as an Equinox module, following ``eqx.nn.BatchNorm``.

:class:`BatchNorm1d` is an ``eqx.Module`` (an ``eqx.nn.StatefulLayer``, so it works in
``eqx.nn.Sequential``) with bn1d's semantics (the maths: ``bn1d.algorithm``; the
contract: ``docs/spec.md``; the differences from Equinox: the README's semantics
table) and Equinox's conventions:

* ``weight`` and ``bias`` are fields (arrays, or ``None`` when not affine); the running
  statistics live in an ``eqx.nn.State`` under the field ``state_index``
  (``eqx.nn.make_with_state(BatchNorm1d)(...)`` returns the module and its state);
* ``__call__(x, state, *, key=None, inference=None, mask=None) -> (y, state)``; the
  field ``inference`` is the mode, switched by ``eqx.nn.inference_mode``;
* it takes a whole batch (``x`` of ``len(axis) + 1`` dimensions, as every bn1d
  backend) or, as ``eqx.nn.BatchNorm``, one example under
  ``jax.vmap(..., axis_name=...)`` with the same ``axis_name`` (``x`` without the batch
  axis, the first reduced axis): each example is then a replica and the statistics
  are those of the whole vmapped batch, count-weighted, so the new state is the same
  on every example (``out_axes=None``). With ``axis_index_groups`` each group has its
  own statistics: map the state too (``out_axes=0``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bn1d import algorithm
from bn1d.backends import jax as jax_backend
from bn1d.config import BatchNormConfig, argument_error
from bn1d.layer import brainpy_signature

from . import jax_modules

__all__ = ["BatchNorm", "BatchNorm1d", "replace_batchnorm"]


class BatchNorm1d(eqx.nn.StatefulLayer):
    """1-D batch normalization with BrainPy's constructor, as an Equinox module.

    Arguments are those of ``bn1d.backends.jax.BatchNorm1d`` (BrainPy's, then
    keyword-only ``dtype`` and the options); ``inference`` (keyword-only) sets the mode
    as in ``eqx.nn.BatchNorm`` and overrides ``mode``.
    """

    weight: jax.Array | None
    bias: jax.Array | None
    state_index: eqx.nn.StateIndex | None
    inference: bool
    config: BatchNormConfig = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)

    @brainpy_signature
    def __init__(self, *args: Any, dtype: Any = None, inference: bool | None = None, **kwargs: Any):
        layer = jax_modules.new_layer(*args, dtype=dtype, **kwargs)
        self.config = layer.config
        self.dtype = layer.dtype
        self.inference = not jax_modules.resolve_training(inference, None, layer.config, "inference")
        self.weight = layer.params.get("scale")
        self.bias = layer.params.get("bias")
        self.state_index = eqx.nn.StateIndex(dict(layer.state)) if layer.state else None

    def __call__(
        self, x: Any, state: eqx.nn.State, *, key: Any = None, inference: bool | None = None, mask: Any = None
    ) -> tuple[jax.Array, eqx.nn.State]:
        """``(y, state)`` for a batch ``x`` (bn1d's layout: ``axis`` lists the reduced
        axes) or one example of it (without the first reduced axis, under ``jax.vmap``
        with ``axis_name``), and an optional boolean ``mask`` of ``x``'s shape without the
        feature axis. ``key`` is ignored (Equinox's signature). In training the state's
        running statistics are replaced."""
        del key
        config = self.config
        training = jax_modules.resolve_training(inference, self.inference, config, "inference")
        ndim = np.ndim(x)
        example = config.synced and ndim == config.ndim - 1
        if ndim != config.ndim and not example:
            expected = f"a {config.ndim}-D batch for reduced axes {config.reduce_axes}"
            if config.synced:
                expected += f", or a {config.ndim - 1}-D example under jax.vmap(..., axis_name={config.axis_name!r})"
            raise argument_error("x", expected, tuple(np.shape(x)))
        batch_axis = config.reduce_axes[0]
        if example:  # one replica of one example: the batch axis has length 1
            x = jnp.expand_dims(jnp.asarray(x), batch_axis)
            if mask is not None and not isinstance(mask, (bool, np.bool_)):
                mask = jnp.expand_dims(jnp.asarray(mask), batch_axis - (config.feature_axis < batch_axis))
        params = {} if self.weight is None else {"scale": self.weight, "bias": self.bias}
        stats = {} if self.state_index is None else state.get(self.state_index)
        y, new_stats = jax_modules.apply(config, params, stats, x, mask, training)
        if training and self.state_index is not None:
            state = state.set(self.state_index, {k: new_stats[k] for k in config.state_keys})
        return (jnp.squeeze(y, batch_axis) if example else y), state

    # -- bn1d's state dictionary -------------------------------------------------------
    def state_dict(self, state: eqx.nn.State) -> dict[str, jax.Array]:
        """bn1d's state dictionary (``config.keys``) of this module and its ``state``."""
        params = {} if self.weight is None else {"scale": self.weight, "bias": self.bias}
        return {**params, **({} if self.state_index is None else state.get(self.state_index))}

    def load_state_dict(self, state_dict: Any, state: eqx.nn.State) -> tuple[BatchNorm1d, eqx.nn.State]:
        """``(module, state)`` holding bn1d's state dictionary (any backend's
        ``state_dict()``), checked strictly and atomically (``bn1d.state.check_state``)
        and converted to the module's dtype; ``state`` is consumed, as by ``State.set``."""
        params, stats = jax_modules.loaded(self.config, self.dtype, state_dict)
        module = self
        if params:
            module = eqx.tree_at(lambda m: (m.weight, m.bias), self, (params["scale"], params["bias"]))
        if self.state_index is not None:
            state = state.set(self.state_index, stats)
        return module, state


class BatchNorm(eqx.nn.BatchNorm):
    """``equinox.nn.BatchNorm`` computing bn1d's statistics: Equinox's class, constructor
    ``(input_size, axis_name, eps, channelwise_affine, momentum, inference, dtype, mode)``,
    fields and ``eqx.nn.State`` entries (so ``eqx.tree_serialise_leaves`` files and states
    load unchanged), and call ``(x, state, *, key=None, inference=None) -> (y, state)``
    on one example ``(input_size, *spatial)`` per lane of a ``jax.vmap``/``pmap`` over
    ``axis_name``; every rank of example works, channel first.

    Its modes are Equinox's: ``"batch"`` normalises with the batch's statistics in training
    and keeps their zero-debiased moving average for inference (``hidden / (1 -
    momentum**count)``); ``"ema"`` normalises with the moving average itself (the batch's on
    the first call). The batch statistics, count-weighted over the lanes (R4), are exact
    (R2.7): bn1d's algorithm, where Equinox's ``mean((x - mean)**2)`` is two float32 passes
    whose mean rounds at ``|mean|``. The constructor checks its arguments (R7.1); complex
    input is a ``TypeError`` (R2.6).
    """

    def __init__(self, input_size: int, axis_name: Any, *args: Any, **kwargs: Any):
        _check_equinox_arguments(input_size, axis_name, *args, **kwargs)
        super().__init__(input_size, axis_name, *args, **kwargs)

    def __call__(
        self, x: Any, state: eqx.nn.State, *, key: Any = None, inference: bool | None = None
    ) -> tuple[jax.Array, eqx.nn.State]:
        del key
        inference = self.inference if inference is None else inference
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[0] != self.input_size:
            raise argument_error("x", f"one example (input_size={self.input_size}, *spatial) per vmap lane", x.shape)
        batch = jnp.expand_dims(x, 0)  # this lane's example: a batch of one, features on axis 1
        config = _equinox_config(
            self.input_size, batch.ndim, float(self.eps), _names(self.axis_name), self.channelwise_affine
        )
        params = {"scale": self.weight, "bias": self.bias} if self.channelwise_affine else {}
        momentum = self.momentum
        if self.mode == "ema":
            assert self.ema_first_time_index is not None and self.ema_state_index is not None  # as Equinox
            first_time, running = state.get(self.ema_first_time_index), state.get(self.ema_state_index)
            mean, var = running
            if not inference:  # normalise with the new average: its gradient reaches x through the batch's share
                state = state.set(self.ema_first_time_index, jnp.array(False))
                batch_mean, batch_var = _batch_statistics(config, batch, running[0].dtype)
                mean = jnp.where(first_time, batch_mean, (1 - momentum) * batch_mean + momentum * mean)
                var = jnp.where(first_time, batch_var, (1 - momentum) * batch_var + momentum * var)
                state = state.set(self.ema_state_index, (mean, var))
            y = self._normalised(batch, mean, var)
            dtype = jnp.result_type(y, x)
        else:
            assert self.batch_counter is not None and self.batch_state_index is not None  # as Equinox
            counter, hidden = state.get(self.batch_counter), state.get(self.batch_state_index)
            if inference:  # Equinox's zero-debiased average
                scale = jnp.where(counter == 0, 1, 1 - momentum**counter)
                y = self._normalised(batch, hidden[0] / scale, hidden[1] / scale)
                dtype = jnp.result_type(y, x)
            else:  # bn1d's training call: the batch's exact statistics, count-weighted over the lanes
                stats = {"running_mean": hidden[0], "running_var": hidden[1]}
                y, new = jax_modules.apply(config, params, stats, batch, None, True)
                new_hidden = (
                    hidden[0] * momentum + new["running_mean"] * (1 - momentum),
                    hidden[1] * momentum + new["running_var"] * (1 - momentum),
                )
                state = state.set(self.batch_counter, counter + 1)
                state = state.set(self.batch_state_index, new_hidden)
                dtype = jnp.result_type(x, *params.values())  # Equinox's: the batch's statistics in x's dtype
        return jnp.squeeze(y, 0).astype(dtype), state

    def _normalised(self, batch: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
        """Equinox's ``(x - mean) / sqrt(var + eps)``, then the affine map, on ``(1, C, ...)``."""
        shape = (1, self.input_size) + (1,) * (batch.ndim - 2)
        y = (batch - jnp.reshape(mean, shape)) / jnp.sqrt(jnp.reshape(var, shape) + self.eps)
        if self.weight is not None and self.bias is not None:  # channelwise_affine
            y = y * jnp.reshape(self.weight, shape) + jnp.reshape(self.bias, shape)
        return y


def _batch_statistics(config: BatchNormConfig, batch: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The lanes' batch mean and biased variance, exact (bn1d's shifted moments, summed over
    ``axis_name``), differentiable with respect to ``batch``, in ``dtype``."""
    hooks = algorithm.Hooks(
        all_sum=jax_backend.replica_all_sum(config.axis_name, None),  # type: ignore[arg-type]  # always named
        stop_gradient=jax.lax.stop_gradient,
    )
    moments = algorithm.batch_moments(batch, reduce_axes=config.reduce_axes, hooks=hooks)
    return moments.mean(jnp).astype(dtype), moments.var.astype(dtype)


@functools.lru_cache(maxsize=256)
def _equinox_config(input_size: int, ndim: int, eps: float, axis_name: Any, affine: bool) -> BatchNormConfig:
    """One example per lane, as a batch of one with features on axis 1, synced over the lanes:
    momentum 0 and the biased variance give the batch's own statistics as the new state."""
    return BatchNormConfig.from_arguments(
        input_size, (0, *range(2, ndim)), eps, 0.0, affine, axis_name=axis_name, unbiased_running_var=False
    )


def _names(axis_name: Any) -> Any:
    return tuple(axis_name) if isinstance(axis_name, list) else axis_name


def _check_equinox_arguments(input_size: Any, axis_name: Any, *args: Any, **kwargs: Any) -> None:
    """Equinox's batch-norm arguments checked (R7.1): ``input_size`` a positive int,
    ``axis_name`` a name (or a sequence of names), ``eps`` > 0, ``momentum`` in [0, 1],
    the flags bools, ``mode`` ``"ema"``, ``"batch"`` or Equinox's ``"legacy"``."""
    names = ("eps", "channelwise_affine", "momentum", "inference", "dtype", "mode")
    if len(args) > len(names):
        raise TypeError(f"BatchNorm: expected at most {2 + len(names)} positional arguments, got {2 + len(args)}")
    arguments = {**dict(zip(names, args)), **kwargs}
    unknown = sorted(set(arguments) - set(names))
    if unknown:
        raise argument_error(unknown[0], f"one of Equinox's arguments {list(names)}", arguments[unknown[0]], TypeError)
    if axis_name is None:
        raise argument_error("axis_name", "the name of the vmap/pmap axis the statistics run over", None, TypeError)
    BatchNormConfig.from_arguments(
        input_size, epsilon=arguments.get("eps", 1e-5), momentum=arguments.get("momentum", 0.99),
        axis_name=_names(axis_name),
    )  # fmt: skip
    for flag in ("channelwise_affine", "inference"):
        if not isinstance(arguments.get(flag, False), bool):
            raise argument_error(flag, "a bool", arguments[flag], TypeError)
    if arguments.get("mode", "legacy") not in ("ema", "batch", "legacy"):
        raise argument_error("mode", "'ema' or 'batch' ('legacy': Equinox's 'ema' with its warning)", arguments["mode"])


def replace_batchnorm(model: Any) -> Any:
    """``model`` with every ``eqx.nn.BatchNorm`` replaced by bn1d's :class:`BatchNorm` (a
    pytree surgery; ``model`` is not changed). Each keeps its fields, values and
    ``StateIndex`` markers, so the model's ``eqx.nn.State`` is already the new model's:
    keep using it (and files written by ``eqx.tree_serialise_leaves`` load into either)."""

    def convert(layer: Any) -> Any:
        if not isinstance(layer, eqx.nn.BatchNorm) or isinstance(layer, BatchNorm):
            return layer
        replaced = object.__new__(BatchNorm)  # the same fields, so no __init__: the values are layer's
        for field in dataclasses.fields(layer):
            object.__setattr__(replaced, field.name, getattr(layer, field.name))
        return replaced

    return jax.tree.map(convert, model, is_leaf=lambda node: isinstance(node, eqx.nn.BatchNorm))
