r"""The JAX backend: ``BatchNorm1d`` as a stateful layer and as a pure function.

The maths is ``bn1d.algorithm.batch_norm`` (see ``bn1d.backends.numpy`` for the
readable specification). Per feature, over the ``n`` unmasked positions of every
replica in the group::

    mean = sum(x) / n
    var  = sum((x - mean) ** 2) / n             # biased
    y    = (x - mean) * (scale / sqrt(var + epsilon)) + bias
    running_mean = momentum * running_mean + (1 - momentum) * mean
    running_var  = momentum * running_var  + (1 - momentum) * var * n / (n - 1)

Two forms of one layer:

* the uniform stateful protocol (``bn1d.protocol``)::

      layer = BatchNorm1d(3)
      y = layer(x)                # training: updates layer.state
      layer.eval(); y = layer(x)  # inference

* the idiomatic pure form, for ``jax.jit``, ``jax.grad``, ``jax.vmap``,
  ``jax.pmap``, ``jax.shard_map`` and optax loops: ``layer.params`` (``{"scale",
  "bias"}``, empty when ``affine=False``) and ``layer.state`` (``{"running_mean",
  "running_var"}``) are pytrees, and ``layer.apply`` reads nothing else::

      y, new_state = layer.apply(params, state, x, training=True, mask=None)

  ``layer`` itself only holds the static configuration.

Cross-replica statistics: with ``axis_name`` (a str or tuple of str bound by
``vmap``/``pmap``/``shard_map``), the count, the sums and the centred sums are
``lax.psum``-ed, so the statistics are exactly those of the concatenated batches,
weighted by their (masked) counts. ``axis_index_groups`` work under all three
transformations: JAX's ``psum`` supports groups only under ``pmap``, so each
replica writes its sums into the row of its group in a ``(num_groups, ...)``
array of zeros, the whole array is summed over the axis and each replica reads
its own row back. Inference runs no collective.

Deviations from Flax linen ``BatchNorm`` / BrainPy ``BatchNorm1d`` / PyTorch:

* the exact variance by default (Flax and BrainPy: ``E[x^2] - mean^2``, selectable
  with ``fast_variance=True``); unbiased running variance (Flax and BrainPy <= 2.7
  are biased: ``unbiased_running_var=False``) with the *global* count under sync
  (BrainPy 2.8.2 uses the per-replica count);
* replicas are weighted by their counts (Flax and BrainPy average per-replica
  means with equal weights);
* ``axis_index_groups`` work under ``vmap`` and ``shard_map`` too (Flax and
  BrainPy: ``pmap`` only); ``axis`` lists the *reduced* axes (Flax's ``axis`` is
  the feature axis); ``momentum`` is the weight of the old statistic, as in Flax
  and BrainPy (PyTorch's is ``1 - momentum``);
* float16/bfloat16 inputs are reduced in float32; an all-masked or empty batch
  leaves the running statistics unchanged (Flax writes NaN);
* running statistics never receive gradients (``lax.stop_gradient``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn1d.algorithm import AllSum, batch_norm, check_inputs
from bn1d.config import BatchNormConfig, argument_error
from bn1d.initializers import Ones, Zeros, initial_value
from bn1d.protocol import TrainingSwitch
from bn1d.state import STATE_KEYS, check_state, from_brainpy, from_flax_variables, to_brainpy, to_flax_variables

__all__ = ["BatchNorm1d", "replica_all_sum"]

#: ``brainpy.dnn.BatchNorm1d`` attributes that are constructor arguments here too.
_BRAINPY_CONFIG = ("axis", "epsilon", "momentum", "axis_name", "axis_index_groups")

Params = dict[str, jax.Array]
State = dict[str, jax.Array]
PARAM_KEYS, STAT_KEYS = STATE_KEYS[:2], STATE_KEYS[2:]  # ("scale", "bias"), ("running_mean", "running_var")


def replica_all_sum(axis_name: str | tuple[Hashable, ...], axis_index_groups: Sequence[Sequence[int]] | None) -> AllSum:
    """The ``all_sum`` hook of ``bn1d.algorithm.batch_norm`` over a bound JAX axis.

    Call it where ``axis_name`` is bound (inside ``vmap``/``pmap``/``shard_map``);
    it reads the axis size there and checks that ``axis_index_groups`` partition
    ``range(size)``, raising ``ValueError`` at trace time otherwise.
    """
    try:
        size = lax.axis_size(axis_name)
    except NameError as error:
        raise argument_error(
            "axis_name", "an axis bound by jax.vmap, jax.pmap or jax.shard_map around this training call", axis_name
        ) from error
    if axis_index_groups is None:
        return lambda arrays: lax.psum(tuple(arrays), axis_name)
    if sum(len(group) for group in axis_index_groups) != size:  # the config checked they partition range(total)
        raise argument_error(
            "axis_index_groups", f"a partition of range({size}), the size of axis {axis_name!r}", axis_index_groups
        )
    group_of_index = np.empty(size, np.int32)
    for group_id, group in enumerate(axis_index_groups):
        group_of_index[list(group)] = group_id
    row = jnp.asarray(group_of_index)[lax.axis_index(axis_name)]
    num_groups = len(axis_index_groups)

    def grouped_all_sum(arrays: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        rows = tuple(jnp.zeros((num_groups, *jnp.shape(a)), a.dtype).at[row].set(a) for a in arrays)
        return tuple(summed[row] for summed in lax.psum(rows, axis_name))

    return grouped_all_sum


class BatchNorm1d(TrainingSwitch):
    """1-D batch normalization with BrainPy's signature, on JAX arrays.

    Parameters are those of ``brainpy.dnn.BatchNorm1d`` (see ``bn1d.protocol``);
    keyword-only extras: ``dtype`` of the parameters and running statistics
    (float32, or float64 when ``jax_enable_x64`` is on), ``fast_variance`` and
    ``unbiased_running_var`` (see the module docstring).

    Attributes: ``params`` and ``state`` (pytrees, see :meth:`apply`),
    ``training``, ``config`` (the validated ``bn1d.config.BatchNormConfig``).
    """

    def __init__(
        self,
        num_features: int,
        axis: int | Sequence[int] = (0, 1),
        epsilon: float = 1e-5,
        momentum: float = 0.99,
        affine: bool = True,
        bias_initializer: Any = Zeros(),
        scale_initializer: Any = Ones(value=1.0),
        axis_name: str | Sequence[str] | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        mode: str | None = None,
        name: str | None = None,
        *,
        dtype: Any = jnp.float32,
        fast_variance: bool = False,
        unbiased_running_var: bool = True,
    ):
        self.config = BatchNormConfig.from_arguments(
            num_features, axis, epsilon, momentum, affine, axis_name, axis_index_groups, mode, name,
            fast_variance=fast_variance, unbiased_running_var=unbiased_running_var,
        )  # fmt: skip
        self.dtype = _parameter_dtype(dtype)
        c = self.config.num_features
        self.params: Params = {}
        if affine:
            self.params = {
                "scale": jnp.asarray(initial_value(scale_initializer, "scale_initializer", c, self.dtype)),
                "bias": jnp.asarray(initial_value(bias_initializer, "bias_initializer", c, self.dtype)),
            }
        self.state: State = {"running_mean": jnp.zeros(c, self.dtype), "running_var": jnp.ones(c, self.dtype)}
        self.training = self.config.training
        self._jitted_apply = jax.jit(self.apply, static_argnames="training")

    # -- the pure form ------------------------------------------------------------------
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
        the running statistics. Bad inputs raise at trace time. To jit it directly,
        make ``training`` static: ``jax.jit(layer.apply, static_argnames="training")``.
        """
        training = self.resolve_training(training)
        scale, bias = self._check_variables(params, state)
        x, mask = _as_jax_inputs(x, mask, self.config)
        axis_name = self.config.axis_name
        all_sum = replica_all_sum(axis_name, self.config.axis_index_groups) if training and axis_name else None

        def forward(x: Any, mask: Any, running_mean: Any, running_var: Any, scale: Any, bias: Any) -> Any:
            return batch_norm(
                x, running_mean, running_var, scale, bias, reduce_axes=self.config.reduce_axes,
                epsilon=self.config.epsilon, momentum=self.config.momentum, training=training, mask=mask,
                fast_variance=self.config.fast_variance, unbiased_running_var=self.config.unbiased_running_var,
                all_sum=all_sum, stop_gradient=lax.stop_gradient, recompute_shifted=True,
            )  # fmt: skip

        # Differentiated, the backward pass keeps the per-feature sums (and their
        # psums) and recomputes the elementwise work from x: XLA then fuses it into
        # its reductions instead of materialising x - K for them (docs/performance.md).
        stats = lax.stop_gradient(state["running_mean"]), lax.stop_gradient(state["running_var"])
        result = jax.checkpoint(forward, policy=_keep_sums)(x, mask, *stats, scale, bias)
        new_state = {"running_mean": result.running_mean, "running_var": result.running_var}
        return result.y, lax.stop_gradient(new_state)

    # -- the uniform layer protocol -----------------------------------------------------
    def __call__(self, x: Any, mask: Any = None, training: bool | None = None) -> jax.Array:
        """``y`` for ``x``; in training also replaces ``self.state``.

        A training call must run eagerly: inside ``jit``/``grad``/``vmap`` use
        :meth:`apply`, which returns the new state instead of storing a tracer.
        """
        training = self.resolve_training(training)
        if training and isinstance(x, jax.core.Tracer):
            raise argument_error(
                "x", "a concrete array for a stateful training call (use layer.apply inside JAX transformations)",
                type(x).__name__, TypeError,
            )  # fmt: skip
        x, mask = _as_jax_inputs(x, mask, self.config)
        y, new_state = self._jitted_apply(self.params, self.state, x, mask=mask, training=training)
        if training:
            self.state = new_state
        return y

    def state_dict(self) -> dict[str, jax.Array]:
        """``scale``, ``bias`` (when affine), ``running_mean``, ``running_var`` (immutable JAX arrays)."""
        return {**self.params, **self.state}

    def load_state_dict(self, state: Any) -> None:
        """Load a state strictly and atomically (see ``bn1d.state.check_state``)."""
        checked = check_state(
            state, num_features=self.config.num_features, affine=self.config.affine, dtype=np.dtype(self.dtype)
        )
        values = {key: jnp.asarray(value, self.dtype) for key, value in checked.items()}
        self.params = {key: values[key] for key in PARAM_KEYS if key in values}
        self.state = {key: values[key] for key in STAT_KEYS}

    # -- interoperability ---------------------------------------------------------------
    def to_flax(self) -> dict[str, dict[str, jax.Array]]:
        """The state as Flax linen ``BatchNorm`` variables ``{"params", "batch_stats"}``."""
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
        layer = cls(
            int(np.shape(state["running_mean"])[0]), affine="scale" in state,
            fast_variance=fast_variance, unbiased_running_var=unbiased_running_var, **kwargs,
        )  # fmt: skip
        layer.load_state_dict(state)
        return layer

    def to_brainpy(self, brainpy_layer: Any) -> None:
        """Write the state into a ``brainpy.dnn.BatchNorm1d``'s variables."""
        to_brainpy(self.state_dict(), brainpy_layer)

    @classmethod
    def from_brainpy(cls, brainpy_layer: Any, *, fast_variance: bool = True, **kwargs: Any) -> BatchNorm1d:
        """A layer equal to a ``brainpy.dnn.BatchNorm1d``: its state and its
        ``axis``, ``epsilon``, ``momentum``, ``axis_name`` and ``axis_index_groups``
        (``kwargs`` override them). The default ``fast_variance=True`` reproduces
        BrainPy's numbers; the running variance is unbiased as in BrainPy >= 2.8
        (``unbiased_running_var=False`` for BrainPy <= 2.7)."""
        state = from_brainpy(brainpy_layer)
        config = {key: getattr(brainpy_layer, key) for key in _BRAINPY_CONFIG if hasattr(brainpy_layer, key)}
        config.update({key: float(config[key]) for key in ("epsilon", "momentum") if key in config})
        layer = cls(
            int(np.shape(state["running_mean"])[0]), affine="scale" in state,
            **{**config, "fast_variance": fast_variance, **kwargs},
        )  # fmt: skip
        layer.load_state_dict(state)
        return layer

    # -- internals ----------------------------------------------------------------------
    def _check_variables(self, params: Any, state: Any) -> tuple[Any, Any]:
        """``(scale, bias)`` (``None`` when not affine) after checking both pytrees' keys and shapes."""
        shape = (self.config.num_features,)
        for name, tree, keys in (
            ("params", params, PARAM_KEYS if self.config.affine else ()),
            ("state", state, STAT_KEYS),
        ):
            if not isinstance(tree, Mapping) or sorted(tree) != sorted(keys):
                given = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
                raise argument_error(name, f"a mapping with exactly the keys {list(keys)}", given)
            for key in keys:
                if jnp.shape(tree[key]) != shape:
                    raise argument_error(f"{name}[{key!r}]", f"shape {shape}", jnp.shape(tree[key]))
        return (params["scale"], params["bias"]) if self.config.affine else (None, None)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"BatchNorm1d({c.num_features}, axis={c.reduce_axes}, epsilon={c.epsilon}, momentum={c.momentum}, "
            f"affine={c.affine}, axis_name={c.axis_name!r}, training={self.training}, dtype={self.dtype.name})"
        )


def _keep_sums(primitive: Any, *_: Any, **__: Any) -> bool:
    """``jax.checkpoint`` policy: save reductions and collectives (per-feature values),
    recompute everything else."""
    return primitive in (lax.reduce_sum_p, lax.psum_p)


def _parameter_dtype(dtype: Any) -> np.dtype:
    expected = "jax.numpy.float32, or jax.numpy.float64 with jax_enable_x64 on"
    if dtype is None:
        raise argument_error("dtype", expected, dtype, TypeError)
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as error:
        raise argument_error("dtype", expected, dtype, TypeError) from error
    if resolved == jnp.float64 and not jax.config.read("jax_enable_x64"):
        raise argument_error("dtype", expected, dtype)
    if resolved not in (jnp.float32, jnp.float64):
        raise argument_error("dtype", expected, dtype, TypeError)
    return resolved


def _as_jax_inputs(x: Any, mask: Any, config: BatchNormConfig) -> tuple[jax.Array, jax.Array | None]:
    """``x`` and ``mask`` as JAX arrays. Host inputs are checked first, so their
    errors name the dtype given (JAX would narrow int64 to int32)."""
    if not isinstance(x, jax.Array) and not isinstance(mask, jax.Array):
        x, mask = np.asarray(x), None if mask is None else np.asarray(mask)
        check_inputs(x, mask, num_features=config.num_features, reduce_axes=config.reduce_axes)
    return jnp.asarray(x), None if mask is None else jnp.asarray(mask)
