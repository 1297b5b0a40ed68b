"""``python -m benchmarks.fold [--quick]``: what folding a batch norm into the layer before it costs.

For a ``Linear(256, 64)`` and a ``Conv2d(16, 32, 3)`` followed by a batch norm in inference
whose running statistics are the exact ones of the layer's output, at ``|mean| / std`` from 1
to 1e4 (the mean brought by the inputs through the weights, or by the layer's bias), the
worst error over the outputs, in units of the batch norm's ``|scale|`` (the output's spread),
against the unfolded pair in float64, of:

* the unfolded float32 pair with PyTorch's ``nn.BatchNorm*d`` and with bn1d's drop-in;
* PyTorch's ``torch.nn.utils.fusion.fuse_linear_bn_eval`` / ``fuse_conv_bn_eval`` (computed
  in float32);
* bn1d's ``fold_batchnorm`` (computed in float64, rounded once).

``bn1d.folding`` derives the expected picture; ``docs/deployment.md`` keeps a run.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bn1d.backends.torch_fold import fold_batchnorm
from bn1d.backends.torch_nn import convert_batchnorm

RATIOS = (1.0, 1e1, 1e2, 1e3, 1e4)


def make(kind: str, ratio: float, source: str, rows: int, seed: int = 0):
    """A float32 layer, its batch norm (exact statistics of its output on ``x``) and ``x``."""
    torch.manual_seed(seed)
    if kind == "linear":
        layer, norm, x = nn.Linear(256, 64), nn.BatchNorm1d(64), torch.randn(rows, 256)
    else:
        layer, norm, x = nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), torch.randn(rows // 64, 16, 10, 10)
    with torch.no_grad():
        if source == "input":  # every weight of a row one sign: the inputs' mean reaches the output
            layer.weight.abs_()
            x += ratio / 4
        else:
            layer.bias.copy_(ratio * torch.randn(layer.bias.shape).sign())
        z = copy.deepcopy(layer).double()(x.double())
        dims = [0, *range(2, z.dim())]
        norm.running_mean.copy_(z.mean(dims))
        norm.running_var.copy_(z.var(dims))
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
        achieved = float((z.mean(dims).abs() / z.std(dims)).median())
    return layer.eval(), norm.eval(), x, achieved


def errors(kind: str, ratio: float, source: str, rows: int) -> tuple[float, list[float]]:
    layer, norm, x, achieved = make(kind, ratio, source, rows)
    fuse = fuse_linear_bn_eval if kind == "linear" else fuse_conv_bn_eval
    drop_in = convert_batchnorm(copy.deepcopy(norm))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    with torch.no_grad():
        reference = copy.deepcopy(norm).double()(copy.deepcopy(layer).double()(x.double()))
        scale = norm.weight.double().abs().view(shape)
        outputs = [norm(layer(x)), drop_in(layer(x)), fuse(layer, norm)(x), fold_batchnorm(layer, norm)(x)]
        return achieved, [float(((y.double() - reference).abs() / scale).max()) for y in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer rows and ratios")
    args = parser.parse_args()
    rows, ratios = (1024, (1.0, 1e4)) if args.quick else (2**14, RATIOS)
    print(f"torch {torch.__version__}, float32, {rows} rows; worst error / |scale| against the float64 pair\n")
    print("| layer | mean from | mean / std | pair, nn.BatchNorm | pair, bn1d drop-in | PyTorch fuse | bn1d fold |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("linear", "conv2d"):
        for source in ("input", "bias"):
            for ratio in ratios:
                achieved, values = errors(kind, ratio, source, rows)
                cells = " | ".join(f"{v:.2e}" for v in values)
                print(f"| {kind} | {source} | {achieved:.3g} | {cells} |")


if __name__ == "__main__":
    main()
