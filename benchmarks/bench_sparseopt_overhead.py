"""Per-step cost of SparseOpt: a ResNet-20 CIFAR training step with masking only vs masking + SparseOpt.

Setting: ``sparseopt.models.resnet20`` (option-B shortcuts, 10 classes), a fixed random batch of 128 x 3x32x32,
cross-entropy, SGD(lr=0.1, momentum=0.9, weight_decay=5e-4), one thread. One timed "step" is
``zero_grad(); loss = CE(model(x), y); loss.backward(); optimizer.step()``.

Contenders (same initial weights, separate copies):
  dense         no SparseTraining: context only.
  masked        SparseTraining(density=0.1, ERK, topology=RigL(...)), no preconditioner. Only NON-update steps
                are timed (step_count is reset to 1 before every repetition; updates are every 100 steps).
  sparseopt     the same with ``preconditioner=SparseOpt()`` (scope "all").
The contenders are interleaved step by step: a repetition is one timed step of each contender, in an order rotated
from one repetition to the next (``--steps`` > 1 times that many consecutive steps per contender instead and
records their mean). Medians and paired ratios are over the repetitions. Goal: sparseopt / masked <= 1.02.

A second, finer measurement times the library's own per-step work alone: the optimizer pre- and post-step hooks
(``_before_step`` + ``_after_step``) with gradients present, for masked and sparseopt.

Run:  .venv/bin/python benchmarks/bench_sparseopt_overhead.py [--reps 41] [--steps 1]
Result: benchmarks/results/sparseopt_overhead.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Contender, format_table, setup_torch, summarize, time_interleaved, write_json  # noqa: E402

import sparseopt as so  # noqa: E402
from sparseopt.models import resnet20  # noqa: E402

BATCH = 128
GOAL = 1.02


class Trainer:
    def __init__(self, model: nn.Module, preconditioner: str | None, x: torch.Tensor, y: torch.Tensor,
                 steps: int) -> None:
        self.model, self.x, self.y, self.steps = model, x, y, steps
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.st = None
        if preconditioner is not None:
            self.st = so.SparseTraining(
                model, self.opt, density=0.1, distribution="erk",
                topology=so.RigL(update_every=100, drop_fraction=0.3, end_step=1_000_000),
                preconditioner=so.SparseOpt() if preconditioner == "sparseopt" else None)
        model.train()

    def prepare(self) -> None:
        if self.st is not None:
            self.st.step_count = 1
            assert not any(self.st.topology.is_update_step(self.st.step_count + i) for i in range(self.steps))

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss.item()

    def run(self) -> None:
        for _ in range(self.steps):
            self.step()


def hook_overhead(trainers: dict[str, Trainer], calls: int, reps: int) -> list[dict]:
    """Seconds per (pre-step hook + post-step hook) with gradients present, interleaved."""
    for t in trainers.values():
        t.prepare()
        t.opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(t.model(t.x), t.y).backward()

    def runner(t: Trainer):
        def run():
            st = t.st
            for _ in range(calls):
                st.step_count = 1
                st._before_step(t.opt, (), {})
                st._after_step(t.opt, (), {})
        return run

    contenders = [Contender(name, runner(t)) for name, t in trainers.items()]
    times = time_interleaved(contenders, reps=reps, warmup=1, progress=False)
    per_call = {name: [s / calls for s in ts] for name, ts in times.items()}
    return summarize(per_call, next(iter(trainers)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--steps", type=int, default=1, help="consecutive steps per contender per repetition")
    args = ap.parse_args(argv)
    setup_torch(1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    base = resnet20()
    trainers = {
        "dense": Trainer(copy.deepcopy(base), None, x, y, args.steps),
        "masked": Trainer(copy.deepcopy(base), "masked", x, y, args.steps),
        "sparseopt": Trainer(copy.deepcopy(base), "sparseopt", x, y, args.steps),
    }
    st = trainers["sparseopt"].st
    n_params = sum(p.numel() for p in base.parameters())
    print(f"ResNet-20 ({n_params:,} params, {len(st.params)} sparse weights, density 0.1 ERK), batch {BATCH}x3x32x32, "
          f"SGD momentum; {args.reps} reps x {args.steps} steps per contender, interleaved; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread")

    # the contenders in the order the goal is stated: masked is the baseline
    order = ["masked", "sparseopt", "dense"]
    contenders = []
    for name in order:
        t = trainers[name]
        contenders.append(Contender(name, t.run, t.prepare))
    times = time_interleaved(contenders, reps=args.reps, warmup=2)
    per_step = {name: [s / args.steps for s in ts] for name, ts in times.items()}
    rows = summarize(per_step, "masked")
    print()
    print("Training step time (ms per step; ratios against masked-only SparseTraining)")
    print(format_table(rows, "masked", unit="ms", scale=1e3))
    so_row = next(r for r in rows if r["name"] == "sparseopt")
    ok = so_row["ratio_of_medians"] <= GOAL and so_row["median_paired_ratio"] <= GOAL
    print(f"\nsparseopt / masked = {so_row['ratio_of_medians']:.3f} (ratio of medians), "
          f"{so_row['median_paired_ratio']:.3f} (median of paired ratios); goal <= {GOAL} for both: "
          f"{'met' if ok else 'MISSED'}")

    hooks = hook_overhead({k: trainers[k] for k in ("masked", "sparseopt")}, calls=20, reps=15)
    print("\nLibrary hooks alone (_before_step + _after_step), ms per training step")
    print(format_table(hooks, "masked", unit="ms", scale=1e3))
    step_med = next(r for r in rows if r["name"] == "masked")["median_s"]
    for r in hooks:
        print(f"  {r['name']}: hooks = {100 * r['median_s'] / step_med:.3f}% of a masked training step")
    added = hooks[1]["median_s"] - hooks[0]["median_s"]
    print(f"  SparseOpt's added per-step work: {added * 1e3:+.4f} ms = {100 * added / step_med:+.4f}% of a step "
          "(the whole-step ratio above is machine noise around this)")

    payload = {
        "setting": {"model": "sparseopt.models.resnet20", "batch": [BATCH, 3, 32, 32], "density": 0.1,
                    "distribution": "erk", "topology": "RigL(update_every=100), non-update steps only",
                    "optimizer": "SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)", "reps": args.reps,
                    "steps_per_rep": args.steps},
        "rows_per_step": rows, "hooks_per_step": hooks,
        "sparseopt_added_hook_s_per_step": added,
        "verdict": {"goal_sparseopt_over_masked_le_1_02": ok},
    }
    path = write_json("sparseopt_overhead", payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
