"""``bn1d.backends.torch_fold``: a batch norm folded into the layer before it.

The reference is the unfolded pair in float64, ``a (W x + b - mean) + beta``. A folded
float32 layer computes ``fl(W') x + fl(b')`` with ``W' = a W``, ``b' = a b + beta - a mean``
rounded once from float64: each output is a dot product of ``k + 1`` terms (``k`` the fan-in,
the bias the last), so with ``u`` the unit roundoff its error is at most
``(gamma_{k+1} + u) (sum |W'| |x| + |b'|)`` (Higham, Accuracy and Stability, 3.1: any order
of summation; the ``+ u`` is the rounding of ``W'`` and ``b'``). That is the tolerance,
computed per output from ``|W'|`` and ``|x|``: a fold on the wrong axis or with the wrong
statistics is off by O(1) of the output's spread, far outside it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bn1d.backends.torch_fold import fold_batchnorm, fold_model  # noqa: E402
from bn1d.backends.torch_nn import convert_batchnorm  # noqa: E402

UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}

LAYERS = {
    "linear": (lambda: nn.Linear(256, 64), lambda: nn.BatchNorm1d(64), (4096, 256)),
    "conv1d": (lambda: nn.Conv1d(16, 32, 5, padding=2), lambda: nn.BatchNorm1d(32), (64, 16, 128)),
    "conv2d_groups": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=2), lambda: nn.BatchNorm2d(16), (64, 8, 32, 32)),
    "conv3d_no_bias": (lambda: nn.Conv3d(4, 8, 3, bias=False), lambda: nn.BatchNorm3d(8), (16, 4, 10, 10, 10)),
    "conv_transpose2d_groups": (
        lambda: nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4), lambda: nn.BatchNorm2d(12), (32, 8, 16, 16),
    ),
    "conv_transpose1d_affine_false": (
        lambda: nn.ConvTranspose1d(6, 10, 4), lambda: nn.BatchNorm1d(10, affine=False), (64, 6, 200),
    ),
}  # fmt: skip


def pair(kind: str, ratio: float, dtype: torch.dtype, seed: int = 0, source: str = "input"):
    """A layer and its batch norm in inference, the norm's statistics the exact (float64) ones
    of the layer's output on un-centred data, ``|mean| / std`` about ``ratio``; an input ``x``."""
    make_layer, make_norm, shape = LAYERS[kind]
    torch.manual_seed(seed)
    layer, norm = make_layer().to(dtype), make_norm().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        if source == "input":  # the mean comes through the weights: every weight of a row one sign
            layer.weight.abs_()
            x += ratio / 4
        elif layer.bias is not None:
            layer.bias.copy_(ratio * torch.randn(layer.bias.shape).sign())
        z = layer.double()(x.double())
        layer.to(dtype)
        dims = [0, *range(2, z.dim())]
        norm.running_mean.copy_(z.mean(dims))
        norm.running_var.copy_(z.var(dims))
        if norm.affine:
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    return layer, norm.eval(), x


def reference(layer, norm, x):
    """The unfolded pair in float64."""
    with torch.no_grad():
        return copy.deepcopy(norm).double()(copy.deepcopy(layer).double()(x.double()))


def bound(folded, x, dtype):
    """``(gamma_{k+1} + u) (|W'| |x| + |b'|)`` per output, in float64 (module docstring)."""
    u = UNIT[dtype]
    absolute = copy.deepcopy(folded).double()
    with torch.no_grad():
        absolute.weight.abs_()
        absolute.bias.abs_()
        magnitude = absolute(x.double().abs())
    k = folded.weight[0].numel() if not getattr(folded, "transposed", False) else folded.weight[:, 0].numel()
    gamma = (k + 1) * u / (1 - (k + 1) * u)
    return (gamma + u) * magnitude


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("ratio", [1.0, 1e2, 1e4])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_fold_is_the_float64_pair_within_the_dot_product_bound(kind, ratio, dtype):
    layer, norm, x = pair(kind, ratio, dtype)
    folded = fold_batchnorm(layer, norm)
    assert type(folded) is type(layer) and folded is not layer
    assert folded.weight.dtype == dtype and folded.bias is not None and folded.bias.dtype == dtype
    with torch.no_grad():
        error = (folded(x).double() - reference(layer, norm, x)).abs()
    tolerance = bound(folded, x, dtype)
    assert bool((error <= tolerance).all()), float((error / tolerance).max())


def test_the_layer_and_norm_are_not_changed():
    layer, norm, x = pair("conv2d_groups", 1e2, torch.float32)
    before = copy.deepcopy((layer.state_dict(), norm.state_dict()))
    fold_batchnorm(layer, norm)
    for given, kept in zip((layer.state_dict(), norm.state_dict()), before):
        assert all(torch.equal(given[key], kept[key]) for key in kept)


def errors_of(layer, norm, x, folded):
    """The worst error over outputs, in units of the norm's |scale| (the output's spread):
    the unfolded float32 pair, and the folded layer."""
    scale = (norm.weight if norm.affine else torch.ones(norm.num_features)).double().abs()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    ref = reference(layer, norm, x)
    with torch.no_grad():
        pair_error = ((norm(layer(x)).double() - ref).abs() / scale.view(shape)).max().item()
        fold_error = ((folded(x).double() - ref).abs() / scale.view(shape)).max().item()
    return pair_error, fold_error


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d_groups"])
def test_a_fold_loses_no_more_than_the_unfolded_float32_pair(kind):
    """``bn1d.folding``'s derivation: at most twice the pair's error with the mean from the
    inputs (both are the products' rounding: measured 0.8 to 1.2 times), and far less with
    the mean from the bias (the pair rounds ``z`` at ``|mean|``, the fold cancels it in
    float64: measured 1e-2 and less at ``|mean| / std = 1e4``)."""
    layer, norm, x = pair(kind, 1e4, torch.float32, source="input")
    pair_error, fold_error = errors_of(layer, norm, x, fold_batchnorm(layer, norm))
    assert fold_error <= 2 * pair_error, (fold_error, pair_error)
    layer, norm, x = pair(kind, 1e4, torch.float32, source="bias")
    pair_error, fold_error = errors_of(layer, norm, x, fold_batchnorm(layer, norm))
    assert fold_error <= 0.1 * pair_error, (fold_error, pair_error)


def test_errors_name_the_argument():
    layer, norm, _ = pair("linear", 1.0, torch.float32)
    cases = [
        ((nn.ReLU(), norm), TypeError, r"^layer: expected a torch\.nn\.Linear, Conv1d/2d/3d or ConvTranspose"),
        ((layer, nn.LayerNorm(64)), TypeError, r"^norm: expected a batch norm .*, got 'LayerNorm'$"),
        ((layer, copy.deepcopy(norm).train()), ValueError, r"^norm: expected a batch norm in inference mode"),
        ((layer, nn.BatchNorm1d(64, track_running_stats=False).eval()), ValueError,
         r"^norm: expected running statistics"),
        ((layer, nn.BatchNorm1d(32).eval()), ValueError,
         r"^norm: expected num_features=64 \(the layer's outputs\), got 32$"),
        ((nn.LazyLinear(64), norm), ValueError, r"^layer: expected initialised parameters"),
        ((nn.Linear(256, 64, device="meta"), norm), ValueError, r"^layer: expected initialised parameters"),
    ]  # fmt: skip
    for args, kind, pattern in cases:
        with pytest.raises(kind, match=pattern):
            fold_batchnorm(*args)


class Net(nn.Module):
    """A convnet with pairs that fold, one whose convolution output is used twice, a Linear on
    3-D input followed by a BatchNorm1d over its length, and a layer called twice."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Conv2d(8, 8, 1)
        self.branch_norm = nn.BatchNorm2d(8)
        self.seq = nn.Linear(8, 16)
        self.seq_norm = nn.BatchNorm1d(16)  # over the 16 positions of (N, 16, 16): not the Linear's 16 outputs
        self.shared = nn.Linear(16, 8)
        self.shared_norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 5)
        self.head_norm = nn.BatchNorm1d(5)

    def forward(self, x):
        h = self.features(x)
        b = self.branch(h)
        h = self.branch_norm(b) + b  # b has two users: no fold
        s = self.seq(h.flatten(2).transpose(1, 2)[:, :16])  # (N, 16, 16)
        s = self.seq_norm(s).mean(1)
        s = self.shared_norm(self.shared(s)) + self.shared(s)  # called twice: no fold
        return self.head_norm(self.head(s))


def trained(model, x):
    with torch.no_grad():
        for seed in range(3):
            torch.manual_seed(seed)
            model(torch.randn_like(x) * 4 + 30)
    return model.eval()


def norms(module):
    return [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


@pytest.mark.parametrize("converted", [False, True], ids=["stock", "drop-ins"])
def test_fold_model_folds_exactly_the_pairs_that_fold(converted):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8) * 4 + 30
    model = trained(Net(), x)
    if converted:
        model = convert_batchnorm(model)
    before = copy.deepcopy(model.state_dict())
    folded = fold_model(model, (x,))
    assert sorted(norms(folded)) == ["branch_norm", "seq_norm", "shared_norm"]
    assert not folded.training
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
        np.testing.assert_allclose(folded(x).double(), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items()), "model changed"


def test_stock_and_converted_models_fold_alike():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8) * 4 + 30
    stock = trained(Net(), x)
    converted = convert_batchnorm(copy.deepcopy(stock))
    with torch.no_grad():
        ours, theirs = fold_model(stock, x), fold_model(converted, x)
        for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert torch.equal(a, b), name


def test_fold_model_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"^model: expected a model in inference mode \(call model\.eval\(\) first\)"):
        fold_model(model, torch.randn(3, 4))
    with pytest.raises(TypeError, match=r"^model: expected a torch\.nn\.Module, got 'function'$"):
        fold_model(lambda x: x, torch.randn(3, 4))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.norm = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.norm(self.linear(x)) if x.sum() > 0 else x  # data-dependent: FX cannot trace it

    with pytest.raises(TypeError, match=r"^model: expected a model torch\.fx\.symbolic_trace can trace"):
        fold_model(Branchy().eval(), torch.randn(3, 4))


def test_the_fold_benchmark_runs_and_its_folds_lose_nothing():
    """``python -m benchmarks.fold --quick`` prints its table; in every row bn1d's fold is
    within twice the unfolded pair's error (``bn1d.folding``'s bound)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "benchmarks.fold", "--quick"], cwd=root, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith(("| linear", "| conv"))
    ]
    assert len(rows) == 8, result.stdout
    for row in rows:
        pair, fold = float(row[3]), float(row[6])
        assert fold <= 2 * pair, row
