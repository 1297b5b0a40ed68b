"""``python -m benchmarks.population``: population statistics against the float64 pooled ones.

For one ``nn.BatchNorm1d`` on ``(N, C)`` batches of uneven sizes (2 to 256 rows) whose means
drift (a tenth of a std per batch), at ``|mean| / std`` of 1, 1e2 and 1e4, the worst error
over the features of:

* bn1d's ``recompute_statistics`` (``bn1d.backends.torch_population``);
* ``torch.optim.swa_utils.update_bn`` (the batches' statistics averaged with equal weights);
* fvcore's and detectron2's PreciseBN arithmetic: size-weighted float32 ``E[x**2] - E[x]**2``
  (written here: fvcore is not a dependency);

the mean's in units of the pooled std, the variance's relative (both against the float64
statistics of the concatenated data, unbiased as R3.3 says). Then the time of a recompute
over a small convnet's batches against a plain training-mode forward pass over them, in
the same process. ``docs/population.md`` keeps a run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from bn1d.backends.torch_population import recompute_statistics


def batches(ratio: float, count: int = 200, features: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = np.random.default_rng(seed)
    sizes = g.integers(2, 257, size=count)  # a training-mode pass needs 2 rows
    return [torch.from_numpy((g.standard_normal((int(n), features)) + ratio + 0.1 * i).astype(np.float32))
            for i, n in enumerate(sizes)]  # fmt: skip


def fvcore_style(data: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted float32 ``E[x]`` and ``E[x**2]``, variance ``E[x**2] - E[x]**2`` (unbiased)."""
    total = sum(len(x) for x in data)
    mean = sum(x.mean(0) * (len(x) / total) for x in data)
    square = sum((x * x).mean(0) * (len(x) / total) for x in data)
    return mean, (square - mean * mean) * (total / (total - 1))


def errors(data: list[torch.Tensor]) -> dict[str, tuple[float, float]]:
    pooled = torch.cat(data).double()
    mean, var = pooled.mean(0), pooled.var(0, unbiased=True)
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layer = nn.BatchNorm1d(data[0].shape[1])
    recompute_statistics(layer, data)
    found["bn1d recompute_statistics"] = (layer.running_mean, layer.running_var)
    layer = nn.BatchNorm1d(data[0].shape[1])
    torch.optim.swa_utils.update_bn(data, layer)
    found["torch update_bn"] = (layer.running_mean, layer.running_var)
    found["fvcore PreciseBN arithmetic (float32)"] = fvcore_style(data)
    return {
        name: (float(((m.double() - mean).abs() / var.sqrt()).max()), float(((v.double() - var).abs() / var).max()))
        for name, (m, v) in found.items()
    }


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
                         nn.BatchNorm1d(10))  # fmt: skip


def speed(repeats: int = 5, count: int = 20) -> tuple[float, float]:
    """Median seconds of a recompute and of a plain training-mode forward pass over the same
    batches (``count`` of (32, 3, 32, 32)), alternated."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(32, 3, 32, 32, generator=g) for _ in range(count)]
    net = convnet()

    def plain() -> None:
        net.train()
        with torch.no_grad():
            for x in data:
                net(x)

    def timed(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    plain()  # warm up both
    recompute_statistics(net, data)
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(timed(lambda: recompute_statistics(net, data)))
        theirs.append(timed(plain))
    return float(np.median(ours)), float(np.median(theirs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 batches, 2 for the timing, 1 repeat")
    args = parser.parse_args()
    count, timed_batches, repeats = (20, 2, 1) if args.quick else (200, 20, args.repeats)
    print("| |mean| / std | method | mean error / std | variance error (relative) |")
    print("|---|---|---|---|")
    for ratio in (1.0, 1e2, 1e4):
        for name, (mean_error, var_error) in errors(batches(ratio, count)).items():
            print(f"| {ratio:g} | {name} | {mean_error:.1e} | {var_error:.1e} |")
    ours, plain = speed(repeats, timed_batches)
    print(f"\nrecompute over {timed_batches} batches of (32, 3, 32, 32), a small convnet: {ours * 1e3:.1f} ms; "
          f"a plain training-mode forward pass: {plain * 1e3:.1f} ms; ratio {ours / plain:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
