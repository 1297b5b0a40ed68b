"""A synced layer in a one-rank gloo group against the unsynced core path.

Usage: ``python one_rank_worker.py WORKDIR``; prints one JSON line. With one rank
the synced statistics are the local ones, so the synced native-kernel path
(``torch_kernels.NativeBatchNorm``: its own statistics, exchange, combination
and hand-written backward) must equal the core path under autograd
(``native_kernel=False``) for every layout and dtype pair it takes.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from bn1d.backends import torch_kernels
from bn1d.backends.torch import BatchNorm1d

LAYOUTS = {"(B, L, C)": ((0, 1), (4, 6, 3)), "(N, C, L)": ((0, 2), (4, 3, 6)), "(N, C)": (0, (7, 3))}
DTYPES = {  # input dtype, parameter dtype
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.float32),
    "float16": (torch.float16, torch.float32),
    "float64": (torch.float64, torch.float64),
    "float32 x, float64 params": (torch.float32, torch.float64),
    "float64 x, float32 params": (torch.float64, torch.float32),
}
native_calls = [0]
_native_apply = torch_kernels.NativeBatchNorm.apply


def _counted(*args, **kwargs):
    native_calls[0] += 1
    return _native_apply(*args, **kwargs)


torch_kernels.NativeBatchNorm.apply = _counted


def results(layer: BatchNorm1d, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    for _ in range(2):  # two steps: the second normalises with the same batch, updates again
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.backward(dy)
    return [y.detach(), x.grad, layer.scale.grad, layer.bias.grad, layer.running_mean, layer.running_var]


def main() -> None:
    dist.init_process_group("gloo", init_method="file://" + os.path.join(sys.argv[1], "init"), rank=0, world_size=1)
    generator = torch.Generator().manual_seed(0)
    errors = {}
    for layout, (axis, shape) in LAYOUTS.items():
        for name, (x_dtype, p_dtype) in DTYPES.items():
            x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.5).to(x_dtype)
            dy = torch.randn(shape, generator=generator, dtype=torch.float64).to(x_dtype)
            init = {"scale_initializer": [1.5, 0.5, 2.0], "bias_initializer": [0.1, -0.2, 0.3], "dtype": p_dtype}
            before = native_calls[0]
            synced = results(BatchNorm1d(3, axis, momentum=0.9, axis_name="batch", **init), x, dy)
            took_native = native_calls[0] - before == 2
            core = results(BatchNorm1d(3, axis, momentum=0.9, native_kernel=False, **init), x, dy)
            dtypes_match = all(a.dtype == b.dtype for a, b in zip(synced, core))
            error = max(float((a.double() - b.double()).abs().max()) for a, b in zip(synced, core))
            errors[f"{layout} {name}"] = {"error": error, "native": took_native, "dtypes_match": dtypes_match}
    # Not twice differentiable: a clear error, not a silently wrong second derivative.
    layer = BatchNorm1d(3, axis_name="batch")
    x = torch.randn(4, 6, 3, generator=generator, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    try:
        grad.sum().backward()
        double_backward = ""
    except RuntimeError as error:
        double_backward = str(error)
    print(json.dumps({"errors": errors, "double_backward": double_backward}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
