"""`sparseopt report SWEEP_DIR`: paper 004 Fig. 1/6 plots and the optimum tables from a `sparseopt sweep` folder.

A sweep folder holds a ``results.json`` whose top level has ``"results"`` (one LR × density (× width × σ) grid
per parameterization, as written by :func:`sparseopt.experiments.studies.diagnose.sweep`); a training run's results.json
has ``"final"`` instead. Optima are recomputed from the rows, so sweeps written before the σ axis existed (rows
without ``init_std``) report the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sparseopt.experiments.run.checkpoint import atomic_write
from sparseopt.experiments.errors import UserError


def _read(path: Path) -> dict | None:
    try:
        data = json.loads((path / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_sweep_dir(path: str | Path) -> bool:
    """True when ``path/results.json`` is a `sparseopt sweep` result (top-level "results", no "final")."""
    data = _read(Path(path))
    return bool(data) and isinstance(data.get("results"), list) and "final" not in data


def load_sweep(path: str | Path) -> list[dict]:
    """The per-parameterization grids of a sweep folder (UserError when it is not one)."""
    path = Path(path)
    if not is_sweep_dir(path):
        raise UserError(f"{path} is not a sweep folder: {path / 'results.json'} has no top-level \"results\" "
                        "(write one with `sparseopt sweep`)")
    results = _read(path)["results"]
    for res in results:
        if not isinstance(res, dict) or "rows" not in res or "config" not in res:
            raise UserError(f"cannot read sweep {path}: each entry of \"results\" needs \"rows\" and \"config\"")
    return results


def _num(value: float | None, fmt: str = ".3g") -> str:
    if value is None:
        return "diverged"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return format(value, fmt)


def lr_optimum_table(results: list[dict]) -> tuple[str, list[dict]]:
    """Markdown table of the best LR per (kind, width, density[, init std]) and the rows behind it."""
    from sparseopt.experiments.studies.transfer import optimum_shift, swept_init_stds

    with_sigma = any(swept_init_stds(r) for r in results)
    head = ["kind", "width", "density", *(["init std σ"] if with_sigma else []), "best LR (grid)",
            "best LR (refined)", "loss", "LR shift across densities (log2)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for res in results:
        opt = optimum_shift(res)
        shifts = {(s["width"], s["init_std"]): s["shift_log2"] for s in opt["shifts"]}
        for o in opt["optima"]:
            shift = shifts.get((o["width"], o["init_std"]))
            rows.append({"kind": res.get("kind"), **o, "shift_log2": shift})
            lines.append("| " + " | ".join([
                str(res.get("kind")), str(o["width"]), f"{o['density']:g}",
                *([_num(o["init_std"])] if with_sigma else []), _num(o["lr_grid"]), _num(o["lr_refined"]),
                _num(o["loss"], ".4f"), "-" if shift is None else f"{shift:.2f}"]) + " |")
    return "\n".join(lines), rows


def init_std_table(results: list[dict]) -> tuple[str, list[dict]]:
    """Markdown table of the best σ per (kind, width, density) (empty string when σ was not swept)."""
    from sparseopt.experiments.studies.transfer import init_std_optimum

    head = ["kind", "width", "density", "best init std σ", "LR at it", "loss", "σ shift across densities (log2)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for res in results:
        opt = init_std_optimum(res)
        if opt is None:
            continue
        for o in opt["optima"]:
            shift = opt["shift_log2"].get(o["width"])
            rows.append({"kind": res.get("kind"), **o, "shift_log2": shift})
            lines.append("| " + " | ".join([
                str(res.get("kind")), str(o["width"]), f"{o['density']:g}", _num(o["init_std"]), _num(o["lr"]),
                _num(o["loss"], ".4f"), "-" if shift is None else f"{shift:.2f}"]) + " |")
    return ("\n".join(lines) if rows else ""), rows


def make_sweep_report(sweep_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Write report.md, report.json, lr_sweep.png (and init_std_sweep.png when σ was swept) into ``out_dir``.

    Several sweep folders are pooled: their parameterizations become side-by-side panels.
    """
    from sparseopt.experiments.studies.diagnose import sweep_plots

    if not sweep_dirs:
        raise UserError("give at least one sweep folder to report on")
    not_sweeps = [str(p) for p in sweep_dirs if not is_sweep_dir(p)]
    if not_sweeps:
        raise UserError(f"cannot mix sweep folders with other folders in one report: {not_sweeps} "
                        "are not `sparseopt sweep` folders")
    results = [res for p in sweep_dirs for res in load_sweep(p)]
    if not results or not any(res["rows"] for res in results):
        raise UserError(f"{', '.join(map(str, sweep_dirs))}: the sweep has no rows to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = sweep_plots(results, out_dir)
    lr_table, lr_rows = lr_optimum_table(results)
    sigma_table, sigma_rows = init_std_table(results)
    table = "## Best learning rate per density (paper 004 Fig. 1/6)\n\n" + lr_table
    if sigma_table:
        table += "\n\n## Best init std per density\n\n" + sigma_table
    cfg = results[0]["config"]
    note = (f"Train loss is the mean of the last {cfg.get('last')} of {cfg.get('steps')} steps, averaged over "
            f"{len(cfg.get('seeds', [0]))} seed(s); the star in each plot marks a line's grid optimum. The refined "
            "LR is the vertex of a parabola through the grid minimum and its neighbours (log2 LR). "
            "The LR shift is max - min of log2(best LR) across densities: 0 means the optimum transfers.")
    if sigma_table:
        note += (" Each σ value replaces the base init std (the parameterization scales it per layer); the σ plot "
                 "shows, per σ, the best loss over the LR grid.")
    with atomic_write(out_dir / "report.md") as f:
        f.write(f"# sparseopt sweep report\n\nSweeps: {', '.join(str(p) for p in sweep_dirs)}\n\n{note}\n\n"
                f"{table}\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots))
    summary = {"sweeps": [str(p) for p in sweep_dirs], "lr_optima": lr_rows, "init_std_optima": sigma_rows,
               "plots": [p.name for p in plots]}
    with atomic_write(out_dir / "report.json") as f:
        json.dump(summary, f, indent=2)
    return {"table": table, "rows": lr_rows, **summary}
