"""Constant fan-in masks: every neuron of a layer has the same fan-in, and SET/RigL keep it so."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseopt as so
from sparseopt.masks import fan_in

from helpers import convnet, mlp, train_step


@given(model=st.sampled_from(["mlp", "conv"]), density=st.floats(0.05, 0.9),
       topology=st.sampled_from(["set", "rigl"]), criterion=st.sampled_from(["magnitude", "neuron_normalized"]),
       precondition=st.booleans(), seed=st.integers(0, 1000))
def test_fan_in_stays_constant_across_updates(model, density, topology, criterion, precondition, seed):
    net = mlp(widths=(12, 16, 10), seed=seed) if model == "mlp" else convnet(seed=seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    cls = so.SET if topology == "set" else so.RigL
    sparse = so.SparseTraining(net, opt, density, topology=cls(update_every=2, drop_fraction=0.5, end_step=12,
                                                               drop_criterion=criterion),
                               preconditioner=so.SparseOpt() if precondition else None, constant_fan_in=True,
                               seed=seed, prune_first_layer=True)
    fans = {n: fan_in(m).clone() for n, m in sparse.masks.items()}
    first = {n: m.clone() for n, m in sparse.masks.items()}
    for n, f in fans.items():
        assert f.unique().numel() == 1 and int(f[0]) >= 1
        assert int(sparse.masks[n].sum()) == sparse.target_nnz[n]
    for step in range(6):
        train_step(net, opt, step)
        for p in sparse.params:
            assert torch.equal(fan_in(sparse.masks[p.name]), fans[p.name])
            assert not p.param[~sparse.masks[p.name]].any()
            active = sparse._active[p.name]
            assert torch.equal(active.sort().values, sparse.masks[p.name].view(-1).nonzero().squeeze(1))
        if precondition:
            assert all(torch.equal(c, torch.ones_like(c)) for c in sparse.factors().values())
    movable = [n for n, m in sparse.masks.items() if 2 <= fans[n][0] < m[0].numel()]  # floor(0.5 k) >= 1
    assert all(not torch.equal(first[n], sparse.masks[n]) for n in movable)


def test_layer_count_is_the_nearest_multiple_of_the_neurons():
    net = mlp(widths=(12, 16, 10))
    sparse = so.SparseTraining(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.3, distribution="uniform",
                               constant_fan_in=True, prune_first_layer=True)
    # uniform budget: 58 of 16x12 and 48 of 10x16 weights -> fan-ins round(58/16) = 4 and round(48/10) = 5
    assert sparse.target_nnz == {"0.weight": 16 * 4, "3.weight": 10 * 5}


def test_given_masks_must_have_constant_fan_in():
    net = mlp(widths=(12, 16, 10))
    masks = {"0.weight": torch.rand(16, 12) < 0.5}
    masks["0.weight"][0] = True
    masks["0.weight"][1] = False
    with pytest.raises(ValueError, match="constant_fan_in=True, but the given mask for '0.weight' has fan-ins"):
        so.SparseTraining(net, torch.optim.SGD(net.parameters(), lr=0.1), {"0.weight": 0.5}, masks=masks,
                          constant_fan_in=True)


def test_config_key_gives_constant_fan_in_runs():
    from helpers import TINY
    from sparseopt.experiments.run.build import build_experiment
    from sparseopt.experiments.config.load import from_dict, merge
    from sparseopt.experiments.errors import UserError
    from sparseopt.experiments.config.schema import RunConfig
    cfg = from_dict(RunConfig, merge(TINY, {"sparsity": {"constant_fan_in": True, "prune_first_layer": True}}))
    sparse = build_experiment(cfg).sparse
    assert all(fan_in(m).unique().numel() == 1 for m in sparse.masks.values())
    cfg = from_dict(RunConfig, merge(TINY, {"sparsity": {"constant_fan_in": True, "initial_mask": "snip"}}))
    with pytest.raises(UserError, match="sparsity.constant_fan_in"):
        build_experiment(cfg)


def test_per_neuron_selection_drops_each_neuron_smallest_and_grows_its_largest():
    from sparseopt.selection import drop_and_grow_per_neuron_
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    w = torch.tensor([[0.5, 0.1, 0.0, 0.0], [0.0, 9.0, 8.0, 0.0]])
    g = torch.tensor([[0.0, 0.0, 0.3, 0.7], [5.0, 0.0, 0.0, 1.0]])
    active = mask.view(-1).nonzero().squeeze(1)
    change = drop_and_grow_per_neuron_(mask, w.view(-1)[active].abs(), g.abs().clone(), 1, active)
    # row 0 drops 0.1 (col 1), grows col 3; row 1 drops 8.0 (col 2, its smallest), grows col 0
    assert mask.tolist() == [[True, False, False, True], [True, True, False, False]]
    assert sorted(change.removed.tolist()) == [1, 6] and sorted(change.added.tolist()) == [3, 4]
    assert active[change.removed_at].tolist() == change.removed.tolist()


def test_hugging_face_conv1d_keeps_constant_fan_in_along_its_output_axis():
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), Conv1D(10, 12), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sparse = so.SparseTraining(net, opt, {"1.weight": 0.5},
                               topology=so.RigL(update_every=1, drop_fraction=0.5, end_step=8,
                                                drop_criterion="neuron_normalized"), constant_fan_in=True)
    mask = sparse.masks["1.weight"]                   # stored (in=12, out=10): a neuron is a column
    assert mask.shape == (12, 10) and mask.sum(0).tolist() == [6] * 10
    first = mask.clone()
    for step in range(4):
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        assert sparse.masks["1.weight"].sum(0).tolist() == [6] * 10
    assert not torch.equal(first, sparse.masks["1.weight"])


def test_neuron_normalized_score_follows_the_output_axis():
    from sparseopt.topology.dst import neuron_normalized_magnitude
    w = torch.randn(5, 7)
    active = torch.arange(35)
    by_rows = neuron_normalized_magnitude(w, active).view(5, 7)
    by_columns = neuron_normalized_magnitude(w.t().contiguous(), active, out_axis=1).view(7, 5)
    assert torch.allclose(by_rows, by_columns.t())
