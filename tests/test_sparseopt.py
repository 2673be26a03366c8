import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparseopt as so
from helpers import OPTIMIZERS, convnet, mlp, train_step
from sparseopt.graph import layers_feeding_batchnorm


def row_mask(fan_ins, cols, seed=0):
    """A mask whose row i has exactly fan_ins[i] active entries."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.zeros(cols, dtype=torch.bool).index_fill_(0, torch.randperm(cols, generator=g)[:k], True)
            for k in fan_ins]
    return torch.stack(rows)


@given(fan_ins=st.lists(st.integers(0, 20), min_size=1, max_size=12), normalize=st.booleans())
def test_factors_follow_the_formula(fan_ins, normalize):
    mask = row_mask(fan_ins, 20)
    c = so.SparseOpt(normalize=normalize).factors({"w": mask})["w"].flatten()
    k = torch.tensor(fan_ins, dtype=torch.float64)
    if k.sum() == 0:
        assert torch.all(c == 0)
    else:
        expected = torch.sqrt(k / k.mean()) if normalize else torch.sqrt(k / 20)
        assert torch.allclose(c, expected)


@given(k=st.integers(1, 9), rows=st.integers(1, 8))
def test_homogeneous_masks_give_factor_exactly_one(k, rows):
    c = so.SparseOpt().factors({"w": row_mask([k] * rows, 9)})["w"]
    assert torch.all(c == 1.0)


def test_conv_factors_count_the_kernel_and_broadcast():
    mask = torch.zeros(2, 3, 3, 3, dtype=torch.bool)
    mask[0, :, :, :] = True      # k = 27
    mask[1, 0, 0, :] = True      # k = 3
    c = so.SparseOpt().factors({"w": mask})["w"]
    assert c.shape == (2, 1, 1, 1)
    assert torch.allclose(c.flatten(), torch.sqrt(torch.tensor([27 / 15, 3 / 15], dtype=torch.float64)))


def test_global_mean_scope_and_max_factor():
    a, b = row_mask([4, 4], 8), row_mask([2, 2], 8)
    c = so.SparseOpt(mean_scope="global").factors({"a": a, "b": b})
    assert torch.allclose(c["a"].flatten(), torch.full((2,), (0.5 / 0.375) ** 0.5, dtype=torch.float64))
    clamped = so.SparseOpt(max_factor=1.2).factors({"w": row_mask([1, 9], 9)})["w"]
    assert clamped.max() == 1.2


def homogeneous_masks(net, sparse_names, k_frac=0.5):
    out = {}
    for name, p in net.named_parameters():
        if name in sparse_names:
            flat = p.reshape(p.shape[0], -1)
            k = max(1, int(flat.shape[1] * k_frac))
            out[name] = row_mask([k] * flat.shape[0], flat.shape[1], seed=len(out)).view_as(p)
    return out


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_homogeneous_masks_make_sparseopt_bit_identical_to_the_plain_optimizer(opt_name):
    results = []
    for pre in (None, so.SparseOpt()):
        net = convnet(channels=(3, 6, 8))
        names = ["3.weight", "8.weight"]
        opt = OPTIMIZERS[opt_name](net.parameters())
        so.SparseTraining(net, opt, {n: 0.5 for n in names}, masks=homogeneous_masks(net, names),
                          preconditioner=pre)
        for step in range(5):
            train_step(net, opt, step)
        results.append(copy.deepcopy(net.state_dict()))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_step_uses_mask_times_factor_times_gradient():
    net = mlp(widths=(10, 12, 4), norm=True)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    mask = row_mask([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 3, 3], 10)
    sparse = so.SparseTraining(net, opt, {"0.weight": 0.5}, masks={"0.weight": mask},
                               preconditioner=so.SparseOpt())
    w = net[0].weight
    before = w.detach().clone()
    x, y = torch.randn(32, 10), torch.randint(0, 4, (32,))
    loss = nn.functional.cross_entropy(net(x), y)
    (raw,) = torch.autograd.grad(loss, w, retain_graph=True)  # dense: backward() leaves the corrected .grad
    loss.backward()
    k = mask.sum(1).double()
    c = torch.sqrt(k / k.mean()).float().unsqueeze(1)
    assert torch.allclose(w.grad, c * mask * raw, atol=1e-7)  # what clipping between backward and step sees
    opt.step()
    assert torch.allclose(before - w.detach(), c * mask * raw, atol=1e-7)
    assert torch.allclose(sparse.factors()["0.weight"].float(), c)


def test_bn_followed_scope_finds_layers_by_tracing():
    net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert layers_feeding_batchnorm(net, ["0", "3", "5"]) == {"0"}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sparse = so.SparseTraining(net, opt, 0.5, prune_first_layer=True, preconditioner=so.SparseOpt(scope="bn_followed"))
    assert set(sparse.factors()) == {"0.weight"}


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 2
        return self.b(torch.relu(self.bn(self.a(x))))


def test_untraceable_models_use_hooks_with_an_example_or_explain():
    net = Untraceable()
    with pytest.raises(ValueError, match="pass example_input"):
        so.SparseTraining(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.5, prune_first_layer=True,
                          preconditioner=so.SparseOpt(scope="bn_followed"))
    stats = net.bn.running_mean.clone()
    sparse = so.SparseTraining(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.5, prune_first_layer=True,
                               preconditioner=so.SparseOpt(scope="bn_followed", example_input=torch.randn(4, 6)))
    assert set(sparse.factors()) == {"a.weight"}
    assert torch.equal(net.bn.running_mean, stats)  # the probe does not touch BatchNorm statistics


@pytest.mark.parametrize("regrow", ["original", "corrected"])
def test_rigl_regrows_from_the_chosen_gradient(regrow, monkeypatch):
    net = mlp(widths=(10, 12, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mask = row_mask([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 3, 3], 10)
    topo = so.RigL(update_every=5, end_step=50)
    sparse = so.SparseTraining(net, opt, {"0.weight": 0.5}, masks={"0.weight": mask}, topology=topo,
                               preconditioner=so.SparseOpt(regrow_gradient=regrow))
    seen = {}
    original = topo.grow_scores   # what the update reads the grow scores through

    def spy(w, g, gen, out=None):
        seen["g"] = g.clone()
        return original(w, g, gen, out=out)

    monkeypatch.setattr(topo, "grow_scores", spy)
    x, y = torch.randn(32, 10), torch.randint(0, 4, (32,))
    loss = nn.functional.cross_entropy(net(x), y)
    (raw,) = torch.autograd.grad(loss, net[0].weight, retain_graph=True)  # dense, as RigL must see it
    loss.backward()
    c = sparse.factors()["0.weight"].float()
    opt.step()
    expected = raw if regrow == "original" else raw * c
    assert torch.allclose(seen["g"], expected)
    assert not torch.allclose(raw, raw * c)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown SparseOpt scope 'bn'"):
        so.SparseOpt(scope="bn")
    with pytest.raises(ValueError, match="unknown SparseOpt regrow_gradient"):
        so.SparseOpt(regrow_gradient="fixed")
    with pytest.raises(ValueError, match="max_factor must be positive"):
        so.SparseOpt(max_factor=0)


def test_bn_followed_scope_on_real_architectures():
    from sparseopt.models import build_model

    for name in ("resnet20", "resnet50"):
        net = build_model(name, 10, (3, 32, 32))
        convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
        assert layers_feeding_batchnorm(net, convs | {"fc"}) == convs  # every conv feeds a BN, the classifier not
    net = build_model("resnet20", 10, (3, 32, 32))
    sparse = so.SparseTraining(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.1,
                               preconditioner=so.SparseOpt(scope="bn_followed"))
    assert "fc.weight" not in sparse.factors() and len(sparse.factors()) == len(sparse.params) - 1
