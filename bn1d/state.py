"""The state dictionary shared by every backend, and converters to and from peers.

A state is a flat mapping with the keys of ``BatchNormConfig.keys``: ``scale``
and ``bias`` when affine, ``running_mean`` and ``running_var`` when running
statistics are tracked (arrays of shape ``(num_features,)``), and the integer
``num_batches_tracked`` for the cumulative average (``momentum=None``).
:func:`check_state` validates a whole mapping into NumPy arrays before a backend
assigns anything, which is what makes every ``load_state_dict`` strict and
atomic (``docs/spec.md`` R6).

The converters work on plain mappings of arrays and import no framework:

* PyTorch ``nn.BatchNorm1d``: ``weight``/``bias``/``running_mean``/``running_var``/
  ``num_batches_tracked``; PyTorch's momentum is ``1 - momentum`` here.
* Flax linen ``BatchNorm``: ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``;
  Flax's momentum has our convention.
* BrainPy ``BatchNorm1d``: attributes ``scale``, ``bias``, ``running_mean``,
  ``running_var`` holding ``brainpy.math`` variables (their ``.value``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import BatchNormConfig, argument_error
from .initializers import _to_host

__all__ = [
    "FLAX_NAMES",
    "check_state",
    "to_torch_state_dict",
    "from_torch_state_dict",
    "torch_momentum",
    "to_flax_variables",
    "from_flax_variables",
    "from_brainpy",
    "to_brainpy",
]


def _real(value: np.ndarray) -> bool:
    """A real array, bfloat16 (ml_dtypes' NumPy extension, kind ``V``) included."""
    return value.dtype.kind in "fiu" or value.dtype.name == "bfloat16"


def check_state(
    state: Any,
    config: BatchNormConfig,
    dtype: Any = np.float32,
    count_dtype: Any = np.int64,
    names: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Validate a whole state mapping against ``config.keys``; return it as NumPy
    arrays of ``dtype`` (``num_batches_tracked``: a scalar of ``count_dtype``, the
    layer's integer dtype). ``names``: the key by which an error names an entry
    (``state_dict['<name>']``), where it is not the entry's own (a parent's full key
    ``prefix + key``, or PyTorch's ``weight`` for ``scale``).

    Raises ``TypeError`` for a non-mapping or non-numeric entry and ``ValueError``
    for a missing, unexpected or wrongly shaped entry, a finite value that ``dtype``
    cannot hold (it would become inf), a negative ``running_var`` or a count that is
    not a non-negative integer that ``count_dtype`` holds. Non-finite values load, with a ``RuntimeWarning`` naming the
    entry: a checkpoint of a diverged run must load for inspection, and a layer's
    own ``state_dict()`` always loads back into it, bit for bit. Nothing is returned
    (so nothing can be assigned) unless every entry is valid.
    """
    if not isinstance(state, Mapping):
        raise argument_error("state_dict", "a mapping", type(state).__name__, TypeError)
    expected = config.keys
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise argument_error(
            "state_dict", f"exactly the keys {list(expected)}", f"missing {missing}, unexpected {unexpected}"
        )
    result = {}
    for key in expected:
        name = f"state_dict[{(names or {}).get(key, key)!r}]"
        try:
            value = _to_host(state[key])
        except Exception as error:
            raise argument_error(name, "an array", type(state[key]).__name__, TypeError) from error
        if not _real(value):
            raise argument_error(name, "a real array (float, int or bfloat16)", value.dtype, TypeError)
        if key == "num_batches_tracked":
            top = np.iinfo(count_dtype).max
            if value.shape != () or not np.isfinite(value) or not 0 <= value <= top or value != np.floor(value):
                raise argument_error(name, f"a non-negative integer count up to {top} (a scalar)", value)
            result[key] = np.asarray(int(value), count_dtype)
            continue
        value = value.astype(np.float64) if value.dtype.name == "bfloat16" else value
        if value.shape != (config.num_features,):
            raise argument_error(name, f"shape ({config.num_features},)", value.shape)
        with np.errstate(over="ignore"):  # an overflow is reported below, as an argument error
            converted = value.astype(dtype)
        if np.any(np.isfinite(value) & ~np.isfinite(converted)):
            raise argument_error(name, f"finite values that {np.dtype(dtype).name} can hold", value)
        if not np.all(np.isfinite(value)):
            warnings.warn(f"{name} holds non-finite values (a diverged run?): {value}", RuntimeWarning, stacklevel=3)
        result[key] = converted
    if "running_var" in result and np.any(result["running_var"] < 0):
        name = f"state_dict[{(names or {}).get('running_var', 'running_var')!r}]"
        raise argument_error(name, "non-negative values", result["running_var"])
    return result


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
