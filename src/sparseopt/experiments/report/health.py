"""Neuron-health plot for ``sparseopt report``: what happens to individual neurons during training (issue 11).

``health.png`` draws, against step, the totals logged by :class:`sparseopt.diagnostics.tracking.ScaleTracker`
(split "scales" of metrics.jsonl, ``diagnostics.scales_every``): dead (zero-fan-in) neurons, the largest
max/median ||w_i|| over layers, the mean log-log slope of the following BatchNorm's sigma_i against fan-in k_i
(0.5 at initialisation by the theory, 0 once training has equalised the neurons), and ||corrected g|| / ||g||.
One line per configuration: mean over seeds with a 90% t-band.
"""

from __future__ import annotations

from pathlib import Path

from sparseopt.experiments.report.eos import _pyplot, _rows, _save, _series, t_band

PANELS = (("dead", "dead (zero fan-in) neurons", False), ("norm_max_over_median", "max / median ||w_i||", True),
          ("sigma_slope", "BN σ_i vs k_i log-log slope", False), ("correction_ratio", "||corrected g|| / ||g||", False))


def plot_health(groups: dict[str, list], out_dir: str | Path) -> Path | None:
    """Write ``health.png``; None when no run logged neuron health (``diagnostics.scales_every`` = 0)."""
    rows = {label: [_rows(run, "scales") for run in runs] for label, runs in groups.items()}
    if not any("dead" in r for members in rows.values() for run_rows in members for r in run_rows):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.6))
    for ax, (key, title, log) in zip(axes.flat, PANELS):
        for label, members in rows.items():
            series = [s for s in (_series(run_rows, key) for run_rows in members) if s]
            if not series:
                continue
            steps, mean, low, high = t_band(series)
            line, = ax.plot(steps, mean, label=f"{label} (n={len(series)})")
            if len(series) > 1:
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Neuron health: mean and 90% t-interval over seeds", fontsize=10)
    return _save(fig, Path(out_dir) / "health.png")
