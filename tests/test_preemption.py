"""Preemption: SIGTERM (what SLURM and Kubernetes send) stops a run like Ctrl-C, and --resume continues exactly."""

import json

import torch
import yaml
from helpers import TINY

from sparseopt.cli import main
from sparseopt.experiments.run.checkpoint import load_checkpoint


def write(tmp_path, name, config):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def last_checkpoint(run):
    return load_checkpoint(sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1])


def test_sigterm_checkpoints_exits_143_and_resume_is_bit_identical(tmp_path, capsys):
    model = {"name": "cli_models:counting_mlp"}
    straight = tmp_path / "straight"
    assert main(["train", write(tmp_path, "a.yaml", {**TINY, "model": model}), "--out", str(straight),
                 "--quiet"]) == 0
    preempted = tmp_path / "preempted"
    config = {**TINY, "model": {**model, "options": {"interrupt_at": 13, "signal_name": "SIGTERM"}}}
    assert main(["train", write(tmp_path, "b.yaml", config), "--out", str(preempted), "--quiet"]) == 143
    assert "interrupted by SIGTERM; checkpoint written" in capsys.readouterr().err
    assert 8 < last_checkpoint(preempted)["step"] < 24  # stopped after the step of the 13th forward
    saved = yaml.safe_load((preempted / "config.yaml").read_text())
    saved["model"]["options"] = {}  # the same network, no more signals (its counter restarts anyway)
    (preempted / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["train", "--resume", str(preempted), "--quiet"]) == 0
    a, b = last_checkpoint(straight), last_checkpoint(preempted)
    assert a["step"] == b["step"] == 24
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["sparse"]["masks"][k], b["sparse"]["masks"][k]) for k in a["sparse"]["masks"])
    assert json.loads((straight / "results.json").read_text())["final"] == \
        json.loads((preempted / "results.json").read_text())["final"]
