"""SparseTraining's own cost: per-step time over the same dense step, and its state's bytes over the parameters'.

Per step: the BatchNorm MLP 784-300-100-10 (the demo's; batch 128) and ResNet-20 (batch 128 x 3x32x32), SGD(lr 0.1,
momentum 0.9, weight decay 5e-4), density 0.1 ERK; contenders ``dense`` (no SparseTraining), ``static``,
``rigl`` (RigL(update_every=100), non-update steps: the step counter is reset to 1 before each) and ``rigl+so``
(+ SparseOpt). One timed step = zero_grad, forward, cross-entropy, backward, step. Interleaved, 1 thread, medians and
paired ratios against dense (benchmarks/common.py). Goal (issue 13): <= 1.03 for every contender.

Memory: ``sparseopt.memory.state_bytes`` of SparseTraining on ResNet-50 (density 0.1 ERK) for static, rigl,
rigl+so, after one mask update (so the grow-score scratch buffer exists), over the parameter bytes. Goal <= 0.5.

Run:  .venv/bin/python benchmarks/bench_core_overhead.py [--reps 41] [--only step|memory]
Result: benchmarks/results/core_overhead.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Contender, TimedStep, format_table, setup_torch, summarize,  # noqa: E402
                    time_interleaved, write_json)

import sparseopt as so  # noqa: E402
from sparseopt.memory import parameter_bytes, state_bytes  # noqa: E402
from sparseopt.models import resnet20, resnet50  # noqa: E402
from sparseopt.models.mlp import MLP  # noqa: E402

MODES = ("dense", "static", "rigl", "rigl+so")


def sparse_training(model, opt, mode):
    if mode == "dense":
        return None
    topology = so.Static() if mode == "static" else so.RigL(update_every=100, end_step=10**6)
    return so.SparseTraining(model, opt, density=0.1, distribution="erk", topology=topology,
                             preconditioner=so.SparseOpt() if mode == "rigl+so" else None)


class Trainer(TimedStep):
    def __init__(self, model, mode, x, y):
        self.model, self.x, self.y = model, x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.st = sparse_training(model, self.opt, mode)
        model.train()


def step_rows(name, base, x, y, reps):
    trainers = {m: Trainer(copy.deepcopy(base), m, x, y) for m in MODES}
    times = time_interleaved([Contender(m, t.run, t.prepare) for m, t in trainers.items()], reps=reps, warmup=3,
                             progress=False)
    rows = summarize(times, "dense")
    print(f"\n{name}: ms per training step, ratios against dense ({reps} reps, interleaved)")
    print(format_table(rows, "dense", unit="ms", scale=1e3))
    return rows


def memory_rows():
    torch.manual_seed(0)
    base = resnet50()
    params = parameter_bytes(base)
    out = {}
    for mode in MODES[1:]:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        st = sparse_training(model, opt, mode)
        if mode != "static":
            for p in st.params:
                p.param.grad = torch.randn_like(p.param)
            st.step_count = 0
            opt.step()   # one mask update: the grow-score scratch buffer now exists
        parts = state_bytes(st)
        out[mode] = {**parts, "parameter_bytes": params, "ratio": parts["total"] / params}
        cells = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in parts.items())
        print(f"ResNet-50 {mode:8s}: state {parts['total'] / 2**20:.1f} MiB = {parts['total'] / params:.3f}x the "
              f"{params / 2**20:.1f} MiB of parameters ({cells} MiB)")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--only", choices=["step", "memory"])
    args = ap.parse_args(argv)
    setup_torch(1)
    payload = {"reps": args.reps}
    if args.only != "memory":
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        mlp = MLP(784, [300, 100], 10, norm="batch")
        payload["bn_mlp"] = step_rows("BN MLP 784-300-100-10, batch 128", mlp, torch.randn(128, 784, generator=g),
                                      torch.randint(0, 10, (128,), generator=g), args.reps)
        payload["resnet20"] = step_rows("ResNet-20, batch 128", resnet20(), torch.randn(128, 3, 32, 32, generator=g),
                                        torch.randint(0, 10, (128,), generator=g), max(5, args.reps // 4))
    if args.only != "step":
        print()
        payload["memory_resnet50"] = memory_rows()
    print(f"\nwrote {write_json('core_overhead', payload)}")
    return payload


if __name__ == "__main__":
    main()
