"""``BatchNorm1d`` as a stateful layer over any Array API library.

:class:`Layer` is the whole uniform protocol (``bn1d.protocol``): BrainPy's
constructor and the keyword-only options of ``bn1d.config.OPTIONS``, validated
once; parameters and running statistics held as two mappings, ``params`` and
``state``, of arrays of the layer's library ``xp``; ``state_dict`` and
``load_state_dict``; ``train``/``eval``; the analytic ``vjp``; synced statistics
under :func:`bn1d.replicas.run_replicas`. The NumPy and JAX backends are
subclasses that add what their library needs; any other Array API library
gets a working layer with no adapter at all::

    import array_api_strict as xp
    from bn1d import Layer

    layer = Layer(3, xp=xp)
    y = layer(xp.ones((4, 5, 3)))

(``docs/new-library.md`` shows how a library joins the conformance suite; the
contract every layer meets is ``docs/spec.md``.)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from . import algorithm, validation
from .algorithm import Hooks, Tuning
from .config import OPTIONS, BatchNormConfig, argument_error
from .initializers import Ones, Zeros, initial_value
from .protocol import TrainingSwitch
from .replicas import replica_hooks
from .state import check_state

__all__ = ["Layer", "brainpy_arguments", "brainpy_signature", "initial_state"]


def initial_state(config: BatchNormConfig, scale_initializer: Any, bias_initializer: Any, dtype: Any) -> dict[str, Any]:
    """Every entry of ``config.keys`` at construction, as NumPy values of ``dtype``
    (the count an int64 scalar): the initializers' ``scale`` and ``bias``, running
    mean 0, running variance 1, no batch tracked. Every backend's constructor."""
    c = config.num_features
    values: dict[str, Any] = {}
    if config.affine:
        values["scale"] = initial_value(scale_initializer, "scale_initializer", c, dtype)
        values["bias"] = initial_value(bias_initializer, "bias_initializer", c, dtype)
    defaults = {
        "running_mean": np.zeros(c, dtype),
        "running_var": np.ones(c, dtype),
        "num_batches_tracked": np.int64(0),
    }
    values.update({key: defaults[key] for key in config.state_keys})
    return values


class Layer(TrainingSwitch):
    """1-D batch normalization with BrainPy's signature on the arrays of ``xp``.

    Parameters are those of ``brainpy.dnn.BatchNorm1d``; keyword-only: ``dtype``
    of the parameters and statistics (float32 or float64; ``xp``'s float32 by
    default), ``xp`` (a subclass sets it) and the options ``fast_variance``,
    ``unbiased_running_var`` and ``track_running_stats`` (``bn1d.config``).
    ``momentum=None`` is PyTorch's cumulative average. The maths:
    ``bn1d.algorithm``.

    Attributes: ``config`` (the validated ``BatchNormConfig``), ``params``
    (``{"scale", "bias"}``, empty when not affine), ``state`` (``{"running_mean",
    "running_var"}``, with ``"num_batches_tracked"`` for ``momentum=None``, empty
    without ``track_running_stats``), ``training``, ``dtype``; the entries are also
    attributes (``layer.running_mean``).
    """

    #: The backend's private speed settings of the core (``bn1d.algorithm.Tuning``).
    _tuning = Tuning()

    #: The Array API namespace of a subclass's arrays (``Layer`` itself takes ``xp=``).
    xp: Any = None

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
        xp: Any = None,
        **options: Any,
    ):
        config = BatchNormConfig.from_arguments(
            num_features, axis, epsilon, momentum, affine, axis_name, axis_index_groups, mode, name, **options
        )
        namespace = xp if xp is not None else type(self).xp
        if not all(hasattr(namespace, name) for name in ("asarray", "float32", "__array_namespace_info__")):
            raise argument_error("xp", "an Array API namespace (Layer(..., xp=array_api_strict))", xp, TypeError)
        self.__dict__["xp"] = namespace
        self.__dict__["config"] = config
        self.__dict__["dtype"] = self._parameter_dtype(dtype)
        values = initial_state(config, scale_initializer, bias_initializer, self._host_dtype())
        self.__dict__["params"] = {key: self._array(values[key], key) for key in config.param_keys}
        self.__dict__["state"] = {key: self._array(values[key], key) for key in config.state_keys}
        self.training = config.training

    # -- the uniform layer protocol -------------------------------------------------
    def __call__(self, x: Any, mask: Any = None, training: bool | None = None) -> Any:
        """``y`` for ``x``; in training also updates ``state``."""
        training = self.resolve_training(training)
        x, mask = self._inputs(x, mask)
        y, state = self._forward(self.params, self.state, x, mask, training)
        if training:  # in the config's order (a pytree's flattening sorts the keys)
            self.__dict__["state"] = {key: state[key] for key in self.config.state_keys}
        return y

    def state_dict(self) -> dict[str, Any]:
        """Copies of the parameters and the running statistics, one flat mapping."""
        return {key: self._copy(value) for key, value in {**self.params, **self.state}.items()}

    def load_state_dict(self, state: Any) -> None:
        """Load a state strictly and atomically (``bn1d.state.check_state``): every
        entry is checked before any is assigned."""
        checked = check_state(state, self.config, dtype=self._host_dtype(), count_dtype=self._count_dtype())
        params = {key: self._array(checked[key], key) for key in self.config.param_keys}
        stats = {key: self._array(checked[key], key) for key in self.config.state_keys}
        self.__dict__.update(params=params, state=stats)

    # -- the gradient specification -----------------------------------------------
    def vjp(self, x: Any, dy: Any, mask: Any = None, training: bool | None = None) -> dict[str, Any]:
        """Gradients of ``sum(y * dy)`` with respect to ``x``, ``scale`` and ``bias`` at
        the current state (``bn1d.algorithm.batch_norm_vjp``); no state changes. Under
        :func:`~bn1d.replicas.run_replicas` the ``x`` gradient is that of the
        global-batch computation and the parameter gradients are this replica's
        share."""
        training = self.resolve_training(training)
        x, mask = self._inputs(x, mask)
        dy = self._cotangent(dy)
        try:
            namespace = array_namespace(x)
        except TypeError:
            namespace = None  # not an array at all: the core's check names it
        if namespace is not None:
            self._check_library(namespace, x)
        hooks = self._hooks(training)
        xp = validation.check_call(x, mask, self.params, self.state, self.config, training, hooks, dy, backward=True)
        return algorithm.backward(
            xp, x, dy, self.params, self.state, self.config, training=training, mask=mask, hooks=hooks,
            tuning=self._tuning,
        )  # fmt: skip

    # -- what subclasses adapt --------------------------------------------------------
    def _forward(self, params: Mapping[str, Any], state: Mapping[str, Any], x: Any, mask: Any, training: bool) -> Any:
        """``(y, new_state)`` from the core, inputs checked at this layer's boundary."""
        config = self.config
        xp = validation.check_inputs(x, mask, num_features=config.num_features, reduce_axes=config.reduce_axes)
        self._check_library(xp, x)
        return algorithm.forward(
            xp, x, params, state, self.config, training=training, mask=mask, hooks=self._hooks(training),
            tuning=self._tuning,
        )  # fmt: skip

    def _hooks(self, training: bool) -> Hooks:
        """The cross-replica hook of :func:`~bn1d.replicas.run_replicas` (none unsynced)."""
        return replica_hooks(self.config.axis_index_groups) if training and self.config.synced else Hooks()

    def _inputs(self, x: Any, mask: Any) -> tuple[Any, Any]:
        """``x`` and ``mask`` as arrays of ``xp`` (no conversion by default)."""
        return x, mask

    def _check_library(self, xp: Any, x: Any) -> None:
        """Raise ``TypeError`` unless ``x`` (of namespace ``xp``) is an array of the layer's library."""
        if xp is not self.xp and xp is not array_namespace(self.xp.asarray(0.0)):  # e.g. numpy, seen as compat's
            raise argument_error("x", f"an array of {self.xp.__name__}", type(x).__name__, TypeError)

    def _cotangent(self, dy: Any) -> Any:
        """``dy`` as an array of ``xp`` (no conversion by default; the core checks it)."""
        return dy

    def _parameter_dtype(self, dtype: Any) -> Any:
        xp = self.xp
        if dtype is None:
            return xp.float32
        if not any(dtype == d for d in (xp.float32, xp.float64)):
            raise argument_error("dtype", f"{xp.__name__}.float32 or {xp.__name__}.float64", dtype, TypeError)
        return xp.float64 if dtype == xp.float64 else xp.float32

    def _host_dtype(self) -> Any:
        return np.float64 if self.dtype == self.xp.float64 else np.float32

    def _count_dtype(self) -> Any:
        """The NumPy dtype of ``xp``'s default integer (the count's): int32 or int64."""
        integral = self.xp.__array_namespace_info__().default_dtypes()["integral"]
        return np.int32 if integral == self.xp.int32 else np.int64

    def _array(self, value: Any, key: str) -> Any:
        """A checked host value as an ``xp`` array: the count in the default integer dtype."""
        xp = self.xp
        if key == "num_batches_tracked":
            return xp.asarray(int(value), dtype=xp.__array_namespace_info__().default_dtypes()["integral"])
        return xp.asarray(np.asarray(value, self._host_dtype()), dtype=self.dtype)

    def _copy(self, value: Any) -> Any:
        return self.xp.asarray(value, copy=True)

    # -- the entries as attributes --------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        for tree in ("params", "state"):
            values = self.__dict__.get(tree, {})
            if name in values:
                return values[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        for tree in ("params", "state"):
            values = self.__dict__.get(tree, {})
            if name in values:
                values[name] = value
                return
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled with ``xp`` by its module name (a module does not pickle)."""
        return {**self.__dict__, "xp": self.xp.__name__}

    def __setstate__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values, xp=importlib.import_module(values["xp"]))

    def __repr__(self) -> str:
        c = self.config
        options = "".join(f", {k}={getattr(c, k)}" for k, default in OPTIONS.items() if getattr(c, k) != default)
        return (
            f"{type(self).__name__}({c.num_features}, axis={c.reduce_axes}, epsilon={c.epsilon}, "
            f"momentum={c.momentum}, affine={c.affine}, axis_name={c.axis_name!r}{options}, "
            f"training={self.training}, dtype={getattr(self.dtype, 'name', self.dtype)})"
        )


#: BrainPy's positional constructor parameters, written once: :class:`Layer`'s.
_BRAINPY_PARAMETERS = [
    p for p in inspect.signature(Layer.__init__).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD
]
_BRAINPY = inspect.Signature([*_BRAINPY_PARAMETERS, inspect.Parameter("options", inspect.Parameter.VAR_KEYWORD)])


def brainpy_arguments(*args: Any, **kwargs: Any) -> tuple[BatchNormConfig, Any, Any]:
    """BrainPy's constructor arguments (:class:`Layer`'s, and the options) for a module that
    forwards them: the validated config, the ``scale_initializer`` and the ``bias_initializer``."""
    try:
        bound = _BRAINPY.bind(None, *args, **kwargs)
    except TypeError as error:
        raise TypeError(f"BatchNorm1d: {error}") from None
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    options = arguments.pop("options")
    del arguments["self"]
    scale, bias = arguments.pop("scale_initializer"), arguments.pop("bias_initializer")
    return BatchNormConfig.from_arguments(**arguments, **options), scale, bias


def brainpy_signature(init: Any) -> Any:
    """``init(self, *args, <its keywords>, **kwargs)``, which forwards BrainPy's arguments,
    shown (``inspect.signature``, ``help``, IDEs) with them: :class:`Layer`'s positional
    parameters, then ``init``'s own keyword-only ones and ``**options``."""
    own = [p for p in inspect.signature(init).parameters.values() if p.kind is p.KEYWORD_ONLY]
    options = inspect.Parameter("options", inspect.Parameter.VAR_KEYWORD)
    init.__signature__ = inspect.Signature([*_BRAINPY_PARAMETERS, *own, options])
    return init
