"""Run many configurations, in parallel worker processes on CPU (one thread each), sequentially on a GPU.

With ``reuse``, a run folder that already holds a finished run of the same config is kept, and one that holds an
interrupted run of the same config is resumed from its checkpoint: a long grid can be stopped and restarted. A
folder holding a run of a *different* config is never replaced silently: every such folder is named, before any
run starts, and only ``overwrite`` (``reproduce --fresh``, ``demo --overwrite``) replaces runs.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from sparseopt.experiments.run.checkpoint import find_checkpoints
from sparseopt.experiments.config.load import ConfigError, from_dict, load_yaml, to_dict
from sparseopt.experiments.errors import UserError
from sparseopt.experiments.run.resume import config_changes, describe
from sparseopt.experiments.run.runlog import progress
from sparseopt.experiments.run.runner import RUN_MARKERS, train
from sparseopt.experiments.config.schema import RunConfig


def _state(cfg: RunConfig, out: str) -> str:
    """'done', 'partial' (resumable) or 'new' for the run of ``cfg`` in ``out``; UserError if ``out`` holds a
    run of another config (or one whose config cannot be read)."""
    folder = Path(out)
    if not any((folder / m).exists() for m in RUN_MARKERS):
        return "new"
    try:
        saved = to_dict(from_dict(RunConfig, load_yaml(folder / "config.yaml")))
    except UserError as err:
        raise UserError(f"{folder} holds a run whose config cannot be read ({str(err).splitlines()[0]}); move it "
                        "away, or pass --fresh to replace it") from None
    changes = config_changes(saved, to_dict(cfg))
    if changes:
        raise UserError(f"{folder} holds a run of a different config ({describe(changes)}); pass --fresh to "
                        "replace it, or choose another --out")
    if (folder / "results.json").is_file():
        return "done"
    return "partial" if find_checkpoints(folder / "checkpoints") else "new"


def _run(cfg: RunConfig, out: str, quiet: bool, state: str, overwrite: bool) -> str:
    if state != "done":
        train(cfg, out, overwrite=overwrite or state == "new", resume=state == "partial", quiet=quiet)
    return state


def _run_in_worker(cfg: RunConfig, out: str, state: str, overwrite: bool) -> str:
    import torch

    torch.set_num_threads(1)
    return _run(cfg, out, True, state, overwrite)


def _states(configs: list[RunConfig], run_dirs: list[str], reuse: bool, overwrite: bool) -> list[str]:
    """Every folder's state, all problems reported together before anything runs."""
    if overwrite or not reuse:
        if not overwrite:
            taken = [d for d in run_dirs if any((Path(d) / m).exists() for m in RUN_MARKERS)]
            if taken:
                raise ConfigError([f"{d} already holds a run; pass --overwrite to replace it" for d in taken])
        return ["new"] * len(configs)
    states, errors = [], []
    for cfg, out in zip(configs, run_dirs):
        try:
            states.append(_state(cfg, out))
        except UserError as err:
            errors.append(str(err))
    if errors:
        raise ConfigError(errors)
    return states


def run_many(configs: list[RunConfig], run_dirs: list[str], *, workers: int | None = None, quiet: bool = False,
             desc: str = "runs", reuse: bool = False, overwrite: bool = False) -> dict[str, int]:
    """Train every config into its folder; ``workers=1`` runs in this process (the GPU path). Returns how many
    runs were new, resumed ('partial') or kept ('done')."""
    workers = workers or min(2, os.cpu_count() or 1)
    states = _states(configs, run_dirs, reuse, overwrite)
    counts = {"new": 0, "partial": 0, "done": 0}
    with progress(total=len(configs), desc=desc, quiet=quiet) as bar:
        if workers == 1:  # in this process (GPU): each run shows its own step bar too
            for cfg, out, state in zip(configs, run_dirs, states):
                counts[_run(cfg, out, quiet, state, overwrite)] += 1
                bar.update(1)
            return counts
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_run_in_worker, c, d, s, overwrite) for c, d, s in zip(configs, run_dirs, states)]
            for future in as_completed(futures):
                counts[future.result()] += 1
                bar.update(1)
    return counts
