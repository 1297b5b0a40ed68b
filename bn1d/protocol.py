"""The uniform layer protocol that every backend's stateful ``BatchNorm1d`` follows.

The conformance suite drives every backend through this protocol only:

* construction with BrainPy's signature and defaults,
  ``BatchNorm1d(num_features, axis=(0, 1), epsilon=1e-5, momentum=0.99, affine=True,
  bias_initializer=Zeros(), scale_initializer=Ones(1.0), axis_name=None,
  axis_index_groups=None, mode=None, name=None)``, backend extras keyword-only
  after them (``dtype`` and the options of ``bn1d.config.OPTIONS``);
* ``layer(x, mask=None, training=None) -> y``: ``training=None`` uses the layer's
  mode (``mode`` at construction, then ``train()``/``eval()``); in training the
  call also updates the layer's running statistics;
* ``state_dict()`` -> the entries of ``config.keys``: ``scale``/``bias`` when
  affine, ``running_mean``/``running_var`` unless ``track_running_stats=False``, and
  ``num_batches_tracked`` with ``momentum=None``; values convertible to NumPy;
* ``load_state_dict(state)``: strict and atomic (``bn1d.state.check_state``);
* ``train(mode=True)`` / ``eval()`` and a ``training`` attribute.

Every bad argument raises the ``ValueError``/``TypeError`` of ``bn1d.config`` or
``bn1d.validation.check_inputs`` before any state changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

from .config import argument_error

__all__ = ["BatchNormLayer", "TrainingSwitch", "resolve_training"]

_Layer = TypeVar("_Layer", bound="TrainingSwitch")


@runtime_checkable
class BatchNormLayer(Protocol):
    training: bool

    def __call__(self, x: Any, mask: Any = None, training: bool | None = None) -> Any: ...

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


class TrainingSwitch:
    """``train()``/``eval()`` and the per-call ``training=`` of the protocol, for
    layers that are not ``torch.nn.Module`` (which has its own ``train``/``eval``)."""

    training: bool

    def train(self: _Layer, mode: bool = True) -> _Layer:
        if not isinstance(mode, bool):
            raise argument_error("mode", "a bool", mode, TypeError)
        self.training = mode
        return self

    def eval(self: _Layer) -> _Layer:
        return self.train(False)

    def resolve_training(self, training: Any) -> bool:
        """A call's ``training``: ``None`` means the layer's mode."""
        return resolve_training(training, self.training)


def resolve_training(training: Any, mode: bool) -> bool:
    """A call's ``training=``: ``None`` means the layer's ``mode``; else a bool."""
    if training is None:
        return mode
    if not isinstance(training, bool):
        raise argument_error("training", "None or a bool", training, TypeError)
    return training
