"""Other libraries' batch norms as conformance backends ("peers"): the suite's cases
run on what users already use, and the report says where they differ from the spec.

Each adapter maps a case's configuration (BrainPy's arguments) onto the library's own
conventions: the momentum convention (PyTorch's is ``1 - m``), the feature axis (any
layout is moved to the one the library takes, and back), epsilon, the variance mode
(Flax's ``use_fast_variance``), and initial parameter values. What the library cannot
set at all (a mask in PyTorch, an unbiased running variance in Flax, groups under
``vmap``) raises :class:`~bn1d.conformance.registry.NotApplicable`: the case is
reported as not expressible, never as passed. Nothing is validated here on the
library's behalf: bad arguments, inputs and states go to the library as they are, so
the error cases measure the library's own behaviour.

Registered under ``bn1d.conformance.peers`` (``python -m bn1d.conformance --peers``,
``tox -e peers``); a peer that is not installed is reported as missing.
"""

from __future__ import annotations

import abc
import contextlib
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from bn1d.backends.formats import torch_momentum
from bn1d.config import normalize_reduce_axes
from bn1d.initializers import Ones, Zeros, initial_value
from bn1d.protocol import resolve_training

from .registry import NotApplicable, ReplicaJob, ReplicaResult

__all__ = ["brainpy_peer", "equinox_peer", "flax_linen_peer", "flax_nnx_peer", "keras_peer", "torch_nn_peer"]

_BRAINPY = ("num_features", "axis", "epsilon", "momentum", "affine", "bias_initializer", "scale_initializer",
            "axis_name", "axis_index_groups", "mode", "name")  # fmt: skip


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Layout:
    """A case's layout moved to a library's: the feature axis to ``to`` (1 or -1) and
    every reduced axis kept (the library reduces all axes but the feature axis)."""

    def __init__(self, axis: Any, to: int):
        try:
            self.reduce_axes = normalize_reduce_axes(axis)
        except (TypeError, ValueError) as error:
            raise NotApplicable("no axis argument: the layout is the input's") from error
        self.ndim = len(self.reduce_axes) + 1
        self.feature = next(a for a in range(self.ndim) if a not in self.reduce_axes)
        self.to = to

    def forward(self, x: Any, xp: Any) -> Any:
        return xp.moveaxis(x, self.feature, self.to)

    def back(self, y: Any, xp: Any) -> Any:
        return xp.moveaxis(y, self.to, self.feature)

    def mask(self, mask: Any, xp: Any) -> Any:
        """The case's mask (the input's shape without the feature axis) as one of the
        moved input's rank (a size-1 feature axis)."""
        return None if mask is None else xp.expand_dims(mask, self.to if self.to >= 0 else mask.ndim + 1 + self.to)


class PeerLayer(abc.ABC):
    """The uniform stateful protocol (``bn1d.protocol``) over a peer's layer.

    Subclasses implement ``_call(x, mask, training)``, ``_state()`` (in bn1d's keys)
    and ``_load(state)``; ``training``, ``train()``/``eval()`` and the per-call flag
    are here."""

    def __init__(self, arguments: dict[str, Any], layout: bool = True):
        unknown = sorted(set(arguments) - set(_BRAINPY))
        if unknown:
            raise NotApplicable(f"no option {unknown[0]}")
        self.arguments = arguments
        mode = arguments.get("mode")
        if mode not in (None, "training", "inference"):
            raise NotApplicable("no mode argument (train()/eval() only)")
        self.training = mode != "inference"
        if layout:
            self.layout = Layout(arguments.get("axis", (0, 1)), self.feature_to)

    feature_to = -1

    def initial(self, key: str, dtype: Any = np.float32) -> np.ndarray:
        """The case's initializer evaluated on the host (the libraries take values)."""
        default = Ones() if key == "scale_initializer" else Zeros()
        try:
            return initial_value(self.arguments.get(key, default), key, self.arguments["num_features"], dtype)
        except (TypeError, ValueError) as error:
            raise NotApplicable("takes initial values, not bn1d's initializers") from error

    def train(self, mode: bool = True) -> PeerLayer:
        self.training = mode
        return self

    def eval(self) -> PeerLayer:
        return self.train(False)

    def __call__(self, x: Any, mask: Any = None, training: bool | None = None) -> Any:
        return self._call(x, mask, resolve_training(training, self.training))

    def state_dict(self) -> dict[str, Any]:
        return self._state()

    def load_state_dict(self, state: Any) -> None:
        self._load(state)

    @abc.abstractmethod
    def _call(self, x: Any, mask: Any, training: bool) -> Any:
        """``y`` of one call in the case's layout (``NotApplicable`` where the peer has no such call)."""

    @abc.abstractmethod
    def _state(self) -> dict[str, Any]:
        """The peer's state in bn1d's keys and conventions."""

    @abc.abstractmethod
    def _load(self, state: Any) -> None:
        """Load a state given in bn1d's keys and conventions."""


class _Peer:
    """What every peer adapter shares: the case's arrays as NumPy on the host."""

    name = ""
    dtypes: Sequence[str] = ("float32", "float64")

    def to_numpy(self, array: Any) -> np.ndarray:
        if hasattr(array, "detach"):
            array = array.detach().cpu()
            array = array.double() if array.is_floating_point() else array
        array = np.asarray(array)
        return array.astype(np.float64) if array.dtype.kind in "fV" else array

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {self.distribution: version(self.distribution)}

    distribution = ""


# -- PyTorch ------------------------------------------------------------------------------
class _TorchLayer(PeerLayer):
    feature_to = 1

    def __init__(self, arguments: dict[str, Any], dtype: Any):
        tracked = arguments.pop("track_running_stats", True)
        super().__init__(arguments)
        import torch

        if arguments.get("axis_name") is not None:
            raise NotApplicable("SyncBatchNorm refuses CPU tensors")
        self.torch = torch
        momentum = arguments.get("momentum", 0.99)
        self.module = torch.nn.BatchNorm1d(
            arguments["num_features"], eps=arguments.get("epsilon", 1e-5),
            momentum=torch_momentum(momentum) if _real(momentum) else momentum, affine=arguments.get("affine", True),
            track_running_stats=tracked, dtype=dtype,
        )  # fmt: skip
        if self.module.affine:
            with torch.no_grad():
                self.module.weight.copy_(torch.from_numpy(self.initial("scale_initializer")))
                self.module.bias.copy_(torch.from_numpy(self.initial("bias_initializer")))

    def _call(self, x: Any, mask: Any, training: bool) -> Any:
        if mask is not None:
            raise NotApplicable("no masks")
        moved = self.layout.forward(x, self.torch)
        shape = moved.shape
        flat = moved.reshape(shape[0], shape[1], -1) if moved.dim() > 3 else moved
        self.module.train(training)
        return self.layout.back(self.module(flat).reshape(shape), self.torch)

    def _state(self) -> dict[str, Any]:
        from bn1d.backends.formats import from_torch_state_dict

        return from_torch_state_dict(self.module.state_dict(), cumulative=self.module.momentum is None)

    def _load(self, state: Any) -> None:
        from bn1d.backends.formats import TORCH_KEYS

        module: Any = self.module
        torch_state = {str(TORCH_KEYS.get(k, k)): self.torch.as_tensor(np.asarray(v)) for k, v in dict(state).items()}
        if module.track_running_stats and "num_batches_tracked" not in torch_state:
            torch_state["num_batches_tracked"] = module.num_batches_tracked.clone()
        module.load_state_dict(torch_state)


class TorchNNPeer(_Peer):
    """``torch.nn.BatchNorm1d`` on ``(N, C, L)``: the features moved to axis 1, the
    other axes flattened into ``L``; momentum ``1 - m``."""

    name, distribution = "torch_nn", "torch"
    dtypes = ("float16", "bfloat16", "float32", "float64")

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> Any:
        kwargs = _fixed(kwargs, "PyTorch", has=("momentum=None", "track_running_stats"))
        return _TorchLayer(kwargs, getattr(self.torch, param_dtype))

    def asarray(self, array: np.ndarray, dtype: str | None = None) -> Any:
        tensor = self.torch.from_numpy(np.array(array))
        return tensor if dtype is None else tensor.to(getattr(self.torch, dtype))

    def gradients(self, layer: Any, x: Any, dy: Any, mask: Any, training: bool) -> dict[str, np.ndarray]:
        torch = self.torch
        x = x.detach().requires_grad_()
        y = layer(x, mask=mask, training=training)
        wide = torch.promote_types(y.dtype, torch.float32)
        params = {{"weight": "scale"}.get(k, k): p for k, p in layer.module.named_parameters()}
        grads = torch.autograd.grad((y.to(wide) * dy.to(wide)).sum(), [x, *params.values()])
        return {"x": self.to_numpy(grads[0]), **{k: self.to_numpy(g) for k, g in zip(params, grads[1:])}}


def torch_nn_peer() -> TorchNNPeer:
    return TorchNNPeer()


# -- JAX libraries ------------------------------------------------------------------------
class _JaxPeer(_Peer):
    """Shared by the JAX libraries: x64 only for float64 cases (as bn1d's JAX backend),
    gradients by ``jax.grad`` of a pure function of the layer's parameters."""

    dtypes = ("float16", "bfloat16", "float32", "float64")

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp

    def precision(self, dtype: str) -> Any:
        return self.jax.enable_x64(dtype == "float64")

    def asarray(self, array: np.ndarray, dtype: str | None = None) -> Any:
        return self.jnp.asarray(np.asarray(array), dtype=None if dtype is None else self.jnp.dtype(dtype))

    def gradients(self, layer: Any, x: Any, dy: Any, mask: Any, training: bool) -> dict[str, np.ndarray]:
        jnp = self.jnp
        pure = layer.pure(training)

        def loss(params: Any, x: Any) -> Any:
            y = pure(params, x, mask)
            wide = jnp.promote_types(y.dtype, jnp.float32)
            return jnp.sum(y.astype(wide) * dy.astype(wide))

        params_grad, x_grad = self.jax.grad(loss, argnums=(0, 1))(layer.params(), x)
        return {"x": self.to_numpy(x_grad), **{k: self.to_numpy(v) for k, v in params_grad.items()}}


def _fixed(kwargs: dict[str, Any], library: str, *, has: tuple[str, ...] = ()) -> dict[str, Any]:
    """The case's arguments without the options the library fixes: its variance
    formula and running-variance convention are what it computes (the report shows
    where they differ); the cumulative average and untracked statistics, which change
    what the state is, cannot be expressed where it has no such configuration."""
    if "momentum=None" not in has and kwargs.get("momentum", 0.99) is None:
        raise NotApplicable(f"no cumulative average in {library}")
    if "track_running_stats" not in has and not kwargs.get("track_running_stats", True):
        raise NotApplicable(f"{library} always keeps running statistics")
    drop = {"unbiased_running_var", "track_running_stats", "fast_variance"} - set(has)
    return {k: v for k, v in kwargs.items() if k not in drop}


class _LinenLayer(PeerLayer):
    def __init__(self, arguments: dict[str, Any], peer: FlaxLinenPeer, param_dtype: Any):
        fast = arguments.pop("fast_variance", False)
        super().__init__(arguments)
        import flax.linen as nn

        self.peer, jnp = peer, peer.jnp
        self.module = nn.BatchNorm(
            axis=-1, momentum=arguments.get("momentum", 0.99), epsilon=arguments.get("epsilon", 1e-5),
            use_bias=arguments.get("affine", True), use_scale=arguments.get("affine", True),
            use_fast_variance=fast, axis_name=arguments.get("axis_name"),
            axis_index_groups=arguments.get("axis_index_groups"), param_dtype=param_dtype,
        )  # fmt: skip
        c = arguments["num_features"]
        dtype = np.dtype(param_dtype)
        self.variables: dict[str, Any] = {"batch_stats": {"mean": jnp.zeros(c, dtype), "var": jnp.ones(c, dtype)}}
        if self.module.use_scale:
            self.variables["params"] = {
                "scale": jnp.asarray(self.initial("scale_initializer"), dtype),
                "bias": jnp.asarray(self.initial("bias_initializer"), dtype),
            }

    def params(self) -> dict[str, Any]:
        return dict(self.variables.get("params", {}))

    def pure(self, training: bool) -> Any:
        layout, jnp = self.layout, self.peer.jnp

        def apply(params: Any, x: Any, mask: Any) -> Any:
            variables = {**self.variables, "params": params} if params else self.variables
            y, _ = self._module(x).apply(variables, layout.forward(x, jnp), use_running_average=not training,
                                         mask=layout.mask(mask, jnp), mutable=["batch_stats"])  # fmt: skip
            return layout.back(y, jnp)

        return apply

    def _module(self, x: Any) -> Any:
        """The module computing in ``x``'s dtype (Flax's ``dtype``; unset, Flax promotes a
        float16 input to its float32 parameters' dtype)."""
        return self.module.clone(dtype=x.dtype)

    def _call(self, x: Any, mask: Any, training: bool) -> Any:
        jnp = self.peer.jnp
        y, updates = self._module(x).apply(self.variables, self.layout.forward(x, jnp),
                                           use_running_average=not training, mask=self.layout.mask(mask, jnp),
                                           mutable=["batch_stats"])  # fmt: skip
        if training:
            self.variables = {**self.variables, **updates}
        return self.layout.back(y, jnp)

    def _state(self) -> dict[str, Any]:
        from bn1d.backends.formats import from_flax_variables

        return from_flax_variables(self.variables)

    def _load(self, state: Any) -> None:
        from bn1d.backends.formats import to_flax_variables

        self.variables = self.peer.jax.tree.map(self.peer.jnp.asarray, to_flax_variables(state))


class FlaxLinenPeer(_JaxPeer):
    """``flax.linen.BatchNorm(axis=-1)``: the features moved last; masks broadcast to the
    input; ``use_fast_variance`` from the case; synced under ``vmap``."""

    name, distribution = "flax_linen", "flax"

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> Any:
        return _LinenLayer(_fixed(kwargs, "Flax", has=("fast_variance",)), self, self.jnp.dtype(param_dtype))

    def run_replicated(self, jobs: Sequence[ReplicaJob]) -> list[ReplicaResult]:
        return [self._run_job(job) for job in jobs]

    def _run_job(self, job: ReplicaJob) -> ReplicaResult:
        jax, jnp = self.jax, self.jnp
        if job.layer.get("axis_index_groups") is not None:
            raise NotApplicable("axis_index_groups only under pmap")
        float64 = np.asarray(job.xs[0]).dtype == np.float64
        with self.precision("float64" if float64 else "float32"):
            layer = self.make_layer(**job.layer)
            xs = jnp.stack([jnp.asarray(x) for x in job.xs])
            dys = jnp.stack([jnp.asarray(dy, xs.dtype) for dy in job.dys])
            masks = None
            if any(m is not None for m in job.masks):
                masks = jnp.stack([jnp.ones(x.shape[:-1], bool) if m is None else jnp.asarray(m)
                                   for x, m in zip(job.xs, job.masks)])  # fmt: skip

            def replica(x: Any, mask: Any) -> Any:
                y, updates = layer.module.apply(layer.variables, layer.layout.forward(x, jnp),
                                                use_running_average=False, mask=layer.layout.mask(mask, jnp),
                                                mutable=["batch_stats"])  # fmt: skip
                return layer.layout.back(y, jnp), updates

            def loss(xs: Any) -> Any:
                mapped = jax.vmap(replica, in_axes=(0, None if masks is None else 0), axis_name=job.layer["axis_name"])
                ys, updates = mapped(xs, masks)
                return jnp.sum(ys * dys), (ys, updates)

            x_grads, (ys, updates) = jax.grad(loss, has_aux=True)(xs)
            states = []
            for r in range(len(job.xs)):
                layer.variables = {
                    **layer.variables,
                    "batch_stats": jax.tree.map(lambda v, r=r: v[r], updates)["batch_stats"],
                }
                states.append({k: self.to_numpy(v) for k, v in layer.state_dict().items()})
        return ReplicaResult([self.to_numpy(y) for y in ys], states, [self.to_numpy(g) for g in x_grads])


def flax_linen_peer() -> FlaxLinenPeer:
    return FlaxLinenPeer()


class _NnxLayer(PeerLayer):
    def __init__(self, arguments: dict[str, Any], peer: FlaxNnxPeer, param_dtype: Any):
        fast = arguments.pop("fast_variance", False)
        super().__init__(arguments)
        from flax import nnx

        if arguments.get("axis_name") is not None:
            raise NotApplicable("the adapter runs no nnx collectives")
        self.peer, self.nnx = peer, nnx
        module: Any = nnx.BatchNorm(
            arguments["num_features"], momentum=arguments.get("momentum", 0.99),
            epsilon=arguments.get("epsilon", 1e-5), use_bias=arguments.get("affine", True),
            use_scale=arguments.get("affine", True), use_fast_variance=fast, param_dtype=param_dtype, rngs=nnx.Rngs(0),
        )  # fmt: skip
        if module.scale is not None:
            module.scale.set_value(peer.jnp.asarray(self.initial("scale_initializer"), param_dtype))
            module.bias.set_value(peer.jnp.asarray(self.initial("bias_initializer"), param_dtype))
        self.module = module

    def run(self, module: Any, x: Any, mask: Any, training: bool) -> Any:
        jnp, layout = self.peer.jnp, self.layout
        module.dtype = x.dtype  # computing in x's dtype, as Flax's dtype= (unset, float16 -> float32)
        y = module(layout.forward(x, jnp), use_running_average=not training, mask=layout.mask(mask, jnp))
        return layout.back(y, jnp)

    def _call(self, x: Any, mask: Any, training: bool) -> Any:
        # nnx updates its statistics in place when training: an inference call runs on a copy
        return self.run(self.module if training else self.nnx.clone(self.module), x, mask, training)

    def _state(self) -> dict[str, Any]:
        module: Any = self.module
        state = {"running_mean": np.asarray(module.mean.get_value()), "running_var": np.asarray(module.var.get_value())}
        if module.scale is not None:
            state.update(scale=np.asarray(module.scale.get_value()), bias=np.asarray(module.bias.get_value()))
        return state

    def _load(self, state: Any) -> None:
        jnp, module = self.peer.jnp, self.module
        module.mean.set_value(jnp.asarray(state["running_mean"]))
        module.var.set_value(jnp.asarray(state["running_var"]))
        if module.scale is not None:
            module.scale.set_value(jnp.asarray(state["scale"]))
            module.bias.set_value(jnp.asarray(state["bias"]))


class FlaxNnxPeer(_JaxPeer):
    """``flax.nnx.BatchNorm(axis=-1)``: as linen's, stateful (an inference call runs on
    a copy, since nnx updates in place only when training); gradients by ``nnx.grad``."""

    name, distribution = "flax_nnx", "flax"

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> Any:
        return _NnxLayer(_fixed(kwargs, "Flax", has=("fast_variance",)), self, self.jnp.dtype(param_dtype))

    def gradients(self, layer: Any, x: Any, dy: Any, mask: Any, training: bool) -> dict[str, np.ndarray]:
        """``nnx.grad`` on a copy of the module (its statistics update stays there)."""
        jnp, nnx = self.jnp, layer.nnx

        def loss(module: Any, x: Any) -> Any:
            y = layer.run(module, x, mask, training)
            wide = jnp.promote_types(y.dtype, jnp.float32)
            return jnp.sum(y.astype(wide) * dy.astype(wide))

        module_grad, x_grad = nnx.grad(loss, argnums=(0, 1))(nnx.clone(layer.module), x)
        params = {} if layer.module.scale is None else {k: module_grad[k].get_value() for k in ("scale", "bias")}
        return {"x": self.to_numpy(x_grad), **{k: self.to_numpy(v) for k, v in params.items()}}


def flax_nnx_peer() -> FlaxNnxPeer:
    return FlaxNnxPeer()


class _EquinoxLayer(PeerLayer):
    feature_to = 1

    def __init__(self, arguments: dict[str, Any], peer: EquinoxPeer, param_dtype: Any):
        super().__init__(arguments)
        import equinox as eqx

        self.peer, self.eqx, jnp = peer, eqx, peer.jnp
        if 0 not in self.layout.reduce_axes:
            raise NotApplicable("reduces over the vmapped axis: axis 0 must be reduced")
        affine = arguments.get("affine", True)
        self.module: Any
        self.state: Any
        self.module, self.state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            arguments["num_features"], axis_name="batch", eps=arguments.get("epsilon", 1e-5),
            channelwise_affine=affine, momentum=arguments.get("momentum", 0.99), mode="batch", dtype=param_dtype,
        )  # fmt: skip
        if affine:
            self.module = eqx.tree_at(
                lambda m: (m.weight, m.bias), self.module,
                (jnp.asarray(self.initial("scale_initializer"), param_dtype),
                 jnp.asarray(self.initial("bias_initializer"), param_dtype)),
            )  # fmt: skip

    def params(self) -> dict[str, Any]:
        return {"scale": self.module.weight, "bias": self.module.bias} if self.module.weight is not None else {}

    def pure(self, training: bool) -> Any:
        eqx, layout, jnp, jax = self.eqx, self.layout, self.peer.jnp, self.peer.jax

        def apply(params: Any, x: Any, mask: Any) -> Any:
            if mask is not None:
                raise NotApplicable("no masks")
            module = self.module
            if params:
                module = eqx.tree_at(lambda m: (m.weight, m.bias), module, (params["scale"], params["bias"]))
            call = jax.vmap(lambda xi, s: module(xi, s, inference=not training), in_axes=(0, None),
                            out_axes=(0, None), axis_name="batch")  # fmt: skip
            y, _ = call(layout.forward(x, jnp), self.state)
            return layout.back(y, jnp)

        return apply

    def _call(self, x: Any, mask: Any, training: bool) -> Any:
        if mask is not None:
            raise NotApplicable("no masks")
        jax, jnp = self.peer.jax, self.peer.jnp
        call = jax.vmap(lambda xi, s: self.module(xi, s, inference=not training), in_axes=(0, None),
                        out_axes=(0, None), axis_name="batch")  # fmt: skip
        y, state = call(self.layout.forward(x, jnp), self.state)
        if training:
            self.state = state
        return self.layout.back(y, jnp)

    def _statistics(self) -> tuple[Any, Any, Any]:
        module = self.module
        counter = self.state.get(module.batch_counter)
        mean, var = self.state.get(module.batch_state_index)
        return counter, mean, var

    def _state(self) -> dict[str, Any]:
        counter, mean, var = self._statistics()  # Equinox's debiased averages, as its inference uses them
        debias = 1.0 if int(counter) == 0 else 1.0 - self.module.momentum ** int(counter)
        state = {"running_mean": np.asarray(mean) / debias, "running_var": np.asarray(var) / debias}
        if self.module.weight is not None:
            state.update(scale=np.asarray(self.module.weight), bias=np.asarray(self.module.bias))
        return state

    def _load(self, state: Any) -> None:
        jnp, eqx, module = self.peer.jnp, self.eqx, self.module
        stats = (jnp.asarray(state["running_mean"]), jnp.asarray(state["running_var"]))
        self.state = self.state.set(module.batch_state_index, stats).set(module.batch_counter, jnp.array(0))
        if module.weight is not None:
            self.module = eqx.tree_at(lambda m: (m.weight, m.bias), module,
                                      (jnp.asarray(state["scale"]), jnp.asarray(state["bias"])))  # fmt: skip


class EquinoxPeer(_JaxPeer):
    """``equinox.nn.BatchNorm(mode="batch")`` per example under ``jax.vmap(axis_name=...)``
    (Equinox's convention): features moved to axis 1 (the example's first); the
    running statistics are its debiased averages (what its inference uses)."""

    name, distribution = "equinox", "equinox"

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> Any:
        if kwargs.get("axis_name") is not None:
            raise NotApplicable("the adapter runs no cross-replica Equinox collectives")
        return _EquinoxLayer(_fixed(kwargs, "Equinox"), self, self.jnp.dtype(param_dtype))


def equinox_peer() -> EquinoxPeer:
    return EquinoxPeer()


# -- Keras 3 (JAX backend) ----------------------------------------------------------------
class _KerasLayer(PeerLayer):
    def __init__(self, arguments: dict[str, Any], peer: KerasPeer, param_dtype: str):
        super().__init__(arguments)
        keras = peer.keras
        if arguments.get("axis_name") is not None:
            raise NotApplicable("synchronized=True needs TensorFlow")
        self.peer = peer
        affine = arguments.get("affine", True)
        self.layer = keras.layers.BatchNormalization(
            axis=-1, momentum=arguments.get("momentum", 0.99), epsilon=arguments.get("epsilon", 1e-5),
            center=affine, scale=affine, dtype=param_dtype,
        )  # fmt: skip
        shape = [1] * self.layout.ndim
        shape[-1] = arguments["num_features"]
        self.layer.build(tuple(shape))
        if affine:
            self.layer.gamma.assign(self.initial("scale_initializer"))
            self.layer.beta.assign(self.initial("bias_initializer"))

    def params(self) -> dict[str, Any]:
        return {"scale": self.layer.gamma.value, "bias": self.layer.beta.value} if self.layer.scale else {}

    def pure(self, training: bool) -> Any:
        layout, jnp, layer = self.layout, self.peer.jnp, self.layer

        def apply(params: Any, x: Any, mask: Any) -> Any:
            trainable = [params["scale"], params["bias"]] if params else []
            non_trainable = [v.value for v in layer.non_trainable_variables]
            y, _ = layer.stateless_call(trainable, non_trainable, layout.forward(x, jnp), training=training,
                                        mask=mask)  # fmt: skip
            return layout.back(y, jnp)

        return apply

    def _call(self, x: Any, mask: Any, training: bool) -> Any:
        jnp = self.peer.jnp  # the mask's axes are the moved input's without its last (features) axis
        return self.layout.back(self.layer(self.layout.forward(x, jnp), training=training, mask=mask), jnp)

    def _state(self) -> dict[str, Any]:
        layer = self.layer
        state = {
            "running_mean": np.asarray(layer.moving_mean.value),
            "running_var": np.asarray(layer.moving_variance.value),
        }
        if layer.scale:
            state.update(scale=np.asarray(layer.gamma.value), bias=np.asarray(layer.beta.value))
        return state

    def _load(self, state: Any) -> None:
        layer = self.layer
        layer.moving_mean.assign(np.asarray(state["running_mean"]))
        layer.moving_variance.assign(np.asarray(state["running_var"]))
        if layer.scale:
            layer.gamma.assign(np.asarray(state["scale"]))
            layer.beta.assign(np.asarray(state["bias"]))


class KerasPeer(_JaxPeer):
    """Keras 3 ``BatchNormalization(axis=-1)`` on its JAX backend: features moved last
    (masks there too); epsilon from the case (Keras's default is 1e-3)."""

    name, distribution = "keras", "keras"

    def __init__(self) -> None:
        import os

        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras

        if keras.backend.backend() != "jax":
            raise ImportError(f"keras runs on {keras.backend.backend()}, the adapter needs its JAX backend")
        super().__init__()
        self.keras = keras

    def precision(self, dtype: str) -> Any:
        if dtype == "float64":
            return self.jax.enable_x64(True)
        return contextlib.nullcontext()

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> Any:
        return _KerasLayer(_fixed(kwargs, "Keras"), self, param_dtype)


def keras_peer() -> KerasPeer:
    return KerasPeer()


# -- BrainPy ----------------------------------------------------------------------------------
class _BrainPyLayer(PeerLayer):
    def __init__(self, arguments: dict[str, Any], peer: BrainPyPeer):
        import brainpy as bp

        if arguments.get("axis_name") is not None:
            raise NotApplicable("BrainPy syncs under pmap only: the adapter runs no collectives")
        mode = arguments.pop("mode", None)  # BrainPy's modes are objects: the shim switches training
        super().__init__({**arguments, "mode": mode} if mode is not None else arguments, layout=False)
        self.bp, self.peer = bp, peer
        self.layer = bp.dnn.BatchNorm1d(**arguments)  # BrainPy's own signature: its own checks run

    def params(self) -> dict[str, Any]:
        raise NotApplicable("gradients need brainpy.math's own transformations")

    def _call(self, x: Any, mask: Any, training: bool) -> Any:
        if mask is not None:
            raise NotApplicable("no masks")
        self.bp.share.save(fit=training)
        return self.layer(x)

    def _state(self) -> dict[str, Any]:
        from bn1d.backends.formats import from_brainpy

        return from_brainpy(self.layer)

    def _load(self, state: Any) -> None:
        for key, value in dict(state).items():
            getattr(self.layer, key).value = self.peer.jnp.asarray(value)


class BrainPyPeer(_JaxPeer):
    """``brainpy.dnn.BatchNorm1d`` 2.8: BrainPy's own signature, so the case's arguments
    go to it as they are; training by ``brainpy.share.save(fit=...)``."""

    name, distribution = "brainpy", "brainpy"

    def __init__(self) -> None:
        import brainpy  # noqa: F401

        super().__init__()

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> Any:
        if param_dtype != "float32":
            raise NotApplicable("float32 parameters only")
        return _BrainPyLayer(_fixed(kwargs, "BrainPy"), self)

    def gradients(self, layer: Any, x: Any, dy: Any, mask: Any, training: bool) -> dict[str, np.ndarray]:
        raise NotApplicable("gradients need brainpy.math's own transformations")


def brainpy_peer() -> BrainPyPeer:
    return BrainPyPeer()
