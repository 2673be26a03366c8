"""Run many configurations, in parallel worker processes on CPU (one thread each), sequentially on a GPU."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed

from sparseopt.experiments.runlog import progress
from sparseopt.experiments.runner import train
from sparseopt.experiments.schema import RunConfig


def _train_quietly(cfg: RunConfig, out: str) -> str:
    import torch

    torch.set_num_threads(1)
    train(cfg, out, overwrite=True, quiet=True)
    return out


def run_many(configs: list[RunConfig], run_dirs: list[str], *, workers: int | None = None, quiet: bool = False,
             desc: str = "runs") -> None:
    """Train every config into its folder; ``workers=1`` runs in this process (the GPU path)."""
    workers = workers or min(2, os.cpu_count() or 1)
    with progress(total=len(configs), desc=desc, quiet=quiet) as bar:
        if workers == 1:  # in this process (GPU): each run shows its own step bar too
            for cfg, out in zip(configs, run_dirs):
                train(cfg, out, overwrite=True, quiet=quiet)
                bar.update(1)
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_train_quietly, c, d) for c, d in zip(configs, run_dirs)]
            for future in as_completed(futures):
                future.result()
                bar.update(1)
