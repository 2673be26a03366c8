"""The scale-invariant drop criterion: |w_ij| / ||w_i|| per output neuron, for SET and RigL."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparseopt as so
from sparseopt.topology.dst import neuron_normalized_magnitude

from helpers import TINY


def test_score_is_magnitude_over_row_norm_and_zero_rows_score_zero():
    w = torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0], [0.0, -2.0, 0.0]])
    active = torch.tensor([0, 2, 4, 7])  # entry 4 is an active weight that is 0, alone in its row
    score = neuron_normalized_magnitude(w, active)
    assert torch.allclose(score, torch.tensor([0.6, 0.8, 0.0, 1.0]))


@given(rows=st.integers(2, 6), cols=st.integers(2, 8), seed=st.integers(0, 2**31),
       log_scales=st.lists(st.floats(-6, 6), min_size=6, max_size=6))
def test_rescaling_a_neuron_never_changes_its_scores(rows, cols, seed, log_scales):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    active = torch.arange(rows * cols)
    scale = torch.tensor([10.0 ** s for s in log_scales[:rows]], dtype=torch.float64).unsqueeze(1)
    assert torch.allclose(neuron_normalized_magnitude(w, active), neuron_normalized_magnitude(w * scale, active))


def _fan_in_after_one_update(criterion: str) -> tuple[int, int]:
    """Neuron 0's fan-in before and after one RigL update, its weights being 1000x smaller than the others'.

    The gradient is set by hand, 0 on neuron 0, so nothing regrows there: what it loses is what was dropped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    topology = so.RigL(update_every=1, drop_fraction=0.5, end_step=10, drop_criterion=criterion)
    sparse = so.SparseTraining(model, opt, {"0.weight": 0.5}, topology=topology)
    weight = model[0].weight
    with torch.no_grad():
        weight[0] *= 1e-3
    before = int(so.masks.fan_in(sparse.masks["0.weight"])[0])
    weight.grad = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) + 0.1
    weight.grad[0] = 0.0
    opt.step()
    return before, int(so.masks.fan_in(sparse.masks["0.weight"])[0])


def test_magnitude_drop_empties_a_small_neuron_and_neuron_normalized_drops_its_share():
    before, after = _fan_in_after_one_update("magnitude")
    assert before > 2 and after == 0
    before, after = _fan_in_after_one_update("neuron_normalized")
    assert before // 4 <= after < before  # about half of every neuron's weights go, neuron 0's included


def test_unknown_criterion_and_static_topology_are_named(tmp_path):
    with pytest.raises(ValueError, match="drop_criterion 'norm'"):
        so.RigL(drop_criterion="norm")
    from sparseopt.experiments.run.build import build_experiment
    from sparseopt.experiments.config.load import from_dict, merge
    from sparseopt.experiments.errors import UserError
    from sparseopt.experiments.config.schema import RunConfig
    cfg = from_dict(RunConfig, merge(TINY, {"sparsity": {"method": "static", "drop_criterion": "neuron_normalized"}}))
    with pytest.raises(UserError, match="sparsity.drop_criterion='neuron_normalized' needs masks that change"):
        build_experiment(cfg)
    cfg = from_dict(RunConfig, merge(TINY, {"sparsity": {"drop_criterion": "neuron_normalized"}}))
    assert build_experiment(cfg).sparse.topology.drop_criterion == "neuron_normalized"
