"""The state dictionary shared by every backend, and converters to and from peers.

A state is a flat mapping ``{"scale", "bias", "running_mean", "running_var"}``
(``scale``/``bias`` only when affine) of arrays of shape ``(num_features,)``.
:func:`check_state` validates a whole mapping into NumPy arrays before a backend
assigns anything, which is what makes every ``load_state_dict`` strict and
atomic.

The converters work on plain mappings of arrays and import no framework:

* PyTorch ``nn.BatchNorm1d``: ``weight``/``bias``/``running_mean``/``running_var``/
  ``num_batches_tracked``; PyTorch's momentum is ``1 - momentum`` here.
* Flax linen ``BatchNorm``: ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``;
  Flax's momentum has our convention.
* BrainPy ``BatchNorm1d``: attributes ``scale``, ``bias``, ``running_mean``,
  ``running_var`` holding ``brainpy.math`` variables (their ``.value``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import argument_error
from .initializers import _to_host

__all__ = [
    "STATE_KEYS",
    "state_keys",
    "check_state",
    "to_torch_state_dict",
    "from_torch_state_dict",
    "torch_momentum",
    "to_flax_variables",
    "from_flax_variables",
    "from_brainpy",
    "to_brainpy",
]

STATE_KEYS = ("scale", "bias", "running_mean", "running_var")


def state_keys(affine: bool) -> tuple[str, ...]:
    return STATE_KEYS if affine else STATE_KEYS[2:]


def check_state(state: Any, *, num_features: int, affine: bool, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Validate a whole state mapping; return it as NumPy arrays of ``dtype``.

    Raises ``TypeError`` for a non-mapping or non-numeric entry and ``ValueError``
    for a missing, unexpected or wrongly shaped entry, a non-finite value or a
    negative ``running_var``. Nothing is returned (so nothing can be assigned)
    unless every entry is valid.
    """
    if not isinstance(state, Mapping):
        raise argument_error("state_dict", "a mapping", type(state).__name__, TypeError)
    expected = state_keys(affine)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise argument_error(
            "state_dict", f"exactly the keys {list(expected)}", f"missing {missing}, unexpected {unexpected}"
        )
    result = {}
    for key in expected:
        try:
            value = _to_host(state[key])
        except Exception as error:
            raise argument_error(f"state_dict[{key!r}]", "an array", type(state[key]).__name__, TypeError) from error
        if value.dtype.kind not in "fiu":
            raise argument_error(f"state_dict[{key!r}]", "a real array", value.dtype, TypeError)
        if value.shape != (num_features,):
            raise argument_error(f"state_dict[{key!r}]", f"shape ({num_features},)", value.shape)
        if not np.all(np.isfinite(value)):
            raise argument_error(f"state_dict[{key!r}]", "finite values", value)
        result[key] = value.astype(dtype)
    if np.any(result["running_var"] < 0):
        raise argument_error("state_dict['running_var']", "non-negative values", result["running_var"])
    return result


def torch_momentum(momentum: float) -> float:
    """PyTorch's ``momentum`` for ours (and back): the weight of the new batch, ``1 - m``.

    Rounded to 15 significant decimals so that 0.99 maps to 0.01 (not
    0.010000000000000009) and a round trip returns the value it started from.
    """
    return round(1.0 - momentum, 15)


def to_torch_state_dict(state: Mapping[str, Any], num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """Our state as ``torch.nn.BatchNorm1d.state_dict()`` entries (NumPy arrays)."""
    result = {}
    if "scale" in state:
        result["weight"] = _to_host(state["scale"])
        result["bias"] = _to_host(state["bias"])
    result["running_mean"] = _to_host(state["running_mean"])
    result["running_var"] = _to_host(state["running_var"])
    result["num_batches_tracked"] = np.asarray(num_batches_tracked, dtype=np.int64)
    return result


def from_torch_state_dict(torch_state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``torch.nn.BatchNorm1d.state_dict()`` as our state (``num_batches_tracked`` is dropped)."""
    if "running_mean" not in torch_state or "running_var" not in torch_state:
        raise argument_error("torch_state", "running statistics (track_running_stats=True)", sorted(torch_state))
    state = {}
    if "weight" in torch_state:
        state["scale"] = _to_host(torch_state["weight"])
        state["bias"] = _to_host(torch_state["bias"])
    state["running_mean"] = _to_host(torch_state["running_mean"])
    state["running_var"] = _to_host(torch_state["running_var"])
    return state


def to_flax_variables(state: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Our state as Flax linen ``BatchNorm`` variables."""
    variables: dict[str, dict[str, np.ndarray]] = {
        "batch_stats": {"mean": _to_host(state["running_mean"]), "var": _to_host(state["running_var"])}
    }
    if "scale" in state:
        variables["params"] = {"scale": _to_host(state["scale"]), "bias": _to_host(state["bias"])}
    return variables


def from_flax_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax linen ``BatchNorm`` variables as our state.

    Flax can drop only one of ``scale``/``bias`` (``use_scale``/``use_bias``); our
    affine layer has both, so a missing one becomes its neutral value.
    """
    if "batch_stats" not in variables:
        raise argument_error("variables", "a mapping with 'batch_stats'", sorted(variables))
    stats = variables["batch_stats"]
    state = {"running_mean": _to_host(stats["mean"]), "running_var": _to_host(stats["var"])}
    params = variables.get("params") or {}
    if params:
        mean = state["running_mean"]
        state["scale"] = _to_host(params["scale"]) if "scale" in params else np.ones_like(mean)
        state["bias"] = _to_host(params["bias"]) if "bias" in params else np.zeros_like(mean)
    return state


def _value(variable: Any) -> np.ndarray:
    return _to_host(getattr(variable, "value", variable))


def from_brainpy(layer: Any) -> dict[str, np.ndarray]:
    """The state of a ``brainpy.dnn.BatchNorm1d`` (read from its variables)."""
    state = {"running_mean": _value(layer.running_mean), "running_var": _value(layer.running_var)}
    if getattr(layer, "affine", False):
        state["scale"] = _value(layer.scale)
        state["bias"] = _value(layer.bias)
    return state


def to_brainpy(state: Mapping[str, Any], layer: Any) -> None:
    """Write our state into a ``brainpy.dnn.BatchNorm1d``'s variables (``.value``)."""
    checked = check_state(
        state,
        num_features=int(np.shape(_value(layer.running_mean))[0]),
        affine=bool(getattr(layer, "affine", False)),
    )
    for key, value in checked.items():
        getattr(layer, key).value = value
