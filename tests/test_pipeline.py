import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparseopt as so
from helpers import OPTIMIZERS, batch, convnet, mlp, train_step

model_st = st.one_of(
    st.tuples(st.integers(4, 16), st.integers(4, 24), st.integers(2, 8), st.booleans()).map(
        lambda t: ("mlp", dict(widths=(t[0], t[1], t[2]), norm=t[3]))),
    st.tuples(st.integers(2, 6), st.integers(2, 8)).map(lambda t: ("conv", dict(channels=(3, t[0], t[1])))),
)
topology_st = st.sampled_from(["static", "set", "rigl"])


def build(kind_kwargs, seed=0):
    kind, kwargs = kind_kwargs
    return mlp(seed=seed, **kwargs) if kind == "mlp" else convnet(seed=seed, **kwargs)


def make_topology(name, every=3, end=20, skip=True):
    if name == "static":
        return so.Static()
    cls = so.SET if name == "set" else so.RigL
    return cls(update_every=every, drop_fraction=0.5, end_step=end, skip_step_on_update=skip)


@given(model=model_st, density=st.floats(0.05, 0.9), distribution=st.sampled_from(["erk", "uniform"]),
       topology=topology_st, opt=st.sampled_from(sorted(OPTIMIZERS)), precondition=st.booleans(),
       every=st.integers(1, 4), seed=st.integers(0, 1000))
def test_invariants_hold_after_every_step(model, density, distribution, topology, opt, precondition, every, seed):
    net = build(model, seed)
    optimizer = OPTIMIZERS[opt](net.parameters())
    sparse = so.SparseTraining(net, optimizer, density, distribution=distribution,
                               topology=make_topology(topology, every), seed=seed, prune_first_layer=True,
                               preconditioner=so.SparseOpt() if precondition else None)
    target = dict(sparse.target_nnz)
    prev_fired = {n: f.clone() for n, f in sparse.fired.items()}
    for step in range(12):
        before = {n: m.clone() for n, m in sparse.masks.items()}
        updating = sparse.topology.is_update_step(step)
        train_step(net, optimizer, step)
        for p in sparse.params:
            mask = sparse.masks[p.name]
            assert int(mask.sum()) == target[p.name]                      # exact sparsity
            assert torch.all(p.param[~mask] == 0)                         # pruned weights exactly 0
            assert torch.all(sparse.fired[p.name] >= prev_fired[p.name])  # ITOP union only grows
            assert torch.all(sparse.fired[p.name][mask])
            # the cached active indices (kept current in O(changes)) are exactly the mask's active entries
            assert torch.equal(torch.sort(sparse._active[p.name]).values, mask.view(-1).nonzero().squeeze(1))
            if updating:  # skip_step_on_update: grown weights and their optimizer state are still 0 now
                grown = mask & ~before[p.name]
                assert torch.all(p.param[grown] == 0)
                for v in optimizer.state.get(p.param, {}).values():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        assert torch.all(v[grown] == 0)
        prev_fired = {n: f.clone() for n, f in sparse.fired.items()}
    assert sparse.step_count == 12


def test_dynamic_topology_actually_changes_masks_and_raises_itop():
    net = convnet(channels=(3, 8, 16))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sparse = so.SparseTraining(net, opt, 0.2, topology=so.RigL(update_every=2, end_step=20))
    start = {n: m.clone() for n, m in sparse.masks.items()}
    itop0 = sparse.itop()
    for step in range(10):
        train_step(net, opt, step)
    assert any(not torch.equal(start[n], sparse.masks[n]) for n in start)
    assert sparse.itop() > itop0
    assert sparse.report().changed > 0


def test_update_step_skips_the_weight_update_by_default_and_not_when_told():
    for skip in (True, False):
        net = mlp()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        sparse = so.SparseTraining(net, opt, 0.5, topology=so.RigL(update_every=5, end_step=20,
                                                                   skip_step_on_update=skip))
        bn_before = net[1].weight.detach().clone()
        train_step(net, opt, 0)  # step 0 is an update step
        assert torch.equal(net[1].weight, bn_before) == skip
        assert sparse.step_count == 1


def single_layer(weight, mask, opt_factory, topology):
    net = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        net[0].weight.copy_(weight)
    opt = opt_factory(net.parameters())
    sparse = so.SparseTraining(net, opt, {"0.weight": 0.5}, masks={"0.weight": mask}, topology=topology)
    return net, opt, sparse


def test_rigl_by_hand_keeps_regrown_values_and_state_resets_new_ones():
    w = torch.tensor([[0.5, -0.1, 0.0, 0.0], [0.3, 0.0, 0.0, -0.05]])
    mask = w != 0
    net, opt, sparse = single_layer(w, mask, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                    so.RigL(update_every=10, drop_fraction=0.5, start_step=1, end_step=100,
                                            annealing="constant"))
    p = net[0].weight
    p.grad = torch.ones_like(p)
    opt.step()  # step 0: no update; builds a momentum buffer on the active entries only
    momentum = opt.state[p]["momentum_buffer"].clone()
    assert torch.all(momentum[~mask] == 0)
    weights = p.detach().clone()
    # step 1 is an update: drop the 2 smallest |w| (entries (1,3)=-0.05-0.1*..., (0,1)); grow by |g|
    g = torch.zeros_like(p)
    g[0, 1] = 9.0   # a just-dropped entry with the largest gradient is regrown and keeps its value and momentum
    g[1, 2] = 5.0   # a brand-new entry: starts at 0 with zero momentum
    p.grad = g
    opt.step()
    new = sparse.masks["0.weight"]
    assert new.tolist() == [[True, True, False, False], [True, False, True, False]]
    assert p[0, 1] == weights[0, 1] and opt.state[p]["momentum_buffer"][0, 1] == momentum[0, 1]
    assert p[1, 2] == 0 and opt.state[p]["momentum_buffer"][1, 2] == 0
    assert p[1, 3] == 0 and opt.state[p]["momentum_buffer"][1, 3] == 0  # dropped: weight and state cleared
    assert sparse.changed["0.weight"] == 1


def run(seed, steps, state=None, topology="set", opt_name="momentum", stop_at=None):
    net = mlp(widths=(10, 24, 24, 6), seed=seed)
    opt = OPTIMIZERS[opt_name](net.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    sparse = so.SparseTraining(net, opt, 0.2, topology=make_topology(topology, every=3, end=30), seed=seed,
                               preconditioner=so.SparseOpt())
    start = 0
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        sparse.load_state_dict(state["sparse"])
        start = sparse.step_count
    for step in range(start, steps if stop_at is None else stop_at):
        train_step(net, opt, step, sched)
    return net, opt, sched, sparse


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@given(split=st.integers(1, 24), topology=st.sampled_from(["set", "rigl"]),
       opt_name=st.sampled_from(["momentum", "adamw"]))
def test_resume_is_bit_identical(split, topology, opt_name):
    full = run(0, 25, topology=topology, opt_name=opt_name)
    net, opt, sched, sparse = run(0, 25, topology=topology, opt_name=opt_name, stop_at=split)
    state = roundtrip({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                       "sparse": sparse.state_dict()})
    resumed = run(7, 25, state=state, topology=topology, opt_name=opt_name)  # different seed: state must win
    for a, b in zip(full[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)
    for name in full[3].masks:
        assert torch.equal(full[3].masks[name], resumed[3].masks[name])
        assert torch.equal(full[3].fired[name], resumed[3].fired[name])


def test_load_state_dict_rejects_a_different_model():
    net = mlp()
    sparse = so.SparseTraining(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.5)
    other = mlp(widths=(12, 20, 10))
    other_sparse = so.SparseTraining(other, torch.optim.SGD(other.parameters(), lr=0.1), 0.5)
    with pytest.raises(ValueError, match="has shape"):
        sparse.load_state_dict(other_sparse.state_dict())
    with pytest.raises(ValueError, match="not a SparseTraining state dict"):
        sparse.load_state_dict({"masks": {}})


def test_bad_input_is_named():
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        so.SparseTraining(net, opt, 1.5)
    with pytest.raises(ValueError, match=r"unknown or non-sparsifiable parameters \['fc9.weight'\]"):
        so.SparseTraining(net, opt, {"fc9.weight": 0.1})
    with pytest.raises(ValueError, match="optimizer does not hold the sparse weights"):
        so.SparseTraining(net, torch.optim.SGD(mlp().parameters(), lr=0.1), 0.5)
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer"):
        so.SparseTraining(net, net.parameters(), 0.5)
    with pytest.raises(ValueError, match="no weights of types"):
        bn = nn.Sequential(nn.BatchNorm1d(4))
        so.SparseTraining(bn, torch.optim.SGD(bn.parameters(), lr=0.1), 0.5)
    with pytest.raises(ValueError, match="end_step"):
        so.RigL(update_every=10, end_step=0, start_step=5)


def test_rigl_without_gradient_on_a_sparse_layer_is_explained():
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    so.SparseTraining(net, opt, 0.5, topology=so.RigL(update_every=2, end_step=10))
    with pytest.raises(RuntimeError, match="RigL needs the dense gradient"):
        opt.step()


def test_explicit_density_map_defines_the_sparse_set():
    net = mlp(widths=(12, 16, 16, 10))
    sparse = so.SparseTraining(net, torch.optim.SGD(net.parameters(), lr=0.1), {"3.weight": 0.25, "0.weight": 0.5})
    assert [p.name for p in sparse.params] == ["0.weight", "3.weight"]
    assert int(sparse.masks["3.weight"].sum()) == 64 and int(sparse.masks["0.weight"].sum()) == 96


def test_report_lists_every_layer_and_totals():
    net = convnet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sparse = so.SparseTraining(net, opt, 0.3, topology=so.SET(update_every=1, end_step=10))
    for step in range(3):
        train_step(net, opt, step)
    report = sparse.report()
    text = str(report)
    assert "3.weight" in text and "8.weight" in text and "total" in text
    assert report.density == pytest.approx(sum(int(m.sum()) for m in sparse.masks.values()) / report.numel)
    assert report.to_dict()["layers"][0]["name"] == "3.weight"


def test_remove_detaches_from_the_optimizer():
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sparse = so.SparseTraining(net, opt, 0.3)
    sparse.remove()
    train_step(net, opt, 0)
    assert sparse.step_count == 0
    assert (net[3].weight != 0).sum() > sparse.masks["3.weight"].sum()


def test_sparse_init_restores_fan_in_variance():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 300))
    sparse = so.SparseTraining(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.1, distribution="uniform",
                               init="fanin", include=["2.weight"])
    w, m = net[2].weight, sparse.masks["2.weight"]
    k = m.sum(1, keepdim=True).float()
    # each active weight ~ N(0, 2/k_i): the normalised second moment is 1
    assert ((w ** 2 * k / 2)[m].mean()).item() == pytest.approx(1.0, rel=0.05)
    assert torch.all(w[~m] == 0)


@pytest.mark.parametrize("grow_init", ["random_normal", "random_uniform", "grad_sign", "grad_scale"])
def test_grow_init_sets_grown_weights_at_the_survivors_scale_with_zero_state(grow_init):
    net = mlp(widths=(10, 40, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sparse = so.SparseTraining(net, opt, {"0.weight": 0.3}, topology=so.SET(
        update_every=2, drop_fraction=0.5, start_step=1, end_step=50, annealing="constant", grow_init=grow_init))
    train_step(net, opt, 0)
    before = sparse.masks["0.weight"].clone()
    w = net[0].weight
    x, y = batch(net, 1)
    loss = nn.functional.cross_entropy(net(x), y)
    (grad,) = torch.autograd.grad(loss, w, retain_graph=True)  # dense: .grad holds the masked one after backward
    loss.backward()
    opt.step()  # step 1: mask update, weight update skipped
    grown = sparse.masks["0.weight"] & ~before
    survived = sparse.masks["0.weight"] & before
    sigma = w[survived].std()
    assert grown.any()
    assert torch.all(opt.state[w]["momentum_buffer"][grown] == 0)
    if grow_init.startswith("random"):
        assert torch.all(w[grown] != 0)
    if grow_init == "grad_sign":
        assert torch.equal(w[grown], -sigma * torch.sign(grad[grown]))
    if grow_init == "grad_scale":
        assert torch.allclose(w[grown], -sigma * grad[grown] / grad[grown].std())
    if grow_init == "random_normal":
        assert 0.3 < (w[grown].std() / sigma).item() < 3.0


def test_unknown_grow_init_is_named():
    with pytest.raises(ValueError, match="unknown grow_init 'ones'"):
        so.RigL(end_step=10, grow_init="ones")


def test_mixed_precision_grad_scaler_keeps_the_invariants():
    net = mlp(widths=(10, 32, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sparse = so.SparseTraining(net, opt, 0.3, prune_first_layer=True, preconditioner=so.SparseOpt(),
                               topology=so.RigL(update_every=3, end_step=20))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(9):
        x, y = batch(net, step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)        # unscales first, so the pipeline sees true gradients
        scaler.update()
    assert sparse.step_count == 9
    for p in sparse.params:
        assert int(sparse.masks[p.name].sum()) == sparse.target_nnz[p.name]
        assert torch.all(p.param[~sparse.masks[p.name]] == 0)
    assert sparse.itop() > sparse.report().density
