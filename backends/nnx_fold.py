"""Folding Flax NNX batch norms into the layer before them, for inference and export.

:func:`fold_batchnorm` merges one inference ``nnx.BatchNorm`` (Flax's, or bn1d's drop-in
:class:`bn1d.backends.nnx.BatchNorm`, its subclass) into the ``nnx.Linear`` or ``nnx.Conv``
before it; :func:`fold_model` folds every such adjacent pair inside a model's
``nnx.Sequential`` containers. The folded weights are computed in float64 by
:func:`bn1d.folding.fold_affine` and rounded once to the kernel's dtype; its docstring
derives what a fold costs in accuracy, ``docs/deployment.md`` measures it.

Inference mode is the batch norm's attribute ``use_running_average`` being ``True`` (what
the constructor, ``model.eval()`` and ``nnx.view(model, use_running_average=True)`` set):
NNX keeps no other record of the mode, and a call's ``use_running_average=`` argument
cannot be seen from the module.
"""

from __future__ import annotations

from typing import Any, cast

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bn1d.config import argument_error
from bn1d.folding import fold_affine

__all__ = ["Identity", "fold_batchnorm", "fold_model"]

_LAYERS = (nnx.Linear, nnx.Conv)


class Identity(nnx.Module):
    """``x`` unchanged: what :func:`fold_model` leaves where a folded batch norm was, so the
    other layers keep their positions (and ``nnx.state`` paths)."""

    def __call__(self, x: Any) -> Any:
        return x


def _foldable_layer(layer: Any) -> bool:
    """An ``nnx.Linear`` or ``nnx.Conv``, or a subclass computing the same (one that overrides
    ``__call__``, as ``nnx.LoRALinear`` does, adds to it: its kernel is not all it computes)."""
    return any(isinstance(layer, c) and type(layer).__call__ is c.__call__ for c in _LAYERS)


def _check_pair(layer: Any, norm: Any) -> None:
    """R7.1's errors for a pair that cannot fold, before anything is built."""
    if not _foldable_layer(layer):
        raise argument_error("layer", "a flax.nnx.Linear or Conv (not a subclass overriding __call__)",
                             type(layer).__name__, TypeError)  # fmt: skip
    if not isinstance(norm, nnx.BatchNorm):
        raise argument_error("norm", "a flax.nnx.BatchNorm (or bn1d's drop-in)", type(norm).__name__, TypeError)
    if norm.use_running_average is not True:
        raise argument_error("norm", "a batch norm in inference mode (use_running_average=True: call "
                             "model.eval() or nnx.view(model, use_running_average=True))",
                             f"use_running_average={norm.use_running_average!r}")  # fmt: skip
    if norm.axis not in (-1, (-1,)):
        raise argument_error("norm", "axis=-1 (the layer's output features, last in NNX)", f"axis={norm.axis!r}")
    if layer.out_features != norm.num_features:
        raise argument_error("norm", f"num_features={layer.out_features} (the layer's outputs)", norm.num_features)


def _numpy(variable: Any) -> Any:
    return None if variable is None else np.asarray(variable[...], dtype=np.float64)


def fold_batchnorm(layer: nnx.Module, norm: nnx.Module) -> nnx.Module:
    """A copy of ``layer`` computing ``norm(layer(x))`` in inference, as one layer.

    With ``a = scale / sqrt(var + epsilon)`` (``scale = 1`` and ``bias = 0`` for a batch norm
    without them), the kernel ``K`` (``(in, out)`` for ``Linear``, ``(*window, in /
    feature_group_count, out)`` for ``Conv``: the output features last in both) becomes
    ``K * a`` and the bias ``b`` becomes ``a b + (bias - a mean)``, computed in float64 and
    rounded once to the kernel's dtype.

    Parameters
    ----------
    layer : flax.nnx.Module
        An ``nnx.Linear`` or ``nnx.Conv`` (any ``feature_group_count``, ``mask`` and
        options), or a subclass that does not override ``__call__``.
    norm : flax.nnx.Module
        An ``nnx.BatchNorm`` (Flax's, or bn1d's drop-in) normalising the layer's output
        features (``axis=-1``, NNX's default) with ``use_running_average=True``.

    Returns
    -------
    flax.nnx.Module
        ``nnx.clone(layer)`` with the folded kernel and bias; every other attribute
        (``dtype``, ``precision``, ``mask``, ``dot_general``, ...) is the layer's. Where the layer
        had no bias, the clone gets an ``nnx.Param`` bias in the kernel's dtype and
        ``use_bias=True``: the clone is the layer with a bias, not a module built anew, so
        options the constructor would not see again are kept. ``layer`` and ``norm`` are not
        changed.

    Raises
    ------
    TypeError
        For a layer other than ``nnx.Linear``/``nnx.Conv`` (``nnx.ConvTranspose``,
        ``nnx.LinearGeneral``, ``nnx.LoRALinear``, ...) or a norm that is not an
        ``nnx.BatchNorm`` (bn1d's ``BatchNorm1d``, with BrainPy's layout, is not).
    ValueError
        For a batch norm not in inference mode, on another axis than ``-1`` (NNX records no
        input rank, so no other axis is known to be the features), or with
        ``num_features`` other than the layer's outputs.

    Notes
    -----
    As PyTorch's fold (``bn1d.backends.torch_fold``), but: inference mode is the attribute
    ``use_running_average is True`` (see the module docstring); the output features are the
    kernel's last axis (``fold_affine(..., axis=-1)``); a bias is added to a clone rather
    than a new module; the weights must be concrete (not inside ``jax.jit``): they are read
    into NumPy.
    """
    _check_pair(layer, norm)
    weighted, bn = cast(Any, layer), cast(Any, norm)  # checked: their attributes are the library's
    kernel = weighted.kernel[...]
    new_kernel, new_bias = fold_affine(_numpy(weighted.kernel), _numpy(weighted.bias), _numpy(bn.mean),
                                       _numpy(bn.var), float(bn.epsilon), _numpy(bn.scale), _numpy(bn.bias),
                                       axis=-1)  # fmt: skip
    result: Any = nnx.clone(weighted)
    result.kernel[...] = jnp.asarray(new_kernel, dtype=kernel.dtype)
    if weighted.bias is None:
        result.bias = nnx.Param(jnp.asarray(new_bias, dtype=kernel.dtype))
        result.use_bias = True
    else:
        result.bias[...] = jnp.asarray(new_bias, dtype=weighted.bias[...].dtype)
    return result


def fold_model(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every adjacent (layer, batch norm) pair of its
    ``nnx.Sequential`` containers folded, for inference.

    Parameters
    ----------
    model : flax.nnx.Module
        Any NNX module; each ``nnx.Sequential`` in its graph (nested ones included, wherever
        they sit) is searched. It is not changed.

    Returns
    -------
    flax.nnx.Module
        ``nnx.clone(model)`` in which, in each ``nnx.Sequential``, every ``nnx.Linear`` or
        ``nnx.Conv`` directly followed by an ``nnx.BatchNorm`` on ``axis=-1`` with the layer's
        ``num_features`` is replaced by :func:`fold_batchnorm`'s layer and the batch norm by
        an :class:`Identity` (so the other layers keep their indices). Batch norms on another
        axis, or after anything else, stay. Pairs outside an ``nnx.Sequential`` (attributes
        called in a ``__call__``) are not folded: NNX records no call graph, so fold them with
        :func:`fold_batchnorm` by hand.

    Raises
    ------
    TypeError
        For a ``model`` that is not an ``nnx.Module``.
    ValueError
        For a foldable pair whose batch norm is not in inference mode (call
        ``model.eval()`` first); the error names its path.
    """
    if not isinstance(model, nnx.Module):
        raise argument_error("model", "a flax.nnx.Module", type(model).__name__, TypeError)
    result = nnx.clone(model)
    sequentials = [(path, node) for path, node in nnx.iter_graph(result) if isinstance(node, nnx.Sequential)]
    for path, sequential in sequentials:
        layers = sequential.layers
        for i in range(len(layers) - 1):
            layer, norm = cast(Any, layers[i]), cast(Any, layers[i + 1])
            if not (_foldable_layer(layer) and isinstance(norm, nnx.BatchNorm)):
                continue
            if norm.axis not in (-1, (-1,)) or norm.num_features != layer.out_features:
                continue
            if norm.use_running_average is not True:
                where = "/".join(map(str, (*path, "layers", i + 1)))
                raise argument_error("model", "a model in inference mode (call model.eval() first)",
                                     f"use_running_average={norm.use_running_average!r} at {where}")  # fmt: skip
            layers[i] = fold_batchnorm(layer, norm)
            layers[i + 1] = Identity()
    return result
