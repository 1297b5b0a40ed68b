"""The catalogue of named conformance cases, covering every rule of ``docs/spec.md``.

A case is data: constructor arguments (framework-free), an input recipe and a
sequence of calls. Its inputs are generated deterministically from its name, and
its expected results come from the NumPy specification in float64
(``golden.py``: stored for the small cases, computed from the seeds for the
large ones). Every compared quantity's tolerance is the bound the contract's
accuracy rule implies for it (``tolerances.py``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CASES",
    "CHECK_CASES",
    "ERROR_CASES",
    "SYNC_CASES",
    "Case",
    "CheckCase",
    "ErrorCase",
    "Step",
    "SyncCase",
    "make_inputs",
]

#: Cases with more values than this are not stored: their golden data come from the seeds.
STORED_LIMIT = 4096


@dataclass(frozen=True)
class Step:
    """One call: ``training`` (None: the layer's mode), masked fraction (None: no mask)."""

    training: bool | None = None
    keep: float | None = None
    loc: float = 0.5
    scale: float = 2.0


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    layer: dict[str, Any] = field(default_factory=dict)
    steps: tuple[Step, ...] = (Step(),)
    dtype: str = "float32"
    param_dtype: str = "float32"
    gradients: bool = True
    #: The rules of ``docs/spec.md`` it checks (every case also checks R6.1, the state's
    #: keys, R3.1, the initial state, and R2.5's output dtype).
    rules: tuple[str, ...] = ()

    @property
    def feature_axis(self) -> int:
        axis = self.layer.get("axis", (0, 1))
        axes = {a % len(self.shape) for a in ((axis,) if isinstance(axis, int) else axis)}
        return next(a for a in range(len(self.shape)) if a not in axes)

    @property
    def num_features(self) -> int:
        return self.shape[self.feature_axis]

    @property
    def stored(self) -> bool:
        return int(np.prod(self.shape)) <= STORED_LIMIT

    def constructor(self) -> dict[str, Any]:
        return {"num_features": self.num_features, **self.layer}


@dataclass(frozen=True)
class ErrorCase:
    """A bad argument or input: the same exception type on every backend.

    ``where`` is "constructor" (``layer`` holds the bad arguments), "call" (the
    ``input`` recipe) or "load" (the ``state`` recipe); for the last two ``layer``
    holds valid extra arguments of the layer that is called or loaded.
    """

    name: str
    where: str
    exception: type[Exception]
    argument: str
    layer: dict[str, Any] = field(default_factory=dict)
    input: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    rules: tuple[str, ...] = ("R7.1",)


@dataclass(frozen=True)
class SyncCase:
    """Synced statistics over ``replicas`` with local inputs of ``shape`` and
    per-replica kept fractions ``keep`` (uneven counts)."""

    name: str
    shape: tuple[int, ...]
    keep: tuple[float | None, ...]
    layer: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    loc: float = 0.5
    scale: float = 2.0
    rules: tuple[str, ...] = ("R4.1", "R4.4")

    @property
    def replicas(self) -> int:
        return len(self.keep)

    @property
    def stored(self) -> bool:
        return int(np.prod(self.shape)) * self.replicas <= STORED_LIMIT

    def constructor(self) -> dict[str, Any]:
        return {"num_features": self.shape[-1], "axis_name": "replicas", **self.layer}


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded (to nearest even) onto bfloat16's grid, still float32."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def representable(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype``'s grid, as float64 (what the backend will actually see)."""
    if dtype == "bfloat16":
        return round_to_bfloat16(x.astype(np.float32)).astype(np.float64)
    return x.astype(dtype).astype(np.float64)


def make_inputs(
    name: str, shape: tuple[int, ...], feature_axis: int, steps: int, keep: Any, dtype: str, loc_scale: Any
):
    """(xs, masks, dy) for a case, deterministic in its name."""
    rng = np.random.default_rng(_seed(name))
    xs: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    mask_shape = shape[:feature_axis] + shape[feature_axis + 1 :]
    for i in range(steps):
        loc, scale = loc_scale[i]
        xs.append(representable(rng.normal(loc, scale, shape), dtype))
        if keep[i] is None:
            masks.append(None)
        elif 0 < keep[i] < 0.1:  # exactly one kept position: n == 1 known only at run time
            mask = np.zeros(mask_shape, bool)
            mask.flat[rng.integers(mask.size)] = True
            masks.append(mask)
        else:
            mask = rng.random(mask_shape) < keep[i]
            if keep[i] > 0:
                mask.flat[:2] = True  # at least two kept values
            masks.append(mask)
    dy = representable(rng.normal(size=shape), dtype)  # the cotangent a backend sees, in its dtype
    return xs, masks, dy


# |mean| >> std: 1e6 in float64 (beyond the rule's 1e4: its bound scales by 100),
# 1e3 in float32, where the one-pass formula loses 10% of the variance.
_ILL = Step(loc=1e4, scale=1e-2)
# The accuracy rule at the sizes users run: n = 2**18 values per feature (or 2**16
# for half inputs), |mean| / std up to 1e4, every layout, masks, sync.
_RAW = Step(loc=1e4, scale=1.0)
_ACCURACY = {"momentum": 0.0}
CASES: tuple[Case, ...] = (
    Case("default_blc", (4, 5, 3), rules=("R1.1", "R2.1", "R2.3", "R3.2", "R3.3")),
    Case("axis0_bc", (8, 3), {"axis": 0}, rules=("R1.3",)),
    Case("channel_first_bcl", (4, 3, 5), {"axis": (0, 2)}, rules=("R1.3",)),
    Case("negative_axes", (4, 5, 3), {"axis": (-3, -2)}, rules=("R1.3",)),
    Case("feature_axis_first", (3, 4, 5), {"axis": (1, 2)}, rules=("R1.3",)),
    Case("rank4", (2, 3, 4, 3), {"axis": (0, 1, 2)}, rules=("R1.3",)),
    Case("three_steps_then_inference", (4, 5, 3), {"momentum": 0.7},
         (Step(), Step(loc=-1.0, scale=0.5), Step(loc=2.0), Step(training=False)), rules=("R1.5", "R2.4", "R3.2")),
    Case("inference_mode", (4, 5, 3), {"mode": "inference"}, rules=("R1.8", "R2.4")),
    Case("training_flag_in_inference_mode", (4, 5, 3), {"mode": "inference"}, (Step(training=True), Step()),
         rules=("R1.8",)),
    Case("epsilon_large", (4, 5, 3), {"epsilon": 0.5}, rules=("R1.4",)),
    Case("epsilon_tiny", (4, 5, 3), {"epsilon": 1e-10}, rules=("R1.4",)),
    Case("momentum_zero", (4, 5, 3), {"momentum": 0.0}, (Step(), Step(loc=-1.0)), rules=("R1.5", "R3.2")),
    Case("momentum_one", (4, 5, 3), {"momentum": 1.0}, (Step(), Step(loc=-1.0)), rules=("R1.5", "R3.2")),
    Case("affine_false", (4, 5, 3), {"affine": False}, rules=("R1.6",)),
    Case("initializers", (4, 5, 3), {"scale_initializer": np.array([0.5, 2.0, -1.0]), "bias_initializer": 0.25},
         rules=("R1.7",)),
    Case("fast_variance", (4, 5, 3), {"fast_variance": True}, (Step(), Step(training=False)), rules=("R1.9", "R2.2")),
    Case("biased_running_var", (4, 5, 3), {"unbiased_running_var": False}, (Step(), Step(training=False)),
         rules=("R1.9", "R3.4")),
    Case("cumulative_average", (4, 5, 3), {"momentum": None},
         (Step(), Step(loc=-1.0, scale=0.5), Step(loc=2.0), Step(training=False)), rules=("R1.5", "R3.7")),
    # A training call that sees no data is not counted (PyTorch cannot express it: no masks).
    Case("cumulative_average_empty_call", (4, 5, 3), {"momentum": None},
         (Step(), Step(keep=0.0), Step(loc=-1.0, scale=0.5), Step(training=False)), rules=("R3.6", "R3.7")),
    Case("no_running_stats", (4, 5, 3), {"track_running_stats": False},
         (Step(), Step(loc=-1.0, training=False), Step(keep=0.6, training=False), Step(keep=0.0)),
         rules=("R1.9", "R3.8")),
    Case("no_running_stats_affine_false", (4, 3, 5), {"track_running_stats": False, "affine": False, "axis": (0, 2)},
         (Step(), Step(training=False)), rules=("R3.8", "R1.6")),
    Case("synced_layer_inference", (4, 5, 3), {"axis_name": "replicas", "mode": "inference"}, (Step(), Step(loc=2.0)),
         rules=("R4.5",)),
    Case("mask", (4, 5, 3), {}, (Step(keep=0.6), Step(keep=0.6, training=False)), rules=("R5.1",)),
    Case("mask_channel_first", (4, 3, 5), {"axis": (0, 2)}, (Step(keep=0.5),), rules=("R5.1",)),
    Case("mask_single_value", (4, 5, 3), {}, (Step(keep=0.05),), rules=("R3.5", "R5.1")),
    Case("mask_none_kept", (4, 5, 3), {}, (Step(), Step(keep=0.0)), rules=("R3.6", "R5.1")),
    Case("empty_batch", (0, 5, 3), {}, (Step(),), gradients=False, rules=("R3.6",)),
    Case("ill_conditioned_float64", (16, 4, 2), {}, (_ILL,), "float64", "float64", rules=("R2.5", "R2.7")),
    Case("ill_conditioned_float32", (16, 4, 2), {}, (Step(loc=1e3, scale=1.0),), rules=("R2.7",)),
    Case("float64", (4, 5, 3), {"momentum": 0.5}, (Step(), Step(training=False)), "float64", "float64",
         rules=("R2.5",)),
    # float64 input with float32 statistics: computed in float64 (a float32 computation is
    # 1e7 times over these bounds).
    Case("float64_input_float32_params", (8, 16, 3), {"momentum": 0.5},
         (Step(loc=1e3, scale=1.0), Step(training=False, loc=1e3)), "float64", "float32", rules=("R2.5",)),
    Case("float16", (4, 5, 3), {}, (Step(loc=300.0, scale=1.0), Step(training=False)), "float16", rules=("R2.5",)),
    Case("bfloat16", (4, 5, 3), {}, (Step(loc=30.0, scale=1.0), Step(training=False)), "bfloat16", rules=("R2.5",)),
    Case("accuracy_blc_mean_1e4", (64, 4096, 4), _ACCURACY, (_RAW,), rules=("R2.7",)),
    Case("accuracy_blc_mean_0.25", (64, 4096, 4), _ACCURACY, (Step(loc=0.25, scale=1.0),), rules=("R2.7",)),
    Case("accuracy_blc_mean_100", (64, 4096, 4), _ACCURACY, (Step(loc=100.0, scale=1.0),), rules=("R2.7",)),
    Case("accuracy_channel_first", (16, 4, 16384), {**_ACCURACY, "axis": (0, 2)}, (_RAW,), rules=("R2.7",)),
    Case("accuracy_bc", (262144, 4), {**_ACCURACY, "axis": 0}, (Step(loc=1e3, scale=1.0),), rules=("R2.7",)),
    Case("accuracy_mask", (64, 4096, 4), _ACCURACY, (Step(loc=1e4, scale=1.0, keep=0.5),), rules=("R2.7", "R5.1")),
    Case("accuracy_then_inference", (64, 4096, 4), {"momentum": 0.5},
         (_RAW, Step(loc=1e4 + 1.0), Step(training=False, loc=1e4)), rules=("R2.7", "R2.4")),
    Case("accuracy_float16", (16, 4096, 4), _ACCURACY, (Step(loc=300.0, scale=1.0),), "float16", rules=("R2.7",)),
    Case("accuracy_bfloat16", (16, 4096, 4), _ACCURACY, (Step(loc=30.0, scale=1.0),), "bfloat16", rules=("R2.7",)),
)  # fmt: skip

_X = {"shape": (4, 5, 3)}
_C, _V, _L, _R, _M = ("R1.2", "R7.1"), ("R1.3", "R7.1"), ("R6.2", "R6.3", "R7.1"), ("R2.6", "R7.1"), ("R5.2", "R7.1")
ERROR_CASES: tuple[ErrorCase, ...] = (
    ErrorCase("num_features_zero", "constructor", ValueError, "num_features", layer={"num_features": 0}, rules=_C),
    ErrorCase("num_features_float", "constructor", TypeError, "num_features", layer={"num_features": 3.0}, rules=_C),
    ErrorCase("axis_duplicate", "constructor", ValueError, "axis", layer={"axis": (0, -3)}, rules=_V),
    ErrorCase("axis_out_of_range", "constructor", ValueError, "axis", layer={"axis": (0, 3)}, rules=_V),
    ErrorCase("axis_type", "constructor", TypeError, "axis", layer={"axis": "0"}, rules=_V),
    ErrorCase("epsilon_zero", "constructor", ValueError, "epsilon", layer={"epsilon": 0.0}, rules=("R1.4", "R7.1")),
    ErrorCase("epsilon_nan", "constructor", ValueError, "epsilon", layer={"epsilon": float("nan")},
              rules=("R1.4", "R7.1")),
    ErrorCase("momentum_above_one", "constructor", ValueError, "momentum", layer={"momentum": 1.5},
              rules=("R1.5", "R7.1")),
    ErrorCase("momentum_negative", "constructor", ValueError, "momentum", layer={"momentum": -0.1},
              rules=("R1.5", "R7.1")),
    ErrorCase("momentum_string", "constructor", TypeError, "momentum", layer={"momentum": "0.9"},
              rules=("R1.5", "R7.1")),
    ErrorCase("affine_not_bool", "constructor", TypeError, "affine", layer={"affine": 1}, rules=("R1.6", "R7.1")),
    ErrorCase("mode_unknown", "constructor", ValueError, "mode", layer={"mode": "train"}, rules=("R1.8", "R7.1")),
    ErrorCase("option_unknown", "constructor", TypeError, "use_fast_variance", layer={"use_fast_variance": True},
              rules=("R1.9", "R7.1")),
    ErrorCase("option_not_bool", "constructor", TypeError, "track_running_stats", layer={"track_running_stats": 1},
              rules=("R1.9", "R7.1")),
    ErrorCase("scale_initializer_shape", "constructor", ValueError, "scale_initializer",
              layer={"scale_initializer": np.ones(4)}, rules=("R1.7", "R7.1")),
    ErrorCase("bias_initializer_type", "constructor", TypeError, "bias_initializer",
              layer={"bias_initializer": "zeros"}, rules=("R1.7", "R7.1")),
    ErrorCase("groups_without_axis_name", "constructor", ValueError, "axis_index_groups",
              layer={"axis_index_groups": [[0, 1]]}, rules=("R4.3", "R7.1")),
    ErrorCase("groups_unequal", "constructor", ValueError, "axis_index_groups",
              layer={"axis_name": "i", "axis_index_groups": [[0, 1], [2]]}, rules=("R4.3", "R7.1")),
    ErrorCase("groups_overlapping", "constructor", ValueError, "axis_index_groups",
              layer={"axis_name": "i", "axis_index_groups": [[0, 1], [1, 2]]}, rules=("R4.3", "R7.1")),
    ErrorCase("groups_with_a_gap", "constructor", ValueError, "axis_index_groups",
              layer={"axis_name": "i", "axis_index_groups": [[0, 1], [3, 4]]}, rules=("R4.3", "R7.1")),
    ErrorCase("x_integer", "call", TypeError, "x", input={**_X, "dtype": "int32"}, rules=_R),
    ErrorCase("x_boolean", "call", TypeError, "x", input={**_X, "dtype": "bool"}, rules=_R),
    ErrorCase("x_wrong_rank", "call", ValueError, "x", input={"shape": (4, 3)}, rules=_V),
    ErrorCase("x_wrong_features", "call", ValueError, "x", input={"shape": (4, 5, 2)}, rules=("R1.2", "R7.1")),
    ErrorCase("x_single_value_training", "call", ValueError, "x", input={"shape": (1, 1, 3)}, rules=("R3.5", "R7.1")),
    ErrorCase("mask_not_bool", "call", TypeError, "mask", input={**_X, "mask_dtype": "int32"}, rules=_M),
    ErrorCase("mask_wrong_shape", "call", ValueError, "mask", input={**_X, "mask_shape": (5, 4)}, rules=_M),
    ErrorCase("state_missing_key", "load", ValueError, "state_dict", state={"drop": "bias"}, rules=_L),
    ErrorCase("state_unexpected_key", "load", ValueError, "state_dict", state={"add": "extra"}, rules=_L),
    ErrorCase("state_wrong_shape", "load", ValueError, "state_dict['scale']", state={"resize": "scale"}, rules=_L),
    ErrorCase("state_negative_var", "load", ValueError, "state_dict['running_var']", state={"negate": "running_var"},
              rules=_L),
    ErrorCase("state_overflows_float32", "load", ValueError, "state_dict['running_mean']",
              state={"overflow": "running_mean"}, rules=("R6.6", "R6.3", "R7.1")),
    ErrorCase("state_count_negative", "load", ValueError, "state_dict['num_batches_tracked']",
              layer={"momentum": None}, state={"set": ("num_batches_tracked", -1)}, rules=_L),
    ErrorCase("state_count_fractional", "load", ValueError, "state_dict['num_batches_tracked']",
              layer={"momentum": None}, state={"set": ("num_batches_tracked", 2.5)}, rules=_L),
)  # fmt: skip

_S = ("R4.1", "R4.4")
SYNC_CASES: tuple[SyncCase, ...] = (
    SyncCase("sync_equal_counts", (2, 5, 3), (None, None, None, None), rules=_S),
    SyncCase("sync_uneven_masks", (2, 5, 3), (0.9, 0.3, 0.6, 1.0), rules=(*_S, "R3.3", "R5.1")),
    SyncCase("sync_one_replica_empty", (2, 5, 3), (0.8, 0.0, 0.5, 0.7), rules=(*_S, "R3.6")),
    SyncCase("sync_groups", (2, 5, 3), (0.9, 0.3, 0.6, 1.0), {"axis_index_groups": [[0, 1], [2, 3]]},
             rules=(*_S, "R4.3")),
    SyncCase("sync_groups_interleaved", (2, 5, 3), (None, 0.5, None, 0.5), {"axis_index_groups": [[0, 2], [1, 3]]},
             rules=(*_S, "R4.3")),
    SyncCase("sync_fast_variance", (2, 5, 3), (0.9, 0.3, 0.6, 1.0), {"fast_variance": True}, rules=(*_S, "R2.2")),
    SyncCase("sync_cumulative_average", (2, 5, 3), (0.9, 0.0, 0.6, 1.0), {"momentum": None}, rules=(*_S, "R3.7")),
    SyncCase("sync_no_running_stats", (2, 5, 3), (None, 0.5, None, 0.5), {"track_running_stats": False},
             rules=(*_S, "R3.8")),
    SyncCase("sync_ill_conditioned_float64", (2, 5, 3), (None, 0.5, None, 0.5), {"momentum": 0.0}, "float64",
             loc=1e4, scale=1e-2, rules=(*_S, "R4.2")),
    SyncCase("sync_accuracy", (16, 4096, 4), (1.0, 0.5, 0.75, 0.25), {"momentum": 0.0}, loc=1e4, scale=1.0,
             rules=(*_S, "R4.2", "R2.7")),
)  # fmt: skip


@dataclass(frozen=True)
class CheckCase:
    """A check that is not a sequence of calls against golden vectors (the runner's
    ``CHECKS`` implement them), with the rules it covers."""

    name: str
    rules: tuple[str, ...]
    description: str


CHECK_CASES: tuple[CheckCase, ...] = (
    CheckCase("brainpy_reference_numbers", ("R8.1", "R1.1"), "BrainPy 2.8.2's numbers for its documented input"),
    CheckCase("fast_variance_cancels", ("R2.2",),
              "on |mean| / std = 1e6 the one-pass formula loses the variance (it is not the exact one) and is "
              "clamped at 0 (never negative, y finite)"),
    CheckCase("round_trip_after_nan", ("R6.5",),
              "after a NaN batch the layer's own state_dict loads back, with a RuntimeWarning, bit for bit"),
    CheckCase("state_through_converters", ("R6.7",),
              "a trained state through PyTorch's keys and Flax's variables loads back and gives the same outputs"),
    CheckCase("state_transfer", ("R6.4",), "a state trained on one backend gives the same outputs on another"),
    CheckCase("per_call_training_flag", ("R1.8", "R2.4"),
              "train()/eval() switch the mode; training= overrides it for one call; inference changes nothing"),
)  # fmt: skip


def case_inputs(case: Case) -> tuple[list[np.ndarray], list[np.ndarray | None], np.ndarray]:
    return make_inputs(
        case.name, case.shape, case.feature_axis, len(case.steps), [s.keep for s in case.steps], case.dtype,
        [(s.loc, s.scale) for s in case.steps],
    )  # fmt: skip


def sync_inputs(case: SyncCase) -> tuple[list[np.ndarray], list[np.ndarray | None], list[np.ndarray]]:
    xs, masks, dys = [], [], []
    for r, keep in enumerate(case.keep):
        (x,), (mask,), dy = make_inputs(f"{case.name}/{r}", case.shape, len(case.shape) - 1, 1, [keep], case.dtype,
                                        [(case.loc + r * case.scale, case.scale)])  # fmt: skip
        xs.append(x)
        masks.append(mask)
        dys.append(dy)
    return xs, masks, dys
