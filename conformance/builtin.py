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

__all__ = ["numpy_backend", "jax_backend"]


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
        return [self._run_job(job) for job in jobs]

    def _run_job(self, job: ReplicaJob) -> ReplicaResult:
        layers = [self.make_layer(**job.layer) for _ in job.xs]
        count = len(layers)
        grads = self.module.run_replicas(lambda r: layers[r].vjp(job.xs[r], job.dys[r], mask=job.masks[r]), count)
        ys = self.module.run_replicas(lambda r: layers[r](job.xs[r], mask=job.masks[r]), count)
        return ReplicaResult(
            ys=[self.to_numpy(y) for y in ys],
            states=[{k: self.to_numpy(v) for k, v in layer.state_dict().items()} for layer in layers],
            x_grads=[self.to_numpy(g["x"]) for g in grads],
        )


def numpy_backend() -> NumpyBackend:
    return NumpyBackend()


class JaxBackend:
    """``bn1d.backends.jax``; gradients by ``jax.grad`` through ``apply``, synced
    cases under ``jax.vmap`` with an ``axis_name`` (works on one device).

    Loading it turns on ``jax_enable_x64`` for the process so that the float64
    cases can run; every other case passes its dtype explicitly.
    """

    name = "jax"
    dtypes = ("float16", "bfloat16", "float32", "float64")

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        from bn1d.backends import jax as jax_backend_module

        jax.config.update("jax_enable_x64", True)
        self.jax, self.jnp, self.module = jax, jnp, jax_backend_module

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> Any:
        return self.module.BatchNorm1d(**kwargs, dtype=self.jnp.dtype(param_dtype))

    def asarray(self, array: np.ndarray, dtype: str | None = None) -> Any:
        return self.jnp.asarray(np.asarray(array), dtype=None if dtype is None else self.jnp.dtype(dtype))

    def to_numpy(self, array: Any) -> np.ndarray:
        array = np.asarray(array)
        return array.astype(np.float64) if array.dtype.kind in "fV" else array

    def _loss_dtype(self, dtype: Any) -> Any:
        return self.jnp.promote_types(dtype, self.jnp.float32)

    def gradients(self, layer: Any, x: Any, dy: Any, mask: Any, training: bool) -> dict[str, np.ndarray]:
        jnp = self.jnp

        def loss(params: Any, x: Any) -> Any:
            y, _ = layer.apply(params, layer.state, x, mask=mask, training=training)
            wide = self._loss_dtype(y.dtype)
            return jnp.sum(y.astype(wide) * dy.astype(wide))

        params_grad, x_grad = self.jax.grad(loss, argnums=(0, 1))(layer.params, x)
        return {"x": self.to_numpy(x_grad), **{k: self.to_numpy(v) for k, v in params_grad.items()}}

    def run_replicated(self, jobs: Sequence[ReplicaJob]) -> list[ReplicaResult]:
        return [self._run_job(job) for job in jobs]

    def _run_job(self, job: ReplicaJob) -> ReplicaResult:
        jax, jnp = self.jax, self.jnp
        layer = self.make_layer(**job.layer)
        dtype = layer.dtype if job.xs[0].dtype == np.float64 else jnp.float32
        xs = jnp.stack([jnp.asarray(x, dtype) for x in job.xs])
        dys = jnp.stack([jnp.asarray(dy, dtype) for dy in job.dys])
        masks = None
        if any(m is not None for m in job.masks):  # a replica without a mask keeps everything
            masks = jnp.stack(
                [jnp.ones(x.shape[:-1], bool) if m is None else jnp.asarray(m) for x, m in zip(job.xs, job.masks)]
            )

        def replica(x: Any, mask: Any) -> Any:
            return layer.apply(layer.params, layer.state, x, mask=mask, training=True)

        def loss(xs: Any) -> Any:
            mapped = jax.vmap(replica, in_axes=(0, None if masks is None else 0), axis_name=job.layer["axis_name"])
            ys, states = mapped(xs, masks)
            return jnp.sum(ys * dys), (ys, states)

        x_grads, (ys, states) = jax.grad(loss, has_aux=True)(xs)
        params = {k: self.to_numpy(v) for k, v in layer.params.items()}
        return ReplicaResult(
            ys=[self.to_numpy(y) for y in ys],
            states=[{**params, **{k: self.to_numpy(v[r]) for k, v in states.items()}} for r in range(len(job.xs))],
            x_grads=[self.to_numpy(g) for g in x_grads],
        )


def jax_backend() -> JaxBackend:
    return JaxBackend()
