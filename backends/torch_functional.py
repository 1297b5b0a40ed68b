"""bn1d's batch norm as one PyTorch function, :func:`batch_norm`: the dispatch point of every
PyTorch layer of bn1d (the drop-ins of ``bn1d.backends.torch_nn`` and BrainPy's signature
in ``bn1d.backends.torch``).

It takes ``torch.nn.functional.batch_norm``'s arguments, layout (features on axis 1 of
``(N, C, *)``) and momentum (the new batch's weight), and computes what ``bn1d.algorithm``
states under ``docs/spec.md`` (R2.7: within 1e-5 of float64 on raw data). bn1d's extras are
keyword-only: ``mask`` (R5), ``sync`` (R4), ``num_batches_tracked`` (PyTorch's count; with
``momentum=None`` the cumulative average's, R3.7) and the options of ``bn1d.config.OPTIONS``.

Which computation runs is decided by facts of the call, never by its data on a device
(:func:`path`): **PyTorch's kernels, checked**, for a real CPU tensor outside tracing,
compilation and ``torch.func``, with no mask and every option at its default (the fused
training kernel where ``torch_kernels``' error model accepts its result, judged on the
host, which on the CPU is no synchronisation; else :class:`torch_kernels.NativeBatchNorm`),
and **the core**, :func:`bn1d.algorithm.forward` on torch operations, everywhere else
(CUDA, with no host synchronisation in a training call by construction; ``torch.compile``,
``torch.export``, ``torch.jit.trace``, ``torch.func``, masks, options). On a ``torch.fx``
proxy it records one node (``__torch_function__``, as ``F.batch_norm``). The common training
call takes that fused-kernel route flat (:func:`_fused_call`). ``docs/decisions.md`` says
why this is a Python function and not a ``torch.library`` custom operator.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
from collections.abc import Mapping
from typing import Any

import array_api_compat.torch as xp
import torch
from torch.autograd import forward_ad
from torch.overrides import handle_torch_function, has_torch_function_variadic

from bn1d import algorithm, validation
from bn1d.algorithm import Hooks, compute_dtype
from bn1d.config import OPTIONS, BatchNormConfig, argument_error, check_real

from . import torch_kernels
from .torch_distributed import Sync, make_all_gather

__all__ = ["batch_norm", "path"]

_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})
#: ``torch_func.functional_call``'s recorder while it runs in this thread (``recorder`` is
#: ``None`` otherwise): new running statistics are recorded there instead of written.
recording = threading.local()
recording.recorder = None


#: The options a call may give (``track_running_stats`` is whether it gives running statistics).
_CALL_OPTIONS = frozenset(OPTIONS) - {"track_running_stats"}


@functools.lru_cache(maxsize=256)
def _config(
    num_features: int, ndim: int, epsilon: float, momentum: float | None, tracked: bool, synced: bool,
    groups: Any, options: tuple[tuple[str, bool], ...],
) -> BatchNormConfig:  # fmt: skip
    """The core's config of a call on ``(N, C, *)`` input of ``ndim`` dimensions, from
    arguments :func:`batch_norm` has checked (so built directly: under ``torch.compile``
    take); ``momentum`` is bn1d's (the old statistic's weight), ``options`` the call's
    (name, value) pairs. Cached: a call's arguments are few."""
    return BatchNormConfig(
        num_features=num_features, reduce_axes=(0, *range(2, ndim)), epsilon=epsilon, momentum=momentum,
        affine=True, axis_name="batch" if synced else None, axis_index_groups=groups, training=True, name=None,
        track_running_stats=tracked, **dict(options),
    )  # fmt: skip


def _vector(name: str, value: Any, x: torch.Tensor, c: int, floating: bool = True) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise argument_error(name, "None or a torch.Tensor", type(value).__name__, TypeError)
    if tuple(value.shape) != (c,):
        raise argument_error(name, f"shape ({c},) (num_features, input's axis 1)", tuple(value.shape))
    if floating and value.dtype not in _FLOAT_DTYPES:
        raise argument_error(name, "a floating-point tensor", value.dtype, TypeError)
    if value.device != x.device:
        raise argument_error(name, f"a tensor on input's device ({x.device})", value.device)


def _check(
    x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, training: Any, momentum: Any,
    eps: Any, mask: Any, num_batches_tracked: Any, options: Any = (),
) -> None:  # fmt: skip
    """Every argument of :func:`batch_norm` checked (R7.1), before any state changes."""
    if not isinstance(x, torch.Tensor):
        raise argument_error("input", "a torch.Tensor", type(x).__name__, TypeError)
    if x.dtype not in _FLOAT_DTYPES:
        expected = "a real floating-point tensor (float16, bfloat16, float32, float64)"
        raise argument_error("input", expected, x.dtype, TypeError)
    if x.layout != torch.strided:
        raise argument_error("input", "a dense (strided) tensor", x.layout, TypeError)
    if x.dim() < 2:
        raise argument_error("input", "a tensor (N, C, *) of at least 2 dimensions", tuple(x.shape))
    c = x.shape[1]
    for name, value in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                        ("bias", bias)):  # fmt: skip
        _vector(name, value, x, c)
    if (running_mean is None) != (running_var is None):
        raise argument_error("running_var", "None exactly when running_mean is None", type(running_var).__name__)
    if not isinstance(training, bool):
        raise argument_error("training", "a bool", training, TypeError)
    if not training and running_mean is None:
        raise argument_error("training", "True without running statistics (the batch's normalise)", training)
    if momentum is None:
        if training and running_mean is not None and num_batches_tracked is None:
            raise argument_error("num_batches_tracked", "its count with momentum=None", None, TypeError)
    else:
        check_real("momentum", momentum, "None or a float in [0, 1]", 0.0, 1.0)
    check_real("eps", eps, "a finite float > 0", 0.0, math.inf, open_low=True)
    if num_batches_tracked is not None and not (
        isinstance(num_batches_tracked, torch.Tensor)
        and num_batches_tracked.dim() == 0
        and num_batches_tracked.dtype == torch.int64
    ):  # PyTorch's count: a bool or float one would fail in add_, after the running update
        raise argument_error("num_batches_tracked", "None or a 0-d torch.int64 tensor", num_batches_tracked, TypeError)
    for name, value in options:
        if name not in _CALL_OPTIONS:
            raise argument_error(name, f"one of the options {sorted(_CALL_OPTIONS)}", value, TypeError)
        if not isinstance(value, bool):
            raise argument_error(name, "a bool", value, TypeError)
    if mask is not None:
        validation.check_inputs(x, mask, num_features=c, reduce_axes=(0, *range(2, x.dim())))


_NUMBERS = (float, int)  # by type: a bool is neither
_LARGEST = sys.float_info.max


def _vectors(x: torch.Tensor, *values: Any) -> bool:
    """Each of ``values`` is ``None`` or a tensor of shape ``(C,)`` of ``x``'s dtype and device
    (the cheap check of the common call: the full one finds and names what is wrong, and
    takes other floating-point dtypes)."""
    c, dtype, device = x.shape[1], x.dtype, x.device
    for value in values:
        if value is not None and not (
            (type(value) in _TENSORS or isinstance(value, torch.Tensor))  # the exact types first: cheaper
            and value.shape == (c,) and value.dtype == dtype and value.device == device
        ):  # fmt: skip
            return False
    return True


_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _eager(x: torch.Tensor, weight: Any = None, bias: Any = None) -> bool:
    """Whether this call runs eagerly on real CPU data, where PyTorch's kernels may be
    checked on the host: no tracing, compilation, export, dispatch mode (``FakeTensorMode``),
    ``torch.func`` transform of the input or the parameters, forward-mode AD level, or
    recorder, and a plain tensor on the CPU."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return (
        type(x) is torch.Tensor
        and x.is_cpu
        and getattr(recording, "recorder", None) is None
        and not torch.compiler.is_compiling()
        and not torch._C._is_tracing()  # torch.jit.is_tracing's answer here (this never runs scripted)
        and not torch._C._len_torch_dispatch_stack()
        and forward_ad._current_level < 0  # forward-mode AD: the core's operations carry the tangents
        and not wrapped(x)
        and (weight is None or not wrapped(weight))
        and (bias is None or not wrapped(bias))
    )


def path(
    x: torch.Tensor, running_mean: torch.Tensor | None, weight: torch.Tensor | None, training: bool,
    mask: Any = None, sync: Any = None, native_kernel: bool = True, options: tuple[tuple[str, bool], ...] = (),
    bias: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
) -> str:  # fmt: skip
    """The computation a call takes: ``"kernels"`` (PyTorch's, checked), ``"traced"``
    (inference traced by ``torch.export``, ``torch.onnx.export``, ``torch.compile`` or
    ``torch.jit.trace``, outside ``torch.func``: :func:`_centred_inference`) or ``"core"``;
    the module docstring says when. ``options``: the call's (name, value) pairs; PyTorch's
    kernels implement every option's default and nothing else. Unsynced training also
    needs dtypes that the kernels take (:func:`_kernel_dtypes`) and more than one value per
    feature (the core raises R3.5's error)."""
    if not native_kernel or (options and any(OPTIONS[k] != v for k, v in options)):
        return "core"
    if not _eager(x, weight, bias):
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # (Dynamo handles transforms itself)
        traced = torch.compiler.is_compiling() or (
            torch.jit.is_tracing() and not any(t is not None and wrapped(t) for t in (x, weight, bias))
        )
        simple = (
            not training and running_mean is not None and mask is None and getattr(recording, "recorder", None) is None
        )
        return "traced" if traced and simple and _kernel_dtypes(x, running_mean, weight, bias, running_var) else "core"
    if training and mask is not None:
        return "core"
    if training and sync is not None:
        return "kernels"  # any dtype pair, in the compute dtype
    if not _kernel_dtypes(x, running_mean, weight, bias, running_var):
        return "core"
    return "kernels" if not training or x.numel() > x.shape[1] else "core"


_WIDE = (torch.float32, torch.float64)


def _fused_call(
    x: torch.Tensor, running_mean: Any, running_var: Any, weight: Any, bias: Any, momentum: float | None,
    eps: float, num_batches_tracked: Any,
) -> torch.Tensor | None:  # fmt: skip
    """A checked training call (unsynced, no mask, no option, vectors of ``x``'s dtype:
    :func:`_vectors`) on the fused kernel, or on :class:`torch_kernels.NativeBatchNorm`
    where :func:`_fused` rejects it; ``None``, nothing done, unless its facts are those of
    :func:`path`'s ``"kernels"`` route with the fused kernel: a contiguous float32 or float64
    CPU tensor run eagerly (:func:`_eager`), more than one value per feature, running
    statistics or parameters (else float32 input: :func:`_kernel_dtypes`). One flat function
    for the common call: on small inputs each Python call costs (``docs/performance.md``)."""
    if not (
        x.dtype in _WIDE and x.is_contiguous() and x.numel() > x.shape[1]
        and (running_mean is not None or weight is not None or x.dtype == torch.float32)
        and _eager(x, weight, bias)
    ):  # fmt: skip
        return None
    y = _fused(x, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked)
    if y is None:
        keep = None if momentum is None else 1.0 - momentum
        return _split_training(x, running_mean, running_var, weight, bias, keep, eps, num_batches_tracked, None)
    return _with_gradient_hook(y, x) if x.dim() > 3 or x.numel() >= HOOKED_NUMEL else y  # (its test for wide x)


def _kernel_dtypes(x: torch.Tensor, running_mean: Any, weight: Any, bias: Any = None, running_var: Any = None) -> bool:
    """Whether PyTorch's kernels run these dtypes as the accuracy model assumes: float32
    or float64 statistics and parameters, all of one dtype (half ones are the core's, which
    computes in float32; PyTorch's CPU kernels raise on a mix, which the core computes) and
    input of their dtype, or half input with float32 ones."""
    reference = running_mean if running_mean is not None else weight
    wide = torch.float32 if reference is None else reference.dtype
    if wide not in (torch.float32, torch.float64):
        return False
    for value in (weight, bias, running_var):
        if value is not None and value.dtype != wide:
            return False
    return x.dtype == wide or (wide == torch.float32 and x.dtype in _HALF_DTYPES and reference is not None)


def _affine_gradient(weight: Any, bias: Any) -> bool:
    """Whether this call's backward will sum gradients of ``weight`` or ``bias``."""
    return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (weight, bias))


def _compute_dtype(x: torch.Tensor, running_mean: Any, weight: Any) -> torch.dtype:
    reference = running_mean if running_mean is not None else weight
    return compute_dtype(torch, x.dtype, *([] if reference is None else [reference.dtype]))


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    sync: Sync | None = None,
    native_kernel: bool = True,
    **options: bool,
) -> torch.Tensor:
    """Batch normalization of ``input`` ``(N, C, *)``, features on axis 1, exact (R2.7).

    ``torch.nn.functional.batch_norm``'s arguments and meaning: ``training=True``
    normalises with the batch's statistics and, when ``running_mean``/``running_var`` are
    given, updates them in place, ``running = (1 - momentum) * running + momentum * batch``
    (unbiased variance, R3.3); ``training=False`` normalises with the running statistics.
    ``num_batches_tracked``: PyTorch's count of training calls, incremented here (with
    ``momentum=None``, the cumulative average, the count of calls that saw data, R3.7).
    ``mask``: boolean, ``x``'s shape without axis 1; masked positions are normalised but
    not counted (R5). ``sync``: a :class:`Sync`; the statistics of training calls are
    those of every rank's batch (R4). ``options``: bn1d's (``fast_variance``, R2.2;
    ``unbiased_running_var``, R3.4; any option of ``bn1d.config.OPTIONS`` but
    ``track_running_stats``); ``native_kernel=False`` always runs the core. Returns ``y``,
    of ``x``'s dtype. Raises ``TypeError``/``ValueError`` naming a bad argument before any
    state changes (R7.1).
    """
    x = input
    if has_torch_function_variadic(x, running_mean, running_var, weight, bias, mask):
        return handle_torch_function(
            batch_norm, (x, running_mean, running_var, weight, bias, mask), x, running_mean, running_var,
            weight, bias, training, momentum, eps, num_batches_tracked=num_batches_tracked, mask=mask, sync=sync,
            native_kernel=native_kernel, **options,
        )  # fmt: skip
    given = tuple(sorted(options.items())) if options else ()
    plain = (
        type(x) is torch.Tensor and x.dtype in _FLOAT_DTYPES and x.layout == torch.strided and x.dim() >= 2
        and isinstance(training, bool) and mask is None and not given
        and _vectors(x, running_mean, running_var, weight, bias)
        and (running_mean is None) == (running_var is None)
        and (type(momentum) in _NUMBERS and 0.0 <= momentum <= 1.0 or momentum is None and (  # type: ignore[operator]
            num_batches_tracked is not None or not training or running_mean is None))
        and type(eps) in _NUMBERS and 0.0 < eps <= _LARGEST  # (a larger int: float(eps) would overflow)
        and (training or running_mean is not None)
        and (num_batches_tracked is None or type(num_batches_tracked) is torch.Tensor
             and num_batches_tracked.dim() == 0 and num_batches_tracked.dtype == torch.int64)
    )  # the common call's checks, cheaply  # fmt: skip
    if not plain:  # the full check finds and names what is wrong
        _check(x, running_mean, running_var, weight, bias, training, momentum, eps, mask, num_batches_tracked, given)
    elif training and sync is None and native_kernel:
        y = _fused_call(x, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked)
        if y is not None:
            return y
    keep = None if momentum is None else 1.0 - momentum
    return _route(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked, mask,
                  sync, native_kernel, given, keep)  # fmt: skip


def dispatch(
    x: torch.Tensor, running_mean: Any, running_var: Any, weight: Any, bias: Any, training: bool,
    momentum: float | None, eps: float, num_batches_tracked: Any, mask: Any, sync: Sync | None,
    native_kernel: bool, options: tuple[tuple[str, bool], ...], keep: float | None,
) -> torch.Tensor:  # fmt: skip
    """:func:`batch_norm` on checked arguments (a layer's trusted entry): ``momentum`` is
    PyTorch's (the new batch's weight, which its kernels take), ``keep`` bn1d's (the
    running statistics' weight, which the core takes), ``None`` both for the cumulative
    average; ``options`` the (name, value) pairs of the options given. The
    BrainPy-signature layer gives its own ``keep``: ``1 - (1 - m)`` is not ``m`` for every
    float (off by up to ``2**-53`` absolute, which at ``m = 1e-10`` is a relative 1e-6)."""
    if (
        training and sync is None and mask is None and native_kernel and not options
        and (keep is None or momentum is not None and 1.0 - momentum == keep)
        and _vectors(x, running_mean, running_var, weight, bias)
    ):  # the common training call  # fmt: skip
        y = _fused_call(x, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked)
        if y is not None:
            return y
    return _route(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked, mask,
                  sync, native_kernel, options, keep)  # fmt: skip


def _route(
    x: torch.Tensor, running_mean: Any, running_var: Any, weight: Any, bias: Any, training: bool,
    momentum: float | None, eps: float, num_batches_tracked: Any, mask: Any, sync: Sync | None,
    native_kernel: bool, options: tuple[tuple[str, bool], ...], keep: float | None,
) -> torch.Tensor:  # fmt: skip
    """:func:`dispatch` past the flat route, which its callers have tried (:func:`path`'s
    computations)."""
    group = None
    if training and sync is not None:
        group = sync.group()
        if group is None:  # no torch.distributed (or a group of one): this rank's batch alone
            sync = None
    if training and mask is None and sync is None and x.numel() == x.shape[1]:
        # R3.5 from the shape, naming this function's argument (the core names its own)
        raise argument_error("input", "more than 1 value per channel when training", tuple(x.shape))
    route = path(x, running_mean, weight, training, mask, sync, native_kernel, options, bias, running_var)
    if not training:
        if route == "kernels" and torch_kernels.inference_is_accurate(running_mean, running_var, eps):  # type: ignore[arg-type]
            return _kernel_inference(x, running_mean, running_var, weight, bias, eps)  # type: ignore[arg-type]
        if route == "traced":
            return _centred_inference(x, running_mean, running_var, weight, bias, eps)  # type: ignore[arg-type]
        return _core(x, running_mean, running_var, weight, bias, False, keep, eps, None, mask, None, options)
    exchange = None
    if sync is not None:
        float64 = _compute_dtype(x, running_mean, weight) == torch.float64
        config = _call_config(x, running_mean, keep, eps, True, sync, options)
        exchange = sync.exchange(x, config, float64, group)
    if route == "kernels":
        y = _kernel_training(x, running_mean, running_var, weight, bias, momentum, keep, eps, num_batches_tracked,
                             exchange)  # fmt: skip
    else:
        y = _core(x, running_mean, running_var, weight, bias, True, keep, eps, num_batches_tracked, mask,
                  exchange, options, sync)  # fmt: skip
    if exchange is not None:  # the next call's agreed shift (torch_distributed.Reduce; None for Gather)
        sync.agreed_shift = exchange.next_shift  # type: ignore[union-attr]
    return y


def _call_config(
    x: torch.Tensor, running_mean: Any, keep: float | None, eps: float, training: bool, sync: Sync | None,
    options: tuple[tuple[str, bool], ...],
) -> BatchNormConfig:  # fmt: skip
    """The core's config of a call: ``keep`` (bn1d's momentum) of ``None`` is the cumulative
    average where there is a count to keep (tracked training), else irrelevant."""
    bn1d_momentum = keep if keep is not None else (None if training and running_mean is not None else 0.0)
    groups = None if sync is None else sync.axis_index_groups
    build = _config.__wrapped__ if torch.compiler.is_compiling() else _config  # Dynamo traces, never caches
    return build(x.shape[1], x.dim(), eps, bn1d_momentum, running_mean is not None, sync is not None, groups, options)


def _current(value: torch.Tensor) -> torch.Tensor:
    """A running statistic as the call must see it (a recorder's newer value, if any)."""
    recorder = getattr(recording, "recorder", None)
    return value if recorder is None else recorder.current(value)


def _targets(config: BatchNormConfig, running_mean: Any, running_var: Any, num_batches_tracked: Any) -> dict[str, Any]:
    """The tensors of a call's state (``config.state_keys``: none untracked, the count only
    for the cumulative average), by key."""
    given = {"running_mean": running_mean, "running_var": running_var, "num_batches_tracked": num_batches_tracked}
    return {key: given[key] for key in config.state_keys}


def _update(targets: dict[str, Any], new_state: Mapping[str, Any], count: bool, num_batches_tracked: Any) -> None:
    """A training call's new state copied into ``targets`` (recorded instead under
    ``torch_func.functional_call``), with PyTorch's count of training calls where ``count``.
    Eagerly the running statistics are written through ``.data``: no new version of them, as
    PyTorch's kernels update them, so a graph that saved them (an inference call's) still
    backpropagates after a training call; traced or compiled, as operations of the graph."""
    if count and num_batches_tracked is not None:
        new_state = {**new_state, "num_batches_tracked": _current(num_batches_tracked) + 1}
        targets = {**targets, "num_batches_tracked": num_batches_tracked}
    recorder = getattr(recording, "recorder", None)
    quiet = (  # eager on real tensors: no compilation, tracing, dispatch mode or torch.func wrapper
        recorder is None
        and not torch.compiler.is_compiling()
        and not torch._C._is_tracing()
        and not torch._C._len_torch_dispatch_stack()
    )
    with torch.no_grad():
        for key, value in new_state.items():
            target = targets[key]
            if recorder is not None:
                recorder.record(target, value)
            elif quiet and key != "num_batches_tracked" and not torch._C._functorch.is_functorch_wrapped_tensor(target):
                target.data.copy_(value)  # (PyTorch's forward bumps the count's version: so does this)
            else:
                target.copy_(value)


# -- the core --------------------------------------------------------------------------------------
def _core(
    x: torch.Tensor, running_mean: Any, running_var: Any, weight: Any, bias: Any, training: bool,
    keep: float | None, eps: float, num_batches_tracked: Any, mask: Any, exchange: Any,
    options: tuple[tuple[str, bool], ...], sync: Sync | None = None,
) -> torch.Tensor:  # fmt: skip
    """:func:`bn1d.algorithm.forward` under autograd, writing the new running statistics."""
    config = _call_config(x, running_mean, keep, eps, training, sync, options)
    targets = _targets(config, running_mean, running_var, num_batches_tracked)
    state = {key: _current(target) for key, target in targets.items()}
    if training:  # copies: under torch.compile with graph breaks, a graph may save them for backward
        state = {key: value.clone() for key, value in state.items()}  # before the writes below
    params = {key: value for key, value in (("scale", weight), ("bias", bias)) if value is not None}
    hooks = Hooks(stop_gradient=torch.Tensor.detach)
    if exchange is not None:
        hooks = hooks._replace(all_gather=make_all_gather(exchange))
    y, new_state = algorithm.forward(xp, x, params, state, config, training=training, mask=mask, hooks=hooks)
    if training:
        _update(targets, new_state, running_mean is None or keep is not None, num_batches_tracked)
    return y


# -- PyTorch's kernels, checked ------------------------------------------------------------------
def _contiguous_gradients(grads: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A pre-hook of PyTorch's batch-norm backward node: the gradient of ``y`` made
    contiguous (:func:`_with_gradient_hook`); an undefined (``None``) or contiguous one stays."""
    grad = grads[0]
    return None if grad is None or grad.is_contiguous() else (grad.contiguous(), *grads[1:])


def _channels_last(x: torch.Tensor) -> torch.memory_format | None:
    """``x``'s channels-last memory format, if it is in one (and not also contiguous)."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            return fmt
    return None


class _ChannelFirst(torch.autograd.Function):
    """A channels-last ``x`` copied channel-first, its gradient given back channels-last
    (as PyTorch's kernels give a channels-last input's gradient)."""

    @staticmethod
    def forward(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:  # type: ignore[override]
        return x.contiguous()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.fmt = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return grad.contiguous(memory_format=ctx.fmt), None


def _as_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as PyTorch's kernels must see it: contiguous, channel-first (a channels-last
    or strided input would run their float32-chained statistics or strided kernels)."""
    if x.is_contiguous():
        return x
    fmt = _channels_last(x)
    return x.contiguous() if fmt is None or not x.requires_grad else _ChannelFirst.apply(x, fmt)


def _as_output(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in ``x``'s memory format (channels-last input gives channels-last output, as
    PyTorch's kernels do)."""
    fmt = _channels_last(x)
    return y if fmt is None else y.contiguous(memory_format=fmt)


#: The inputs from this many values on have every gradient of ``y`` made contiguous (below,
#: a contiguous gradient would pay more for the hook than a strided one for PyTorch's kernel).
HOOKED_NUMEL = 2**17


def _with_gradient_hook(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y``, whose gradient reaches PyTorch's backward kernel contiguous where that
    matters: its CPU kernel permutes a 4-D or 5-D gradient strided like channels-last
    with a size-1 spatial axis, rounds half inputs' parameter gradients to half on a
    strided one, and from :data:`HOOKED_NUMEL` values its strided kernel's time exceeds the
    hook's (``docs/performance.md``). Below, 2-D and 3-D float32 and float64 gradients reach
    PyTorch's strided kernel as in ``nn.BatchNorm1d`` (tested against the specification).
    ``torch_kernels.FusedBatchNorm``'s backward takes any strides: no hook there."""
    if (
        y.requires_grad
        and (x.dim() > 3 or x.dtype in _HALF_DTYPES or x.numel() >= HOOKED_NUMEL)
        and type(y.grad_fn) is not torch_kernels.FusedBatchNorm._backward_cls  # type: ignore[attr-defined]
    ):
        y.grad_fn.register_prehook(_contiguous_gradients)  # type: ignore[union-attr]
    return y


def _kernel_inference(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, weight: Any, bias: Any, eps: float
) -> torch.Tensor:
    """PyTorch's inference kernel; where the parameters' gradients would be summed in its
    backward's float32 chains (:func:`torch_kernels.chained`), with bn1d's backward."""
    view = _as_input(x)
    if _affine_gradient(weight, bias) and torch_kernels.chained(view):
        y = torch_kernels.FusedBatchNorm.apply(view, weight, bias, running_mean, running_var, False, 0.0, eps)
    else:
        y = torch.batch_norm(view, weight, bias, running_mean, running_var, False, 0.0, eps, False)
    return _as_output(_with_gradient_hook(y, x), x)


def _centred_inference(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, weight: Any, bias: Any, eps: float
) -> torch.Tensor:
    """Inference as a traced graph records it: ``x`` centred on the running mean, then
    PyTorch's inference kernel with a zero mean, so an export holds a ``batch_norm``
    (ONNX ``BatchNormalization``) that runtimes fuse, and meets R2.7 at any
    ``|running_mean| / std``: the kernel's ``x * a + b`` rounds at ``|x - mean|``, not at
    ``|mean|`` (``docs/deployment.md``; TorchScript's forward does the same)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    centred = x + (-running_mean).view(shape)  # an Add of a constant: ONNX runtimes fold it into a Conv's bias
    y = torch.batch_norm(centred, weight, bias, torch.zeros_like(running_mean), running_var, False, 0.0, eps, False)
    return y.to(x.dtype)


def _kernel_training(
    x: torch.Tensor, running_mean: Any, running_var: Any, weight: Any, bias: Any, momentum: float | None,
    keep: float | None, eps: float, num_batches_tracked: Any, exchange: Any,
) -> torch.Tensor:  # fmt: skip
    """PyTorch's fused training kernel where its result meets the rule (unsynced, and its
    ``1 - momentum`` is ``keep``), else :class:`torch_kernels.NativeBatchNorm` (exact;
    synced with ``exchange``)."""
    if exchange is None and (keep is None or 1.0 - momentum == keep):  # type: ignore[operator]
        y = _fused(_as_input(x), running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked)
        if y is not None:
            return _as_output(_with_gradient_hook(y, x), x)
    return _split_training(x, running_mean, running_var, weight, bias, keep, eps, num_batches_tracked, exchange)


def _split_training(
    x: torch.Tensor, running_mean: Any, running_var: Any, weight: Any, bias: Any, keep: float | None, eps: float,
    num_batches_tracked: Any, exchange: Any,
) -> torch.Tensor:  # fmt: skip
    """:class:`torch_kernels.NativeBatchNorm`'s training call (exact; synced with ``exchange``)."""
    view = _as_input(x)
    config = _call_config(x, running_mean, keep, eps, True, None, ())
    state = _targets(config, running_mean, running_var, num_batches_tracked)
    y, *new_values = torch_kernels.NativeBatchNorm.apply(
        view.to(_compute_dtype(x, running_mean, weight)).contiguous(), weight, bias, state, exchange, config
    )
    _update(state, dict(zip(config.state_keys, new_values)), running_mean is None or keep is not None,
            num_batches_tracked)  # fmt: skip
    return _as_output(y.to(x.dtype), x)


def _fused(
    view: torch.Tensor, running_mean: Any, running_var: Any, weight: Any, bias: Any, momentum: float | None,
    eps: float, num_batches_tracked: Any,
) -> torch.Tensor | None:  # fmt: skip
    """PyTorch's fused training kernel on ``view`` (contiguous), or ``None`` (state
    untouched) where its statistics say that its result misses the rule. The kernel writes
    the batch's statistics into :func:`torch_kernels.batch_statistics`' buffers; the running
    statistics (``running += factor * (batch - running)``, as PyTorch's kernel updates
    them) and the count change only once the check has accepted them."""
    accumulation = torch_kernels.fused_accumulation(view.shape, view.dtype, torch.get_num_threads())  # on the CPU
    if accumulation is None:
        return None
    reference = running_mean if running_mean is not None else weight
    mean, var = torch_kernels.batch_statistics(view.shape[1], (view if reference is None else reference).dtype)
    kernel = torch.native_batch_norm
    if view.dtype == torch.float32 and accumulation[0] > torch_kernels.BACKWARD_CHAIN_ROWS and torch.is_grad_enabled():
        kernel = torch_kernels.FusedBatchNorm.apply  # its own backward: see there
    y = kernel(view, weight, bias, mean, var, True, 1.0, eps)[0]
    if not torch_kernels.fused_is_accurate(
        mean, var, accumulation[2], None if running_mean is None else (running_mean, running_var)
    ):
        mean.data.zero_(), var.data.zero_()  # (.data: no new version; a graph may hold them, as the kernel's)
        return None
    if running_mean is not None:  # PyTorch's factor: the new batch's weight (the cumulative average's: 1 / k)
        factor = momentum if momentum is not None else 1.0 / (int(num_batches_tracked) + 1)
        running = (running_mean.data, running_var.data)  # no new version either
        if factor <= 0.5:
            torch._foreach_lerp_(running, (mean, var), factor)
        else:  # lerp's weight rounds to float32: 1 - factor (exact) keeps the old statistics' weight exact
            torch._foreach_lerp_((mean.data, var.data), running, 1.0 - factor)
            torch._foreach_copy_(running, (mean, var))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return y
