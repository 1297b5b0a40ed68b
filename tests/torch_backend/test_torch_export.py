"""Inference exports of bn1d's PyTorch layers: a batch-norm operator that runtimes fuse, and R2.7.

A traced inference call (``torch.export``, ``torch.onnx.export``, ``torch.compile``,
``torch.jit.trace``) records ``x + (-running_mean)`` and PyTorch's inference kernel with a
zero mean (``torch_functional._centred_inference``): ONNX ``Add`` and ``BatchNormalization``.
R2.7's bound, 1e-5 of the output's spread: the kernel forms ``x_c * a + b`` from the centred
``x_c``, rounding at ``|x - mean| / std`` (a few units for the data here) where PyTorch's own
form rounds at ``|mean| / std``: a few ``u = 2**-24`` ulps either way at ratio 1, and at 1e4
``3 u * 1e4 = 2e-3`` for PyTorch's, 100 times the bound.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from torch import nn  # noqa: E402

from bn1d.backends.numpy import BatchNorm1d as NumpyBatchNorm1d  # noqa: E402
from bn1d.backends.torch_nn import convert_batchnorm  # noqa: E402

RULE = 1e-5


def norm_with_statistics(ratio: float, rows: int = 2**14, features: int = 16):
    """A BatchNorm1d in inference whose running statistics are the float64 ones of ``x``,
    raw data at ``|mean| / std = ratio``."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(features)
    x = torch.randn(rows, features) + ratio * torch.linspace(-1, 1, features).sign()
    with torch.no_grad():
        norm.running_mean.copy_(x.double().mean(0))
        norm.running_var.copy_(x.double().var(0))
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    return norm.eval(), x


def onnx_run(model: nn.Module, x: torch.Tensor, optimized: bool = False) -> tuple[np.ndarray, list[str]]:
    """``model`` exported by ``torch.onnx.export(dynamo=True)`` and run by onnxruntime: the
    output and the node types of the graph (after onnxruntime's optimisations if ``optimized``)."""
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    buffer = io.BytesIO()
    onnx.save(program.model_proto, buffer)
    options = onnxruntime.SessionOptions()
    nodes = [node.op_type for node in program.model_proto.graph.node]
    if optimized:
        options.optimized_model_filepath = str(pytest.tmp_dir / "optimized.onnx")  # type: ignore[attr-defined]
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    if optimized:
        nodes = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    return y, nodes


@pytest.fixture(autouse=True)
def scratch(tmp_path):
    pytest.tmp_dir = tmp_path  # type: ignore[attr-defined]


def worst(y, reference, norm) -> float:
    return float(
        (np.abs(np.asarray(y, dtype=np.float64) - reference) / norm.weight.detach().double().abs().numpy()).max()
    )


@pytest.mark.parametrize("ratio", [1.0, 1e2, 1e4])
def test_an_onnx_export_holds_batch_normalization_and_meets_the_rule(ratio):
    norm, x = norm_with_statistics(ratio)
    reference = copy.deepcopy(norm).double()(x.double()).detach().numpy()
    y, nodes = onnx_run(convert_batchnorm(copy.deepcopy(norm)), x)
    assert nodes == ["Add", "BatchNormalization"], nodes
    assert worst(y, reference, norm) <= RULE
    spec = NumpyBatchNorm1d(16, axis=0)  # bn1d's NumPy specification, with the same state
    values = (norm.weight, norm.bias, norm.running_mean, norm.running_var)
    spec.load_state_dict(
        dict(zip(("scale", "bias", "running_mean", "running_var"), (v.detach().numpy() for v in values)))
    )
    assert worst(y, spec(x.numpy(), training=False).astype(np.float64), norm) <= 2 * RULE  # both within R2.7
    if ratio == 1e4:  # PyTorch's own export, for the record: its kernel rounds at |mean| / std
        theirs, their_nodes = onnx_run(norm, x)
        assert their_nodes == ["BatchNormalization"] and worst(theirs, reference, norm) > 10 * RULE


def test_onnxruntime_fuses_the_export_into_the_convolution():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        model(torch.randn(16, 3, 12, 12) * 3 + 20)  # running statistics of un-centred data
    model.eval()
    x = torch.randn(4, 3, 12, 12) * 3 + 20
    converted = convert_batchnorm(copy.deepcopy(model))
    y, nodes = onnx_run(converted, x, optimized=True)
    assert "BatchNormalization" not in nodes and "Add" not in nodes and "Conv" in nodes, nodes
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double()).numpy()
    # the fused convolution's products round at their size: the dot-product bound of
    # docs/deployment.md, (gamma_{k+1} + u) |W'| |x|, about 28 u of |x| * |W'| here; 1e-4 of the largest output
    np.testing.assert_allclose(y, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


def test_torch_export_records_pytorchs_batch_norm_in_inference():
    norm, x = norm_with_statistics(1e3, rows=256)
    program = torch.export.export(convert_batchnorm(copy.deepcopy(norm)), (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("batch_norm" in target for target in targets), targets
    reference = copy.deepcopy(norm).double()(x.double()).detach().numpy()
    assert worst(program.module()(x).detach(), reference, norm) <= RULE


def test_compiled_and_traced_inference_meet_the_rule():
    norm, x = norm_with_statistics(1e4, rows=1024)
    ours = convert_batchnorm(copy.deepcopy(norm))
    reference = copy.deepcopy(norm).double()(x.double()).detach().numpy()
    with torch.no_grad():
        compiled = torch.compile(ours, fullgraph=True)(x)
        traced = torch.jit.trace(ours, (x,))(x)
    for name, y in (("compile", compiled), ("jit.trace", traced), ("eager", ours(x))):
        assert worst(y.detach(), reference, norm) <= RULE, name


@pytest.mark.parametrize("ratio", [1.0, 1e4])
@pytest.mark.parametrize("shape", [(4096, 16), (16, 16, 32, 32)], ids=["rows", "images"])
def test_a_training_export_and_its_float32_only_form(shape, ratio):
    """As exported, a training call's graph sums in float64 (two casts to float64) and meets
    R2.7 in onnxruntime. ``float32_only`` leaves no float64 tensor; its sums are then the
    runtime's float32 ones: a sequential sum of ``n`` terms errs by about ``sqrt(n) u`` of
    its terms' size (probabilistically), so ``y`` is bounded here by ``10 sqrt(n) u``, the
    factor 10 covering ``|x - mean| / std`` up to 5 (measured: up to 1.8e-5 at 4096 rows,
    ``docs/torch-models.md``)."""
    from bn1d.backends.onnx_float32 import float32_only
    from bn1d.backends.torch_nn import BatchNorm1d, BatchNorm2d

    torch.manual_seed(0)
    layer = (BatchNorm1d if len(shape) == 2 else BatchNorm2d)(16).train()
    x = torch.randn(shape) + ratio
    exported = torch.onnx.export(layer, (x,), dynamo=True, verbose=False).model_proto
    narrow = float32_only(exported)
    dims = [0, *range(2, x.dim())]
    wide = x.double()
    reference = (wide - wide.mean(dims, keepdim=True)) / torch.sqrt(wide.var(dims, correction=0, keepdim=True) + 1e-5)
    n = x.numel() // 16
    for model, bound in ((exported, RULE), (narrow, 10 * n**0.5 * 2.0**-24)):
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert float(np.abs(y - reference.numpy()).max()) <= bound
    double = onnx.TensorProto.DOUBLE
    assert any(a.i == double for node in exported.graph.node if node.op_type == "Cast" for a in node.attribute)
    assert not any(a.i == double for node in narrow.graph.node if node.op_type == "Cast" for a in node.attribute)
    values = (*narrow.graph.value_info, *narrow.graph.input, *narrow.graph.output)
    assert all(v.type.tensor_type.elem_type != double for v in values)
    assert all(t.data_type != double for t in narrow.graph.initializer)
    with pytest.raises(TypeError, match=r"^model: expected an onnx\.ModelProto, got 'bytes'$"):
        float32_only(exported.SerializeToString())
