"""``python -m benchmarks.population_model [--quick]``: a small convnet trained with tiny batches,
its held-out loss with the running statistics as trained, after ``update_bn`` and after bn1d's
``recompute_statistics``.

The data are synthetic, pixel-like images: an oriented grating (the class, 4 orientations, a
random phase) plus noise, on an offset of 128 and a per-image brightness (``|mean| / std`` of
the raw pixels about 7), so that each batch's statistics matter and batches of 8 images differ.
The convnet (``Conv2d -> BatchNorm2d -> ReLU``, twice, then ``Linear -> BatchNorm1d -> ReLU ->
Linear``) is trained with batches of 8 by SGD twice, from the same seed and batch order: as a
stock ``nn`` model, and converted with ``convert_batchnorm`` (bn1d's drop-ins). Over the last
epoch an SWA average of its weights (``torch.optim.swa_utils.AveragedModel``) is kept, whose
statistics must be recomputed.

For both weights (as trained, SWA) of both models, the held-out loss and accuracy with:

* the running statistics as they are (the momentum EMA of training; SWA's: those of the
  weights when averaging began);
* ``torch.optim.swa_utils.update_bn`` over the training batches;
* ``bn1d.backends.torch_population.recompute_statistics`` over the same batches;

and, per batch norm, each one's error against the float64 statistics of that layer's inputs
over the same pass (captured by forward pre-hooks, concatenated; unbiased variance, R3.3): the
mean's in units of the std, the variance's relative. ``docs/population.md`` keeps a run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from bn1d.backends.torch_nn import convert_batchnorm
from bn1d.backends.torch_population import recompute_statistics

RULE = 1e-5  # R2.7, float32: the mean within 1e-5 std, the variance within 1e-5 relative (plus one ulp of each)
BATCH = 8


def dataset(count: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (3, size, size) and their labels: a grating of the label's orientation
    (0, 45, 90, 135 degrees, wavelength 5 pixels, random phase), amplitude 5, plus noise (std
    16) on 128 plus a per-image brightness (std 8)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (count,), generator=g)
    angle = labels.double() * math.pi / 4
    phase = torch.rand(count, generator=g, dtype=torch.float64) * 2 * math.pi
    row, col = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    along = angle.cos()[:, None, None] * col + angle.sin()[:, None, None] * row
    grating = torch.sin(2 * math.pi / 5 * along + phase[:, None, None])[:, None]
    brightness = 8 * torch.randn(count, 1, 1, 1, generator=g, dtype=torch.float64)
    noise = 16 * torch.randn(count, 3, size, size, generator=g, dtype=torch.float64)
    return (128 + brightness + 5 * grating + noise).float(), labels


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))  # fmt: skip


def train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], epochs: int) -> AveragedModel:
    """SGD with momentum over ``batches`` (reshuffled each epoch, seeded); an SWA average of
    the weights after each of the last epoch's steps, returned."""
    g = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)
    model.train()
    swa = None
    for epoch in range(epochs):
        for i in torch.randperm(len(batches), generator=g).tolist():
            x, y = batches[i]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if epoch == epochs - 1:
                if swa is None:
                    swa = AveragedModel(model)
                else:
                    swa.update_parameters(model)
    assert swa is not None
    return swa


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Held-out mean cross-entropy and accuracy in inference mode (running statistics)."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def captured(model: nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Every batch norm's inputs while the block runs, in float64, features first, flattened."""
    inputs: list[list[torch.Tensor]] = [[] for _ in norms(model)]

    def hook(store: list[torch.Tensor]) -> Callable[..., None]:
        def keep(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double()
            store.append(x.transpose(0, 1).reshape(x.shape[1], -1))

        return keep

    handles = [m.register_forward_pre_hook(hook(store)) for m, store in zip(norms(model), inputs)]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Layer:
    ratio: float  # max |mean| / std over the features, float64
    mean_error: float  # max |running_mean - mean64| / std64
    var_error: float  # max |running_var - var64| / var64
    within_rule: bool  # R2.7 for every feature, one float32 ulp of each statistic allowed


def layer_errors(model: nn.Module, inputs: list[list[torch.Tensor]]) -> list[Layer]:
    found = []
    for module, store in zip(norms(model), inputs):
        pooled = torch.cat(store, dim=1)
        mean, var = pooled.mean(1), pooled.var(1)  # unbiased (R3.3)
        std = var.sqrt()
        got_mean, got_var = module.running_mean.double(), module.running_var.double()
        ulp_mean = torch.from_numpy(np.spacing(mean.abs().float().numpy())).double()
        ulp_var = torch.from_numpy(np.spacing(var.float().numpy())).double()
        within = bool(((got_mean - mean).abs() <= RULE * std + ulp_mean).all()) and bool(
            ((got_var - var).abs() <= RULE * var + ulp_var).all()
        )
        found.append(Layer(float((mean.abs() / std).max()), float(((got_mean - mean).abs() / std).max()),
                           float(((got_var - var).abs() / var).max()), within))  # fmt: skip
    return found


@dataclass
class Result:
    model: str  # "stock nn" or "converted"
    weights: str  # "trained" or "SWA"
    statistics: str  # one of STATISTICS
    loss: float
    accuracy: float
    layers: list[Layer]


STATISTICS = ("as trained", "update_bn", "bn1d recompute")


def compare(
    model: str, weights: str, net: nn.Module, inputs: list[torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor]
) -> list[Result]:
    """The three statistics of ``net`` (copied for each), each against its own pass's inputs."""
    results = []
    for statistics in STATISTICS:
        copied = copy.deepcopy(net)
        with captured(copied) as seen:
            if statistics == "update_bn":
                update_bn(inputs, copied)
            else:
                recompute_statistics(copied, inputs)
        if statistics == "as trained":  # that pass gave the reference only: net's own statistics are judged
            copied = net
        results.append(Result(model, weights, statistics, *evaluate(copied, *held_out), layer_errors(copied, seen)))
    return results


def run(quick: bool = False, log: Callable[[str], None] = lambda line: None) -> list[Result]:
    train_count, test_count, epochs = (1024, 512, 3) if quick else (2048, 2048, 4)
    x, y = dataset(train_count, seed=0)
    held_out = dataset(test_count, seed=1)
    batches = list(zip(x.split(BATCH), y.split(BATCH)))
    inputs = [b for b, _ in batches]
    results = []
    for name, build in (("stock nn", convnet), ("converted", lambda: convert_batchnorm(convnet()))):
        started = time.perf_counter()
        net = build()
        swa = train(net, batches, epochs)
        seconds = time.perf_counter() - started
        log(f"{name}: trained {epochs} epochs of {len(batches)} batches of {BATCH} in {seconds:.1f}s")
        results += compare(name, "trained", net, inputs, held_out)
        results += compare(name, "SWA", swa, inputs, held_out)
    return results


def tables(results: list[Result]) -> str:
    """Two Markdown tables: per model, weights and statistics the held-out loss and the worst
    errors over the layers; then each layer's errors."""
    lines = ["| model | weights | statistics | held-out loss | accuracy | worst mean error / std "
             "| worst variance error | R2.7 |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        worst_mean, worst_var = max(x.mean_error for x in r.layers), max(x.var_error for x in r.layers)
        within = "yes" if all(x.within_rule for x in r.layers) else "no"
        lines.append(f"| {r.model} | {r.weights} | {r.statistics} | {r.loss:.4f} | {r.accuracy:.3f} "
                     f"| {worst_mean:.1e} | {worst_var:.1e} | {within} |")  # fmt: skip
    lines += ["", "Per batch norm, mean error / std and variance error (relative) against the float64 statistics:",
              "", "| model | weights | layer | \\|mean\\| / std | " + " | ".join(STATISTICS) + " |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for i in range(0, len(results), len(STATISTICS)):
        group = results[i : i + len(STATISTICS)]
        for k, layer in enumerate(group[-1].layers):
            cells = " | ".join(f"{r.layers[k].mean_error:.1e} / {r.layers[k].var_error:.1e}" for r in group)
            lines.append(f"| {group[0].model} | {group[0].weights} | {k + 1} | {layer.ratio:.1f} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1024 training images, 3 epochs")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()
    started = time.perf_counter()
    results = run(args.quick, log=print)
    print(tables(results))
    print(f"\n{time.perf_counter() - started:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)


if __name__ == "__main__":
    main()
