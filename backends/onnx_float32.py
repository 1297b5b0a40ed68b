"""A float32-only form of an exported ONNX model, for runtimes without float64.

bn1d's training-mode statistics are sums in float64 (``bn1d.algorithm``), so a training
export (``torch.onnx.export`` of a model in ``train()``) holds ``Cast`` nodes to float64 and
float64 reductions. :func:`float32_only` rewrites every float64 tensor of a model to float32:
the same graph, computed in float32. Its accuracy is then the runtime's float32 reductions',
not R2.7's guarantee: ``docs/torch-models.md`` states what onnxruntime measures. Inference
exports need none of this: they hold float32 ``BatchNormalization`` nodes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from bn1d.config import argument_error

__all__ = ["float32_only"]


def _narrowed(tensor: Any) -> Any:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def float32_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every float64 tensor float32.

    Parameters
    ----------
    model : onnx.ModelProto
        An exported model (``torch.onnx.export(...).model_proto``, or ``onnx.load``'s).

    Returns
    -------
    onnx.ModelProto
        The same graph with float64 casts, constants, initializers, inputs, outputs and
        intermediate types made float32, checked by ``onnx.checker``.

    Raises
    ------
    TypeError
        For anything but an ``onnx.ModelProto``.
    """
    if not isinstance(model, onnx.ModelProto):
        raise argument_error("model", "an onnx.ModelProto", type(model).__name__, TypeError)
    narrow = onnx.ModelProto()
    narrow.CopyFrom(model)
    graph = narrow.graph
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.DOUBLE:
                attribute.i = TensorProto.FLOAT
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.DOUBLE:
                attribute.t.CopyFrom(_narrowed(attribute.t))
    for index, initializer in enumerate(graph.initializer):
        if initializer.data_type == TensorProto.DOUBLE:
            graph.initializer[index].CopyFrom(_narrowed(initializer))
    for value in (*graph.value_info, *graph.input, *graph.output):
        if value.type.tensor_type.elem_type == TensorProto.DOUBLE:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.checker.check_model(narrow)
    return narrow
