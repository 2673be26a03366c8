"""Run many configurations, in parallel worker processes on CPU (one thread each), sequentially on a GPU.

With ``reuse``, a run folder that already holds a finished run of the same config is kept, and one that holds an
interrupted run of the same config is resumed from its checkpoint: a long grid can be stopped and restarted.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from sparseopt.experiments.configio import from_dict, load_yaml, to_dict
from sparseopt.experiments.errors import UserError
from sparseopt.experiments.runlog import progress
from sparseopt.experiments.runner import train
from sparseopt.experiments.schema import RunConfig


def _state(cfg: RunConfig, out: str) -> str:
    """'done', 'partial' (resumable) or 'new' for the run of ``cfg`` in ``out``."""
    folder = Path(out)
    try:
        same = to_dict(from_dict(RunConfig, load_yaml(folder / "config.yaml"))) == to_dict(cfg)
    except UserError:
        return "new"
    if not same:
        return "new"
    if (folder / "results.json").is_file():
        return "done"
    return "partial" if any((folder / "checkpoints").glob("ckpt-*.pt")) else "new"


def _run(cfg: RunConfig, out: str, quiet: bool, reuse: bool) -> str:
    state = _state(cfg, out) if reuse else "new"
    if state != "done":
        train(cfg, out, overwrite=state == "new", resume=state == "partial", quiet=quiet)
    return state


def _run_in_worker(cfg: RunConfig, out: str, reuse: bool) -> str:
    import torch

    torch.set_num_threads(1)
    return _run(cfg, out, True, reuse)


def run_many(configs: list[RunConfig], run_dirs: list[str], *, workers: int | None = None, quiet: bool = False,
             desc: str = "runs", reuse: bool = False) -> dict[str, int]:
    """Train every config into its folder; ``workers=1`` runs in this process (the GPU path). Returns how many
    runs were new, resumed ('partial') or kept ('done')."""
    workers = workers or min(2, os.cpu_count() or 1)
    counts = {"new": 0, "partial": 0, "done": 0}
    with progress(total=len(configs), desc=desc, quiet=quiet) as bar:
        if workers == 1:  # in this process (GPU): each run shows its own step bar too
            for cfg, out in zip(configs, run_dirs):
                counts[_run(cfg, out, quiet, reuse)] += 1
                bar.update(1)
            return counts
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_run_in_worker, c, d, reuse) for c, d in zip(configs, run_dirs)]
            for future in as_completed(futures):
                counts[future.result()] += 1
                bar.update(1)
    return counts
