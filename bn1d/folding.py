r"""Folding an inference batch norm into the layer before it, computed in float64.

In inference a batch norm is an affine map per feature ``c``:

.. math::

    y_c = a_c (z_c - \mu_c) + \beta_c, \qquad a_c = \frac{s_c}{\sqrt{\sigma^2_c + \epsilon}}

(running mean ``mu``, running variance ``sigma**2``, scale ``s`` and offset ``beta``; ``s = 1``
and ``beta = 0`` without them). After a layer whose output feature ``c`` is
``z_c = sum_j W_cj x_j + b_c`` (a linear layer's row ``c``, a convolution's output channel
``c``) it folds into that layer: ``W'_c = a_c W_c`` and ``b'_c = a_c b_c + (beta_c - a_c mu_c)``.
Both are computed here in float64 and rounded once to the layer's dtype (PyTorch's
``fuse_conv_bn_eval`` computes them in the layer's dtype).

What a fold costs, in units of ``|s_c|`` (the normalised output's spread) with ``u`` the
unit roundoff of the layer's dtype and ``k`` the terms of each dot product
(``docs/deployment.md`` measures it). The unfolded pair rounds ``z`` at its size ``|mu_c|``:
its error is about ``|a_c| (gamma_k sum_j |W_cj x_j| + u |z_c|) / |s_c|``, at least ``u |mu_c| /
sigma_c``. The folded layer has the same products scaled by ``a_c`` (``gamma_{k+1}``: the
rounding of ``W'`` is one more term) and rounds ``b'_c``, of size ``|a_c (b_c - mu_c) + beta_c|``,
where the pair rounds ``z_c``: when the mean comes from the inputs (``sum |W x| >= |mu|``)
both are dominated by the products, and when it comes from the bias, ``b_c - mu_c`` cancels
exactly in float64 and the fold is the more accurate. So a fold in float64 never loses
more than a constant factor (at most 2, measured 0.8 to 1.2) over the unfolded pair, at any
``|mu| / sigma``; it keeps no separate shift and refuses nothing on accuracy grounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import argument_error

__all__ = ["fold_affine"]


def fold_affine(
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    epsilon: float,
    scale: Any = None,
    offset: Any = None,
    axis: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The weight and bias of a layer followed by an inference batch norm, as one layer.

    Parameters
    ----------
    weight : array_like
        The layer's weight, its output features along ``axis`` (``(C, ...)`` for PyTorch's
        ``Linear`` and convolutions with ``axis=0``, ``(..., C)`` for Flax and Equinox kernels
        with ``axis=-1``).
    bias : array_like or None
        The layer's bias ``(C,)``, or ``None`` (zero).
    running_mean, running_var : array_like
        The batch norm's running statistics ``(C,)``.
    epsilon : float
        The batch norm's epsilon.
    scale, offset : array_like or None, optional
        The batch norm's ``(C,)`` scale (weight) and offset (bias); ``None``: 1 and 0.
    axis : int, optional
        The output-feature axis of ``weight``.

    Returns
    -------
    weight, bias : numpy.ndarray
        Float64: ``a * weight`` (``a`` broadcast along ``axis``) and ``a * bias + (offset - a *
        running_mean)``, with ``a = scale / sqrt(running_var + epsilon)``; the caller rounds
        them once to its dtype.

    Raises
    ------
    ValueError
        Where the statistics are not ``(C,)`` for ``C`` the size of ``weight`` along ``axis``.
    """
    w = np.asarray(weight, dtype=np.float64)
    c = w.shape[axis]
    vectors = {"bias": bias, "running_mean": running_mean, "running_var": running_var, "scale": scale, "offset": offset}
    values = {}
    for name, value in vectors.items():
        if value is not None:
            values[name] = np.asarray(value, dtype=np.float64)
            if values[name].shape != (c,):
                raise argument_error(name, f"shape ({c},) (the weight's output features)", values[name].shape)
    a = values.get("scale", 1.0) / np.sqrt(values["running_var"] + float(epsilon))
    shape = [1] * w.ndim
    shape[axis] = c
    folded_bias = a * values.get("bias", 0.0) + (values.get("offset", 0.0) - a * values["running_mean"])
    return w * a.reshape(shape), np.broadcast_to(folded_bias, (c,)).copy()
