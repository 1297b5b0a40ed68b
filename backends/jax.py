"""The JAX backend: ``BatchNorm1d`` as a stateful layer and as a pure function.

:class:`BatchNorm1d` is the core's :class:`bn1d.Layer` on JAX arrays (the maths:
``bn1d.algorithm``; the contract: ``docs/spec.md``; the deviations from BrainPy,
Flax and PyTorch: the table in the README). It adds what JAX needs:

* the pure form, for ``jax.jit``, ``jax.grad``, ``jax.vmap``, ``jax.pmap``,
  ``jax.shard_map`` and optax loops: ``layer.params`` and ``layer.state`` are
  pytrees (dicts of arrays) and :meth:`BatchNorm1d.apply` reads nothing else::

      y, new_state = layer.apply(params, state, x, training=True, mask=None)

  ``layer`` itself only holds the static configuration;
* cross-replica statistics over a bound axis: with ``axis_name`` (a str or tuple
  of str bound by ``vmap``/``pmap``/``shard_map``) the core's ``all_sum`` hook is
  :func:`~bn1d.backends.jax_collectives.replica_all_sum` (``lax.psum``), with
  ``axis_index_groups`` under all three transformations. Inference runs no collective;
* ``lax.stop_gradient`` on the shift and the running statistics, the shifted
  input recomputed per pass (XLA fuses it into its reductions), and a
  ``jax.checkpoint`` policy that saves the per-feature sums for the backward pass;
* conversion from and to Flax linen and BrainPy.

The stateful call is jitted once per configuration (a module-level cache, so
layers pickle) and must run eagerly in training: inside transformations use
:meth:`~BatchNorm1d.apply`, which returns the new state instead of storing a tracer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn1d import algorithm, validation
from bn1d.algorithm import Hooks, Tuning
from bn1d.backends.formats import from_brainpy, from_flax_variables, to_brainpy, to_flax_variables
from bn1d.config import BatchNormConfig, argument_error
from bn1d.layer import Layer

from .jax_collectives import UnboundAxisError, replica_all_sum

__all__ = ["BatchNorm1d", "UnboundAxisError", "apply", "as_inputs", "replica_all_sum"]

#: ``brainpy.dnn.BatchNorm1d`` attributes that are constructor arguments here too.
_BRAINPY_CONFIG = ("axis", "epsilon", "momentum", "axis_name", "axis_index_groups")

State = dict[str, jax.Array]


def _hooks(config: BatchNormConfig, training: bool) -> Hooks:
    synced = training and config.synced
    all_sum = replica_all_sum(config.axis_name, config.axis_index_groups) if synced else None  # type: ignore[arg-type]
    return Hooks(all_sum=all_sum, stop_gradient=lax.stop_gradient)


#: XLA fuses elementwise work into reductions: ``x - K`` recomputed per pass (``bn1d.algorithm.Tuning``).
_TUNING = Tuning(recompute_shifted=True)


#: The primitives whose outputs the checkpoint policy saves, by name: ``psum`` binds
#: ``psum_invariant`` under ``shard_map``, which has no public handle (recomputing it in
#: the backward pass repeated the collective: ``docs/performance.md``).
_SAVED = frozenset({"reduce_sum", "psum", "psum_invariant", "ppermute"})


def _keep_sums(primitive: Any, *_: Any, **__: Any) -> bool:
    """``jax.checkpoint`` policy: save reductions and collectives (per-feature values),
    recompute everything else (XLA then fuses the elementwise work into its
    reductions instead of materialising ``x - K`` for them)."""
    return primitive.name in _SAVED


def _pure_apply(
    params: Mapping[str, Any], state: Mapping[str, Any], x: Any, mask: Any, config: BatchNormConfig, training: bool
) -> tuple[jax.Array, State]:
    """The checked core call behind :meth:`BatchNorm1d.apply`."""
    params, state = _as_jax(params), _as_jax(state)
    hooks = _hooks(config, training)
    xp = validation.check_call(x, mask, params, state, config, training, hooks)

    def forward(x: Any, mask: Any, params: Any, state: Any) -> Any:
        y_state = algorithm.forward(xp, x, params, state, config, training=training, mask=mask, hooks=hooks,
                                    tuning=_TUNING)  # fmt: skip
        return tuple(y_state)

    y, new_state = jax.checkpoint(forward, policy=_keep_sums)(x, mask, params, lax.stop_gradient(dict(state)))
    return y, lax.stop_gradient(dict(new_state))


def _as_jax(tree: Any) -> Any:
    """A mapping's array-like values (NumPy arrays, lists) as JAX arrays, as JAX
    functions take them; anything else is left for the check to name."""
    if not isinstance(tree, Mapping):
        return tree
    converted = {}
    for key, value in tree.items():
        try:
            converted[key] = value if isinstance(value, (jax.Array, str, bytes)) else jnp.asarray(value)
        except (TypeError, ValueError):
            converted[key] = value
    return converted


# One compiled stateful call per (config, training), shared by every layer: nothing
# unpicklable is stored on a layer.
_jitted_apply = jax.jit(_pure_apply, static_argnames=("config", "training"))


def as_inputs(config: BatchNormConfig, x: Any, mask: Any) -> tuple[Any, Any]:
    """``x`` and ``mask`` as JAX arrays. Host inputs are checked first, so their errors
    name the dtype given (JAX would narrow int64 to int32); bfloat16, which only JAX's
    NumPy extension knows, is checked once converted."""
    if not isinstance(x, jax.Array) and not isinstance(mask, jax.Array):
        x, mask = np.asarray(x), None if mask is None else np.asarray(mask)
        if x.dtype.name != "bfloat16":
            validation.check_inputs(x, mask, num_features=config.num_features, reduce_axes=config.reduce_axes)
    return jnp.asarray(x), None if mask is None else jnp.asarray(mask)


def apply(
    config: BatchNormConfig, params: Mapping[str, Any], state: Mapping[str, Any], x: Any, mask: Any, training: bool
) -> tuple[jax.Array, State]:
    """``(y, new_state)``: the pure call of every JAX layer and module of bn1d (the
    checked core under ``jax.checkpoint``), jitted once per ``(config, training)`` when
    nothing is traced, traced in place otherwise."""
    x, mask = as_inputs(config, x, mask)
    leaves = jax.tree.leaves((dict(params), dict(state), x, mask))
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return _pure_apply(params, state, x, mask, config, training)
    return _jitted_apply(params, state, x, mask, config=config, training=training)


class BatchNorm1d(Layer):
    """1-D batch normalization with BrainPy's signature, on JAX arrays.

    ``bn1d.Layer``'s constructor and protocol; ``dtype`` is ``jax.numpy.float32``
    (the default) or ``float64`` when ``jax_enable_x64`` is on. Host inputs (NumPy
    arrays, ml_dtypes' ``bfloat16`` included) are converted. Attributes ``params``
    and ``state`` are the pytrees :meth:`apply` takes.
    """

    xp = jnp
    _tuning = _TUNING

    # -- the pure form --------------------------------------------------------------
    def apply(
        self,
        params: Mapping[str, Any],
        state: Mapping[str, Any],
        x: Any,
        *,
        mask: Any = None,
        training: bool | None = None,
    ) -> tuple[jax.Array, State]:
        """``(y, new_state)`` for ``x``; pure, so it composes with every JAX transformation.

        ``training=None`` uses the layer's mode when traced (``train()``/``eval()``
        after a function was jitted do not re-trace it: pass ``training``
        explicitly there). In inference ``new_state`` is ``state``. Gradients flow
        to ``x`` and ``params`` through the batch statistics, never into or out of
        the state. Bad inputs raise at trace time. To jit it directly, make
        ``training`` static: ``jax.jit(layer.apply, static_argnames="training")``.
        """
        x, mask = self._inputs(x, mask)
        return _pure_apply(params, state, x, mask, self.config, self.resolve_training(training))

    # -- the stateful protocol --------------------------------------------------------
    def __call__(self, x: Any, mask: Any = None, training: bool | None = None) -> jax.Array:
        """``y`` for ``x``; in training also replaces ``self.state`` (eagerly only)."""
        if self.resolve_training(training):
            for name, value in (("x", x), ("mask", mask)):
                if isinstance(value, jax.core.Tracer):
                    raise argument_error(
                        name, "a concrete array for a stateful training call (use layer.apply inside JAX "
                        "transformations: it returns the new state instead of storing a tracer)",
                        type(value).__name__, TypeError,
                    )  # fmt: skip
        return super().__call__(x, mask, training)

    def _forward(self, params: Mapping[str, Any], state: Mapping[str, Any], x: Any, mask: Any, training: bool) -> Any:
        return _jitted_apply(params, state, x, mask, config=self.config, training=training)

    def _hooks(self, training: bool) -> Hooks:
        return _hooks(self.config, training)

    def _inputs(self, x: Any, mask: Any) -> tuple[Any, Any]:
        return as_inputs(self.config, x, mask)

    def _cotangent(self, dy: Any) -> Any:
        """``dy`` as a JAX array, a host array's dtype checked first (as for ``x``)."""
        if not isinstance(dy, jax.Array):
            dy = np.asarray(dy)
            if dy.dtype.name != "bfloat16" and dy.dtype.kind != "f":
                raise argument_error("dy", "a real floating-point array", dy.dtype, TypeError)
        return jnp.asarray(dy)

    def _parameter_dtype(self, dtype: Any) -> Any:
        expected = "jax.numpy.float32, or jax.numpy.float64 with jax_enable_x64 on"
        try:
            resolved = jnp.dtype(jnp.float32 if dtype is None else dtype)
        except TypeError as error:
            raise argument_error("dtype", expected, dtype, TypeError) from error
        if resolved == jnp.float64 and not jax.config.read("jax_enable_x64"):
            raise argument_error("dtype", expected, dtype)
        if resolved not in (jnp.float32, jnp.float64):
            raise argument_error("dtype", expected, dtype, TypeError)
        return resolved

    def _copy(self, value: Any) -> Any:
        return value  # immutable

    # -- interoperability ---------------------------------------------------------------
    def to_flax(self) -> dict[str, dict[str, jax.Array]]:
        """The state as Flax linen ``BatchNorm`` variables ``{"params", "batch_stats"}``."""
        self._refuse_unconvertible("Flax linen BatchNorm")
        return jax.tree.map(jnp.asarray, to_flax_variables(self.state_dict()))

    @classmethod
    def from_flax(
        cls,
        variables: Mapping[str, Any],
        *,
        fast_variance: bool = True,
        unbiased_running_var: bool = False,
        **kwargs: Any,
    ) -> BatchNorm1d:
        """A layer holding a Flax linen ``BatchNorm``'s variables.

        The defaults reproduce ``flax.linen.BatchNorm`` (one-pass variance, biased
        running variance); pass ``fast_variance=False`` for a module built with
        ``use_fast_variance=False``. ``kwargs`` are the constructor's (``axis`` lists
        the reduced axes, Flax's ``axis`` the feature axis). ``num_features`` and
        ``affine`` come from the variables.
        """
        state = from_flax_variables(variables)
        kwargs.update(fast_variance=fast_variance, unbiased_running_var=unbiased_running_var)
        return cls._holding(state, **kwargs)

    def to_brainpy(self, brainpy_layer: Any) -> None:
        """Write the state into a ``brainpy.dnn.BatchNorm1d``'s variables."""
        self._refuse_unconvertible("brainpy.dnn.BatchNorm1d")
        to_brainpy(self.state_dict(), brainpy_layer)

    def _refuse_unconvertible(self, peer: str) -> None:
        """Flax and BrainPy keep running statistics and have no cumulative average."""
        if not self.config.track_running_stats:
            raise argument_error("track_running_stats", f"True to convert to {peer} (its running statistics)", False)
        if self.config.momentum is None:
            raise argument_error("momentum", f"a float to convert to {peer} (no cumulative average there)", None)

    @classmethod
    def from_brainpy(cls, brainpy_layer: Any, *, fast_variance: bool = True, **kwargs: Any) -> BatchNorm1d:
        """A layer equal to a ``brainpy.dnn.BatchNorm1d``: its state and its
        ``axis``, ``epsilon``, ``momentum``, ``axis_name`` and ``axis_index_groups``
        (``kwargs`` override them). The default ``fast_variance=True`` reproduces
        BrainPy's numbers; the running variance is unbiased as in BrainPy >= 2.8
        (``unbiased_running_var=False`` for BrainPy <= 2.7)."""
        config = {key: getattr(brainpy_layer, key) for key in _BRAINPY_CONFIG if hasattr(brainpy_layer, key)}
        config.update({key: float(config[key]) for key in ("epsilon", "momentum") if key in config})
        return cls._holding(from_brainpy(brainpy_layer), **{**config, "fast_variance": fast_variance, **kwargs})

    @classmethod
    def _holding(cls, state: Mapping[str, Any], **kwargs: Any) -> BatchNorm1d:
        """A layer sized by ``state`` (``num_features``, ``affine``) that holds it."""
        layer = cls(int(np.shape(state["running_mean"])[0]), affine="scale" in state, **kwargs)
        layer.load_state_dict(state)
        return layer
