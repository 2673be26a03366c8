"""Shared helpers of the benchmark scripts: one thread, interleaved repetitions, medians, ratios, JSON results.

The machine these run on is small and shared (2 cores, other jobs), so every script
  * pins torch to one thread (``torch.set_num_threads(1)``), so contenders do not fight over cores;
  * warms every contender up before timing it;
  * interleaves the contenders inside each repetition (and rotates their order from one repetition to the next),
    so a slow phase of the machine hits all of them alike;
  * reports medians, and ratios against a baseline measured in the same run: the ratio of the medians and the
    median of the per-repetition (paired) ratios. The paired one is the more robust when the machine's speed drifts.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def setup_torch(threads: int = 1, seed: int = 0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


@dataclass
class Contender:
    """``prepare()`` runs untimed before every timed ``run()`` (e.g. to restore the state a run changes)."""

    name: str
    run: Callable[[], object]
    prepare: Callable[[], object] = lambda: None
    note: str = ""
    times: list[float] = field(default_factory=list)


def time_interleaved(contenders: Sequence[Contender], reps: int, warmup: int = 1,
                     progress: bool = True, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Run each contender ``warmup`` times untimed, then ``reps`` timed rounds; in round r the contenders run in
    the order rotated by r. Returns {name: [seconds per round]}. ``clock=time.thread_time`` counts this thread's CPU
    time only (not the time other jobs hold the core), for single-threaded CPU work on a shared machine."""
    n = len(contenders)
    for w in range(warmup):
        for c in contenders:
            c.prepare()
            c.run()
    for c in contenders:
        c.times = []
    for r in range(reps):
        order = [contenders[(i + r) % n] for i in range(n)]
        for c in order:
            c.prepare()
            gc.collect()
            gc.disable()
            try:
                t0 = clock()
                c.run()
                c.times.append(clock() - t0)
            finally:
                gc.enable()
        if progress:
            line = "  ".join(f"{c.name}={c.times[-1]:.4f}s" for c in contenders)
            print(f"  rep {r + 1:2d}/{reps}: {line}", file=sys.stderr, flush=True)
    return {c.name: list(c.times) for c in contenders}


def summarize(times: dict[str, list[float]], baseline: str) -> list[dict]:
    base = times[baseline]
    base_med = statistics.median(base)
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0], ts[0], ts[0]]
        paired = [t / b for t, b in zip(ts, base)]
        rows.append({
            "name": name,
            "median_s": med,
            "min_s": min(ts),
            "q1_s": q[0],
            "q3_s": q[2],
            "ratio_of_medians": med / base_med,
            "median_paired_ratio": statistics.median(paired),
            "times_s": ts,
        })
    return rows


def format_table(rows: list[dict], baseline: str, unit: str = "s", scale: float = 1.0) -> str:
    name_w = max(len("contender"), *(len(r["name"]) for r in rows))
    head = (f"{'contender':<{name_w}}  {'median ' + unit:>12}  {'min ' + unit:>12}  {'IQR ' + unit:>21}  "
            f"{'x ' + baseline[:14]:>16}  {'paired x':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        iqr = f"{r['q1_s'] * scale:.4f}-{r['q3_s'] * scale:.4f}"
        lines.append(f"{r['name']:<{name_w}}  {r['median_s'] * scale:>12.4f}  {r['min_s'] * scale:>12.4f}  "
                     f"{iqr:>21}  {r['ratio_of_medians']:>16.3f}  {r['median_paired_ratio']:>9.3f}")
    return "\n".join(lines)


def environment() -> dict:
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


class TimedStep:
    """One timed SGD training step (zero_grad, forward, cross-entropy, backward, step) on a fixed batch.
    Subclasses set ``model``, ``opt``, ``st`` (a SparseTraining or None), ``x`` and ``y``; ``prepare`` keeps a RigL
    schedule off its update steps, so every repetition times an ordinary step."""

    def prepare(self):
        if self.st is not None:
            self.st.step_count = 1

    def run(self):
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()
