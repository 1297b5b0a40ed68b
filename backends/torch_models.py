"""bn1d inside whole PyTorch models: conversion, checkpoints, running statistics across ranks.

* :func:`convert_batchnorm` replaces, in place, every ``nn.BatchNorm1d``,
  ``nn.BatchNorm2d``, ``nn.BatchNorm3d`` and ``nn.SyncBatchNorm`` of a model (and the
  lazy variants, once initialised) by a :class:`ChannelFirstBatchNorm`;
  :func:`revert_batchnorm` goes back to PyTorch's classes (for export and inference).
  Both keep the modules' own parameter and buffer tensors, so optimizers built
  before, tied weights and ``requires_grad`` carry over.
* Checkpoints: a converted layer loads PyTorch's keys (``weight``, ``bias``,
  ``running_mean``, ``running_var``, ``num_batches_tracked``) and its own (``scale``
  for ``weight``); a reverted module loads a converted one's.
* :func:`sync_running_statistics` makes the running statistics of every batch norm of
  a model identical across ranks (their mean, or one rank's) before evaluation.

The maths is ``bn1d.algorithm``'s, the contract ``docs/spec.md`` (R6.7: PyTorch's
state); ``docs/torch-models.md`` is the guide.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase, _NormBase
from torch.nn.modules.module import _IncompatibleKeys

from bn1d.config import BatchNormConfig, argument_error

from .torch import BatchNorm1d, check_process_group, check_timeout, converted_momentum

__all__ = ["ChannelFirstBatchNorm", "convert_batchnorm", "revert_batchnorm", "sync_running_statistics"]

#: The input ranks each of PyTorch's classes takes (``None``: any rank >= 2).
TORCH_INPUT_RANKS: dict[type[_BatchNorm], tuple[int, ...] | None] = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
    nn.SyncBatchNorm: None,
}
#: ``axis_name`` of a converted ``nn.SyncBatchNorm`` when the conversion names none:
#: it syncs, as it did, over its own ``process_group``.
SYNC_AXIS_NAME = "batch"


class ChannelFirstBatchNorm(BatchNorm1d):
    """bn1d's layer in PyTorch's batch-norm layout: features on axis 1 of ``(N, C, *)``
    input, every other axis reduced, as ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm``.

    One layer takes every rank in ``input_ranks`` (the PyTorch class's: ``(2, 3)``
    for ``nn.BatchNorm1d``, ``(4,)`` and ``(5,)`` for 2d and 3d, ``None``: any rank >=
    2 for ``nn.SyncBatchNorm``): it is a ``BatchNorm1d`` with ``axis=(0, 2)`` that sees
    ``(N, C, d1, d2, ...)`` as the ``(N, C, d1 * d2 * ...)`` it is in memory (``(N,
    C)`` as ``(N, C, 1)``), so the statistics, parameters and state are one set
    whatever the rank, and PyTorch's kernels still run (``torch_kernels`` treats ``(N,
    C, 1)`` as the channel-last ``(N, C)`` it is). A mask has the input's shape
    without axis 1. ``torch_class`` is the class :func:`revert_batchnorm` gives back.

    ``frozen_statistics=True`` (with ``momentum=1.0``, tracked): a PyTorch module whose
    ``track_running_stats`` was set to ``False`` after construction, its buffers kept.
    Training normalises with the batch statistics and writes neither the running
    statistics nor ``num_batches_tracked`` (as PyTorch); evaluation uses the frozen
    statistics. Momentum 1.0 computes the same for finite batches; the flag also keeps
    them bit for bit where ``1.0 * running + 0.0 * nan`` would write NaN (a non-finite
    batch) or turn ``-0.0`` into ``0.0``.

    Checkpoints: ``state_dict()`` has ``config.keys`` and, whenever running statistics
    are tracked, ``num_batches_tracked`` (PyTorch's count, saved as PyTorch saves it);
    loading also takes PyTorch's names (``weight`` for ``scale``), fills an absent count
    with the current one when it is not state (PyTorch's rule for its version-1
    checkpoints), and takes ``strict=False`` as ``nn.Module`` does.
    """

    _version = 2  # PyTorch's batch norms' checkpoint version (with num_batches_tracked)

    def __init__(
        self,
        num_features: int,
        epsilon: float = 1e-5,
        momentum: float | None = 0.99,
        affine: bool = True,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        mode: str | None = None,
        name: str | None = None,
        *,
        input_ranks: tuple[int, ...] | None = (2, 3),
        torch_class: type[_BatchNorm] = nn.BatchNorm1d,
        frozen_statistics: bool = False,
        **kwargs: Any,
    ):
        if not isinstance(frozen_statistics, bool):
            raise argument_error("frozen_statistics", "a bool", frozen_statistics, TypeError)
        if frozen_statistics and kwargs.get("track_running_stats", True) is not True:
            raise argument_error(
                "track_running_stats", "True with frozen_statistics=True", kwargs["track_running_stats"]
            )
        if frozen_statistics and momentum != 1.0:
            raise argument_error("momentum", "1.0 with frozen_statistics=True (no update)", momentum)
        if torch_class not in TORCH_INPUT_RANKS:
            names = [cls.__name__ for cls in TORCH_INPUT_RANKS]
            raise argument_error("torch_class", f"one of torch.nn.{names}", torch_class, TypeError)
        if input_ranks is not None and (
            not isinstance(input_ranks, tuple)
            or not input_ranks
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 2 for r in input_ranks)
        ):
            raise argument_error("input_ranks", "None or a non-empty tuple of ints >= 2", input_ranks)
        super().__init__(
            num_features, (0, 2), epsilon, momentum, affine, axis_name=axis_name,
            axis_index_groups=axis_index_groups, mode=mode, name=name, **kwargs,
        )  # fmt: skip
        self.input_ranks, self.torch_class = input_ranks, torch_class
        self._frozen = frozen_statistics
        if self.num_batches_tracked is not None:  # saved whenever tracked, as PyTorch saves it
            self._non_persistent_buffers_set.discard("num_batches_tracked")

    @property
    def frozen_statistics(self) -> bool:
        """Whether training leaves the running statistics and the count as they are."""
        return self._frozen

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, training: bool | None = None) -> torch.Tensor:
        """``y`` for ``(N, C, *)`` input of a rank in ``input_ranks``: ``BatchNorm1d.forward``
        on the ``(N, C, L)`` view."""
        if not isinstance(x, torch.Tensor):
            return super().forward(x, mask, training)  # its check names the argument
        shape, c, ranks = tuple(x.shape), self.config.num_features, self.input_ranks
        if x.dim() < 2 or (ranks is not None and x.dim() not in ranks) or shape[1] != c:
            allowed = "a >= 2-D" if ranks is None else "a " + " or ".join(f"{r}-D" for r in ranks)
            raise argument_error("x", f"{allowed} input (N, C, ...) with num_features={c} on axis 1", shape)
        if x.dim() == 3:
            return super().forward(x, mask, training)
        kept_shape = shape[:1] + shape[2:]
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise argument_error("mask", "a boolean array of the same library as x", type(mask).__name__, TypeError)
            if tuple(mask.shape) != kept_shape:
                raise argument_error("mask", f"shape {kept_shape} (x's shape without the feature axis)", mask.shape)
            mask = mask.reshape(shape[0], math.prod(shape[2:]))
        y = super().forward(x.reshape(shape[0], c, math.prod(shape[2:])), mask, training)
        return y.reshape(shape)

    # -- checkpoints ---------------------------------------------------------------------
    @property
    def _checkpoint_config(self) -> BatchNormConfig:
        """``config`` with ``num_batches_tracked`` among its keys whenever tracked: the
        count's checks are those of ``momentum=None``, whose state holds it."""
        if not self.config.track_running_stats:
            return self.config
        return dataclasses.replace(self.config, momentum=None)

    def _checkpoint_entries(self, local: dict[str, Any], local_metadata: Mapping[str, Any]) -> dict[str, Any]:
        entries = dict(local)
        if "weight" in entries and "scale" not in entries:  # PyTorch's name
            entries["scale"] = entries.pop("weight")
        count = self.num_batches_tracked
        if count is not None and "num_batches_tracked" not in entries and self.config.momentum is not None:
            if entries or local_metadata.get("version", 2) < 2:  # PyTorch's rule: keep the current count
                entries["num_batches_tracked"] = count.detach().clone()
        return entries

    def _given_names(self, local: Mapping[str, Any]) -> dict[str, str]:
        return {"scale": "weight"} if "weight" in local and "scale" not in local else {}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load this layer's keys or PyTorch's. ``strict=True``: all of them;
        ``strict=False``: ``nn.Module``'s semantics, which relax only the keys (the
        entries present load, the missing and unexpected keys are returned). Either way
        the entries present are checked together before any is assigned, and a bad one
        is the same ``ValueError``/``TypeError`` naming it (R7.1, as
        ``BatchNorm1d.load_state_dict``), not PyTorch's ``RuntimeError``."""
        if not isinstance(strict, bool):
            raise argument_error("strict", "a bool", strict, TypeError)
        if not isinstance(assign, bool):
            raise argument_error("assign", "a bool", assign, TypeError)
        if not isinstance(state_dict, Mapping):
            raise argument_error("state_dict", "a mapping", type(state_dict).__name__, TypeError)
        if not strict:
            self._loading_itself = True  # _load_from_state_dict raises its error instead of reporting it
            try:
                return nn.Module.load_state_dict(self, state_dict, strict=False, assign=assign)
            finally:
                self._loading_itself = False
        names = self._given_names(state_dict)
        entries = self._checkpoint_entries(dict(state_dict), {})
        self._set_state(self._checked_state(entries, names), entries, assign)
        return _IncompatibleKeys([], [])

    @classmethod
    def from_torch(
        cls,
        module: nn.Module,
        axis: int | Sequence[int] = (0, 2),
        *,
        axis_name: str | None = None,
        process_group: Any = None,
        axis_index_groups: Any = None,
        **options: Any,
    ) -> ChannelFirstBatchNorm:
        """The layer :func:`convert_batchnorm` makes of ``module`` (an ``nn.BatchNorm1d``,
        ``2d``, ``3d`` or ``nn.SyncBatchNorm``; frozen statistics included), holding
        copies of its tensors (the module is left as it was). ``axis`` is ``(0, 2)``,
        the layout of this class; the keywords are :func:`convert_batchnorm`'s."""
        if not isinstance(module, tuple(TORCH_INPUT_RANKS)) or isinstance(module, BatchNorm1d):
            expected = "a torch.nn.BatchNorm1d, BatchNorm2d, BatchNorm3d or SyncBatchNorm"
            raise argument_error("module", expected, type(module).__name__, TypeError)
        if not (isinstance(axis, (tuple, list)) and tuple(axis) == (0, 2)):
            raise argument_error("axis", "(0, 2) (ChannelFirstBatchNorm's layout: features on axis 1)", axis)
        sync = _sync_arguments(axis_name, process_group, axis_index_groups, options)
        _convertible(module, "module")
        return _converted(cast(_BatchNorm, module), "module", sync, options, share=False)

    def to_torch(self) -> nn.BatchNorm1d:
        """``BatchNorm1d.to_torch``; frozen statistics as PyTorch keeps them
        (``track_running_stats = False`` on a module with its buffers)."""
        module = super().to_torch()
        if self._frozen:
            module.momentum, module.track_running_stats = getattr(self, "_torch_momentum", 0.0), False
        return module

    def extra_repr(self) -> str:
        frozen = ", frozen_statistics=True" if self._frozen else ""
        return (
            f"{super().extra_repr()}, input_ranks={self.input_ranks}, torch_class={self.torch_class.__name__}{frozen}"
        )


# -- conversion ------------------------------------------------------------------------------
def _where(name: str) -> str:
    return "model" if not name else f"model.{name}"


def _convertible(module: nn.Module, where: str) -> bool:
    if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
        raise argument_error(where, "initialised batch norms (run one forward pass first)", module)
    return isinstance(module, tuple(TORCH_INPUT_RANKS)) and not isinstance(module, BatchNorm1d)


def _sync_arguments(axis_name: Any, process_group: Any, axis_index_groups: Any, options: Mapping[str, Any]) -> dict:
    """The conversion's sync arguments, checked with ``options`` before any layer is built."""
    if "track_running_stats" in options:
        raise argument_error(
            "track_running_stats", "not given (each module's own is kept)", options["track_running_stats"], TypeError
        )
    if axis_name is None and axis_index_groups is not None:
        raise argument_error("axis_index_groups", "None when axis_name is None", axis_index_groups)
    return {"axis_name": axis_name, "process_group": process_group, "axis_index_groups": axis_index_groups}


def _torch_class(module: _BatchNorm) -> type[_BatchNorm]:
    return next(cls for cls in TORCH_INPUT_RANKS if isinstance(module, cls))


def _converted(
    module: _BatchNorm, where: str, sync: dict[str, Any], options: dict[str, Any], share: bool = True
) -> ChannelFirstBatchNorm:
    """The replacement of ``module``, holding its own parameter and buffer tensors
    (``share=False``: copies of them). Tracked means ``running_mean is not None``, as
    in PyTorch's forward; ``track_running_stats=False`` on a module with its buffers
    (frozen statistics) is a tracked layer with ``frozen_statistics`` and momentum
    1.0, PyTorch's momentum remembered for :func:`revert_batchnorm`."""
    if module.affine and module.bias is None:
        raise argument_error(where, "batch norms with a bias when affine (bn1d's affine layer has both)", module)
    reference = module.weight if module.affine else module.running_mean
    dtype = torch.float32 if reference is None else reference.dtype
    if dtype not in (torch.float32, torch.float64):
        raise argument_error(where, "float32 or float64 parameters and statistics", dtype, TypeError)
    torch_class = _torch_class(module)
    synced = torch_class is nn.SyncBatchNorm
    axis_name = sync["axis_name"] if sync["axis_name"] is not None or not synced else SYNC_AXIS_NAME
    process_group = sync["process_group"]
    if process_group is None and synced and axis_name is not None:
        process_group = cast(nn.SyncBatchNorm, module).process_group
    tracked = module.running_mean is not None
    frozen = tracked and not module.track_running_stats
    momentum = 1.0 if frozen else converted_momentum(module.momentum, getattr(module, "_bn1d_momentum", None))
    try:
        layer = ChannelFirstBatchNorm(
            module.num_features, module.eps, momentum, module.affine, axis_name=axis_name,
            axis_index_groups=sync["axis_index_groups"],
            mode=None if module.training else "inference", process_group=process_group,
            device=None if reference is None else reference.device, dtype=dtype,
            track_running_stats=tracked, input_ranks=TORCH_INPUT_RANKS[torch_class],
            torch_class=torch_class, frozen_statistics=frozen, **options,
        )  # fmt: skip
    except (TypeError, ValueError) as error:
        raise type(error)(f"{error} (converting {where}, a torch.nn.{torch_class.__name__})") from error

    def own(tensor: torch.Tensor) -> torch.Tensor:
        if share:
            return tensor
        copy = tensor.detach().clone()
        return nn.Parameter(copy, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else copy

    if module.affine:  # the module's own tensors: optimizers, tied weights and requires_grad carry over
        layer._parameters["scale"] = cast(nn.Parameter, own(cast(torch.Tensor, module.weight)))
        layer._parameters["bias"] = cast(nn.Parameter, own(cast(torch.Tensor, module.bias)))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        if module._buffers.get(key) is not None:
            layer._buffers[key] = own(cast(torch.Tensor, module._buffers[key]))
    layer.__dict__["_torch_momentum"] = module.momentum  # revert gives back PyTorch's momentum, every float
    layer.__dict__["_torch_track_running_stats"] = module.track_running_stats  # and its flag
    if hasattr(module, "qconfig"):
        layer.qconfig = module.qconfig
    return layer


def _replace_all(model: nn.Module, replacement: Any) -> nn.Module:
    """Every child that ``replacement(child, name)`` maps to a module replaced by it, at
    every place the child is registered (a module shared by two parents, or by one
    under two names, stays shared). All replacements are built before any is made."""
    built: dict[int, nn.Module] = {}
    sites = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent._modules.items():
            if child is None:
                continue
            if id(child) not in built:
                new = replacement(child, f"{parent_name}.{child_name}" if parent_name else child_name)
                if new is None:
                    continue
                built[id(child)] = new
            sites.append((parent, child_name, id(child)))
    root = replacement(model, "")
    for parent, child_name, key in sites:
        parent._modules[child_name] = built[key]
    return model if root is None else root


def convert_batchnorm(
    model: nn.Module,
    *,
    axis_name: str | None = None,
    process_group: Any = None,
    axis_index_groups: Any = None,
    **options: Any,
) -> nn.Module:
    """Replace every PyTorch batch norm of ``model``, recursively and in place, by a
    :class:`ChannelFirstBatchNorm` computing what it computes; return ``model`` (the
    replacement when ``model`` itself is one).

    Each keeps its module's parameters and buffers (the same tensors: device, dtype,
    ``requires_grad``), ``eps``, ``affine``, ``track_running_stats``, training flag
    and momentum (PyTorch's ``m`` is ``1 - m`` here, ``None`` stays the cumulative
    average). ``axis_name`` turns syncing on for every layer (over ``process_group``,
    WORLD by default, with ``axis_index_groups``); without it a ``nn.SyncBatchNorm``
    still syncs, over its own ``process_group``, and the others do not. ``options``
    go to every layer's constructor (``fast_variance``, ``unbiased_running_var``,
    ``timeout``, ``native_kernel``). Every replacement is built, and so every
    argument checked, before the model changes; an uninitialised lazy batch norm, a
    batch norm with ``bias=False`` or half-precision parameters is an error.
    """
    if not isinstance(model, nn.Module):
        raise argument_error("model", "a torch.nn.Module", type(model).__name__, TypeError)
    sync = _sync_arguments(axis_name, process_group, axis_index_groups, options)
    return _replace_all(
        model,
        lambda module, name: (
            _converted(module, _where(name), sync, options) if _convertible(module, _where(name)) else None
        ),
    )


def _reverted(layer: BatchNorm1d, name: str) -> _BatchNorm:
    """PyTorch's module for a bn1d layer with features on axis 1, holding its tensors."""
    config, where = layer.config, _where(name)
    if isinstance(layer, ChannelFirstBatchNorm):
        torch_class: type[_BatchNorm] = layer.torch_class
    elif config.feature_axis == 1 and config.ndim in (2, 3):
        torch_class = nn.BatchNorm1d
    else:
        given = f"features on axis {config.feature_axis} of a {config.ndim}-D input"
        raise argument_error(where, "bn1d layers with features on axis 1 (PyTorch's layout)", given)
    for option in ("fast_variance", "unbiased_running_var"):
        default = option == "unbiased_running_var"
        if getattr(config, option) != default:
            raise argument_error(where, f"{option}={default} (PyTorch's batch norms have no other)", layer)
    reference = layer._reference()
    factory: dict[str, Any] = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    frozen = isinstance(layer, ChannelFirstBatchNorm) and layer.frozen_statistics
    remembered = getattr(layer, "_torch_momentum", None)
    momentum = getattr(layer, "_torch_momentum", 0.0) if frozen else converted_momentum(config.momentum, remembered)
    args = (config.num_features, config.epsilon, momentum, config.affine, config.track_running_stats)
    if torch_class is nn.SyncBatchNorm:
        module: _BatchNorm = nn.SyncBatchNorm(*args, process_group=layer.process_group, **factory)
    else:
        module = torch_class(*args, **factory)
    # The flag as the module had it: False with frozen statistics; True on a module without buffers.
    module.track_running_stats = bool(getattr(layer, "_torch_track_running_stats", config.track_running_stats))
    if frozen:
        module.track_running_stats = False
    module.__dict__["_bn1d_momentum"] = config.momentum  # convert gives back bn1d's momentum, every float
    if config.affine:
        module._parameters["weight"], module._parameters["bias"] = layer._parameters["scale"], layer._parameters["bias"]
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        if layer._buffers.get(key) is not None:
            module._buffers[key] = layer._buffers[key]
    module.train(layer.training)
    module.register_load_state_dict_pre_hook(_bn1d_names)
    return module


def _bn1d_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """A reverted module's load hook: bn1d's ``scale`` is PyTorch's ``weight``."""
    if prefix + "scale" in state_dict and prefix + "weight" not in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(prefix + "scale")


def revert_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every bn1d layer of ``model`` with features on axis 1, recursively and in
    place, by PyTorch's class: a :class:`ChannelFirstBatchNorm` by the class it was
    converted from, a ``BatchNorm1d`` with ``axis=(0, 2)`` or ``0`` by
    ``nn.BatchNorm1d``. Each keeps the layer's tensors, training flag, ``eps``,
    ``affine``, ``track_running_stats`` and momentum (``1 - m``); a converted
    ``nn.SyncBatchNorm`` keeps its ``process_group``, the others drop the sync (for
    export and inference, which do not sync). Reverted modules load bn1d checkpoints
    (``scale`` for ``weight``). Any other bn1d layer (features last, ``fast_variance``,
    biased running variance) is a ``ValueError`` naming it, before the model changes.
    Returns ``model`` (the replacement when ``model`` itself is a layer)."""
    if not isinstance(model, nn.Module):
        raise argument_error("model", "a torch.nn.Module", type(model).__name__, TypeError)
    return _replace_all(
        model, lambda module, name: _reverted(module, name) if isinstance(module, BatchNorm1d) else None
    )


# -- running statistics across ranks -----------------------------------------------------------
def sync_running_statistics(
    model: nn.Module, *, how: str = "mean", src: int = 0, process_group: Any = None, timeout: float | None = None
) -> nn.Module:
    """Make the running statistics of every batch norm of ``model`` (bn1d's layers and
    PyTorch's) identical on every rank of ``process_group`` (WORLD by default), e.g.
    before evaluating a model trained with unsynced layers and DDP's
    ``broadcast_buffers=False``. ``how="mean"``: each running mean and variance
    becomes its mean over the ranks (timm's ``distribute_bn``; the mean of the
    variances, not the variance of all the data) and each count its mean, rounded;
    ``"broadcast"``: rank ``src`` of the group's. One collective per device; every
    rank must call it. Returns ``model``."""
    from . import torch_distributed

    check_process_group(process_group)
    if not isinstance(model, nn.Module):
        raise argument_error("model", "a torch.nn.Module", type(model).__name__, TypeError)
    timeout = check_timeout(timeout)
    if how not in ("mean", "broadcast"):
        raise argument_error("how", "'mean' or 'broadcast'", how)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise argument_error("process_group", "an initialised torch.distributed", process_group, RuntimeError)
    group = cast(
        torch.distributed.ProcessGroup, torch.distributed.group.WORLD if process_group is None else process_group
    )
    size = torch_distributed.group_size(group)
    if not isinstance(src, int) or isinstance(src, bool) or not 0 <= src < size:
        raise argument_error("src", f"a rank of the group, in [0, {size})", src)
    tensors: dict[torch.device, list[torch.Tensor]] = {}
    for module in model.modules():
        if isinstance(module, (BatchNorm1d, _NormBase)):
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                value = module._buffers.get(key)
                if value is not None:
                    tensors.setdefault(value.device, []).append(value)
    with torch.no_grad():
        for values in tensors.values():
            flat = torch.cat([v.reshape(-1).to(torch.float64) for v in values])
            if how == "mean":
                flat = torch_distributed.all_reduce_sum(flat, group, timeout, "the mean of running statistics") / size
            else:
                work = torch.distributed.broadcast(
                    flat, torch.distributed.get_global_rank(group, src), group=group, async_op=True
                )
                torch_distributed._wait(work, timeout, "the broadcast of running statistics", group)
            for value, part in zip(values, flat.split([v.numel() for v in values])):
                value.copy_((part.round() if not value.is_floating_point() else part).reshape(value.shape))
    return model
