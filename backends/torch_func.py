"""``torch.func`` with bn1d's layers: the running statistics come back, nothing is mutated.

PyTorch's batch norms update their buffers in place, which ``torch.func.vmap`` rejects
(PyTorch's advice is to drop the running statistics). :func:`functional_call` is
``torch.func.functional_call`` for models holding bn1d layers (``BatchNorm1d``, and so
every converted batch norm) that returns the buffers after the call instead::

    y, new_buffers = functional_call(model, {**params, **buffers}, (x,))

It composes with ``torch.func.grad`` (``has_aux=True`` for the buffers) and with
``torch.func.vmap`` over an ensemble stacked by ``torch.func.stack_module_state``
(see ``docs/torch-models.md``). Within it each bn1d layer runs the core,
:func:`bn1d.algorithm.forward`, which is pure (``y`` and the new state from the
parameters, state and input): a training call gives what the layer's own call gives
(the same maths; PyTorch's kernels differ from the core only by rounding), an
inference call returns the buffers unchanged. PyTorch's own batch norms inside the
model still update their buffers in place: convert them first
(``convert_batchnorm``). Synced layers exchange as in their own call (a collective
per training call); ``vmap`` over synced layers is not supported (one collective
would have to serve a batch of models).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from bn1d.config import argument_error

from .torch import BatchNorm1d

__all__ = ["functional_call"]


@contextlib.contextmanager
def _returning_state(model: nn.Module) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Within it, each bn1d layer of ``model`` takes the core path and, instead of
    copying a training call's new state into its buffers, records it (by the layer's
    name) in the yielded mapping. The layers' methods are shadowed on the instances, so
    the stateful call outside costs nothing."""
    updates: dict[str, dict[str, torch.Tensor]] = {}
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BatchNorm1d)]
    saved = []

    def recorder(name: str, layer: BatchNorm1d) -> Any:
        def record(new_state: Mapping[str, torch.Tensor]) -> None:
            if layer._frozen:  # frozen statistics (a converted untracked module): nothing written
                return
            # Running statistics take no gradient (R2.3): detached, or the next step's graph
            # would hold this one's.
            values = {key: value.detach() for key, value in new_state.items()}
            count = updates.get(name, {}).get("num_batches_tracked", layer.num_batches_tracked)
            if "num_batches_tracked" not in values and count is not None:  # PyTorch's count of training calls
                values["num_batches_tracked"] = count + 1
            updates[name] = values

        return record

    def current(name: str, layer: BatchNorm1d, own: Any) -> Any:
        # A layer called twice in one functional_call (shared, or in a loop) chains its
        # updates, as its stateful calls do.
        def state() -> dict[str, torch.Tensor]:
            recorded = updates.get(name)
            return own() if recorded is None else {key: recorded[key] for key in layer.config.state_keys}

        return state

    shadowed = ("_route", "_update_state", "_state")
    try:
        for name, layer in layers:
            saved.append((layer, {key: layer.__dict__.get(key) for key in shadowed}))
            own_state = layer._state
            layer.__dict__["_route"] = lambda *args: "core"
            layer.__dict__["_update_state"] = recorder(name, layer)
            layer.__dict__["_state"] = current(name, layer, own_state)
        yield updates
    finally:
        for layer, methods in saved:
            for key, method in methods.items():
                if method is None:
                    layer.__dict__.pop(key, None)
                else:
                    layer.__dict__[key] = method


def functional_call(
    model: nn.Module,
    parameters_and_buffers: Mapping[str, torch.Tensor],
    args: Any = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    strict: bool = False,
    tie_weights: bool = True,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """``torch.func.functional_call(model, parameters_and_buffers, args, kwargs)`` and the
    buffers after it: ``(output, new_buffers)``, ``new_buffers`` holding every buffer of
    ``model`` by name, a bn1d layer's running statistics (and ``num_batches_tracked``)
    as its training call computed them, every other buffer as given (or the module's
    own where ``parameters_and_buffers`` has none). Neither the given tensors nor the
    module's are changed by the bn1d layers."""
    if not isinstance(model, nn.Module):
        raise argument_error("model", "a torch.nn.Module", type(model).__name__, TypeError)
    if not isinstance(parameters_and_buffers, Mapping):
        raise argument_error("parameters_and_buffers", "a mapping", type(parameters_and_buffers).__name__, TypeError)
    with _returning_state(model) as updates:
        output = torch.func.functional_call(
            model,
            dict(parameters_and_buffers),
            args,
            None if kwargs is None else dict(kwargs),
            strict=strict,
            tie_weights=tie_weights,
        )
    new_buffers = {name: parameters_and_buffers.get(name, buffer) for name, buffer in model.named_buffers()}
    for layer_name, values in updates.items():
        for key, value in values.items():
            new_buffers[f"{layer_name}.{key}" if layer_name else key] = value
    return output, new_buffers
