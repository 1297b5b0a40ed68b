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
    with pytest.raises(RuntimeError, match=r"state_dict\['running_var'\]: expected non-negative values"):
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
