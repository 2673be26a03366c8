"""Per-neuron health (sparseopt.health): dead neurons, row norms, BatchNorm sigma against fan-in, correction ratio."""

import pytest
import torch
import yaml
from torch import nn

import sparseopt as so
from sparseopt.cli import main
from sparseopt.health import correction_ratio, layer_health, loglog_slope

from helpers import TINY
from test_sparseopt import row_mask


def test_loglog_slope_recovers_a_power_law_and_refuses_a_constant_fan_in():
    k = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    assert loglog_slope(k, 3 * k ** 0.5) == pytest.approx(0.5)
    assert loglog_slope(k, 2 * k ** -1.25) == pytest.approx(-1.25)
    assert loglog_slope(torch.full((5,), 3.0), k) is None


def test_layer_health_counts_dead_neurons_and_compares_row_norms():
    w = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    mask = w != 0
    h = layer_health(w, mask)
    assert h["dead"] == 1 and h["norm_max"] == pytest.approx(5.0)
    assert h["norm_max_over_median"] == pytest.approx(5.0 / 2.0)  # live norms 5, 1, 2
    assert h["sigma_slope"] is None


def _bn_layer(fans, inputs=40, batch=4096, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(inputs, len(fans), bias=False), nn.BatchNorm1d(len(fans), momentum=None),
                        nn.ReLU(), nn.Linear(len(fans), 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sparse = so.SparseTraining(net, opt, {"0.weight": 0.5}, masks={"0.weight": row_mask(fans, inputs)},
                               preconditioner=so.SparseOpt())
    net(torch.randn(batch, inputs))  # train mode: with momentum=None the running var is this batch's variance
    return net, opt, sparse


def test_report_shows_the_batchnorm_sigma_following_sqrt_fan_in_at_initialisation():
    fans = [1, 2, 3, 4, 6, 8, 10, 13, 16, 20, 25, 32] * 2
    _, _, sparse = _bn_layer(fans)
    row = sparse.report().layers[0]
    assert row.batchnorm == "1"
    assert 0.4 < row.sigma_slope < 0.6          # theory: sigma_i ∝ sqrt(k_i)
    assert abs(row.gamma_slope) < 1e-12         # gamma is still 1 everywhere


def test_correction_ratio_is_the_norm_of_the_corrected_over_the_raw_masked_gradient():
    fans = [1, 3, 5, 9, 12, 20, 30, 40]
    net, opt, sparse = _bn_layer(fans)
    assert sparse.report().correction_ratio is None  # no gradient yet
    x, y = torch.randn(64, 40), torch.randint(0, 3, (64,))
    loss = nn.functional.cross_entropy(net(x), y)
    names, params = zip(*net.named_parameters())
    raw = dict(zip(names, torch.autograd.grad(loss, params, retain_graph=True)))  # dense; .grad is corrected
    loss.backward()
    mask = sparse.masks["0.weight"]
    opt.step()
    c = sparse.factors()["0.weight"].float()
    corrected = sum(float((g * mask * c).pow(2).sum()) if n == "0.weight" else float(g.pow(2).sum())
                    for n, g in raw.items())
    uncorrected = sum(float((g * mask).pow(2).sum()) if n == "0.weight" else float(g.pow(2).sum())
                      for n, g in raw.items())
    assert sparse.report().correction_ratio == pytest.approx((corrected / uncorrected) ** 0.5, rel=1e-5)
    assert correction_ratio([]) is None


def test_training_logs_neuron_health_and_report_plots_it(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--quiet", "--set", "diagnostics.scales_every=4",
                 "--set", "sparsity.prune_first_layer=true"]) == 0
    import json
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scales = [r for r in rows if r["split"] == "scales"]
    assert scales and all({"dead", "norm_max_over_median", "correction_ratio"} <= set(r) for r in scales)
    assert any(k.startswith("sigma_slope/") for k in scales[0])
    results = json.loads((out / "results.json").read_text())
    assert "norm_max_over_median" in results["sparsity"]["layers"][0]
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "health.png").read_bytes()[:4] == b"\x89PNG"
