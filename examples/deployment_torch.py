"""From training to onnxruntime with bn1d's PyTorch drop-ins: train, recompute, fold, export, run.

    python examples/deployment_torch.py [--json PATH]

A small convnet (``Conv2d -> BatchNorm2d -> ReLU``, twice, then ``Linear -> BatchNorm1d``) is
converted with ``convert_batchnorm``, trained a few steps on synthetic images whose pixels
sit on an offset (raw data: ``|mean| / std`` at the first batch norm of about 1, 1e2 and
1e4), its statistics recomputed exactly (``recompute_statistics``), folded
(``fold_model``) and exported with ``torch.onnx.export(dynamo=True)``, folded and not. Each
model's output is compared with the unfolded model in float64, the worst error over a
held-out batch relative to the largest output: the unfolded float32 model, the folded one,
and both exports run in onnxruntime. ``docs/deployment.md`` keeps a run.
"""

from __future__ import annotations

import argparse
import copy
import io
import json

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from bn1d.backends.torch_fold import fold_model
from bn1d.backends.torch_nn import convert_batchnorm
from bn1d.backends.torch_population import recompute_statistics


def images(count: int, offset: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` (3, 12, 12) images with unit noise on ``offset``; the label: which half is brighter."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (count,), generator=g)
    x = torch.randn(count, 3, 12, 12, generator=g)
    x[labels == 1, :, :6] += 1.0
    return x + offset, labels


def convnet() -> nn.Module:
    torch.manual_seed(0)
    features = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU()]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2), nn.BatchNorm1d(2)]
    model = nn.Sequential(*features, *head)
    return convert_batchnorm(model)


def onnx_output(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    buffer = io.BytesIO()
    onnx.save(torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto, buffer)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def run(offset: float) -> dict[str, float]:
    model = convnet()
    x, labels = images(512, offset, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(32):
        batch = slice(16 * step, 16 * step + 16)
        loss = nn.functional.cross_entropy(model(x[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    recompute_statistics(model, x.split(64))
    model.eval()
    held_out, _ = images(64, offset, seed=2)
    with torch.no_grad():
        first = model[0](x[:64]).double()
        ratio = float((first.mean((0, 2, 3)).abs() / first.std((0, 2, 3))).median())
        reference = copy.deepcopy(model).double()(held_out.double())
        folded = fold_model(model, held_out)
        outputs = {
            "unfolded float32": model(held_out).double(),
            "folded float32": folded(held_out).double(),
            "unfolded, onnxruntime": torch.from_numpy(onnx_output(model, held_out)).double(),
            "folded, onnxruntime": torch.from_numpy(onnx_output(folded, held_out)).double(),
        }
    scale = float(reference.abs().max())
    errors = {name: float((y - reference).abs().max()) / scale for name, y in outputs.items()}
    return {"offset": offset, "mean / std at the first batch norm": ratio, **errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = [run(offset) for offset in (1.0, 1e2, 1e4)]
    names = list(rows[0])[1:]
    print("| " + " | ".join(names) + " |")
    print("|" + "---|" * len(names))
    for row in rows:
        print(
            "| "
            + " | ".join(f"{row[name]:.3g}" if i == 0 else f"{row[name]:.1e}" for i, name in enumerate(names))
            + " |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
