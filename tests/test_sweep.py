"""`sparseopt sweep --init-stds` and `sparseopt report SWEEP_DIR` (paper 004 Fig. 1/6) on tiny grids."""

from __future__ import annotations

import json
import math

import pytest

from sparseopt.cli import main
from sparseopt.experiments.studies.transfer import init_std_optimum, optimum_shift

TINY = ["--lrs", "0.001,0.01", "--densities", "1,0.25", "--steps", "3", "--base-width", "16", "--workers", "1"]


@pytest.fixture(scope="module")
def sigma_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sw"
    assert main(["sweep", "--out", str(out), "--kinds", "sp,supar", "--init-stds", "0.02,0.08", *TINY]) == 0
    return out


def test_sweep_rows_have_init_std(sigma_sweep, capsys):
    result = json.loads((sigma_sweep / "results.json").read_text())
    assert [r["kind"] for r in result["results"]] == ["sp", "supar"]
    rows = result["results"][1]["rows"]
    assert len(rows) == 2 * 2 * 2  # lrs x densities x init stds
    assert {r["init_std"] for r in rows} == {0.02, 0.08}
    assert result["results"][1]["config"]["init_stds"] == [0.02, 0.08]
    shift = result["optimum_shift"]["supar"]
    assert {(o["density"], o["init_std"]) for o in shift["optima"]} == {(d, s) for d in (1.0, 0.25)
                                                                       for s in (0.02, 0.08)}
    assert {s["init_std"] for s in shift["shifts"]} == {0.02, 0.08}
    best = result["init_std_optimum"]["supar"]
    assert {o["density"] for o in best["optima"]} == {1.0, 0.25}
    assert all(o["init_std"] in (0.02, 0.08) and o["lr"] in (0.001, 0.01) for o in best["optima"])
    assert set(best["shift_log2"]) == {"16"} and best["shift_log2"]["16"] in (0.0, 2.0)
    assert (sigma_sweep / "lr_sweep.png").stat().st_size > 1000
    assert (sigma_sweep / "init_std_sweep.png").stat().st_size > 1000


def test_report_on_sweep_folder(sigma_sweep, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(sigma_sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Best learning rate per density" in printed and "Best init std per density" in printed
    md = (out / "report.md").read_text()
    assert "| kind | width | density | init std σ | best LR (grid) |" in md
    # one optimum row per (kind, density, σ) and one σ row per (kind, density)
    assert md.count("| supar | 16 | 0.25 |") == 3 and md.count("| sp | 16 | 1 |") == 3
    assert "![lr_sweep](lr_sweep.png)" in md and "![init_std_sweep](init_std_sweep.png)" in md
    assert (out / "lr_sweep.png").stat().st_size > 1000 and (out / "init_std_sweep.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["init_std_optima"]


def test_report_on_sweep_without_sigma_axis(tmp_path, capsys):
    """Without --init-stds (and for sweeps written before the σ axis): no σ column, no σ plot; the default
    report folder is the sweep folder itself."""
    sw = tmp_path / "plain"
    assert main(["sweep", "--out", str(sw), "--kinds", "supar", *TINY]) == 0
    result = json.loads((sw / "results.json").read_text())
    assert all(r["init_std"] is None for r in result["results"][0]["rows"])
    assert "init_std_optimum" not in result and not (sw / "init_std_sweep.png").exists()
    for row in result["results"][0]["rows"]:  # an old results.json: rows without the field
        del row["init_std"]
    (sw / "results.json").write_text(json.dumps(result))
    assert main(["report", str(sw)]) == 0
    md = (sw / "report.md").read_text()
    assert "init std" not in md and md.count("| supar | 16 |") == 2 and (sw / "lr_sweep.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--init-stds", "0.02,-0.1"], "--init-stds must be positive"),
    (["--init-stds", "0"], "--init-stds must be positive"),
    (["--lrs", "0.01,-1"], "--lrs must be positive"),
    (["--densities", "1,1.5"], "--densities must be in (0, 1]"),
])
def test_sweep_bad_values_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert main(["sweep", "--out", str(out), "--kinds", "supar", "--steps", "2", "--base-width", "16",
                 "--workers", "1", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists()  # nothing trained or written


def test_report_mixing_sweep_and_run_is_an_error(sigma_sweep, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"final": {}, "name": "x", "seed": 0}))
    assert main(["report", str(sigma_sweep), str(run), "--out", str(tmp_path / "r")]) == 2
    assert "cannot mix sweep folders" in capsys.readouterr().err


def test_init_std_optimum_synthetic():
    """Best σ moves from 2^-5 at ρ=1 to 2^-3 at ρ=0.25 (two octaves); the LR optimum is per σ."""
    rows = []
    for d, best_s in ((1.0, -5), (0.25, -3)):
        for s in (-6, -5, -4, -3):
            for k, lr_best in ((-8, -8), (-7, -8), (-6, -8)):
                rows.append({"width": 8, "density": d, "init_std": 2.0 ** s, "lr": 2.0 ** k, "seed": 0,
                             "loss": (s - best_s) ** 2 + (k - lr_best) ** 2 + 1.0})
    res = {"kind": "supar", "rows": rows}
    best = init_std_optimum(res)
    assert [(o["density"], o["init_std"], o["lr"]) for o in best["optima"]] == [
        (0.25, 2.0 ** -3, 2.0 ** -8), (1.0, 2.0 ** -5, 2.0 ** -8)]
    assert best["shift_log2"][8] == pytest.approx(2.0)
    shift = optimum_shift(res)
    assert len(shift["optima"]) == 8 and len(shift["shifts"]) == 4
    assert shift["shift_log2"][8] == 0.0
    assert init_std_optimum({"kind": "sp", "rows": [{**r, "init_std": None} for r in rows]}) is None
    assert all(math.isfinite(o["loss"]) for o in best["optima"])
