"""Count the host-device synchronisations of a real training run on a GPU, per kind of step.

``torch.cuda.set_sync_debug_mode("warn")`` makes PyTorch warn at every synchronising CUDA call (``item()``,
blocking copies, ``nonzero``, ...). A ResNet-20 RigL+SparseOpt run (bf16, channels_last, synthetic CIFAR
shapes on the device) runs ``--steps`` steps with ``log_every`` 20, mask updates every 30 steps and one
evaluation at the end; each warning is assigned to the step whose code raised it. The per-step path is
expected to have none: syncs only at logging steps, mask-update steps, the evaluation and the checkpoint.

Run (GPU only):  python benchmarks/cuda_sync_check.py [--steps 120]
Exit status 1 if any ordinary step synchronised.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections import Counter

import torch

from sparseopt.experiments.config.load import from_dict
from sparseopt.experiments.run.runner import Runner
from sparseopt.experiments.config.schema import RunConfig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_sync_check: no CUDA device; nothing to check")
        return 0
    batch, log_every, update_every = 128, 20, 30
    cfg = from_dict(RunConfig, {
        "name": "sync-check",
        "data": {"name": "synthetic", "batch_size": batch,
                 "options": {"n_train": batch * args.steps, "n_test": 512, "shape": [3, 32, 32],
                             "num_classes": 100}},
        "model": {"name": "resnet20"},
        "sparsity": {"method": "rigl", "density": 0.1, "update_every": update_every},
        "sparseopt": {"enabled": True},
        "train": {"epochs": 1, "log_every": log_every, "eval_every": args.steps, "precision": "bf16",
                  "channels_last": True},
        "logging": {"tensorboard": False}})
    with tempfile.TemporaryDirectory() as out:
        runner = Runner(cfg, out, quiet=True)
        current = {"step": None}
        train_step = runner._train_step

        def step(*a):
            current["step"] = runner.step + 1
            return train_step(*a)

        runner._train_step = step
        syncs: Counter = Counter()
        original = warnings.showwarning

        def record(message, category, *rest, **kw):
            if "synchroniz" in str(message):
                syncs[current["step"]] += 1
            else:
                original(message, category, *rest, **kw)

        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                runner.run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    total = runner.exp.total_steps
    log_steps = {s for s in range(1, total + 1) if s % log_every == 0} | {total}
    # SparseTraining's step_count s is runner step s + 1; mask updates at step_count % update_every == 0
    update_steps = {s for s in range(1, total + 1) if (s - 1) % update_every == 0}
    kinds = Counter()
    for s, n in syncs.items():
        kind = ("outside the loop" if s is None else "logging/eval/checkpoint" if s in log_steps
                else "mask update" if s in update_steps else "ordinary step")
        kinds[kind] += n
    print(f"{total} steps; synchronising calls by kind of step: {dict(kinds)}")
    bad = {s: n for s, n in syncs.items() if s is not None and s not in log_steps and s not in update_steps}
    if bad:
        print(f"ordinary steps that synchronised: {dict(sorted(bad.items()))}")
        return 1
    print("no ordinary step synchronised")
    return 0


if __name__ == "__main__":
    sys.exit(main())
