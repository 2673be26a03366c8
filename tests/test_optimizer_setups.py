"""Optimizers as real stacks hand them over: wrapped by accelerate, two on one model, frozen or unused layers."""

import pytest
import torch
from torch import nn

import sparseopt as so
from helpers import batch, mlp, train_step


class TwoBranches(nn.Module):
    """``branch`` is used only when asked: an unused branch has no gradient at a mask update."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(10, 16)
        self.trunk = nn.Linear(16, 16)
        self.branch = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.use_branch = True

    def forward(self, x):
        h = torch.relu(self.trunk(torch.relu(self.stem(x))))
        if self.use_branch:
            h = h + torch.relu(self.branch(h))
        return self.head(h)


def step(model, opt, i):
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(i))
    y = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(i))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_unused_layer_at_an_update_is_skipped_with_a_warning_naming_it():
    model = TwoBranches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = so.SparseTraining(model, opt, 0.3, topology=so.RigL(update_every=2, drop_fraction=0.5, end_step=20))
    step(model, opt, 0)          # step 0 is an update with every layer used
    model.use_branch = False
    before = {n: m.clone() for n, m in sparse.masks.items()}
    step(model, opt, 1)
    with pytest.warns(UserWarning, match=r"\['branch.weight'\] have no gradient"):
        step(model, opt, 2)      # an update step without the branch
    assert torch.equal(sparse.masks["branch.weight"], before["branch.weight"])
    assert not torch.equal(sparse.masks["trunk.weight"], before["trunk.weight"])


def test_frozen_layer_error_names_exclude():
    model = TwoBranches()
    model.branch.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match=r"exclude=\['branch.weight'\]"):
        so.SparseTraining(model, opt, 0.3)
    so.SparseTraining(model, opt, 0.3, exclude=["branch.weight"])  # the fix works


def test_two_optimizers_on_one_model_one_sparse_training_each():
    model = TwoBranches()
    body = [*model.stem.parameters(), *model.trunk.parameters(), *model.branch.parameters()]
    opt_body = torch.optim.SGD(body, lr=0.1, momentum=0.9)
    opt_head = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    sparse_body = so.SparseTraining(model, opt_body, 0.3, exclude=["head.weight"],
                                    topology=so.RigL(update_every=2, drop_fraction=0.5, end_step=20),
                                    preconditioner=so.SparseOpt())
    sparse_head = so.SparseTraining(model, opt_head, 0.5, include=["head.weight"],
                                    topology=so.SET(update_every=3, drop_fraction=0.5, end_step=20))
    assert [p.name for p in sparse_body.params] == ["trunk.weight", "branch.weight"]
    start = {n: m.clone() for s in (sparse_body, sparse_head) for n, m in s.masks.items()}
    for i in range(7):
        x = torch.randn(8, 10, generator=torch.Generator().manual_seed(i))
        loss = nn.functional.cross_entropy(model(x), torch.arange(8) % 4)
        opt_body.zero_grad()
        opt_head.zero_grad()
        loss.backward()
        opt_body.step()
        opt_head.step()
    for sparse in (sparse_body, sparse_head):
        assert sparse.step_count == 7
        for p in sparse.params:
            assert torch.all(p.param[~sparse.masks[p.name]] == 0)
            assert not torch.equal(sparse.masks[p.name], start[p.name])


def test_accelerate_optimizer_is_unwrapped():
    accelerate = pytest.importorskip("accelerate")
    net = mlp()
    model, opt = accelerate.Accelerator(cpu=True).prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    sparse = so.SparseTraining(model, opt, 0.3, topology=so.SET(update_every=2, end_step=10))
    assert sparse.optimizer is opt.optimizer
    for i in range(3):
        train_step(model, opt, i)
    assert sparse.step_count == 3
    assert torch.all(net[3].weight[~sparse.masks["3.weight"]] == 0)


def test_lightning_optimizer_is_unwrapped():
    optimizer_module = pytest.importorskip("lightning.pytorch.core.optimizer")
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sparse = so.SparseTraining(net, optimizer_module.LightningOptimizer(opt), 0.3)
    assert sparse.optimizer is opt


def test_something_that_is_no_optimizer_is_rejected_by_name():
    class Wrapper:
        def __init__(self, optimizer=None):
            self.optimizer = optimizer

    net = mlp()
    with pytest.raises(TypeError, match="got Wrapper; pass the optimizer itself"):
        so.SparseTraining(net, Wrapper(net.parameters()), 0.3)
    with pytest.raises(TypeError, match="got Wrapper; pass the optimizer itself"):
        so.SparseTraining(net, Wrapper(), 0.3)


def test_hessian_style_autograd_grad_still_sees_dense_gradients():
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sparse = so.SparseTraining(net, opt, 0.3)
    x, y = batch(net, 0)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), net[3].weight)
    assert torch.any(grad[~sparse.masks["3.weight"]] != 0)
    sparse.remove()  # after remove(), backward leaves .grad dense again
    nn.functional.cross_entropy(net(x), y).backward()
    assert torch.any(net[3].weight.grad[~sparse.masks["3.weight"]] != 0)


def test_a_weight_frozen_at_construction_is_masked_and_hooked_once_unfrozen():
    model = TwoBranches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.branch.weight.requires_grad_(False)
    sparse = so.SparseTraining(model, opt, 0.3)
    step(model, opt, 0)
    model.branch.weight.requires_grad_(True)    # unfrozen: this step's gradient is masked at step()
    step(model, opt, 1)
    mask = sparse.masks["branch.weight"]
    assert torch.all(model.branch.weight[~mask] == 0)
    opt.zero_grad()
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(2))
    model(x).sum().backward()                   # from the next step on, backward masks it as it accumulates
    assert torch.all(model.branch.weight.grad[~mask] == 0)


def test_a_weight_cannot_be_sparsified_twice_at_once():
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    first = so.SparseTraining(net, opt, 0.3)
    with pytest.raises(ValueError, match=r"\['3.weight'\] are already sparsified by another SparseTraining"):
        so.SparseTraining(net, opt, 0.3)
    first.remove()
    so.SparseTraining(net, opt, 0.3)  # after remove() the weight is free again
    del first
    fresh = mlp(widths=(12, 16, 16, 10))
    so.SparseTraining(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), 0.3, preconditioner=so.SparseOpt())
    # the first one, discarded with its optimizer, no longer counts, nor masks gradients
    sparse = so.SparseTraining(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), 0.3, seed=1,
                               preconditioner=so.SparseOpt())
    x, y = batch(fresh, 0)
    loss = nn.functional.cross_entropy(fresh(x), y)
    (dense,) = torch.autograd.grad(loss, fresh[3].weight, retain_graph=True)
    loss.backward()
    expected = dense * sparse.masks["3.weight"] * sparse.factors()["3.weight"].float()
    torch.testing.assert_close(fresh[3].weight.grad, expected)
