"""The main job: dense vs RigL vs RigL+SparseOpt at 95% sparsity on the embedded MNIST subset, over seeds."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

from sparseopt.experiments.run.checkpoint import atomic_write
from sparseopt.experiments.config.load import to_dict
from sparseopt.experiments.errors import UserError
from sparseopt.experiments.run.preflight import check_output_folder
from sparseopt.experiments.report.runs import make_report
from sparseopt.experiments.studies.batch import run_many
from sparseopt.experiments.config.schema import RunConfig

DEMO_DENSITY = 0.05


def demo_configs(seeds: list[int], epochs: float) -> list[RunConfig]:
    """Three methods × seeds on a BatchNorm MLP (784-300-100-10); identical except for the sparse-training switches."""
    base = RunConfig()
    base.data.batch_size = 128
    base.model.name, base.model.options = "mlp", {"hidden": [300, 100], "norm": "batch"}
    base.optim.lr, base.optim.weight_decay, base.optim.warmup_epochs = 0.1, 5e-4, 0.5
    base.train.epochs, base.train.log_every = epochs, 5
    base.train.eval_every = 16
    base.logging.tensorboard = False
    base.sparsity.density, base.sparsity.update_every = DEMO_DENSITY, 16
    base.sparsity.prune_first_layer = True
    methods = {"dense": ("dense", False), "rigl": ("rigl", False), "rigl+sparseopt": ("rigl", True)}
    configs = []
    for name, (method, sparseopt) in methods.items():
        for seed in seeds:
            cfg = copy.deepcopy(base)
            cfg.name, cfg.sparsity.method, cfg.sparseopt.enabled, cfg.train.seed = name, method, sparseopt, seed
            configs.append(cfg)
    return configs


def _paired_difference(rows_by_run: dict[tuple[str, int], float], a: str, b: str) -> tuple[float, float, int]:
    seeds = sorted(s for (n, s) in rows_by_run if n == a and (b, s) in rows_by_run)
    diffs = [rows_by_run[(a, s)] - rows_by_run[(b, s)] for s in seeds]
    return statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0, len(diffs)


def run_demo(out: str | Path, *, seeds: int = 5, epochs: float = 20.0, workers: int | None = None,
             overwrite: bool = False, quiet: bool = False) -> dict:
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    out = Path(out)
    check_output_folder(out)
    if (out / "results.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a demo (results.json); pass --overwrite to replace it")
    configs = demo_configs(list(range(seeds)), epochs)
    run_dirs = [str(out / "runs" / f"{c.name}-seed{c.train.seed}") for c in configs]
    run_many(configs, run_dirs, workers=workers, quiet=quiet, desc="demo runs", overwrite=overwrite)
    report = make_report(run_dirs, out, target=0.9)
    finals = {}
    for d in run_dirs:
        r = json.loads((Path(d) / "results.json").read_text())
        finals[(r["name"], r["seed"])] = r["final"]["test_accuracy"]
    diff, sd, n = _paired_difference(finals, "rigl+sparseopt", "rigl")
    summary = {"density": DEMO_DENSITY, "epochs": epochs, "seeds": seeds, "rows": report["rows"],
               "sparseopt_minus_rigl": {"mean": diff, "sd": sd, "pairs": n}, "table": report["table"],
               "configs": [to_dict(c) for c in configs[::seeds]]}
    with atomic_write(out / "results.json") as f:
        json.dump(summary, f, indent=2)
    return summary
