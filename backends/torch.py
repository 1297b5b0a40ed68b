r"""The PyTorch backend: ``BatchNorm1d`` as a ``torch.nn.Module``.

It computes what ``bn1d.backends.numpy`` specifies (see that module and SPEC.md).
Per feature (the one axis not in ``axis``), over the ``n`` unmasked positions of
all synced ranks, in training::

    mean = sum(x) / n;  var = sum((x - mean) ** 2) / n          # biased
    y = (x - mean) * (scale / sqrt(var + epsilon)) + bias
    running_mean = momentum * running_mean + (1 - momentum) * mean
    running_var  = momentum * running_var  + (1 - momentum) * var * n / (n - 1)

and in inference ``y`` with the running statistics, nothing updated and no
communication. Gradients flow through ``mean`` and ``var``, never into the
running statistics.

PyTorch idioms: ``scale``/``bias`` are ``nn.Parameter`` (absent, not ``None``,
when not affine), ``running_mean``/``running_var`` buffers; ``num_batches_tracked``
(training calls, as PyTorch counts them) is a non-persistent buffer kept for
:meth:`BatchNorm1d.to_torch`, so ``state_dict()`` has exactly SPEC section 6's
keys. ``.train()``/``.eval()`` set the mode and each call's ``training=``
overrides it.

Two execution paths, same contract and the same accuracy (``docs/numerics.md``);
:meth:`BatchNorm1d._route` decides per call:

* PyTorch's kernels (``bn1d.backends.torch_kernels``) where their semantics are
  ours (no mask in training, the default variance, unbiased running variance,
  features on axis 1 or last: ``(B, L, C)`` runs as ``(B*L, C)``), each only where
  the accuracy rule holds for it: the fused training kernel for channel-first
  input and small batches, else split statistics (float32 partial sums of <= 256
  rows, combined in float64), a shift by the float32 mean when ``|mean| / std`` is
  large, a backward from float64 sums. Synced: the same around one exchange
  (``torch_distributed.Gather``), not twice differentiable (as
  ``nn.SyncBatchNorm``; ``native_kernel=False`` is). PyTorch's momentum is
  ``1 - momentum``.
* The core (:func:`bn1d.algorithm.batch_norm`) otherwise: masks, ``fast_variance``,
  ``unbiased_running_var=False``, features on another axis, under
  ``torch.compile`` (Inductor fuses it), and, unsynced only, other dtype pairs and
  ``n <= 1``. Synced, the core makes the same exchanges (the ``all_gather`` hook),
  so ranks may take different paths.

Deviations from PyTorch's ``nn.BatchNorm1d``: BrainPy's momentum convention
(``momentum=None``, PyTorch's cumulative average, has no equivalent); any layout
(``axis``); masks; synced statistics also on CPU (gloo), weighted by counts; a
batch with no value leaves the running statistics unchanged instead of NaN;
float32 statistics for half input; ``scale`` folded into the inverse standard
deviation (BrainPy's rounding order). From BrainPy and Flax: see
``bn1d.backends.numpy``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from bn1d.algorithm import batch_norm, check_inputs, compute_dtype
from bn1d.config import BatchNormConfig, argument_error
from bn1d.initializers import Ones, Zeros, initial_value
from bn1d.protocol import resolve_training
from bn1d.state import check_state, from_torch_state_dict, state_keys, to_torch_state_dict, torch_momentum

from . import torch_kernels

__all__ = ["BatchNorm1d"]

_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})
_PARAM_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_CONTIGUOUS_GRAD_MIN_NUMEL = 1 << 17  # below, the hook's ~10 us fixed cost outweighs what it saves


def _contiguous_gradient(grad: torch.Tensor) -> torch.Tensor:
    """PyTorch's CPU batch-norm backward is ~4x slower on a non-contiguous gradient (e.g. from y.sum())."""
    return grad.contiguous()


class BatchNorm1d(nn.Module):
    """1-D batch normalization with BrainPy's signature, as a ``torch.nn.Module``.

    ``layer(x, mask=None, training=None) -> y``. Keyword-only extras:

    * ``process_group``: the ``torch.distributed`` group to sync over when
      ``axis_name`` is set (``None``: WORLD). ``axis_name`` is only a label here;
      setting it turns syncing on. ``axis_index_groups`` partitions the group's
      ranks into subgroups that sync separately (created with ``dist.new_group``
      on the first synced training call, which every rank must make). Without an
      initialised ``torch.distributed``, a synced layer uses its local batch.
    * ``device``, ``dtype`` (float32 by default, or float64) of parameters and
      running statistics.
    * ``fast_variance``, ``unbiased_running_var``: see ``bn1d.algorithm``.
    * ``timeout``: seconds each collective may wait (``None``: the process
      group's timeout); past it, a ``RuntimeError``.
    * ``native_kernel``: use PyTorch's kernel where its semantics are ours.
    """

    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        num_features: int,
        axis: int | Sequence[int] = (0, 1),
        epsilon: float = 1e-5,
        momentum: float = 0.99,
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
        fast_variance: bool = False,
        unbiased_running_var: bool = True,
        timeout: float | None = None,
        native_kernel: bool = True,
    ):
        config = BatchNormConfig.from_arguments(
            num_features, axis, epsilon, momentum, affine, axis_name, axis_index_groups, mode, name,
            fast_variance=fast_variance, unbiased_running_var=unbiased_running_var,
        )  # fmt: skip
        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or dtype not in _PARAM_DTYPES:
            raise argument_error("dtype", "None, torch.float32 or torch.float64", dtype, TypeError)
        if process_group is not None:
            if not config.synced:
                raise argument_error(
                    "process_group", "None when axis_name is None (axis_name turns sync on)", process_group
                )
            if not (torch.distributed.is_available() and isinstance(process_group, torch.distributed.ProcessGroup)):
                raise argument_error(
                    "process_group", "None or a torch.distributed.ProcessGroup", process_group, TypeError
                )
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not (0 < timeout < math.inf)
        ):
            raise argument_error("timeout", "None or a finite number of seconds > 0", timeout)
        if not isinstance(native_kernel, bool):
            raise argument_error("native_kernel", "a bool", native_kernel, TypeError)
        c = config.num_features
        if affine:
            scale = initial_value(scale_initializer, "scale_initializer", c, _PARAM_DTYPES[dtype])
            bias = initial_value(bias_initializer, "bias_initializer", c, _PARAM_DTYPES[dtype])
        super().__init__()
        self.config = config
        self.name = name
        self.process_group = process_group
        self.timeout = None if timeout is None else float(timeout)
        factory = {"device": device, "dtype": dtype}
        if affine:  # not affine: no scale/bias attributes at all (SPEC section 1), not None ones
            self.scale = nn.Parameter(torch.as_tensor(scale, **factory))
            self.bias = nn.Parameter(torch.as_tensor(bias, **factory))
        self.register_buffer("running_mean", torch.zeros(c, **factory))
        self.register_buffer("running_var", torch.ones(c, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device), persistent=False)
        self.train(config.training)
        # Precomputed for the per-call hot path.
        self._ndim, self._feature_axis = config.ndim, config.feature_axis
        self._channels_last = config.feature_axis == config.ndim - 1  # runs as (-1, C)
        self._native = (
            native_kernel and not fast_variance and unbiased_running_var and config.feature_axis in (1, config.ndim - 1)
        )
        self._pytorch_momentum = torch_momentum(config.momentum)
        self._peers_checked = False  # synced: whether all ranks agreed on num_features etc. (first call)
        self._inference_check: tuple[Any, bool] = (None, False)  # (running statistics' versions, accurate)

    # -- the uniform layer protocol -------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, training: bool | None = None) -> torch.Tensor:
        """``y`` for ``x``; in training also updates the running statistics."""
        training = resolve_training(training, self.training)
        c, fa = self.config.num_features, self._feature_axis
        if mask is not None or not (
            isinstance(x, torch.Tensor) and x.dtype in _FLOAT_DTYPES and x.dim() == self._ndim and x.shape[fa] == c
        ):
            check_inputs(x, mask, num_features=c, reduce_axes=self.config.reduce_axes)
            if not isinstance(x, torch.Tensor):
                raise argument_error("x", "a torch.Tensor", type(x).__name__, TypeError)
        group = self._sync_group() if training and self.config.synced else None
        route = self._route(x, mask, training, group)
        if group is not None:
            return self._synced_forward(x, mask, group, native=route == "synced native")
        if route == "native":
            return self._native_forward(x, training)
        return self._core_forward(x, mask, training)

    def _route(self, x: torch.Tensor, mask: torch.Tensor | None, training: bool, group: Any) -> str:
        """The path of one call, one of:

        * ``"core"``: :func:`bn1d.algorithm.batch_norm` under autograd, for masks in training,
          ``fast_variance``, ``unbiased_running_var=False``, features on an axis
          other than 1 or the last, ``native_kernel=False``, under ``torch.compile``
          (Inductor fuses the core's operations), and, unsynced, for dtype pairs
          other than (x, statistics) equal or (half, float32) and fewer than two
          values per feature;
        * ``"synced native"``: synced training otherwise (any dtype pair, in the
          compute dtype): :class:`torch_kernels.NativeBatchNorm` with the exchange;
        * ``"native"``: PyTorch's kernels otherwise, each where the accuracy rule
          holds for it (``bn1d.backends.torch_kernels``).

        Synced ranks may take different paths: both synced paths make the same
        exchanges.
        """
        if not self._native or (training and mask is not None) or torch.compiler.is_compiling():
            return "core"
        if group is not None:
            return "synced native"
        stats = self.running_mean.dtype
        if x.dtype != stats and not (stats == torch.float32 and x.dtype in _HALF_DTYPES):
            return "core"
        return "native" if not training or x.numel() > self.config.num_features else "core"

    def _synced_forward(self, x: torch.Tensor, mask: torch.Tensor | None, group: Any, native: bool) -> torch.Tensor:
        """Training with statistics exchanged over ``group``: native kernels or the
        core; the same collectives either way."""
        from . import torch_distributed

        c, config = self.config.num_features, self.config
        header = torch_distributed.make_header(
            x, num_features=c, feature_axis=self._feature_axis, fast_variance=config.fast_variance,
            float64=compute_dtype(torch, x.dtype, self.running_mean.dtype) == torch.float64,
            fingerprint=torch_distributed.groups_fingerprint(config.axis_index_groups),
        )  # fmt: skip
        if not self._peers_checked:  # the exchanges' sizes depend on num_features: agree on it first
            torch_distributed.check_peers(header, device=x.device, group=self._parent_group(), timeout=self.timeout)
            self._peers_checked = True
        gather = torch_distributed.Gather(group, header, self.timeout)
        if not native:
            return self._core_forward(x, mask, True, torch_distributed.make_all_gather(gather))
        return self._kernel_forward(x, gather)

    def _core_forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, training: bool, all_gather: Any = None
    ) -> torch.Tensor:
        """:func:`bn1d.algorithm.batch_norm` under autograd."""
        running_mean, running_var = self.running_mean, self.running_var
        if training:  # copies: under torch.compile with graph breaks, a graph may save them for backward
            running_mean, running_var = running_mean.clone(), running_var.clone()  # before copy_ below
        result = batch_norm(
            x, running_mean, running_var, self._parameters.get("scale"), self._parameters.get("bias"),
            reduce_axes=self.config.reduce_axes, epsilon=self.config.epsilon, momentum=self.config.momentum,
            training=training, mask=mask, fast_variance=self.config.fast_variance,
            unbiased_running_var=self.config.unbiased_running_var, all_gather=all_gather,
            stop_gradient=torch.Tensor.detach,
        )  # fmt: skip
        if training:
            self._update_running(result.running_mean, result.running_var)
        return result.y

    def _update_running(self, running_mean: torch.Tensor, running_var: torch.Tensor) -> None:
        with torch.no_grad():
            self.running_mean.copy_(running_mean)
            self.running_var.copy_(running_var)
            self.num_batches_tracked.add_(1)

    def _native_forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """PyTorch's kernels on ``x`` seen as ``(N, C, ...)`` (features on axis 1 or
        last): the fused training kernel where its result meets the rule, else
        :class:`torch_kernels.NativeBatchNorm`; in inference the inference kernel
        unless ``|running_mean| / std`` is too large for its ``x * a + b``."""
        params, buffers = self._parameters, self._buffers
        # Contiguous input: PyTorch's generic strided kernel rounds half-input parameter gradients to half.
        view = x.reshape(-1, self.config.num_features) if self._channels_last else x.contiguous()
        if training:
            y = self._fused_forward(view)
            if y is None:
                return self._kernel_forward(x)
        elif self._inference_is_accurate():
            y = torch.batch_norm(
                view, params.get("scale"), params.get("bias"), buffers["running_mean"], buffers["running_var"],
                False, 0.0, self.config.epsilon, torch.backends.cudnn.enabled,
            )  # fmt: skip
        else:
            return self._core_forward(x, None, False)
        if y.requires_grad and y.numel() >= _CONTIGUOUS_GRAD_MIN_NUMEL:
            y.register_hook(_contiguous_gradient)
        return y.view(x.shape) if self._channels_last else y

    def _fused_forward(self, view: torch.Tensor) -> torch.Tensor | None:
        """PyTorch's fused training kernel, or ``None`` (state untouched) where its
        statistics say that its result misses the rule."""
        accumulation = torch_kernels.fused_accumulation(view)
        if accumulation is None:
            return None
        params = self._parameters
        saved = self.running_mean.clone(), self.running_var.clone()
        y, save_mean, save_invstd = torch.native_batch_norm(
            view, params.get("scale"), params.get("bias"), self.running_mean, self.running_var,
            True, self._pytorch_momentum, self.config.epsilon,
        )  # fmt: skip
        if not torch_kernels.fused_is_accurate(view, save_mean, save_invstd, self.config.epsilon, accumulation):
            with torch.no_grad():
                self.running_mean.copy_(saved[0])
                self.running_var.copy_(saved[1])
            return None
        self.num_batches_tracked.add_(1)
        return y

    def _kernel_forward(self, x: torch.Tensor, gather: Any = None) -> torch.Tensor:
        """Training on :class:`torch_kernels.NativeBatchNorm`, in the compute dtype."""
        c, params = self.config.num_features, self._parameters
        view = x.reshape(-1, c) if self._channels_last else x.contiguous()
        dtype = compute_dtype(torch, x.dtype, self.running_mean.dtype)
        y, new_mean, new_var = torch_kernels.NativeBatchNorm.apply(
            view.to(dtype), params.get("scale"), params.get("bias"), self.running_mean, self.running_var, gather,
            self.config.epsilon, self.config.momentum,
        )  # fmt: skip
        self._update_running(new_mean, new_var)
        y = y.to(x.dtype)
        return y.view(x.shape) if self._channels_last else y

    def _inference_is_accurate(self) -> bool:
        """Whether the inference kernel's ``x * a + b`` meets the rule for the running
        statistics (cached until they change)."""
        key = (self.running_mean._version, self.running_var._version, self.running_mean.data_ptr())
        if self._inference_check[0] != key:
            accurate = torch_kernels.inference_is_accurate(self.running_mean, self.running_var, self.config.epsilon)
            self._inference_check = (key, accurate)
        return self._inference_check[1]

    def train(self, mode: bool = True) -> BatchNorm1d:
        if not isinstance(mode, bool):
            raise argument_error("mode", "a bool", mode, TypeError)
        return super().train(mode)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load ``scale``, ``bias`` (when affine), ``running_mean``, ``running_var``:
        strict and atomic (``bn1d.state.check_state``), values copied in place."""
        if strict is not True:
            raise argument_error("strict", "True (loading is always strict)", strict)
        self._copy_state(self._checked_state(state_dict))
        return _IncompatibleKeys([], [])

    # -- interop with torch.nn.BatchNorm1d -------------------------------------------
    @classmethod
    def from_torch(cls, module: nn.BatchNorm1d, axis: int | Sequence[int] = (0, 2), **kwargs: Any) -> BatchNorm1d:
        """A layer computing what ``module`` computes. PyTorch's ``(N, C, L)`` input is
        ``axis=(0, 2)`` here (the default) and its ``(N, C)`` input ``axis=0``; any
        other ``axis`` takes the same state for another layout. ``kwargs`` go to the
        constructor (e.g. ``axis_name``)."""
        if not isinstance(module, nn.BatchNorm1d):
            raise argument_error("module", "a torch.nn.BatchNorm1d", type(module).__name__, TypeError)
        if module.momentum is None:
            raise argument_error(
                "module.momentum", "a float (PyTorch's cumulative average, None, has no equivalent)", None
            )
        if not module.track_running_stats or module.running_mean is None:
            raise argument_error("module.track_running_stats", "True (running statistics to convert)", False)
        state = from_torch_state_dict(module.state_dict())
        layer = cls(
            module.num_features, axis, module.eps, torch_momentum(module.momentum), module.affine,
            mode=None if module.training else "inference", device=module.running_mean.device,
            dtype=module.running_mean.dtype, **kwargs,
        )  # fmt: skip
        layer.load_state_dict(state)
        if module.num_batches_tracked is not None:  # None without running statistics (rejected above)
            layer.num_batches_tracked.copy_(module.num_batches_tracked)
        return layer

    def to_torch(self) -> nn.BatchNorm1d:
        """An ``nn.BatchNorm1d`` with this layer's state, momentum ``1 - momentum`` and
        mode. It takes PyTorch's layout (features on axis 1): the same outputs as
        this layer when ``axis`` is ``(0, 2)`` or ``0``. Raises ``ValueError`` for the
        options PyTorch's layer cannot reproduce."""
        for option, value, default in (
            ("fast_variance", self.config.fast_variance, False),
            ("unbiased_running_var", self.config.unbiased_running_var, True),
            ("axis_name", self.config.axis_name, None),
        ):
            if value != default:
                raise argument_error(option, f"{default} to convert to torch.nn.BatchNorm1d", value)
        module = nn.BatchNorm1d(
            self.config.num_features, eps=self.config.epsilon, momentum=torch_momentum(self.config.momentum),
            affine=self.config.affine, device=self.running_mean.device, dtype=self.running_mean.dtype,
        )  # fmt: skip
        state = to_torch_state_dict(self.state_dict(), int(self.num_batches_tracked))
        module.load_state_dict({key: torch.as_tensor(value) for key, value in state.items()})
        return module.train(self.training)

    # -- internals ----------------------------------------------------------------------
    def _parent_group(self) -> Any:
        return torch.distributed.group.WORLD if self.process_group is None else self.process_group

    def _sync_group(self) -> Any:
        """The group to sum statistics over, or ``None`` without ``torch.distributed``."""
        if self.process_group is None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        from . import torch_distributed

        return torch_distributed.sync_group(self.process_group, self.config.axis_index_groups, self.timeout)

    def _checked_state(self, state_dict: Any) -> dict[str, np.ndarray]:
        np_dtype = np.float64 if self.running_mean.dtype == torch.float64 else np.float32
        return check_state(state_dict, num_features=self.config.num_features, affine=self.config.affine, dtype=np_dtype)

    def _copy_state(self, checked: Mapping[str, np.ndarray]) -> None:
        with torch.no_grad():
            for key, value in checked.items():
                getattr(self, key).copy_(torch.from_numpy(value))

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:  # fmt: skip
        """Loading as part of a parent module: the same checks, errors reported to the parent."""
        local = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if not strict and not local:
            missing_keys.extend(prefix + key for key in state_keys(self.config.affine))
            return
        try:
            checked = self._checked_state(local)
        except (TypeError, ValueError) as error:
            error_msgs.append(str(error))
            return
        self._copy_state(checked)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{c.num_features}, axis={c.reduce_axes}, epsilon={c.epsilon}, momentum={c.momentum}, "
            f"affine={c.affine}, axis_name={c.axis_name!r}"
        )
