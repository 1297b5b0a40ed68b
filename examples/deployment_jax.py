"""From training to a serialized ``jax.export`` artifact with bn1d's Flax NNX and Equinox drop-ins.

    python examples/deployment_jax.py [--json PATH]

For each library, a small convnet (``Conv -> BatchNorm -> relu``, twice, a mean over the
image, then ``Linear -> BatchNorm``) with bn1d's drop-in batch norms is trained a few steps on
synthetic images whose pixels sit on an offset (``|mean| / std`` at the first batch norm of
about 1, 1e2 and 1e4), its statistics recomputed exactly (``bn1d.backends.jax_population``),
folded (``nnx_fold.fold_model`` / ``equinox_fold.fold_model``), exported with ``jax.export``
with a symbolic batch dimension, serialized, read back and run on a held-out batch of
another size, and, where the third-party converter jax2onnx is installed, converted to ONNX
and run in onnxruntime. Each error against the unfolded model in float64 is printed beside
the unfolded float32 model's, relative to the largest output. (jax2onnx converts the folded
models; bn1d's unfolded JAX layers it cannot, as it patches ``jnp.shape`` to trace.)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bn1d.backends import equinox as bn_eqx
from bn1d.backends import equinox_fold, nnx_fold
from bn1d.backends import nnx as bn_nnx
from bn1d.backends.jax_population import recompute_equinox_statistics, recompute_statistics


def images(count: int, offset: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images, channels last (12, 12, 3), unit noise on ``offset``; the label: which half is brighter."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    x = rng.standard_normal((count, 12, 12, 3))
    x[labels == 1, :6] += 1.0
    return (x + offset).astype(np.float32), labels


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.features = nnx.Sequential(
            nnx.Conv(3, 8, (3, 3), padding="VALID", rngs=rngs), bn_nnx.BatchNorm(8, rngs=rngs), nnx.relu,
            nnx.Conv(8, 16, (3, 3), padding="VALID", rngs=rngs), bn_nnx.BatchNorm(16, rngs=rngs), nnx.relu,
        )  # fmt: skip
        self.head = nnx.Sequential(nnx.Linear(16, 2, rngs=rngs), bn_nnx.BatchNorm(2, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x).mean(axis=(1, 2)))


def float64_output(graphdef: nnx.GraphDef, state: nnx.State, x: np.ndarray) -> np.ndarray:
    """The model of ``graphdef`` and ``state`` with every value cast exactly to float64."""
    with jax.enable_x64(True):
        wide = jax.tree.map(lambda v: jnp.asarray(np.asarray(v, np.float64)), state)
        return np.asarray(nnx.merge(graphdef, wide)(jnp.asarray(x, jnp.float64)), np.float64)


def run_nnx(offset: float) -> dict[str, float]:
    x, labels = images(512, offset, seed=1)
    model = NNXNet(nnx.Rngs(0))
    first = np.asarray(model.features.layers[0](jnp.asarray(x[:64])), np.float64)
    ratio = float(np.median(np.abs(first.mean((0, 1, 2))) / first.std((0, 1, 2))))
    for step in range(32):
        batch = slice(16 * step, 16 * step + 16)
        inputs, targets = jnp.asarray(x[batch]), jnp.asarray(labels[batch])
        grads = nnx.grad(lambda m, inputs=inputs, targets=targets: cross_entropy(m(inputs), targets))(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.05 * g, params, nnx.state(grads, nnx.Param)))
    model.eval()
    recompute_statistics(model, np.split(x, 8))
    held_out, _ = images(40, offset, seed=2)
    graphdef, state = nnx.split(model)
    reference = float64_output(graphdef, state, held_out)
    folded = nnx_fold.fold_model(model)
    restored = exported(lambda x: folded(x))  # the weights become the artifact's constants
    outputs = {"unfolded float32": model(jnp.asarray(held_out)), "folded, exported": restored.call(held_out)}
    outputs.update(onnx_outputs(lambda x: folded(x), held_out))
    return row("nnx", offset, ratio, reference, outputs)


class EquinoxNet(eqx.Module):
    features: eqx.nn.Sequential
    head: eqx.nn.Sequential

    def __init__(self, key: jax.Array):
        keys = jax.random.split(key, 3)
        self.features = eqx.nn.Sequential([
            eqx.nn.Conv2d(3, 8, 3, key=keys[0]), bn_eqx.BatchNorm(8, "batch", mode="batch"), eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Conv2d(8, 16, 3, key=keys[1]), bn_eqx.BatchNorm(16, "batch", mode="batch"),
            eqx.nn.Lambda(jax.nn.relu),
        ])  # fmt: skip
        self.head = eqx.nn.Sequential([eqx.nn.Linear(16, 2, key=keys[2]), bn_eqx.BatchNorm(2, "batch", mode="batch")])

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        h, state = self.features(x, state)
        return self.head(h.mean(axis=(1, 2)), state)


def batched(model: EquinoxNet, state: eqx.nn.State, x: jax.Array) -> tuple[jax.Array, eqx.nn.State]:
    """One example per ``vmap`` lane, as Equinox runs a batch (channels first)."""
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(jnp.moveaxis(x, -1, 1), state)


def run_equinox(offset: float) -> dict[str, float]:
    x, labels = images(512, offset, seed=1)
    model, state = eqx.nn.make_with_state(EquinoxNet)(jax.random.key(0))
    first = np.asarray(jax.vmap(model.features.layers[0])(jnp.moveaxis(jnp.asarray(x[:64]), -1, 1)), np.float64)
    ratio = float(np.median(np.abs(first.mean((0, 2, 3))) / first.std((0, 2, 3))))

    @eqx.filter_jit
    def step(model: EquinoxNet, state: eqx.nn.State, x: jax.Array, y: jax.Array) -> tuple[EquinoxNet, eqx.nn.State]:
        def loss(model: EquinoxNet) -> tuple[jax.Array, eqx.nn.State]:
            logits, new_state = batched(model, state, x)
            return cross_entropy(logits, y), new_state

        grads, new_state = eqx.filter_grad(loss, has_aux=True)(model)
        return eqx.apply_updates(model, jax.tree.map(lambda g: -0.05 * g, grads)), new_state

    for i in range(32):
        batch = slice(16 * i, 16 * i + 16)
        model, state = step(model, state, jnp.asarray(x[batch]), jnp.asarray(labels[batch]))
    model = eqx.nn.inference_mode(model)
    state = recompute_equinox_statistics(model, state, np.split(x, 8), apply=lambda m, s, b: batched(m, s, b))
    held_out, _ = images(40, offset, seed=2)
    with jax.enable_x64(True):
        wide = jax.tree.map(lambda v: jnp.asarray(np.asarray(v, np.float64)) if eqx.is_array(v) else v, (model, state))
        reference = np.asarray(batched(*wide, jnp.asarray(held_out, jnp.float64))[0], np.float64)
    folded, folded_state = equinox_fold.fold_model(model, state)
    restored = exported(lambda x: batched(folded, folded_state, x)[0])
    outputs = {
        "unfolded float32": batched(model, state, jnp.asarray(held_out))[0],
        "folded, exported": restored.call(held_out),
    }
    outputs.update(onnx_outputs(lambda x: batched(folded, folded_state, x)[0], held_out))
    return row("equinox", offset, ratio, reference, outputs)


def exported(apply: Any) -> jax.export.Exported:
    """``apply`` (images -> outputs) exported with a symbolic batch, serialized and read back."""
    (b,) = jax.export.symbolic_shape("b")
    artifact = jax.export.export(jax.jit(apply))(jax.ShapeDtypeStruct((b, 12, 12, 3), jnp.float32))
    return jax.export.deserialize(artifact.serialize())


def onnx_outputs(apply: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """``apply`` converted to ONNX by jax2onnx (a third-party converter; nothing without it) and
    run in onnxruntime, with a symbolic batch: ``{"folded, onnxruntime": output}``."""
    try:
        import onnxruntime
        from jax2onnx import to_onnx
    except ImportError:
        return {}
    model = to_onnx(apply, [("B", 12, 12, 3)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return {"folded, onnxruntime": session.run(None, {session.get_inputs()[0].name: x})[0]}


def row(library: str, offset: float, ratio: float, reference: np.ndarray, outputs: dict) -> dict:
    scale = float(np.abs(reference).max())
    errors = {name: float(np.abs(np.asarray(y, np.float64) - reference).max()) / scale for name, y in outputs.items()}
    return {"library": library, "offset": offset, "mean / std at the first batch norm": ratio, **errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = [run(offset) for run in (run_nnx, run_equinox) for offset in (1.0, 1e2, 1e4)]
    names = [name for name in rows[0] if name not in ("library", "offset", "mean / std at the first batch norm")]
    print("| library | mean / std at the first batch norm | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in rows:
        cells = " | ".join(f"{r[name]:.1e}" for name in names)
        print(f"| {r['library']} | {r['mean / std at the first batch norm']:.3g} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
