"""Drop-in batch norms for PyTorch: PyTorch's own classes, computing bn1d's exact statistics.

Change one import and a model computes with bn1d::

    from torch.nn import BatchNorm2d          # before
    from bn1d.backends.torch_nn import BatchNorm2d   # after

:class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`, :class:`SyncBatchNorm` and
the lazy variants subclass ``torch.nn``'s: the same constructor, attributes, parameters,
buffers, ``state_dict`` keys and version, ``extra_repr`` and resets, and each call reads
``momentum``, ``eps``, ``track_running_stats`` and ``training`` as PyTorch's does. Tools that
find batch norms by ``isinstance`` see them, and checkpoints load either way with ``strict=True``.

The arithmetic is :func:`bn1d.backends.torch_functional.batch_norm`'s (R2.7: within 1e-5
of float64 on raw data, which PyTorch's kernels miss at large ``|mean| / std``:
``docs/accuracy.md``). bn1d's extras: ``forward(input, mask=None)`` (R5), and the
keyword-only ``sync`` (``True`` or a process group) and ``timeout`` of ``BatchNorm1d/2d/3d``,
syncing over ``torch.distributed`` on the CPU too (DDP refuses any ``SyncBatchNorm`` in a
CPU module). The constructors check their arguments (R7.1), which PyTorch's do not;
``docs/decisions.md`` lists every deviation. :func:`convert_batchnorm` and
:func:`revert_batchnorm` swap a model's classes in place; :func:`sync_running_statistics`
makes running statistics identical across ranks. ``docs/torch-models.md`` is the guide.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, List, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase, _NormBase
from torch.overrides import has_torch_function

from bn1d.config import argument_error, check_real, is_int

from . import torch_distributed
from .torch_distributed import Sync, check_process_group, check_sync, check_timeout
from .torch_functional import batch_norm
from .torch_kernels import float64_forward

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "convert_batchnorm",
    "revert_batchnorm",
    "sync_running_statistics",
]


def _stock_class(cls: type) -> Any:
    """The ``torch.nn`` class a drop-in stands for (the first of ``torch.nn`` in its MRO)."""
    return next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn."))


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    """The constructor signature of ``cls``'s ``torch.nn`` class (its arguments are checked against it)."""
    return inspect.signature(_stock_class(cls).__init__)


def check_arguments(arguments: dict[str, Any], lazy: bool = False) -> None:
    """PyTorch's batch-norm arguments checked (R7.1): ``num_features`` a positive int
    (0: a lazy module's placeholder), ``eps`` a finite float > 0, ``momentum`` ``None`` or
    a float in [0, 1], the flags bools, ``process_group`` ``None`` or a process group."""
    if "num_features" in arguments:
        c = arguments["num_features"]
        if not is_int(c):
            raise argument_error("num_features", "a positive int", c, TypeError)
        if int(c) < (0 if lazy else 1):
            raise argument_error("num_features", "a positive int", c)
    check_real("eps", arguments.get("eps", 1e-5), "a finite float > 0", 0.0, math.inf, open_low=True)
    if (momentum := arguments.get("momentum", 0.1)) is not None:
        check_real("momentum", momentum, "None or a float in [0, 1]", 0.0, 1.0)
    for flag in ("affine", "track_running_stats", "bias"):
        if not isinstance(arguments.get(flag, True), bool):
            raise argument_error(flag, "a bool", arguments[flag], TypeError)
    check_process_group(arguments.get("process_group"))


#: The attributes a drop-in adds to its ``torch.nn`` class's: ``sync`` and ``timeout`` (its
#: extras) and the :class:`Sync` a synced layer keeps between calls.
_EXTRAS = ("sync", "timeout", "_bn1d_sync")


class _Exact(_BatchNorm):
    """What every drop-in adds to its ``torch.nn`` class: the checked constructor and the
    forward through bn1d's :func:`~bn1d.backends.torch_functional.batch_norm`, with
    PyTorch's decisions (batch or running statistics, which buffers to update, the count)."""

    def __init__(self, *args: Any, sync: Any = False, timeout: float | None = None, **kwargs: Any) -> None:
        try:
            bound = _signature(cast(Any, type(self))).bind(self, *args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{type(self).__name__}: {error}") from None
        check_arguments(dict(bound.arguments), lazy=isinstance(self, _LazyNormBase))
        check_sync(sync)
        seconds = check_timeout(timeout)
        super().__init__(*args, **kwargs)
        self.sync, self.timeout = sync, seconds

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``y`` for ``input`` ``(N, C, *)``; ``mask``: bn1d's (R5), ``input``'s shape without
        axis 1 (a second argument, not keyword-only: TorchScript takes no keyword-only one)."""
        if torch.jit.is_scripting():
            return self._scripted_forward(input, mask)
        return self._exact_forward(input, mask)

    @torch.jit.unused
    def _exact_forward(self, input: Tensor, mask: Optional[Tensor]) -> Tensor:
        if isinstance(input, torch.fx.Proxy):  # torch.fx: this layer is one call_module node, as PyTorch's
            tracer = input.tracer  # (its mode, momentum and eps are then read when the graph runs)
            kwargs = {} if mask is None else {"mask": mask}
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (input,), kwargs)
        if isinstance(input, torch.Tensor):
            self._check_input_dim(input)
        elif not has_torch_function((input,)):  # R7.1, before PyTorch's dimension check reads input.dim()
            raise argument_error("input", "a torch.Tensor", type(input).__name__, TypeError)
        training, tracking = self.training, self.track_running_stats
        sync = None
        if training:  # the group a training call syncs over: SyncBatchNorm's, or the drop-in's ``sync``
            chosen = self.process_group if isinstance(self, nn.SyncBatchNorm) else self.__dict__.get("sync", False)
            if chosen is not False:
                sync = self._sync_over(None if chosen is True else chosen)
        buffers, parameters = self._buffers, self._parameters
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        return batch_norm(
            input,
            running_mean if not training or tracking else None,
            running_var if not training or tracking else None,
            parameters["weight"],
            parameters["bias"],
            training or (running_mean is None and running_var is None),
            self.momentum,
            self.eps,
            num_batches_tracked=buffers["num_batches_tracked"] if training and tracking else None,
            mask=mask,
            sync=sync,
        )

    def _scripted_forward(self, input: Tensor, mask: Optional[Tensor]) -> Tensor:
        """The forward TorchScript compiles (``torch.jit.script``; the eager forward is
        Python it cannot type): bn1d's numbers from operations it can, unsynced and without
        a mask. Inference centres on the running mean before PyTorch's kernel (whose
        ``x * a + b`` would otherwise round at ``|running_mean| / std``); batch statistics
        are float64 reductions of the input, ``y`` formed in float64 and rounded once."""
        if mask is not None:
            raise ValueError("mask: expected None under TorchScript (bn1d's masks run eagerly, compiled or exported)")
        self._check_input_dim(input)
        running_mean, running_var, weight, bias = self.running_mean, self.running_var, self.weight, self.bias
        shape: List[int] = [1, -1] + [1] * (input.dim() - 2)
        if not self.training and running_mean is not None and running_var is not None:
            centred = input - running_mean.view(shape)
            y = F.batch_norm(centred, torch.zeros_like(running_mean), running_var, weight, bias, False, 0.0, self.eps)
            return y.to(input.dtype)
        n = input.numel() // input.size(1)
        if n <= 1:
            raise ValueError(f"input: expected more than 1 value per channel when training, got {input.shape}")
        y64, mean, var = float64_forward(input, weight, bias, self.eps)
        count = self.num_batches_tracked
        if self.training and self.track_running_stats and running_mean is not None and running_var is not None:
            factor = 0.0 if self.momentum is None else float(self.momentum)
            if count is not None:
                count.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(count.item())
            with torch.no_grad():
                new_mean = torch.lerp(running_mean.double(), mean.detach(), factor)
                new_var = torch.lerp(running_var.double(), var.detach() * (n / (n - 1)), factor)
                running_mean.copy_(new_mean.to(running_mean.dtype))
                running_var.copy_(new_var.to(running_var.dtype))
        return y64.to(input.dtype)

    def _sync_over(self, process_group: Any) -> Sync | None:
        """The :class:`Sync` over ``process_group`` (``None``: WORLD), kept between calls, or
        ``None`` where there is nothing to sync with (as ``nn.SyncBatchNorm``: no initialised
        ``torch.distributed``, or a group of one rank)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        group = process_group if process_group else torch.distributed.group.WORLD
        if torch.distributed.get_world_size(group) <= 1:
            return None
        kept = self.__dict__.get("_bn1d_sync")
        timeout = self.__dict__.get("timeout")
        if kept is None or kept.process_group is not group or kept.timeout != timeout:
            kept = self.__dict__["_bn1d_sync"] = Sync(group, None, timeout)
        return kept

    def __getstate__(self) -> dict[str, Any]:
        """The module's state for ``copy.deepcopy`` and pickle, without the :class:`Sync` it
        keeps between calls (a cache holding a process group, which does not pickle)."""
        state = super().__getstate__()
        state.pop("_bn1d_sync", None)
        return state


class BatchNorm1d(_Exact, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computing bn1d's exact statistics: ``(N, C)`` or ``(N, C, L)``
    input. See the module docstring."""


class BatchNorm2d(_Exact, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computing bn1d's exact statistics: ``(N, C, H, W)`` input."""


class BatchNorm3d(_Exact, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computing bn1d's exact statistics: ``(N, C, D, H, W)`` input."""


class LazyBatchNorm1d(_Exact, nn.LazyBatchNorm1d):
    """``torch.nn.LazyBatchNorm1d``; becomes bn1d's :class:`BatchNorm1d` once initialised."""

    cls_to_become = BatchNorm1d  # type: ignore[assignment]


class LazyBatchNorm2d(_Exact, nn.LazyBatchNorm2d):
    """``torch.nn.LazyBatchNorm2d``; becomes bn1d's :class:`BatchNorm2d` once initialised."""

    cls_to_become = BatchNorm2d  # type: ignore[assignment]


class LazyBatchNorm3d(_Exact, nn.LazyBatchNorm3d):
    """``torch.nn.LazyBatchNorm3d``; becomes bn1d's :class:`BatchNorm3d` once initialised."""

    cls_to_become = BatchNorm3d  # type: ignore[assignment]


class SyncBatchNorm(_Exact, nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` computing bn1d's exact statistics over the ranks of
    ``process_group`` (WORLD by default): count-weighted and exact (R4), on any device and
    backend (gloo on the CPU, which PyTorch's refuses), with ``timeout`` (keyword-only,
    seconds; ``None``: the group's) bounding each collective. It syncs where PyTorch's
    does: training calls, with ``torch.distributed`` initialised and more than one rank.
    :meth:`convert_sync_batchnorm` makes these (PyTorch's makes its own)."""

    def __init__(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> None:
        if "sync" in kwargs:  # even False: it would read as "no sync"
            raise argument_error(
                "sync", "not given (SyncBatchNorm syncs over its process_group)", kwargs["sync"], TypeError
            )
        super().__init__(*args, timeout=timeout, **kwargs)

    @classmethod
    def convert_sync_batchnorm(
        cls, module: nn.Module, process_group: Any = None, *, timeout: float | None = None
    ) -> nn.Module:
        """PyTorch's ``convert_sync_batchnorm``, making bn1d's :class:`SyncBatchNorm`: every
        batch norm of ``module`` (PyTorch's or bn1d's) becomes one, holding the same tensors
        (a new module object; ``module`` is returned with its children replaced, or the
        replacement when it is a batch norm itself). ``timeout``: each layer's."""
        check_process_group(process_group)
        check_timeout(timeout)

        def replacement(child: nn.Module, where: str) -> nn.Module | None:
            if not isinstance(child, _BatchNorm):
                return None
            if isinstance(child, _LazyNormBase) and child.has_uninitialized_params():
                raise argument_error(where, "initialised batch norms (run one forward pass first)", child)
            layer = cls(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                process_group, bias=child.bias is not None, device="meta", timeout=timeout,
            )  # fmt: skip
            layer._parameters.update(child._parameters)
            layer._buffers.update(child._buffers)
            layer.training = child.training
            if hasattr(child, "qconfig"):
                layer.qconfig = child.qconfig
            return layer

        return _replace_all(module, replacement)


_DROP_INS: dict[type[_BatchNorm], type[_BatchNorm]] = {
    _stock_class(cls): cls
    for cls in (BatchNorm1d, BatchNorm2d, BatchNorm3d, LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d, SyncBatchNorm)
}
_STOCK_OF = {drop_in: stock for stock, drop_in in _DROP_INS.items()}


# -- whole models ------------------------------------------------------------------------------------
def _where(name: str) -> str:
    return "model" if not name else f"model.{name}"


def _replace_all(model: nn.Module, replacement: Any) -> nn.Module:
    """Every module that ``replacement(module, where)`` maps to a module replaced by it, at
    every place it is registered (a module shared by two parents stays shared). All
    replacements are built, and so every error raised, before any is made."""
    built: dict[int, nn.Module] = {}
    sites = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is None:
                continue
            if id(child) not in built:
                new = replacement(child, _where(f"{parent_name}.{child_name}" if parent_name else child_name))
                if new is None:
                    continue
                built[id(child)] = new
            sites.append((parent, child_name, id(child)))
    root = replacement(model, "model")
    for parent, child_name, key in sites:
        parent._modules[child_name] = built[key]
    return model if root is None else root


def convert_batchnorm(model: nn.Module, *, sync: Any = False, timeout: float | None = None) -> nn.Module:
    """Make every PyTorch batch norm of ``model`` (``nn.BatchNorm1d/2d/3d``,
    ``nn.SyncBatchNorm`` and the lazy ones; subclasses of them are left alone) bn1d's
    drop-in of the same class, in place: each module object stays, its class becomes the
    drop-in, so its tensors, flags, hooks, ``requires_grad`` and every reference to it
    (optimizers, parents sharing it) carry over. ``sync`` (``True``: over WORLD, or a
    process group) makes every converted ``BatchNorm1d/2d/3d`` sync its training
    statistics, on the CPU with DDP too (which refuses any ``SyncBatchNorm`` there);
    ``timeout``: seconds each of their collectives may wait; both also reach the layers that
    are drop-ins already. Every module and argument is checked before any changes (R7.1).
    Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise argument_error("model", "a torch.nn.Module", type(model).__name__, TypeError)
    check_sync(sync)
    seconds = check_timeout(timeout)
    found = [(name, m) for name, m in model.named_modules() if type(m) in _DROP_INS]
    already = [m for m in model.modules() if type(m) in _STOCK_OF]  # built as drop-ins: the keywords reach them too
    for name, module in found:
        arguments = {key: getattr(module, key) for key in ("eps", "momentum", "affine", "track_running_stats")}
        try:
            check_arguments(arguments)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{_where(name)} ({type(module).__name__}): {error}") from None
    for _, module in found:
        module.__class__ = _DROP_INS[type(module)]
    for module in [m for _, m in found] + (already if sync is not False or seconds is not None else []):
        module.__dict__["timeout"] = seconds
        if not isinstance(module, nn.SyncBatchNorm):
            module.__dict__["sync"] = sync
    return model


def revert_batchnorm(model: nn.Module) -> nn.Module:
    """Turn bn1d's layers of ``model`` back into PyTorch's, in place: each drop-in becomes
    its ``torch.nn`` class (the same module object), each BrainPy-signature
    ``bn1d.backends.torch.BatchNorm1d`` with features on axis 1 is replaced by its
    ``to_torch()`` (the same tensors are not kept there: it is another layout). Every
    layer is checked before any changes. Returns ``model`` (the replacement when
    ``model`` itself is a BrainPy-signature layer)."""
    if not isinstance(model, nn.Module):
        raise argument_error("model", "a torch.nn.Module", type(model).__name__, TypeError)
    drop_ins = [m for m in model.modules() if type(m) in _STOCK_OF]  # a subclass of a drop-in is the user's
    replaced = _replace_all(
        model,
        lambda module, where: _reverted_layer(module, where) if hasattr(module, "to_torch") else None,
    )
    for module in drop_ins:
        module.__class__ = _STOCK_OF[type(module)]  # type: ignore[index]
        for key in _EXTRAS:
            module.__dict__.pop(key, None)
    return replaced


def _reverted_layer(layer: Any, where: str) -> nn.Module:
    """PyTorch's ``nn.BatchNorm1d`` for a BrainPy-signature layer in PyTorch's layout."""
    config = layer.config
    if config.feature_axis != 1 or config.ndim > 3:
        raise argument_error(where, "features on axis 1 (PyTorch's layout)", f"axis={config.reduce_axes}")
    try:
        return cast(nn.Module, layer.to_torch())
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None


# -- running statistics across ranks -----------------------------------------------------------
def sync_running_statistics(
    model: nn.Module, *, how: str = "mean", src: int = 0, process_group: Any = None, timeout: float | None = None
) -> nn.Module:
    """Make the running statistics of every batch norm of ``model`` (every module with
    ``running_mean``/``running_var`` buffers: bn1d's and PyTorch's) identical on every rank
    of ``process_group`` (WORLD by default), e.g. before evaluating a model trained with
    unsynced layers and DDP's ``broadcast_buffers=False``. ``how="mean"``: each running mean
    and variance becomes its mean over the ranks (timm's ``distribute_bn``; the mean of the
    variances, not the variance of all the data) and each count its mean, rounded;
    ``"broadcast"``: rank ``src`` of the group's. One collective per device; every rank must
    call it. Returns ``model``."""
    check_process_group(process_group)
    if not isinstance(model, nn.Module):
        raise argument_error("model", "a torch.nn.Module", type(model).__name__, TypeError)
    timeout = check_timeout(timeout)
    if how not in ("mean", "broadcast"):
        raise argument_error("how", "'mean' or 'broadcast'", how)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise argument_error("process_group", "an initialised torch.distributed", process_group, RuntimeError)
    group = torch.distributed.group.WORLD if process_group is None else process_group
    size = torch_distributed.group_size(group)
    if not isinstance(src, int) or isinstance(src, bool) or not 0 <= src < size:
        raise argument_error("src", f"a rank of the group, in [0, {size})", src)
    tensors: dict[torch.device, list[torch.Tensor]] = {}
    for module in model.modules():
        if isinstance(module, _NormBase) or "running_var" in module._buffers:
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
                root = torch.distributed.get_global_rank(cast(Any, group), src)
                work = torch.distributed.broadcast(flat, root, group=group, async_op=True)
                torch_distributed._wait(work, timeout, "the broadcast of running statistics", group)
            for value, part in zip(values, flat.split([v.numel() for v in values])):
                value.copy_((part.round() if not value.is_floating_point() else part).reshape(value.shape))
    return model
