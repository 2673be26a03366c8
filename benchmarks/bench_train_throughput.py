"""Training throughput (images/s) of the runner's own step, dense vs RigL+SparseOpt, fp32 vs bf16, eager vs compiled.

What is timed: ``Runner._train_step`` -- the exact per-step path of ``sparseopt train`` (batch from the run's own
loader on the device, autocast, backward, GradScaler-free step with SparseTraining's hooks, LR schedule) --
``--steps`` consecutive steps per contender per repetition, with the device synchronised before and after.
Logging, evaluation and checkpoints are not in the timed steps.

Settings (all on synthetic in-memory data, no disk):
  resnet20  CIFAR shapes: 3x32x32, 100 classes, batch ``--batch20`` (default 128 on a GPU, 32 on a CPU)
  resnet50  ImageNet shapes: 3x224x224, 1000 classes, batch ``--batch50`` (default 256 on a GPU, 4 on a CPU)
Contenders per model:
  dense / rigl+so   sparsity.method dense, or RigL (density 0.1, ERK, update_every 100) + SparseOpt
  fp32 / bf16       train.precision fp32 with NCHW batches, or bf16 with channels_last (the full presets)
  eager / compiled  train.compile false / true (compilation happens in the untimed warm-up)
Mask updates (every 100 steps) fall into the timed steps as often as in a real run.

Run:  .venv/bin/python benchmarks/bench_train_throughput.py [--models resnet20,resnet50] [--reps 5] [--steps 5]
          [--compile resnet20] [--precisions fp32,bf16]
Result: benchmarks/results/train_throughput.json. Ratios (sparse/dense, bf16/fp32, compiled/eager) are paired
within each repetition, so they come from the same phase of the machine.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Contender, setup_torch, time_interleaved, write_json  # noqa: E402

from sparseopt.experiments.config.load import from_dict  # noqa: E402
from sparseopt.experiments.run.runner import Runner  # noqa: E402
from sparseopt.experiments.config.schema import RunConfig  # noqa: E402

SHAPES = {"resnet20": ([3, 32, 32], 100), "resnet50": ([3, 224, 224], 1000)}
METHODS = {"dense": {"sparsity": {"method": "dense"}},
           "rigl+so": {"sparsity": {"method": "rigl", "density": 0.1, "update_every": 100},
                       "sparseopt": {"enabled": True}}}
PRECISIONS = {"fp32": {"precision": "fp32", "channels_last": False},
              "bf16": {"precision": "bf16", "channels_last": True}}


def run_config(model: str, method: str, precision: str, compiled: bool, batch: int, device: str) -> RunConfig:
    shape, classes = SHAPES[model]
    return from_dict(RunConfig, {
        "name": f"{model}-{method}-{precision}-{'compiled' if compiled else 'eager'}",
        "data": {"name": "synthetic", "batch_size": batch, "test_batch_size": batch,
                 "options": {"n_train": 4 * batch, "n_test": batch, "shape": shape, "num_classes": classes}},
        "model": {"name": model}, **METHODS[method],
        "optim": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "train": {"epochs": 1000, "log_every": 4000, "device": device, "compile": compiled,
                  **PRECISIONS[precision]},
        "logging": {"tensorboard": False, "formats": []}})


class Loop:
    """A Runner built as ``sparseopt train`` builds it, stepped through its own ``_train_step``."""

    def __init__(self, cfg: RunConfig, out: Path, steps: int) -> None:
        self.runner = Runner(cfg, out, quiet=True)
        self.runner.exp.model.train()
        self.steps, self.batches = steps, self._batches()
        self.images = steps * cfg.data.batch_size

    def _batches(self):
        while True:
            yield from self.runner.exp.data.train

    def run(self) -> None:
        sync(self.runner.exp.device)
        for _ in range(self.steps):
            x, y = next(self.batches)
            self.runner._train_step(x, y, False)
        sync(self.runner.exp.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repetitions of time(den)/time(num) = throughput(num)/throughput(den)."""
    return statistics.median(d / n for n, d in zip(times[num], times[den]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet20,resnet50")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--compile", default="resnet20", help="models also timed compiled ('' for none)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="steps per contender per repetition")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per contender (compilation included)")
    ap.add_argument("--batch20", type=int, default=None)
    ap.add_argument("--batch50", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    setup_torch(threads=args.threads)
    batches = {"resnet20": args.batch20 or (128 if cuda else 32), "resnet50": args.batch50 or (256 if cuda else 4)}
    models, precisions = args.models.split(","), args.precisions.split(",")
    compiled_models = [m for m in args.compile.split(",") if m]
    report, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            contenders, loops = [], []
            for method, precision, compiled in itertools.product(METHODS, precisions, (False, True)):
                if compiled and model not in compiled_models:
                    continue
                cfg = run_config(model, method, precision, compiled, batches[model], device)
                loop = Loop(cfg, Path(tmp) / cfg.name, args.steps)
                contenders.append(Contender(f"{method} {precision} {'compiled' if compiled else 'eager'}",
                                            loop.run, note=cfg.name))
                loops.append(loop)
            print(f"\n{model}: batch {batches[model]} on {device}, {args.steps} steps x {args.reps} reps",
                  file=sys.stderr, flush=True)
            for loop in loops:  # warm-up (and compilation) one at a time, untimed
                for _ in range(args.warmup):
                    loop.runner._train_step(*next(loop.batches), False)
                sync(loop.runner.exp.device)
            times = time_interleaved(contenders, reps=args.reps, warmup=0)
            images = loops[0].images
            throughput = {name: images / statistics.median(ts) for name, ts in times.items()}
            ratios = {}
            for precision, mode in itertools.product(precisions, ("eager", "compiled")):
                s, d = f"rigl+so {precision} {mode}", f"dense {precision} {mode}"
                if s in times:
                    ratios[f"sparse/dense {precision} {mode}"] = paired(times, s, d)
            if {"fp32", "bf16"} <= set(precisions):
                for method, mode in itertools.product(METHODS, ("eager", "compiled")):
                    if f"{method} bf16 {mode}" in times:
                        ratios[f"bf16/fp32 {method} {mode}"] = paired(times, f"{method} bf16 {mode}",
                                                                      f"{method} fp32 {mode}")
            for method, precision in itertools.product(METHODS, precisions):
                if f"{method} {precision} compiled" in times:
                    ratios[f"compiled/eager {method} {precision}"] = paired(
                        times, f"{method} {precision} compiled", f"{method} {precision} eager")
            report[model] = {"batch": batches[model], "device": device, "images_per_s": throughput,
                             "paired_ratios": ratios, "times_s": times}
            rows.append((model, throughput, ratios))
    for model, throughput, ratios in rows:
        print(f"\n{model} (batch {batches[model]}, {device}): images/s, median of {args.reps} reps")
        for name, ips in throughput.items():
            print(f"  {name:<26} {ips:10.1f}")
        for name, ratio in ratios.items():
            print(f"  {name:<34} {ratio:6.3f}")
    path = write_json("train_throughput", {"settings": vars(args), "results": report})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
