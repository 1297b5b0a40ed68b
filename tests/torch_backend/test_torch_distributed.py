"""Synced statistics of ``bn1d.backends.torch`` over torch.distributed (gloo, CPU).

Three launches (4 ranks, 2 ranks, 2 ranks) of tests/torch_backend/torch_workers/sync_worker.py, each
running many checks, spawned on loopback with a ``file://`` rendezvous in a tmp
dir, killed if they outlive a hard timeout. The results are compared here with
the NumPy specification: ``run_replicas`` (threads summing exactly) and, for
the groups and uneven batches, a single unsynced layer on the concatenated
batch of each group. Cases marked ``all-reduce`` force the exchange of large groups
(``torch_distributed.Reduce``) on these small ones.

Tolerances: float32 cases compare float32 results with the float64
specification. Outputs and input gradients are O(1) per element and go through
~3 float32 roundings plus sums of <= 24 values per feature, so 2e-5 absolute
and relative is ~100 float32 ulps; parameter gradients are sums of <= 24 O(1)
terms, hence 1e-4 absolute. float64 cases leave only summation-order rounding:
1e-10.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch_backend import worker_launch

pytest.importorskip("torch")

from bn1d.backends import numpy as spec  # noqa: E402

pytestmark = pytest.mark.dist

LAUNCH_TIMEOUT_S = 240
C = 4


def launch(job: dict, world: int, workdir: Path, **extra_env: str) -> list[dict]:
    return worker_launch.launch("sync_worker.py", job, world, workdir, timeout_s=LAUNCH_TIMEOUT_S, **extra_env)


def make_case(name, world, batches, *, axis=(0, 1), length=5, groups=None, masked=False, dtype="float32",
              fast_variance=False, steps=2, seed=0, x_grad=True, raw=False, momentum=0.9, exchange=None,
              perturb=None):  # fmt: skip
    """Per-rank data with rank-dependent means and spreads, so that weighting the
    ranks by their counts matters when batch sizes or masks differ. ``masked``:
    True, or the ranks that pass a mask (the others pass none); ``x_grad``:
    whether the input requires a gradient (the parameters always do); ``raw``:
    un-centred data instead, ``1e4 + rank + N(0, 1)`` (the accuracy rule's case);
    ``exchange="all_reduce"`` forces ``torch_distributed.Reduce``; ``perturb=(rank,
    step)`` changes that rank's agreed shift before that step."""
    rng = np.random.default_rng(seed)
    feature_axis = 1 if axis in ((0, 2), 0) else 2
    ndim = 2 if axis == 0 else 3

    def shape(batch):
        return (batch, C) if ndim == 2 else ((batch, C, length) if feature_axis == 1 else (batch, length, C))

    def batch_data(rank):
        spread = 1.0 if raw else 1 + rank
        x = ((1e4 if raw else 0.0) + rank + spread * rng.standard_normal(shape(batches[rank]))).astype(dtype)
        mask = None
        if masked is True or (masked and rank in masked):
            mask_shape = tuple(s for a, s in enumerate(shape(batches[rank])) if a != feature_axis)
            mask = rng.random(mask_shape) < 0.7
        return x, mask, rng.standard_normal(shape(batches[rank])).astype(dtype)

    return {
        "name": name, "world": world, "num_features": C, "axis": axis, "groups": groups, "momentum": momentum,
        "fast_variance": fast_variance, "param_dtype": dtype, "feature_axis": feature_axis, "x_grad": x_grad,
        "scale": (1 + 0.5 * rng.standard_normal(C)).astype(dtype), "bias": rng.standard_normal(C).astype(dtype),
        "steps": [[batch_data(r) for _ in range(steps)] for r in range(world)],
        "eval_x": [rng.standard_normal(shape(2)).astype(dtype) for _ in range(world)],
        "exchange": exchange, "perturb": perturb,
    }  # fmt: skip


FOUR = [
    make_case("equal batches", 4, [3, 3, 3, 3]),
    make_case("uneven batches, one empty, channel-first", 4, [3, 1, 0, 5], axis=(0, 2), seed=1),
    make_case("groups, uneven batches, masks", 4, [2, 4, 3, 1], groups=[[0, 1], [2, 3]], masked=True, seed=2),
    make_case(
        "groups, fast variance, float64",
        4,
        [2, 3, 1, 4],
        groups=[[0, 1], [2, 3]],
        fast_variance=True,
        dtype="float64",
        seed=3,
    ),  # fmt: skip
    make_case("uneven batches, masks, float64", 4, [1, 2, 3, 4], masked=True, dtype="float64", seed=4),
    # Ranks 0 and 2 pass masks (the core path), 1 and 3 none (the native kernels):
    # both paths make the same exchanges, forward and backward.
    make_case("masks on some ranks only", 4, [3, 2, 4, 1], masked=[0, 2], seed=8),
    make_case("native kernels, float64, channel-first", 4, [2, 3, 1, 4], axis=(0, 2), dtype="float64", seed=9),
    # Only the parameters need gradients (e.g. a first layer on raw data): neither
    # path exchanges cotangents, so the mixed paths still match, step after step.
    make_case(
        "masks on some ranks only, no input gradient", 4, [2, 3, 3, 2], masked=[1, 2], x_grad=False, steps=3, seed=10
    ),  # fmt: skip
    # The accuracy rule: mean 1e4 + rank, std 1, n = 2**17 over uneven ranks, masks on
    # two of them (mixed paths), groups; one step at momentum 0.
    make_case(
        "raw data, uneven ranks, groups",
        4,
        [40, 8, 56, 24],
        length=1024,
        groups=[[0, 1], [2, 3]],
        masked=[1, 2],
        raw=True,
        momentum=0.0,
        steps=1,
        seed=11,
    ),  # fmt: skip
    make_case(
        "raw data, channel-first",
        4,
        [24, 40, 8, 56],
        axis=(0, 2),
        length=1024,
        raw=True,
        momentum=0.0,
        steps=1,
        seed=12,
    ),  # fmt: skip
    # The same checks with the all-reduce exchange of large groups (torch_distributed.Reduce).
    make_case(
        "all-reduce: uneven batches, one empty, channel-first",
        4,
        [3, 1, 0, 5],
        axis=(0, 2),
        seed=13,
        exchange="all_reduce",
        steps=3,
    ),  # fmt: skip
    make_case(
        "all-reduce: groups, uneven batches, masks",
        4,
        [2, 4, 3, 1],
        groups=[[0, 1], [2, 3]],
        masked=True,
        seed=14,
        exchange="all_reduce",
    ),  # fmt: skip
    make_case(
        "all-reduce: masks on some ranks only", 4, [3, 2, 4, 1], masked=[0, 2], seed=15, exchange="all_reduce", steps=3
    ),  # fmt: skip
    make_case(
        "all-reduce: groups, fast variance, float64",
        4,
        [2, 3, 1, 4],
        groups=[[0, 1], [2, 3]],
        fast_variance=True,
        dtype="float64",
        seed=16,
        exchange="all_reduce",
    ),  # fmt: skip
    make_case(
        "all-reduce: masks on some ranks only, no input gradient",
        4,
        [2, 3, 3, 2],
        masked=[1, 2],
        x_grad=False,
        steps=3,
        seed=18,
        exchange="all_reduce",
    ),  # fmt: skip
    # Rank 2's agreed shift differs before step 1: that call falls back to the all-gather
    # (same numbers) and the ranks agree again from then on. (float64 statistics always
    # gather: test_torch_exchange_cost.py.)
    make_case(
        "all-reduce: uneven, a perturbed agreed shift",
        4,
        [1, 2, 3, 4],
        seed=17,
        exchange="all_reduce",
        steps=3,
        perturb=(2, 1),
    ),  # fmt: skip
    # The rule at |mean| / std = 1e4: the first call shifts by 0 (float64 keeps 1e-8 there),
    # the second by the first call's mean.
    make_case(
        "raw data, all-reduce, uneven ranks, groups",
        4,
        [40, 8, 56, 24],
        length=1024,
        groups=[[0, 1], [2, 3]],
        masked=[1, 2],
        raw=True,
        momentum=0.0,
        steps=2,
        seed=19,
        exchange="all_reduce",
    ),  # fmt: skip
]
ALL_REDUCE = [i for i, case in enumerate(FOUR) if case["exchange"] == "all_reduce"]
RAW = [i for i, case in enumerate(FOUR) if case["name"].startswith("raw data")]
TWO = [make_case("two ranks, (B, C) input, uneven", 2, [5, 2], axis=0, seed=5)]
DDP = {"in_features": 3, "num_features": C, "xs": [np.random.default_rng(6).standard_normal((b, 5, 3)).astype("float32")
                                                 for b in (2, 5)]}  # fmt: skip
DDP["dys"] = [np.random.default_rng(7).standard_normal((b, 5, C)).astype("float32") for b in (2, 5)]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return launch({"cases": FOUR, "eval_silent": True}, 4, tmp_path_factory.mktemp("torch4") / "run")


_COMPILED_RNG = np.random.default_rng(20)
#: Uneven batches (3 and 5 sequences), (B, L, C). The backend is aot_eager: dynamo's graph
#: capture (what fullgraph=True is about) and AOTAutograd, without Inductor's compile time
#: (test_torch_compile.py runs Inductor).
COMPILED = {
    "num_features": C, "backend": "aot_eager",
    "scale": (1 + 0.5 * _COMPILED_RNG.standard_normal(C)).astype("float32"),
    "bias": _COMPILED_RNG.standard_normal(C).astype("float32"),
    "steps": [[((rank + (1 + rank) * _COMPILED_RNG.standard_normal((b, 5, C))).astype("float32"),
                _COMPILED_RNG.standard_normal((b, 5, C)).astype("float32")) for _ in range(2)]
              for rank, b in enumerate((3, 5))],
}  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    job = {"cases": TWO, "ddp": DDP, "compiled": COMPILED, "faults": True}
    return launch(job, 2, tmp_path_factory.mktemp("torch2") / "run")


@pytest.fixture(scope="module")
def two_ranks_debug(tmp_path_factory):
    return launch(
        {"layer_order": True}, 2, tmp_path_factory.mktemp("torch2debug") / "run", TORCH_DISTRIBUTED_DEBUG="DETAIL"
    )


def specification(case: dict) -> list[dict]:
    """The NumPy specification of each rank's steps, on run_replicas' threads."""

    def replica(rank):
        layer = spec.BatchNorm1d(
            C, axis=case["axis"], momentum=case["momentum"], axis_name="batch", axis_index_groups=case["groups"],
            fast_variance=case["fast_variance"], scale_initializer=case["scale"].astype(np.float64),
            bias_initializer=case["bias"].astype(np.float64), dtype=np.float64,
        )  # fmt: skip
        steps = []
        for x, mask, dy in case["steps"][rank]:
            grads = layer.vjp(x.astype(np.float64), dy.astype(np.float64), mask)
            y = layer(x.astype(np.float64), mask)
            steps.append({"y": y, "dx": grads["x"], "dscale": grads["scale"], "dbias": grads["bias"],
                          "running_mean": layer.running_mean, "running_var": layer.running_var})  # fmt: skip
        return {"steps": steps, "eval_y": layer(case["eval_x"][rank].astype(np.float64), training=False)}

    return spec.run_replicas(replica, case["world"], timeout=60)


def tolerances(case: dict) -> dict:
    if case["param_dtype"] == "float64":
        return {"y": 1e-10, "dx": 1e-10, "dscale": 1e-10, "dbias": 1e-10, "running_mean": 1e-10, "running_var": 1e-10}
    return {"y": 2e-5, "dx": 2e-5, "dscale": 1e-4, "dbias": 1e-4, "running_mean": 2e-5, "running_var": 2e-5}


def check_case(case: dict, results: list[dict]) -> None:
    expected = specification(case)
    tol = tolerances(case)
    for rank, (got, want) in enumerate(zip(results, expected)):
        for step, (g, w) in enumerate(zip(got["steps"], want["steps"])):
            for key, atol in tol.items():
                if key == "dx" and not case["x_grad"]:
                    assert g[key] is None
                    continue
                np.testing.assert_allclose(
                    g[key], w[key], rtol=atol, atol=atol, err_msg=f"rank {rank} step {step} {key}"
                )
        np.testing.assert_allclose(
            got["eval_y"], want["eval_y"], rtol=tol["y"], atol=tol["y"], err_msg=f"rank {rank} eval"
        )


def check_against_concatenation(case: dict, results: list[dict]) -> None:
    """First step of each group = one unsynced layer on the group's concatenated batch."""
    groups = case["groups"] or [list(range(case["world"]))]
    tol = tolerances(case)
    for group in groups:
        layer = spec.BatchNorm1d(C, axis=case["axis"], momentum=case["momentum"], fast_variance=case["fast_variance"],
                                 scale_initializer=case["scale"].astype(np.float64),
                                 bias_initializer=case["bias"].astype(np.float64), dtype=np.float64)  # fmt: skip
        xs, masks, dys = zip(*(case["steps"][r][0] for r in group))
        x, dy = np.concatenate(xs).astype(np.float64), np.concatenate(dys).astype(np.float64)
        if all(m is None for m in masks):
            mask = None
        else:  # a rank without a mask keeps every value
            kept = [np.ones(np.delete(b.shape, case["feature_axis"]), bool) for b in xs]
            mask = np.concatenate([k if m is None else m for k, m in zip(kept, masks)])
        grads = layer.vjp(x, dy, mask)
        y = layer(x, mask)
        splits = np.cumsum([len(b) for b in xs])[:-1]
        for r, y_r, dx_r in zip(group, np.split(y, splits), np.split(grads["x"], splits)):
            got = results[r]["steps"][0]
            np.testing.assert_allclose(got["y"], y_r, rtol=tol["y"], atol=tol["y"], err_msg=f"rank {r} y")
            np.testing.assert_allclose(got["dx"], dx_r, rtol=tol["dx"], atol=tol["dx"], err_msg=f"rank {r} dx")
            np.testing.assert_allclose(
                got["running_var"], layer.running_var, rtol=tol["running_var"], atol=tol["running_var"]
            )
        for key in ("scale", "bias"):  # each rank holds its share of the parameter gradients
            total = sum(results[r]["steps"][0]["d" + key] for r in group)
            np.testing.assert_allclose(total, grads[key], rtol=tol["d" + key], atol=tol["d" + key], err_msg=key)


@pytest.mark.parametrize("index", [i for i in range(len(FOUR)) if i not in RAW],
                         ids=[case["name"] for i, case in enumerate(FOUR) if i not in RAW])  # fmt: skip
def test_four_ranks_equal_the_specification(four_ranks, index):
    check_case(FOUR[index], [r["cases"][index] for r in four_ranks])


@pytest.mark.parametrize("index", RAW, ids=[FOUR[i]["name"] for i in RAW])
def test_raw_data_over_gloo_meet_the_accuracy_rule(four_ranks, index):
    """Each group's outputs, running statistics and gradients against the float64
    computation on its concatenated batch, in the rule's metrics (1e-5 each)."""
    from bn1d.conformance.accuracy import RULE, forward_errors, gradient_errors

    case, results = FOUR[index], [r["cases"][index] for r in four_ranks]
    fa = case["feature_axis"]
    groups = case["groups"] or [list(range(case["world"]))]
    for step, group in ((step, group) for step in range(len(case["steps"][0])) for group in groups):
        xs, masks, dys = zip(*(case["steps"][r][step] for r in group))
        x, dy = np.concatenate(xs).astype(np.float64), np.concatenate(dys).astype(np.float64)
        kept = [np.ones(np.delete(b.shape, fa), bool) for b in xs]
        mask = (
            None
            if all(m is None for m in masks)
            else np.concatenate([k if m is None else m for k, m in zip(kept, masks)])
        )
        layer = spec.BatchNorm1d(C, axis=case["axis"], scale_initializer=case["scale"].astype(np.float64),
                                 bias_initializer=case["bias"].astype(np.float64), dtype=np.float64)  # fmt: skip
        want = layer.vjp(x, dy, mask)
        per_feature = (-1,) + (1,) * (x.ndim - 1 - fa)
        scale, bias = case["scale"].reshape(per_feature), case["bias"].reshape(per_feature)
        steps = [results[r]["steps"][step] for r in group]
        y = (np.concatenate([s["y"] for s in steps]) - bias) / scale  # the rule's metrics: at scale 1, bias 0
        got = {"x": np.concatenate([s["dx"] for s in steps]) / scale, "scale": sum(s["dscale"] for s in steps),
               "bias": sum(s["dbias"] for s in steps)}  # fmt: skip
        want["x"] = want["x"] / scale
        for s in steps:
            errors = forward_errors(x, y, s["running_mean"], s["running_var"], feature_axis=fa, mask=mask)
            errors.update(gradient_errors(x, dy, got, want, feature_axis=fa, mask=mask))
            assert max(errors.values()) <= RULE, (step, group, errors)


CONCATENATED = [1, 2, 4, 5] + [i for i in ALL_REDUCE if i not in RAW and FOUR[i]["x_grad"]]


@pytest.mark.parametrize("index", CONCATENATED, ids=[FOUR[i]["name"] for i in CONCATENATED])
def test_four_ranks_equal_the_concatenated_batch(four_ranks, index):
    check_against_concatenation(FOUR[index], [r["cases"][index] for r in four_ranks])


def test_native_kernels_run_wherever_there_is_no_mask(four_ranks):
    # The paths are invisible in the results (both equal the specification), so
    # the worker counts the native path's calls: 2 training steps per case.
    for index, case in enumerate(FOUR):
        for rank, result in enumerate(four_ranks):
            masked = case["steps"][rank][0][1] is not None
            expected = 0 if masked or case["fast_variance"] else len(case["steps"][rank])
            assert result["cases"][index]["native_calls"] == expected, (case["name"], rank)


def test_each_case_makes_the_exchange_of_its_group_size(four_ranks):
    # Groups of <= ALL_GATHER_MAX_RANKS ranks gather (Gather); the forced cases reduce (Reduce),
    # on every rank and whichever path (core or kernels) the rank took.
    for index, case in enumerate(FOUR):
        for rank, result in enumerate(four_ranks):
            kinds = result["cases"][index]["exchanges"]
            want = "Reduce" if case["exchange"] == "all_reduce" else "Gather"
            assert kinds == [want] * len(case["steps"][rank]), (case["name"], rank, kinds)


@pytest.mark.parametrize("index", [i for i in ALL_REDUCE if not FOUR[i]["fast_variance"]],
                         ids=[FOUR[i]["name"] for i in ALL_REDUCE if not FOUR[i]["fast_variance"]])  # fmt: skip
def test_the_agreed_shift_is_the_same_bits_on_every_rank_and_the_last_mean(four_ranks, index):
    """After every call (the perturbed one included: it fell back and agreed again) the
    ranks of a group hold the same agreed shift, bit for bit: the group's mean of that
    call. Tolerance: the accuracy rule's mean metric, 1e-5 std beyond one float32 ulp
    of the mean (PyTorch's kernels return each rank's mean in the input's precision);
    float64: summation order only, 1e-12 of |mean| + std."""
    case = FOUR[index]
    for group in case["groups"] or [list(range(case["world"]))]:
        for step in range(len(case["steps"][0])):
            shifts = [four_ranks[r]["cases"][index]["steps"][step]["agreed_shift"] for r in group]
            for r, shift in zip(group, shifts):
                np.testing.assert_array_equal(shift, shifts[0], err_msg=f"rank {r} step {step}")
            xs, masks = zip(*((case["steps"][r][step][0], case["steps"][r][step][1]) for r in group))
            fa = case["feature_axis"]
            values = [np.moveaxis(x, fa, -1).reshape(-1, C) if m is None else np.moveaxis(x, fa, -1)[m]
                      for x, m in zip(xs, masks)]  # fmt: skip
            values = np.concatenate(values).astype(np.float64)
            mean, std = values.mean(axis=0), values.std(axis=0)
            if case["param_dtype"] == "float64":
                tolerance = 1e-12 * (np.abs(mean) + std)
            else:
                tolerance = 1e-5 * std + 2.0**-23 * np.abs(mean)
            assert np.all(np.abs(shifts[0] - mean) <= tolerance), (step, shifts[0] - mean, tolerance)


def test_empty_rank_gets_an_empty_output_and_the_global_statistics(four_ranks):
    empty = four_ranks[2]["cases"][1]["steps"][0]
    assert empty["y"].shape == (0, C, 5)
    assert np.all(np.isfinite(empty["running_var"]))
    np.testing.assert_array_equal(empty["running_var"], four_ranks[0]["cases"][1]["steps"][0]["running_var"])


def test_inference_does_not_communicate(four_ranks):
    # Rank 0 called a synced layer in inference while ranks 1-3 waited in a
    # barrier; a collective would have blocked it until its 5 s timeout.
    assert four_ranks[0]["eval_silent"]["seconds"] < 4


def test_two_ranks_equal_the_specification(two_ranks):
    check_case(TWO[0], [r["cases"][0] for r in two_ranks])
    check_against_concatenation(TWO[0], [r["cases"][0] for r in two_ranks])


def test_ddp_gradients_equal_the_global_batch(two_ranks):
    for rank, result in enumerate(two_ranks):
        ddp = result["ddp"]
        assert ddp["grads"].keys() == ddp["expected"].keys() == {"0.weight", "0.bias", "1.scale", "1.bias"}
        for name, grad in ddp["grads"].items():
            # sums of 35 float32 products, then DDP's float32 average: 1e-4 absolute.
            np.testing.assert_allclose(grad, ddp["expected"][name], rtol=1e-4, atol=1e-4, err_msg=f"rank {rank} {name}")
        np.testing.assert_allclose(ddp["running_var"], ddp["expected_running_var"], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("exchange", ["all_gather", "all_reduce"])
@pytest.mark.parametrize("mode", ["compiled", "mixed"])
def test_compiled_synced_training_equals_eager(two_ranks, exchange, mode):
    """``torch.compile(fullgraph=True)`` of a synced layer over gloo (the functional
    collectives, traced): the eager results, on every rank, also with only rank 0
    compiled. The compiled layer runs the core, the eager one PyTorch's kernels, on
    float32 data: a few ulps apart on O(1) values, parameter gradients summing 25 terms:
    1e-5 (test_torch_compile.py's tolerance)."""
    for rank, result in enumerate(two_ranks):
        eager, other = result["compiled"][(exchange, "eager")], result["compiled"][(exchange, mode)]
        for step, (want, got) in enumerate(zip(eager, other)):
            for key, value in want.items():
                np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=f"rank {rank} {step} {key}")
    # and the eager run is the global batch's (the synced statistics of both ranks' sequences)
    whole = np.concatenate([COMPILED["steps"][r][0][0] for r in range(2)]).astype(np.float64)
    reference = spec.BatchNorm1d(C, momentum=0.9, dtype=np.float64)
    reference(whole)
    got = two_ranks[1]["compiled"][(exchange, "eager")][0]["running_var"]
    np.testing.assert_allclose(got, reference.running_var, rtol=2e-5, atol=2e-5)


def test_groups_that_do_not_partition_the_ranks_are_a_value_error_on_every_rank(two_ranks):
    """R4.3: ``[[0]]`` partitions one rank, not the two of the process group; the
    check runs before any exchange, so no rank waits for another."""
    for result in two_ranks:
        error = result["groups_wrong_size"]
        assert error["type"] == "ValueError", error
        assert error["message"].startswith(
            "axis_index_groups: expected a partition of range(2) (the ranks of the process group)"
        ), error["message"]
        assert error["seconds"] < 5, error


def test_num_features_mismatch_names_both_ranks(two_ranks):
    for result in two_ranks:
        error = result["mismatch"]
        assert error["type"] == "ValueError", error
        assert error["message"].startswith("x: expected the same num_features"), error["message"]
        assert "ranks [0]: num_features=3 on axis 2 of a 3-D input (rank 0: shape (4, 5, 3))" in error["message"]
        assert "ranks [1]: num_features=4 on axis 2 of a 3-D input (rank 1: shape (4, 5, 4))" in error["message"]


def test_dtype_mismatch_names_both_ranks(two_ranks):
    for result in two_ranks:
        error = result["dtype_mismatch"]
        assert error["type"] == "ValueError", error
        assert "ranks [0]: num_features=3" in error["message"] and "float32 statistics" in error["message"]
        assert "ranks [1]: num_features=3" in error["message"] and "float64 statistics" in error["message"]


def test_a_dtype_change_after_the_first_call_names_both_ranks(two_ranks):
    # The first call agreed on everything; the second call's exchange carries each
    # rank's header and every rank raises, instead of mixing float32 and float64.
    for result in two_ranks:
        error = result["later_dtype_mismatch"]
        assert error["type"] == "ValueError", error
        assert "ranks [0]: num_features=3" in error["message"] and "float32 statistics" in error["message"]
        assert "ranks [1]: num_features=3" in error["message"] and "float64 statistics" in error["message"]


def test_a_later_dtype_change_under_the_all_reduce_exchange_names_both_ranks(two_ranks):
    # The all-reduce's checksum of the headers differs: every rank falls back to the all-gather,
    # whose headers name the ranks, as on the small groups' exchange.
    for result in two_ranks:
        error = result["later_dtype_mismatch_all_reduce"]
        assert error["type"] == "ValueError", error
        assert error["exchanges"] == ["Reduce", "Reduce"], error
        assert "ranks [0]: num_features=3" in error["message"] and "float32 statistics" in error["message"]
        assert "ranks [1]: num_features=3" in error["message"] and "float64 statistics" in error["message"]


def test_a_rank_that_never_calls_is_an_error_within_the_timeout(two_ranks):
    error = two_ranks[0]["never_calls"]
    assert error["type"] == "RuntimeError" and "timeout=2.0" in error["message"], error
    assert 1.5 < error["seconds"] < 10, error


def test_a_dead_rank_is_an_error_not_a_hang(two_ranks):
    error = two_ranks[0]["dies"]
    assert error["type"] == "RuntimeError" and "a rank may have died" in error["message"], error
    assert error["seconds"] < 30, error


def test_a_later_size_mismatch_is_reported_by_torch_distributed_debug(two_ranks_debug):
    # After their first calls agreed, two layers (3 and 4 features) are called in a
    # rank-dependent order: the exchanges differ in size, which the header inside
    # them cannot report. The documented remedy, TORCH_DISTRIBUTED_DEBUG=DETAIL,
    # compares every collective's shape across ranks: an error on both, no hang.
    for result in two_ranks_debug:
        error = result["layer_order"]
        assert error["type"] == "RuntimeError", error
        assert "Detected mismatch between collectives" in error["message"], error


REINITIALISED = """
import gc, sys, tempfile
import torch, torch.distributed as dist
from bn1d.backends.torch import BatchNorm1d
from bn1d.backends import torch_distributed
for run in range(2):  # a second process group after the first is destroyed (test suites, notebooks)
    dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
    BatchNorm1d(3, axis_name="d", axis_index_groups=[[0]])(torch.randn(4, 5, 3))
    assert len(torch_distributed._subgroups) == 1, len(torch_distributed._subgroups)
    dist.destroy_process_group()
    gc.collect()
    assert len(torch_distributed._subgroups) == 0, "the subgroups outlived their process group"
print("ok")
"""


def test_the_subgroup_cache_does_not_outlive_its_process_group():
    """The cache of ``axis_index_groups`` subgroups held every destroyed process
    group: it grew with each re-initialisation and the interpreter aborted at exit
    (SIGABRT, 'terminate called without an active exception')."""
    result = subprocess.run([sys.executable, "-c", REINITIALISED], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
