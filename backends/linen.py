"""``BatchNorm1d`` as a Flax linen module.

:class:`BatchNorm1d` is a ``flax.linen.Module`` with bn1d's semantics (the maths:
``bn1d.algorithm``; the contract: ``docs/spec.md``; the differences from Flax: the README's semantics table) and
linen's conventions, so it sits where ``flax.linen.BatchNorm`` sits:

* variables ``params/{scale,bias}`` and ``batch_stats/{mean,var}``, named as in
  ``flax.linen.BatchNorm`` (``bn1d.backends.formats.to_flax_variables``), so a linen
  ``BatchNorm``'s variable tree or checkpoint loads as it is (``momentum=None`` adds
  ``batch_stats/num_batches_tracked``; ``track_running_stats=False`` has no
  ``batch_stats``);
* the mode is ``use_running_average``, an attribute or a call argument (the call's
  wins; neither: the constructor's ``mode``). Training updates ``batch_stats`` when
  the collection is mutable (``apply(..., mutable=["batch_stats"])``; otherwise Flax
  raises, as for its own layer); ``init`` updates nothing and does not sync, so the
  axis need not be bound there.

With ``axis_name`` the statistics are count-weighted over every replica of the group
under ``vmap``, ``pmap`` and ``shard_map`` (``bn1d.backends.jax.replica_all_sum``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn1d.config import OPTIONS, BatchNormConfig, argument_error
from bn1d.initializers import Ones, Zeros

from . import jax_modules
from .jax_modules import FLAX_NAMES
from .nnx import check_flax_arguments

__all__ = ["BatchNorm", "BatchNorm1d"]


class BatchNorm1d(nn.Module):
    """1-D batch normalization with BrainPy's constructor, as a ``flax.linen.Module``.

    Fields are ``bn1d.backends.jax.BatchNorm1d``'s arguments (BrainPy's, linen's own
    ``name``), then ``use_running_average``, ``dtype`` (of the parameters and
    statistics) and the options of ``bn1d.config.OPTIONS`` (``fast_variance``,
    ``unbiased_running_var``, ``track_running_stats``). They are validated when the module is bound (at ``init``
    or ``apply``), with the project's errors.
    """

    num_features: int
    axis: int | Sequence[int] = (0, 1)
    epsilon: float = 1e-5
    momentum: float | None = 0.99
    affine: bool = True
    bias_initializer: Any = Zeros()
    scale_initializer: Any = Ones(value=1.0)
    axis_name: str | Sequence[str] | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    mode: str | None = None
    use_running_average: bool | None = None
    dtype: Any = None
    # Then one field per option of bn1d.config.OPTIONS, with its default: written there only.
    for _option, _default in OPTIONS.items():
        locals()[_option] = _default  # the class body's namespace
        __annotations__[_option] = "bool"
    del _option, _default

    def initial_layer(self) -> Any:
        """The JAX backend's layer for these fields: the validated ``config``, the
        parameter ``dtype`` and the initial values."""
        return jax_modules.new_layer(
            self.num_features, self.axis, self.epsilon, self.momentum, self.affine, self.bias_initializer,
            self.scale_initializer, self.axis_name, self.axis_index_groups, self.mode,
            dtype=self.dtype, **self._options(),
        )  # fmt: skip

    def _options(self) -> dict[str, Any]:
        return {option: getattr(self, option) for option in OPTIONS}

    @nn.compact
    def __call__(self, x: Any, use_running_average: bool | None = None, *, mask: Any = None) -> jax.Array:
        """``y`` for ``x`` (bn1d's layout: ``axis`` lists the reduced axes) and an optional
        boolean ``mask`` of ``x``'s shape without the feature axis."""
        config = BatchNormConfig.from_arguments(
            self.num_features, self.axis, self.epsilon, self.momentum, self.affine, self.axis_name,
            self.axis_index_groups, self.mode, **self._options(),
        )  # fmt: skip
        training = jax_modules.resolve_training(use_running_average, self.use_running_average, config)
        initial = functools.cache(self.initial_layer)  # built only when a variable is created (init)

        def initial_value(key: str) -> jax.Array:
            # Concrete even where Flax traces the initializer (its shape check at apply): the
            # values are constants, and a cached tracer would outlive its trace.
            with jax.ensure_compile_time_eval():
                layer = initial()
            return {**layer.params, **layer.state}[key]

        params = {
            key: self.param(FLAX_NAMES[key][1], lambda _, key=key: initial_value(key)) for key in config.param_keys
        }
        stats = {key: self.variable(*FLAX_NAMES[key], lambda key=key: initial_value(key)) for key in config.state_keys}
        state = {key: variable.value for key, variable in stats.items()}
        initializing = self.is_initializing()
        if initializing and training:  # no update and no sync: the axis may not be bound yet
            config = dataclasses.replace(config, axis_name=None, axis_index_groups=None)
        y, new_state = jax_modules.apply(config, params, state, x, mask, training)
        if training and not initializing:
            for key, variable in stats.items():
                variable.value = new_state[key]
        return y

    # -- bn1d's state dictionary -------------------------------------------------------
    @staticmethod
    def state_dict(variables: Any) -> dict[str, Any]:
        """bn1d's state dictionary (``scale``, ``bias``, ``running_mean``, ...) of this
        module's variables (``bn1d.backends.formats.from_flax_variables``), to load into any backend."""
        return jax_modules.state_from_flax(variables)

    def variables_from_state_dict(self, state: Any) -> dict[str, dict[str, jax.Array]]:
        """This module's variables holding bn1d's state dictionary (any backend's
        ``state_dict()``), checked strictly (``bn1d.state.check_state``) and converted
        to the module's dtype."""
        initial = self.initial_layer()
        params, stats = jax_modules.loaded(initial.config, initial.dtype, state)
        return jax_modules.flax_variables({**params, **stats})


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` computing bn1d's statistics: Flax's class, fields, variables
    (``params/{scale,bias}``, ``batch_stats/{mean,var}``, in Flax's shapes and dtypes) and
    call ``(x, use_running_average=None, *, mask=None)``; ``init`` updates nothing and does
    not sync, as Flax's. A linen model moves by changing the import: its variables are
    already this module's.

    What differs (``docs/decisions.md``): ``use_fast_variance=False`` by default, the exact
    statistics (R2.7; ``True`` is Flax's one-pass formula); the fields are checked when the
    module is built (R7.1); a mask must select the same positions for every feature; the
    arithmetic is ``bn1d.backends.jax_modules.flax_batch_norm``'s.
    """

    use_fast_variance: bool = False

    def __post_init__(self) -> None:
        check_flax_arguments(
            None, momentum=self.momentum, epsilon=self.epsilon, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, use_bias=self.use_bias, use_scale=self.use_scale,
            use_fast_variance=self.use_fast_variance, use_running_average=self.use_running_average,
        )  # fmt: skip
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Any, use_running_average: bool | None = None, *, mask: Any = None) -> jax.Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        x = jnp.asarray(x)
        feature_shape = [x.shape[a] for a in jax_modules.flax_feature_axes(self.axis, x.ndim)]
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        mean = self.variable("batch_stats", "mean", lambda shape: jnp.zeros(shape, stats_dtype), feature_shape)
        var = self.variable("batch_stats", "var", lambda shape: jnp.ones(shape, stats_dtype), feature_shape)
        scale = self.param("scale", self.scale_init, feature_shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype) if self.use_bias else None
        initializing, training = self.is_initializing(), not use_running_average
        if initializing and training and mask is None and x.size == math.prod(feature_shape):
            # Flax's init on a batch of one value per feature (a dummy input): a mask of every position
            # runs it as Flax does, where R3.5 refuses an unsynced call (init updates and syncs nothing).
            mask = jnp.ones(x.shape, jnp.bool_)
        y, new_mean, new_var = jax_modules.flax_batch_norm(
            x, mean.value, var.value, scale, bias, training=training, axis=self.axis, momentum=self.momentum,
            epsilon=self.epsilon, axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            use_fast_variance=self.use_fast_variance, mask=mask, dtype=self.dtype,
        )  # fmt: skip
        if training and not initializing:
            mean.value, var.value = new_mean, new_var
        return y


def _checked_init(init: Any) -> Any:
    """The dataclass ``__init__`` behind a check that names an unknown option as every
    bn1d constructor does (``BatchNormConfig.from_arguments``), not Python's message."""
    fields = {field.name for field in dataclasses.fields(BatchNorm1d)}

    @functools.wraps(init)
    def __init__(self: BatchNorm1d, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise argument_error(unknown[0], f"one of the options {sorted(OPTIONS)}", kwargs[unknown[0]], TypeError)
        init(self, *args, **kwargs)

    return __init__


BatchNorm1d.__init__ = _checked_init(BatchNorm1d.__init__)  # type: ignore[method-assign]
