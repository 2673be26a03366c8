"""PNG figures for the diagnostics (matplotlib imported lazily, Agg backend: works headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sparseopt.figures import save_png

_STYLE = {"batch": ("C0", "o", "BatchNorm"), "layer": ("C2", "s", "LayerNorm"), "none": ("C3", "^", "no norm")}


def plot_gradient_ratio(result: dict, path: str | Path, per_neuron: dict | None = None) -> Path:
    """Measured R(s) mean ± sd per norm against 1/sqrt(1-s) and y = 1, log-scale y; optional per-neuron panel.

    ``result`` comes from :func:`gradient_ratio_experiment`, ``per_neuron`` from :func:`per_neuron_ratio_experiment`.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if per_neuron is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.0 * ncols, 4.5), squeeze=False)
    ax = axes[0, 0]
    s_max = max(result["sparsities"])
    grid = np.linspace(0.0, max(s_max, 0.5), 200)
    ax.plot(grid, 1 / np.sqrt(1 - grid), "k--", lw=1.2, label=r"$1/\sqrt{1-s}$ (theory, BN)")
    ax.axhline(1.0, color="gray", ls=":", lw=1.2, label="y = 1 (theory, no norm)")
    for nm in result["norms"]:
        rows = sorted((r for r in result["rows"] if r["norm"] == nm), key=lambda r: r["s"])
        color, marker, label = _STYLE.get(nm, ("C4", "d", nm))
        ax.errorbar([r["s"] for r in rows], [r["mean"] for r in rows], yerr=[r["sd"] for r in rows],
                    color=color, marker=marker, ls="-", capsize=3, label=f"{label} (measured)")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity s of the first layer")
    ax.set_ylabel(r"$R(s)$ = mean|G sparse| / mean|G dense| (active)")
    ax.set_title(f"Gradient ratio, {len(result['seeds'])} seeds x {result['batches']} batches")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if per_neuron is not None:
        ax = axes[0, 1]
        lo = hi = None
        for nm, data in per_neuron["norms"].items():
            s_i = np.asarray(data["s_i"]).ravel()
            r_i = np.asarray(data["R_i"]).ravel()
            amp = 1 / np.sqrt(1 - s_i)
            color, marker, label = _STYLE.get(nm, ("C4", "d", nm))
            ax.scatter(amp, r_i, s=6, alpha=0.4, color=color, marker=marker,
                       label=f"{label} (r = {data['corr_with_amplification']:.2f})")
            lo = amp.min() if lo is None else min(lo, amp.min())
            hi = amp.max() if hi is None else max(hi, amp.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1.2, label="R_i = 1/sqrt(1-s_i)")
        ax.set_xlabel(r"$1/\sqrt{1-s_i}$")
        ax.set_ylabel(r"per-neuron ratio $R_i$")
        ax.set_yscale("log")
        ax.set_title("Heterogeneous per-neuron sparsity")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
