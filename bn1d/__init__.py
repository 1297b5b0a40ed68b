"""bn1d: BrainPy's ``BatchNorm1d``, written once against the Array API standard.

The core (this package) never imports a framework; the layers live in
``bn1d.backends.numpy`` (the executable specification), ``bn1d.backends.jax`` and
``bn1d.backends.torch``.
"""

import os as _os

from .algorithm import AllSum, BatchNormResult, batch_norm, check_inputs
from .config import BatchNormConfig
from .initializers import Constant, Ones, Zeros
from .protocol import BatchNormLayer
from .state import STATE_KEYS, check_state

# In a source checkout the adapters and the suite sit beside this folder, in
# ../backends and ../conformance; setuptools maps them to bn1d.backends and
# bn1d.conformance when it installs the package. When Python imports bn1d from the
# checkout itself (e.g. `python -m ...` run from its root, whose bn1d/ then shadows
# the installed one), the checkout's root joins the package path so that those two
# resolve the same way.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "backends")):
    _root = _os.path.dirname(_here)
    if _os.path.isfile(_os.path.join(_root, "backends", "numpy.py")):
        __path__.append(_root)

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
