"""The PyTorch backend: ``BatchNorm1d`` with BrainPy's signature, as a ``torch.nn.Module``.

It computes what ``bn1d.algorithm`` states and the NumPy backend specifies (``docs/spec.md``;
README's table lists where it departs from PyTorch, BrainPy and Flax). PyTorch's own
classes computing the same are the drop-ins of ``bn1d.backends.torch_nn``; both reach
:func:`bn1d.backends.torch_functional.batch_norm`, the PyTorch backend's one dispatch point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from bn1d import validation
from bn1d.backends.formats import from_torch_state_dict, to_torch_state_dict, torch_momentum
from bn1d.config import OPTIONS, argument_error
from bn1d.initializers import Ones, Zeros
from bn1d.layer import brainpy_arguments, brainpy_signature, initial_state
from bn1d.protocol import resolve_training
from bn1d.state import check_state

from .torch_distributed import Sync, check_timeout
from .torch_functional import dispatch
from .torch_nn import convert_batchnorm, revert_batchnorm, sync_running_statistics

__all__ = ["BatchNorm1d", "convert_batchnorm", "revert_batchnorm", "sync_running_statistics"]

_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_PARAM_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def converted_momentum(momentum: float | None, remembered: float | None) -> float | None:
    """``momentum`` in the other convention (PyTorch's ``1 - m`` for bn1d's, and back):
    ``remembered``, the momentum an object was converted from, where it maps to
    ``momentum`` (so every float comes back: ``bn1d.backends.formats.torch_momentum`` alone cannot
    invert every float below 0.5), else ``torch_momentum(momentum)``; ``None`` (the
    cumulative average) stays."""
    if momentum is None:
        return None
    if remembered is not None and (torch_momentum(remembered) == momentum or torch_momentum(momentum) == remembered):
        return remembered
    return torch_momentum(momentum)


class BatchNorm1d(nn.Module):
    """1-D batch normalization with BrainPy's signature, as a ``torch.nn.Module``.

    ``layer(x, mask=None, training=None) -> y``; ``.train()``/``.eval()`` set the mode and a
    call's ``training=`` overrides it. The keyword-only options of ``bn1d.config.OPTIONS`` and:

    * ``process_group``: the ``torch.distributed`` group to sync over when ``axis_name`` (here
      only a label) is set (``None``: WORLD); ``axis_index_groups`` partitions its ranks into
      subgroups, created on the first synced training call, which every rank must make.
      Without an initialised ``torch.distributed``, a synced layer uses its local batch.
    * ``device``, ``dtype`` (float32 by default, or float64) of parameters and statistics.
    * ``timeout``: seconds each collective may wait (``None``: the group's), then a ``RuntimeError``.
    * ``native_kernel``: use PyTorch's kernels where their semantics are ours.

    ``scale``/``bias`` are parameters (absent, not ``None``, when not affine),
    ``running_mean``/``running_var`` buffers (``None`` without ``track_running_stats``).
    ``num_batches_tracked`` counts training calls as PyTorch does; it is state (in
    ``state_dict()``, which has exactly the contract's keys) only with ``momentum=None``,
    as the cumulative average's count of calls that saw data.
    """

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None

    @brainpy_signature
    def __init__(
        self, *args: Any, process_group: Any = None, device: Any = None, dtype: torch.dtype | None = None,
        timeout: float | None = None, native_kernel: bool = True, **kwargs: Any,
    ):  # fmt: skip
        config, scale_initializer, bias_initializer = brainpy_arguments(*args, **kwargs)
        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or dtype not in _PARAM_DTYPES:
            raise argument_error("dtype", "None, torch.float32 or torch.float64", dtype, TypeError)
        if process_group is not None and not config.synced:
            raise argument_error(
                "process_group", "None when axis_name is None (axis_name turns sync on)", process_group
            )
        timeout = check_timeout(timeout)
        sync = Sync(process_group, config.axis_index_groups, timeout) if config.synced else None  # checks process_group
        if not isinstance(native_kernel, bool):
            raise argument_error("native_kernel", "a bool", native_kernel, TypeError)
        values = initial_state(config, scale_initializer, bias_initializer, _PARAM_DTYPES[dtype])
        super().__init__()
        self.config, self.name, self.process_group = config, config.name, process_group
        self.timeout = timeout
        factory = {"device": device, "dtype": dtype}
        for key in config.param_keys:  # not affine: no scale/bias attributes at all, not None ones
            setattr(self, key, nn.Parameter(torch.as_tensor(values[key], **factory)))
        tracked = config.track_running_stats
        for key in ("running_mean", "running_var"):
            self.register_buffer(key, torch.as_tensor(values[key], **factory) if tracked else None)
        count = torch.tensor(0, dtype=torch.long, device=device) if tracked else None
        self.register_buffer("num_batches_tracked", count, persistent="num_batches_tracked" in config.state_keys)
        self.train(config.training)
        self._sync = sync
        self._native_kernel = native_kernel
        # the options away from their defaults (the running statistics say track_running_stats)
        self._options = tuple((k, getattr(config, k)) for k in sorted(OPTIONS) if k != "track_running_stats"
                              and getattr(config, k) != OPTIONS[k])  # fmt: skip
        # PyTorch's factor for its kernels: the exact complement where there is one (m >= 0.5,
        # Sterbenz), not torch_momentum's shortest decimal; the kernels run only where
        # 1 - factor is m (torch_functional.dispatch), the core takes m itself
        self._factor = None if config.momentum is None else 1.0 - config.momentum
        self._layout = (config.num_features, config.feature_axis, config.ndim)  # read on every call

    # -- the uniform layer protocol -------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, training: bool | None = None) -> torch.Tensor:
        """``y`` for ``x``; in training also updates the running statistics. The input is
        seen in PyTorch's layout, features on axis 1, and normalised by
        :func:`~bn1d.backends.torch_functional.batch_norm`'s trusted entry, ``dispatch``
        (the inputs are checked here, and bn1d's momentum reaches the core exactly)."""
        training = resolve_training(training, self.training)
        config, (c, fa, ndim) = self.config, self._layout
        if mask is not None or not (
            isinstance(x, torch.Tensor) and x.dtype in _FLOAT_DTYPES and x.dim() == ndim and x.shape[fa] == c
        ):
            if not isinstance(x, torch.Tensor) and hasattr(x, "shape"):  # the type first: an array of another library
                raise argument_error("x", "a torch.Tensor", type(x).__name__, TypeError)
            validation.check_inputs(x, mask, num_features=c, reduce_axes=config.reduce_axes)
            if not isinstance(x, torch.Tensor):
                raise argument_error("x", "a torch.Tensor", type(x).__name__, TypeError)
        tracked, sync, buffers, parameters = config.track_running_stats, self._sync, self._buffers, self._parameters
        if x.numel() == c and mask is None and (training or not tracked) and (sync is None or sync.group() is None):
            validation.refuse_one_value(x, training)  # R3.5, naming x's own shape (the view's differs)
        if training and sync is not None:
            sync.described = (tuple(x.shape), config)  # a mismatch between ranks names x's own shapes
        if fa == 1:  # PyTorch's layout already
            view, view_mask = x, mask
        elif fa == ndim - 1:  # features last: the (rows, C) matrix it is
            view, view_mask = x.reshape(-1, c), None if mask is None else mask.reshape(-1)
        else:
            view, view_mask = x.movedim(fa, 1), mask
        y = dispatch(
            view, buffers["running_mean"], buffers["running_var"], parameters.get("scale"), parameters.get("bias"),
            training or not tracked, self._factor, config.epsilon,
            buffers["num_batches_tracked"] if training and tracked else None, view_mask,
            sync if training else None, self._native_kernel, self._options, config.momentum,
        )  # fmt: skip
        if fa == 1:
            return y
        if fa == ndim - 1:
            return y.view(x.shape) if y.is_contiguous() else y.reshape(x.shape)
        return y.movedim(1, fa)

    # -- state ----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> BatchNorm1d:
        if not isinstance(mode, bool):
            raise argument_error("mode", "a bool", mode, TypeError)
        return super().train(mode)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load ``config.keys``: strict and atomic (``bn1d.state.check_state``). Values
        are copied into the module's tensors, or with ``assign=True`` the given
        tensors become the module's (PyTorch's meaning: their device is kept, e.g.
        to fill a module built on the ``meta`` device), cast to the layer's dtype."""
        if strict is not True:
            raise argument_error("strict", "True (loading is always strict)", strict)
        if not isinstance(assign, bool):
            raise argument_error("assign", "a bool", assign, TypeError)
        self._set_state(self._checked_state(state_dict), state_dict, assign)
        return _IncompatibleKeys([], [])

    def _reference(self) -> torch.Tensor | None:
        """The first of ``scale`` and ``running_mean`` (``None`` when there is neither):
        the parameters' and statistics' dtype and device."""
        return next((getattr(self, key) for key in self.config.keys if key in ("scale", "running_mean")), None)

    def _checked_state(self, state_dict: Any, names: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        """``check_state`` for this layer (``names``: how its errors name the entries)."""
        reference = self._reference()
        dtype = np.float32 if reference is None else _PARAM_DTYPES.get(reference.dtype, np.float32)
        return check_state(state_dict, self.config, dtype=dtype, names=names)

    def _set_state(self, checked: Mapping[str, np.ndarray], given: Mapping[str, Any], assign: bool) -> None:
        with torch.no_grad():
            for key, value in checked.items():
                current = getattr(self, key)
                if not assign:
                    current.copy_(torch.from_numpy(value))
                    continue
                source = given[key]
                source = source.detach() if isinstance(source, torch.Tensor) else torch.from_numpy(value)
                tensor = source.to(dtype=current.dtype)
                if key in self._parameters:
                    self._parameters[key] = nn.Parameter(tensor, requires_grad=current.requires_grad)
                else:
                    self._buffers[key] = tensor
            count, reference = self.num_batches_tracked, self._reference()
            if assign and count is not None and reference is not None and count.device != reference.device:
                # PyTorch's count of training calls, not state here: it follows the assigned tensors
                moved = (
                    torch.zeros_like(count, device=reference.device) if count.is_meta else count.to(reference.device)
                )
                self._buffers["num_batches_tracked"] = moved

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:  # fmt: skip
        """Loading as part of a parent module, with PyTorch's semantics: the entries present
        are loaded, absent ones reported as ``missing_keys`` and unknown ones as
        ``unexpected_keys`` (the parent raises for either when ``strict``). The entries
        present are checked together first, absent ones as placeholders of the right shape;
        an error, naming each entry by its full key, is reported to the parent (which raises
        it as PyTorch's ``RuntimeError``) and nothing of this layer is loaded."""
        local = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        keys = self.config.keys
        present = {key: local[key] for key in keys if key in local}
        if present:
            placeholders = initial_state(self.config, Ones(1.0), Zeros(), np.float64)
            try:
                checked = self._checked_state({**placeholders, **present}, {key: prefix + key for key in local})
            except (TypeError, ValueError) as error:
                error_msgs.append(str(error))
                return
            assign = bool(local_metadata.get("assign_to_params_buffers", False))
            self._set_state({key: checked[key] for key in present}, present, assign)
        missing_keys.extend(prefix + key for key in keys if key not in local)
        unexpected_keys.extend(prefix + key for key in local if key not in keys)

    # -- interop with torch.nn.BatchNorm1d -------------------------------------------
    @classmethod
    def from_torch(cls, module: nn.BatchNorm1d, axis: int | Sequence[int] = (0, 2), **kwargs: Any) -> BatchNorm1d:
        """A layer computing what ``module`` computes. PyTorch's ``(N, C, L)`` input is
        ``axis=(0, 2)`` here (the default) and its ``(N, C)`` input ``axis=0``; any
        other ``axis`` takes the same state for another layout. PyTorch's
        ``momentum=None`` (the cumulative average) and ``track_running_stats=False``
        carry over. ``kwargs`` go to the constructor (e.g. ``axis_name``)."""
        if not isinstance(module, nn.BatchNorm1d):
            raise argument_error("module", "a torch.nn.BatchNorm1d", type(module).__name__, TypeError)
        tracked = module.running_mean is not None  # PyTorch's own test: a module without buffers never tracks
        if tracked and not module.track_running_stats:
            raise argument_error(
                "module",
                "a torch.nn.BatchNorm1d whose track_running_stats is True when it has running statistics (frozen "
                "statistics stay frozen under convert_batchnorm, which keeps PyTorch's class)",
                "track_running_stats=False with its running statistics kept",
            )
        momentum = converted_momentum(cast(Any, module).momentum, getattr(module, "_bn1d_momentum", None))
        reference = module.running_mean if tracked else module.weight
        layer = cls(
            module.num_features, axis, module.eps, momentum, module.affine,
            mode=None if module.training else "inference", device=None if reference is None else reference.device,
            dtype=torch.float32 if reference is None else reference.dtype, track_running_stats=tracked, **kwargs,
        )  # fmt: skip
        layer.load_state_dict(from_torch_state_dict(module.state_dict(), cumulative=momentum is None))
        if tracked:  # PyTorch's count of training calls, also where it is not our state
            cast(torch.Tensor, layer.num_batches_tracked).copy_(cast(torch.Tensor, module.num_batches_tracked))
        layer.__dict__["_torch_momentum"] = module.momentum  # to_torch gives it back, every float (converted_momentum)
        return layer

    def to_torch(self) -> nn.BatchNorm1d:
        """An ``nn.BatchNorm1d`` with this layer's state, momentum ``1 - momentum``
        (``None`` stays ``None``), ``track_running_stats`` and mode. It takes PyTorch's
        layout (features on axis 1): the same outputs as this layer when ``axis`` is
        ``(0, 2)`` or ``0``. Raises ``ValueError`` for the options PyTorch's layer
        cannot reproduce."""
        config = self.config
        convertible = {**OPTIONS, "track_running_stats": config.track_running_stats, "axis_name": None}
        for option, default in convertible.items():  # every option but the one PyTorch has
            if getattr(config, option) != default:
                raise argument_error(option, f"{default} to convert to torch.nn.BatchNorm1d", getattr(config, option))
        reference = self._reference()
        factory: dict[str, Any] = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        momentum = converted_momentum(config.momentum, getattr(self, "_torch_momentum", None))
        module = nn.BatchNorm1d(
            config.num_features, eps=config.epsilon, momentum=momentum, affine=config.affine,
            track_running_stats=config.track_running_stats, **factory,
        )  # fmt: skip
        count = 0 if self.num_batches_tracked is None else int(self.num_batches_tracked)
        state = to_torch_state_dict(self.state_dict(), count)
        module.load_state_dict({key: torch.as_tensor(value) for key, value in state.items()})
        module.__dict__["_bn1d_momentum"] = config.momentum  # from_torch gives it back (converted_momentum)
        return module.train(self.training)

    def extra_repr(self) -> str:
        c = self.config
        options = "".join(f", {k}={getattr(c, k)}" for k, default in OPTIONS.items() if getattr(c, k) != default)
        return (
            f"{c.num_features}, axis={c.reduce_axes}, epsilon={c.epsilon}, momentum={c.momentum}, "
            f"affine={c.affine}, axis_name={c.axis_name!r}{options}"
        )
