import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparseopt as so
from sparseopt.optim import global_grad_norm, renormalize_

grads_st = st.tuples(st.integers(0, 10_000), st.lists(st.integers(1, 6), min_size=1, max_size=4),
                     st.floats(0.0, 10.0))


def make(seed, sizes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]


@given(grads_st)
def test_clip_never_increases_and_caps_at_the_reference(case):
    seed, sizes, tau = case
    grads = make(seed, sizes)
    before = global_grad_norm(grads).item()
    directions = [g.clone() for g in grads]
    renormalize_(grads, tau, "clip")
    after = global_grad_norm(grads).item()
    assert after <= before * (1 + 1e-12)
    assert after == pytest.approx(min(before, tau), rel=1e-9, abs=1e-12)
    scale = after / before
    for g, d in zip(grads, directions):
        torch.testing.assert_close(g, d * scale)


@given(grads_st)
def test_exact_sets_the_norm_to_the_reference(case):
    seed, sizes, tau = case
    grads = make(seed, sizes)
    renormalize_(grads, tau, "exact")
    assert global_grad_norm(grads).item() == pytest.approx(tau, rel=1e-9, abs=1e-12)


def test_zero_gradients_and_bad_mode():
    grads = [torch.zeros(3)]
    renormalize_(grads, 1.0, "exact")
    assert torch.equal(grads[0], torch.zeros(3))
    with pytest.raises(ValueError, match="unknown renormalisation mode 'max'"):
        renormalize_(grads, 1.0, "max")


def sparse_model(renormalize):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3), nn.Linear(3, 2))
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)  # c ≠ 1
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sparse = so.SparseTraining(net, opt, {"0.weight": 0.5}, masks={"0.weight": mask},
                               preconditioner=so.SparseOpt(), renormalize=renormalize)
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update({n: p.grad.clone() for n, p in net.named_parameters()}))
    return net, opt, sparse, mask, seen


@pytest.mark.parametrize("mode", [None, "clip", "exact"])
def test_pipeline_rescales_all_gradients_to_the_masked_uncorrected_norm(mode):
    net, opt, sparse, mask, seen = sparse_model(mode)
    gen = torch.Generator().manual_seed(1)
    raw = {n: torch.randn(p.shape, generator=gen) for n, p in net.named_parameters()}
    for n, p in net.named_parameters():
        p.grad = raw[n].clone()
    opt.step()
    masked = dict(raw, **{"0.weight": raw["0.weight"] * mask})
    corrected = dict(raw, **{"0.weight": raw["0.weight"] * mask * sparse.factors()["0.weight"].float()})
    tau = global_grad_norm(list(masked.values()))
    norm = global_grad_norm(list(corrected.values()))
    scale = {None: 1.0, "clip": min(1.0, (tau / norm).item()), "exact": (tau / norm).item()}[mode]
    for n in raw:
        torch.testing.assert_close(seen[n], corrected[n] * scale)
    assert norm > tau  # SparseOpt raised the norm here, so "clip" binds: no mode is trivial
    if mode == "exact":
        assert global_grad_norm(list(seen.values())).item() == pytest.approx(tau.item(), rel=1e-6)


def test_bad_renormalize_is_named():
    with pytest.raises(ValueError, match="unknown renormalize 'l2'"):
        sparse_model("l2")
