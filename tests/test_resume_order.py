"""Resume in any order, and sparse state that does not depend on how the model was wrapped."""

import io
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparseopt as so
from helpers import OPTIMIZERS, mlp, train_step


def parts(seed, opt_name, init=None, model=None):
    net = model if model is not None else mlp(widths=(10, 24, 24, 6), seed=seed)
    opt = OPTIMIZERS[opt_name](net.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    return net, opt, sched


def build(net, opt, seed, topology, init=None):
    topo = (so.SET if topology == "set" else so.RigL)(update_every=3, drop_fraction=0.5, end_step=30)
    return so.SparseTraining(net, opt, 0.2, topology=topo, seed=seed, preconditioner=so.SparseOpt(), init=init)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def checkpoint_at(split, topology, opt_name, init, steps):
    net, opt, sched = parts(0, opt_name)
    sparse = build(net, opt, 0, topology, init)
    for step in range(split):
        train_step(net, opt, step, sched)
    state = roundtrip({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                       "sparse": sparse.state_dict()})
    for step in range(split, steps):
        train_step(net, opt, step, sched)
    return state, net, sparse


def resume(state, order, topology, opt_name, init, start, steps):
    net, opt, sched = parts(7, opt_name)  # another seed: the loaded state must win everywhere
    if order == "load-then-build":      # the order of HF Trainer and Lightning
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sparse = build(net, opt, 7, topology, init)
    else:
        sparse = build(net, opt, 7, topology, init)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    sparse.load_state_dict(state["sparse"])
    assert sparse.step_count == start
    for step in range(start, steps):
        train_step(net, opt, step, sched)
    return net, sparse


@given(split=st.integers(1, 14), order=st.sampled_from(["load-then-build", "build-then-load"]),
       topology=st.sampled_from(["set", "rigl"]), opt_name=st.sampled_from(["momentum", "adamw"]),
       init=st.sampled_from([None, "fanin"]))
def test_resume_in_either_order_is_bit_identical(split, order, topology, opt_name, init):
    steps = 16
    state, full_net, full_sparse = checkpoint_at(split, topology, opt_name, init, steps)
    net, sparse = resume(state, order, topology, opt_name, init, split, steps)
    for (name, a), b in zip(full_net.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), name
    for name in full_sparse.masks:
        assert torch.equal(full_sparse.masks[name], sparse.masks[name])
        assert torch.equal(full_sparse.fired[name], sparse.fired[name])


def test_construction_after_loading_keeps_the_model_sparse_until_state_is_loaded():
    """Users who inspect the model right after construction see the sparse model it will train."""
    state, _, _ = checkpoint_at(4, "rigl", "adamw", None, 4)
    net, opt, _ = parts(7, "adamw")
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sparse = build(net, opt, 7, "rigl")
    for p in sparse.params:
        assert torch.all(p.param[~sparse.masks[p.name]] == 0)
        assert torch.all(opt.state[p.param]["exp_avg"][~sparse.masks[p.name]] == 0)
    sparse.load_state_dict(state["sparse"])
    for p in sparse.params:  # everything the fresh masks had zeroed is back
        assert torch.equal(p.param.detach(), state["model"][p.name])
        assert torch.equal(opt.state[p.param]["exp_avg"], state["opt"]["state"][_index(net, p.name)]["exp_avg"])


def _index(net, name):
    return [n for n, _ in net.named_parameters()].index(name)


def test_loading_sparse_state_after_training_started_on_unreloaded_weights_is_an_error():
    state, _, _ = checkpoint_at(4, "rigl", "momentum", None, 4)
    net, opt, sched = parts(7, "momentum")
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sparse = build(net, opt, 7, "rigl")
    train_step(net, opt, 0, sched)           # training started with fresh masks: the loaded values they zeroed
    sparse.load_state_dict(state["sparse"])  # are gone, and the model was not reloaded
    with pytest.raises(RuntimeError, match="were not reloaded"):
        train_step(net, opt, 4, sched)


def test_rolling_back_mid_run_in_any_order_is_allowed():
    state, full_net, _ = checkpoint_at(4, "set", "momentum", None, 8)
    net, opt, sched = parts(0, "momentum")
    sparse = build(net, opt, 0, "set")
    for step in range(6):
        train_step(net, opt, step, sched)
    sparse.load_state_dict(state["sparse"])  # sparse state first, then the model: fine, the model is reloaded
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    for step in range(4, 8):
        train_step(net, opt, step, sched)
    for a, b in zip(full_net.parameters(), net.parameters()):
        assert torch.equal(a, b)


class Holder(nn.Module):
    """The shape of a LightningModule: the network is an attribute."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


WRAPPERS = {
    "bare": lambda net: net,
    "data_parallel": nn.DataParallel,          # names its weights module.*, as DDP does
    "compiled": torch.compile,                 # _orig_mod.*
    "attribute": Holder,                       # net.*
    "compiled_attribute": lambda net: Holder(torch.compile(net)),
}


@pytest.mark.parametrize("saved_under", sorted(WRAPPERS))
@pytest.mark.parametrize("loaded_under", ["bare", "data_parallel", "attribute"])
def test_sparse_state_loads_across_wrappers(saved_under, loaded_under):
    net = mlp(widths=(10, 24, 24, 6))
    saver = so.SparseTraining(WRAPPERS[saved_under](net), torch.optim.SGD(net.parameters(), lr=0.1), 0.3,
                              topology=so.SET(update_every=1, end_step=10), seed=3)
    for step in range(2):
        train_step(net, saver.optimizer, step)
    state = roundtrip(saver.state_dict())
    prefix = "net." if "attribute" in saved_under else ""  # no module., no _orig_mod.
    assert sorted(state["masks"]) == [prefix + "3.weight", prefix + "6.weight"]
    other = mlp(widths=(10, 24, 24, 6), seed=5)
    loader = so.SparseTraining(WRAPPERS[loaded_under](other), torch.optim.SGD(other.parameters(), lr=0.1), 0.3,
                               topology=so.SET(update_every=1, end_step=10), seed=9)
    loader.load_state_dict(state)
    assert loader.step_count == 2
    for mine, theirs in zip(loader.masks.values(), saver.masks.values()):
        assert torch.equal(mine, theirs)


def test_sparse_state_of_a_lightning_module_loads_into_the_bare_model_and_back():
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.model = net

    net = mlp(widths=(10, 24, 24, 6))
    saver = so.SparseTraining(Module(net), torch.optim.SGD(net.parameters(), lr=0.1), 0.3, seed=3)
    state = roundtrip(saver.state_dict())
    assert sorted(state["masks"]) == ["model.3.weight", "model.6.weight"]
    bare = mlp(widths=(10, 24, 24, 6), seed=5)
    loader = so.SparseTraining(bare, torch.optim.SGD(bare.parameters(), lr=0.1), 0.3, seed=9)
    loader.load_state_dict(state)
    again = mlp(widths=(10, 24, 24, 6), seed=8)
    back = so.SparseTraining(Module(again), torch.optim.SGD(again.parameters(), lr=0.1), 0.3)
    back.load_state_dict(roundtrip(loader.state_dict()))
    for a, b, c in zip(saver.masks.values(), loader.masks.values(), back.masks.values()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_names_that_truly_differ_are_a_clear_error():
    net = mlp(widths=(10, 24, 24, 6))
    sparse = so.SparseTraining(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.3)
    state = sparse.state_dict()
    state["masks"] = {"encoder." + n if i == 0 else n: m for i, (n, m) in enumerate(state["masks"].items())}
    with pytest.raises(ValueError, match="do not match this model's"):
        sparse.load_state_dict(state)


def test_warnings_are_not_raised_by_a_plain_resume():
    state, _, _ = checkpoint_at(3, "rigl", "momentum", None, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resume(state, "load-then-build", "rigl", "momentum", None, 3, 5)
