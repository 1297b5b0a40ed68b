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

Variables are named as in Flax (``bn1d.state.to_flax_variables``): ``scale``,
``bias``, ``mean``, ``var``, plus ``num_batches_tracked`` for the cumulative average.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bn1d.backends import jax as jax_backend
from bn1d.config import OPTIONS, BatchNormConfig, argument_error
from bn1d.state import FLAX_NAMES, from_flax_variables, to_flax_variables

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


@functools.lru_cache(maxsize=256)
def _engine(config: BatchNormConfig) -> jax_backend.BatchNorm1d:
    """A JAX layer of ``config`` whose methods are used and whose values never are."""
    return jax_backend.BatchNorm1d(**config_arguments(config))


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
    """``(y, new_state)``: ``bn1d.backends.jax.BatchNorm1d.apply`` (inputs checked at
    trace time), or its jitted form when nothing is traced."""
    if isinstance(mask, (bool, np.bool_)):
        raise argument_error("mask", "None or a boolean array of x's shape without the feature axis", mask, TypeError)
    layer = _engine(config)
    x, mask = layer._inputs(x, mask)
    leaves = jax.tree.leaves((dict(params), dict(state), x, mask))
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        y, new_state = layer.apply(params, state, x, mask=mask, training=training)
    else:
        y, new_state = layer._forward(params, state, x, mask, training)
    return y, dict(new_state)


def flax_variables(state: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
    """bn1d's state as Flax variable collections (``bn1d.state.to_flax_variables``),
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
    """Flax variable collections as bn1d's state (``bn1d.state.from_flax_variables``;
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
