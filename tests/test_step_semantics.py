"""What step() and the code between backward() and step() see: closures, clipping, accumulation, GradScaler."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparseopt as so
from helpers import OPTIMIZERS, batch, mlp


def setup(opt_name="momentum", precondition=True, topology=None, seed=0, **kwargs):
    net = mlp(widths=(10, 24, 24, 6), seed=seed)
    opt = OPTIMIZERS[opt_name](net.parameters())
    topology = topology or so.RigL(update_every=3, drop_fraction=0.5, end_step=30)
    sparse = so.SparseTraining(net, opt, 0.3, topology=topology, preconditioner=so.SparseOpt() if precondition
                               else None, seed=seed, **kwargs)
    return net, opt, sparse


def loss_at(net, step):
    x, y = batch(net, step)
    return nn.functional.cross_entropy(net(x), y)


def plain_step(net, opt, step):
    opt.zero_grad()
    loss_at(net, step).backward()
    opt.step()


def closure_step(net, opt, step):
    def closure():  # the shape of Lightning's default (automatic optimisation) closure
        opt.zero_grad()
        loss = loss_at(net, step)
        loss.backward()
        return loss
    opt.step(closure)


def closure_kwarg_step(net, opt, step):
    def closure():
        opt.zero_grad()
        loss = loss_at(net, step)
        loss.backward()
        return loss
    opt.step(closure=closure)


def train(step_fn, steps=10, **kwargs):
    net, opt, sparse = setup(**kwargs)
    for step in range(steps):
        step_fn(net, opt, step)
    return net, sparse


def assert_same(a, b, buffers=True):
    tensors = (lambda net: net.state_dict()) if buffers else (lambda net: dict(net.named_parameters()))
    for (name, x), y in zip(tensors(a[0]).items(), tensors(b[0]).values()):
        assert torch.equal(x, y), name
    for name in a[1].masks:
        assert torch.equal(a[1].masks[name], b[1].masks[name])


@given(opt_name=st.sampled_from(["momentum", "adamw", "rmsprop"]), skip=st.booleans(),
       renormalize=st.sampled_from([None, "clip"]))
def test_closure_step_trains_exactly_as_the_plain_loop(opt_name, skip, renormalize):
    topology = dict(topology=so.RigL(update_every=3, drop_fraction=0.5, end_step=30, skip_step_on_update=skip))
    plain = train(plain_step, opt_name=opt_name, renormalize=renormalize, **topology)
    topology = dict(topology=so.RigL(update_every=3, drop_fraction=0.5, end_step=30, skip_step_on_update=skip))
    closure = train(closure_step, opt_name=opt_name, renormalize=renormalize, **topology)
    assert_same(plain, closure)
    assert plain[1].report().changed > 0 or plain[1].itop() > plain[1].density()


def test_closure_keyword_and_sparseopt_matter():
    assert_same(train(plain_step), train(closure_kwarg_step))
    with_opt, without = train(closure_step), train(closure_step, precondition=False)
    assert any(not torch.equal(a, b) for a, b in zip(with_opt[0].parameters(), without[0].parameters()))


def test_closure_update_step_is_skipped_and_rigl_grows_from_the_closure_gradient():
    net, opt, sparse = setup()
    bn = net[1].weight.detach().clone()
    before = {n: m.clone() for n, m in sparse.masks.items()}
    closure_step(net, opt, 0)  # step 0 is a mask update: RigL needs the gradient the closure computes
    assert torch.equal(net[1].weight, bn)
    assert any(not torch.equal(before[n], sparse.masks[n]) for n in before)
    assert sparse.step_count == 1


def test_lbfgs_trains_sparse_and_sparseopt_changes_it():
    def run(precondition):
        net = mlp(widths=(10, 24, 24, 6))  # same init
        opt = torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=4, history_size=5)
        sparse = so.SparseTraining(net, opt, 0.3, preconditioner=so.SparseOpt() if precondition else None,
                                   topology=so.SET(update_every=3, drop_fraction=0.3, end_step=30))
        x, y = batch(net, 0, n=64)
        losses = []
        for _ in range(7):
            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(x), y)
                loss.backward()
                return loss
            losses.append(float(opt.step(closure).detach()))
            for p in sparse.params:
                assert torch.all(p.param[~sparse.masks[p.name]] == 0)
                assert int(sparse.masks[p.name].sum()) == sparse.target_nnz[p.name]
        assert sparse.step_count == 7
        return net, losses

    with_opt, losses = run(True)
    without, _ = run(False)
    assert losses[-1] < losses[0]
    assert not torch.equal(with_opt[0].weight, without[0].weight)


def dense_grads(net, sparse, step):
    loss = loss_at(net, step)
    return dict(zip([p.name for p in sparse.params],
                    torch.autograd.grad(loss, [p.param for p in sparse.params])))


def test_clipping_between_backward_and_step_sees_the_applied_gradient():
    net, opt, sparse = setup(topology=so.RigL(update_every=5, start_step=5, end_step=30))
    applied = {}
    opt.register_step_pre_hook(lambda o, a, k: applied.update(
        {id(p): p.grad.clone() for g in o.param_groups for p in g["params"] if p.grad is not None}))
    for step in range(4):
        dense = dense_grads(net, sparse, step)   # torch.autograd.grad is not masked: diagnostics keep dense
        opt.zero_grad()
        loss_at(net, step).backward()
        factors = sparse.factors()
        for p in sparse.params:
            expected = dense[p.name] * (sparse.masks[p.name] * factors[p.name]).to(p.param.dtype)
            torch.testing.assert_close(p.param.grad, expected)
            assert torch.all(p.param.grad[~sparse.masks[p.name]] == 0)
        seen = torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        opt.step()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in applied.values()]))
        assert norm <= 0.5 * (1 + 1e-6)
        assert seen > 0.5  # the bound really was binding
        applied.clear()


def test_rigl_grows_from_the_dense_gradient_summed_over_accumulated_backwards():
    """Two micro-batches through backward() (masked as they accumulate) must grow exactly where a hand-set dense
    .grad (the sum of both dense gradients) grows."""
    def masks_after(by_backward):
        net, opt, sparse = setup(topology=so.RigL(update_every=4, drop_fraction=0.5, start_step=1, end_step=30))
        plain_step(net, opt, 0)
        if by_backward:
            opt.zero_grad()
            for micro in (1, 2):
                loss_at(net, micro).backward()
        else:
            sums = [dense_grads(net, sparse, m) for m in (1, 2)]
            for p in net.parameters():
                p.grad = None
            for p in sparse.params:
                p.param.grad = sums[0][p.name] + sums[1][p.name]
        opt.step()
        return sparse.masks
    by_backward, by_hand = masks_after(True), masks_after(False)
    for name in by_backward:
        assert torch.equal(by_backward[name], by_hand[name])


def test_accumulated_gradient_is_the_masked_sum():
    net, opt, sparse = setup(topology=so.Static())
    opt.zero_grad()
    for micro in (1, 2):
        loss_at(net, micro).backward()
    accumulated = {p.name: p.param.grad.clone() for p in sparse.params}
    opt.zero_grad()
    (loss_at(net, 1) + loss_at(net, 2)).backward()
    for p in sparse.params:
        torch.testing.assert_close(accumulated[p.name], p.param.grad)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_grad_scaler_step_skipped_for_inf_changes_nothing(set_to_none):
    def run(with_inf):
        net, opt, sparse = setup(topology=so.RigL(update_every=2, drop_fraction=0.5, end_step=30))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1000)
        order = [0, 1, "inf", 2, 3, 4] if with_inf else [0, 1, 2, 3, 4]  # "inf" hits the update at step 2
        for step in order:
            opt.zero_grad(set_to_none=set_to_none)
            loss = loss_at(net, 2 if step == "inf" else step)
            scaler.scale(loss * (float("inf") if step == "inf" else 1.0)).backward()
            scaler.step(opt)
            scaler.update(2.0 ** 8)  # same scale for both runs
        assert sparse.step_count == 5
        return net, sparse
    assert_same(run(False), run(True), buffers=False)  # the skipped forward did move BatchNorm's statistics


def test_renormalize_exact_sets_the_applied_norm_from_backward_gradients():
    net, opt, sparse = setup(topology=so.Static(), renormalize="exact")
    dense = dense_grads(net, sparse, 0)
    others = dict(zip([n for n, p in net.named_parameters() if n not in dense],
                      torch.autograd.grad(loss_at(net, 0), [p for n, p in net.named_parameters()
                                                              if n not in dense])))
    tau = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(dense[p.name] * sparse.masks[p.name]) for p in sparse.params]
        + [torch.linalg.vector_norm(g) for g in others.values()]))
    applied = []
    opt.register_step_pre_hook(lambda o, a, k: applied.append(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad) for g in o.param_groups for p in g["params"]]))))
    plain_step(net, opt, 0)
    assert applied[0].item() == pytest.approx(tau.item(), rel=1e-5)


def test_ham_with_a_closure_trains_exactly_as_the_plain_loop():
    def run(step_fn):
        net = mlp(widths=(10, 24, 24, 6))
        opt = so.HAM(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), alpha=20.0)
        sparse = so.SparseTraining(net, opt, 0.3, topology=so.RigL(update_every=3, drop_fraction=0.5, end_step=30),
                                   preconditioner=so.SparseOpt())
        for step in range(8):
            step_fn(net, opt, step)
        return net, sparse
    assert_same(run(plain_step), run(closure_step))
