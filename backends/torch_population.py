"""Exact population statistics for a PyTorch model's batch norms (PreciseBN, done exactly).

:func:`recompute_statistics` runs a model over batches of data and writes, as every batch
norm's running statistics, the pooled mean and (unbiased, R3.3) variance of everything
that layer saw: ``bn1d.population.PopulationStatistics``, count-weighted with the spread
between batch means counted (``docs/population.md``). Every batch norm is found by what
it is: PyTorch's (``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, the lazy ones once
initialised), bn1d's drop-ins (their subclasses) and bn1d's BrainPy-signature
``BatchNorm1d``; a stock model gains without converting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from bn1d.config import argument_error
from bn1d.population import PopulationStatistics, check_pass, input_picker, progress_step

from . import torch_distributed

__all__ = ["recompute_statistics"]


def _norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The batch norms of ``model`` with running statistics, by name (each module once)."""
    found = []
    for name, module in model.named_modules():
        tracked = module._buffers.get("running_mean") is not None and module._buffers.get("running_var") is not None
        if tracked and (isinstance(module, _NormBase) or hasattr(module, "config")):
            found.append((name or "model", module))
    return found


def _reduce_axes(module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """The axes a layer's statistics reduce on input ``x``: features on axis 1 for
    PyTorch's signature, the config's for BrainPy's."""
    config = getattr(module, "config", None)
    if config is not None and not isinstance(module, _NormBase):
        return tuple(config.reduce_axes)
    return (0, *range(2, x.dim()))


def recompute_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    input: Callable[[Any], Any] | None = None,
    limit: int | None = None,
    device: Any = None,
    progress: bool | Callable[[int], None] = False,
    sync: Any = False,
    timeout: float | None = None,
) -> nn.Module:
    """Set every batch norm's running statistics of ``model`` to the exact statistics of
    its inputs over ``batches``.

    Parameters
    ----------
    model : torch.nn.Module
        Any model; its batch norms are found by class (module docstring).
    batches : iterable
        A ``DataLoader`` or any iterable: tensors, ``(input, ...)`` tuples, or anything
        ``input`` picks the model's input from.
    input : callable, optional
        ``batch -> model input`` (e.g. ``lambda b: b["image"]``).
    limit : int, optional
        At most this many batches.
    device : optional
        Where each input is moved before the forward pass (as ``update_bn``'s).
    progress : bool or callable, optional
        ``True``: a ``tqdm`` bar when tqdm is installed; a callable: called with the
        number of batches done after each.
    sync : bool or ProcessGroup, optional
        ``True`` (WORLD) or a process group: every rank passes its own batches and all get
        the statistics of every rank's batches, from one all-gather of every layer's
        accumulated row at the end (none per batch). Every rank of the group must call
        it; a rank may have no batch.
    timeout : float, optional
        Seconds that all-gather may wait (``None``: the group's).

    Returns
    -------
    torch.nn.Module
        ``model``, its running statistics replaced: the mean and unbiased variance (R3.3)
        of every value each layer saw, pooled over the batches (``docs/population.md``).

    Raises
    ------
    TypeError, ValueError
        For a bad argument, a batch it cannot take, or no batch at all, before any
        statistic changes.

    Notes
    -----
    The model runs in training mode, as ``torch.optim.swa_utils.update_bn`` and PreciseBN
    run it: each batch norm sees the activations of earlier layers normalised by that
    batch's statistics, and all layers are recomputed in one pass. For the pass, a batch
    norm of PyTorch's signature computes each batch's moments once (:func:`_shifted_moments`
    where PyTorch's kernel sums in float64, else the core's), accumulates them and
    normalises with them, exactly and without syncing. Nothing else changes: the
    parameters, each module's ``training`` flag and ``forward``, ``num_batches_tracked`` and
    the momentum are as they were; no gradient is taken.
    """
    if not isinstance(model, nn.Module):
        raise argument_error("model", "a torch.nn.Module", type(model).__name__, TypeError)
    check_pass(input, limit, progress)
    group = _group(sync)
    seconds = torch_distributed.check_timeout(timeout)
    pick = input_picker(input, (torch.Tensor,), "tensors")
    norms = _norms(model)
    stats: dict[str, PopulationStatistics] = {}

    def accumulator(name: str, module: nn.Module, x: torch.Tensor) -> PopulationStatistics:
        if name not in stats:
            features = x.shape[1] if isinstance(module, _NormBase) else cast(Any, module).config.num_features
            stats[name] = PopulationStatistics(int(features), _reduce_axes(module, x))
        return stats[name]

    def capture(name: str) -> Callable[..., None]:  # BrainPy's signature: a pre-hook, then its own forward
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0]
            mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
            accumulator(name, module, x).update(x.detach(), None if mask is None else mask.detach())

        return hook

    def pooling(name: str, module: Any) -> Callable[..., torch.Tensor]:  # PyTorch's signature: moments once
        forward = type(module).forward

        def pooled(input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            if mask is None and _kernel_moments(input):
                shifted, shift, offset, var = _shifted_moments(input)
                n = input.numel() // input.shape[1]
                wide = torch.float64
                accumulator(name, module, input).add(n, shift.to(wide), offset.to(wide), var.to(wide) * n)
                return torch.batch_norm(shifted, module.weight, module.bias, offset, var, False, 0.0, module.eps, False)
            accumulator(name, module, input).update(input.detach(), None if mask is None else mask.detach())
            return forward(module, input) if mask is None else forward(module, input, mask)

        return pooled

    saved = {m: {k: v.clone() for k, v in m._buffers.items() if v is not None} for _, m in norms}
    modes = {m: m.training for m in model.modules()}
    handles = [module.register_forward_pre_hook(capture(name), with_kwargs=True)
               for name, module in norms if not isinstance(module, _NormBase)]  # fmt: skip
    replaced = {module: module.__dict__.get("forward") for _, module in norms if isinstance(module, _NormBase)}
    for name, module in norms:
        if module in replaced:
            module.__dict__["forward"] = pooling(name, module)
    step, bar = progress_step(progress, limit)
    done = 0
    try:
        model.train()
        with torch.no_grad():
            for batch in batches:
                if limit is not None and done >= limit:
                    break
                x = pick(batch)
                model(x if device is None else x.to(device))
                done += 1
                step(done)
    finally:
        for handle in handles:
            handle.remove()
        for module, own in replaced.items():
            if own is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = own
        for module, training in modes.items():
            module.training = training
        with torch.no_grad():  # the pass's own updates undone: only the pooled statistics are written
            for module, buffers in saved.items():
                for key, value in buffers.items():
                    module._buffers[key].copy_(value)  # type: ignore[union-attr]
        if bar is not None:
            bar.close()
    if group is not None:
        stats = _gathered(norms, stats, group, seconds)
    if not stats:
        raise argument_error("batches", "at least one batch" + (" on some rank" if group is not None else ""), "none")
    with torch.no_grad():
        for name, module in norms:
            if name in stats:
                mean, var = module._buffers["running_mean"], module._buffers["running_var"]
                mean.copy_(stats[name].mean.to(mean.dtype))  # type: ignore[union-attr]
                var.copy_(stats[name].running_var.to(var.dtype))  # type: ignore[union-attr]
    return model


def _kernel_moments(x: Any) -> bool:
    """Whether PyTorch's statistics kernel sums ``x`` in float64: a contiguous channel-first
    float32 or float64 CPU tensor with a spatial extent (``torch_kernels``' accumulation
    model; 2-D and channels-last input it sums in float32)."""
    return (
        type(x) is torch.Tensor and x.is_cpu and x.dtype in (torch.float32, torch.float64) and x.dim() > 2
        and x.numel() > 0 and math.prod(x.shape[2:]) > 1 and x.is_contiguous()
    )  # fmt: skip


def _shifted_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x - K`` for ``K`` each feature's first value, ``K``, and the mean and biased variance
    of ``x - K`` by PyTorch's kernel: exact sums of values that do not cancel (``x - K`` is
    exact where ``|mean| >> std``, Sterbenz), each rounded once to ``x``'s dtype, a relative
    ``u`` of ``std``: within R2.7 at any ``|mean| / std``."""
    c = x.shape[1]
    shift = x[0].reshape(c, -1)[:, 0]
    shifted = x - shift.view(1, c, *([1] * (x.dim() - 2)))
    offset, var = torch.ops.aten.batch_norm_update_stats(shifted, None, None, 0.0)
    return shifted, shift, offset, var


def _group(sync: Any) -> Any:
    """The process group to pool over, or ``None`` (no sync, or nothing to sync with)."""
    if torch_distributed.check_sync(sync) is False:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    group = torch.distributed.group.WORLD if sync is True else sync
    return group if torch_distributed.group_size(group) > 1 else None


def _gathered(
    norms: list[tuple[str, nn.Module]], stats: dict[str, PopulationStatistics], group: Any, timeout: float | None
) -> dict[str, PopulationStatistics]:
    """Every rank's accumulators, merged in rank order: one all-gather of each layer's row
    ``(count, shift, mean - shift, squared deviations)`` in float64 (a layer a rank never
    called sends a count of 0)."""
    parts = []
    for name, module in norms:
        c = module._buffers["running_mean"].numel()  # type: ignore[union-attr]
        row = stats[name]._total() if name in stats else None
        if row is None:
            parts.append(torch.zeros(1 + 3 * c, dtype=torch.float64))
        else:
            parts.append(torch.cat([torch.as_tensor(v, dtype=torch.float64).reshape(-1).cpu() for v in row]))
    device = next((b.device for _, m in norms for b in m.buffers()), torch.device("cpu"))
    local = torch.cat(parts).to(device) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    rows = torch_distributed.all_gather_rows(local, group, timeout, "the gather of population statistics").cpu()
    merged: dict[str, PopulationStatistics] = {}
    start = 0
    for name, module in norms:
        c = module._buffers["running_mean"].numel()  # type: ignore[union-attr]
        width = 1 + 3 * c
        for rank_row in rows[:, start : start + width]:
            if float(rank_row[0]) > 0:  # a rank's total: one row, as a batch's moments
                merged.setdefault(name, PopulationStatistics(c, axis=0)).add(rank_row[0], *rank_row[1:].reshape(3, c))
        start += width
    return merged
