"""The ImageNet-style pipeline through the runner: uint8 workers, persistent across epochs, normalised in the loader,
give the same training run with or without worker processes."""

import numpy as np
import torch
from PIL import Image

from sparseopt.experiments.config.load import from_dict
from sparseopt.experiments.run.runner import Runner
from sparseopt.experiments.config.schema import RunConfig


def write_folder(root):
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for c in range(3):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (28, 34, 3), dtype=np.uint8) + np.uint8(60 * c)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")


def config(root, workers):
    return from_dict(RunConfig, {
        "name": "folder", "data": {"name": "imagenet", "root": str(root), "batch_size": 8, "num_workers": workers,
                                   "options": {"crop_size": 16, "resize_size": 20}},
        "model": {"name": "cnn"}, "sparsity": {"method": "rigl", "density": 0.5, "update_every": 3},
        "optim": {"lr": 0.05}, "train": {"epochs": 2, "log_every": 2, "channels_last": True},
        "logging": {"tensorboard": False}})


def test_worker_processes_and_channels_last_train_the_same_run(tmp_path):
    write_folder(tmp_path / "data")
    runs = [Runner(config(tmp_path / "data", w), tmp_path / f"run{w}", quiet=True) for w in (0, 2)]
    results = [r.run() for r in runs]
    assert results[0]["steps"] == results[1]["steps"] == 10
    assert results[0]["final"] == results[1]["final"]
    a, b = (r.exp.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
