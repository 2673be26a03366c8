"""Learning-rate transfer across density (and width): paper 004 Fig. 1/6 at laptop scale.

:func:`lr_sweep` trains the byte-level GPT with static random masks (SparseTraining, uniform per-layer density on
the hidden projections) for every (width, density, lr, seed) under one parameterization and records the train loss
averaged over the last ``last`` steps. :func:`optimum_shift` finds the best LR per (width, density) and how far it
moves (in log2 LR). :func:`plot_lr_sweep` draws loss vs LR, one line per density, optimum marked, one panel per
parameterization.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from sparseopt.data.text import RandomWindowSampler, load_corpus, split_corpus
from sparseopt.experiments.gpt_setup import build_gpt_run


def train_loss(kind: str, lr: float, density: float, width: int, *, base_width: int, steps: int, seed: int,
               last: int, data: torch.Tensor, batch_size: int, ctx: int, n_layer: int, d_head: int,
               warmup: int, optimizer: str, weight_decay: float) -> float:
    """One run: mean train loss over the last ``last`` steps (``inf`` when it diverged)."""
    torch.manual_seed(seed)
    run = build_gpt_run(kind, width=width, base_width=base_width, density=density, lr=lr, optimizer=optimizer,
                        weight_decay=weight_decay, n_layer=n_layer, d_head=d_head, ctx=ctx, seed=seed)
    # linear warmup, then linear decay to 10% ("10x linear", paper 004 App. C); LambdaLR keeps the multipliers
    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return 1.0 - 0.9 * (t - warmup) / max(1, steps - warmup)

    sched = torch.optim.lr_scheduler.LambdaLR(run.optimizer, factor)
    sampler = RandomWindowSampler(data, batch_size, ctx, seed=seed)
    losses = []
    for _ in range(steps):
        x, y = sampler.sample()
        loss = run.model.loss(x, y)
        if not torch.isfinite(loss):
            return math.inf
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        sched.step()
        losses.append(loss.item())
    return float(np.mean(losses[-last:]))


def lr_sweep(kind: str, lrs: Sequence[float], densities: Sequence[float], widths: Sequence[int] | None = None, *,
             base_width: int = 64, steps: int = 300, seeds: Sequence[int] = (0,), last: int = 20,
             batch_size: int = 16, ctx: int = 64, n_layer: int = 2, d_head: int = 16, warmup: int | None = None,
             optimizer: str = "adam", weight_decay: float = 0.0, corpus: str = "pydoc_topics",
             verbose: bool = False) -> dict:
    """Train-loss grid over ``lrs`` × ``densities`` × ``widths`` (default: ``(base_width,)``) × ``seeds``.

    Returns ``{"kind", "config", "rows": [{"width", "density", "lr", "seed", "loss"}, ...]}`` (JSON-ready;
    diverged runs have ``loss = inf``). ``lrs`` are base LRs η_base; each parameter group gets its multiplier.
    """
    if not lrs or not densities:
        raise ValueError("lrs and densities must be non-empty")
    if any(not lr > 0 for lr in lrs):
        raise ValueError(f"learning rates must be positive, got {list(lrs)}")
    if last < 1 or last > steps:
        raise ValueError(f"last must be in [1, steps={steps}], got {last}")
    widths = [base_width] if widths is None else [int(w) for w in widths]
    warmup = max(1, steps // 10) if warmup is None else int(warmup)
    data, _ = split_corpus(load_corpus(corpus))
    rows = []
    t0 = time.time()
    for width in widths:
        for density in densities:
            for lr in lrs:
                for seed in seeds:
                    loss = train_loss(kind, float(lr), float(density), width, base_width=base_width, steps=steps,
                                      seed=seed, last=last, data=data, batch_size=batch_size, ctx=ctx,
                                      n_layer=n_layer, d_head=d_head, warmup=warmup, optimizer=optimizer,
                                      weight_decay=weight_decay)
                    rows.append({"width": width, "density": float(density), "lr": float(lr), "seed": seed,
                                 "loss": loss})
                    if verbose:
                        print(f"[{time.time() - t0:7.1f}s] {kind} d={width} rho={density:g} lr={lr:.3g} "
                              f"seed={seed} loss={loss:.4f}", flush=True)
    return {"kind": kind, "rows": rows,
            "config": {"lrs": [float(x) for x in lrs], "densities": [float(d) for d in densities],
                       "widths": widths, "base_width": base_width, "steps": steps, "seeds": list(seeds),
                       "last": last, "batch_size": batch_size, "ctx": ctx, "n_layer": n_layer, "d_head": d_head,
                       "warmup": warmup, "optimizer": optimizer, "weight_decay": weight_decay, "corpus": corpus}}


def _curves(results: Mapping) -> dict[tuple[int, float], tuple[np.ndarray, np.ndarray]]:
    """(width, density) -> (sorted lrs, seed-mean loss)."""
    acc: dict[tuple[int, float], dict[float, list[float]]] = {}
    for r in results["rows"]:
        acc.setdefault((r["width"], r["density"]), {}).setdefault(r["lr"], []).append(r["loss"])
    out = {}
    for key, by_lr in acc.items():
        lrs = np.array(sorted(by_lr))
        out[key] = (lrs, np.array([np.mean(by_lr[lr]) for lr in lrs]))
    return out


def _refine(log_lrs: np.ndarray, loss: np.ndarray, i: int) -> float:
    """Vertex of the parabola through the grid minimum and its neighbours (in log2 LR), clamped to them."""
    if 0 < i < len(loss) - 1 and np.all(np.isfinite(loss[i - 1:i + 2])):
        x, y = log_lrs[i - 1:i + 2], loss[i - 1:i + 2]
        a, b, _ = np.polyfit(x, y, 2)
        if a > 0:
            return float(np.clip(-b / (2 * a), x[0], x[2]))
    return float(log_lrs[i])


def optimum_shift(results: Mapping) -> dict:
    """Best LR per (width, density) and its spread across densities (per width), in log2(LR).

    Returns ``{"kind", "optima": [{"width", "density", "lr_grid", "lr_refined", "loss"}],
    "shift_log2": {width: max - min of log2(grid optimum)}, "shift_log2_refined": {...}}``; the refined optimum
    is the vertex of a parabola through the grid minimum and its two neighbours.
    """
    optima = []
    for (width, density), (lrs, loss) in sorted(_curves(results).items()):
        if not np.any(np.isfinite(loss)):
            optima.append({"width": width, "density": density, "lr_grid": None, "lr_refined": None,
                           "loss": math.inf})
            continue
        i = int(np.nanargmin(np.where(np.isfinite(loss), loss, np.inf)))
        log_lrs = np.log2(lrs)
        optima.append({"width": width, "density": density, "lr_grid": float(lrs[i]),
                       "lr_refined": float(2 ** _refine(log_lrs, loss, i)), "loss": float(loss[i])})
    shift, shift_ref = {}, {}
    for width in sorted({o["width"] for o in optima}):
        found = [o for o in optima if o["width"] == width and o["lr_grid"] is not None]
        if found:
            g = [math.log2(o["lr_grid"]) for o in found]
            r = [math.log2(o["lr_refined"]) for o in found]
            shift[width] = max(g) - min(g)
            shift_ref[width] = max(r) - min(r)
    return {"kind": results.get("kind"), "optima": optima, "shift_log2": shift, "shift_log2_refined": shift_ref}


def plot_lr_sweep(results: Mapping | Sequence[Mapping], path: str | Path, width: int | None = None) -> Path:
    """Loss vs LR (log2 x), one line per density, optimum starred; one panel per result (parameterization)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [results] if isinstance(results, Mapping) else list(results)
    fig, axes = plt.subplots(1, len(runs), figsize=(4.8 * len(runs), 4.0), squeeze=False, sharey=True)
    labels = {"sp": "SP", "mup": "μP", "supar": "SuPar"}
    cmap = plt.get_cmap("viridis")
    for ax, res in zip(axes[0], runs):
        curves = _curves(res)
        w = width if width is not None else res["config"]["widths"][0]
        dens = sorted({d for (ww, d) in curves if ww == w}, reverse=True)
        opt = optimum_shift(res)
        for j, d in enumerate(dens):
            lrs, loss = curves[(w, d)]
            color = cmap(j / max(1, len(dens) - 1))
            finite = np.isfinite(loss)
            ax.plot(lrs[finite], loss[finite], marker="o", ms=3, color=color, label=f"ρ={d:g}")
            best = next(o for o in opt["optima"] if o["width"] == w and o["density"] == d)
            if best["lr_grid"] is not None:
                ax.plot([best["lr_grid"]], [best["loss"]], marker="*", ms=12, color=color, mec="k")
        finite_all = [v for lrs_loss in curves.values() for v in lrs_loss[1] if np.isfinite(v)]
        if finite_all:
            lo = min(finite_all)
            ax.set_ylim(lo - 0.05, min(max(finite_all), lo + 1.5) + 0.05)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("base learning rate η")
        ax.set_title(f"{labels.get(res.get('kind'), res.get('kind'))}, d={w}: optimum shift "
                     f"{opt['shift_log2'].get(w, float('nan')):.1f} log2")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel(f"train loss (mean of last {runs[0]['config']['last']} steps)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
