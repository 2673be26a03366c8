"""Edge-of-stability and exploration plots for ``sparseopt report`` (SPEC 6.4, 4).

* ``sharpness.png``: λ_1 of the training-loss Hessian (split "hessian" of metrics.jsonl, logged by
  :class:`sparseopt.diagnostics.tracking.HessianTracker`) against step, one line per configuration: mean over seeds
  with a 90% t-confidence band (mean ± t_{0.95,n-1} sd/sqrt(n)), thin lines for mean λ_2..λ_k, and the dotted
  stability threshold (momentum-aware (2+2β)/η for SGD with momentum, SPEC 6.2; 2/η otherwise). Log y-axis.
* ``itop.png``: ITOP rate (the train split's ``itop``) against step, same banding.
"""

from __future__ import annotations

import math
from pathlib import Path

from sparseopt.experiments.run.runlog import read_jsonl
from sparseopt.figures import save_png
from sparseopt.stats import t_quantile


def _rows(run, split: str) -> list[dict]:
    path = Path(run.path) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in read_jsonl(path) if r.get("split") == split]


def _series(rows: list[dict], key: str) -> dict[int, float]:
    out = {}
    for r in rows:
        value = r.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[int(r["step"])] = float(value)
    return out


def t_band(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean and 90% t-interval over seeds at the steps every seed logged (no band for a single seed)."""
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    n = len(series)
    half_factor = t_quantile(0.95, n - 1) / math.sqrt(n) if n > 1 else 0.0
    steps, mean, low, high = [], [], [], []
    for step in common:
        values = [s[step] for s in series]
        m = sum(values) / n
        sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        steps.append(step)
        mean.append(m)
        low.append(m - half_factor * sd)
        high.append(m + half_factor * sd)
    return steps, mean, low, high


def _threshold_label(run, rows: list[dict]) -> str:
    optim = run.results.get("config", {}).get("optim", {})
    beta = optim.get("momentum", 0.0) if optim.get("name", "sgd") == "sgd" else 0.0
    if not any("threshold" in r for r in rows) or not beta:
        return "2/η"
    if optim.get("nesterov"):
        return f"(2+2β)/((1+2β)η), β={beta:g}"
    return f"(2+2β)/η, β={beta:g}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return save_png(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sharpness(groups: dict[str, list], out_dir: str | Path) -> Path | None:
    """Write ``sharpness.png`` (see the module doc); None when no run logged Hessian measurements."""
    data = {label: [(run, _rows(run, "hessian")) for run in runs] for label, runs in groups.items()}
    data = {label: [(run, rows) for run, rows in members if rows] for label, members in data.items()}
    data = {label: members for label, members in data.items() if members}
    if not data:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for label, members in data.items():
        all_rows = [rows for _, rows in members]
        steps, mean, low, high = t_band([_series(rows, "lambda_1") for rows in all_rows])
        if not steps:
            continue
        line, = ax.plot(steps, mean, lw=1.8, label=f"{label}: λ₁ (n={len(members)})")
        color = line.get_color()
        if len(members) > 1:
            ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        j = 2
        while all(any(f"lambda_{j}" in r for r in rows) for rows in all_rows):
            s, m, _, _ = t_band([_series(rows, f"lambda_{j}") for rows in all_rows])
            ax.plot(s, m, color=color, lw=0.7, alpha=0.45)
            j += 1
        key = "threshold" if all(any("threshold" in r for r in rows) for rows in all_rows) else "threshold_gd"
        s, m, _, _ = t_band([_series(rows, key) for rows in all_rows])
        if s:
            ax.plot(s, m, color=color, ls=":", lw=1.4, label=f"{label}: {_threshold_label(members[0][0], all_rows[0])}"
                    if key == "threshold" else f"{label}: 2/η")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness (top Hessian eigenvalue)")
    ax.set_title("λ₁: mean and 90% t-interval over seeds (thin: λ₂..λₖ); dotted: stability threshold",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, Path(out_dir) / "sharpness.png")


def plot_itop(groups: dict[str, list], out_dir: str | Path) -> Path | None:
    """Write ``itop.png``: ITOP rate against step per configuration (mean, 90% t-band); None without ITOP data."""
    data = {}
    for label, runs in groups.items():
        series = [s for s in (_series(_rows(run, "train"), "itop") for run in runs) if s]
        if series:
            data[label] = series
    if not data:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, series in data.items():
        steps, mean, low, high = t_band(series)
        line, = ax.plot(steps, mean, label=f"{label} (n={len(series)})")
        if len(series) > 1:
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel("ITOP rate R_s")
    ax.set_title("In-time over-parameterisation: mean and 90% t-interval over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(out_dir) / "itop.png")
