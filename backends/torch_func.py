"""``torch.func`` with bn1d's layers: the running statistics come back, nothing is mutated.

PyTorch's batch norms update their buffers in place, which ``torch.func.vmap`` rejects.
:func:`functional_call` is ``torch.func.functional_call`` for models holding bn1d's layers
(convert PyTorch's first) that returns the buffers after the call instead::

    y, new_buffers = functional_call(model, {**params, **buffers}, (x,))

Within it each bn1d layer runs the core, :func:`bn1d.algorithm.forward` (pure), so it
composes with ``torch.func.grad`` (``has_aux=True``) and with ``vmap`` over an ensemble
from ``torch.func.stack_module_state``; synced layers exchange as in their own call, but
not under ``vmap`` (``docs/torch-models.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from bn1d.config import argument_error

from . import torch_functional

__all__ = ["functional_call"]


class _Recorder:
    """New running statistics by the identity of the tensor they would be written into;
    a later call in the same ``functional_call`` reads the newer value (a layer called
    twice chains its updates, as its stateful calls do)."""

    def __init__(self) -> None:
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, target: torch.Tensor, value: torch.Tensor) -> None:
        # Running statistics take no gradient (R2.3): detached, or the next step's graph
        # would hold this one's.
        self.values[id(target)] = (target, value.detach())

    def current(self, target: torch.Tensor) -> torch.Tensor:
        entry = self.values.get(id(target))
        return target if entry is None else entry[1]


@contextlib.contextmanager
def _recording() -> Iterator[_Recorder]:
    """Within it, every bn1d layer of this thread runs the core and records its new
    running statistics instead of writing them (``torch_functional.recording``)."""
    if getattr(torch_functional.recording, "recorder", None) is not None:
        raise RuntimeError("bn1d.backends.torch_func.functional_call: calls do not nest")
    recorder = torch_functional.recording.recorder = _Recorder()
    try:
        yield recorder
    finally:
        torch_functional.recording.recorder = None


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
    given = dict(parameters_and_buffers)
    with _recording() as recorder:
        output = torch.func.functional_call(
            model, given, args, None if kwargs is None else dict(kwargs), strict=strict, tie_weights=tie_weights
        )
    new_buffers = {}
    for name, buffer in model.named_buffers():
        value = given.get(name, buffer)
        new_buffers[name] = value if value is None else recorder.current(value)
    return output, new_buffers
