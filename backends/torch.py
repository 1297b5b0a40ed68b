"""The PyTorch backend: ``BatchNorm1d`` as a ``torch.nn.Module``.

It computes what ``bn1d.algorithm`` states (the maths) and the NumPy backend
specifies, under the contract ``docs/spec.md``; where it departs from PyTorch's ``nn.BatchNorm1d``, BrainPy and Flax is
the table in the README.

PyTorch idioms: ``scale``/``bias`` are ``nn.Parameter`` (absent, not ``None``,
when not affine), ``running_mean``/``running_var`` buffers (``None`` without
``track_running_stats``, as in PyTorch). ``num_batches_tracked`` is a buffer: with
a float momentum it counts training calls as PyTorch does and is not part of
``state_dict()``; with ``momentum=None`` it is state, the count of training calls
that saw data (the cumulative average's ``k``). So ``state_dict()`` has exactly the
contract's keys (``config.keys``). ``.train()``/``.eval()`` set the mode and each call's
``training=`` overrides it. Inputs are checked once, in :meth:`BatchNorm1d.forward`,
whichever path runs; :meth:`BatchNorm1d._route` chooses the path.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import array_api_compat.torch as xp
import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from bn1d import algorithm
from bn1d.algorithm import Hooks, call_dtype, compute_dtype
from bn1d.config import OPTIONS, BatchNormConfig, argument_error
from bn1d.initializers import Ones, Zeros
from bn1d.layer import initial_state
from bn1d.protocol import resolve_training
from bn1d.state import check_state, from_torch_state_dict, to_torch_state_dict, torch_momentum

from . import torch_kernels

__all__ = [
    "BatchNorm1d",
    "ChannelFirstBatchNorm",
    "check_timeout",
    "convert_batchnorm",
    "revert_batchnorm",
    "sync_running_statistics",
]

_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})
_PARAM_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
#: Below this many elements a hook making the gradient contiguous costs more than it
#: saves (``docs/performance.md``).
_CONTIGUOUS_GRAD_MIN_NUMEL = 1 << 17


def check_timeout(timeout: Any) -> float | None:
    """``timeout`` (seconds each collective may wait) checked, as a float, or ``None``:
    the one check of the layer's and ``sync_running_statistics``'s. Any real number
    but a bool (NumPy's scalars included) is a number; a non-number is a
    ``TypeError``, a number that is not finite and > 0 a ``ValueError`` (R7.1)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise argument_error("timeout", "None or a number of seconds", type(timeout).__name__, TypeError)
    seconds = float(timeout)
    if not (0 < seconds < math.inf):
        raise argument_error("timeout", "None or a finite number of seconds > 0", timeout)
    return seconds


def check_process_group(process_group: Any) -> Any:
    """``process_group`` checked: ``None`` or a ``torch.distributed.ProcessGroup``, else a
    ``TypeError`` (R7.1); the one check of the layer's and ``sync_running_statistics``'s."""
    if process_group is not None and not (
        torch.distributed.is_available() and isinstance(process_group, torch.distributed.ProcessGroup)
    ):
        raise argument_error("process_group", "None or a torch.distributed.ProcessGroup", process_group, TypeError)
    return process_group


@functools.lru_cache(maxsize=64)
def _fused_momentum(momentum: float) -> float:
    """``torch_momentum`` of a config's momentum (a Python float, ``BatchNormConfig``
    makes it one), computed once per value: the fused kernel's call is ~60 µs."""
    return torch_momentum(momentum)


def converted_momentum(momentum: float | None, remembered: float | None) -> float | None:
    """``momentum`` in the other convention (PyTorch's ``1 - m`` for bn1d's, and back):
    ``remembered``, the momentum an object was converted from, where it maps to
    ``momentum`` (so every float comes back: ``bn1d.state.torch_momentum`` alone cannot
    invert every float below 0.5), else ``torch_momentum(momentum)``; ``None`` (the
    cumulative average) stays."""
    if momentum is None:
        return None
    if remembered is not None and (torch_momentum(remembered) == momentum or torch_momentum(momentum) == remembered):
        return remembered
    return torch_momentum(momentum)


def _contiguous_gradient(grad: torch.Tensor) -> torch.Tensor:
    """PyTorch's CPU batch-norm backward is several times slower on a non-contiguous
    gradient (e.g. from ``y.sum()``)."""
    return grad.contiguous()


class BatchNorm1d(nn.Module):
    """1-D batch normalization with BrainPy's signature, as a ``torch.nn.Module``.

    ``layer(x, mask=None, training=None) -> y``. The keyword-only options of
    ``bn1d.config.OPTIONS`` (``fast_variance``, ``unbiased_running_var``,
    ``track_running_stats``) and:

    * ``process_group``: the ``torch.distributed`` group to sync over when
      ``axis_name`` is set (``None``: WORLD). ``axis_name`` is only a label here;
      setting it turns syncing on. ``axis_index_groups`` partitions the group's
      ranks into subgroups that sync separately (created with ``dist.new_group``
      on the first synced training call, which every rank must make). Without an
      initialised ``torch.distributed``, a synced layer uses its local batch.
    * ``device``, ``dtype`` (float32 by default, or float64) of parameters and
      running statistics.
    * ``timeout``: seconds each collective may wait (``None``: the process
      group's timeout); past it, a ``RuntimeError``.
    * ``native_kernel``: use PyTorch's kernels where their semantics are ours.
    """

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    #: Training never writes the running statistics nor the count (a converted PyTorch
    #: module with ``track_running_stats = False`` and its buffers kept: ``ChannelFirstBatchNorm``).
    _frozen = False

    def __init__(
        self,
        num_features: int,
        axis: int | Sequence[int] = (0, 1),
        epsilon: float = 1e-5,
        momentum: float | None = 0.99,
        affine: bool = True,
        bias_initializer: Any = Zeros(),
        scale_initializer: Any = Ones(1.0),
        axis_name: str | Sequence[str] | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        mode: str | None = None,
        name: str | None = None,
        *,
        process_group: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        timeout: float | None = None,
        native_kernel: bool = True,
        **options: Any,
    ):
        config = BatchNormConfig.from_arguments(
            num_features, axis, epsilon, momentum, affine, axis_name, axis_index_groups, mode, name, **options
        )
        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or dtype not in _PARAM_DTYPES:
            raise argument_error("dtype", "None, torch.float32 or torch.float64", dtype, TypeError)
        if process_group is not None:
            if not config.synced:
                raise argument_error(
                    "process_group", "None when axis_name is None (axis_name turns sync on)", process_group
                )
            check_process_group(process_group)
        timeout = check_timeout(timeout)
        if not isinstance(native_kernel, bool):
            raise argument_error("native_kernel", "a bool", native_kernel, TypeError)
        values = initial_state(config, scale_initializer, bias_initializer, _PARAM_DTYPES[dtype])
        super().__init__()
        self.config, self.name, self.process_group = config, name, process_group
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
        # Precomputed for the per-call hot path.
        self._ndim, self._feature_axis = config.ndim, config.feature_axis
        self._channels_last = config.feature_axis == config.ndim - 1  # runs as (-1, C)
        self._native = (  # PyTorch's kernels implement every option's default and nothing else
            native_kernel
            and all(getattr(config, option) == default for option, default in OPTIONS.items())
            and config.feature_axis in (1, config.ndim - 1)
        )
        self._peers_checked = False  # synced: whether all ranks agreed on num_features etc. (first call)
        self._agreed_shift: torch.Tensor | None = None  # synced over a large group: torch_distributed.Reduce
        self._digest: int | None = None  # synced: torch_distributed.fingerprint(config), computed once
        if config.synced:
            from . import torch_distributed

            self._digest = torch_distributed.fingerprint(config)
        self._inference_check: tuple[Any, bool] = (None, False)  # (running statistics' versions, accurate)

    # -- the uniform layer protocol -------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, training: bool | None = None) -> torch.Tensor:
        """``y`` for ``x``; in training also updates the running statistics. The one
        place where inputs are checked, for every path."""
        training = resolve_training(training, self.training)
        c, fa = self.config.num_features, self._feature_axis
        if mask is not None or not (
            isinstance(x, torch.Tensor) and x.dtype in _FLOAT_DTYPES and x.dim() == self._ndim and x.shape[fa] == c
        ):
            if not isinstance(x, torch.Tensor) and hasattr(x, "shape"):  # the type first: an array of another library
                raise argument_error("x", "a torch.Tensor", type(x).__name__, TypeError)
            algorithm.check_inputs(x, mask, num_features=c, reduce_axes=self.config.reduce_axes)
            if not isinstance(x, torch.Tensor):
                raise argument_error("x", "a torch.Tensor", type(x).__name__, TypeError)
        group = self._sync_group() if training and self.config.synced else None
        exchange = None if group is None else self._exchange(x, group)
        route = self._route(x, mask, training, group)
        if route == "native":
            return self._native_forward(x, training)
        y = self._core_forward(x, mask, training, exchange) if route == "core" else self._kernel_forward(x, exchange)
        if exchange is not None:  # the next call's agreed shift (torch_distributed.Reduce; None for Gather)
            self._agreed_shift = exchange.next_shift
        return y

    def _route(self, x: torch.Tensor, mask: torch.Tensor | None, training: bool, group: Any) -> str:
        """The path of one call, one of:

        * ``"core"``: :func:`bn1d.algorithm.forward` under autograd, for an option
          at a value other than its default (``bn1d.config.OPTIONS``), features on
          an axis other than 1 or the last, ``native_kernel=False``, masks in
          training, under ``torch.compile`` (Inductor fuses the core's
          operations), and, unsynced, for dtype pairs other than (x, statistics)
          equal or (half, float32) and training on one value per feature;
        * ``"synced native"``: synced training otherwise (any dtype pair, in the
          compute dtype): :class:`torch_kernels.NativeBatchNorm` with the exchange;
        * ``"native"``: PyTorch's kernels otherwise, each where the accuracy rule
          holds for it (:meth:`_native_forward`).

        Synced ranks may take different paths: both synced paths make the same
        exchanges (``torch_distributed.make_exchange`` chooses them by the group alone).
        """
        if not self._native or (training and mask is not None) or torch.compiler.is_compiling():
            return "core"
        if group is not None:
            return "synced native"
        stats = self.running_mean.dtype  # type: ignore[union-attr]  # tracked: every option is at its default
        if x.dtype != stats and not (stats == torch.float32 and x.dtype in _HALF_DTYPES):
            return "core"
        return "native" if not training or x.numel() > self.config.num_features else "core"

    def _state(self) -> dict[str, torch.Tensor]:
        """The running statistics (``config.state_keys``) as the core's state mapping."""
        return {key: cast(torch.Tensor, self._buffers[key]) for key in self.config.state_keys}

    # -- the paths ------------------------------------------------------------------------
    def _core_forward(self, x: torch.Tensor, mask: torch.Tensor | None, training: bool, exchange: Any) -> torch.Tensor:
        """:func:`bn1d.algorithm.forward` under autograd (``exchange``: the synced one)."""
        from . import torch_distributed

        state = self._state()
        if training:  # copies: under torch.compile with graph breaks, a graph may save them for backward
            state = {key: value.clone() for key, value in state.items()}  # before copy_ below
        hooks = Hooks(
            all_gather=None if exchange is None else torch_distributed.make_all_gather(exchange),
            stop_gradient=torch.Tensor.detach,
        )
        params = {key: self._parameters[key] for key in self.config.param_keys}
        y, new_state = algorithm.forward(xp, x, params, state, self.config, training=training, mask=mask, hooks=hooks)
        if training:
            self._update_state(new_state)
        return y

    def _native_forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """PyTorch's kernels on ``x`` seen as ``(N, C, ...)`` (features on axis 1 or
        last): the fused training kernel where its result meets the rule, else
        :class:`torch_kernels.NativeBatchNorm`; in inference the inference kernel
        unless ``|running_mean| / std`` is too large for its ``x * a + b``."""
        params, buffers = self._parameters, self._buffers
        # Contiguous input: PyTorch's generic strided kernel rounds half-input parameter gradients to
        # half; a channel-last view can be strided too (a transposed (N, C), a slice of the features).
        view = (x.reshape(-1, self.config.num_features) if self._channels_last else x).contiguous()
        if training:
            y = self._fused_forward(view)
            if y is None:
                return self._kernel_forward(x, None)
        elif self._inference_is_accurate():
            y = torch.batch_norm(
                view, params.get("scale"), params.get("bias"), buffers["running_mean"], buffers["running_var"],
                False, 0.0, self.config.epsilon, torch.backends.cudnn.enabled,
            )  # fmt: skip
        else:
            return self._core_forward(x, None, False, None)
        if y.requires_grad and y.numel() >= _CONTIGUOUS_GRAD_MIN_NUMEL:
            y.register_hook(_contiguous_gradient)
        return y.view(x.shape) if self._channels_last else y

    def _fused_forward(self, view: torch.Tensor) -> torch.Tensor | None:
        """PyTorch's fused training kernel, or ``None`` (state untouched) where its
        statistics say that its result misses the rule."""
        accumulation = torch_kernels.fused_accumulation(view)
        if accumulation is None:
            return None
        params, state = self._parameters, self._state()
        if self._frozen:  # batch statistics, no running statistics written (PyTorch's untracked call)
            y, save_mean, save_invstd = torch.native_batch_norm(
                view, params.get("scale"), params.get("bias"), None, None, True, 0.0, self.config.epsilon
            )
            accurate = torch_kernels.fused_is_accurate(view, save_mean, save_invstd, self.config.epsilon, accumulation)
            return y if accurate else None
        running_mean, running_var, count = state["running_mean"], state["running_var"], self.num_batches_tracked
        momentum = self.config.momentum  # PyTorch's is the new batch's weight; the cumulative average's is 1 / k
        factor = 1.0 / (int(cast(torch.Tensor, count)) + 1) if momentum is None else _fused_momentum(momentum)
        saved = running_mean.clone(), running_var.clone()
        y, save_mean, save_invstd = torch.native_batch_norm(
            view, params.get("scale"), params.get("bias"), running_mean, running_var, True, factor, self.config.epsilon
        )
        if not torch_kernels.fused_is_accurate(view, save_mean, save_invstd, self.config.epsilon, accumulation):
            with torch.no_grad():
                running_mean.copy_(saved[0])
                running_var.copy_(saved[1])
            return None
        cast(torch.Tensor, count).add_(1)
        return y

    def _kernel_forward(self, x: torch.Tensor, exchange: Any) -> torch.Tensor:
        """Training on :class:`torch_kernels.NativeBatchNorm`, in the compute dtype, contiguous
        (a cast keeps a strided input's strides)."""
        c, params = self.config.num_features, self._parameters
        view = x.reshape(-1, c) if self._channels_last else x
        state = self._state()
        dtype = compute_dtype(torch, x.dtype, state["running_mean"].dtype)
        y, *new_values = torch_kernels.NativeBatchNorm.apply(
            view.to(dtype).contiguous(), params.get("scale"), params.get("bias"), state, exchange, self.config
        )
        self._update_state(dict(zip(self.config.state_keys, new_values)))
        y = y.to(x.dtype)
        return y.view(x.shape) if self._channels_last else y

    def _update_state(self, new_state: Mapping[str, torch.Tensor]) -> None:
        """Copy a training call's new state into the buffers; count the call as PyTorch does
        (frozen statistics: neither, as PyTorch's untracked call)."""
        if self._frozen:
            return
        with torch.no_grad():
            state = self._state()
            for key, value in new_state.items():
                state[key].copy_(value)
            if "num_batches_tracked" not in new_state and self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)

    def _inference_is_accurate(self) -> bool:
        """Whether the inference kernel's ``x * a + b`` meets the rule for the running
        statistics (cached until they change)."""
        state = self._state()
        mean, var = state["running_mean"], state["running_var"]
        key = (mean._version, var._version, mean.data_ptr(), var.data_ptr())
        if self._inference_check[0] != key:
            accurate = torch_kernels.inference_is_accurate(mean, var, self.config.epsilon)
            self._inference_check = (key, accurate)
        return self._inference_check[1]

    # -- synced statistics ----------------------------------------------------------------
    def _sync_group(self) -> Any:
        """The group to sum statistics over, or ``None`` without ``torch.distributed``."""
        if self.process_group is None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        from . import torch_distributed

        return torch_distributed.sync_group(self.process_group, self.config.axis_index_groups, self.timeout)

    def _exchange(self, x: torch.Tensor, group: Any) -> Any:
        """The exchange of one synced training call (``torch_distributed.make_exchange``:
        by the group's size); the first call checks that every rank agrees on what
        sizes the exchange (``torch_distributed.check_peers``)."""
        from . import torch_distributed

        float64 = call_dtype(torch, x.dtype, self._parameters, self._buffers) == torch.float64
        header = torch_distributed.make_header(x, self.config, float64=float64, digest=self._digest)
        if not self._peers_checked:  # the exchanges' sizes depend on num_features: agree on it first
            parent = torch.distributed.group.WORLD if self.process_group is None else self.process_group
            torch_distributed.check_peers(header, device=x.device, group=parent, timeout=self.timeout)
            self._peers_checked = True
        return torch_distributed.make_exchange(
            group, header, self.timeout, fast_variance=self.config.fast_variance, shift=self._agreed_shift,
            device=x.device,
        )  # fmt: skip

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

    @property
    def _checkpoint_config(self) -> BatchNormConfig:
        """The config whose ``keys`` are this module's ``state_dict()`` keys (``config``)."""
        return self.config

    def _checked_state(self, state_dict: Any, names: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        """``check_state`` for this layer (``names``: how its errors name the entries)."""
        reference = self._reference()
        dtype = np.float32 if reference is None else _PARAM_DTYPES.get(reference.dtype, np.float32)
        return check_state(state_dict, self._checkpoint_config, dtype=dtype, names=names)

    def _given_names(self, local: Mapping[str, Any]) -> dict[str, str]:
        """The keys under which a checkpoint gave this layer's entries, where not its own
        (none here; a converted layer also takes PyTorch's ``weight`` for ``scale``)."""
        return {}

    def _checkpoint_entries(self, local: dict[str, Any], local_metadata: Mapping[str, Any]) -> dict[str, Any]:
        """A checkpoint's entries for this module, named as ``state_dict()`` names them
        (unchanged here; a converted layer also takes PyTorch's names)."""
        return local

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
        """Loading as part of a parent module, with PyTorch's documented semantics: the
        entries present are loaded, absent ones are reported as ``missing_keys`` and
        unknown ones as ``unexpected_keys`` (the parent raises for either only when
        ``strict``). The entries present are checked together first (``check_state``;
        an error is reported to the parent and nothing of this layer is loaded)."""
        local = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        try:
            missing, unexpected = self._load_present(local, prefix, local_metadata)
        except (TypeError, ValueError) as error:
            if prefix or not getattr(self, "_loading_itself", False):
                error_msgs.append(str(error))  # the parent raises them, as PyTorch's RuntimeError
                return
            raise  # this layer's own load_state_dict(strict=False): the same error as strict=True
        missing_keys.extend(missing)
        unexpected_keys.extend(unexpected)

    def _load_present(
        self, local: dict[str, Any], prefix: str, local_metadata: Mapping[str, Any]
    ) -> tuple[list[str], list[str]]:
        """Load the entries of ``local`` (this layer's, without ``prefix``) that are
        state, checked together first (an error names each entry by its full key,
        ``prefix`` + the key it was given under; nothing is then loaded); return the
        missing and unexpected keys, with ``prefix``."""
        names = {key: prefix + name for key, name in {**{k: k for k in local}, **self._given_names(local)}.items()}
        local = self._checkpoint_entries(local, local_metadata)
        keys = self._checkpoint_config.keys
        missing = [prefix + key for key in keys if key not in local]
        unexpected = [prefix + key for key in local if key not in keys]
        present = {key: local[key] for key in keys if key in local}
        if present:
            # Absent entries are checked as placeholders of the right shape and never assigned.
            placeholders = initial_state(self._checkpoint_config, Ones(1.0), Zeros(), np.float64)
            checked = self._checked_state({**placeholders, **present}, names)
            assign = bool(local_metadata.get("assign_to_params_buffers", False))
            self._set_state({key: checked[key] for key in present}, present, assign)
        return missing, unexpected

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
                "statistics convert with ChannelFirstBatchNorm.from_torch or convert_batchnorm)",
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


if TYPE_CHECKING:  # imported lazily at run time (``__getattr__`` below)
    from .torch_models import ChannelFirstBatchNorm, convert_batchnorm, revert_batchnorm, sync_running_statistics

_MODEL_NAMES = frozenset({"ChannelFirstBatchNorm", "convert_batchnorm", "revert_batchnorm", "sync_running_statistics"})


def __getattr__(name: str) -> Any:
    """Whole models (conversion, checkpoints, running statistics across ranks) live in
    ``bn1d.backends.torch_models``, which builds on ``BatchNorm1d``: imported on first
    use, so either module may be imported first without a circular import."""
    if name in _MODEL_NAMES:
        from . import torch_models

        return getattr(torch_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
