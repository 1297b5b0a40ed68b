"""``BatchNorm1d`` as a Flax NNX module, and :func:`replace_batchnorm`.

:class:`BatchNorm1d` is an ``nnx.Module`` with bn1d's semantics (the maths:
``bn1d.algorithm``; the contract: ``docs/spec.md``; the differences from Flax: the README's semantics table) and
NNX's conventions, so it sits where ``nnx.BatchNorm`` sits:

* ``scale`` and ``bias`` are ``nnx.Param``; the running statistics ``mean`` and
  ``var`` (and ``num_batches_tracked`` for ``momentum=None``) are ``nnx.BatchStat``,
  named as in ``nnx.BatchNorm``, so ``nnx.state`` trees and checkpoints line up;
* ``model.train()`` / ``model.eval()`` (and ``nnx.view``) switch the attribute
  ``use_running_average``; a call's ``use_running_average=`` overrides it;
* it runs under ``nnx.jit``, ``nnx.grad``, ``nnx.value_and_grad``, ``nnx.Optimizer``,
  ``nnx.vmap(axis_name=...)`` and ``nnx.shard_map`` or ``jax.shard_map`` over
  ``nnx.split``/``nnx.merge``. With ``axis_name`` the statistics are those of the
  whole synced batch (count-weighted), so with the model broadcast (``in_axes=None``)
  the new running statistics are the same on every replica and are stored once. With
  ``axis_index_groups`` each group has its own, so the running statistics must be
  mapped too (``nnx.StateAxes({nnx.BatchStat: 0, ...: None})``, one row per replica).

``docs/jax-modules.md`` has the conventions of all three JAX module libraries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import graphlib

from bn1d.config import argument_error
from bn1d.initializers import Ones, Zeros

from . import jax_modules
from .jax_modules import FLAX_NAMES

__all__ = ["BatchNorm1d", "replace_batchnorm"]


class BatchNorm1d(nnx.Module):
    """1-D batch normalization with BrainPy's constructor, as an ``nnx.Module``.

    Arguments are those of ``bn1d.backends.jax.BatchNorm1d`` (BrainPy's, then
    keyword-only ``dtype`` and the options ``fast_variance``,
    ``unbiased_running_var``, ``track_running_stats``); ``use_running_average``
    (keyword-only) sets the mode as in ``nnx.BatchNorm`` and overrides ``mode``.
    ``rngs`` is accepted for NNX's signature and unused: the initializers are
    bn1d's, ``(shape, dtype) -> array``, arrays or scalars.
    """

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
        use_running_average: bool | None = None,
        rngs: nnx.Rngs | None = None,
        **options: Any,
    ):
        del rngs  # no randomness: the initializers are deterministic
        layer = jax_modules.new_layer(
            num_features, axis, epsilon, momentum, affine, bias_initializer, scale_initializer,
            axis_name, axis_index_groups, mode, name, dtype=dtype, **options,
        )  # fmt: skip
        training = jax_modules.resolve_training(use_running_average, None, layer.config)
        self.config = layer.config
        self.dtype = layer.dtype
        self.use_running_average = not training
        self.flax_feature_axis: int | None = None  # set by replace_batchnorm(ndim=None): the rank follows x
        self._assign({**layer.params, **layer.state}, create=True)

    # -- the call ------------------------------------------------------------------------
    def __call__(self, x: Any, mask: Any = None, *, use_running_average: bool | None = None) -> jax.Array:
        """``y`` for ``x`` (bn1d's layout: ``axis`` lists the reduced axes) and an optional
        boolean ``mask`` of ``x``'s shape without the feature axis. In training (by default,
        or ``use_running_average=False``) the running statistics are updated in place."""
        training = jax_modules.resolve_training(use_running_average, self.use_running_average, self.config)
        params, state = self._values()
        y, new_state = jax_modules.apply(self._config_for(x), params, state, x, mask, training)
        if training:
            self._assign(new_state)
        return y

    def _config_for(self, x: Any) -> Any:
        """The configuration for ``x``: the constructor's, or with ``flax_feature_axis`` set
        (a replaced ``nnx.BatchNorm``) every axis of ``x`` but that one reduced, as in Flax."""
        feature = self.flax_feature_axis
        ndim = np.ndim(x)
        if feature is None or ndim == self.config.ndim:
            return self.config
        if ndim < 2 or not -ndim <= feature < ndim:
            raise argument_error("x", f"an input of at least 2 dimensions with the feature axis {feature}", np.shape(x))
        return dataclasses.replace(self.config, reduce_axes=_reduced(feature, ndim))

    def set_view(self, use_running_average: bool | None = None) -> None:
        """``nnx.view(model, use_running_average=...)``, as ``nnx.BatchNorm``."""
        if use_running_average is not None:
            jax_modules.resolve_training(use_running_average, None, self.config)
            self.use_running_average = use_running_average

    # -- bn1d's state dictionary -------------------------------------------------------
    def state_dict(self) -> dict[str, jax.Array]:
        """The parameters and running statistics under bn1d's keys (``config.keys``)."""
        params, state = self._values()
        return {**params, **state}

    def load_state_dict(self, state: Any) -> None:
        """Load bn1d's state dictionary (any backend's ``state_dict()``): strict and
        atomic (``bn1d.state.check_state``), values converted to the module's dtype."""
        params, stats = jax_modules.loaded(self.config, self.dtype, state)
        self._assign({**params, **stats})

    def _values(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        read = lambda key: getattr(self, FLAX_NAMES[key][1])[...]  # noqa: E731
        return {k: read(k) for k in self.config.param_keys}, {k: read(k) for k in self.config.state_keys}

    def _assign(self, values: dict[str, Any], create: bool = False) -> None:
        for key, value in values.items():
            attribute = FLAX_NAMES[key][1]
            if create:
                kind = nnx.Param if key in self.config.param_keys else nnx.BatchStat
                setattr(self, attribute, kind(value))
            else:
                getattr(self, attribute)[...] = value


def replace_batchnorm(model: Any, *, ndim: int | None = None, **options: Any) -> Any:
    """Swap every ``nnx.BatchNorm`` in ``model`` (in place; also returned) for bn1d's
    :class:`BatchNorm1d`, keeping its values (``scale``, ``bias``, ``mean``, ``var``), its
    ``momentum``, ``epsilon``, ``axis_name``, ``axis_index_groups`` and mode.

    Flax's feature ``axis`` becomes bn1d's reduced axes: every other axis of the input,
    decided at each call from ``x.ndim`` as in Flax (``ndim=None``, the default; the
    module's ``flax_feature_axis`` holds Flax's axis). ``ndim=`` fixes the rank instead,
    as every bn1d layer does, so an input of another rank is a ``ValueError``. The numerics stay
    Flax's: ``fast_variance=use_fast_variance`` and ``unbiased_running_var=False``
    (biased, as Flax); ``options`` override these or set bn1d's others (e.g.
    ``fast_variance=False`` for the exact variance). A layer without scale or bias gets
    the neutral value for the missing one (bn1d's affine layer has both);
    ``use_scale=use_bias=False`` becomes ``affine=False``. Shared layers stay shared;
    layers in ``nnx.List``/``nnx.Dict`` and in ``nnx.data`` tuples, lists and dicts are
    replaced too. Every layer is converted before any is replaced, so an error (a
    ``ValueError``/``TypeError`` naming the argument) leaves ``model`` as it was.

    Two call-site differences remain (``docs/jax-modules.md``): the call is bn1d's,
    ``(x, mask=None, *, use_running_average=None)``, so Flax's ``bn(x, True)`` becomes
    ``bn(x, use_running_average=True)`` and a mask has ``x``'s shape without the feature
    axis (Flax's broadcasts to ``x``); and the output has the input's dtype with
    float32 (or float64) statistics (R2.5), where Flax casts to its ``dtype``.
    """
    if ndim is not None and (not isinstance(ndim, int) or isinstance(ndim, bool)):
        raise argument_error("ndim", "None or an int >= 2 (the rank of the layers' inputs)", ndim, TypeError)
    if ndim is not None and ndim < 2:
        raise argument_error("ndim", "None or an int >= 2 (the rank of the layers' inputs)", ndim)
    if isinstance(model, nnx.BatchNorm):
        return _from_flax(model, ndim, options)
    # Two passes, so that a layer that cannot be converted raises before any is replaced.
    found: dict[int, nnx.BatchNorm] = {}
    _walk(model, lambda layer: found.setdefault(id(layer), layer), set())
    replaced = {key: _from_flax(layer, ndim, options) for key, layer in found.items()}
    _walk(model, lambda layer: replaced[id(layer)], set())
    return model


def _children(node: Any) -> list[tuple[Any, Any]]:
    """``(key, child)`` of a graph node (its graph children and the lists, tuples and
    dicts it holds as data, e.g. ``nnx.data((...))``) or of such a container."""
    if isinstance(node, (list, tuple)):
        return list(enumerate(node))
    if isinstance(node, dict):
        return list(node.items())
    if graphlib.get_node_impl(node) is None:
        return []
    children = dict(nnx.iter_children(node))
    if isinstance(node, nnx.Module):
        children.update(
            (k, v) for k, v in vars(node).items() if k not in children and isinstance(v, (list, tuple, dict))
        )
    return list(children.items())


def _walk(node: Any, swap: Any, seen: set[int]) -> Any:
    """``node`` with every ``nnx.BatchNorm`` below it replaced by ``swap(layer)``: graph
    nodes, lists and dicts changed in place, tuples rebuilt (and set on their holder)."""
    if isinstance(node, nnx.BatchNorm):
        return swap(node)
    if id(node) in seen:
        return node
    seen.add(id(node))
    changed = {}
    for key, child in _children(node):
        new = _walk(child, swap, seen)
        if new is not child:
            changed[key] = new
    if not changed:
        return node
    if isinstance(node, tuple):
        return tuple(changed.get(i, v) for i, v in enumerate(node))
    if isinstance(node, (list, dict)):
        for key, new in changed.items():
            node[key] = new
        return node
    set_key = getattr(graphlib.get_node_impl(node), "set_key", None)
    if set_key is None:  # an immutable graph node (only reached when it holds a BatchNorm)
        raise argument_error("model", "nnx.BatchNorm layers held by mutable graph nodes", type(node))
    for key, new in changed.items():
        set_key(node, key, new)
    return node


def _reduced(feature: int, ndim: int) -> tuple[int, ...]:
    """Every axis of an ``ndim``-D input but Flax's feature axis ``feature``."""
    return tuple(a for a in range(ndim) if a != feature % ndim)


def _from_flax(layer: nnx.BatchNorm, ndim: int | None, options: dict[str, Any]) -> BatchNorm1d:
    """bn1d's module equal to one ``nnx.BatchNorm`` (its values, options and mode)."""
    if isinstance(layer.axis, (tuple, list)) and len(layer.axis) != 1:
        raise argument_error("axis", "one feature axis (bn1d normalises per feature of one axis)", layer.axis)
    feature = int(layer.axis[0] if isinstance(layer.axis, (tuple, list)) else layer.axis)
    adaptive = ndim is None
    if ndim is None:  # the smallest rank that has the feature axis; calls of other ranks adapt
        ndim = max(2, feature + 1 if feature >= 0 else -feature)
    if not -ndim <= feature < ndim:
        raise argument_error("ndim", f"a rank that has the feature axis {feature}", ndim)
    variables = {
        "params": {k: getattr(layer, k)[...] for k in ("scale", "bias") if getattr(layer, k) is not None},
        "batch_stats": {"mean": layer.mean[...], "var": layer.var[...]},
    }
    state = jax_modules.state_from_flax(variables)
    affine = bool(variables["params"])
    wide = any(np.asarray(v).dtype == np.float64 for v in state.values())
    flax_options = {
        "axis": _reduced(feature, ndim),
        "epsilon": layer.epsilon,
        "momentum": layer.momentum,
        "affine": affine,
        "axis_name": layer.axis_name,
        "axis_index_groups": layer.axis_index_groups,
        "dtype": jnp.float64 if wide else None,
        "use_running_average": layer.use_running_average,
        "fast_variance": bool(layer.use_fast_variance),
        "unbiased_running_var": False,
    }
    module = BatchNorm1d(layer.num_features, **{**flax_options, **options})
    state["num_batches_tracked"] = np.asarray(0)  # for momentum=None: no call counted yet
    module.load_state_dict({k: v for k, v in state.items() if k in module.config.keys})
    if adaptive:
        module.flax_feature_axis = feature
    return module
