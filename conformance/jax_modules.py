"""Conformance adapters of bn1d's Flax NNX, Flax linen and Equinox modules
(``bn1d.backends.nnx``, ``.linen``, ``.equinox``), registered as the backends ``nnx``,
``linen`` and ``equinox``.

Each module keeps its parameters and running statistics where its library does, so
each adapter's ``make_layer`` returns a small stateful shim of the uniform protocol
(``bn1d.protocol``) around the module and its state: the NNX module itself, a linen
module with its variables, an Equinox module with its ``eqx.nn.State``. The shim
calls the module with its library's arguments (``use_running_average``,
``inference``), switches its mode the library's way (``.train()``/``.eval()``, a
``use_running_average`` attribute, ``eqx.nn.inference_mode``), and reads and loads
bn1d's state dictionary through the module's own methods. As for ``JaxBackend``:
gradients by ``jax.grad`` (``nnx.grad`` for NNX), synced cases under ``jax.vmap`` with
an ``axis_name``, float64 cases with ``jax_enable_x64`` on.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from bn1d.config import argument_error
from bn1d.protocol import resolve_training

from .builtin import JaxBackend

__all__ = ["ModuleBackend", "equinox_backend", "linen_backend", "nnx_backend"]


def _check_mode(mode: Any) -> bool:
    """``train(mode)``'s argument, checked as ``bn1d.protocol.TrainingSwitch`` does."""
    if not isinstance(mode, bool):
        raise argument_error("mode", "a bool", mode, TypeError)
    return mode


class ModuleBackend(JaxBackend, abc.ABC):
    """What the three adapters share with ``JaxBackend`` (arrays, dtypes, precision and
    the synced run, ``_run_job``); each gives its layer and its replicas' training call
    under ``jax.vmap`` (``_replicas``)."""

    @abc.abstractmethod
    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> Any:
        """The module's layer for one case, behind bn1d's uniform protocol."""

    @abc.abstractmethod
    def _replicas(self, layer: Any, name: Any) -> Any:
        """``f(xs, masks) -> (ys, per-replica bn1d states)`` of ``layer`` under ``jax.vmap``
        (``JaxBackend._run_job`` runs it and takes the gradients)."""

    def _loss(self, y: Any, dy: Any) -> Any:
        wide = self._loss_dtype(y.dtype)
        return self.jnp.sum(y.astype(wide) * dy.astype(wide))


# -- Flax NNX -------------------------------------------------------------------------------


class NnxLayer:
    """The protocol over an ``nnx`` module: the mode is its ``use_running_average``."""

    def __init__(self, module: Any):
        self.module = module

    @property
    def training(self) -> bool:
        return not self.module.use_running_average

    def __call__(self, x: Any, mask: Any = None, training: bool | None = None) -> Any:
        training = resolve_training(training, self.training)
        return self.module(x, mask, use_running_average=not training)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.module.load_state_dict(state)

    def train(self, mode: bool = True) -> NnxLayer:
        self.module.train() if _check_mode(mode) else self.module.eval()
        return self

    def eval(self) -> NnxLayer:
        return self.train(False)


class NnxBackend(ModuleBackend):
    """``bn1d.backends.nnx.BatchNorm1d``; gradients by ``nnx.grad`` (of a clone, so the
    layer keeps its statistics), replicas under ``jax.vmap`` over ``nnx.split``/``nnx.merge``."""

    name = "nnx"

    def __init__(self) -> None:
        super().__init__()
        from flax import nnx

        from bn1d.backends import jax_modules
        from bn1d.backends import nnx as nnx_module

        self.nnx, self.module, self.names = nnx, nnx_module, jax_modules.FLAX_NAMES

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> NnxLayer:
        return NnxLayer(self.module.BatchNorm1d(**kwargs, dtype=self.jnp.dtype(param_dtype)))

    def gradients(self, layer: Any, x: Any, dy: Any, mask: Any, training: bool) -> dict[str, np.ndarray]:
        nnx = self.nnx

        def loss(module: Any, x: Any) -> Any:
            return self._loss(module(x, mask, use_running_average=not training), dy)

        params, x_grad = nnx.grad(loss, argnums=(0, 1))(nnx.clone(layer.module), x)
        return {"x": self.to_numpy(x_grad), **{k: self.to_numpy(v) for k, v in nnx.to_pure_dict(params).items()}}

    def _replicas(self, layer: Any, name: Any) -> Any:
        jax, nnx = self.jax, self.nnx
        graphdef, params, stats = nnx.split(layer.module, nnx.Param, nnx.BatchStat)
        keys = {flax: key for key, (_, flax) in self.names.items()}

        def replica(stats: Any, x: Any, mask: Any) -> Any:
            module = nnx.merge(graphdef, params, stats)
            y = module(x, mask, use_running_average=False)
            return y, {keys[k]: v for k, v in nnx.to_pure_dict(nnx.state(module, nnx.BatchStat)).items()}

        return lambda xs, masks: jax.vmap(replica, in_axes=(None, 0, None if masks is None else 0), axis_name=name)(
            stats, xs, masks
        )


def nnx_backend() -> NnxBackend:
    return NnxBackend()


# -- Flax linen -----------------------------------------------------------------------------


class LinenLayer:
    """The protocol over a linen module and its variables: the mode is the module's
    ``use_running_average`` attribute (``train()``/``eval()`` clone it with a new one);
    a call's ``training`` is its ``use_running_average`` argument."""

    def __init__(self, module: Any, variables: Any, resolve: Any):
        self.module, self.variables, self._resolve = module, variables, resolve

    @property
    def training(self) -> bool:
        return self._resolve(None, self.module.use_running_average)

    def __call__(self, x: Any, mask: Any = None, training: bool | None = None) -> Any:
        flag = None if training is None else not resolve_training(training, self.training)
        if not resolve_training(training, self.training):
            return self.module.apply(self.variables, x, flag, mask=mask)
        y, updates = self.module.apply(self.variables, x, flag, mask=mask, mutable=["batch_stats"])
        self.variables = {**self.variables, **updates}
        return y

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict(self.variables)

    def load_state_dict(self, state: Any) -> None:
        self.variables = self.module.variables_from_state_dict(state)

    def train(self, mode: bool = True) -> LinenLayer:
        self.module = self.module.clone(use_running_average=not _check_mode(mode))
        return self

    def eval(self) -> LinenLayer:
        return self.train(False)


class LinenBackend(ModuleBackend):
    """``bn1d.backends.linen.BatchNorm1d``: variables from ``module.init``; gradients by
    ``jax.grad`` of ``module.apply`` with respect to ``params``; replicas under ``jax.vmap``
    with ``mutable=["batch_stats"]``."""

    name = "linen"

    def __init__(self) -> None:
        super().__init__()
        from bn1d.backends import jax_modules
        from bn1d.backends import linen as linen_module

        self.module, self.jax_modules = linen_module, jax_modules

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> LinenLayer:
        module = self.module.BatchNorm1d(**kwargs, dtype=self.jnp.dtype(param_dtype))
        config = module.initial_layer().config  # validates the arguments, as a constructor
        shape = [2] * config.ndim
        shape[config.feature_axis] = config.num_features
        variables = module.init(self.jax.random.key(0), self.jnp.zeros(shape, self.jnp.dtype(param_dtype)))
        resolve = lambda call, attribute: self.jax_modules.resolve_training(call, attribute, config)  # noqa: E731
        return LinenLayer(module, variables, resolve)

    def gradients(self, layer: Any, x: Any, dy: Any, mask: Any, training: bool) -> dict[str, np.ndarray]:
        variables = layer.variables

        def loss(params: Any, x: Any) -> Any:
            y, _ = layer.module.apply({**variables, "params": params}, x, not training, mask=mask, mutable=True)
            return self._loss(y, dy)

        params, x_grad = self.jax.grad(loss, argnums=(0, 1))(variables.get("params", {}), x)
        return {"x": self.to_numpy(x_grad), **{k: self.to_numpy(v) for k, v in params.items()}}

    def _replicas(self, layer: Any, name: Any) -> Any:
        jax = self.jax
        module, variables = layer.module, layer.variables

        names = {key: flax for key, (collection, flax) in self.jax_modules.FLAX_NAMES.items() if collection != "params"}

        def replica(x: Any, mask: Any) -> Any:
            y, updates = module.apply(variables, x, False, mask=mask, mutable=["batch_stats"])
            stats = updates.get("batch_stats", {})
            return y, {key: stats[flax] for key, flax in names.items() if flax in stats}

        return lambda xs, masks: jax.vmap(replica, in_axes=(0, None if masks is None else 0), axis_name=name)(xs, masks)


def linen_backend() -> LinenBackend:
    return LinenBackend()


# -- Equinox --------------------------------------------------------------------------------


class EquinoxLayer:
    """The protocol over an Equinox module and its ``eqx.nn.State``: the mode is the
    module's ``inference`` field (``train()``/``eval()``: ``eqx.nn.inference_mode``)."""

    def __init__(self, module: Any, state: Any, eqx: Any):
        self.module, self.state, self._eqx = module, state, eqx

    @property
    def training(self) -> bool:
        return not self.module.inference

    def __call__(self, x: Any, mask: Any = None, training: bool | None = None) -> Any:
        inference = None if training is None else not resolve_training(training, self.training)
        y, self.state = self.module(x, self.state, inference=inference, mask=mask)
        return y

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict(self.state)

    def load_state_dict(self, state: Any) -> None:
        self.module, self.state = self.module.load_state_dict(state, self.state)

    def train(self, mode: bool = True) -> EquinoxLayer:
        self.module = self._eqx.nn.inference_mode(self.module, value=not _check_mode(mode))
        return self

    def eval(self) -> EquinoxLayer:
        return self.train(False)


def _copied(jax: Any, state: Any) -> Any:
    """A copy of an ``eqx.nn.State`` (a call consumes the state it is given)."""
    leaves, treedef = jax.tree.flatten(state)
    return jax.tree.unflatten(treedef, leaves)


class EquinoxBackend(ModuleBackend):
    """``bn1d.backends.equinox.BatchNorm1d`` from ``eqx.nn.make_with_state``; gradients by
    ``jax.grad`` with respect to the module's arrays (``eqx.partition``); replicas under
    ``jax.vmap``, each a whole local batch."""

    name = "equinox"

    def __init__(self) -> None:
        super().__init__()
        import equinox as eqx

        from bn1d.backends import equinox as equinox_module

        self.eqx, self.module = eqx, equinox_module

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> EquinoxLayer:
        module, state = self.eqx.nn.make_with_state(self.module.BatchNorm1d)(
            **kwargs, dtype=self.jnp.dtype(param_dtype)
        )
        return EquinoxLayer(module, state, self.eqx)

    def gradients(self, layer: Any, x: Any, dy: Any, mask: Any, training: bool) -> dict[str, np.ndarray]:
        eqx = self.eqx
        arrays, static = eqx.partition(layer.module, eqx.is_inexact_array)

        def loss(arrays: Any, x: Any) -> Any:
            module = eqx.combine(arrays, static)
            y, _ = module(x, _copied(self.jax, layer.state), inference=not training, mask=mask)
            return self._loss(y, dy)

        grads, x_grad = self.jax.grad(loss, argnums=(0, 1))(arrays, x)
        params = {} if grads.weight is None else {"scale": grads.weight, "bias": grads.bias}
        return {"x": self.to_numpy(x_grad), **{k: self.to_numpy(v) for k, v in params.items()}}

    def _replicas(self, layer: Any, name: Any) -> Any:
        jax = self.jax
        module, state = layer.module, layer.state

        def replica(x: Any, mask: Any) -> Any:
            y, new_state = module(x, _copied(jax, state), inference=False, mask=mask)
            return y, {k: v for k, v in module.state_dict(new_state).items() if k not in ("scale", "bias")}

        return lambda xs, masks: jax.vmap(replica, in_axes=(0, None if masks is None else 0), axis_name=name)(xs, masks)


def equinox_backend() -> EquinoxBackend:
    return EquinoxBackend()
