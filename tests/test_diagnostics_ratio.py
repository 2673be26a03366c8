"""BN gradient-ratio experiment (SPEC 7): engine correctness against nn.Module autograd, and the acceptance run on
the real MNIST subset (BN ratio within 6% of 1/sqrt(1-s) for s <= 0.95, no-norm within 6% of 1, >= 10 seeds)."""

import math

import pytest
import torch
from torch import nn

from sparseopt.data import load_mnist_subset
from sparseopt.diagnostics import (format_table, gradient_ratio_experiment, per_neuron_ratio_experiment,
                                   plot_gradient_ratio)
from sparseopt.diagnostics import gradient_ratio as gr

SPARSITIES = (0.5, 0.8, 0.9, 0.95)


@pytest.fixture(scope="module")
def mnist():
    x, y, _, _ = load_mnist_subset()
    return x, y


@pytest.fixture(scope="module")
def result(mnist):
    return gradient_ratio_experiment(*mnist, SPARSITIES, norms=("batch", "none", "layer"), seeds=range(10))


def _row(result, norm, s):
    return next(r for r in result["rows"] if r["norm"] == norm and r["s"] == s)


@pytest.mark.parametrize("s", SPARSITIES)
def test_batchnorm_ratio_follows_inverse_sqrt_density(result, s):
    row = _row(result, "batch", s)
    assert len(row["per_seed"]) == 10
    assert row["mean"] == pytest.approx(1 / math.sqrt(1 - s), rel=0.06)
    assert row["theory"] == pytest.approx(1 / math.sqrt(1 - s))


@pytest.mark.parametrize("s", SPARSITIES)
def test_no_norm_ratio_stays_near_one(result, s):
    row = _row(result, "none", s)
    assert row["mean"] == pytest.approx(1.0, rel=0.06)
    assert row["theory"] == 1.0


@pytest.mark.parametrize("s", SPARSITIES)
def test_layernorm_uniform_sparsity_is_a_pure_magnitude_change(result, s):
    assert _row(result, "layer", s)["mean"] == pytest.approx(1 / math.sqrt(1 - s), rel=0.08)


def test_loglog_slopes_and_batch_averaging_variants_agree(result):
    assert result["slopes"]["batch"] == pytest.approx(-0.5, abs=0.04)
    assert abs(result["slopes"]["none"]) < 0.04
    for r in result["rows"]:
        assert r["mean_of_batch_ratios"] == pytest.approx(r["mean"], rel=0.02)
        assert r["sd"] > 0


def test_table_and_plot(result, tmp_path):
    table = format_table(result)
    assert "0.950" in table and "R batch" in table and "slope" in table
    path = plot_gradient_ratio(result, tmp_path / "ratio.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_neuron_ratios_track_each_neurons_sparsity_only_behind_batchnorm(mnist, tmp_path):
    res = per_neuron_ratio_experiment(*mnist, (0.5, 0.98), norms=("batch", "none"), seeds=range(4), batches=50)
    bn, none = res["norms"]["batch"], res["norms"]["none"]
    assert bn["corr_with_amplification"] > 0.8
    assert bn["normalized_mean"] == pytest.approx(1.0, abs=0.05)      # R_i * sqrt(1 - s_i) ~ 1
    assert abs(none["corr_with_amplification"]) < 0.3
    s_i = torch.tensor(bn["s_i"])
    assert s_i.shape == (4, 64) and 0.49 < float(s_i.min()) and float(s_i.max()) < 0.99
    assert plot_gradient_ratio({"rows": [], "norms": [], "sparsities": [0.5], "seeds": [0], "batches": 1},
                               tmp_path / "n.png", per_neuron=res).exists()


@pytest.mark.parametrize("norm", gr.NORMS)
def test_batched_engine_matches_nn_module_autograd(mnist, norm):
    """The stacked, hand-batched computation equals the plain model's first-layer gradient, batch by batch."""
    x, y = gr._flatten(*mnist)
    gen = torch.Generator().manual_seed(3)
    params = gr._init(784, gen)
    masks = torch.stack([gr.random_mask((64, 784), 5000, gen), gr.random_mask((64, 784), 20000, gen)])[None]
    idx = gr._minibatches(len(x), 3, 16, gen)[None]
    dense, sparse = gr._abs_grad_sums(x, y, idx, [params], masks, [norm], chunk=2)[norm]
    for k in range(2):
        for b in range(3):
            xb, yb = x[idx[0, b]], y[idx[0, b]]
            for which, mult, got in (("dense", torch.ones(64, 784), dense), ("sparse", masks[0, k].float(), sparse)):
                norm_layer = {"batch": nn.BatchNorm1d(64), "layer": nn.LayerNorm(64), "none": nn.Identity()}[norm]
                net = nn.Sequential(nn.Linear(784, 64), norm_layer, nn.ReLU(), nn.Linear(64, 10)).train()
                with torch.no_grad():
                    net[0].weight.copy_(params[0] * mult)
                    net[0].bias.copy_(params[1])
                    net[3].weight.copy_(params[2])
                    net[3].bias.copy_(params[3])
                nn.functional.cross_entropy(net(xb), yb).backward()
                want = (net[0].weight.grad.abs() * masks[0, k]).sum(1)
                torch.testing.assert_close(got[0, k, b], want, rtol=1e-4, atol=1e-7, msg=f"{which} k={k} b={b}")


def test_deterministic_and_leaves_global_rng_alone(mnist):
    state = torch.get_rng_state()
    a = gradient_ratio_experiment(*mnist, (0.9,), norms=("batch",), seeds=[1, 2], batches=4)
    b = gradient_ratio_experiment(*mnist, (0.9,), norms=("batch",), seeds=[1, 2], batches=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert a["rows"][0]["per_seed"] == b["rows"][0]["per_seed"]
    assert a["rows"][0]["per_seed"][0] != a["rows"][0]["per_seed"][1]


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsities": (1.0,)}, r"\[0, 1\)"),
    ({"sparsities": (-0.1,)}, r"\[0, 1\)"),
    ({"sparsities": (0.5,), "norms": ("group",)}, "unknown norms"),
    ({"sparsities": (0.5,), "batch_size": 10**6}, "batch_size"),
])
def test_bad_input(mnist, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gradient_ratio_experiment(*mnist, **kwargs)


def test_zero_sparsity_gives_ratio_exactly_one(mnist):
    res = gradient_ratio_experiment(*mnist, (0.0,), norms=("batch", "none"), seeds=[0], batches=3)
    for r in res["rows"]:
        assert r["mean"] == pytest.approx(1.0, rel=1e-6)
