"""Sparse execution of Linear layers computes what the masked-dense path computes."""

import copy

import pytest
import torch
from torch import nn

import sparseopt as so
from sparseopt.execution.training import ExecutionPolicy

from helpers import batch, mlp

EVERY_LAYER = ExecutionPolicy(max_density=1.0, min_numel=0, min_batch=0)


def twins(widths=(32, 64, 64, 10), density=0.2, topology=None, preconditioner=None, seed=0, optimizer=None,
          **kwargs):
    """The same model trained masked-dense and with sparse execution, from identical weights and masks."""
    runs = []
    for execution in (False, EVERY_LAYER):
        model = mlp(widths, seed=seed)
        opt = (optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4)))(
            model.parameters())
        sparse = so.SparseTraining(model, opt, density=density, topology=copy.deepcopy(topology),
                                   preconditioner=copy.deepcopy(preconditioner), prune_first_layer=True,
                                   sparse_execution=execution, **kwargs)
        runs.append((model, opt, sparse))
    return runs


def step(model, opt, t, n=16, clip=None):
    x, y = batch(model, t, n=n)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), clip) if clip is not None else None
    opt.step()
    return norm


def values(sparse, name):
    return sparse.execution.values_of(name)


def assert_same_weights(dense, fast, rel=1e-5):
    fast_state = fast.state_dict()
    for name, p in dense.state_dict().items():
        if not p.is_floating_point():             # BatchNorm's batch counter
            assert torch.equal(fast_state[name], p), name
        elif rel == 0:
            assert torch.equal(fast_state[name], p), name
        else:
            assert (fast_state[name] - p).norm() <= rel * p.norm() + 1e-7, name


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
        mask = ds.masks[p.name]
        # the values' gradient is the masked weight gradient at the active entries, in row-major order
        torch.testing.assert_close(values(fs, p.name).grad, p.param.grad[mask], rtol=1e-5, atol=1e-6)
        assert dict(fast.named_parameters())[p.name].grad is None  # the dense weight does not train


def test_the_optimizer_trains_the_active_values_only():
    _, (model, opt, sparse) = twins()
    step(model, opt, 0)
    held = [p for group in opt.param_groups for p in group["params"]]
    for p in sparse.params:
        v = values(sparse, p.name)
        assert any(q is v for q in held) and not any(q is p.param for q in held)
        assert v.numel() == int(sparse.masks[p.name].sum())
        assert opt.state[v]["momentum_buffer"].shape == v.shape       # O(nnz) optimizer state
        torch.testing.assert_close(p.param[sparse.masks[p.name]], v.detach(), rtol=0, atol=0)  # the mirror
        assert not p.param[~sparse.masks[p.name]].any()
    # checkpoints keep the masked-dense format: dense-shaped state, no values in the model's state dict
    saved = opt.state_dict()
    built = [tuple(q.shape) for n, q in model.named_parameters() if not n.endswith("weight_values")]
    assert [tuple(saved["state"][i]["momentum_buffer"].shape) for i in sorted(saved["state"])] == built
    assert not any(k.endswith("weight_values") for k in model.state_dict())


def test_dense_gradient_only_on_rigl_update_steps():
    _, (model, opt, sparse) = twins(topology=so.RigL(update_every=3, end_step=100))
    name = sparse.params[0].name
    for t in range(4):
        x, y = batch(model, t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert values(sparse, name).grad is not None
        dense = sparse._gradients.dense.get(name)  # the copy RigL grows from
        inactive = ~sparse.masks[name]
        assert (dense is not None and bool(dense[inactive].any())) == (t % 3 == 0), t
        opt.step()


@pytest.mark.parametrize("optimizer, extra", [
    (None, {}),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2), {}),
    # fused steps do not bump the values' version counter: the mirror into the dense weight must not rely on it
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2, fused=True), {}),
    (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
     {"renormalize": "exact"}),
])
def test_rigl_sparseopt_trajectory_equals_the_masked_dense_one(optimizer, extra):
    topology = so.RigL(update_every=20, drop_fraction=0.3, end_step=150)
    (dense, dopt, ds), (fast, fopt, fs) = twins(topology=topology, preconditioner=so.SparseOpt(),
                                                optimizer=optimizer, **extra)
    assert [r.execution for r in fs.report().layers] == ["sparse"] * 3
    for t in range(200):
        for model, opt in ((dense, dopt), (fast, fopt)):
            step(model, opt, t, n=32)
    assert fs.changed == ds.changed and any(ds.changed.values())
    for name in ds.masks:
        assert torch.equal(fs.masks[name], ds.masks[name]), name
    assert_same_weights(dense, fast)


def test_mask_updates_that_do_not_skip_the_step_and_decay_folding_follow_the_masked_dense_path():
    topology = so.RigL(update_every=5, drop_fraction=0.3, end_step=60, skip_step_on_update=False)
    (dense, dopt, ds), (fast, fopt, fs) = twins(topology=topology,
                                                preconditioner=so.SparseOpt(precondition_weight_decay=True))
    for t in range(40):
        for model, opt in ((dense, dopt), (fast, fopt)):
            step(model, opt, t, n=32)
    for name in ds.masks:
        assert torch.equal(fs.masks[name], ds.masks[name]), name
    assert_same_weights(dense, fast)
    assert fs.correction_ratio() == pytest.approx(ds.correction_ratio(), rel=1e-5)


def test_clipping_over_model_parameters_sees_the_values_gradients():
    (dense, dopt, _), (fast, fopt, _) = twins(preconditioner=so.SparseOpt())
    for t in range(5):
        nd, nf = step(dense, dopt, t, clip=0.5), step(fast, fopt, t, clip=0.5)
        assert float(nf) == pytest.approx(float(nd), rel=1e-5)
    assert_same_weights(dense, fast)


@pytest.mark.parametrize("source, target", [(EVERY_LAYER, EVERY_LAYER), (False, EVERY_LAYER),
                                            (EVERY_LAYER, False)])
def test_checkpoints_resume_across_execution_modes(source, target):
    """A run saved at step 7 (between RigL updates) and resumed continues as the uninterrupted one."""
    topology = so.RigL(update_every=5, drop_fraction=0.3, end_step=100)

    def build(execution, seed=0):
        model = mlp((32, 64, 64, 10), seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sparse = so.SparseTraining(model, opt, density=0.2, topology=copy.deepcopy(topology),
                                   preconditioner=so.SparseOpt(), prune_first_layer=True,
                                   sparse_execution=execution, seed=seed)
        return model, opt, sparse

    model, opt, sparse = build(source)
    for t in range(7):
        step(model, opt, t)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sparse.state_dict()))
    for t in range(7, 14):
        step(model, opt, t)
    resumed_model, resumed_opt, resumed_sparse = build(target, seed=3)
    resumed_sparse.load_state_dict(saved[2])     # any order: sparse state first, then optimizer, then model
    resumed_opt.load_state_dict(saved[1])
    resumed_model.load_state_dict(saved[0])
    for t in range(7, 14):
        step(resumed_model, resumed_opt, t)
    for name in sparse.masks:
        assert torch.equal(resumed_sparse.masks[name], sparse.masks[name]), name
    assert_same_weights(model, resumed_model, rel=1e-5 if source != target else 0.0)


def test_a_weight_written_between_steps_is_what_trains_next():
    _, (model, opt, sparse) = twins()
    step(model, opt, 0)
    name = sparse.params[0].name
    with torch.no_grad():
        model[0].weight.mul_(2.0)                    # e.g. a user's rescaling, or load_state_dict
    x = torch.randn(40, 32)
    torch.testing.assert_close(model[0](x), x @ model[0].weight.detach().t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values(sparse, name).detach(), model[0].weight.detach()[sparse.masks[name]])
    with torch.no_grad():
        values(sparse, name).mul_(0.5)               # the values are a parameter too: writing them works
    model(x)
    torch.testing.assert_close(model[0].weight.detach()[sparse.masks[name]], values(sparse, name).detach())
    with torch.no_grad():
        model[0].weight.add_(1.0)
        values(sparse, name).add_(1.0)
    with pytest.raises(RuntimeError, match="write one of them only"):
        model(x)


def test_remove_gives_the_optimizer_its_dense_weights_back():
    _, (model, opt, sparse) = twins()
    for t in range(3):
        step(model, opt, t)
    momentum = {p.name: opt.state[values(sparse, p.name)]["momentum_buffer"].clone() for p in sparse.params}
    masks = {n: m.clone() for n, m in sparse.masks.items()}
    sparse.remove()
    held = [p for group in opt.param_groups for p in group["params"]]
    for p in sparse.params:
        assert any(q is p.param for q in held) and p.param.requires_grad
        dense = opt.state[p.param]["momentum_buffer"]
        assert dense.shape == p.param.shape and torch.equal(dense[masks[p.name]], momentum[p.name])
    assert not any(n.endswith("weight_values") for n, _ in model.named_parameters())
    step(model, opt, 3)                               # a plain dense step now
    assert all(p.param.grad is not None for p in sparse.params)


def test_a_tied_weight_stays_on_the_masked_dense_path():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(40, 32), nn.Linear(32, 40, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(self.embed(tokens))

    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"head.weight \(its weight is tied to \['embed.weight'\]\)"):
        sparse = so.SparseTraining(model, opt, density=0.2, include=["head.weight"], sparse_execution=EVERY_LAYER)
    assert [r.execution for r in sparse.report().layers] == ["masked"]


def test_distributed_wrappers_are_refused():
    model = nn.DataParallel(mlp((32, 64, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="DistributedDataParallel/DataParallel would not synchronise"):
        so.SparseTraining(model, opt, density=0.2, prune_first_layer=True, sparse_execution=EVERY_LAYER)


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


def test_the_default_policy_runs_a_layer_at_exactly_its_break_even_density_sparse():
    """Density 0.1 of 1024² rounds up to 104,858 weights (0.1000004): still at the break-even, not above it."""
    from sparseopt.execution.training import SPARSE_MAX_DENSITY
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False), nn.ReLU(), nn.Linear(1024, 1024, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"masked-dense path: 2.weight \(density 0.101 > break-even"):
        sparse = so.SparseTraining(model, opt, density={"0.weight": SPARSE_MAX_DENSITY, "2.weight": 0.101},
                                   prune_first_layer=True, sparse_execution=True)
    assert int(sparse.masks["0.weight"].sum()) > SPARSE_MAX_DENSITY * 1024 * 1024
    assert [r.execution for r in sparse.report().layers] == ["sparse", "masked"]


def test_autocast_is_refused_naming_the_layer():
    """Under autocast the masked-dense path computes in bfloat16; the sparse kernels would silently stay float32."""
    _, (model, opt, sparse) = twins()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match=r"0.weight ran under"):
        model(torch.randn(16, 32))


def test_small_batches_run_the_masked_dense_product():
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    so.SparseTraining(model, opt, density=0.1, include=["*"],
                      sparse_execution=ExecutionPolicy(max_density=1.0, min_numel=0, min_batch=8))
    for rows in (7, 8):   # below min_batch the dense product, on the active values too
        x = torch.randn(rows, 64)
        y = model(x)
        torch.testing.assert_close(y, x @ model[0].weight.detach().t(), rtol=1e-5, atol=1e-6)
        y.sum().backward()
        values = model[0].weight_values
        torch.testing.assert_close(values.grad, (torch.ones(rows, 64).t() @ x)[model[0].weight != 0])
        values.grad = None


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="max_density must be in"):
        ExecutionPolicy(max_density=0.0)
