import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, hessian
from torch.nn import functional as F

import sparseopt as so
from helpers import convnet, mlp, train_step
from sparseopt.distributions import layer_nnz
from sparseopt.masks import select_sparse_params
from sparseopt.topology.pai import pai_scores


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def labelled(n, classes=3, features=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g, dtype=dtype), torch.arange(n) % classes


def as_loss_of_weights(model, names, batches, scale=1.0):
    """Loss as a function of the flattened sparse weights, the rest of the model fixed."""
    shapes = [model.get_parameter(n).shape for n in names]
    sizes = [s.numel() for s in shapes]

    def loss(flat):
        params = {n: w.view(s) for n, w, s in zip(names, flat.split(sizes), shapes)}
        return sum(F.cross_entropy(functional_call(model, params, (x,)) / scale, y) for x, y in batches)

    flat = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])
    return loss, flat, sizes, shapes


def unflatten(vec, names, sizes, shapes):
    return {n: v.view(s) for n, v, s in zip(names, vec.split(sizes), shapes)}


def test_snip_scores_equal_hand_computed_gradients_summed_over_batches():
    model = tiny()
    batches = [labelled(5, seed=1), labelled(7, seed=2)]
    params = select_sparse_params(model, prune_first_layer=True)
    names = [p.name for p in params]
    loss, flat, sizes, shapes = as_loss_of_weights(model, names, batches)
    expected = unflatten((grad(loss)(flat) * flat).abs(), names, sizes, shapes)
    scores = pai_scores(model, params, "snip", data=batches)
    for n in names:
        torch.testing.assert_close(scores[n], expected[n])


def test_grasp_scores_equal_w_times_hessian_gradient_product():
    model = tiny()
    x, y = labelled(6, seed=3)
    order = torch.argsort(y, stable=True)  # the balanced sample is in class order, split in halves
    x, y = x[order], y[order]
    params = select_sparse_params(model, prune_first_layer=True)
    names = [p.name for p in params]
    loss, flat, sizes, shapes = as_loss_of_weights(model, names, [(x[:3], y[:3]), (x[3:], y[3:])], scale=2.0)
    hg = hessian(loss)(flat) @ grad(loss)(flat)
    expected = unflatten(flat * hg, names, sizes, shapes)
    shuffled = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    extra = labelled(9, seed=4)  # more data than needed: only the first 2 of each class are used
    data = [(x[shuffled], y[shuffled]), extra]
    scores = pai_scores(model, params, "grasp", data=data, samples_per_class=2, temperature=2.0)
    for n in names:
        torch.testing.assert_close(scores[n], expected[n])

    # sign convention: GraSP keeps the largest w⊙Hg, i.e. removes the largest -w⊙Hg (SPEC 5 pitfall)
    masks = so.prune_at_init(model, 0.5, "grasp", data=data, samples_per_class=2, temperature=2.0,
                             prune_first_layer=True)
    keep = torch.cat([masks[n].reshape(-1) for n in names])
    k = int(keep.sum())
    assert k == len(flat) // 2
    assert torch.equal(keep.nonzero().flatten().sort().values, torch.topk(flat * hg, k).indices.sort().values)
    assert not (keep & torch.zeros_like(keep).index_fill_(0, torch.topk(-flat * hg, k).indices, True)).any()


@given(method=st.sampled_from(["random", "magnitude", "snip", "grasp"]), density=st.floats(0.05, 1.0),
       scope=st.sampled_from(["global", "layer"]), distribution=st.sampled_from(["erk", "uniform"]),
       seed=st.integers(0, 100))
def test_masks_have_exact_counts(method, density, scope, distribution, seed):
    model = convnet(seed=seed)
    data = [(torch.randn(20, 3, 6, 6, generator=torch.Generator().manual_seed(seed)), torch.arange(20) % 5)]
    masks = so.prune_at_init(model, density, method, data=data, scope=scope, distribution=distribution,
                             samples_per_class=2, generator=torch.Generator().manual_seed(seed))
    names = [p.name for p in select_sparse_params(model)]
    assert list(masks) == names
    shapes = {n: tuple(model.get_parameter(n).shape) for n in names}
    if method == "random" or scope == "layer":
        assert {n: int(m.sum()) for n, m in masks.items()} == layer_nnz(shapes, density, distribution)
    else:
        total = sum(m.numel() for m in masks.values())
        assert sum(int(m.sum()) for m in masks.values()) == int(density * total + 1e-9)
    assert all(m.dtype == torch.bool for m in masks.values())


def test_global_magnitude_keeps_largest_and_breaks_ties_by_index():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -3.0], [1.0, 0.5]]))
        model[1].weight.copy_(torch.tensor([[1.0, 1.0], [-2.0, 0.0]]))
    masks = so.prune_at_init(model, 0.5, "magnitude", prune_first_layer=True)
    # |w| = [.1, 3, 1, .5 | 1, 1, 2, 0]: keep 3, 2 and the first two of the three tied 1's
    assert masks["0.weight"].tolist() == [[False, True], [True, False]]
    assert masks["1.weight"].tolist() == [[True, False], [True, False]]


def with_dropout(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(8, 4))


@pytest.mark.parametrize("method", ["random", "magnitude", "snip", "grasp"])
def test_scoring_leaves_the_model_and_global_rng_untouched(method):
    model = with_dropout()
    model.eval()
    model[3].train()  # mixed modes must come back as they were
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    dataset = torch.utils.data.TensorDataset(torch.randn(40, 6), torch.arange(40) % 4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
    rng = torch.get_rng_state()
    so.prune_at_init(model, 0.3, method, data=loader, samples_per_class=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


@pytest.mark.parametrize("topology", [so.Static(), so.SET(update_every=2, end_step=8),
                                      so.RigL(update_every=2, end_step=8)])
def test_masks_feed_sparse_training(topology):
    model = mlp(widths=(12, 16, 16, 10))
    data = [(torch.randn(30, 12), torch.arange(30) % 10)]
    masks = so.prune_at_init(model, 0.2, "snip", data=data)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = so.SparseTraining(model, opt, 0.2, masks=masks, topology=topology)
    assert {n: torch.equal(sparse.masks[n], m) for n, m in masks.items()} == dict.fromkeys(masks, True)
    counts = {n: int(m.sum()) for n, m in masks.items()}
    for step in range(6):
        train_step(model, opt, step)
        assert {n: int(m.sum()) for n, m in sparse.masks.items()} == counts
        for p in sparse.params:
            assert torch.all(p.param[~sparse.masks[p.name]] == 0)


def test_random_is_reproducible_and_follows_the_generator():
    model = convnet()
    a = so.prune_at_init(model, 0.3, "random", generator=torch.Generator().manual_seed(5))
    b = so.prune_at_init(model, 0.3, "random", generator=torch.Generator().manual_seed(5))
    c = so.prune_at_init(model, 0.3, "random", generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_bad_input_is_named():
    model = mlp()
    data = [(torch.randn(8, 12), torch.arange(8) % 10)]
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
            so.prune_at_init(model, density, "magnitude")
    with pytest.raises(ValueError, match="unknown pruning-at-initialisation method 'synflow'"):
        so.prune_at_init(model, 0.5, "synflow")
    with pytest.raises(ValueError, match="need data"):
        so.prune_at_init(model, 0.5, "snip")
    with pytest.raises(ValueError, match="pass more data or lower samples_per_class"):
        so.prune_at_init(model, 0.5, "grasp", data=data, samples_per_class=2)
    with pytest.raises(ValueError, match="unknown scope"):
        so.prune_at_init(model, 0.5, "magnitude", scope="neuron")
    with pytest.raises(ValueError, match="keeps no weight"):
        so.prune_at_init(model, 1e-6, "magnitude")
