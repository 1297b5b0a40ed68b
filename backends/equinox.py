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

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bn1d.config import BatchNormConfig, argument_error
from bn1d.initializers import Ones, Zeros

from . import jax_modules

__all__ = ["BatchNorm1d"]


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

    def __init__(
        self,
        num_features: int,
        axis: int | Sequence[int] = (0, 1),
        epsilon: float = 1e-5,
        momentum: float | None = 0.99,
        affine: bool = True,
        bias_initializer: Any = Zeros(),
        scale_initializer: Any = Ones(value=1.0),
        axis_name: str | Sequence[str] | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        mode: str | None = None,
        name: str | None = None,
        *,
        dtype: Any = None,
        inference: bool | None = None,
        **options: Any,
    ):
        layer = jax_modules.new_layer(
            num_features, axis, epsilon, momentum, affine, bias_initializer, scale_initializer,
            axis_name, axis_index_groups, mode, name, dtype=dtype, **options,
        )  # fmt: skip
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
