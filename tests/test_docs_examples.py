"""What the README and configs/ promise must run: every shipped config validates, the quickstart trains."""

import runpy
from pathlib import Path

import pytest

from sparseopt.cli import main
from sparseopt.experiments.config.load import from_dict, load_yaml
from sparseopt.experiments.config.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = from_dict(RunConfig, load_yaml(path))
    assert cfg.name


def test_laptop_config_trains_through_the_cli(tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "mnist_mlp_rigl_sparseopt.yaml"), "--out", str(out), "--quiet",
                 "--set", "train.epochs=2"]) == 0
    assert (out / "results.json").is_file()


def test_quickstart_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    printed = capsys.readouterr().out
    accuracy = float(printed.strip().splitlines()[-1].split()[-1])
    assert "total" in printed and accuracy > 0.85
