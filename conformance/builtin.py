"""bn1d's own conformance adapters, registered through the same entry points
(``bn1d.conformance.backends``) that third-party backends use.

Each factory imports its framework only when called, so a missing framework
shows up as :class:`~bn1d.conformance.registry.BackendUnavailable`.
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from bn1d.layer import Layer
from bn1d.replicas import run_replicas

from .registry import ReplicaJob, ReplicaResult

__all__ = ["ArrayApiBackend", "array_api_strict_backend", "numpy_backend", "jax_backend", "torch_backend"]


class ArrayApiBackend:
    """Any Array API library through :class:`bn1d.Layer`, with no adapter code: the
    layer is ``Layer(..., xp=xp)`` (or a backend's subclass), gradients are the core's
    analytic ``vjp``, synced cases run on threads (:func:`bn1d.replicas.run_replicas`)
    through the core's ``hook`` (``"all_sum"`` or ``"all_gather"``).
    ``docs/new-library.md`` shows a library joining the suite this way."""

    def __init__(self, name: str, xp: Any, dtypes: Sequence[str], layer: Any = None, hook: str = "all_sum"):
        self.name, self.xp, self.dtypes, self.hook = name, xp, tuple(dtypes), hook
        self.layer = layer if layer is not None else functools.partial(Layer, xp=xp)

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> Any:
        return self.layer(**kwargs, dtype=getattr(self.xp, param_dtype))

    def asarray(self, array: np.ndarray, dtype: str | None = None) -> Any:
        array = np.asarray(array, dtype=dtype)
        return self.xp.asarray(array, dtype=getattr(self.xp, array.dtype.name))

    def to_numpy(self, array: Any) -> np.ndarray:
        array = np.asarray(array)
        return array.astype(np.float64) if array.dtype.kind == "f" else array

    def gradients(self, layer: Any, x: Any, dy: Any, mask: Any, training: bool) -> dict[str, np.ndarray]:
        return {k: self.to_numpy(v) for k, v in layer.vjp(x, dy, mask=mask, training=training).items()}

    def run_replicated(self, jobs: Sequence[ReplicaJob]) -> list[ReplicaResult]:
        return [self._run_job(job) for job in jobs]

    def _run_job(self, job: ReplicaJob) -> ReplicaResult:
        layers = [self.make_layer(**job.layer) for _ in job.xs]
        xs = [self.asarray(x) for x in job.xs]
        dys = [self.asarray(dy, str(np.asarray(x).dtype)) for x, dy in zip(job.xs, job.dys)]
        masks = [None if m is None else self.asarray(m) for m in job.masks]
        count = len(layers)

        def call(fn: Any) -> list[Any]:
            return run_replicas(fn, count, hook=self.hook)

        grads = call(lambda r: layers[r].vjp(xs[r], dys[r], mask=masks[r]))
        ys = call(lambda r: layers[r](xs[r], mask=masks[r]))
        return ReplicaResult(
            ys=[self.to_numpy(y) for y in ys],
            states=[{k: self.to_numpy(v) for k, v in layer.state_dict().items()} for layer in layers],
            x_grads=[self.to_numpy(g["x"]) for g in grads],
        )


class NumpyBackend(ArrayApiBackend):
    """The specification, ``bn1d.backends.numpy``: the generic adapter on NumPy."""

    name = "numpy"

    def __init__(self) -> None:
        import array_api_compat.numpy

        from bn1d.backends import numpy as numpy_backend_module

        self.module = numpy_backend_module
        dtypes = ("float16", "float32", "float64")
        super().__init__(type(self).name, array_api_compat.numpy, dtypes, numpy_backend_module.BatchNorm1d)


def numpy_backend() -> NumpyBackend:
    return NumpyBackend()


def array_api_strict_backend() -> ArrayApiBackend:
    """``bn1d.Layer`` on ``array_api_strict`` (float32 and float64: the standard has no
    half types), synced through the ``all_gather`` hook: the hook PyTorch's exchange
    uses, checked against the specification (which sums)."""
    import array_api_strict

    return ArrayApiBackend("array_api_strict", array_api_strict, ("float32", "float64"), hook="all_gather")


class JaxBackend:
    """``bn1d.backends.jax``; gradients by ``jax.grad`` through ``apply``, synced
    cases under ``jax.vmap`` with an ``axis_name`` (works on one device).

    The float64 cases run with ``jax_enable_x64`` on (:meth:`precision`), every
    other case with JAX's default (off): float32 sums accumulate in float32 there,
    which is what JAX users run.
    """

    name = "jax"
    dtypes = ("float16", "bfloat16", "float32", "float64")

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        from bn1d.backends import jax as jax_backend_module

        self.jax, self.jnp, self.module = jax, jnp, jax_backend_module

    def precision(self, dtype: str) -> Any:
        """The context a case of input dtype ``dtype`` runs in: x64 only for float64."""
        return self.jax.enable_x64(dtype == "float64")

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
        results = []
        for job in jobs:
            with self.precision(str(np.asarray(job.xs[0]).dtype)):
                results.append(self._run_job(job))
        return results

    def _replicas(self, layer: Any, name: Any) -> Any:
        """``f(xs, masks) -> (ys, per-replica states)``: ``layer``'s training call on every
        replica under ``jax.vmap`` (the JAX module backends override it)."""

        def replica(x: Any, mask: Any) -> Any:
            return layer.apply(layer.params, layer.state, x, mask=mask, training=True)

        return lambda xs, masks: self.jax.vmap(replica, in_axes=(0, None if masks is None else 0), axis_name=name)(
            xs, masks
        )

    def _run_job(self, job: ReplicaJob) -> ReplicaResult:
        """Every replica's training call and the gradient of ``sum(y_r * dy_r)`` with
        respect to every replica's input."""
        jax, jnp = self.jax, self.jnp
        layer = self.make_layer(**job.layer)
        dtype = jnp.float64 if job.xs[0].dtype == np.float64 else jnp.float32  # float64 jobs: float64 layers
        xs = jnp.stack([jnp.asarray(x, dtype) for x in job.xs])
        dys = jnp.stack([jnp.asarray(dy, dtype) for dy in job.dys])
        masks = None
        if any(m is not None for m in job.masks):  # a replica without a mask keeps everything
            masks = jnp.stack(
                [jnp.ones(x.shape[:-1], bool) if m is None else jnp.asarray(m) for x, m in zip(job.xs, job.masks)]
            )
        replicas = self._replicas(layer, job.layer["axis_name"])

        def loss(xs: Any) -> Any:
            ys, states = replicas(xs, masks)
            return jnp.sum(ys * dys), (ys, states)

        x_grads, (ys, states) = jax.grad(loss, has_aux=True)(xs)
        params = {k: self.to_numpy(v) for k, v in layer.state_dict().items() if k in ("scale", "bias")}
        return ReplicaResult(
            ys=[self.to_numpy(y) for y in ys],
            states=[{**params, **{k: self.to_numpy(v[r]) for k, v in states.items()}} for r in range(len(job.xs))],
            x_grads=[self.to_numpy(g) for g in x_grads],
        )


def jax_backend() -> JaxBackend:
    return JaxBackend()


class TorchBackend:
    """``bn1d.backends.torch``; gradients by autograd, synced cases on real
    ``torch.distributed`` collectives: one gloo process per replica on this host,
    started once for all the synced cases and bounded in time."""

    name = "torch"
    dtypes = ("float16", "bfloat16", "float32", "float64")
    #: Seconds the whole multi-process launch may take before it is killed.
    launch_timeout = 300.0

    def __init__(self) -> None:
        import torch

        from bn1d.backends import torch as torch_backend_module

        self.torch, self.module = torch, torch_backend_module

    def _dtype(self, name: str) -> Any:
        return getattr(self.torch, name)

    def make_layer(self, param_dtype: str = "float32", **kwargs: Any) -> Any:
        return self.module.BatchNorm1d(**kwargs, dtype=self._dtype(param_dtype))

    def asarray(self, array: np.ndarray, dtype: str | None = None) -> Any:
        tensor = self.torch.from_numpy(np.array(array))
        return tensor if dtype is None else tensor.to(self._dtype(dtype))

    def to_numpy(self, array: Any) -> np.ndarray:
        tensor = array.detach().cpu()
        return tensor.double().numpy() if tensor.is_floating_point() else tensor.numpy()

    def gradients(self, layer: Any, x: Any, dy: Any, mask: Any, training: bool) -> dict[str, np.ndarray]:
        torch = self.torch
        x = x.detach().requires_grad_()
        y = layer(x, mask=mask, training=training)
        wide = torch.promote_types(y.dtype, torch.float32)
        params = dict(layer.named_parameters())
        grads = torch.autograd.grad((y.to(wide) * dy.to(wide)).sum(), [x, *params.values()])
        return {"x": self.to_numpy(grads[0]), **{k: self.to_numpy(g) for k, g in zip(params, grads[1:])}}

    def run_replicated(self, jobs: Sequence[ReplicaJob]) -> list[ReplicaResult]:
        if not jobs:
            return []
        world = len(jobs[0].xs)
        if any(len(job.xs) != world for job in jobs):
            raise ValueError(
                f"jobs: expected the same number of replicas in every job, got {[len(j.xs) for j in jobs]}"
            )
        with tempfile.TemporaryDirectory() as scratch:
            jobs_path = os.path.join(scratch, "jobs.pkl")
            with open(jobs_path, "wb") as stream:
                pickle.dump(list(jobs), stream)
            command = [sys.executable, "-m", "bn1d.conformance.torch_replicas", jobs_path]
            rendezvous = os.path.join(scratch, "rendezvous")
            processes = [
                subprocess.Popen(
                    [*command, str(rank), str(world), rendezvous, scratch],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )  # fmt: skip
                for rank in range(world)
            ]
            outputs = []
            try:
                for process in processes:
                    outputs.append(process.communicate(timeout=self.launch_timeout)[0])
            finally:
                for process in processes:  # never leave a rank behind
                    if process.poll() is None:
                        process.kill()
                        process.wait()
            failed = [(r, p.returncode, out) for r, (p, out) in enumerate(zip(processes, outputs)) if p.returncode]
            if failed or len(outputs) < world:
                rank, code, out = failed[0] if failed else (len(outputs), None, "timed out")
                raise RuntimeError(f"torch replica {rank} failed (exit {code}):\n{out[-2000:]}")
            per_rank = [dict(np.load(os.path.join(scratch, f"{rank}.npz"))) for rank in range(world)]
        return [
            ReplicaResult(
                ys=[arrays[f"{index}/y"] for arrays in per_rank],
                states=[
                    {k.split("/", 2)[2]: v for k, v in arrays.items() if k.startswith(f"{index}/state/")}
                    for arrays in per_rank
                ],
                x_grads=[arrays[f"{index}/grad/x"] for arrays in per_rank],
            )
            for index in range(len(jobs))
        ]


def torch_backend() -> TorchBackend:
    return TorchBackend()
