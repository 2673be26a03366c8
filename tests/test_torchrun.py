"""`torchrun --nproc_per_node=2 -m sparseopt.cli train ...` on CPU (gloo) matches a single-process run."""

import json
import os
import subprocess
import sys

import torch
import yaml

from sparseopt.cli import main
from sparseopt.experiments.checkpoint import load_checkpoint

CONFIG = {
    "name": "ddp",
    "data": {"name": "synthetic", "batch_size": 32, "options": {"n_train": 256, "n_test": 64, "shape": [1, 6, 6],
                                                               "num_classes": 4}},
    # no BatchNorm: the mean of the two half-batch gradients is then exactly the full-batch gradient
    "model": {"name": "mlp", "options": {"hidden": [32], "norm": "none"}},
    "sparsity": {"method": "static", "density": 0.3},
    "sparseopt": {"enabled": True},
    "optim": {"lr": 0.05},
    "train": {"epochs": 2, "log_every": 4, "eval_every": 8},
    "logging": {"tensorboard": False},
}


def test_two_ranks_train_like_one_process(tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["train", str(config), "--out", str(single), "--quiet"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "sparseopt.cli", "train", str(config), "--out", str(multi), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((multi / "results.json").read_text())
    assert results["steps"] == 16
    a = load_checkpoint(single / "checkpoints" / "ckpt-00000016.pt")
    b = load_checkpoint(multi / "checkpoints" / "ckpt-00000016.pt")
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], atol=1e-5), name
    for name, mask in a["sparse"]["masks"].items():
        assert torch.equal(mask, b["sparse"]["masks"][name])
    lines = (multi / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))  # one writer
