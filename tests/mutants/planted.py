"""Realistic planted bugs, each a third-party-style conformance backend (``tox -e mutants``).

Each mutant is the NumPy specification with one bug of the kind batch-norm
implementations really have (most are in a peer: the README table says which). A
bug in the algorithm is planted in a private copy of ``bn1d.algorithm`` that only the
mutant's layer calls, so the specification the suite scores against stays intact.
The suite must kill every mutant that is not equivalent within rounding
(``EQUIVALENT`` says which are, and why).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any

import array_api_compat.numpy as compat_numpy
import numpy as np

import bn1d.algorithm as spec_algorithm
from bn1d import validation
from bn1d.backends.numpy import BatchNorm1d
from bn1d.conformance.builtin import ArrayApiBackend
from bn1d.replicas import replica_hooks


def algorithm_copy(**replacements: Callable[[Any], Any]) -> Any:
    """A private copy of ``bn1d.algorithm`` in which each named function is replaced by
    ``make(original)`` (the copy's own original, so the copy's other functions call the
    replacement)."""
    spec = importlib.util.find_spec("bn1d.algorithm")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, make in replacements.items():
        setattr(module, name, make(getattr(module, name)))
    return module


class MutantLayer(BatchNorm1d):
    """The NumPy specification, calling ``algorithm`` with ``config_changes`` applied."""

    algorithm: Any = spec_algorithm
    config_changes: dict[str, Any] = {}

    def _config(self) -> Any:
        return dataclasses.replace(self.config, **self.config_changes) if self.config_changes else self.config

    def _forward(self, params: Any, state: Any, x: Any, mask: Any, training: bool) -> Any:
        algorithm = self.algorithm
        config = self.config
        xp = validation.check_inputs(x, mask, num_features=config.num_features, reduce_axes=config.reduce_axes)
        return algorithm.forward(
            xp, x, params, state, self._config(), training=training, mask=mask, hooks=self._hooks(training)
        )

    def vjp(self, x: Any, dy: Any, mask: Any = None, training: bool | None = None) -> Any:
        training = self.resolve_training(training)
        x, mask = self._inputs(x, mask)
        dy = self._cotangent(dy)
        return self.algorithm.batch_norm_vjp(
            x, dy, self.params, self.state, self._config(), training=training, mask=mask, hooks=self._hooks(training)
        )


def layer(name: str, base: type = MutantLayer, **attributes: Any) -> type:
    return type(name, (base,), attributes)


def backend(name: str, layer_class: type, hook: str = "all_sum") -> ArrayApiBackend:
    return ArrayApiBackend(name, compat_numpy, ("float16", "float32", "float64"), layer_class, hook)


# -- replacements of algorithm functions ----------------------------------------------------
def _running(change: Callable[..., Any]) -> Callable[[Any], Any]:
    """Replace ``running_statistics`` by ``change(original, *args, **kwargs)``."""

    def make(original: Any) -> Any:
        return lambda *args, **kwargs: change(original, *args, **kwargs)

    return make


def _swapped_momentum(original: Any, state: Any, count: Any, mean: Any, var: Any, config: Any, **kw: Any) -> Any:
    m = config.momentum
    flipped = config if m is None else dataclasses.replace(config, momentum=1.0 - m)
    return original(state, count, mean, var, flipped, **kw)


def _momentum_off_by_1e5(original: Any, state: Any, count: Any, mean: Any, var: Any, config: Any, **kw: Any) -> Any:
    """A 1e-5 relative error in the momentum arithmetic (e.g. a float32 constant)."""
    m = config.momentum
    nudged = config if m is None else dataclasses.replace(config, momentum=m * (1 - 1e-5))
    return original(state, count, mean, var, nudged, **kw)


def _per_replica_bessel(original: Any, state: Any, count: Any, mean: Any, var: Any, config: Any, **kw: Any) -> Any:
    """BrainPy 2.8.2's sync bug: the Bessel factor of the per-replica count. The local
    count is the global one over the number of replicas (the cases' replicas are
    equal-size), so ``var * n/(n-1)`` becomes ``var * (n/R)/(n/R - 1)``."""
    replicas = _replicas()
    if replicas == 1 or not config.unbiased_running_var:
        return original(state, count, mean, var, config, **kw)
    local = count / replicas
    factor = np.where(count > 1, (count - 1) / np.maximum(count, 1) * local / np.maximum(local - 1, 1e-30), 1.0)
    return original(state, count, mean, var * factor, config, **kw)


def _replicas() -> int:
    from bn1d import replicas

    context = getattr(replicas._thread_replica, "context", None)
    return 1 if context is None else context[0].count


def _counts_empty_calls(original: Any, state: Any, count: Any, mean: Any, var: Any, config: Any, **kw: Any) -> Any:
    """The cumulative average counts every training call, also those that kept nothing."""
    new = original(state, count, mean, var, config, **kw)
    if "num_batches_tracked" in new and kw.get("may_be_empty") and not bool(np.any(count > 0)):
        new["num_batches_tracked"] = state["num_batches_tracked"] + 1
    return new


def _equal_weights(original: Any) -> Any:
    """Flax's and BrainPy's pmean: every replica's mean weighs the same, whatever its count."""

    def combine(counts: Any, shifts: Any, sums: Any, squares: Any) -> Any:
        safe = np.where(counts > 0, counts, 1)
        equal = np.where(counts > 0, np.sum(counts) / max(int(np.sum(counts > 0)), 1), 0)
        scale = (equal / safe)[:, None]
        return original(equal, shifts, sums * scale, squares * scale)

    return combine


def _half_compute(original: Any) -> Any:
    """No upcast: half input is reduced in its own dtype (BrainPy, Haiku)."""

    def compute_dtype(xp: Any, *dtypes: Any) -> Any:
        first = dtypes[0] if dtypes else None
        return first if first in (np.float16, np.dtype(np.float16)) else original(xp, *dtypes)

    return compute_dtype


def _no_float64_for_input(original: Any) -> Any:
    """float64 input with float32 statistics computed in float32 (the statistics' dtype wins)."""
    return lambda xp, dtype, params, state: (
        original(xp, np.float32, params, state) if state else original(xp, dtype, params, state)
    )


def _narrow_accumulation(original: Any) -> Any:
    """Sums accumulated in the compute dtype (naive float32 accumulation)."""
    return lambda xp, dtype, where: dtype


def _unclamped(original: Any) -> Any:
    return lambda xp, value: value


class RoundedMean(MutantLayer):
    """The mean rounded to the input's precision before ``y = (x - mean) * f + b``: costs
    ``ulp(mean) / (2 sigma)`` in ``y``."""

    def _forward(self, params: Any, state: Any, x: Any, mask: Any, training: bool) -> Any:
        y, new_state = super()._forward(params, state, x, mask, training)
        if not training or mask is not None or x.size == 0:
            return y, new_state
        axes = self.config.reduce_axes
        keep = [1 if a in axes else -1 for a in range(x.ndim)]
        wide = x.astype(np.float64)
        exact = wide.mean(axis=axes).reshape(keep)
        rounded = exact.astype(x.dtype).astype(np.float64)
        inv = 1.0 / np.sqrt(wide.var(axis=axes).reshape(keep) + self.config.epsilon)
        scale = self.params["scale"].astype(np.float64).reshape(keep) if self.config.affine else 1.0
        return (y + (exact - rounded) * inv * scale).astype(y.dtype), new_state


class OutputFloat32(MutantLayer):
    def _forward(self, params: Any, state: Any, x: Any, mask: Any, training: bool) -> Any:
        y, new_state = super()._forward(params, state, x, mask, training)
        return y.astype(np.float32), new_state


class MaskIgnored(MutantLayer):
    def _inputs(self, x: Any, mask: Any) -> Any:
        return np.asarray(x), None


class MaskInverted(MutantLayer):
    def _inputs(self, x: Any, mask: Any) -> Any:
        return np.asarray(x), None if mask is None else ~np.asarray(mask)


class MaskedOutputsZero(MutantLayer):
    """Masked positions of ``y`` set to 0 instead of normalised."""

    def _forward(self, params: Any, state: Any, x: Any, mask: Any, training: bool) -> Any:
        y, new_state = super()._forward(params, state, x, mask, training)
        if mask is not None:
            y = np.where(np.expand_dims(mask, self.config.feature_axis), y, 0).astype(y.dtype)
        return y, new_state


class TrainingFlagIgnored(MutantLayer):
    def __call__(self, x: Any, mask: Any = None, training: bool | None = None) -> Any:
        return super().__call__(x, mask, None)


class InferenceUpdates(MutantLayer):
    """Inference updates the running statistics too (a missing ``if training``)."""

    def __call__(self, x: Any, mask: Any = None, training: bool | None = None) -> Any:
        y = super().__call__(x, mask, training)
        if not self.resolve_training(training) and self.state and np.asarray(x).size:
            _, state = super()._forward(self.params, self.state, *self._inputs(x, mask), True)
            self.__dict__["state"] = dict(state)
        return y


class EmptyBatchNaN(MutantLayer):
    """Flax's, Keras's and Equinox's NaN running statistics when nothing is kept."""

    def _forward(self, params: Any, state: Any, x: Any, mask: Any, training: bool) -> Any:
        y, new_state = super()._forward(params, state, x, mask, training)
        empty = np.asarray(x).size == 0 or (mask is not None and not np.any(mask))
        if training and empty and "running_mean" in new_state:
            new_state = {**new_state, "running_mean": new_state["running_mean"] * np.nan}
        return y, new_state


class ChannelsLastOnly(MutantLayer):
    """Reduces over every axis but the last, whatever ``axis`` says."""

    def _forward(self, params: Any, state: Any, x: Any, mask: Any, training: bool) -> Any:
        x = np.asarray(x)
        moved = np.moveaxis(x, self.config.feature_axis, -1)
        config = dataclasses.replace(self.config, reduce_axes=tuple(range(x.ndim - 1)))
        xp = validation.check_inputs(moved, None, num_features=config.num_features, reduce_axes=config.reduce_axes)
        y, new_state = self.algorithm.forward(xp, np.ascontiguousarray(x.reshape(moved.shape)), params, state, config,
                                              training=training, mask=None, hooks=self._hooks(training))  # fmt: skip
        return np.moveaxis(y.reshape(moved.shape), -1, self.config.feature_axis), new_state


class NoNegativeAxes(MutantLayer):
    """BrainPy 2.8.2: negative axes fail."""

    def __init__(self, num_features: Any, axis: Any = (0, 1), *args: Any, **kwargs: Any):
        if any(a < 0 for a in ((axis,) if isinstance(axis, int) else axis)):
            raise ValueError("axis: expected non-negative axes, got negative ones")
        super().__init__(num_features, axis, *args, **kwargs)


class InitializersIgnored(MutantLayer):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.pop("scale_initializer", None)
        kwargs.pop("bias_initializer", None)
        super().__init__(*args, **kwargs)


class ScalarInitializerIsZero(MutantLayer):
    """A scalar initializer read as 0 (an array-only code path)."""

    def __init__(self, *args: Any, **kwargs: Any):
        for key in ("scale_initializer", "bias_initializer"):
            if np.isscalar(kwargs.get(key)):
                kwargs[key] = 0.0
        super().__init__(*args, **kwargs)


class ExtraStateKey(MutantLayer):
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_batches_tracked": np.int64(0)}

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict({k: v for k, v in state.items() if k != "num_batches_tracked" or self.state})


class MissingBias(MutantLayer):
    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "bias"}


class NonAtomicLoad(MutantLayer):
    """Each entry checked and assigned in turn: a bad entry raises after the good ones landed."""

    def load_state_dict(self, state: Any) -> None:
        from bn1d.state import check_state

        if not isinstance(state, dict):
            return super().load_state_dict(state)
        for key in self.config.keys:
            if key in state:
                partial = {**self.state_dict(), key: state[key]}
                checked = check_state(partial, self.config, dtype=self._host_dtype())
                tree = "params" if key in self.config.param_keys else "state"
                self.__dict__[tree] = {**self.__dict__[tree], key: self._array(checked[key], key)}
        super().load_state_dict(state)


class UnexpectedKeysIgnored(MutantLayer):
    def load_state_dict(self, state: Any) -> None:
        if isinstance(state, dict):
            state = {k: v for k, v in state.items() if k in self.config.keys}
        super().load_state_dict(state)


class NaNStateRefused(MutantLayer):
    def load_state_dict(self, state: Any) -> None:
        if isinstance(state, dict) and any(not np.all(np.isfinite(np.asarray(v, np.float64))) for v in state.values()):
            raise ValueError("state_dict: expected finite values, got non-finite ones")
        super().load_state_dict(state)


class OverflowToInf(MutantLayer):
    """Values cast without the overflow check: 1e39 loads as inf."""

    def load_state_dict(self, state: Any) -> None:
        if isinstance(state, dict):
            top = np.finfo(np.float32).max
            state = {k: np.where(np.abs(v) > top, np.sign(v) * np.inf, v) if np.asarray(v).dtype.kind == "f" else v
                     for k, v in state.items()}  # fmt: skip
        super().load_state_dict(state)


class ErrorTypeWrong(MutantLayer):
    """A wrong kind of argument raises ValueError instead of TypeError."""

    def __init__(self, *args: Any, **kwargs: Any):
        try:
            super().__init__(*args, **kwargs)
        except TypeError as error:
            raise ValueError(str(error)) from None


class ArgumentNamedWrong(MutantLayer):
    """Errors name an internal variable (Flax's ``beta``-style names) instead of the argument."""

    def __init__(self, *args: Any, **kwargs: Any):
        try:
            super().__init__(*args, **kwargs)
        except (TypeError, ValueError) as error:
            raise type(error)("value" + str(error)[str(error).index(":") :]) from None


class StateChangesBeforeMaskCheck(MutantLayer):
    """The running statistics are updated from ``x`` before the mask is checked."""

    def __call__(self, x: Any, mask: Any = None, training: bool | None = None) -> Any:
        if mask is not None and self.resolve_training(training):
            super().__call__(x, None, training)
        return super().__call__(x, mask, training)


class BackwardWithoutStatistics(MutantLayer):
    """The backward pass treats the batch statistics as constants (``dx = dy * f``)."""

    def vjp(self, x: Any, dy: Any, mask: Any = None, training: bool | None = None) -> Any:
        return super().vjp(x, dy, mask, False)


class GroupsIgnored(MutantLayer):
    """``axis_index_groups`` accepted, then ignored (the whole axis syncs)."""

    def _hooks(self, training: bool) -> Any:
        return replica_hooks(None) if training and self.config.synced else super()._hooks(training)


class OneValueAccepted(MutantLayer):
    """One value per feature trains (variance 0) instead of raising."""

    def _forward(self, params: Any, state: Any, x: Any, mask: Any, training: bool) -> Any:
        if training and mask is None and np.asarray(x).size == self.config.num_features:
            return super()._forward(params, state, x, np.ones(np.delete(x.shape, self.config.feature_axis), bool),
                                    training)  # fmt: skip
        return super()._forward(params, state, x, mask, training)


#: name -> (the bug, the backend).
MUTANTS: dict[str, tuple[str, Callable[[], ArrayApiBackend]]] = {}


def _add(name: str, bug: str, make: Callable[[], ArrayApiBackend]) -> None:
    MUTANTS[name] = (bug, make)


def _config_mutant(name: str, bug: str, **changes: Any) -> None:
    _add(name, bug, lambda: backend(name, layer(name, config_changes=changes)))


def _algorithm_mutant(name: str, bug: str, hook: str = "all_sum", **replacements: Any) -> None:
    _add(name, bug, lambda: backend(name, layer(name, algorithm=algorithm_copy(**replacements)), hook))


def _layer_mutant(name: str, bug: str, cls: type, hook: str = "all_sum") -> None:
    _add(name, bug, lambda: backend(name, cls, hook))


_config_mutant("epsilon_ignored", "epsilon not added to the variance", epsilon=0.0)
_config_mutant("epsilon_keras_default", "epsilon fixed at Keras's 1e-3", epsilon=1e-3)
_algorithm_mutant("momentum_swapped", "PyTorch's momentum convention (the new statistic's weight)",
                  running_statistics=_running(_swapped_momentum))  # fmt: skip
_algorithm_mutant("momentum_relative_1e-5", "a 1e-5 relative error in the momentum arithmetic",
                  running_statistics=_running(_momentum_off_by_1e5))  # fmt: skip
_config_mutant("bessel_missing", "the running variance updated with the biased variance", unbiased_running_var=False)
_algorithm_mutant("bessel_per_replica", "BrainPy 2.8.2's Bessel factor of the per-replica count under sync",
                  running_statistics=_running(_per_replica_bessel))  # fmt: skip
_algorithm_mutant("replicas_equal_weight", "Flax's pmean: replicas' means averaged with equal weights",
                  hook="all_gather", combine_shifted=_equal_weights)  # fmt: skip
_layer_mutant("groups_ignored", "axis_index_groups accepted, then the whole axis syncs", GroupsIgnored)
_config_mutant("fast_variance_ignored", "fast_variance=True computes the exact variance", fast_variance=False)
_config_mutant("fast_variance_always", "the one-pass formula by default (BrainPy, Flax)", fast_variance=True)
_algorithm_mutant("fast_variance_unclamped", "the one-pass variance not clamped at 0", _nonnegative=_unclamped)
_algorithm_mutant("half_not_upcast", "float16 input reduced in float16 (BrainPy, Haiku)",
                  compute_dtype=_half_compute, accumulation_dtype=_narrow_accumulation)  # fmt: skip
_layer_mutant("output_float32", "y returned in float32 for half input", OutputFloat32)
_algorithm_mutant("float64_input_in_float32", "float64 input with float32 statistics computed in float32",
                  call_dtype=_no_float64_for_input)  # fmt: skip
_algorithm_mutant("naive_float32_sums", "sums accumulated in float32", accumulation_dtype=_narrow_accumulation)
_layer_mutant("mean_rounded_to_input", "the mean rounded to float32 before y (PyTorch's kernels)", RoundedMean)
_layer_mutant("mask_ignored", "the mask accepted, then ignored", MaskIgnored)
_layer_mutant("mask_inverted", "True read as masked out", MaskInverted)
_layer_mutant("masked_outputs_zero", "masked positions of y set to 0, not normalised", MaskedOutputsZero)
_layer_mutant("training_flag_ignored", "the per-call training= ignored (the mode only)", TrainingFlagIgnored)
_layer_mutant("inference_updates", "inference updates the running statistics", InferenceUpdates)
_layer_mutant("empty_batch_nan", "NaN running statistics when nothing is kept (Flax, Keras, Equinox)",
              EmptyBatchNaN)  # fmt: skip
_layer_mutant("channels_last_only", "every axis but the last reduced, whatever axis says", ChannelsLastOnly)
_layer_mutant("negative_axes_fail", "negative axes refused (BrainPy 2.8.2)", NoNegativeAxes)
_layer_mutant("initializers_ignored", "scale 1 and bias 0 whatever the initializers", InitializersIgnored)
_layer_mutant("scalar_initializer_zero", "a scalar initializer read as 0", ScalarInitializerIsZero)
_layer_mutant("extra_state_key", "num_batches_tracked always in the state", ExtraStateKey)
_layer_mutant("missing_bias_key", "bias left out of state_dict", MissingBias)
_layer_mutant("load_not_atomic", "each entry checked and assigned in turn", NonAtomicLoad)
_layer_mutant("load_not_strict", "unexpected keys ignored", UnexpectedKeysIgnored)
_layer_mutant("nan_state_refused", "a state with NaN refused (no round trip after divergence)", NaNStateRefused)
_layer_mutant("overflow_to_inf", "a finite value beyond float32 loads as inf", OverflowToInf)
_layer_mutant("error_type_wrong", "ValueError where the kind of value is wrong", ErrorTypeWrong)
_layer_mutant("argument_named_wrong", "errors name an internal variable, not the argument", ArgumentNamedWrong)
_layer_mutant("state_changed_before_error", "running statistics updated before the mask is checked",
              StateChangesBeforeMaskCheck)  # fmt: skip
_layer_mutant("backward_without_statistics", "the backward pass ignores the batch statistics' dependence on x",
              BackwardWithoutStatistics)  # fmt: skip
_layer_mutant("one_value_accepted", "one value per feature trains instead of raising", OneValueAccepted)
_algorithm_mutant("cumulative_counts_empty_calls", "momentum=None counts the calls that kept nothing",
                  running_statistics=_running(_counts_empty_calls))  # fmt: skip
_config_mutant("default_momentum_pytorch", "momentum fixed at 0.9 (a PyTorch default read as ours)", momentum=0.9)

#: Mutants that no case can kill because their results equal the specification's within
#: rounding, each with the reason. Empty: every mutant above changes an observable.
EQUIVALENT: dict[str, str] = {}
