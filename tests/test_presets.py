"""Every reproduction preset expands to valid run configs at both scales; a laptop preset runs end to end."""

import json

import pytest

from sparseopt.cli import main
from sparseopt.experiments.errors import UserError
from sparseopt.experiments.studies.presets import expand, load_preset, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_expands_to_valid_configs(name):
    preset = load_preset(name)
    assert preset.laptop is not None and preset.full is not None
    for spec in (preset.laptop, preset.full):
        if preset.kind == "train":
            configs = expand(spec)
            names = {c.name for c in configs}
            assert len(configs) == len(names) * len(spec.seeds)
            assert all(c.train.seed in spec.seeds for c in configs)


def test_laptop_preset_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["reproduce", "paper000-table1", "--out", str(out), "--seeds", "0", "--workers", "1", "--quiet",
                 "--set", "train.epochs=1"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert {r["name"] for r in summary["rows"]} == {
        f"{v} density={d}" for v in ("rigl", "rigl+sparseopt", "rigl+sparseopt+lr-matched") for d in (0.2, 0.1)}
    assert "rigl+sparseopt density=0.1" in capsys.readouterr().out
    cfg = json.loads((out / "runs" / "rigl+sparseopt_density=0.1-seed0" / "results.json").read_text())["config"]
    assert cfg["sparseopt"]["normalize"] is False and cfg["sparsity"]["density"] == 0.1
    # as the papers: the input layer dense, SparseOpt only where a BatchNorm follows, method comparisons >= 5 seeds
    assert cfg["sparsity"]["prune_first_layer"] is False and cfg["sparseopt"]["scope"] == "bn_followed"
    matched = json.loads((out / "runs" / "rigl+sparseopt+lr-matched_density=0.1-seed0" / "results.json").read_text())
    assert matched["config"]["sparseopt"]["renormalize"] == "exact"
    assert all(len(load_preset(n).laptop.seeds) >= 5 for n in preset_names() if load_preset(n).kind == "train")


def test_unknown_preset_and_bad_override_are_named(tmp_path, capsys):
    assert main(["reproduce", "paper001-tabel2", "--dry-run"]) == 2
    assert "did you mean 'paper001-table2'" in capsys.readouterr().err
    assert main(["reproduce", "paper001-table2", "--dry-run", "--set", "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    with pytest.raises(UserError):
        load_preset("nope")


def test_rerunning_a_preset_keeps_finished_runs_and_resumes_interrupted_ones(tmp_path, capsys):
    out = tmp_path / "repro"
    args = ["reproduce", "paper000-table1", "--out", str(out), "--seeds", "0", "--workers", "1", "--quiet",
            "--set", "train.epochs=1"]
    assert main(args) == 0
    run = out / "runs" / "rigl+sparseopt_density=0.1-seed0"
    first = json.loads((run / "results.json").read_text())
    (run / "results.json").unlink()                    # as if this run had been stopped after its last checkpoint
    capsys.readouterr()
    assert main(args) == 0
    assert "0 trained, 1 resumed, 5 already finished" in capsys.readouterr().out
    assert json.loads((run / "results.json").read_text())["final"] == first["final"]
    assert main([*args, "--fresh"]) == 0
    assert "6 trained, 0 resumed, 0 already finished" in capsys.readouterr().out
