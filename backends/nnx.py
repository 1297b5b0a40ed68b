"""bn1d's Flax NNX modules: :class:`BatchNorm`, ``nnx.BatchNorm`` itself computing bn1d's
statistics (the drop-in; :func:`replace_batchnorm` makes a model's layers it), and
:class:`BatchNorm1d`, BrainPy's constructor as an ``nnx.Module``.

:class:`BatchNorm1d` is an ``nnx.Module`` with bn1d's semantics (the maths:
``bn1d.algorithm``; the contract: ``docs/spec.md``; the differences from Flax: the README's semantics table) and
NNX's conventions, so it sits where ``nnx.BatchNorm`` sits:

* ``scale`` and ``bias`` are ``nnx.Param``; the running statistics ``mean`` and
  ``var`` (and ``num_batches_tracked`` for ``momentum=None``) are ``nnx.BatchStat``,
  named as in ``nnx.BatchNorm``, so ``nnx.state`` trees and checkpoints line up;
* ``model.train()`` / ``model.eval()`` (and ``nnx.view``) switch the attribute
  ``use_running_average``; a call's ``use_running_average=`` overrides it;
* it runs under ``nnx.jit``, ``nnx.grad``, ``nnx.value_and_grad``, ``nnx.Optimizer``,
  ``nnx.vmap(axis_name=...)`` and ``nnx.shard_map`` or ``jax.shard_map`` over
  ``nnx.split``/``nnx.merge``. With ``axis_name`` the statistics are those of the
  whole synced batch (count-weighted), so with the model broadcast (``in_axes=None``)
  the new running statistics are the same on every replica and are stored once. With
  ``axis_index_groups`` each group has its own, so the running statistics must be
  mapped too (``nnx.StateAxes({nnx.BatchStat: 0, ...: None})``, one row per replica).

``docs/jax-modules.md`` has the conventions of all three JAX module libraries.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.nnx.module import first_from

from bn1d.config import BatchNormConfig, argument_error
from bn1d.layer import brainpy_signature

from . import jax_modules
from .jax_modules import FLAX_NAMES

__all__ = ["BatchNorm", "BatchNorm1d", "replace_batchnorm"]


class BatchNorm1d(nnx.Module):
    """1-D batch normalization with BrainPy's constructor, as an ``nnx.Module``.

    Arguments are those of ``bn1d.backends.jax.BatchNorm1d`` (BrainPy's, then
    keyword-only ``dtype`` and the options ``fast_variance``,
    ``unbiased_running_var``, ``track_running_stats``); ``use_running_average``
    (keyword-only) sets the mode as in ``nnx.BatchNorm`` and overrides ``mode``.
    ``rngs`` is accepted for NNX's signature and unused: the initializers are
    bn1d's, ``(shape, dtype) -> array``, arrays or scalars.
    """

    @brainpy_signature
    def __init__(
        self, *args: Any, dtype: Any = None, use_running_average: bool | None = None, rngs: nnx.Rngs | None = None,
        **kwargs: Any,
    ):  # fmt: skip
        del rngs  # no randomness: the initializers are deterministic
        layer = jax_modules.new_layer(*args, dtype=dtype, **kwargs)
        training = jax_modules.resolve_training(use_running_average, None, layer.config)
        self.config = layer.config
        self.dtype = layer.dtype
        self.use_running_average = not training
        self._assign({**layer.params, **layer.state}, create=True)

    # -- the call ------------------------------------------------------------------------
    def __call__(self, x: Any, mask: Any = None, *, use_running_average: bool | None = None) -> jax.Array:
        """``y`` for ``x`` (bn1d's layout: ``axis`` lists the reduced axes) and an optional
        boolean ``mask`` of ``x``'s shape without the feature axis. In training (by default,
        or ``use_running_average=False``) the running statistics are updated in place."""
        training = jax_modules.resolve_training(use_running_average, self.use_running_average, self.config)
        params, state = self._values()
        y, new_state = jax_modules.apply(self.config, params, state, x, mask, training)
        if training:
            self._assign(new_state)
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """``nnx.view(model, use_running_average=...)``, as ``nnx.BatchNorm``."""
        if use_running_average is not None:
            jax_modules.resolve_training(use_running_average, None, self.config)
            self.use_running_average = use_running_average

    # -- bn1d's state dictionary -------------------------------------------------------
    def state_dict(self) -> dict[str, jax.Array]:
        """The parameters and running statistics under bn1d's keys (``config.keys``)."""
        params, state = self._values()
        return {**params, **state}

    def load_state_dict(self, state: Any) -> None:
        """Load bn1d's state dictionary (any backend's ``state_dict()``): strict and
        atomic (``bn1d.state.check_state``), values converted to the module's dtype."""
        params, stats = jax_modules.loaded(self.config, self.dtype, state)
        self._assign({**params, **stats})

    def _values(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        read = lambda key: getattr(self, FLAX_NAMES[key][1])[...]  # noqa: E731
        return {k: read(k) for k in self.config.param_keys}, {k: read(k) for k in self.config.state_keys}

    def _assign(self, values: dict[str, Any], create: bool = False) -> None:
        for key, value in values.items():
            attribute = FLAX_NAMES[key][1]
            if create:
                kind = nnx.Param if key in self.config.param_keys else nnx.BatchStat
                setattr(self, attribute, kind(value))
            else:
                getattr(self, attribute)[...] = value


class BatchNorm(nnx.BatchNorm):
    """``flax.nnx.BatchNorm`` computing bn1d's statistics: Flax's class, constructor, variables
    (``nnx.Param`` ``scale``/``bias``, ``nnx.BatchStat`` ``mean``/``var``), call
    ``(x, use_running_average=None, *, mask=None)``, ``train()``/``eval()``/``nnx.view``,
    momentum (the old statistic's weight) and biased running variance, so a model moves by
    changing one import and its ``nnx.state`` and checkpoints line up.

    What differs (``docs/decisions.md``): the statistics are exact (R2.7) by default,
    ``use_fast_variance=False``, where Flax's default one-pass formula cancels on raw data
    (``use_fast_variance=True`` is Flax's formula, clamped at 0); the constructor checks its
    arguments (R7.1); a mask must select the same positions for every feature (bn1d counts
    one set; a ``ValueError`` otherwise); complex input is a ``TypeError`` (R2.6); the
    arithmetic is ``bn1d.backends.jax_modules.flax_batch_norm``'s.
    """

    def __init__(self, num_features: int, *, use_fast_variance: bool = False, **kwargs: Any):
        check_flax_arguments(num_features, use_fast_variance=use_fast_variance, **kwargs)
        super().__init__(num_features, use_fast_variance=use_fast_variance, **kwargs)

    def __call__(self, x: Any, use_running_average: bool | None = None, *, mask: Any = None) -> jax.Array:
        use_running_average = first_from(
            use_running_average, self.use_running_average,
            error_msg="No `use_running_average` argument was provided to BatchNorm: pass it to the constructor, "
            "the call, or use nnx.view(model, use_running_average=...)",
        )  # fmt: skip
        training = not use_running_average
        stored = self.mean[...].dtype, self.var[...].dtype
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        # NNX's promotion of the input with every variable (the statistics included), then Flax's computation
        x, mean, var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
        )
        y, mean, var = jax_modules.flax_batch_norm(
            x, mean, var, scale, bias, training=training, axis=self.axis, momentum=self.momentum,
            epsilon=self.epsilon, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            use_fast_variance=self.use_fast_variance, mask=mask, dtype=self.dtype,
        )  # fmt: skip
        if training:  # the statistics keep their stored dtype
            self.mean[...] = mean.astype(stored[0])
            self.var[...] = var.astype(stored[1])
        return y


def check_flax_arguments(num_features: Any, **arguments: Any) -> None:
    """Flax's batch-norm arguments checked (R7.1), as bn1d's constructors check theirs:
    ``num_features`` a positive int (``None``: linen's, taken from the input), ``momentum``
    in [0, 1], ``epsilon`` > 0, the flags bools, ``axis_index_groups`` only with
    ``axis_name``, partitioning the replicas into equal groups."""
    if num_features is not None:
        BatchNormConfig.from_arguments(num_features)
    momentum, epsilon = arguments.get("momentum", 0.99), arguments.get("epsilon", 1e-5)
    if momentum is None:  # Flax has no cumulative average
        raise argument_error("momentum", "a finite float in [0, 1]", None, TypeError)
    BatchNormConfig.from_arguments(
        1, momentum=momentum, epsilon=epsilon, axis_name=arguments.get("axis_name"),
        axis_index_groups=arguments.get("axis_index_groups"),
    )  # fmt: skip
    for flag in ("use_bias", "use_scale", "use_fast_variance"):
        if not isinstance(arguments.get(flag, True), bool):
            raise argument_error(flag, "a bool", arguments[flag], TypeError)
    running = arguments.get("use_running_average")
    if running is not None and not isinstance(running, (bool, np.bool_)):
        raise argument_error("use_running_average", "None or a bool", running, TypeError)


def replace_batchnorm(model: Any, *, use_fast_variance: bool = False) -> Any:
    """Make every ``nnx.BatchNorm`` of ``model`` bn1d's :class:`BatchNorm` (in place; ``model``
    is also returned): the same objects with their class swapped, so values, options, mode,
    sharing, ``nnx.state`` paths and checkpoints stay as they were, wherever the layers sit
    (attributes, ``nnx.List``, ``nnx.data`` containers). ``use_fast_variance`` is set on
    each: ``False`` (the default) gives bn1d's exact statistics, ``True`` Flax's default
    one-pass formula. Subclasses of ``nnx.BatchNorm`` are left alone (their overrides would
    be lost). Every layer's options are checked (R7.1) before any is changed, so an error
    leaves ``model`` as it was. Functions traced before the swap and cached on the objects
    (``nnx.cached_partial``) still run the traced code: build them after."""
    if not isinstance(use_fast_variance, bool):
        raise argument_error("use_fast_variance", "a bool", use_fast_variance, TypeError)
    layers = [node for _, node in nnx.iter_graph(model) if type(node) is nnx.BatchNorm]
    for layer in layers:
        check_flax_arguments(
            layer.num_features, momentum=layer.momentum, epsilon=layer.epsilon, axis_name=layer.axis_name,
            axis_index_groups=layer.axis_index_groups, use_bias=layer.use_bias, use_scale=layer.use_scale,
            use_running_average=layer.use_running_average,
        )  # fmt: skip
    for layer in layers:
        object.__setattr__(layer, "__class__", BatchNorm)  # not NNX's __setattr__: no attribute recorded
        layer.use_fast_variance = use_fast_variance
    return model
