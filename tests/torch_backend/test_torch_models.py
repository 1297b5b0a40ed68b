"""bn1d inside whole PyTorch models: ``convert_batchnorm``, ``revert_batchnorm`` and checkpoints.

A converted model is compared with the unconverted one, PyTorch's own layers being an
independent implementation of the same semantics: both load one checkpoint, train
three SGD steps (momentum 0.9) on the same batches and evaluate. Tolerance: both are
float32 computations of O(1) values through a few convolutions (sums of <= 54
products) and the batch norms, whose statistics differ only in rounding (bn1d's
running statistics are formed in float64, PyTorch's in float32; momentum ``0.8`` is
stored as ``1 - 0.2``): measured within 2.1e-7 over the three steps; 2e-6 (~16
float32 ulps at 1) leaves room for other CPUs' kernels, while a wrong momentum
convention, count, Bessel factor or layout moves the running statistics by > 1e-2.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bn1d.backends import numpy as spec  # noqa: E402
from bn1d.backends.torch import (  # noqa: E402
    BatchNorm1d,
    ChannelFirstBatchNorm,
    convert_batchnorm,
    revert_batchnorm,
    sync_running_statistics,
)

TOL = 2e-6


def close(actual, expected, what, tol=TOL):
    np.testing.assert_allclose(
        torch.as_tensor(actual).detach().double().numpy(), torch.as_tensor(expected).detach().double().numpy(),
        rtol=tol, atol=tol, err_msg=what,
    )  # fmt: skip


class Net(nn.Module):
    """A small classifier with every PyTorch batch norm class and configuration: 3-D, 2-D
    and 1-D convolutions, a linear layer's (N, C) output, the cumulative average,
    untracked statistics, no affine parameters, a lazy module."""

    def __init__(self):
        super().__init__()
        self.conv3 = nn.Conv3d(2, 3, 3, padding=1)
        self.norm3 = nn.BatchNorm3d(3, momentum=0.2)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(4, momentum=None)  # the cumulative average
        self.conv1 = nn.Conv1d(4, 5, 3, padding=1)
        self.norm1 = nn.LazyBatchNorm1d(eps=1e-3)
        self.sync = nn.SyncBatchNorm(5, track_running_stats=False)
        self.linear = nn.Linear(5, 6)
        self.norm0 = nn.BatchNorm1d(6, affine=False)  # (N, C) input
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (N, 2, D, H, W)
        h = torch.relu(self.norm3(self.conv3(x))).mean(2)  # (N, 3, H, W)
        h = torch.relu(self.norm2(self.conv2(h)))  # (N, 4, H, W)
        h = torch.relu(self.norm1(self.conv1(h.flatten(2))))  # (N, 5, H * W)
        h = self.sync(h.unsqueeze(-1)).mean((2, 3))  # (N, 5)
        return self.head(torch.relu(self.norm0(self.linear(h))))


def batches(steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 2, 4, 5, 5, generator=generator) * 2 + 1, torch.randint(0, 3, (6,), generator=generator))
            for _ in range(steps)]  # fmt: skip


def trained_net():
    torch.manual_seed(0)
    net = Net()
    for x, _ in batches(2, seed=0):  # non-trivial running statistics and counts in the checkpoint
        net(x)
    return net


NORMS = ("norm3", "norm2", "norm1", "sync", "norm0")
CLASSES = {"norm3": nn.BatchNorm3d, "norm2": nn.BatchNorm2d, "norm1": nn.BatchNorm1d, "sync": nn.SyncBatchNorm,
           "norm0": nn.BatchNorm1d}  # fmt: skip


def test_new_user_converts_loads_the_old_checkpoint_trains_evaluates_and_reverts():
    """The new user's scenario, end to end: a model with all four PyTorch batch-norm
    classes (3d, 2d, 1d lazy, SyncBatchNorm) and a trained checkpoint; convert, load the
    old checkpoint, train three steps and evaluate: the unconverted model's numbers
    (momentum 0.2 is bn1d's 0.8, the cumulative average's count carries over); revert:
    PyTorch's classes again, with the same state and the same evaluation."""
    checkpoint = copy.deepcopy(trained_net().state_dict())
    theirs = Net()
    theirs(batches(1)[0][0])  # initialise the lazy module (its checkpoint shapes then load)
    theirs.load_state_dict(checkpoint)
    ours = copy.deepcopy(theirs)
    assert convert_batchnorm(ours) is ours
    for name in NORMS:
        assert type(getattr(ours, name)) is ChannelFirstBatchNorm, name
    assert ours.load_state_dict(checkpoint).missing_keys == []  # PyTorch's keys, num_batches_tracked included
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (theirs, ours)]
    for step, (x, target) in enumerate(batches(3)):
        for model, optimizer in zip((theirs, ours), optimizers):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()
        for (key, value), (our_key, our_value) in zip(theirs.state_dict().items(), ours.state_dict().items()):
            assert our_key == key.replace("norm3.weight", "norm3.scale").replace("norm2.weight", "norm2.scale").replace(
                "norm1.weight", "norm1.scale").replace("sync.weight", "sync.scale"), (our_key, key)  # fmt: skip
            close(our_value, value, f"step {step} {key}")
    assert int(ours.norm2.num_batches_tracked) == int(theirs.norm2.num_batches_tracked) == 5
    theirs.eval()
    ours.eval()
    x = batches(1, seed=7)[0][0]
    evaluation = theirs(x)
    close(ours(x), evaluation, "evaluation")
    state = {key.replace(".scale", ".weight"): value.clone() for key, value in ours.state_dict().items()}
    assert revert_batchnorm(ours) is ours
    for name in NORMS:
        assert type(getattr(ours, name)) is CLASSES[name] and not getattr(ours, name).training, name
    assert ours.norm3.momentum == 0.2 and ours.norm2.momentum is None
    reverted = ours.state_dict()
    assert list(reverted) == list(theirs.state_dict()) == list(state), "PyTorch's keys, in PyTorch's order"
    for key, value in state.items():
        close(reverted[key], value, f"reverted {key}", 0)
    close(ours(x), evaluation, "evaluation after reverting")


def test_conversion_keeps_the_modules_tensors_flags_and_sharing():
    net = trained_net().double()
    net.norm2.weight.requires_grad_(False)
    net.norm1.eval()
    net.extra = net.norm0  # one module registered twice
    tensors = {name: {k: v for k, v in getattr(net, name).named_parameters()} for name in NORMS}
    buffers = {name: {k: v for k, v in getattr(net, name).named_buffers()} for name in NORMS}
    convert_batchnorm(net)
    assert net.extra is net.norm0, "a shared module stays shared"
    for name in NORMS:
        layer = getattr(net, name)
        assert layer.torch_class is CLASSES[name]
        for key, value in tensors[name].items():
            assert getattr(layer, {"weight": "scale"}.get(key, key)) is value, (name, key)
        for key, value in buffers[name].items():
            assert getattr(layer, key) is value, (name, key)
        assert layer.scale.dtype == torch.float64 if layer.config.affine else True
    assert not net.norm2.scale.requires_grad and net.norm2.bias.requires_grad
    assert not net.norm1.training and net.norm2.training
    assert net.norm2.config.momentum is None and net.norm3.config.momentum == 0.8
    assert net.norm1.config.epsilon == 1e-3 and not net.norm0.config.affine
    assert not net.sync.config.track_running_stats and net.sync.config.axis_name == "batch"
    assert net.norm3.config.axis_name is None  # only the SyncBatchNorm syncs without axis_name


def test_the_converted_batchnorm1d_takes_2d_and_3d_input_and_each_class_its_own_ranks():
    model = convert_batchnorm(nn.ModuleDict({"one": nn.BatchNorm1d(3), "two": nn.BatchNorm2d(3)}))
    reference = nn.BatchNorm1d(3)
    for shape in ((8, 3), (4, 3, 5)):
        x = torch.randn(shape) * 2 + 1
        close(model["one"](x), reference(x), f"{shape} output")
        close(model["one"].running_var, reference.running_var, f"{shape} running_var")
    assert int(model["one"].num_batches_tracked) == 2
    with pytest.raises(ValueError, match=r"^x: expected a 2-D or 3-D input \(N, C, \.\.\.\) with num_features=3 on "
                                         r"axis 1, got \(2, 3, 4, 5\)$"):  # fmt: skip
        model["one"](torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"^x: expected a 4-D input .* got \(2, 3, 4\)$"):
        model["two"](torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"num_features=3 on axis 1, got \(2, 4, 4, 4\)$"):
        model["two"](torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"^mask: expected shape \(2, 4, 4\) \(x's shape without the feature axis\)"):
        model["two"](torch.randn(2, 3, 4, 4), mask=torch.ones(2, 16, dtype=torch.bool))


def test_a_mask_on_image_input_equals_the_specification():
    """A converted BatchNorm2d with a (N, H, W) mask: the float64 specification on the
    same data with axis=(0, 2, 3). float32 against float64 on O(1) values: 2e-5 (the
    layer tests' tolerance)."""
    layer = convert_batchnorm(nn.BatchNorm2d(3, momentum=0.1))
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 3, 5, 6)) * 2 + 1).astype(np.float32)
    mask = rng.random((4, 5, 6)) < 0.6
    reference = spec.BatchNorm1d(3, axis=(0, 2, 3), momentum=0.9, dtype=np.float64)
    y = layer(torch.from_numpy(x), mask=torch.from_numpy(mask))
    close(y, reference(x.astype(np.float64), mask), "y", 2e-5)
    close(layer.running_var, reference.running_var, "running_var", 2e-5)


def test_revert_gives_pytorchs_classes_with_the_same_state():
    net = trained_net()
    convert_batchnorm(net)
    net(batches(1)[0][0])  # one step as bn1d layers
    state = {key: value.clone() for key, value in net.state_dict().items()}
    net.eval()
    x = batches(1, seed=5)[0][0]
    expected = net(x)
    tensors = {name: dict(getattr(net, name).named_buffers()) for name in NORMS}
    assert revert_batchnorm(net) is net
    for name in NORMS:
        module = getattr(net, name)
        assert type(module) is CLASSES[name], name
        assert not module.training
        for key, value in tensors[name].items():
            assert getattr(module, key) is value, (name, key)
    assert net.norm3.momentum == 0.2 and net.norm2.momentum is None and net.norm1.eps == 1e-3
    assert not net.norm0.affine and not net.sync.track_running_stats
    close(net(x), expected, "inference after reverting")  # the same kernel on another view of the data
    # A reverted model loads a converted one's checkpoint (bn1d's `scale` for `weight`), its own
    # reverted state too.
    fresh = Net()
    fresh(x)
    revert_batchnorm(convert_batchnorm(fresh))
    assert fresh.load_state_dict(state).missing_keys == []
    for name in ("norm3", "norm2", "norm1", "sync"):
        close(getattr(fresh, name).weight, state[f"{name}.scale"], f"{name}.weight", 0)
    close(fresh.norm2.num_batches_tracked, state["norm2.num_batches_tracked"], "count", 0)
    close(fresh.norm3.running_var, state["norm3.running_var"], "running_var", 0)
    fresh.load_state_dict(net.state_dict())


def test_revert_takes_plain_layers_in_pytorchs_layout_and_refuses_the_others():
    model = nn.Sequential(BatchNorm1d(3, axis=(0, 2), momentum=0.9), BatchNorm1d(3, axis=0))
    revert_batchnorm(model)
    assert [type(m) for m in model] == [nn.BatchNorm1d, nn.BatchNorm1d] and model[0].momentum == 0.1
    for layer, pattern in (
        (BatchNorm1d(3), r"^model\.1: expected bn1d layers with features on axis 1 \(PyTorch's layout\), got "
                         r"'features on axis 2 of a 3-D input'$"),
        (BatchNorm1d(3, axis=0, fast_variance=True), r"^model\.1: expected fast_variance=False"),
        (BatchNorm1d(3, axis=0, unbiased_running_var=False), r"^model\.1: expected unbiased_running_var=True"),
    ):  # fmt: skip
        model = nn.Sequential(BatchNorm1d(3, axis=0), layer)
        with pytest.raises(ValueError, match=pattern):
            revert_batchnorm(model)
        assert all(isinstance(m, BatchNorm1d) for m in model), "nothing changed"


def test_conversion_errors_come_before_any_change():
    lazy = nn.Sequential(nn.BatchNorm1d(3), nn.LazyBatchNorm2d())
    cases = [
        (lazy, {}, ValueError, r"^model\.1: expected initialised batch norms \(run one forward pass first\)"),
        (nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, bias=False)), {}, ValueError,
         r"^model\.1: expected batch norms with a bias when affine"),
        (nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3).half()), {}, TypeError,
         r"^model\.1: expected float32 or float64 parameters and statistics, got torch\.float16$"),
        (nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, momentum=1.5)), {}, ValueError,
         r"^momentum: expected a finite float in \[0, 1\] or None, got -0\.5 \(converting model\.1, a "
         r"torch\.nn\.BatchNorm1d\)$"),
        (nn.Sequential(nn.BatchNorm1d(3)), {"fast_varience": True}, TypeError, r"^fast_varience: expected one of"),
        (nn.Sequential(nn.BatchNorm1d(3)), {"track_running_stats": False}, TypeError,
         r"^track_running_stats: expected not given"),
        (nn.Sequential(nn.BatchNorm1d(3)), {"axis_index_groups": [[0]]}, ValueError,
         r"^axis_index_groups: expected None when axis_name is None"),
    ]  # fmt: skip
    for model, options, exception, pattern in cases:
        before = [type(m) for m in model]
        with pytest.raises(exception, match=pattern):
            convert_batchnorm(model, **options)
        assert [type(m) for m in model] == before, pattern
    with pytest.raises(TypeError, match=r"^model: expected a torch\.nn\.Module, got 'dict'$"):
        convert_batchnorm({})


def test_options_reach_every_layer_and_a_bare_module_is_returned_converted():
    layer = convert_batchnorm(nn.BatchNorm2d(3), fast_variance=True, native_kernel=False)
    assert isinstance(layer, ChannelFirstBatchNorm) and layer.config.fast_variance and not layer._native
    synced = convert_batchnorm(nn.Sequential(nn.BatchNorm1d(3)), axis_name="data")
    assert synced[0].config.axis_name == "data"


# -- checkpoints ---------------------------------------------------------------------------


def test_converted_state_dict_keys_and_loading_either_names():
    layer = convert_batchnorm(nn.BatchNorm1d(3))
    assert list(layer.state_dict()) == ["scale", "bias", "running_mean", "running_var", "num_batches_tracked"]
    torch_state = {"weight": torch.tensor([1.0, 2.0, 3.0]), "bias": torch.zeros(3), "running_mean": torch.ones(3),
                   "running_var": torch.full((3,), 2.0), "num_batches_tracked": torch.tensor(7)}  # fmt: skip
    layer.load_state_dict(torch_state)
    close(layer.scale, [1, 2, 3], "weight as scale", 0)
    assert int(layer.num_batches_tracked) == 7
    plain = BatchNorm1d(3, axis=(0, 2), momentum=0.9).state_dict()  # bn1d's keys, no count: the count is kept
    layer.load_state_dict(plain)
    close(layer.running_var, torch.ones(3), "bn1d's keys", 0)
    assert int(layer.num_batches_tracked) == 7
    with pytest.raises(ValueError, match=r"^state_dict\['num_batches_tracked'\]: expected a non-negative integer"):
        layer.load_state_dict({**torch_state, "num_batches_tracked": torch.tensor(-1)})
    close(layer.scale, [1, 1, 1], "a failed load changes nothing", 0)
    result = layer.load_state_dict({"weight": torch.full((3,), 5.0), "extra": torch.ones(1)}, strict=False)
    assert sorted(result.missing_keys) == ["bias", "running_mean", "running_var"] and result.unexpected_keys == [
        "extra"
    ]
    close(layer.scale, [5, 5, 5], "strict=False loads what is present", 0)


def test_the_cumulative_average_needs_its_count():
    layer = convert_batchnorm(nn.BatchNorm1d(3, momentum=None))
    state = nn.BatchNorm1d(3, momentum=None).state_dict()
    del state["num_batches_tracked"]
    with pytest.raises(ValueError, match=r"missing \['num_batches_tracked'\]"):
        layer.load_state_dict(state)


def test_a_parent_loads_with_pytorchs_strict_semantics():
    """PyTorch documents: ``strict=False`` loads the entries present and returns the
    missing and unexpected keys; ``strict=True`` raises for them; a bad value raises
    either way. Each bn1d layer loads its own entries atomically."""
    model = nn.Sequential(nn.Linear(3, 3), BatchNorm1d(3, axis=0), convert_batchnorm(nn.BatchNorm1d(3)))
    state = model.state_dict()
    partial = {k: v + 1 for k, v in state.items() if k not in ("1.running_var", "2.scale") and "num_batches" not in k}
    partial["1.oops"] = torch.ones(1)
    result = model.load_state_dict(partial, strict=False)
    assert sorted(result.missing_keys) == ["1.running_var", "2.scale"]  # a count that is not state is kept
    assert result.unexpected_keys == ["1.oops"]
    close(model[1].running_mean, torch.ones(3), "present entries load", 0)
    close(model[1].running_var, torch.ones(3), "absent entries stay", 0)
    close(model[2].bias, torch.ones(3), "the converted layer's present entries load", 0)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"1\.running_var\""):
        model.load_state_dict(partial)
    bad = {**state, "2.running_var": -torch.ones(3)}
    with pytest.raises(RuntimeError, match=r"state_dict\['2\.running_var'\]: expected non-negative values"):
        model.load_state_dict(bad, strict=False)
    # A PyTorch checkpoint of version 1 (before num_batches_tracked) loads, keeping the count.
    old = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)).state_dict()
    del old["2.num_batches_tracked"]
    old._metadata["2"]["version"] = 1
    model[2].num_batches_tracked.fill_(4)
    result = model.load_state_dict({k.replace("1.weight", "1.scale"): v for k, v in old.items()
                                    if k != "1.num_batches_tracked"}, strict=False)  # fmt: skip
    assert result.missing_keys == [] and int(model[2].num_batches_tracked) == 4


# -- every PyTorch batch-norm configuration (R3.7 cumulative average, R3.8 no running statistics) --------

CONFIGS = [
    pytest.param(dict(momentum=momentum, affine=affine, track_running_stats=tracked), id=f"{name}-{a}-{t}")
    for momentum, name in ((0.1, "m0.1"), (None, "cumulative"), (0.0, "m0"), (1.0, "m1"))
    for affine, a in ((True, "affine"), (False, "plain"))
    for tracked, t in ((True, "tracked"), (False, "untracked"))
]


def side_by_side(theirs: nn.Module, ours: nn.Module, shape: tuple[int, ...], what: str) -> None:
    """Two training calls (gradients too), then two inference calls: equal outputs,
    gradients and buffers (tolerance: the module docstring's)."""
    generator = torch.Generator().manual_seed(4)
    for step, training in enumerate((True, True, False, False)):
        theirs.train(training)
        ours.train(training)
        x = torch.randn(shape, generator=generator) * 2 + 1
        x_theirs, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
        close(y_ours, y_theirs, f"{what} step {step} y")
        dy = torch.randn(shape, generator=generator)
        y_theirs.backward(dy)
        y_ours.backward(dy)
        close(x_ours.grad, x_theirs.grad, f"{what} step {step} dx")
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(theirs, key)
            assert (value is None) == (getattr(ours, key) is None), (what, key)
            if value is not None:
                close(getattr(ours, key), value, f"{what} step {step} {key}")
    if theirs.affine:
        close(ours.scale.grad, theirs.weight.grad, f"{what} dweight")
        close(ours.bias.grad, theirs.bias.grad, f"{what} dbias")


@pytest.mark.parametrize("options", CONFIGS)
def test_every_pytorch_configuration_converts_and_computes_as_pytorch(options):
    """``convert_batchnorm`` of each class and ``BatchNorm1d.from_torch`` accept every
    configuration PyTorch's batch norms take (momentum 0 and 1, the cumulative average,
    no affine parameters, untracked statistics) and compute what PyTorch computes."""
    for cls, shape in ((nn.BatchNorm1d, (6, 3)), (nn.BatchNorm1d, (4, 3, 5)), (nn.BatchNorm2d, (4, 3, 2, 3)),
                       (nn.BatchNorm3d, (2, 3, 2, 2, 3)), (nn.SyncBatchNorm, (4, 3, 5))):  # fmt: skip
        torch.manual_seed(0)
        theirs = cls(3, eps=1e-3, **options)
        ours = convert_batchnorm(copy.deepcopy(theirs))
        assert type(ours) is ChannelFirstBatchNorm and ours.torch_class is cls
        side_by_side(theirs, ours, shape, f"convert {cls.__name__} {shape}")
    for shape, axis in (((6, 3), 0), ((4, 3, 5), (0, 2))):
        theirs = nn.BatchNorm1d(3, eps=1e-3, **options)
        ours = BatchNorm1d.from_torch(copy.deepcopy(theirs), axis=axis)
        side_by_side(theirs, ours, shape, f"from_torch {shape}")


def test_the_names_import_from_the_torch_backend_in_a_fresh_interpreter():
    """``bn1d.backends.torch`` imports ``torch_models`` at its end (which builds on its
    ``BatchNorm1d``): either module imported first, the names resolve, without a
    circular import."""
    import subprocess
    import sys

    for first in ("bn1d.backends.torch", "bn1d.backends.torch_models", "bn1d.backends.torch_func"):
        code = (
            f"import {first}\n"
            "from bn1d.backends.torch import convert_batchnorm, revert_batchnorm, sync_running_statistics, "
            "ChannelFirstBatchNorm\n"
            "from bn1d.backends import torch_models\n"
            "assert convert_batchnorm is torch_models.convert_batchnorm and revert_batchnorm is "
            "torch_models.revert_batchnorm\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (first, result.stderr[-2000:])


def test_sync_running_statistics_checks_its_arguments_first():
    """Its collectives need ``torch.distributed`` (``test_torch_ddp.py`` runs them); the
    arguments are checked before, here without a process group."""
    model = convert_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))
    for kwargs, exception, pattern in (
        (dict(model={}), TypeError, r"^model: expected a torch\.nn\.Module, got 'dict'$"),
        (dict(timeout="1"), TypeError, r"^timeout: expected None or a number of seconds, got 'str'$"),
        (dict(timeout=0), ValueError, r"^timeout: expected None or a finite number of seconds > 0, got 0$"),
        (dict(how="median"), ValueError, r"^how: expected 'mean' or 'broadcast', got 'median'$"),
        ({}, RuntimeError, r"^process_group: expected an initialised torch\.distributed, got None$"),
    ):  # fmt: skip
        with pytest.raises(exception, match=pattern):
            sync_running_statistics(**{"model": model, **kwargs})


@pytest.mark.parametrize(
    "timeout", [0, -1.0, float("nan"), float("inf"), "1", True, None, 1, 2.5, np.float32(1.5), np.int64(3)],
    ids=repr,
)  # fmt: skip
def test_the_layer_and_sync_running_statistics_check_timeout_alike(timeout):
    """One check (``bn1d.backends.torch.check_timeout``) for both: the same values are
    accepted (NumPy scalars included) and the same errors raised for the others."""
    from bn1d.backends.torch import check_timeout

    model = convert_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))
    outcomes = []
    for attempt in (
        lambda: BatchNorm1d(3, axis_name="i", timeout=timeout),
        lambda: sync_running_statistics(model, timeout=timeout),
        lambda: check_timeout(timeout),
    ):
        try:
            attempt()
            outcomes.append(None)
        except (TypeError, ValueError) as error:
            outcomes.append((type(error), str(error)))
        except RuntimeError as error:  # accepted: sync_running_statistics then needs torch.distributed
            assert "an initialised torch.distributed" in str(error)
            outcomes.append(None)
    assert outcomes[0] == outcomes[1] == outcomes[2], outcomes


def test_sync_running_statistics_checks_process_group_first():
    """R7.1: a ``process_group`` that is not a ``ProcessGroup`` is a ``TypeError`` naming
    it, before anything else (torch.distributed need not be initialised)."""
    model = convert_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))
    for group in ("x", 0, object()):
        with pytest.raises(
            TypeError, match=r"^process_group: expected None or a torch\.distributed\.ProcessGroup, got"
        ):
            sync_running_statistics(model, process_group=group)
    with pytest.raises(TypeError, match=r"^process_group: expected None or a torch\.distributed\.ProcessGroup"):
        sync_running_statistics(model, how="median", process_group="x")  # before the other arguments


def test_a_converted_layer_checks_the_input_type_first():
    """R7.1: a NumPy array is a ``TypeError`` naming ``x`` and its type, whatever its rank."""
    layer = convert_batchnorm(nn.BatchNorm2d(3))
    for x in (np.ones((2, 3, 4, 5), np.float32), np.ones((2, 3), np.float32), np.ones((2, 3, 4, 5), np.int8)):
        with pytest.raises(TypeError, match=r"^x: expected a torch\.Tensor, got 'ndarray'$"):
            layer(x)
    assert int(layer.num_batches_tracked) == 0


def bad_entries():
    good = {"weight": torch.full((3,), 2.0), "bias": torch.ones(3), "running_mean": torch.ones(3),
            "running_var": torch.ones(3), "num_batches_tracked": torch.tensor(5)}  # fmt: skip
    renamed = {("scale" if key == "weight" else key): value for key, value in good.items()}  # bn1d's names
    return [
        ({**good, "running_var": -torch.ones(3)}, ValueError, r"^state_dict\['running_var'\]: expected non-negative"),
        ({**good, "running_mean": torch.ones(4)}, ValueError, r"^state_dict\['running_mean'\]: expected shape \(3,\)"),
        ({**good, "running_mean": "abc"}, TypeError, r"^state_dict\['running_mean'\]: expected a real array"),
        ({**good, "num_batches_tracked": torch.tensor(-1)}, ValueError, r"^state_dict\['num_batches_tracked'\]"),
        ({**good, "weight": torch.ones(2)}, ValueError, r"^state_dict\['weight'\]: expected shape \(3,\), got"),
        ({**renamed, "scale": torch.ones(2)}, ValueError, r"^state_dict\['scale'\]: expected shape \(3,\)"),
    ]


@pytest.mark.parametrize("strict", [True, False])
def test_a_converted_layer_rejects_a_bad_value_alike_strict_or_not(strict):
    """PyTorch's ``strict=False`` relaxes only the missing and unexpected keys; a bad value
    is still an error. On the layer itself it is the same ``ValueError``/``TypeError``
    (R7.1) whether strict or not, and nothing is loaded (R6.3)."""
    for entries, exception, pattern in bad_entries():
        layer = convert_batchnorm(nn.BatchNorm1d(3))
        before = {key: value.clone() for key, value in layer.state_dict().items()}
        with pytest.raises(exception, match=pattern):
            layer.load_state_dict(entries, strict=strict)
        for key, value in layer.state_dict().items():
            assert torch.equal(value, before[key]), (key, strict)
    layer = convert_batchnorm(nn.BatchNorm1d(3))
    with pytest.raises(TypeError, match=r"^state_dict: expected a mapping, got 'list'$"):
        layer.load_state_dict([], strict=strict)
    if not strict:  # a partial load: the entry present is checked all the same
        with pytest.raises(ValueError, match=r"^state_dict\['weight'\]: expected shape \(3,\)"):
            layer.load_state_dict({"weight": torch.ones(2)}, strict=False)


def test_a_converted_layer_loads_with_strict_false_as_a_pytorch_module():
    """``strict=False`` on the layer: the entries present load, the others are returned."""
    layer = convert_batchnorm(nn.BatchNorm1d(3))
    result = layer.load_state_dict({"weight": torch.full((3,), 2.0), "oops": torch.ones(1)}, strict=False)
    reference = nn.BatchNorm1d(3).load_state_dict(
        {"weight": torch.full((3,), 2.0), "oops": torch.ones(1)}, strict=False
    )
    assert result.unexpected_keys == reference.unexpected_keys == ["oops"]
    assert sorted(result.missing_keys) == sorted(reference.missing_keys) == ["bias", "running_mean", "running_var"]
    close(layer.scale, torch.full((3,), 2.0), "the present entry loads", 0)


def test_a_parents_error_names_the_full_key_of_the_entry():
    """A parent's error message names the layer's entry by its full key, so the user can
    tell which layer failed."""
    model = nn.Sequential(nn.Linear(3, 3), convert_batchnorm(nn.BatchNorm1d(3)), convert_batchnorm(nn.BatchNorm1d(3)),
                          BatchNorm1d(3, axis=0))  # fmt: skip
    for key in ("2.running_var", "3.running_var"):
        state = {**model.state_dict(), key: -torch.ones(3)}
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=rf"state_dict\['{key}'\]: expected non-negative values"):
                model.load_state_dict(state, strict=strict)
    state = {**model.state_dict(), "1.weight": torch.ones(5)}
    state.pop("1.scale")
    with pytest.raises(RuntimeError, match=r"state_dict\['1\.weight'\]: expected shape \(3,\)"):
        model.load_state_dict(state)


# -- ChannelFirstBatchNorm.from_torch ---------------------------------------------------------------


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm1d, (4, 3, 5)), (nn.BatchNorm1d, (6, 3)),
                                        (nn.BatchNorm2d, (4, 3, 2, 3)), (nn.BatchNorm3d, (2, 3, 2, 2, 3))])  # fmt: skip
def test_channel_first_from_torch_computes_as_the_module(cls, shape):
    """``ChannelFirstBatchNorm.from_torch`` goes through the conversion: the module's
    configuration, ranks and state (copied: the module is left alone), PyTorch's numbers."""
    torch.manual_seed(0)
    theirs = cls(3, eps=1e-3, momentum=0.2)
    theirs(torch.randn(shape) * 2 + 1)
    ours = ChannelFirstBatchNorm.from_torch(theirs)
    assert type(ours) is ChannelFirstBatchNorm and ours.torch_class is cls
    assert (ours.config.epsilon, ours.config.momentum, ours.config.reduce_axes) == (1e-3, 0.8, (0, 2))
    assert ours.scale is not theirs.weight and ours.running_mean is not theirs.running_mean
    assert int(ours.num_batches_tracked) == 1
    side_by_side(theirs, ours, shape, f"ChannelFirstBatchNorm.from_torch {cls.__name__}")
    cumulative = ChannelFirstBatchNorm.from_torch(nn.BatchNorm1d(3, momentum=None).eval(), fast_variance=True)
    assert cumulative.config.momentum is None and cumulative.config.fast_variance and not cumulative.training
    with pytest.raises(TypeError, match=r"^module: expected a torch\.nn\.BatchNorm1d, BatchNorm2d, BatchNorm3d"):
        ChannelFirstBatchNorm.from_torch(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"^axis: expected \(0, 2\)"):
        ChannelFirstBatchNorm.from_torch(theirs, axis=0)


# -- frozen statistics: track_running_stats=False set on a module that keeps its buffers ----------------


def frozen(cls, momentum=0.1, affine=True, shape=(4, 3, 5)):
    """A PyTorch batch norm with running statistics, then ``track_running_stats = False``
    (a common trick: batch statistics in training, no update, the frozen statistics in
    evaluation)."""
    torch.manual_seed(1)
    module = cls(3, eps=1e-3, momentum=momentum, affine=affine)
    module(torch.randn(shape) * 2 + 5)
    module.track_running_stats = False
    return module


FROZEN = [(nn.BatchNorm1d, (6, 3)), (nn.BatchNorm1d, (4, 3, 5)), (nn.BatchNorm2d, (4, 3, 2, 3)),
          (nn.BatchNorm3d, (2, 3, 2, 2, 3)), (nn.SyncBatchNorm, (4, 3, 5))]  # fmt: skip


@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
@pytest.mark.parametrize("affine", [True, False])
def test_frozen_statistics_convert_compute_as_pytorch_and_revert(momentum, affine):
    """Training uses the batch statistics and changes no buffer (the count neither, as
    PyTorch), evaluation the frozen statistics; ``state_dict()`` loads back into the layer
    and into a parent; revert gives back the module's class, momentum, the flag and the
    buffers."""
    for cls, shape in FROZEN:
        theirs = frozen(cls, momentum, affine, shape)
        ours = convert_batchnorm(copy.deepcopy(theirs))
        what = f"frozen {cls.__name__} {shape}"
        assert ours.frozen_statistics and ours.config.track_running_stats and ours.config.momentum == 1.0, what
        assert [k.replace("scale", "weight") for k in ours.state_dict()] == list(theirs.state_dict()), what
        side_by_side(theirs, ours, shape, what)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(ours, key), getattr(frozen(cls, momentum, affine, shape), key)), (what, key)
        state = ours.state_dict()
        assert ours.load_state_dict(state).missing_keys == []
        parent = nn.Sequential(ours)
        assert parent.load_state_dict(parent.state_dict()).missing_keys == []
        assert convert_batchnorm(copy.deepcopy(frozen(cls, momentum, affine, shape))).load_state_dict(
            theirs.state_dict()).missing_keys == []  # fmt: skip
        back = revert_batchnorm(ours)
        assert type(back) is cls and not back.track_running_stats and back.momentum == momentum, what
        assert back.running_mean is ours.running_mean and back.num_batches_tracked is ours.num_batches_tracked
        x = torch.randn(shape)
        close(back.eval()(x), theirs.eval()(x), f"{what} reverted evaluation")
        if cls is nn.BatchNorm1d:  # to_torch too (a synced layer has no to_torch)
            module = ChannelFirstBatchNorm.from_torch(theirs).to_torch()
            assert not module.track_running_stats and module.momentum == momentum, what
            assert torch.equal(module.running_var, theirs.running_var), what


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN batch statistics
@pytest.mark.parametrize("native_kernel", [True, False])
def test_frozen_statistics_stay_bitwise_on_a_non_finite_batch(native_kernel):
    """A batch with inf (its statistics NaN, as ``0 * inf``) normalises to NaN as in
    PyTorch, and the frozen statistics stay bit for bit (momentum 1.0 alone would write
    ``1.0 * running + 0.0 * nan = nan``); masked calls (the core) too; a -0.0 stays -0.0."""
    theirs = frozen(nn.BatchNorm2d, shape=(4, 3, 2, 3))
    with torch.no_grad():
        theirs.running_mean[0] = -0.0
    ours = convert_batchnorm(copy.deepcopy(theirs), native_kernel=native_kernel)
    before = {key: value.clone() for key, value in ours.state_dict().items()}
    x = torch.randn(4, 3, 2, 3)
    x[0, 1, 0, 0] = float("inf")
    y_theirs, y_ours = theirs(x), ours(x)
    assert torch.isnan(y_ours[:, 1]).all() and torch.isnan(y_theirs[:, 1]).all()
    close(y_ours, y_theirs, "finite features")
    ours(x, mask=torch.ones(4, 2, 3, dtype=torch.bool))
    ours(x.double())  # the core: another dtype
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]) and value.dtype == before[key].dtype, key
    assert str(ours.running_mean[0].item()) == "-0.0"
    theirs.eval()
    ours.eval()
    x = torch.randn(4, 3, 2, 3)
    close(ours(x), theirs(x), "evaluation on the frozen statistics")


def test_frozen_statistics_option_is_checked():
    layer = ChannelFirstBatchNorm(3, momentum=1.0, frozen_statistics=True)
    assert layer.frozen_statistics and "frozen_statistics=True" in repr(layer)
    assert not ChannelFirstBatchNorm(3).frozen_statistics
    for kwargs, exception, pattern in (
        (dict(momentum=1.0, frozen_statistics=1), TypeError, r"^frozen_statistics: expected a bool, got 1$"),
        (dict(momentum=0.9, frozen_statistics=True), ValueError, r"^momentum: expected 1\.0 with frozen_statistics"),
        (dict(momentum=1.0, frozen_statistics=True, track_running_stats=False), ValueError,
         r"^track_running_stats: expected True with frozen_statistics"),
    ):  # fmt: skip
        with pytest.raises(exception, match=pattern):
            ChannelFirstBatchNorm(3, **kwargs)


def test_a_module_flagged_tracked_without_buffers_converts_as_untracked():
    """``track_running_stats = True`` set on a module built without buffers: PyTorch uses
    batch statistics in training and evaluation; so does the conversion (tracked means
    ``running_mean is not None``)."""
    theirs = nn.BatchNorm2d(3, track_running_stats=False)
    theirs.track_running_stats = True
    ours = convert_batchnorm(copy.deepcopy(theirs))
    assert not ours.config.track_running_stats and ours.running_mean is None
    side_by_side(theirs, ours, (4, 3, 2, 3), "tracked flag, no buffers")
    back = revert_batchnorm(ours)
    assert back.track_running_stats and back.running_mean is None


# -- momentum: convert and revert give back every float ------------------------------------------------

MOMENTA = [1 / 3, 0.1, 0.01, 0.3, 0.7, 0.0, 1.0, 0.5, 0.9, 0.99, 0.123456789, 2 / 3, 1e-20, 5e-324]
RANDOM_MOMENTA = [float(v) for v in np.random.default_rng(0).uniform(0, 1, 200)] + [
    float(v) for v in 10.0 ** np.random.default_rng(1).uniform(-12, 0, 100)
]


def test_convert_then_revert_gives_back_every_momentum():
    """PyTorch's momentum ``p`` is bn1d's ``1 - p``; convert then revert returns ``p``
    itself, every float in [0, 1], and revert then convert bn1d's momentum itself."""
    for p in MOMENTA + RANDOM_MOMENTA:
        layer = convert_batchnorm(nn.BatchNorm2d(3, momentum=p))
        assert abs(layer.config.momentum - (1 - p)) <= 2**-53, p
        assert revert_batchnorm(layer).momentum == p, p
        frozen_module = nn.BatchNorm2d(3, momentum=p)
        frozen_module.track_running_stats = False
        assert revert_batchnorm(convert_batchnorm(frozen_module)).momentum == p, p
    for m in MOMENTA + RANDOM_MOMENTA:
        reverted = revert_batchnorm(BatchNorm1d(3, axis=(0, 2), momentum=m))
        assert abs(reverted.momentum - (1 - m)) <= 2**-53, m
        assert convert_batchnorm(reverted).config.momentum == m, m
    assert convert_batchnorm(nn.BatchNorm1d(3, momentum=0.01)).config.momentum == 0.99
    assert revert_batchnorm(BatchNorm1d(3, axis=0, momentum=0.99)).momentum == 0.01
