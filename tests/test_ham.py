import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparseopt as so
from helpers import mlp, train_step


def linear(weight, bias=None):
    net = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None))
    with torch.no_grad():
        net[0].weight.copy_(weight)
        if bias is not None:
            net[0].bias.copy_(bias)
    return net


def ham_update(w_half, g, lr, alpha, beta):
    return w_half * torch.exp((-lr * (alpha * torch.sign(w_half) * g + beta)).clamp(-5, 5))


def test_matches_the_closed_form_and_skips_1d_tensors():
    w = torch.tensor([[0.5, -0.2, 0.0], [1.0, 0.0, -3.0]], dtype=torch.float64)
    g = torch.tensor([[0.3, 0.1, 0.0], [-0.2, 0.0, 4.0]], dtype=torch.float64)  # 4.0: the clamp binds
    b, gb = torch.tensor([0.1, -0.1], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    net = linear(w, b).double()
    lr, alpha, beta = 0.1, 20.0, 1e-2
    opt = so.HAM(torch.optim.SGD(net.parameters(), lr=lr), alpha=alpha, beta=beta)
    net[0].weight.grad, net[0].bias.grad = g.clone(), gb.clone()
    opt.step()
    expected = ham_update(w - lr * g, g, lr, alpha, beta)
    torch.testing.assert_close(net[0].weight.detach(), expected)
    assert net[0].weight[0, 2] == 0 and net[0].weight[1, 1] == 0  # zeros stay zero
    torch.testing.assert_close(net[0].bias.detach(), b - lr * gb)  # 1-D: base step only


@given(seed=st.integers(0, 10_000), lr=st.floats(1e-4, 1.0), alpha=st.floats(0.0, 500.0),
       beta=st.floats(0.0, 0.1))
def test_ham_step_is_multiplicative_sign_and_zero_preserving(seed, lr, alpha, beta):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 5, generator=gen) * (torch.rand(4, 5, generator=gen) > 0.4)
    g = torch.randn(4, 5, generator=gen) * (w != 0)
    plain, ham = linear(w), linear(w)
    for net in (plain, ham):
        net[0].weight.grad = g.clone()
    torch.optim.SGD(plain.parameters(), lr=lr).step()
    so.HAM(torch.optim.SGD(ham.parameters(), lr=lr), alpha=alpha, beta=beta, max_weight_norm=None).step()
    base, out = plain[0].weight.detach(), ham[0].weight.detach()
    assert torch.equal(out == 0, base == 0)
    assert torch.equal(torch.sign(out), torch.sign(base))
    ratio = out[base != 0] / base[base != 0]
    bound = torch.exp(torch.tensor(5.0))
    assert torch.all(ratio >= 0.999 / bound) and torch.all(ratio <= 1.001 * bound)  # the exponent is clamped


class ZeroingSGD(torch.optim.SGD):
    """A base optimizer that consumes .grad (sets it to zero) inside its step."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.zero_()


def test_ham_uses_the_gradient_from_before_the_base_step():
    w, g = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, 0.3]])
    net = linear(w)
    net[0].weight.grad = g.clone()
    so.HAM(ZeroingSGD(net.parameters(), lr=0.1), alpha=10.0, beta=0.0).step()
    torch.testing.assert_close(net[0].weight.detach(), ham_update(w - 0.1 * g, g, 0.1, 10.0, 0.0))


def test_with_sparse_training_ham_sees_the_sparseopt_corrected_gradient():
    w = torch.tensor([[0.5, -0.2, 0.3, 0.1], [0.4, 0.0, 0.0, 0.0]])
    mask = w != 0  # fan-in 4 and 1: factors sqrt(4/2.5), sqrt(1/2.5)
    net = linear(w)
    lr, alpha, beta = 0.05, 50.0, 1e-3
    opt = so.HAM(torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9), alpha=alpha, beta=beta)
    sparse = so.SparseTraining(net, opt, {"0.weight": 0.5}, masks={"0.weight": mask}, preconditioner=so.SparseOpt())
    g = torch.tensor([[0.1, 0.2, -0.3, 0.4], [1.0, 2.0, 3.0, 4.0]])
    net[0].weight.grad = g.clone()
    opt.step()
    corrected = g * mask * torch.tensor([[(4 / 2.5) ** 0.5], [(1 / 2.5) ** 0.5]])
    torch.testing.assert_close(net[0].weight.detach(), ham_update(w - lr * corrected, corrected, lr, alpha, beta))
    assert torch.all(net[0].weight[~mask] == 0) and sparse.step_count == 1


def test_rigl_with_ham_keeps_exact_sparsity_and_grows_from_raw_gradients():
    net = mlp(widths=(12, 16, 16, 10))
    opt = so.HAM(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    sparse = so.SparseTraining(net, opt, 0.3, topology=so.RigL(update_every=2, end_step=10),
                               preconditioner=so.SparseOpt())
    target = dict(sparse.target_nnz)
    start = {n: m.clone() for n, m in sparse.masks.items()}
    for step in range(8):
        train_step(net, opt, step)
        for p in sparse.params:
            assert int(sparse.masks[p.name].sum()) == target[p.name]
            assert torch.all(p.param[~sparse.masks[p.name]] == 0)
    assert any(not torch.equal(start[n], sparse.masks[n]) for n in start)


def test_lr_scheduler_drives_both_base_and_ham():
    net = linear(torch.tensor([[0.5, -1.0]]))
    base = torch.optim.SGD(net.parameters(), lr=0.1)
    opt = so.HAM(base, alpha=10.0, beta=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    net[0].weight.grad = torch.zeros(1, 2)
    opt.step()
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    w, g = net[0].weight.detach().clone(), torch.tensor([[0.2, 0.3]])
    net[0].weight.grad = g.clone()
    opt.step()
    torch.testing.assert_close(net[0].weight.detach(), ham_update(w - 0.05 * g, g, 0.05, 10.0, 0.0))


def run(steps, state=None, stop_at=None):
    net = mlp(widths=(10, 16, 6))
    opt = so.HAM(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4),
                 alpha=100.0 if state is None else 1.0, beta=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    start = 0
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
    for step in range(start, steps if stop_at is None else stop_at):
        train_step(net, opt, step, sched)
    return net, opt, sched


def test_state_dict_round_trip_resumes_bit_identically():
    full, _, _ = run(12)
    net, opt, sched = run(12, stop_at=5)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": 5}, buf)
    buf.seek(0)
    resumed, ropt, _ = run(12, state=torch.load(buf, weights_only=True))
    assert ropt.alpha == 100.0  # the saved options win over the constructor's
    assert ropt.param_groups is ropt.base.param_groups and ropt.state is ropt.base.state
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


class Idle(torch.optim.Optimizer):
    """A base optimizer whose step changes nothing, so only the HAM step acts."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        return None


def test_nan_guards_skip_and_revert():
    nan = float("nan")
    a, b = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    opt = so.HAM(Idle([{"params": a.parameters()}, {"params": b.parameters(), "lr": nan}], lr=0.1), alpha=10.0)
    a.weight.grad = torch.tensor([[nan, 0.0], [0.0, 0.0]])   # NaN gradient: the tensor is skipped
    b.weight.grad = torch.ones(2, 2)                         # NaN learning rate: the NaN result is reverted
    opt.step()
    assert torch.equal(a.weight, wa) and torch.equal(b.weight, wb)
    a.weight.grad = torch.ones(2, 2)
    opt.step()
    assert not torch.equal(a.weight, wa)


def test_clips_and_errors():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    net = linear(w, torch.tensor([30.0, 40.0]))
    opt = so.HAM(torch.optim.SGD(net.parameters(), lr=0.0), max_weight_norm=2.0, post_step_grad_clip=1.0)
    net[0].weight.grad = torch.zeros(2, 2)
    net[0].bias.grad = torch.tensor([3.0, 4.0])
    opt.step()  # lr 0: neither step moves the weights; the clips still apply, to every tensor
    torch.testing.assert_close(net[0].weight.detach(), w * 0.4)
    torch.testing.assert_close(net[0].bias.detach(), torch.tensor([1.2, 1.6]))
    torch.testing.assert_close(net[0].bias.grad, torch.tensor([0.6, 0.8]))
    with pytest.raises(TypeError, match=r"HAM wraps a torch.optim.Optimizer, got generator"):
        so.HAM(net.parameters())
    with pytest.raises(TypeError, match="wrap the base optimizer once"):
        so.HAM(opt)
    with pytest.raises(ValueError, match="max_weight_norm must be positive"):
        so.HAM(torch.optim.SGD(net.parameters(), lr=0.1), max_weight_norm=0)
    with pytest.raises(ValueError, match="not a HAM state dict"):
        opt.load_state_dict(opt.base.state_dict())
