"""SparseOpt(factor_source="batchnorm"): c_i = sigma_i / mean sigma from the BatchNorm the layer feeds."""

import copy
import warnings

import pytest
import torch
from torch import nn

import sparseopt as so
from sparseopt.health import loglog_slope
from sparseopt.masks import fan_in

from test_sparseopt import row_mask

FANS = [1, 2, 3, 4, 6, 8, 10, 13, 16, 20, 25, 32]


def test_factor_is_sigma_over_its_layer_mean_on_live_neurons():
    pre = so.SparseOpt(factor_source="batchnorm")
    mask = row_mask([2, 0, 3, 1], 4)
    c = pre.factors({"w": mask}, {"w": torch.tensor([1.0, 7.0, 2.0, 3.0])})["w"].flatten()
    assert torch.allclose(c, torch.tensor([0.5, 0.0, 1.0, 1.5], dtype=torch.float64))
    assert torch.equal(pre.factors({"w": mask})["w"].flatten(), torch.tensor([1.0, 0.0, 1.0, 1.0],
                                                                              dtype=torch.float64))


def test_forms_without_a_layer_mean_are_refused():
    with pytest.raises(ValueError, match="no normalize=False or mean_scope='global' form"):
        so.SparseOpt(factor_source="batchnorm", normalize=False)
    with pytest.raises(ValueError, match="factor_source 'bn'"):
        so.SparseOpt(factor_source="bn")


def _net(seed=0, inputs=40):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, len(FANS), bias=False), nn.BatchNorm1d(len(FANS)), nn.ReLU(),
                         nn.Linear(len(FANS), 3))


def _sparse(net, opt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the classifier is not followed by a BatchNorm: tested below
        return so.SparseTraining(net, opt, {"0.weight": 0.5, "3.weight": 0.5},
                                 masks={"0.weight": row_mask(FANS, 40), "3.weight": torch.ones(3, len(FANS))},
                                 preconditioner=so.SparseOpt(factor_source="batchnorm", **kw))


def test_the_step_uses_the_measured_sigma_of_the_batch():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    sparse = _sparse(net, opt)
    x, y = torch.randn(512, 40), torch.randint(0, 3, (512,))
    pre_activation = net[0](x).detach().double()
    nn.functional.cross_entropy(net(x), y).backward()
    w = net[0].weight
    before, raw = w.detach().clone(), w.grad.clone()
    opt.step()
    sigma = torch.sqrt(pre_activation.var(0, unbiased=False) + net[1].eps)
    c = (sigma / sigma.mean()).float().unsqueeze(1)
    assert torch.allclose(before - w.detach(), c * sparse.masks["0.weight"] * raw, atol=1e-6)
    # at initialisation the measured factor follows the fan-in prediction sqrt(k_i)
    measured = sparse.factors()["0.weight"].flatten()
    assert 0.4 < loglog_slope(fan_in(sparse.masks["0.weight"]), measured) < 0.6


def _train(extra_forward: bool, steps=6, split=None):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sparse = _sparse(net, opt, bn_momentum=0.3)
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        if split is not None and step == split:
            state = copy.deepcopy({"net": net.state_dict(), "opt": opt.state_dict(), "sparse": sparse.state_dict()})
            sparse.remove()
            net = _net()
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            sparse = _sparse(net, opt, bn_momentum=0.3)
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            sparse.load_state_dict(state["sparse"])
        x, y = torch.randn(64, 40, generator=g), torch.randint(0, 3, (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if extra_forward:  # a diagnostic pass in train mode between steps (its BatchNorm buffers restored)
            buffers = copy.deepcopy(net[1].state_dict())
            with torch.no_grad():
                net(torch.randn(64, 40) * 10)
            net[1].load_state_dict(buffers)
    return net.state_dict(), sparse.factors()["0.weight"]


def test_forward_passes_between_steps_do_not_change_the_factors_and_resume_is_exact():
    plain, c_plain = _train(False)
    probed, c_probed = _train(True)
    resumed, c_resumed = _train(False, split=3)
    assert torch.equal(c_plain, c_probed) and torch.equal(c_plain, c_resumed)
    for key in plain:
        assert torch.equal(plain[key], probed[key]) and torch.equal(plain[key], resumed[key]), key


def test_layers_without_a_following_batchnorm_are_named_and_keep_factor_one():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"no BatchNorm follows \['3.weight'\]"):
        sparse = so.SparseTraining(net, opt, {"0.weight": 0.5, "3.weight": 0.5},
                                   preconditioner=so.SparseOpt(factor_source="batchnorm"))
    nn.functional.cross_entropy(net(torch.randn(32, 40)), torch.randint(0, 3, (32,))).backward()
    opt.step()
    c = sparse.factors()["3.weight"]
    assert torch.equal(c, (fan_in(sparse.masks["3.weight"]) > 0).double().view(-1, 1))


def test_config_keys_reach_the_preconditioner():
    from helpers import TINY
    from sparseopt.experiments.run.build import build_experiment
    from sparseopt.experiments.config.load import from_dict, merge
    from sparseopt.experiments.config.schema import RunConfig
    cfg = from_dict(RunConfig, merge(TINY, {"sparsity": {"prune_first_layer": True},
                                            "sparseopt": {"factor_source": "batchnorm", "bn_momentum": 0.5,
                                                          "scope": "bn_followed"}}))
    pre = build_experiment(cfg).sparse.preconditioner
    assert pre.factor_source == "batchnorm" and pre.bn_momentum == 0.5


def test_bn_momentum_without_the_batchnorm_source_is_reported():
    with pytest.warns(UserWarning, match="bn_momentum=0.5\\) has no effect with factor_source='fan_in'"):
        so.SparseOpt(bn_momentum=0.5)
    from sparseopt.experiments.config.load import from_dict
    from sparseopt.experiments.run.preflight import ignored_settings
    from sparseopt.experiments.config.schema import RunConfig
    cfg = from_dict(RunConfig, {"sparseopt": {"enabled": True, "bn_momentum": 0.5}})
    assert any("sparseopt.bn_momentum 0.5 has no effect with sparseopt.factor_source 'fan_in'" in line
               for line in ignored_settings(cfg))
