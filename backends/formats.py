"""The peers' state formats, as NumPy arrays: PyTorch's ``state_dict`` keys and momentum,
Flax's variable collections, BrainPy's variables. It imports no framework (the conformance
suite's checks use it as well as the adapters).

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

from bn1d.config import BatchNormConfig, argument_error
from bn1d.initializers import _to_host
from bn1d.state import check_state

__all__ = [
    "FLAX_NAMES",
    "TORCH_KEYS",
    "from_brainpy",
    "from_flax_variables",
    "from_torch_state_dict",
    "to_brainpy",
    "to_flax_variables",
    "to_torch_state_dict",
    "torch_momentum",
]


def torch_momentum(momentum: float) -> float:
    """PyTorch's ``momentum`` for ours (and back): the weight of the new batch, ``1 - m``,
    the float nearest to it, and its own inverse wherever a function can be.

    Below 0.5, ``1 - m`` rounds (its float is coarser than ``m``'s), and returned as
    rounded: ``fl(1 - m)``. From 0.5 up, ``1 - m`` is exact, but several floats below
    0.5 round to this ``m``: the one returned is the shortest decimal among them (0.99
    gives 0.01, not 0.010000000000000009; ``fl(1 - 1/3)`` gives ``1/3``), so that
    ``torch_momentum(torch_momentum(m)) == m`` for every float ``m`` in [0.5, 1] and for
    the short decimals below (0.1, 0.3, 1/3). No function inverts every float below
    0.5 (there are more of them than floats near 1), so the layers also remember the
    momentum they were converted from (``backends/torch.py``).
    """
    exact = 1.0 - momentum
    if momentum < 0.5:
        return exact
    for digits in range(18):  # the shortest decimal whose complement rounds to momentum
        candidate = round(exact, digits)
        if 1.0 - candidate == momentum:
            return candidate
    return exact  # the exact complement: 1 - exact == momentum (Sterbenz)


#: Our state's keys and PyTorch's ``nn.BatchNorm*d`` keys for them.
TORCH_KEYS = {"scale": "weight", "bias": "bias", "running_mean": "running_mean", "running_var": "running_var",
              "num_batches_tracked": "num_batches_tracked"}  # fmt: skip


def to_torch_state_dict(state: Mapping[str, Any], num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """Our state as ``torch.nn.BatchNorm*d.state_dict()`` entries (NumPy arrays): PyTorch
    keeps ``num_batches_tracked`` whenever it tracks running statistics."""
    result = {TORCH_KEYS[key]: _to_host(value) for key, value in state.items()}
    if "running_mean" in state and "num_batches_tracked" not in state:
        result["num_batches_tracked"] = np.asarray(num_batches_tracked, dtype=np.int64)
    return result


def from_torch_state_dict(torch_state: Mapping[str, Any], cumulative: bool = False) -> dict[str, np.ndarray]:
    """``torch.nn.BatchNorm*d.state_dict()`` as our state: ``num_batches_tracked`` is
    part of it only for the cumulative average (``cumulative``, PyTorch's
    ``momentum=None``), the one configuration that reads it."""
    ours = {torch: key for key, torch in TORCH_KEYS.items()}
    state = {ours[key]: _to_host(value) for key, value in torch_state.items() if key in ours}
    if not cumulative:
        state.pop("num_batches_tracked", None)
    return state


#: Our state keys and the (collection, name) of the Flax variable that holds each (Flax
#: linen ``BatchNorm``'s; bn1d's own Flax modules keep the cumulative average's count
#: beside them, in ``batch_stats``).
FLAX_NAMES = {
    "scale": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
    "num_batches_tracked": ("batch_stats", "num_batches_tracked"),
}


def to_flax_variables(state: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Our state as Flax linen ``BatchNorm`` variables (which have no count)."""
    variables: dict[str, dict[str, np.ndarray]] = {}
    for key in ("running_mean", "running_var", "scale", "bias"):
        if key in state:
            collection, name = FLAX_NAMES[key]
            variables.setdefault(collection, {})[name] = _to_host(state[key])
    return variables


def from_flax_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax linen ``BatchNorm`` variables as our state.

    Flax can drop only one of ``scale``/``bias`` (``use_scale``/``use_bias``); our
    affine layer has both, so a missing one becomes its neutral value.
    """
    if "batch_stats" not in variables:
        raise argument_error("variables", "a mapping with 'batch_stats'", sorted(variables))
    stats = variables["batch_stats"]
    state = {key: _to_host(stats[FLAX_NAMES[key][1]]) for key in ("running_mean", "running_var")}
    params = variables.get("params") or {}
    if params:
        mean = state["running_mean"]
        neutral = {"scale": np.ones_like(mean), "bias": np.zeros_like(mean)}
        for key, value in neutral.items():
            name = FLAX_NAMES[key][1]
            state[key] = _to_host(params[name]) if name in params else value
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
    config = BatchNormConfig.from_arguments(
        int(np.shape(_value(layer.running_mean))[0]), affine=bool(getattr(layer, "affine", False))
    )
    checked = check_state(state, config)
    for key, value in checked.items():
        getattr(layer, key).value = value
