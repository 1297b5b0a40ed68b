"""bn1d: BrainPy's ``BatchNorm1d``, written once against the Array API standard.

The core (this package) never imports a framework; the layers live in
``bn1d.backends.numpy`` (the executable specification), ``bn1d.backends.jax`` and
``bn1d.backends.torch``.
"""

from .algorithm import AllSum, BatchNormResult, batch_norm, check_inputs
from .config import BatchNormConfig
from .initializers import Constant, Ones, Zeros
from .protocol import BatchNormLayer
from .state import STATE_KEYS, check_state

__all__ = [
    "AllSum",
    "BatchNormConfig",
    "BatchNormLayer",
    "BatchNormResult",
    "Constant",
    "Ones",
    "STATE_KEYS",
    "Zeros",
    "batch_norm",
    "check_inputs",
    "check_state",
]
__version__ = "0.1.0"
