"""Coordinate check and LR-sweep plumbing on a tiny GPT (statistical tolerances, 2 seeds)."""

import math

import pytest

from sparseopt.experiments.studies.coord_check import coord_check, plot_coord_check, spread
from sparseopt.experiments.studies.transfer import lr_sweep, optimum_shift, plot_lr_sweep

BLOCKS = ["blocks.0.attn", "blocks.0.ffn", "blocks.1.attn", "blocks.1.ffn"]


@pytest.fixture(scope="module")
def result():
    return coord_check(kinds=("sp", "mup", "supar"), widths=(32, 64), densities=(1.0, 0.5, 0.25), steps=4,
                       seeds=(0, 1), n_layer=2, d_head=16, ctx=32, batch_size=8)


def test_supar_flat_in_density_sp_and_mup_not(result):
    assert result["config"]["density_width"] == 64
    for step in (0, -1):
        supar = spread(result, "density", "supar", step=step, layers=BLOCKS)
        sp = spread(result, "density", "sp", step=step, layers=BLOCKS)
        mup = spread(result, "density", "mup", step=step, layers=BLOCKS)
        # density 1 -> 0.25: SP/μP block outputs shrink by >= sqrt(4) = 2 (measured ~5-50x); SuPar stays ~flat
        assert max(supar.values()) < 1.6, supar
        assert min(sp.values()) > 2.5, sp
        assert min(mup.values()) > 2.5, mup


def test_mup_flat_in_width_sp_not(result):
    mup = spread(result, "width", "mup", layers=BLOCKS + ["logits"])
    sp = spread(result, "width", "sp", layers=BLOCKS)
    assert max(mup.values()) < 1.6, mup
    assert min(sp.values()) > 1.8, sp
    # at density 1, SuPar is μP exactly
    assert result["width"]["supar"] == result["width"]["mup"]


def test_plots(result, tmp_path):
    assert plot_coord_check(result, tmp_path / "cc.png").stat().st_size > 1000


def test_lr_sweep_plumbing(tmp_path):
    res = lr_sweep("supar", [1e-3, 1e-2], [1.0, 0.5], base_width=16, steps=6, last=2, batch_size=2, ctx=8,
                   n_layer=1, d_head=8)
    assert len(res["rows"]) == 4 and all(math.isfinite(r["loss"]) for r in res["rows"])
    opt = optimum_shift(res)
    assert {o["density"] for o in opt["optima"]} == {1.0, 0.5}
    assert opt["shift_log2"][16] in (0.0, math.log2(10))
    assert plot_lr_sweep([res, res], tmp_path / "sweep.png").stat().st_size > 1000


def test_optimum_shift_synthetic():
    rows = []
    for d, best in ((1.0, -8), (0.25, -6)):
        for k in range(-10, -3):
            rows.append({"width": 8, "density": d, "lr": 2.0 ** k, "seed": 0, "loss": (k - best) ** 2 + 1.0})
    rows.append({"width": 8, "density": 0.25, "lr": 2.0 ** -3, "seed": 0, "loss": math.inf})
    out = optimum_shift({"kind": "sp", "rows": rows})
    assert out["shift_log2"][8] == pytest.approx(2.0)
    assert out["shift_log2_refined"][8] == pytest.approx(2.0)


def test_bad_inputs():
    with pytest.raises(ValueError):
        coord_check(kinds=("ntk",), widths=(32,), densities=(1.0,))
    with pytest.raises(ValueError):
        coord_check(widths=(30,), densities=(1.0,), d_head=16)
    with pytest.raises(ValueError):
        lr_sweep("sp", [], [1.0])
