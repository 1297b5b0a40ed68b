"""What bn1d's Flax NNX, Flax linen and Equinox modules share.

Each module (``bn1d.backends.nnx``, ``bn1d.backends.linen``, ``bn1d.backends.equinox``)
keeps its library's conventions for where parameters and running statistics live, and
hands the computation to the JAX backend: the constructor is
:class:`bn1d.backends.jax.BatchNorm1d`'s (so every argument is validated by
``BatchNormConfig.from_arguments`` and the initializers are materialised once), a
state dictionary loads through its ``load_state_dict`` (``bn1d.state.check_state``:
strict and atomic), and a call is its pure ``apply`` (the maths: ``bn1d.algorithm``;
the sync: :func:`bn1d.backends.jax.replica_all_sum`). Called eagerly, outside any
transformation, a module runs the JAX backend's jitted call, compiled once per
configuration and shared by every module and layer.

Variables are named as in Flax (``bn1d.backends.formats.to_flax_variables``): ``scale``,
``bias``, ``mean``, ``var``, plus ``num_batches_tracked`` for the cumulative average.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bn1d.backends import jax as jax_backend
from bn1d.backends.formats import FLAX_NAMES, from_flax_variables, to_flax_variables
from bn1d.config import OPTIONS, BatchNormConfig, argument_error

__all__ = [
    "FLAX_NAMES",
    "apply",
    "config_arguments",
    "flax_variables",
    "loaded",
    "new_layer",
    "resolve_training",
    "state_from_flax",
]


def new_layer(*args: Any, **kwargs: Any) -> jax_backend.BatchNorm1d:
    """The JAX backend's layer for the constructor arguments: every check and the
    initial values (``layer.config``, ``layer.dtype``, ``layer.params``, ``layer.state``)."""
    return jax_backend.BatchNorm1d(*args, **kwargs)


def config_arguments(config: BatchNormConfig) -> dict[str, Any]:
    """Constructor arguments that give ``config`` back."""
    arguments = {
        "num_features": config.num_features,
        "axis": config.reduce_axes,
        "epsilon": config.epsilon,
        "momentum": config.momentum,
        "affine": config.affine,
        "axis_name": config.axis_name,
        "axis_index_groups": config.axis_index_groups,
        "mode": None if config.training else "inference",
        "name": config.name,
    }
    return {**arguments, **{option: getattr(config, option) for option in OPTIONS}}


def loaded(config: BatchNormConfig, dtype: Any, state_dict: Any) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``(params, state)`` of a state dictionary (bn1d's keys, ``config.keys``), checked
    strictly and atomically and converted to ``dtype``: the JAX layer's ``load_state_dict``."""
    layer = jax_backend.BatchNorm1d(**config_arguments(config), dtype=dtype)
    layer.load_state_dict(state_dict)
    return dict(layer.params), dict(layer.state)


def resolve_training(call: Any, attribute: Any, config: BatchNormConfig, name: str = "use_running_average") -> bool:
    """Whether a call trains: its ``use_running_average`` (or Equinox's ``inference``) if
    given, else the module's attribute, else the constructor's ``mode``."""
    for value in (call, attribute):
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise argument_error(name, "None or a bool", value, TypeError)
    flag = call if call is not None else attribute
    return config.training if flag is None else not bool(flag)


def apply(
    config: BatchNormConfig, params: Mapping[str, Any], state: Mapping[str, Any], x: Any, mask: Any, training: bool
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(y, new_state)``: :func:`bn1d.backends.jax.apply` (inputs checked at trace time,
    jitted when nothing is traced)."""
    if isinstance(mask, (bool, np.bool_)):
        raise argument_error("mask", "None or a boolean array of x's shape without the feature axis", mask, TypeError)
    y, new_state = jax_backend.apply(config, params, state, x, mask, training)
    return y, dict(new_state)


def flax_variables(state: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
    """bn1d's state as Flax variable collections (``bn1d.backends.formats.to_flax_variables``),
    with the cumulative average's count in ``batch_stats`` and no ``batch_stats`` at
    all without running statistics."""
    if "running_mean" in state:
        variables: dict[str, dict[str, Any]] = to_flax_variables(state)
    else:
        variables = {"params": {key: np.asarray(state[key]) for key in ("scale", "bias")}} if "scale" in state else {}
    if "num_batches_tracked" in state:
        variables["batch_stats"]["num_batches_tracked"] = np.asarray(state["num_batches_tracked"])
    return jax.tree.map(jnp.asarray, variables)


def state_from_flax(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variable collections as bn1d's state (``bn1d.backends.formats.from_flax_variables``;
    the inverse of :func:`flax_variables`)."""
    if not isinstance(variables, Mapping):
        raise argument_error("variables", "a mapping of Flax variable collections", type(variables).__name__, TypeError)
    stats = variables.get("batch_stats") or {}
    if stats:
        state = from_flax_variables(variables)
    else:
        params = variables.get("params") or {}
        state = {key: np.asarray(params[key]) for key in ("scale", "bias") if key in params}
    if "num_batches_tracked" in stats:
        state["num_batches_tracked"] = np.asarray(stats["num_batches_tracked"])
    return state


# -- the drop-ins' computation (Flax's BatchNorm semantics, bn1d's arithmetic) -------------------------------
def flax_feature_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """Flax's ``axis`` (an int or a sequence: the feature axes) as sorted non-negative axes
    of an ``ndim``-D input; a ``ValueError`` naming ``axis`` otherwise."""
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if not axes or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes):
        raise argument_error("axis", "an int or a non-empty sequence of ints (the feature axes)", axis, TypeError)
    if not all(-ndim <= a < ndim for a in axes):
        raise argument_error("axis", f"feature axes of a {ndim}-D input", axis)
    return tuple(sorted({int(a) % ndim for a in axes}))  # repeated axes once, as Flax


def flax_mask(mask: Any, shape: tuple[int, ...], features: tuple[int, ...]) -> jax.Array | None:
    """Flax's ``mask`` (boolean, broadcastable to the input) as bn1d's: the input's shape
    without the feature axes (R5.1). A mask that varies along a feature axis gives each
    feature its own count, which bn1d's statistics cannot express: a ``ValueError`` (a
    concrete mask is checked; a traced one must have size 1 along the feature axes)."""
    if mask is None:
        return None
    if isinstance(mask, (bool, np.bool_)) or not hasattr(mask, "shape"):
        raise argument_error("mask", "None or a boolean array broadcastable to x", type(mask).__name__, TypeError)
    if jnp.asarray(mask).dtype != jnp.bool_:
        raise argument_error("mask", "a boolean array", jnp.asarray(mask).dtype, TypeError)
    ndim = len(shape)
    mask_shape = tuple(np.shape(mask))
    padded = (1,) * (ndim - len(mask_shape)) + mask_shape
    if len(mask_shape) > ndim or any(m not in (1, s) for m, s in zip(padded, shape)):
        raise argument_error("mask", f"a boolean array broadcastable to x's shape {shape}", mask_shape)
    traced = isinstance(mask, jax.core.Tracer)
    values = np.zeros(()) if traced else np.reshape(np.asarray(mask), padded)  # concrete: checked on the host
    for a in features:  # (even under jit)
        if padded[a] != 1 and (traced or not (values == np.take(values, [0], axis=a)).all()):
            raise argument_error(
                "mask",
                "the same positions for every feature (bn1d counts one set of positions per call; a traced mask "
                "needs size 1 along the feature axes)",
                f"a traced mask of shape {mask_shape}" if traced else
                f"a mask of shape {mask_shape} varying along feature axis {a}",
            )  # fmt: skip
    mask = jnp.reshape(jnp.asarray(mask), padded)
    index = tuple(slice(0, 1) if a in features else slice(None) for a in range(ndim))
    kept = jnp.broadcast_to(mask[index], tuple(1 if a in features else s for a, s in enumerate(shape)))
    return jnp.reshape(kept, tuple(s for a, s in enumerate(shape) if a not in features))


@functools.lru_cache(maxsize=256)
def _flax_config(
    num_features: int, reduce_axes: tuple[int, ...], epsilon: float, momentum: float, axis_name: Any,
    axis_index_groups: Any, fast_variance: bool,
) -> BatchNormConfig:  # fmt: skip
    return BatchNormConfig.from_arguments(
        num_features, reduce_axes, epsilon, momentum, axis_name=axis_name, axis_index_groups=axis_index_groups,
        fast_variance=fast_variance, unbiased_running_var=False,
    )  # fmt: skip


def flax_batch_norm(
    x: Any, mean: jax.Array, var: jax.Array, scale: Any, bias: Any, *, training: bool, axis: Any,
    momentum: float, epsilon: float, axis_name: Any, axis_index_groups: Any, use_fast_variance: bool,
    mask: Any, dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """``(y, new_mean, new_var)`` of Flax's ``BatchNorm`` (its axes, momentum, biased running
    variance, ``use_fast_variance``, mask broadcast to the input, output dtype: ``dtype``,
    or the input's and parameters' promoted) computed by bn1d's algorithm: one set of feature
    axes (several are flattened into one), statistics exact unless ``use_fast_variance``
    (R2.7), the running statistics kept in their dtype. Training (``training=True``)
    normalises with the batch's statistics over ``axis_name`` (count-weighted, R4) and
    returns the new running statistics; inference returns them unchanged."""
    x = jnp.asarray(x)
    features = flax_feature_axes(axis, x.ndim)
    if len(features) == x.ndim:  # one example (e.g. per vmap lane): a batch of one
        if training and axis_name is None and mask is None:  # R3.5, naming the shape given
            raise argument_error("x", "more than 1 value per feature when training", tuple(x.shape))
        mask = jnp.asarray(mask)[None] if hasattr(mask, "shape") else mask
        y, new_mean, new_var = flax_batch_norm(
            x[None], mean, var, scale, bias, training=training, axis=tuple(a + 1 for a in features),
            momentum=momentum, epsilon=epsilon, axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, mask=mask, dtype=dtype,
        )  # fmt: skip
        return y[0], new_mean, new_var
    shape = tuple(x.shape)
    feature_shape = tuple(shape[a] for a in features)
    count = math.prod(feature_shape)
    params = [p for p in (scale, bias) if p is not None]
    out_dtype = jnp.result_type(x, *params) if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(out_dtype, jnp.inexact):  # Flax's canonicalize_dtype(..., inexact=True)
        out_dtype = jnp.promote_types(jnp.float32, out_dtype)
    others = tuple(a for a in range(x.ndim) if a not in features)
    bn_mask = flax_mask(mask, shape, features) if training else None  # Flax ignores a mask in inference
    if len(features) == 1:
        view, reduce_axes = x, others
    else:  # the feature axes last, flattened into one
        view = jnp.reshape(jnp.transpose(x, others + features), tuple(shape[a] for a in others) + (count,))
        reduce_axes = tuple(range(len(others)))
    wide = jnp.promote_types(out_dtype, view.dtype)
    view = view.astype(wide) if view.dtype != wide else view
    if jnp.size(mean) != count:
        expected = f"{jnp.size(mean)} features on axes {features} (the running statistics' size)"
        raise argument_error("x", expected, shape)
    groups = None if axis_index_groups is None else _groups(axis_index_groups)
    config = _flax_config(count, reduce_axes, float(epsilon), float(momentum), axis_name, groups, use_fast_variance)
    stats_dtype = jnp.asarray(mean).dtype
    state = {"running_mean": jnp.reshape(mean, (count,)), "running_var": jnp.reshape(var, (count,))}
    neutral = {"scale": jnp.ones((count,), stats_dtype), "bias": jnp.zeros((count,), stats_dtype)}
    given = {"scale": scale, "bias": bias}
    values = {k: neutral[k] if given[k] is None else jnp.reshape(jnp.asarray(given[k]), (count,)) for k in neutral}
    y, new_state = jax_backend.apply(config, values, state, view, bn_mask, training)
    if len(features) > 1:
        y = jnp.transpose(jnp.reshape(y, tuple(shape[a] for a in others) + feature_shape),
                          tuple(int(a) for a in np.argsort(others + features)))  # fmt: skip
    return (
        y.astype(out_dtype),
        jnp.reshape(new_state["running_mean"], jnp.shape(mean)),
        jnp.reshape(new_state["running_var"], jnp.shape(var)),
    )


def _groups(axis_index_groups: Any) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(i) for i in group) for group in axis_index_groups)
