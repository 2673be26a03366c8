"""SparseOpt(precondition_weight_decay=True): the factor multiplies the coupled decay term as well."""

import copy
import warnings

import pytest
import torch
from torch import nn

import sparseopt as so

from helpers import convnet, mlp, train_step
from test_sparseopt import homogeneous_masks, row_mask

COUPLED = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-3),
    "sgd_nesterov_foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                                      foreach=True),
    "adam_l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, weight_decay=1e-2),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=1e-2),
}


def _train(opt_name, precondition, masks_fn, steps=5):
    net = convnet(channels=(3, 6, 8))
    names = ["3.weight", "8.weight"]
    opt = COUPLED[opt_name](net.parameters())
    so.SparseTraining(net, opt, {n: 0.5 for n in names}, masks=masks_fn(net, names),
                      preconditioner=so.SparseOpt(precondition_weight_decay=precondition))
    for step in range(steps):
        train_step(net, opt, step)
    return net.state_dict(), opt


@pytest.mark.parametrize("opt_name", sorted(COUPLED))
def test_with_factors_one_folding_the_decay_is_bit_identical_to_the_optimizer_own_decay(opt_name):
    """c ≡ 1 (homogeneous masks): D(g + λW) = g + λW, so the folded run must match the plain one exactly."""
    plain, _ = _train(opt_name, False, homogeneous_masks)
    folded, opt = _train(opt_name, True, homogeneous_masks)
    for key in plain:
        assert torch.equal(plain[key], folded[key]), key
    assert all(g["weight_decay"] > 0 for g in opt.param_groups)  # restored after every step


def _heterogeneous(maximize=False, momentum=0.0):
    net = mlp(widths=(10, 12, 4), norm=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=momentum, weight_decay=0.1, maximize=maximize)
    mask = row_mask([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 3, 3], 10)
    so.SparseTraining(net, opt, {"0.weight": 0.5}, masks={"0.weight": mask},
                      preconditioner=so.SparseOpt(precondition_weight_decay=True))
    k = mask.sum(1).double()
    c = torch.sqrt(k / k.mean()).float().unsqueeze(1)
    return net, opt, mask, c


@pytest.mark.parametrize("maximize", [False, True])
def test_the_update_is_lr_times_factor_times_gradient_plus_decay(maximize):
    net, opt, mask, c = _heterogeneous(maximize)
    w = net[0].weight
    before = w.detach().clone()
    loss = nn.functional.cross_entropy(net(torch.randn(32, 10)), torch.randint(0, 4, (32,)))
    (raw,) = torch.autograd.grad(loss, w, retain_graph=True)  # dense: backward leaves the corrected .grad
    loss.backward()
    last_before = net[3].weight.detach().clone()
    last_grad = net[3].weight.grad.clone()
    opt.step()
    sign = -1.0 if maximize else 1.0
    expected = 0.5 * c * mask * (sign * raw + 0.1 * before)
    assert torch.allclose(before - w.detach(), expected, atol=1e-6)
    # a dense parameter of the same group keeps plain coupled decay
    assert torch.allclose(last_before - net[3].weight.detach(), 0.5 * (sign * last_grad + 0.1 * last_before),
                          atol=1e-6)
    assert opt.param_groups[0]["weight_decay"] == 0.1


def test_momentum_accumulates_the_preconditioned_decay():
    net, opt, mask, c = _heterogeneous(momentum=0.9)
    w = net[0].weight
    before = w.detach().clone()
    loss = nn.functional.cross_entropy(net(torch.randn(32, 10)), torch.randint(0, 4, (32,)))
    (raw,) = torch.autograd.grad(loss, w, retain_graph=True)  # dense: backward leaves the corrected .grad
    loss.backward()
    opt.step()
    assert torch.allclose(opt.state[w]["momentum_buffer"], c * mask * (raw + 0.1 * before), atol=1e-6)


def test_decoupled_decay_is_left_alone_with_a_warning():
    results = []
    for precondition in (False, True):
        net = convnet(channels=(3, 6, 8))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            so.SparseTraining(net, opt, 0.5, preconditioner=so.SparseOpt(precondition_weight_decay=precondition))
        assert any("decoupled weight decay" in str(w.message) for w in caught) == precondition
        for step in range(3):
            train_step(net, opt, step)
        results.append(copy.deepcopy(net.state_dict()))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_no_weight_decay_at_all_is_reported():
    net = mlp()
    with pytest.warns(UserWarning, match="has no effect: no parameter group"):
        so.SparseTraining(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.5,
                          preconditioner=so.SparseOpt(precondition_weight_decay=True))


def test_config_key_reaches_the_preconditioner():
    from helpers import TINY
    from sparseopt.experiments.run.build import build_experiment
    from sparseopt.experiments.config.load import from_dict, merge
    from sparseopt.experiments.config.schema import RunConfig
    cfg = from_dict(RunConfig, merge(TINY, {"sparseopt": {"precondition_weight_decay": True}}))
    assert build_experiment(cfg).sparse.preconditioner.precondition_weight_decay is True
