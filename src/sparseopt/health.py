"""Per-neuron health of a sparse layer: what SparseOpt and the drop rule do to individual neurons (issue 11).

Under BatchNorm a neuron's output ignores the scale of its weight row, so damage shows up per neuron, not per layer:
neurons lose all inputs (dead, zero fan-in), rows grow by orders of magnitude (max and max/median ||w_i||), and the
BatchNorm's per-channel scale sigma_i follows fan-in k_i as k_i^0.5 at initialisation (SPEC 1.1) and flattens as
training equalises the rows. The fitted log-log slope of sigma_i (and |gamma_i|) against k_i says which regime a
layer is in; the global ||corrected g|| / ||g|| says how much SparseOpt changes the step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sparseopt.masks import fan_in


def neuron_norms(weight: torch.Tensor, out_axis: int = 0) -> torch.Tensor:
    """||w_i|| of every output unit (row of a Linear weight, output channel of a Conv weight, column of a Hugging
    Face Conv1D weight: ``out_axis``, see :mod:`sparseopt.layouts`), in float64."""
    units = weight.detach().movedim(out_axis, 0)
    return torch.linalg.vector_norm(units.reshape(units.shape[0], -1).to(torch.float64), dim=1)


def loglog_slope(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Least-squares slope of log y against log x over the entries where both are positive; None when fewer than
    two distinct x remain (a constant fan-in layer has no slope)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    keep = (x > 0) & (y > 0)
    lx, ly = x[keep].log(), y[keep].log()
    if lx.numel() < 2 or float(lx.max() - lx.min()) < 1e-12:
        return None
    dx = lx - lx.mean()
    return float((dx * (ly - ly.mean())).sum() / (dx * dx).sum())


def batchnorm_sigma(bn: nn.Module) -> torch.Tensor | None:
    """The per-channel scale sqrt(running_var + eps) a BatchNorm divides by at evaluation; None without stats."""
    var = getattr(bn, "running_var", None)
    if var is None:
        return None
    return torch.sqrt(var.detach().to(torch.float64) + bn.eps)


def layer_health(weight: torch.Tensor, mask: torch.Tensor, batchnorm: nn.Module | None = None,
                 out_axis: int = 0) -> dict:
    """Dead neurons, the largest row norm and its ratio to the median over live neurons, and, with the BatchNorm
    that the layer feeds, the log-log slopes of sigma_i and |gamma_i| against k_i over live neurons."""
    k = fan_in(mask, out_axis).to(torch.float64)
    live = k > 0
    norms = neuron_norms(weight, out_axis)
    live_norms = norms[live]
    median = float(live_norms.median()) if live_norms.numel() else 0.0
    out = {"dead": int((~live).sum()), "norm_max": float(norms.max()) if norms.numel() else 0.0,
           "norm_max_over_median": float(live_norms.max()) / median if median > 0 else None,
           "sigma_slope": None, "gamma_slope": None}
    if batchnorm is not None:
        sigma = batchnorm_sigma(batchnorm)
        if sigma is not None and sigma.numel() == k.numel():
            out["sigma_slope"] = loglog_slope(k[live], sigma.to(k.device)[live])
        gamma = getattr(batchnorm, "weight", None)
        if isinstance(gamma, torch.Tensor) and gamma.numel() == k.numel():
            out["gamma_slope"] = loglog_slope(k[live], gamma.detach().abs().to(k)[live])
    return out


def correction_ratio(grads: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> float | None:
    """||corrected g|| / ||g|| from the corrected gradients the optimizer used and their factors (None = 1):
    the uncorrected gradient is recovered as g~ / c where c > 0 (where c = 0 the masked gradient is 0 too).
    None when there is no gradient."""
    corrected = uncorrected = 0.0
    seen = False
    for g, c in grads:
        g = g.detach().to(torch.float64)
        seen = True
        corrected += float(g.pow(2).sum())
        if c is None:
            uncorrected += float(g.pow(2).sum())
        else:
            c = c.to(g)
            uncorrected += float(torch.where(c > 0, g / torch.where(c > 0, c, torch.ones_like(c)),
                                             torch.zeros_like(g)).pow(2).sum())
    if not seen or uncorrected == 0:
        return None
    return (corrected / uncorrected) ** 0.5
