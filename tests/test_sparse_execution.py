"""Sparse execution of Linear layers computes what the masked-dense path computes."""

import copy

import pytest
import torch
from torch import nn

import sparseopt as so
from sparseopt.execution.training import ExecutionPolicy

from helpers import batch, mlp

EVERY_LAYER = ExecutionPolicy(max_density=1.0, min_numel=0, min_batch=0)


def twins(widths=(32, 64, 64, 10), density=0.2, topology=None, preconditioner=None, seed=0):
    """The same model trained masked-dense and with sparse execution, from identical weights and masks."""
    runs = []
    for execution in (False, EVERY_LAYER):
        model = mlp(widths, seed=seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        sparse = so.SparseTraining(model, opt, density=density, topology=copy.deepcopy(topology),
                                   preconditioner=copy.deepcopy(preconditioner), prune_first_layer=True,
                                   sparse_execution=execution)
        runs.append((model, opt, sparse))
    return runs


def test_forward_and_gradients_match_the_masked_dense_layer():
    (dense, _, ds), (fast, _, fs) = twins()
    assert all(r.execution == "sparse" for r in fs.report().layers)
    x = torch.randn(7, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    yd, yf = dense(x), fast(x2)
    torch.testing.assert_close(yf, yd, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(yd)
    yd.backward(g)
    yf.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    for p in ds.params:
        q = dict(fast.named_parameters())[p.name]
        mask = ds.masks[p.name]
        torch.testing.assert_close(q.grad[mask], p.param.grad[mask], rtol=1e-5, atol=1e-6)
        assert not q.grad[~mask].any()          # the SDDMM gradient lives on the active entries only


def test_leading_dimensions_and_bias():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(16, 300), nn.Linear(300, 8))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    so.SparseTraining(lin, opt, density=0.1, include=["0.weight"], sparse_execution=EVERY_LAYER)
    x = torch.randn(2, 3, 16)
    y = lin[0](x)
    expected = x @ lin[0].weight.detach().t() + lin[0].bias
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    (db,) = torch.autograd.grad(expected, [lin[0].bias], g)
    (db_sparse,) = torch.autograd.grad(y, [lin[0].bias], g)
    torch.testing.assert_close(db_sparse, db, rtol=1e-5, atol=1e-6)


def test_dense_gradient_only_on_rigl_update_steps():
    _, (model, opt, sparse) = twins(topology=so.RigL(update_every=3, end_step=100))
    weight = sparse.params[0].param
    for step in range(4):
        x, y = batch(model, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        inactive = ~sparse.masks[sparse.params[0].name]
        assert not weight.grad[inactive].any()  # .grad is masked as backward accumulates it
        dense = sparse._gradients.dense.get(sparse.params[0].name)  # the copy RigL grows from
        assert (dense is not None and bool(dense[inactive].any())) == (step % 3 == 0), step
        opt.step()


def test_rigl_sparseopt_trajectory_equals_the_masked_dense_one():
    topology = so.RigL(update_every=20, drop_fraction=0.3, end_step=150)
    (dense, dopt, ds), (fast, fopt, fs) = twins(topology=topology, preconditioner=so.SparseOpt())
    assert [r.execution for r in fs.report().layers] == ["sparse"] * 3
    for step in range(200):
        for model, opt in ((dense, dopt), (fast, fopt)):
            x, y = batch(model, step, n=32)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert fs.changed == ds.changed and any(ds.changed.values())
    for name in ds.masks:
        assert torch.equal(fs.masks[name], ds.masks[name]), name
    for (name, p), q in zip(dense.named_parameters(), fast.parameters()):
        assert (q - p).norm() <= 1e-5 * p.norm(), name


def test_resume_rebuilds_the_sparse_structure():
    topology = so.RigL(update_every=2, end_step=100)
    (dense, dopt, ds), (fast, fopt, fs) = twins(topology=topology)
    for step in range(3):
        for model, opt in ((dense, dopt), (fast, fopt)):
            x, y = batch(model, step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    fresh = mlp((32, 64, 64, 10), seed=5)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    resumed = so.SparseTraining(fresh, fresh_opt, density=0.2, topology=topology, prune_first_layer=True,
                                sparse_execution=EVERY_LAYER)
    fresh.load_state_dict(dense.state_dict())
    resumed.load_state_dict(ds.state_dict())
    x = torch.randn(4, 32)
    dense.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), dense(x), rtol=1e-5, atol=1e-6)


def test_layers_below_break_even_stay_dense_with_a_warning_and_remove_restores_forward():
    model = mlp((32, 64, 64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"masked-dense path: 3.weight \(4096 weights < 1048576"):
        sparse = so.SparseTraining(model, opt, density={"3.weight": 0.1, "6.weight": 0.5},
                                   sparse_execution=ExecutionPolicy(max_density=0.3))
    report = sparse.report()
    assert [r.execution for r in report.layers] == ["masked", "masked"]
    sparse.remove()  # one SparseTraining per weight at a time
    with pytest.warns(UserWarning, match=r"6.weight \(density 0.500 > break-even 0.3\)"):
        sparse = so.SparseTraining(model, opt, density={"3.weight": 0.1, "6.weight": 0.5},
                                   sparse_execution=ExecutionPolicy(max_density=0.3, min_numel=0))
    assert [r.execution for r in sparse.report().layers] == ["sparse", "masked"]
    assert "1 sparse" in str(sparse.report())
    assert "forward" in vars(model[3])
    sparse.remove()
    assert "forward" not in vars(model[3])


def test_small_batches_run_the_masked_dense_product():
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    so.SparseTraining(model, opt, density=0.1, include=["*"],
                      sparse_execution=ExecutionPolicy(max_density=1.0, min_numel=0, min_batch=8))
    for rows, sparse in ((7, False), (8, True)):
        x = torch.randn(rows, 64)
        y = model(x)
        assert ("SparseLinear" in type(y.grad_fn).__name__) == sparse, rows
        torch.testing.assert_close(y, x @ model[0].weight.detach().t(), rtol=1e-5, atol=1e-6)


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="max_density must be in"):
        ExecutionPolicy(max_density=0.0)
