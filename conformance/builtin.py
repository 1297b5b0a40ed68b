"""bn1d's own conformance adapters, registered through the same entry points
(``bn1d.conformance.backends``) that third-party backends use.

Each factory imports its framework only when called, so a missing framework
shows up as :class:`~bn1d.conformance.registry.BackendUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .registry import ReplicaJob, ReplicaResult

__all__ = ["numpy_backend"]


class NumpyBackend:
    name = "numpy"
    dtypes = ("float16", "float32", "float64")

    def __init__(self) -> None:
        from bn1d.backends import numpy as numpy_backend_module

        self.module = numpy_backend_module

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> Any:
        return self.module.BatchNorm1d(**kwargs, dtype=np.dtype(param_dtype))

    def asarray(self, array: np.ndarray, dtype: str | None = None) -> np.ndarray:
        return np.asarray(array, dtype=dtype)

    def to_numpy(self, array: Any) -> np.ndarray:
        array = np.asarray(array)
        return array.astype(np.float64) if array.dtype.kind == "f" else array

    def gradients(self, layer: Any, x: Any, dy: Any, mask: Any, training: bool) -> dict[str, np.ndarray]:
        return {k: self.to_numpy(v) for k, v in layer.vjp(x, dy, mask=mask, training=training).items()}

    def run_replicated(self, jobs: Sequence[ReplicaJob]) -> list[ReplicaResult]:
        results = []
        for job in jobs:
            layers = [self.make_layer(**job.layer) for _ in job.xs]
            count = len(layers)
            # Both calls finish before the loop moves on, so the closures see this job.
            grads = self.module.run_replicas(
                lambda r: layers[r].vjp(job.xs[r], job.dys[r], mask=job.masks[r]),  # noqa: B023
                count,
            )
            ys = self.module.run_replicas(lambda r: layers[r](job.xs[r], mask=job.masks[r]), count)  # noqa: B023
            results.append(
                ReplicaResult(
                    ys=[self.to_numpy(y) for y in ys],
                    states=[{k: self.to_numpy(v) for k, v in layer.state_dict().items()} for layer in layers],
                    x_grads=[self.to_numpy(g["x"]) for g in grads],
                )
            )
        return results


def numpy_backend() -> NumpyBackend:
    return NumpyBackend()
