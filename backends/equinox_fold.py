"""Folding Equinox batch norms into the layer before them, for inference and export.

:func:`fold_batchnorm` merges one inference ``eqx.nn.BatchNorm`` (Equinox's, or bn1d's
drop-in :class:`bn1d.backends.equinox.BatchNorm`, its subclass), whose running statistics
live in an ``eqx.nn.State``, into the ``eqx.nn.Linear`` or ``eqx.nn.Conv``
(``Conv1d/2d/3d``) before it; :func:`fold_model` folds every such adjacent pair inside a
model's ``eqx.nn.Sequential`` containers. The folded weights are computed in float64 by
:func:`bn1d.folding.fold_affine` and rounded once to the weight's dtype; its docstring
derives what a fold costs in accuracy, ``docs/deployment.md`` measures it.

Inference mode is the batch norm's field ``inference`` being ``True`` (what
``eqx.nn.inference_mode(model)`` sets); a call's ``inference=`` argument cannot be seen from
the module.
"""

from __future__ import annotations

from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bn1d.config import argument_error
from bn1d.folding import fold_affine

__all__ = ["fold_batchnorm", "fold_model"]

_LAYERS = (eqx.nn.Linear, eqx.nn.Conv)
_CONVS = (eqx.nn.Conv1d, eqx.nn.Conv2d, eqx.nn.Conv3d)


def _foldable_layer(layer: Any) -> bool:
    """An ``eqx.nn.Linear`` or ``eqx.nn.Conv``, or a subclass computing the same (not
    overriding ``__call__``: its weight would not be all it computes)."""
    return any(isinstance(layer, c) and type(layer).__call__ is c.__call__ for c in _LAYERS)


def _outputs(layer: Any) -> Any:
    return layer.out_features if isinstance(layer, eqx.nn.Linear) else layer.out_channels


def _check_pair(layer: Any, norm: Any) -> None:
    """R7.1's errors for a pair that cannot fold, before anything is built."""
    if not _foldable_layer(layer):
        raise argument_error("layer", "an equinox.nn.Linear or Conv/Conv1d/2d/3d (not a subclass overriding __call__)",
                             type(layer).__name__, TypeError)  # fmt: skip
    if not isinstance(norm, eqx.nn.BatchNorm):
        raise argument_error("norm", "an equinox.nn.BatchNorm (or bn1d's drop-in)", type(norm).__name__, TypeError)
    if norm.inference is not True:
        raise argument_error("norm", "a batch norm in inference mode (inference=True: eqx.nn.inference_mode(model))",
                             f"inference={norm.inference!r}")  # fmt: skip
    if _outputs(layer) != norm.input_size:
        raise argument_error("norm", f"input_size={_outputs(layer)!r} (the layer's outputs)", norm.input_size)


def _statistics(norm: Any, state: eqx.nn.State) -> tuple[np.ndarray, np.ndarray]:
    """The (mean, var) ``norm`` normalises with in inference, in float64: mode ``"ema"``'s
    running averages, or mode ``"batch"``'s hidden ones zero-debiased, ``hidden / (1 -
    momentum**count)`` (``/ 1`` at count 0), as Equinox does (in float64 here)."""
    if norm.mode == "ema":
        mean, var = state.get(norm.ema_state_index)
        return np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    count = int(state.get(norm.batch_counter))
    debias = 1.0 if count == 0 else 1.0 - float(norm.momentum) ** count
    hidden = state.get(norm.batch_state_index)
    return np.asarray(hidden[0], dtype=np.float64) / debias, np.asarray(hidden[1], dtype=np.float64) / debias


def _with_bias(layer: Any) -> Any:
    """``layer`` (a stock class without a bias) rebuilt with ``use_bias=True`` and its options."""
    key, dtype = jax.random.key(0), layer.weight.dtype  # the values are replaced
    if type(layer) is eqx.nn.Linear:
        return eqx.nn.Linear(layer.in_features, layer.out_features, use_bias=True, dtype=dtype, key=key)
    if type(layer) in (eqx.nn.Conv, *_CONVS):
        options = (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                   layer.dilation, layer.groups, True, layer.padding_mode, dtype)  # fmt: skip
        if type(layer) is eqx.nn.Conv:
            return eqx.nn.Conv(layer.num_spatial_dims, *options, key=key)
        return type(layer)(*options, key=key)
    raise argument_error("layer", "a layer with a bias, or a stock Linear/Conv (rebuilt with one)",
                         type(layer).__name__, TypeError)  # fmt: skip


def fold_batchnorm(layer: eqx.Module, norm: eqx.Module, state: eqx.nn.State) -> eqx.Module:
    """``layer`` computing ``norm(layer(x), state)`` in inference, as one layer.

    With ``a = weight / sqrt(var + eps)`` (the norm's ``weight``; 1 and ``bias`` 0 without
    ``channelwise_affine``), the layer's weight ``W`` (``(out, in)`` for ``Linear``, ``(out,
    in / groups, *kernel)`` for convolutions: the output features first in both) becomes
    ``a W`` and its bias ``b`` becomes ``a b + (bias - a mean)``, computed in float64 and
    rounded once to the weight's dtype.

    Parameters
    ----------
    layer : equinox.Module
        An ``eqx.nn.Linear`` or ``eqx.nn.Conv``/``Conv1d``/``Conv2d``/``Conv3d`` (any
        ``groups``, padding and padding mode), or a subclass that does not override
        ``__call__``.
    norm : equinox.Module
        An ``eqx.nn.BatchNorm`` (Equinox's, or bn1d's drop-in), either ``mode``, with
        ``inference=True`` and ``input_size`` the layer's outputs.
    state : equinox.nn.State
        The state holding ``norm``'s running statistics: mode ``"ema"``'s ``(mean, var)``,
        or mode ``"batch"``'s count and hidden averages, zero-debiased as Equinox does.

    Returns
    -------
    equinox.Module
        A new layer (``eqx.tree_at``) with the folded weight and bias (a convolution's bias
        is ``(out, 1, ..., 1)``, as Equinox's). A stock layer without a bias is rebuilt with
        ``use_bias=True`` and its other options. ``layer``, ``norm`` and ``state`` are not
        changed (Equinox modules are immutable).

    Raises
    ------
    TypeError
        For a layer other than those (``eqx.nn.ConvTranspose``, a subclass overriding
        ``__call__``, or one without a bias that is not a stock class), or a norm that is not
        an ``eqx.nn.BatchNorm`` (bn1d's ``BatchNorm1d``, with BrainPy's layout, is not).
    ValueError
        For a batch norm not in inference mode, or with ``input_size`` other than the
        layer's outputs.

    Notes
    -----
    As PyTorch's fold (``bn1d.backends.torch_fold``), but: inference mode is the field
    ``inference is True``; the statistics come from ``state``; mode ``"batch"``'s debiasing
    is computed in float64 (Equinox: in float32); the weights must be concrete (not inside
    ``jax.jit``): they are read into NumPy.
    """
    _check_pair(layer, norm)
    weighted, bn = cast(Any, layer), cast(Any, norm)  # checked: their attributes are the library's
    mean, var = _statistics(bn, state)
    bias = None if weighted.bias is None else np.reshape(np.asarray(weighted.bias, dtype=np.float64), -1)
    scale, offset = (bn.weight, bn.bias) if bn.channelwise_affine else (None, None)
    new_weight, new_bias = fold_affine(np.asarray(weighted.weight, dtype=np.float64), bias, mean, var,
                                       float(bn.eps), scale, offset, axis=0)  # fmt: skip
    dtype = weighted.weight.dtype
    bias_shape = (new_bias.size,) + (1,) * (weighted.weight.ndim - 2 if isinstance(weighted, eqx.nn.Conv) else 0)
    result = weighted if weighted.bias is not None else _with_bias(weighted)
    bias_dtype = dtype if weighted.bias is None else weighted.bias.dtype
    new = (jnp.asarray(new_weight, dtype=dtype), jnp.asarray(new_bias.reshape(bias_shape), dtype=bias_dtype))
    return eqx.tree_at(lambda m: (m.weight, m.bias), result, new)


def _is_sequential(node: Any) -> bool:
    return isinstance(node, eqx.nn.Sequential)


def fold_model(model: Any, state: eqx.nn.State) -> tuple[Any, eqx.nn.State]:
    """``model`` with every adjacent (layer, batch norm) pair of its ``eqx.nn.Sequential``
    containers folded, for inference, and its state.

    Parameters
    ----------
    model : pytree
        An Equinox model (any pytree); each ``eqx.nn.Sequential`` in it (nested ones
        included) is searched.
    state : equinox.nn.State
        The model's state (``eqx.nn.make_with_state``), holding the batch norms' running
        statistics.

    Returns
    -------
    model : pytree
        A new model in which, in each ``eqx.nn.Sequential``, every ``eqx.nn.Linear`` or
        convolution directly followed by an ``eqx.nn.BatchNorm`` of its ``input_size`` is
        replaced by :func:`fold_batchnorm`'s layer and the batch norm by ``eqx.nn.Identity()``
        (so the other layers keep their indices). Pairs outside an ``eqx.nn.Sequential``
        (fields called in a ``__call__``) are not folded: fold them with
        :func:`fold_batchnorm` by hand.
    state : equinox.nn.State
        ``state.substate(model)``: the entries of the layers left, without the folded batch
        norms'.

    Raises
    ------
    ValueError
        For a foldable pair whose batch norm is not in inference mode (call
        ``eqx.nn.inference_mode(model)`` first).
    """
    if not isinstance(state, eqx.nn.State):
        raise argument_error("state", "an equinox.nn.State", type(state).__name__, TypeError)

    def fold(node: Any) -> Any:
        if not _is_sequential(node):
            return node
        layers = [jax.tree.map(fold, layer, is_leaf=_is_sequential) for layer in node.layers]
        for i in range(len(layers) - 1):
            layer, norm = layers[i], layers[i + 1]
            if _foldable_layer(layer) and isinstance(norm, eqx.nn.BatchNorm) and _outputs(layer) == norm.input_size:
                if norm.inference is not True:
                    raise argument_error("model", "a model in inference mode (call eqx.nn.inference_mode(model) "
                                         "first)", f"inference={norm.inference!r} at layer {i + 1}")  # fmt: skip
                layers[i], layers[i + 1] = fold_batchnorm(layer, norm, state), eqx.nn.Identity()
        return eqx.tree_at(lambda s: s.layers, node, tuple(layers))

    folded = jax.tree.map(fold, model, is_leaf=_is_sequential)
    return folded, state.substate(folded)
