"""``bn1d.backends.torch_func.functional_call``: the running statistics come back functionally.

Against the stateful layers: the functional call runs the core, the stateful call
PyTorch's kernels, on the same float32 data; they differ only in rounding (measured
within 3.6e-7 on O(1) outputs and statistics); 2e-6 is ~16 float32 ulps at 1, far
below what a wrong count, momentum or Bessel factor changes (> 1e-3).
"""

from __future__ import annotations

import copy

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
    assert all("_route" not in m.__dict__ and "_update_state" not in m.__dict__ for m in model.modules())
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
