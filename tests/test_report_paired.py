"""`sparseopt report` pairs configurations that differ in one setting over their shared seeds."""

import json

import yaml

from sparseopt.cli import main
from sparseopt.stats import paired_difference

from helpers import TINY


def test_report_prints_paired_differences_for_one_setting_apart(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "epochs": 1}}))
    variants = {"so": [], "base": ["--set", "sparseopt.enabled=false"],
                "two-apart": ["--set", "sparseopt.enabled=false", "--set", "optim.lr=0.2"]}
    dirs = {}
    for name, extra in variants.items():
        for seed in (0, 1, 2):
            out = tmp_path / f"{name}-{seed}"
            assert main(["train", str(config), "--out", str(out), "--quiet", "--set", f"name={name}",
                         "--set", f"train.seed={seed}", *extra]) == 0
            dirs[(name, seed)] = out
    assert main(["report", *map(str, dirs.values()), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "rep" / "report.json").read_text())
    pairs = {(r["a"], r["b"]): r for r in summary["paired"]}
    assert set(pairs) == {("so", "base"), ("base", "two-apart")}      # so vs two-apart differ in two settings
    assert pairs[("so", "base")]["setting"] == "sparseopt.enabled"
    assert pairs[("base", "two-apart")]["setting"] == "optim.lr"
    acc = {k: json.loads((d / "results.json").read_text())["final"]["test_accuracy"] for k, d in dirs.items()}
    expected = paired_difference([acc[("so", s)] for s in range(3)], [acc[("base", s)] for s in range(3)])
    assert pairs[("so", "base")]["mean"] == expected.mean and pairs[("so", "base")]["t"] == expected.t
    assert "| so | base | sparseopt.enabled: true → false | 3 |" in printed
    assert "Paired over shared seeds" in (tmp_path / "rep" / "report.md").read_text()
