"""``bn1d.backends.torch_func.functional_call``: the running statistics come back functionally.

Against the stateful layers: the functional call runs the core, the stateful call
PyTorch's kernels, on the same float32 data; they differ only in rounding (measured
within 3.6e-7 on O(1) outputs and statistics); 2e-6 is ~16 float32 ulps at 1, far
below what a wrong count, momentum or Bessel factor changes (> 1e-3).
"""

from __future__ import annotations

import copy
import functools

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bn1d.backends.torch import BatchNorm1d, convert_batchnorm  # noqa: E402
from bn1d.backends.torch_func import functional_call  # noqa: E402

TOL = 2e-6


def make(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return convert_batchnorm(
        nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3, momentum=None), nn.ReLU(), nn.Flatten(),
            nn.Linear(15, 4), nn.BatchNorm1d(4),
        )
    )  # fmt: skip


def variables(model: nn.Module) -> tuple[dict, dict]:
    return ({k: v.detach().clone() for k, v in model.named_parameters()},
            {k: v.clone() for k, v in model.named_buffers()})  # fmt: skip


def test_a_training_call_returns_what_the_stateful_call_stores_and_changes_nothing():
    model = make(0)
    stateful = copy.deepcopy(model)
    params, buffers = variables(model)
    given = {k: v.clone() for k, v in buffers.items()}
    x = torch.randn(6, 2, 5) * 2 + 1
    y, new_buffers = functional_call(model, {**params, **buffers}, (x,))
    torch.testing.assert_close(y, stateful(x), rtol=TOL, atol=TOL)
    assert new_buffers.keys() == dict(model.named_buffers()).keys()
    for key, value in stateful.named_buffers():
        torch.testing.assert_close(new_buffers[key], value, rtol=TOL, atol=TOL, msg=key)
    assert int(new_buffers["1.num_batches_tracked"]) == int(new_buffers["5.num_batches_tracked"]) == 1
    for key, value in buffers.items():  # neither the given tensors nor the module's changed
        assert torch.equal(value, given[key]) and torch.equal(dict(model.named_buffers())[key], given[key]), key
    model.eval()
    y, unchanged = functional_call(model, {**params, **new_buffers}, (x,))
    torch.testing.assert_close(y, stateful.eval()(x), rtol=TOL, atol=TOL)
    assert all(unchanged[k] is v for k, v in new_buffers.items()), "inference returns the buffers as given"


def test_a_mask_reaches_the_layer():
    layer = BatchNorm1d(3, momentum=0.5)
    stateful = copy.deepcopy(layer)
    x, mask = torch.randn(4, 5, 3) + 2, torch.rand(4, 5) < 0.6
    params, buffers = variables(layer)
    y, new_buffers = functional_call(layer, {**params, **buffers}, (x,), {"mask": mask})
    torch.testing.assert_close(y, stateful(x, mask), rtol=TOL, atol=TOL)
    torch.testing.assert_close(new_buffers["running_var"], stateful.running_var, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("shared_input", [True, False], ids=["one batch", "a batch per member"])
def test_vmap_over_a_stacked_ensemble_equals_each_model(shared_input):
    models = [make(seed) for seed in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(6, 2, 5) * 2 + 1 if shared_input else torch.randn(3, 6, 2, 5) * 2 + 1

    def member(p, b, x):
        return functional_call(base, {**p, **b}, (x,))

    for step in range(2):  # the returned buffers feed the next step
        y, buffers = torch.func.vmap(member, in_dims=(0, 0, None if shared_input else 0))(params, buffers, x)
        for i, model in enumerate(models):
            torch.testing.assert_close(y[i], model(x if shared_input else x[i]), rtol=TOL, atol=TOL)
            for key, value in model.named_buffers():
                torch.testing.assert_close(buffers[key][i], value, rtol=TOL, atol=TOL, msg=f"{step} {i} {key}")
    assert buffers["1.num_batches_tracked"].tolist() == [2, 2, 2]


def test_pytorchs_functional_call_under_vmap_updates_the_stacked_buffers_as_pytorchs_layers():
    """PyTorch's own ``torch.func.functional_call`` (not bn1d's) under ``vmap`` over an
    ensemble from ``stack_module_state``: each layer writes its running statistics into the
    stacked (batched) buffers in place, as ``nn.BatchNorm1d``'s do. (bn1d's eager writes go
    through ``.data``, which ``vmap`` refuses on its wrappers: they write plainly there.)"""
    x = torch.randn(3, 6, 2, 5) * 2 + 1
    stacked = []
    for convert in (False, True):
        torch.manual_seed(0)
        models = [nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3)) for _ in range(3)]
        models = [convert_batchnorm(m) for m in models] if convert else models
        params, buffers = torch.func.stack_module_state(models)
        member = functools.partial(torch.func.functional_call, copy.deepcopy(models[0]).to("meta"))
        y = torch.func.vmap(lambda p, b, x, member=member: member((p, b), (x,)))(params, buffers, x)
        stacked.append((y, buffers))
    (y_stock, stock), (y_bn1d, bn1d) = stacked
    torch.testing.assert_close(y_bn1d, y_stock, rtol=TOL, atol=TOL)
    for key in ("1.running_mean", "1.running_var"):
        assert not torch.equal(stock[key], torch.zeros_like(stock[key]) + (key == "1.running_var")), key
        torch.testing.assert_close(bn1d[key], stock[key], rtol=TOL, atol=TOL, msg=key)


def test_grad_of_a_functional_training_step():
    model = make(1)
    stateful = copy.deepcopy(model)
    params, buffers = variables(model)
    x, target = torch.randn(6, 2, 5) * 2 + 1, torch.randint(0, 4, (6,))

    def loss(p, b):
        y, new_buffers = functional_call(model, {**p, **b}, (x,))
        return nn.functional.cross_entropy(y, target), new_buffers

    grads, new_buffers = torch.func.grad(loss, has_aux=True)(params, buffers)
    nn.functional.cross_entropy(stateful(x), target).backward()
    for key, value in stateful.named_parameters():
        torch.testing.assert_close(grads[key], value.grad, rtol=TOL, atol=TOL, msg=key)
    for key, value in stateful.named_buffers():
        torch.testing.assert_close(new_buffers[key], value, rtol=TOL, atol=TOL, msg=key)


def test_arguments_are_checked():
    with pytest.raises(TypeError, match=r"^model: expected a torch\.nn\.Module, got 'dict'$"):
        functional_call({}, {}, ())
    with pytest.raises(TypeError, match=r"^parameters_and_buffers: expected a mapping, got 'list'$"):
        functional_call(BatchNorm1d(3), [], ())


def test_returned_statistics_are_detached_so_steps_do_not_chain_their_graphs():
    """R2.3: the running statistics take no gradient. Fed back as the guide says, a
    returned statistic attached to the graph would keep every earlier step's alive."""
    model = make(0)
    params, buffers = variables(model)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    for _ in range(2):
        y, buffers = functional_call(model, {**params, **buffers}, (torch.randn(6, 2, 5),))
        y.square().sum().backward()
        for key, value in buffers.items():
            assert not value.requires_grad and value.grad_fn is None, key


def test_a_layer_called_twice_in_one_call_chains_its_updates_as_the_stateful_layer():
    """A shared layer (or one called in a loop) updates its statistics on each call."""
    layer = BatchNorm1d(3, momentum=0.9)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    stateful = copy.deepcopy(model)
    params, buffers = variables(model)
    x = torch.randn(4, 5, 3) * 2 + 1
    y, new_buffers = functional_call(model, {**params, **buffers}, (x,))
    torch.testing.assert_close(y, stateful(x), rtol=TOL, atol=TOL)
    for key, value in stateful.named_buffers():  # both calls' updates, and a count of 2
        torch.testing.assert_close(new_buffers[key], value, rtol=TOL, atol=TOL, msg=key)
    assert int(new_buffers["0.num_batches_tracked"]) == 2


def test_torch_func_grad_through_a_synced_layer():
    """The exchange's autograd.Function has the setup_context form torch.func needs;
    ranks simulated in this process (4096 identical ranks: the Reduce exchange, and 4:
    the Gather), whose statistics are the local batch's."""
    from torch_backend.exchange_cost import tool

    simulated_ranks = tool.simulated_ranks

    x = torch.randn(4, 5, 3) * 2 + 1
    local = BatchNorm1d(3)
    params, buffers = variables(local)

    def loss(params, x, layer):
        y, new = functional_call(layer, {**params, **buffers}, (x,))
        return y.square().mean() + y[0, 0, 0], new

    want = torch.func.grad(loss, argnums=(0, 1), has_aux=True)(params, x, local)
    for ranks in (4, 4096):
        synced = BatchNorm1d(3, axis_name="batch")
        with simulated_ranks(ranks) as messages:
            (grads, dx), _ = torch.func.grad(loss, argnums=(0, 1), has_aux=True)(params, x, synced)
        assert messages, "the synced layer exchanged"
        torch.testing.assert_close(dx, want[0][1], rtol=TOL, atol=TOL)
        for key in params:  # each rank's share of the parameters' gradient is its own batch's
            torch.testing.assert_close(grads[key], want[0][0][key], rtol=TOL, atol=TOL, msg=key)


def test_frozen_statistics_come_back_unchanged_even_after_an_inf_batch():
    """A converted module with ``track_running_stats=False`` but its buffers (frozen
    statistics): PyTorch writes nothing in training, nor does the functional call."""
    native = nn.BatchNorm1d(3)
    with torch.no_grad():
        native.running_mean.fill_(0.5)
    native.track_running_stats = False
    model = convert_batchnorm(nn.Sequential(native))
    params, buffers = variables(model)
    x = torch.randn(8, 3)
    x[0, 0] = float("inf")
    _, new_buffers = functional_call(model, {**params, **buffers}, (x,))
    for key, value in buffers.items():
        assert torch.equal(new_buffers[key], value), key


@pytest.mark.parametrize("training", [True, False], ids=["batch statistics", "inference"])
def test_torch_func_grad_of_the_parameters_alone_runs_the_core(training):
    """``torch.func.grad`` with respect to the parameters, with a plain input: the wrapped
    parameters take the call off PyTorch's kernels (which read their data pointers, and
    failed), through ``torch.func.functional_call`` on a drop-in; the gradient is
    autograd's on the same layer. Training with the batch's statistics only
    (``track_running_stats=False``: ``torch.func`` refuses the in-place update of captured
    running statistics, PyTorch's layers' as bn1d's; ``bn1d.backends.torch_func`` records
    them instead) and inference."""
    from bn1d.backends import torch_nn

    layer = torch_nn.BatchNorm2d(3, track_running_stats=not training).train(training)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    params = {key: value.detach().clone() for key, value in layer.named_parameters()}

    def loss(params):
        return torch.func.functional_call(layer, params, (x,)).square().mean()

    grads = torch.func.grad(loss)(params)
    layer(x).square().mean().backward()
    for key, value in layer.named_parameters():
        torch.testing.assert_close(grads[key], value.grad, rtol=1e-5, atol=1e-6, msg=key)
