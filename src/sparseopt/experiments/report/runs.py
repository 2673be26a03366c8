"""Compare finished runs: a markdown table and PNG curves, runs that differ only in seed pooled into mean ± band."""

from __future__ import annotations

import json
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

from sparseopt.experiments.run.checkpoint import atomic_write
from sparseopt.experiments.errors import UserError
from sparseopt.experiments.run.preflight import ConfigWarning, check_output_folder
from sparseopt.experiments.report.eos import plot_itop, plot_sharpness
from sparseopt.experiments.report.health import plot_health
from sparseopt.experiments.report.paired import paired_comparisons, paired_table
from sparseopt.experiments.run.runlog import read_jsonl
from sparseopt.figures import save_png


@dataclass
class Run:
    path: Path
    name: str
    seed: int
    results: dict
    train: list[tuple[int, float]]   # (step, train loss)
    test: list[tuple[int, float]]    # (step, test accuracy)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    results_file = path / "results.json"
    if not results_file.is_file():
        what = "does not exist" if not path.exists() else f"is not a finished run: {results_file} is missing"
        raise UserError(f"{path} {what} (train it first, or --resume it)")
    try:
        results = json.loads(results_file.read_text())
        rows = read_jsonl(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"cannot read run {path}: {str(err).splitlines()[0]}") from err
    missing = [k for k in ("name", "seed", "final", "best", "config", "wall_time") if k not in results] \
        if isinstance(results, dict) else ["name"]
    if missing:
        raise UserError(f"{results_file} is not the results.json of a sparseopt run (no {', '.join(missing)})")
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]
    test = [(r["step"], r["accuracy"]) for r in rows if r.get("split") == "test"]
    return Run(path, results["name"], results["seed"], results, train, test)


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Every run, or one UserError naming every folder that cannot be reported (one line each)."""
    runs, errors, seen = [], [], {}
    for p in paths:
        resolved = Path(p).resolve()
        if resolved in seen:
            also = f" (also as {seen[resolved]})" if str(seen[resolved]) != str(p) else ""
            errors.append(f"{p} is given twice{also}: it would count as two seeds")
            continue
        seen[resolved] = p
        try:
            runs.append(load_run(p))
        except UserError as err:
            errors.append(str(err))
    copies, same_training = {}, {}
    for run in runs:  # copies of one run pooled as two seeds would fake a smaller spread
        key = (json.dumps(run.results["config"], sort_keys=True), run.seed)
        if key in copies:
            errors.append(f"{run.path} and {copies[key].path} are the same configuration and seed "
                          f"({run.name!r}, seed {run.seed}): pooling them would count one seed twice")
            continue
        copies[key] = run
        twin = same_training.setdefault((_without_seed(run.results["config"]), run.seed), run)
        if twin is not run:  # e.g. one run with diagnostics, one without: the same training, pooled
            warnings.warn(f"{run.path} and {twin.path} train the same configuration with the same seed "
                          f"({run.name!r}, seed {run.seed}; they differ only in logging/diagnostics): they are "
                          "pooled as two seeds", ConfigWarning, stacklevel=2)
    if errors:
        raise UserError("\n".join(errors))
    return runs


def _without_seed(config: dict) -> str:
    """The config minus what does not change training: the seed, logging and measurement settings."""
    config = json.loads(json.dumps(config))
    config.get("train", {}).pop("seed", None)
    config.pop("logging", None)
    config.pop("diagnostics", None)
    return json.dumps(config, sort_keys=True)


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Pool runs whose configs differ only in ``train.seed``; same-named runs with other differences stay apart."""
    by_config: dict[str, list[Run]] = {}
    for run in runs:
        by_config.setdefault(_without_seed(run.results["config"]), []).append(run)
    groups: dict[str, list[Run]] = {}
    for members in by_config.values():
        label = members[0].name
        while label in groups:
            label += "'"
        groups[label] = sorted(members, key=lambda r: r.seed)
    return groups


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def steps_to(run: Run, target: float) -> int | None:
    return next((step for step, acc in run.test if acc >= target), None)


def summarize(groups: dict[str, list[Run]], target: float) -> list[dict]:
    rows = []
    for label, runs in groups.items():
        final = _mean_sd([r.results["final"]["test_accuracy"] for r in runs])
        best = _mean_sd([r.results["best"]["test_accuracy"] for r in runs])
        reached = [s for s in (steps_to(r, target) for r in runs) if s is not None]
        sparsity = runs[0].results.get("sparsity")
        rows.append({
            "name": label, "seeds": [r.seed for r in runs],
            "density": sparsity["density"] if sparsity else 1.0,
            "itop": statistics.fmean(r.results["sparsity"]["itop"] for r in runs) if sparsity else None,
            "final_test_accuracy": final[0], "final_test_accuracy_sd": final[1],
            "best_test_accuracy": best[0], "best_test_accuracy_sd": best[1],
            "steps_to_target": statistics.fmean(reached) if reached else None,
            "runs_reaching_target": len(reached),
            "wall_time": statistics.fmean(r.results["wall_time"] for r in runs),
        })
    return rows


def markdown_table(rows: list[dict], target: float) -> str:
    head = ["run", "seeds", "density", "final test acc", "best test acc", f"steps to {target:.1%}", "ITOP",
            "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        reach = (f"{r['steps_to_target']:.0f} ({r['runs_reaching_target']}/{len(r['seeds'])})"
                 if r["steps_to_target"] is not None else f"not reached (0/{len(r['seeds'])})")
        lines.append("| " + " | ".join([
            r["name"], str(len(r["seeds"])), f"{r['density']:.3f}",
            f"{r['final_test_accuracy']:.4f} ± {r['final_test_accuracy_sd']:.4f}",
            f"{r['best_test_accuracy']:.4f} ± {r['best_test_accuracy_sd']:.4f}", reach,
            "-" if r["itop"] is None else f"{r['itop']:.3f}", f"{r['wall_time']:.1f} s"]) + " |")
    return "\n".join(lines)


def _band(series: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean and ±1 sd over seeds at the steps every seed logged."""
    common = sorted(set.intersection(*(set(s for s, _ in one) for one in series)))
    lookup = [dict(one) for one in series]
    mean, low, high = [], [], []
    for step in common:
        m, sd = _mean_sd([d[step] for d in lookup])
        mean.append(m)
        low.append(m - sd)
        high.append(m + sd)
    return common, mean, low, high


def plot_curves(groups: dict[str, list[Run]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, ylabel, filename, log in (("train", "train loss", "train_loss.png", True),
                                       ("test", "test accuracy", "test_accuracy.png", False)):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label, runs in groups.items():
            series = [getattr(r, key) for r in runs if getattr(r, key)]
            if not series:
                continue
            steps, mean, low, high = _band(series)
            line, = ax.plot(steps, mean, label=f"{label} (n={len(series)})")
            if len(series) > 1:
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{ylabel}: mean ± 1 sd over seeds")
        fig.tight_layout()
        path = out_dir / filename
        save_png(fig, path)
        written.append(path)
    return written


def make_report(run_dirs: list[str | Path], out_dir: str | Path, target: float = 0.9) -> dict:
    """Write report.md, report.json and the PNG plots into ``out_dir``; return the summary rows and table.

    Sweep folders (`sparseopt sweep`) go to :func:`sparseopt.experiments.report.sweep.make_sweep_report`."""
    if not run_dirs:
        raise UserError("give at least one run folder to report on")
    from sparseopt.experiments.report.sweep import is_sweep_dir, make_sweep_report
    if any(is_sweep_dir(p) for p in run_dirs):  # `sparseopt sweep` folders: paper 004 Fig. 1/6 report
        return make_sweep_report(run_dirs, out_dir)
    if not 0 < target <= 1:
        raise UserError(f"--target is an accuracy in (0, 1], got {target}")
    runs = load_runs(run_dirs)
    groups = group_runs(runs)
    rows = summarize(groups, target)
    paired = paired_comparisons(groups)
    table = (f"{markdown_table(rows, target)}\n\nPaired over shared seeds (configurations differing in one "
             f"setting):\n\n{paired_table(paired)}")
    out_dir = Path(out_dir)
    check_output_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(groups, out_dir)
    plots += [p for p in (plot_sharpness(groups, out_dir), plot_itop(groups, out_dir), plot_health(groups, out_dir))
              if p is not None]
    with atomic_write(out_dir / "report.md") as f:
        f.write(f"# sparseopt report\n\n{table}\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots))
    summary = {"target_accuracy": target, "rows": rows, "paired": paired, "runs": [str(r.path) for r in runs],
               "plots": [p.name for p in plots]}
    with atomic_write(out_dir / "report.json") as f:
        json.dump(summary, f, indent=2)
    return {"table": table, **summary}
