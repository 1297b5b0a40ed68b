"""Exact population statistics for JAX models' batch norms (PreciseBN, done exactly): Flax NNX,
Flax linen, Equinox and bn1d's BrainPy-signature layers.

Each function runs a model over batches of data and writes, as every batch norm's running
statistics, the pooled mean and (unbiased, R3.3) variance of everything that layer saw:
``bn1d.population.PopulationStatistics``, count-weighted with the spread between batch means
counted (``docs/population.md``). What is pooled is what ``torch_population`` and PreciseBN
pool: one pass, every batch norm normalising with its batch's statistics (training), each
seeing the earlier layers so normalised; every other module keeps its mode.

* :func:`recompute_statistics`: an ``nnx.Module`` holding ``nnx.BatchNorm`` layers (bn1d's
  drop-in is one) and bn1d's ``nnx`` ``BatchNorm1d``, changed in place;
* :func:`recompute_linen_statistics`: a linen module and its variables (``nn.BatchNorm``,
  bn1d's ``linen.BatchNorm1d``), new variables returned;
* :func:`recompute_equinox_statistics`: an Equinox model and its state (``eqx.nn.BatchNorm``,
  bn1d's ``equinox.BatchNorm1d``), a new state returned;
* :func:`recompute_layer_statistics`: bn1d's ``Layer`` s (``backends.numpy``/``backends.jax``
  ``BatchNorm1d``) in a plain Python model, changed in place.

How the inputs are captured: every batch norm's call is intercepted and made to train (its
``use_running_average``/``inference``/``training`` argument set). NNX's and bn1d's layers have,
for the pass, their instance's class swapped for a recording subclass (only those objects:
no class is patched, and the classes come back in ``finally``); linen calls go through
``flax.linen.intercept_methods``; Equinox's layers are replaced in the pytree by a recording
wrapper. A concrete input is recorded as it is; a traced one (a model that jits inside,
Equinox's ``vmap``) through ``jax.debug.callback``, which hands its value to the host when the
computation runs. Equinox's ``BatchNorm`` sees one example per ``vmap`` lane, so the wrapper
``lax.all_gather`` s the lanes into the batch first: one callback with the whole batch, not one
per example (``jax.debug.callback`` unrolls over a mapped axis). The accumulation is on the
host, in NumPy's float64, whether or not ``jax_enable_x64`` is on: exact as
``PopulationStatistics`` is, at the cost of copying each layer's input to the host once.
With ``sync=True`` each ``jax.distributed`` process accumulates its own batches and one
all-gather of every layer's row at the end pools them (as ``torch_population``'s ``sync``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bn1d.config import argument_error, normalize_reduce_axes
from bn1d.layer import Layer
from bn1d.population import PopulationStatistics, check_pass, input_picker, progress_step

from . import jax_modules

__all__ = [
    "recompute_equinox_statistics",
    "recompute_layer_statistics",
    "recompute_linen_statistics",
    "recompute_statistics",
]

#: The call arguments that make a batch norm train: NNX's and linen's, Equinox's, bn1d's Layer's.
_TRAIN = {"use_running_average": False, "inference": False, "training": True}
_SITE = "_bn1d_population_site"  # the instance attribute a recording class reads: (recorder, key)


# -- the shared core -------------------------------------------------------------------------
class _Recorder:
    """Every captured layer's accumulator, keyed by layer, fed on the host after each batch."""

    def __init__(self) -> None:
        self.stats: dict[Any, PopulationStatistics] = {}  # by the layer's key: its path
        self._pending: list[tuple[Any, int, np.ndarray, np.ndarray | None]] = []

    def record(self, key: Any, layer: Any, x: Any, mask: Any) -> None:
        """Keep ``layer``'s input ``x`` (and ``mask``, in the layer's own convention) for ``key``."""
        x, mask, feature = _layout(layer, x, mask)
        if any(isinstance(v, jax.core.Tracer) for v in (x, mask)):
            jax.debug.callback(functools.partial(self._keep, key, feature), x, mask)
        else:
            self._keep(key, feature, x, mask)

    def _keep(self, key: Any, feature: int, x: Any, mask: Any) -> None:
        x = np.asarray(x)
        x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)  # float16, bfloat16: R2.5
        self._pending.append((key, feature, x, None if mask is None else np.asarray(mask)))

    def flush(self) -> None:
        """Accumulate what the last forward pass recorded (its callbacks waited for)."""
        jax.effects_barrier()
        for key, feature, x, mask in self._pending:
            if key not in self.stats:
                axes = tuple(a for a in range(x.ndim) if a != feature)
                self.stats[key] = PopulationStatistics(x.shape[feature], axes)
            self.stats[key].update(x, mask)
        self._pending.clear()


def _layout(layer: Any, x: Any, mask: Any) -> tuple[Any, Any, int]:
    """``(x, mask, feature axis)`` in bn1d's convention (one feature axis, a mask of ``x``'s shape
    without it) from a layer's call: Flax's feature ``axis`` (several are flattened into one,
    last, as ``flax_batch_norm`` does) and mask broadcastable to ``x``, Equinox's gathered
    examples, or bn1d's reduced axes (a config's, or linen's fields)."""
    axis = getattr(layer, "axis", None)
    if hasattr(layer, "use_fast_variance"):  # Flax's BatchNorm, NNX or linen (bn1d's drop-ins too)
        x = jnp.asarray(x)
        features = jax_modules.flax_feature_axes(axis, x.ndim)
        mask = jax_modules.flax_mask(mask, x.shape, features)
        if len(features) == 1:
            return x, mask, features[0]
        x = jnp.moveaxis(x, features, range(-len(features), 0))
        return x.reshape(*x.shape[: -len(features)], -1), mask, x.ndim - len(features)
    if hasattr(layer, "input_size"):  # Equinox's BatchNorm: its lanes' examples gathered, (batch, C, *spatial)
        return x, mask, 1
    config = getattr(layer, "config", None)
    reduced = config.reduce_axes if config is not None else normalize_reduce_axes(axis)  # linen's: its fields
    return x, mask, next(a for a in range(len(reduced) + 1) if a not in reduced)


def _variance(layer: Any, stats: PopulationStatistics) -> Any:
    """The variance a layer stores: unbiased (R3.3), biased for bn1d's ``unbiased_running_var=False``."""
    return stats.running_var if getattr(getattr(layer, "config", layer), "unbiased_running_var", True) else stats.var


def _check(batches: Any, input: Any, limit: Any, progress: Any, sync: Any) -> None:
    """The arguments every function shares, checked before anything changes."""
    if not isinstance(sync, bool):
        raise argument_error("sync", "a bool", sync, TypeError)
    if not isinstance(batches, Iterable):
        raise argument_error("batches", "an iterable of batches", type(batches).__name__, TypeError)
    check_pass(input, limit, progress)


def _run(
    recorder: _Recorder, batches: Iterable[Any], forward: Callable[[Any], Any], input: Any, limit: int | None,
    progress: Any,
) -> int:  # fmt: skip
    """The pass: ``forward`` on each batch's input (at most ``limit``), its records accumulated;
    the number of batches."""
    pick = input_picker(input, (jax.Array, np.ndarray), "arrays")
    step, bar = progress_step(progress, limit)
    done = 0
    try:
        for batch in batches:
            if limit is not None and done >= limit:
                break
            forward(pick(batch))
            recorder.flush()
            done += 1
            step(done)
    finally:
        if bar is not None:
            bar.close()
    return done


def _pooled(recorder: _Recorder, done: int, sync: bool, sizes: Mapping[Any, int]) -> dict[Any, PopulationStatistics]:
    """Each layer's accumulator: this process's, or with ``sync`` every process's (``sizes``:
    the features of every layer that may have been called, in the same order on every process)."""
    if not (sync and jax.process_count() > 1):
        if not done:
            raise argument_error("batches", "at least one batch", "none")
        return recorder.stats
    stats = _gathered(recorder.stats, sizes)
    if not stats:
        raise argument_error("batches", "at least one batch on some process", "none")
    return stats


def _gathered(stats: Mapping[Any, PopulationStatistics], sizes: Mapping[Any, int]) -> dict[Any, PopulationStatistics]:
    """Every process's accumulators, merged in process order: one all-gather of every layer's
    row ``(count, shift, mean - shift, squared deviations)`` at the end, float64 sent as its bits
    (JAX would narrow float64 without ``jax_enable_x64``); a layer a process never called
    sends a count of 0."""
    from jax.experimental import multihost_utils

    rows = [np.zeros(1 + 3 * c) if stats.get(key) is None else
            np.concatenate([np.reshape(np.asarray(v, np.float64), -1) for v in stats[key]._total() or ()])
            for key, c in sizes.items()]  # fmt: skip
    local = np.concatenate(rows) if rows else np.zeros(0)
    gathered = np.asarray(multihost_utils.process_allgather(local.view(np.uint32))).view(np.float64)
    merged: dict[Any, PopulationStatistics] = {}
    start = 0
    for key, c in sizes.items():
        for row in gathered[:, start : start + 1 + 3 * c]:
            if row[0] > 0:  # a process's total: one row, as a batch's moments
                merged.setdefault(key, PopulationStatistics(c, axis=0)).add(row[0], *row[1:].reshape(3, c))
        start += 1 + 3 * c
    return merged


_RECORDING: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass of ``cls`` whose calls train and record their input for the ``(recorder,
    key)`` its instance holds (made once per class; swapped in per instance for a pass)."""
    if cls not in _RECORDING:
        signature = inspect.signature(cls.__call__)  # type: ignore[operator]

        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            bound.arguments.update({k: v for k, v in _TRAIN.items() if k in bound.arguments})
            y = cls.__call__(*bound.args, **bound.kwargs)  # type: ignore[operator]
            recorder, key = self.__dict__[_SITE]
            recorder.record(key, self, bound.args[1], bound.arguments.get("mask"))
            return y

        namespace = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        _RECORDING[cls] = type(cls)(cls.__name__, (cls,), namespace)
    return _RECORDING[cls]


@contextlib.contextmanager
def _recording(layers: Mapping[Any, Any], recorder: _Recorder) -> Iterator[None]:
    """Every layer of ``layers`` recording into ``recorder`` under its key while inside."""
    swapped = []
    try:
        for key, layer in layers.items():
            cls = type(layer)
            object.__setattr__(layer, "__class__", _recording_class(cls))
            swapped.append((layer, cls))
            object.__setattr__(layer, _SITE, (recorder, key))
        yield
    finally:
        for layer, cls in swapped:
            object.__setattr__(layer, "__class__", cls)
            layer.__dict__.pop(_SITE, None)


# -- Flax NNX ----------------------------------------------------------------------------------
def recompute_statistics(
    model: Any,
    batches: Iterable[Any],
    *,
    input: Callable[[Any], Any] | None = None,
    limit: int | None = None,
    progress: bool | Callable[[int], None] = False,
    sync: bool = False,
) -> Any:
    """Set every batch norm's running statistics of a Flax NNX ``model`` to the exact
    statistics of its inputs over ``batches``.

    Parameters
    ----------
    model : flax.nnx.Module
        Any NNX model; its batch norms are found by class: ``nnx.BatchNorm`` (bn1d's drop-in
        ``bn1d.backends.nnx.BatchNorm`` is one) and ``bn1d.backends.nnx.BatchNorm1d`` (with
        running statistics).
    batches : iterable
        Arrays, ``(input, ...)`` tuples, or anything ``input`` picks the model's input from;
        the model is called as ``model(input)``.
    input : callable, optional
        ``batch -> model input`` (e.g. ``lambda b: b["image"]``).
    limit : int, optional
        At most this many batches.
    progress : bool or callable, optional
        ``True``: a ``tqdm`` bar when tqdm is installed; a callable: called with the number of
        batches done after each.
    sync : bool, optional
        ``True``: every JAX process (``jax.distributed``) passes its own batches and all get
        the statistics of every process's batches, from one all-gather of every layer's
        accumulated row at the end (none per batch). Every process must call it (one that
        fails leaves the others waiting in the gather); a process may have no batch.

    Returns
    -------
    flax.nnx.Module
        ``model``, its batch norms' ``mean`` and ``var`` replaced: the mean and unbiased
        variance (R3.3; biased for a ``BatchNorm1d`` with ``unbiased_running_var=False``) of
        every value each layer saw, pooled over the batches (``docs/population.md``).

    Raises
    ------
    TypeError, ValueError
        For a bad argument, a batch it cannot take, or no batch at all, before any statistic
        changes (a failing pass leaves the model as it was).

    Notes
    -----
    One pass, every batch norm in training (its call's ``use_running_average=False``, whatever
    the model or its attribute says): each sees the earlier layers normalised by the batch's
    statistics, as PreciseBN and ``torch_population`` run it; other modules keep their mode
    (``model.train()`` first for dropout too). Nothing else changes: the parameters, every
    other variable (the pass's own updates of the statistics and RNG counts are undone), the
    modes and the layers' classes are as they were.
    """
    from flax import nnx

    from .nnx import BatchNorm1d

    _check(batches, input, limit, progress, sync)
    if not isinstance(model, nnx.Module):
        raise argument_error("model", "a flax.nnx.Module", type(model).__name__, TypeError)
    layers = {
        path: node for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.BatchNorm) or (isinstance(node, BatchNorm1d) and node.config.track_running_stats)
    }  # fmt: skip
    if not layers:
        raise argument_error("model", "a model holding batch norms with running statistics", type(model).__name__)
    saved = jax.tree.map(lambda value: value, nnx.state(model))  # the values: nnx.state holds the variables
    recorder = _Recorder()
    try:
        with _recording(layers, recorder):
            done = _run(recorder, batches, model, input, limit, progress)
    finally:
        nnx.update(model, saved)
    sizes = {key: layer.mean[...].size for key, layer in layers.items()}
    for key, stats in _pooled(recorder, done, sync, sizes).items():
        layer = layers[key]
        layer.mean[...] = jnp.asarray(stats.mean, layer.mean[...].dtype)
        layer.var[...] = jnp.asarray(_variance(layer, stats), layer.var[...].dtype)
    return model


# -- Flax linen --------------------------------------------------------------------------------
def recompute_linen_statistics(
    module: Any,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    input: Callable[[Any], Any] | None = None,
    limit: int | None = None,
    progress: bool | Callable[[int], None] = False,
    sync: bool = False,
) -> dict[str, Any]:
    """Variables of a Flax linen ``module`` whose ``batch_stats`` are the exact statistics of
    each batch norm's inputs over ``batches``.

    Parameters
    ----------
    module : flax.linen.Module
        Any linen model; its batch norms are found by class: ``nn.BatchNorm`` (bn1d's drop-in
        ``bn1d.backends.linen.BatchNorm`` is one) and ``bn1d.backends.linen.BatchNorm1d``.
    variables : mapping
        The model's variables, with a ``batch_stats`` collection.
    batches : iterable
        Arrays, ``(input, ...)`` tuples, or anything ``input`` picks the model's input from.
    apply_kwargs : mapping, optional
        More arguments of ``module.apply(variables, input, mutable=["batch_stats"],
        **apply_kwargs)``: the model's own (e.g. ``{"train": True}``), ``rngs``, ``method``.
    input, limit, progress, sync
        As :func:`recompute_statistics`'s.

    Returns
    -------
    dict
        ``variables`` with ``batch_stats`` replaced (a new collection; the others are the
        given objects): each batch norm's ``mean`` and unbiased variance (R3.3; biased for a
        ``BatchNorm1d`` with ``unbiased_running_var=False``) of every value it saw.

    Raises
    ------
    TypeError, ValueError
        For a bad argument, a batch it cannot take, no batch at all, or a batch norm whose
        attribute ``use_running_average=True`` keeps it in inference (``apply_kwargs`` must
        make the model build it training); ``variables`` never change.

    Notes
    -----
    One pass, every batch norm in training (its call's ``use_running_average=False`` where
    Flax takes it: an attribute set when the module is built cannot be overridden, hence
    ``apply_kwargs``), as PreciseBN runs it; ``apply_kwargs`` decide the rest (dropout).
    """
    import flax.linen as nn
    from flax.core import FrozenDict, freeze, unfreeze
    from flax.traverse_util import flatten_dict, unflatten_dict

    from .linen import BatchNorm1d

    _check(batches, input, limit, progress, sync)
    if not isinstance(module, nn.Module):
        raise argument_error("module", "a flax.linen.Module", type(module).__name__, TypeError)
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        given = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise argument_error("variables", "a mapping of variable collections with batch_stats", given)
    if apply_kwargs is not None and not isinstance(apply_kwargs, Mapping):
        raise argument_error("apply_kwargs", "None or a mapping", type(apply_kwargs).__name__, TypeError)
    recorder, layers = _Recorder(), {}  # the layers by path, as called

    def intercept(call: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        layer = context.module
        if context.method_name != "__call__" or not isinstance(layer, (nn.BatchNorm, BatchNorm1d)):
            return call(*args, **kwargs)
        if isinstance(layer, BatchNorm1d) and not layer.track_running_stats:
            return call(*args, **kwargs, use_running_average=False)
        bound = inspect.signature(type(layer).__call__).bind(layer, *args, **kwargs)
        bound.apply_defaults()
        if isinstance(layer, BatchNorm1d) or layer.use_running_average is None:
            bound.arguments["use_running_average"] = False
        elif layer.use_running_average:  # Flax refuses the argument beside the attribute
            raise argument_error(
                "apply_kwargs", "arguments under which every batch norm trains (e.g. {'train': True})",
                f"{'/'.join(layer.path)} built with use_running_average=True",
            )  # fmt: skip
        y = call(*bound.args[1:], **bound.kwargs)
        layers[layer.path] = layer
        recorder.record(layer.path, layer, bound.args[1], bound.arguments.get("mask"))
        return y

    arguments = {"mutable": ["batch_stats"], **(apply_kwargs or {})}
    with nn.intercept_methods(intercept):
        done = _run(recorder, batches, lambda x: module.apply(variables, x, **arguments), input, limit, progress)
    flat = flatten_dict(unfreeze(variables["batch_stats"]))
    sizes = {path[:-1]: np.size(v) for path, v in flat.items() if path[-1] == "mean" and (*path[:-1], "var") in flat}
    for path, stats in _pooled(recorder, done, sync, sizes).items():
        layer = layers.get(path)  # None: called on other processes only (its variance taken as unbiased)
        variance = stats.running_var if layer is None else _variance(layer, stats)
        for name, value in (("mean", stats.mean), ("var", variance)):
            where = tuple(path) + (name,)
            flat[where] = jnp.asarray(value, flat[where].dtype).reshape(np.shape(flat[where]))
    result = {**variables, "batch_stats": unflatten_dict(flat)}
    return freeze(result) if isinstance(variables, FrozenDict) else result  # type: ignore[return-value]


# -- Equinox -----------------------------------------------------------------------------------
def recompute_equinox_statistics(
    model: Any,
    state: Any,
    batches: Iterable[Any],
    *,
    apply: Callable[[Any, Any, Any], Any] | None = None,
    input: Callable[[Any], Any] | None = None,
    limit: int | None = None,
    progress: bool | Callable[[int], None] = False,
    sync: bool = False,
) -> Any:
    """A new ``eqx.nn.State`` of ``model`` whose batch norms' running statistics are the exact
    statistics of their inputs over ``batches``.

    Parameters
    ----------
    model : equinox.Module
        Any Equinox model; its batch norms are found by class: ``eqx.nn.BatchNorm`` (bn1d's
        drop-in is one) and ``bn1d.backends.equinox.BatchNorm1d`` (with running statistics).
    state : equinox.nn.State
        The model's state (``eqx.nn.make_with_state``); it stays valid and unchanged.
    batches : iterable
        Arrays, ``(input, ...)`` tuples, or anything ``input`` picks the model's input from.
    apply : callable, optional
        ``(model, state, x) -> anything``: one forward pass of the model it is given (the
        recording one, not ``model`` itself) over a batch ``x``. By default, under
        ``eqx.filter_jit``, ``jax.vmap(model, in_axes=(0, None), axis_name=name)(x, state)``,
        ``name`` the axis name of the layers' (one example per lane, as Equinox's ``BatchNorm``
        needs), or ``model(x, state)`` when no layer is synced.
    input, limit, progress, sync
        As :func:`recompute_statistics`'s.

    Returns
    -------
    equinox.nn.State
        A copy of ``state`` with each batch norm's running mean and unbiased variance (R3.3;
        biased for a ``BatchNorm1d`` with ``unbiased_running_var=False``) of every value it
        saw. ``mode="batch"``: the hidden average is scaled so that inference's debiasing
        (``hidden / (1 - momentum**count)``) gives them; ``mode="ema"``: the average itself.

    Raises
    ------
    TypeError, ValueError
        For a bad argument, a batch it cannot take, or no batch at all.

    Notes
    -----
    One pass, every batch norm in training (its call's ``inference=False``), each seeing the
    earlier layers normalised by the batch's statistics, as PreciseBN runs it; every batch
    starts from ``state`` (the pass's own updates are dropped, not carried to the next batch).
    The vmapped layers' examples are gathered over the axis (``lax.all_gather``) into one
    batch and handed to the host by one ``jax.debug.callback`` per layer and batch (module
    docstring): a per-example callback would unroll over the lanes, and capturing a tracer
    would leak it. That works under ``eqx.filter_jit`` in ``apply`` too.
    """
    import equinox as eqx

    from .equinox import BatchNorm1d

    _check(batches, input, limit, progress, sync)
    if not isinstance(model, eqx.Module):
        raise argument_error("model", "an equinox.Module", type(model).__name__, TypeError)
    if not isinstance(state, eqx.nn.State):
        raise argument_error("state", "an equinox.nn.State", type(state).__name__, TypeError)
    if apply is not None and not callable(apply):
        raise argument_error("apply", "None or a callable (model, state, x)", type(apply).__name__, TypeError)

    def is_norm(node: Any) -> bool:
        return isinstance(node, eqx.nn.BatchNorm) or (isinstance(node, BatchNorm1d) and node.state_index is not None)

    layers = {
        jax.tree_util.keystr(path): node
        for path, node in jax.tree_util.tree_flatten_with_path(model, is_leaf=is_norm)[0]
        if is_norm(node)
    }  # fmt: skip
    if not layers:
        raise argument_error("model", "a model holding batch norms with running statistics", type(model).__name__)
    names = {_axis_name(layer) for layer in layers.values()} - {None}
    if apply is None and len(names) > 1:
        raise argument_error("apply", "a callable (model, state, x) for layers synced over different axes", names)
    name = next(iter(names), None)
    recorder, wrapper = _Recorder(), _equinox_wrapper()
    recording = jax.tree_util.tree_map_with_path(
        lambda path, node: wrapper(node, (recorder, jax.tree_util.keystr(path))) if is_norm(node) else node,
        model, is_leaf=is_norm,
    )  # fmt: skip

    @eqx.filter_jit  # compiled once per batch shape (the records go through the callback)
    def default(model: Any, state: Any, x: Any) -> Any:
        if name is None:
            return model(x, state)
        return jax.vmap(model, in_axes=(0, None), axis_name=name)(x, state)

    copy = lambda state: jax.tree.map(lambda value: value, state)  # noqa: E731  # a State is consumed by set
    forward = apply or default
    done = _run(recorder, batches, lambda x: forward(recording, copy(state), x), input, limit, progress)
    sizes = {key: layer.input_size if hasattr(layer, "input_size") else layer.config.num_features
             for key, layer in layers.items()}  # fmt: skip
    new = copy(state)
    for key, stats in _pooled(recorder, done, sync, sizes).items():
        layer = layers[key]
        mean, var = stats.mean, _variance(layer, stats)
        if isinstance(layer, BatchNorm1d):
            old = new.get(layer.state_index)
            values = {"running_mean": mean, "running_var": var}
            new = new.set(layer.state_index, {**old, **{k: jnp.asarray(v, old[k].dtype) for k, v in values.items()}})
        elif layer.mode == "ema":
            old = new.get(layer.ema_state_index)
            new = new.set(layer.ema_state_index, (jnp.asarray(mean, old[0].dtype), jnp.asarray(var, old[1].dtype)))
        else:  # inference divides by Equinox's own float32 scale: the product taken in float64, rounded once
            counter = new.get(layer.batch_counter)
            scale = np.asarray(jnp.where(counter == 0, 1, 1 - layer.momentum**counter), np.float64)
            old = new.get(layer.batch_state_index)
            new = new.set(
                layer.batch_state_index, tuple(jnp.asarray(v * scale, o.dtype) for v, o in zip((mean, var), old))
            )
    return new


def _axis_name(layer: Any) -> Any:
    name = layer.axis_name if hasattr(layer, "axis_name") else layer.config.axis_name
    return tuple(name) if isinstance(name, list) else name


@functools.cache
def _equinox_wrapper() -> type:
    """The recording wrapper of an Equinox batch norm (a class made on first use, so that this
    module imports without Equinox)."""
    import equinox as eqx

    class Recording(eqx.nn.StatefulLayer):  # type: ignore[misc]
        """``layer`` training, its batch recorded: per-lane examples (and bn1d's per-lane
        batches) gathered over the synced axis first."""

        layer: Any
        site: Any = eqx.field(static=True)  # (recorder, key): hashed by identity under jit

        def __call__(self, x: Any, state: Any, **kwargs: Any) -> Any:
            layer = self.layer
            y, state = layer(x, state, **{**kwargs, "inference": False})
            mask = kwargs.get("mask")
            if isinstance(layer, eqx.nn.BatchNorm):
                x = jax.lax.all_gather(x, _axis_name(layer), axis=0)  # (batch, C, *spatial)
            elif layer.config.synced:
                config = layer.config
                batch, example = config.reduce_axes[0], np.ndim(x) == config.ndim - 1
                x = jax.lax.all_gather(x, config.axis_name, axis=batch, tiled=not example)
                if mask is not None:
                    at = batch - (config.feature_axis < batch)
                    mask = jax.lax.all_gather(mask, config.axis_name, axis=at, tiled=not example)
            recorder, key = self.site
            recorder.record(key, layer, x, mask)
            return y, state

    return Recording


# -- bn1d's BrainPy-signature layers -----------------------------------------------------------
def recompute_layer_statistics(
    layers: Layer | Iterable[Layer],
    batches: Iterable[Any],
    *,
    forward: Callable[[Any], Any] | None = None,
    input: Callable[[Any], Any] | None = None,
    limit: int | None = None,
    progress: bool | Callable[[int], None] = False,
    sync: bool = False,
) -> Any:
    """Set the running statistics of bn1d's stateful layers (``bn1d.backends.numpy`` and
    ``bn1d.backends.jax`` ``BatchNorm1d``, any ``bn1d.Layer``) to the exact statistics of
    their inputs over ``batches``.

    Parameters
    ----------
    layers : bn1d.Layer or iterable of bn1d.Layer
        The layers to recompute (those with running statistics).
    batches : iterable
        Arrays, ``(input, ...)`` tuples, or anything ``input`` picks ``forward``'s input from.
    forward : callable, optional
        ``input -> anything``: the plain Python model that calls the layers (with masks where
        it passes them). By default the one layer itself: ``batches`` are its inputs.
    input, limit, progress, sync
        As :func:`recompute_statistics`'s.

    Returns
    -------
    bn1d.Layer or iterable of bn1d.Layer
        ``layers``, each with ``running_mean`` and ``running_var`` the mean and unbiased
        variance (R3.3; biased with ``unbiased_running_var=False``) of every value it saw.

    Raises
    ------
    TypeError, ValueError
        For a bad argument, a batch it cannot take, or no batch at all, before any statistic
        changes.

    Notes
    -----
    One pass, every listed layer in training (its call's ``training=True``); the pass's own
    updates of the state are undone, and ``training`` and the parameters are as they were.
    """
    listed = [layers] if isinstance(layers, Layer) else list(layers) if isinstance(layers, (list, tuple)) else None
    if not listed or not all(isinstance(layer, Layer) for layer in listed):
        raise argument_error("layers", "a bn1d Layer or a non-empty list of them", type(layers).__name__, TypeError)
    if forward is None and len(listed) > 1:
        raise argument_error("forward", "a callable input -> outputs that calls the layers", None, TypeError)
    if forward is not None and not callable(forward):
        raise argument_error("forward", "None or a callable input -> outputs", type(forward).__name__, TypeError)
    _check(batches, input, limit, progress, sync)
    tracked: dict[Any, Layer] = {id(layer): layer for layer in listed if layer.config.track_running_stats}
    if not tracked:
        raise argument_error("layers", "layers with running statistics", "track_running_stats=False")
    saved = {key: dict(layer.state) for key, layer in tracked.items()}  # replaced by a call, never changed in place
    recorder = _Recorder()
    try:
        with _recording(tracked, recorder):
            done = _run(recorder, batches, forward or listed[0], input, limit, progress)
    finally:
        for key, layer in tracked.items():
            layer.__dict__["state"] = saved[key]
    sizes = {key: layer.config.num_features for key, layer in tracked.items()}
    for key, stats in _pooled(recorder, done, sync, sizes).items():
        layer = tracked[key]
        new = {"running_mean": stats.mean, "running_var": _variance(layer, stats)}
        layer.load_state_dict({**layer.state_dict(), **new})
    return layers
