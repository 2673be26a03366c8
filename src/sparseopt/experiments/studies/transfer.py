"""Learning-rate transfer across density (and width): paper 004 Fig. 1/6 at laptop scale.

:func:`lr_sweep` trains the byte-level GPT with static random masks (SparseTraining, uniform per-layer density on
the hidden projections) for every (width, density, lr, seed) under one parameterization and records the train loss
averaged over the last ``last`` steps. :func:`optimum_shift` finds the best LR per (width, density) and how far it
moves (in log2 LR). :func:`plot_lr_sweep` draws loss vs LR, one line per density, optimum marked, one panel per
parameterization.

The base init std σ can be swept too (``init_stds``; each value replaces the paper's σ for the kind, and the
parameterization scales it per layer as usual). Then :func:`optimum_shift` works per σ, :func:`init_std_optimum`
gives the best σ per density and :func:`plot_init_std_sweep` draws loss against σ, one line per density.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from sparseopt.data.text import RandomWindowSampler, load_corpus, split_corpus
from sparseopt.experiments.studies.gpt_setup import build_gpt_run
from sparseopt.figures import save_png


def train_loss(kind: str, lr: float, density: float, width: int, *, base_width: int, steps: int, seed: int,
               last: int, data: torch.Tensor, batch_size: int, ctx: int, n_layer: int, d_head: int,
               warmup: int, optimizer: str, weight_decay: float, init_std: float | None = None) -> float:
    """One run: mean train loss over the last ``last`` steps (``inf`` when it diverged).

    ``init_std`` replaces the kind's base init std σ (None: the paper's value, :data:`PAPER_HPS`)."""
    torch.manual_seed(seed)
    run = build_gpt_run(kind, width=width, base_width=base_width, density=density, lr=lr, optimizer=optimizer,
                        weight_decay=weight_decay, n_layer=n_layer, d_head=d_head, ctx=ctx, seed=seed,
                        sigma=init_std)
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
             verbose: bool = False, init_stds: Sequence[float] | None = None) -> dict:
    """Train-loss grid over ``lrs`` × ``densities`` × ``widths`` (default: ``(base_width,)``) × ``seeds``
    (× ``init_stds`` when given).

    Returns ``{"kind", "config", "rows": [{"width", "density", "init_std", "lr", "seed", "loss"}, ...]}``
    (JSON-ready; diverged runs have ``loss = inf``). ``lrs`` are base LRs η_base; each parameter group gets its
    multiplier. ``init_stds`` values replace the base init std σ (the parameterization scales it per layer);
    rows have ``init_std = None`` when σ is not swept (the paper's σ for the kind is used).
    """
    check_sweep_axes(lrs, densities, init_stds)
    if last < 1 or last > steps:
        raise ValueError(f"last must be in [1, steps={steps}], got {last}")
    widths = [base_width] if widths is None else [int(w) for w in widths]
    stds: list[float | None] = [None] if init_stds is None else [float(s) for s in init_stds]
    warmup = max(1, steps // 10) if warmup is None else int(warmup)
    data, _ = split_corpus(load_corpus(corpus))
    rows = []
    t0 = time.time()
    for width in widths:
        for density in densities:
            for std in stds:
                for lr in lrs:
                    for seed in seeds:
                        loss = train_loss(kind, float(lr), float(density), width, base_width=base_width,
                                          steps=steps, seed=seed, last=last, data=data, batch_size=batch_size,
                                          ctx=ctx, n_layer=n_layer, d_head=d_head, warmup=warmup,
                                          optimizer=optimizer, weight_decay=weight_decay, init_std=std)
                        rows.append({"width": width, "density": float(density), "init_std": std, "lr": float(lr),
                                     "seed": seed, "loss": loss})
                        if verbose:
                            sigma = "" if std is None else f" sigma={std:g}"
                            print(f"[{time.time() - t0:7.1f}s] {kind} d={width} rho={density:g}{sigma} "
                                  f"lr={lr:.3g} seed={seed} loss={loss:.4f}", flush=True)
    return {"kind": kind, "rows": rows,
            "config": {"lrs": [float(x) for x in lrs], "densities": [float(d) for d in densities],
                       "widths": widths, "base_width": base_width, "steps": steps, "seeds": list(seeds),
                       "last": last, "batch_size": batch_size, "ctx": ctx, "n_layer": n_layer, "d_head": d_head,
                       "warmup": warmup, "optimizer": optimizer, "weight_decay": weight_decay, "corpus": corpus,
                       "init_stds": None if init_stds is None else [float(x) for x in init_stds]}}


def check_sweep_axes(lrs: Sequence[float], densities: Sequence[float],
                     init_stds: Sequence[float] | None = None) -> None:
    """ValueError (with the offending values) unless every axis is non-empty and in range."""
    if not lrs or not densities:
        raise ValueError("lrs and densities must be non-empty")
    if any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise ValueError(f"learning rates must be positive, got {list(lrs)}")
    if any(not 0 < d <= 1 for d in densities):
        raise ValueError(f"densities must be in (0, 1], got {list(densities)}")
    if init_stds is not None:
        if not init_stds:
            raise ValueError("init_stds must be non-empty when given")
        if any(not (s > 0 and math.isfinite(s)) for s in init_stds):
            raise ValueError(f"init stds must be positive, got {list(init_stds)}")


def swept_init_stds(results: Mapping) -> list[float]:
    """The σ values of a sweep, sorted; empty when σ was not swept (old results have no ``init_std``)."""
    return sorted({r["init_std"] for r in results["rows"] if r.get("init_std") is not None})


def _curves(results: Mapping) -> dict[tuple[int, float, float | None], tuple[np.ndarray, np.ndarray]]:
    """(width, density, init_std) -> (sorted lrs, seed-mean loss); init_std is None when σ was not swept."""
    acc: dict[tuple[int, float, float | None], dict[float, list[float]]] = {}
    for r in results["rows"]:
        key = (r["width"], r["density"], r.get("init_std"))
        acc.setdefault(key, {}).setdefault(r["lr"], []).append(r["loss"])
    out = {}
    for key, by_lr in acc.items():
        lrs = np.array(sorted(by_lr))
        out[key] = (lrs, np.array([np.mean(by_lr[lr]) for lr in lrs]))
    return out


def _std_key(std: float | None) -> float:
    return -1.0 if std is None else std


def _refine(log_lrs: np.ndarray, loss: np.ndarray, i: int) -> float:
    """Vertex of the parabola through the grid minimum and its neighbours (in log2 LR), clamped to them."""
    if 0 < i < len(loss) - 1 and np.all(np.isfinite(loss[i - 1:i + 2])):
        x, y = log_lrs[i - 1:i + 2], loss[i - 1:i + 2]
        a, b, _ = np.polyfit(x, y, 2)
        if a > 0:
            return float(np.clip(-b / (2 * a), x[0], x[2]))
    return float(log_lrs[i])


def optimum_shift(results: Mapping) -> dict:
    """Best LR per (width, density, init std) and its spread across densities, in log2(LR).

    Returns ``{"kind", "optima": [{"width", "density", "init_std", "lr_grid", "lr_refined", "loss"}],
    "shifts": [{"width", "init_std", "shift_log2", "shift_log2_refined"}],
    "shift_log2": {width: max - min of log2(grid optimum)}, "shift_log2_refined": {...}}``; the refined optimum
    is the vertex of a parabola through the grid minimum and its two neighbours. ``init_std`` is None when σ was
    not swept; when it was, the spread is taken across densities at each σ (``shifts``) and ``shift_log2`` per
    width is the largest of those (the worst case over σ).
    """
    optima = []
    for (width, density, std), (lrs, loss) in sorted(_curves(results).items(),
                                                      key=lambda kv: (kv[0][0], kv[0][1], _std_key(kv[0][2]))):
        if not np.any(np.isfinite(loss)):
            optima.append({"width": width, "density": density, "init_std": std, "lr_grid": None,
                           "lr_refined": None, "loss": math.inf})
            continue
        i = int(np.nanargmin(np.where(np.isfinite(loss), loss, np.inf)))
        log_lrs = np.log2(lrs)
        optima.append({"width": width, "density": density, "init_std": std, "lr_grid": float(lrs[i]),
                       "lr_refined": float(2 ** _refine(log_lrs, loss, i)), "loss": float(loss[i])})
    shifts = []
    for width, std in sorted({(o["width"], o["init_std"]) for o in optima}, key=lambda k: (k[0], _std_key(k[1]))):
        found = [o for o in optima if o["width"] == width and o["init_std"] == std and o["lr_grid"] is not None]
        if found:
            g = [math.log2(o["lr_grid"]) for o in found]
            r = [math.log2(o["lr_refined"]) for o in found]
            shifts.append({"width": width, "init_std": std, "shift_log2": max(g) - min(g),
                           "shift_log2_refined": max(r) - min(r)})
    shift, shift_ref = {}, {}
    for s in shifts:
        shift[s["width"]] = max(shift.get(s["width"], 0.0), s["shift_log2"])
        shift_ref[s["width"]] = max(shift_ref.get(s["width"], 0.0), s["shift_log2_refined"])
    return {"kind": results.get("kind"), "optima": optima, "shifts": shifts, "shift_log2": shift,
            "shift_log2_refined": shift_ref}


def _sigma_profiles(results: Mapping) -> dict[tuple[int, float], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(width, density) -> (sorted σ, best seed-mean loss over the LR grid at each σ, the LR attaining it)."""
    acc: dict[tuple[int, float], dict[float, tuple[float, float]]] = {}
    for (width, density, std), (lrs, loss) in _curves(results).items():
        if std is None:
            continue
        masked = np.where(np.isfinite(loss), loss, np.inf)
        i = int(np.argmin(masked))
        acc.setdefault((width, density), {})[std] = (float(masked[i]), float(lrs[i]))
    out = {}
    for key, by_std in acc.items():
        stds = np.array(sorted(by_std))
        out[key] = (stds, np.array([by_std[s][0] for s in stds]), np.array([by_std[s][1] for s in stds]))
    return out


def init_std_optimum(results: Mapping) -> dict | None:
    """Best base init std σ per (width, density) (jointly with the LR) and its spread across densities in log2(σ).

    Returns None when σ was not swept, else ``{"kind", "optima": [{"width", "density", "init_std", "lr",
    "loss"}], "shift_log2": {width: max - min of log2(best σ)}}``; ``init_std``/``lr`` are None when every run
    at that density diverged.
    """
    profiles = _sigma_profiles(results)
    if not profiles:
        return None
    optima = []
    for (width, density), (stds, loss, lrs) in sorted(profiles.items()):
        if not np.any(np.isfinite(loss)):
            optima.append({"width": width, "density": density, "init_std": None, "lr": None, "loss": math.inf})
            continue
        i = int(np.argmin(loss))
        optima.append({"width": width, "density": density, "init_std": float(stds[i]), "lr": float(lrs[i]),
                       "loss": float(loss[i])})
    shift = {}
    for width in sorted({o["width"] for o in optima}):
        logs = [math.log2(o["init_std"]) for o in optima if o["width"] == width and o["init_std"] is not None]
        if logs:
            shift[width] = max(logs) - min(logs)
    return {"kind": results.get("kind"), "optima": optima, "shift_log2": shift}


def plot_lr_sweep(results: Mapping | Sequence[Mapping], path: str | Path, width: int | None = None) -> Path:
    """Loss vs LR (log2 x), one line per density, optimum starred; one panel per result (parameterization)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [results] if isinstance(results, Mapping) else list(results)
    # one row of panels per swept init std (a single row when σ was not swept)
    stds = sorted({r.get("init_std") for res in runs for r in res["rows"]}, key=_std_key)
    fig, axes = plt.subplots(len(stds), len(runs), figsize=(4.8 * len(runs), 4.0 * len(stds)), squeeze=False,
                             sharey=True)
    cmap = plt.get_cmap("viridis")
    shown: list[float] = []  # every plotted loss: the panels share one y range (sharey)
    for col, res in enumerate(runs):
        curves = _curves(res)
        w = width if width is not None else res["config"]["widths"][0]
        opt = optimum_shift(res)
        for row, std in enumerate(stds):
            ax = axes[row, col]
            dens = sorted({d for (ww, d, s) in curves if ww == w and s == std}, reverse=True)
            for j, d in enumerate(dens):
                lrs, loss = curves[(w, d, std)]
                color = cmap(j / max(1, len(dens) - 1))
                finite = np.isfinite(loss)
                ax.plot(lrs[finite], loss[finite], marker="o", ms=3, color=color, label=f"ρ={d:g}")
                best = next(o for o in opt["optima"]
                            if o["width"] == w and o["density"] == d and o["init_std"] == std)
                if best["lr_grid"] is not None:
                    ax.plot([best["lr_grid"]], [best["loss"]], marker="*", ms=12, color=color, mec="k")
            shown += [v for d in dens for v in curves[(w, d, std)][1]]
            shift = next((s["shift_log2"] for s in opt["shifts"] if s["width"] == w and s["init_std"] == std),
                         float("nan"))
            sigma = "" if std is None else f", σ={std:g}"
            ax.set_xscale("log", base=2)
            ax.set_xlabel("base learning rate η")
            ax.set_title(f"{_LABELS.get(res.get('kind'), res.get('kind'))}, d={w}{sigma}: optimum shift "
                         f"{shift:.1f} log2", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if dens:
                ax.legend(fontsize=7)
    _set_loss_ylim(axes[0, 0], shown)
    for row in range(len(stds)):
        axes[row, 0].set_ylabel(f"train loss (mean of last {runs[0]['config']['last']} steps)")
    fig.tight_layout()
    return save_png(fig, path)


_LABELS = {"sp": "SP", "mup": "μP", "supar": "SuPar"}


def _set_loss_ylim(ax, values) -> None:
    finite = [v for v in values if np.isfinite(v)]
    if finite:
        lo = min(finite)
        ax.set_ylim(lo - 0.05, min(max(finite), lo + 1.5) + 0.05)


def plot_init_std_sweep(results: Mapping | Sequence[Mapping], path: str | Path, width: int | None = None) -> Path:
    """Loss vs base init std σ (log2 x), one line per density, optimum starred; one panel per parameterization.

    Each point is the best seed-mean loss over the LR grid at that σ (the LR-tuned profile), so the star is the
    joint (σ, LR) optimum of :func:`init_std_optimum`. Results where σ was not swept get an empty panel.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [results] if isinstance(results, Mapping) else list(results)
    fig, axes = plt.subplots(1, len(runs), figsize=(4.8 * len(runs), 4.0), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    shown: list[float] = []
    for ax, res in zip(axes[0], runs):
        profiles = _sigma_profiles(res)
        w = width if width is not None else res["config"]["widths"][0]
        opt = init_std_optimum(res)
        dens = sorted({d for (ww, d) in profiles if ww == w}, reverse=True)
        for j, d in enumerate(dens):
            stds, loss, _ = profiles[(w, d)]
            color = cmap(j / max(1, len(dens) - 1))
            finite = np.isfinite(loss)
            ax.plot(stds[finite], loss[finite], marker="o", ms=3, color=color, label=f"ρ={d:g}")
            best = next(o for o in opt["optima"] if o["width"] == w and o["density"] == d)
            if best["init_std"] is not None:
                ax.plot([best["init_std"]], [best["loss"]], marker="*", ms=12, color=color, mec="k")
        shown += [v for d in dens for v in profiles[(w, d)][1]]
        shift = opt["shift_log2"].get(w, float("nan")) if opt else float("nan")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("base init std σ")
        ax.set_title(f"{_LABELS.get(res.get('kind'), res.get('kind'))}, d={w}: σ optimum shift {shift:.1f} log2",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if dens:
            ax.legend(fontsize=7)
    _set_loss_ylim(axes[0, 0], shown)
    axes[0, 0].set_ylabel("train loss (best over the LR grid)")
    fig.tight_layout()
    return save_png(fig, path)
