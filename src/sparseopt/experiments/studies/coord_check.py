"""Coordinate check for SP / μP / SuPar on the byte-level GPT (paper 004 Fig. 5, μP's coord check).

For each parameterization, train a few Adam steps (a) over widths at a fixed density and (b) over densities at a
fixed width, and record the activation scale (mean |a|) of the embedding output, every attention and FFN block
output and the logits, at every step. A parameterization is "right" along an axis when its lines are flat.

Entry points: :func:`coord_check` (returns a JSON-ready dict), :func:`plot_coord_check` (PNG) and :func:`spread`
(max/min ratio of a layer's scale along an axis: ~1 means flat).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sparseopt.data.text import RandomWindowSampler, load_corpus, split_corpus
from sparseopt.experiments.studies.gpt_setup import build_gpt_run
from sparseopt.figures import save_png

KINDS = ("sp", "mup", "supar")


def _record_run(kind: str, width: int, density: float, *, base_width: int, steps: int, lr: float, seed: int,
                n_layer: int, d_head: int, ctx: int, batch_size: int, data: torch.Tensor,
                metric: str) -> dict[str, list[float]]:
    run = build_gpt_run(kind, width=width, base_width=base_width, density=density, lr=lr, optimizer="adam",
                        n_layer=n_layer, d_head=d_head, ctx=ctx, seed=seed)
    model = run.model
    sampler = RandomWindowSampler(data, batch_size, ctx, seed=seed)
    acts: dict[str, list[float]] = {}

    def stat(t: torch.Tensor) -> float:
        t = t.detach().float()
        return float(t.abs().mean()) if metric == "l1" else float(t.pow(2).mean().sqrt())

    current: dict[str, float] = {}
    hooks = [model.wte.register_forward_hook(lambda m, i, o: current.__setitem__("embedding",
                                                                                 stat(o * model.input_mult)))]
    for b, block in enumerate(model.blocks):
        for part in ("attn", "ffn"):
            hooks.append(getattr(block, part).register_forward_hook(
                lambda m, i, o, key=f"blocks.{b}.{part}": current.__setitem__(key, stat(o))))
    try:
        for t in range(steps + 1):
            x, y = sampler.sample()
            current.clear()
            logits = model(x)
            current["logits"] = stat(logits)
            for k, v in current.items():
                acts.setdefault(k, []).append(v)
            if t == steps:
                break
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
    finally:
        for h in hooks:
            h.remove()
    return acts


def coord_check(kinds: Sequence[str] = KINDS, widths: Sequence[int] = (32, 64, 128, 256),
                densities: Sequence[float] = (1.0, 0.5, 0.25, 0.125, 0.0625), *, base_width: int | None = None,
                density_width: int | None = None, width_density: float = 1.0, steps: int = 5, lr: float = 1e-2,
                seeds: Sequence[int] = (0, 1), n_layer: int = 2, d_head: int = 16, ctx: int = 64,
                batch_size: int = 8, metric: str = "l1", corpus: str = "pydoc_topics") -> dict:
    """Activation scales per parameterization over widths and over densities.

    Width sweep: ``widths`` at density ``width_density``, base width ``base_width`` (default: smallest width).
    Density sweep: ``densities`` (uniform per-layer, static random masks) at ``density_width`` (default: the
    largest width, so sparse layers keep enough active fan-in), dense base. Values are averaged over ``seeds``.

    Returns ``{"config": ..., "width": {kind: {str(width): {layer: [scale at step 0..steps]}}},
    "density": {kind: {str(density): {...}}}}``.
    """
    if metric not in ("l1", "rms"):
        raise ValueError(f"metric must be 'l1' (mean |a|) or 'rms', got {metric!r}")
    kinds = [k.lower() for k in kinds]
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown parameterization {k!r}; choose from {KINDS}")
    widths = sorted(int(w) for w in widths)
    densities = sorted((float(d) for d in densities), reverse=True)
    if not widths or not densities or not seeds:
        raise ValueError("widths, densities and seeds must be non-empty")
    if any(w % d_head for w in widths):
        raise ValueError(f"every width must be a multiple of d_head={d_head}, got {widths}")
    base_width = widths[0] if base_width is None else int(base_width)
    density_width = widths[-1] if density_width is None else int(density_width)
    data, _ = split_corpus(load_corpus(corpus))
    common = dict(base_width=base_width, steps=steps, lr=lr, n_layer=n_layer, d_head=d_head, ctx=ctx,
                  batch_size=batch_size, data=data, metric=metric)

    def averaged(kind, width, density):
        runs = [_record_run(kind, width, density, seed=s, **common) for s in seeds]
        return {k: np.mean([r[k] for r in runs], axis=0).tolist() for k in runs[0]}

    out = {"config": {"kinds": kinds, "widths": widths, "densities": densities, "base_width": base_width,
                      "density_width": density_width, "width_density": width_density, "steps": steps, "lr": lr,
                      "seeds": list(seeds), "n_layer": n_layer, "d_head": d_head, "ctx": ctx,
                      "batch_size": batch_size, "metric": metric, "corpus": corpus},
           "width": {}, "density": {}}
    for kind in kinds:
        out["width"][kind] = {str(w): averaged(kind, w, width_density) for w in widths}
        out["density"][kind] = {str(d): averaged(kind, density_width, d) for d in densities}
    return out


def spread(result: dict, axis: str, kind: str, step: int = -1, layers: Sequence[str] | None = None) -> dict:
    """``{layer: max/min}`` of the activation scale along ``axis`` ("width" or "density") at ``step``.

    1.0 is perfectly flat. ``layers`` defaults to every recorded layer.
    """
    if axis not in ("width", "density"):
        raise ValueError(f"axis must be 'width' or 'density', got {axis!r}")
    series = result[axis][kind]
    keys = list(series)
    names = layers if layers is not None else list(series[keys[0]])
    out = {}
    for name in names:
        vals = np.array([series[k][name][step] for k in keys])
        out[name] = float(vals.max() / vals.min())
    return out


def plot_coord_check(result: dict, path: str | Path, step: int = -1) -> Path:
    """Two rows (vs width, vs density) × one column per parameterization; one line per layer, log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = result["config"]["kinds"]
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.2 * len(kinds), 7.0), squeeze=False)
    labels = {"sp": "SP", "mup": "μP", "supar": "SuPar"}
    for row, axis in enumerate(("width", "density")):
        for col, kind in enumerate(kinds):
            ax = axes[row, col]
            series = result[axis][kind]
            xs = [float(k) for k in series]
            for layer in series[next(iter(series))]:
                ax.plot(xs, [series[k][layer][step] for k in series], marker="o", ms=3, label=layer)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("width d" if axis == "width" else "density ρ")
            ax.set_ylabel(f"activation scale ({result['config']['metric']})")
            t = result["config"]["steps"] if step == -1 else step
            fixed = (f"ρ={result['config']['width_density']:g}" if axis == "width"
                     else f"d={result['config']['density_width']}")
            ax.set_title(f"{labels.get(kind, kind)} vs {axis} ({fixed}, step {t})")
            ax.grid(True, which="both", alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_png(fig, path)
