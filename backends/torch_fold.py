"""Folding PyTorch batch norms into the layer before them, for inference and export.

:func:`fold_batchnorm` merges one inference batch norm into the ``Linear``, ``Conv1d/2d/3d``
or ``ConvTranspose1d/2d/3d`` before it; :func:`fold_model` folds every such pair of a model,
found through ``torch.fx`` and checked against the shapes of an example input. Both take
PyTorch's batch norms and bn1d's drop-ins (their subclasses), so a stock model folds as a
converted one does. The folded weights are computed in float64 by
:func:`bn1d.folding.fold_affine` and rounded once to the layer's dtype; its docstring
derives what a fold costs in accuracy and ``docs/deployment.md`` measures it.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from bn1d.config import argument_error
from bn1d.folding import fold_affine

__all__ = ["fold_batchnorm", "fold_model"]

_LAYERS = "a torch.nn.Linear, Conv1d/2d/3d or ConvTranspose1d/2d/3d"


def _outputs(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels  # type: ignore[return-value]


def _check_pair(layer: Any, norm: Any) -> None:
    """R7.1's errors for a pair that cannot fold, before anything is built."""
    if not isinstance(layer, (nn.Linear, _ConvNd)):
        raise argument_error("layer", _LAYERS, type(layer).__name__, TypeError)
    if not isinstance(norm, _NormBase):
        raise argument_error("norm", "a batch norm (torch.nn.BatchNorm1d/2d/3d, SyncBatchNorm or a drop-in)",
                             type(norm).__name__, TypeError)  # fmt: skip
    if any(
        isinstance(p, nn.parameter.UninitializedParameter) or p.is_meta
        for p in (*layer.parameters(), *norm.parameters())
    ):
        raise argument_error("layer", "initialised parameters with values (not lazy or on the meta device)", layer)
    if norm.training:
        raise argument_error("norm", "a batch norm in inference mode (call .eval() first)", "training=True")
    if norm.running_mean is None or norm.running_var is None:
        raise argument_error("norm", "running statistics (inference without them uses each batch's)", None)
    if norm.running_mean.is_meta:
        raise argument_error("norm", "running statistics with values (not on the meta device)", norm.running_mean)
    if _outputs(layer) != norm.num_features:
        raise argument_error("norm", f"num_features={_outputs(layer)} (the layer's outputs)", norm.num_features)


def _numpy(t: torch.Tensor | None) -> Any:
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def fold_batchnorm(layer: nn.Module, norm: nn.Module) -> nn.Module:
    """A copy of ``layer`` computing ``norm(layer(x))`` in inference, as one layer.

    Parameters
    ----------
    layer : torch.nn.Module
        A ``Linear``, ``Conv1d/2d/3d`` or ``ConvTranspose1d/2d/3d`` (any ``groups``) whose
        output's axis 1 the batch norm normalises (as in ``nn.Sequential(conv, norm)``).
    norm : torch.nn.Module
        A batch norm of PyTorch's or bn1d's drop-ins, in inference mode, with running statistics.

    Returns
    -------
    torch.nn.Module
        A deep copy of ``layer`` with weight ``a W`` and bias ``a b + (beta - a mean)``,
        ``a = weight / sqrt(running_var + eps)`` (a bias is added where ``layer`` had none),
        computed in float64 and rounded once to the layer's dtype, on its device.

    Raises
    ------
    TypeError, ValueError
        For a layer or batch norm that cannot fold: another class, lazy or meta
        parameters, a batch norm in training mode or without running statistics, or
        ``num_features`` other than the layer's outputs.
    """
    _check_pair(layer, norm)
    weighted, bn = cast(Any, layer), cast(Any, norm)  # checked: their attributes are PyTorch's
    weight = weighted.weight.detach()
    transposed = isinstance(layer, _ConvNd) and weighted.transposed
    if transposed:  # (in, out / groups, *k): output channel g * out / groups + j at [group g's rows, j]
        groups = weighted.groups
        grouped = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:]).transpose(1, 2)
        weight = grouped.reshape(-1, *grouped.shape[2:])
    new_weight, new_bias = fold_affine(_numpy(weight), _numpy(weighted.bias), _numpy(bn.running_mean),
                                       _numpy(bn.running_var), float(bn.eps), _numpy(bn.weight),
                                       _numpy(bn.bias))  # fmt: skip
    folded = torch.as_tensor(new_weight).to(dtype=weighted.weight.dtype, device=weighted.weight.device)
    if transposed:
        folded = folded.reshape(grouped.shape).transpose(1, 2).reshape(weighted.weight.shape)
    result = copy.deepcopy(weighted)
    result.weight = nn.Parameter(folded, requires_grad=weighted.weight.requires_grad)
    bias = torch.as_tensor(new_bias).to(dtype=weighted.weight.dtype, device=weighted.weight.device)
    result.bias = nn.Parameter(bias, requires_grad=weighted.weight.requires_grad)
    return result


def _features_on_axis_1(layer: Any, shape: torch.Size) -> bool:
    """Whether a layer's output of ``shape`` has its features on axis 1: a ``Linear``'s of
    ``(N, C)``, a convolution's batched ``(N, C, *spatial)``."""
    if isinstance(layer, nn.Linear):
        return len(shape) == 2
    return len(shape) == 2 + len(layer.kernel_size)


def fold_model(model: nn.Module, args: Any) -> torch.fx.GraphModule:
    """``model`` with every foldable (layer, batch norm) pair folded, for inference.

    Parameters
    ----------
    model : torch.nn.Module
        A model in inference mode (``model.eval()``) that ``torch.fx.symbolic_trace`` traces.
        It is not changed.
    args : tuple or torch.Tensor
        An example input (or a tuple of the forward's arguments, as ``torch.export.export``
        takes): its shapes show which pairs fold.

    Returns
    -------
    torch.fx.GraphModule
        A traced copy in inference mode in which each batch norm that normalises the features
        (axis 1) of a ``Linear`` or convolution's output, that output used by nothing else and
        that layer called once, is folded into the layer (:func:`fold_batchnorm`) and gone.
        Other batch norms (in training mode, without running statistics, given a mask, or
        after anything else) stay as they are.

    Raises
    ------
    TypeError, ValueError
        For a model that is not a module, in training mode, or that FX cannot trace (fold
        its pairs with :func:`fold_batchnorm` then).
    """
    if not isinstance(model, nn.Module):
        raise argument_error("model", "a torch.nn.Module", type(model).__name__, TypeError)
    if model.training:
        raise argument_error("model", "a model in inference mode (call model.eval() first)", "training=True")
    example = args if isinstance(args, tuple) else (args,)
    try:
        graph_module = torch.fx.symbolic_trace(copy.deepcopy(model))
    except Exception as error:  # FX's errors are of many types: name what to do instead
        raise argument_error(
            "model", "a model torch.fx.symbolic_trace can trace (else fold pairs with fold_batchnorm)", str(error),
            TypeError,
        ) from error  # fmt: skip
    with torch.no_grad():
        ShapeProp(graph_module).propagate(*example)
    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    for node in list(graph_module.graph.nodes):
        norm = modules.get(str(node.target)) if node.op == "call_module" else None
        source = node.args[0] if node.args else None
        if not (isinstance(norm, _NormBase) and len(node.args) == 1 and not node.kwargs):
            continue
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        target = str(source.target)
        layer = modules[target]
        if not (isinstance(layer, (nn.Linear, _ConvNd)) and calls[target] == 1):
            continue
        shape = source.meta["tensor_meta"].shape
        if norm.training or norm.running_mean is None or not _features_on_axis_1(layer, shape):
            continue
        if _outputs(layer) != norm.num_features:
            continue
        parent, _, name = target.rpartition(".")
        setattr(graph_module.get_submodule(parent), name, fold_batchnorm(layer, norm))
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
    graph_module.graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()
    return graph_module.eval()
