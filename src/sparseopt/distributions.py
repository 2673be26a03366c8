"""Per-layer densities for a global budget: uniform and Erdős–Rényi-Kernel (ERK), SPEC 3.4."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from sparseopt.masks import nnz_for_density

DISTRIBUTIONS = ("uniform", "erk")


def check_density(density: float, what: str = "density") -> float:
    """Densities live in (0, 1]: 0 would remove a layer, >1 is meaningless."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {density!r} (density = 1 - sparsity)")
    return float(density)


def erk_raw_scores(shape: Sequence[int], power_scale: float = 1.0) -> float:
    """(Σ dims / ∏ dims) ** p: permutation-invariant, so PyTorch and JAX layouts agree."""
    return (sum(shape) / math.prod(shape)) ** power_scale


def layer_nnz(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    distribution: str = "erk",
    *,
    erk_power_scale: float = 1.0,
    custom: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Active-weight count per layer.

    The global budget over the non-custom layers is ``Σ_l (N_l - floor(S·N_l))`` for both distributions, so uniform
    and ERK train the same number of weights. ERK hits it exactly: ε is solved as in RigL (layers it would push above
    density 1 become dense and the rest are re-solved) and the fractional counts are rounded by largest remainder.
    Layers in ``custom`` get their own density and stay outside the budget.
    """
    density = check_density(density)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    custom = dict(custom or {})
    unknown = set(custom) - set(shapes)
    if unknown:
        raise ValueError(f"custom densities name unknown layers {sorted(unknown)}; known: {sorted(shapes)}")
    out = {name: nnz_for_density(math.prod(shapes[name]), check_density(d, f"density of {name}"))
           for name, d in custom.items()}
    free = [n for n in shapes if n not in custom]
    numel = {n: math.prod(shapes[n]) for n in free}
    if distribution == "uniform" or erk_power_scale == 0:
        out.update({n: nnz_for_density(numel[n], density) for n in free})
        return {n: out[n] for n in shapes}

    budget = sum(nnz_for_density(numel[n], density) for n in free)
    raw = {n: erk_raw_scores(shapes[n], erk_power_scale) for n in free}
    dense: set[str] = set()
    while True:
        rest = [n for n in free if n not in dense]
        remaining = budget - sum(numel[n] for n in dense)
        eps = remaining / sum(raw[n] * numel[n] for n in rest) if rest else 0.0
        over = [n for n in rest if eps * raw[n] > 1.0]
        if not over:
            break
        top = max(raw[n] for n in over)
        dense.update(n for n in over if raw[n] == top)
    exact = {n: eps * raw[n] * numel[n] for n in rest}
    counts = {n: math.floor(v) for n, v in exact.items()}
    shortfall = remaining - sum(counts.values())
    for n in sorted(rest, key=lambda n: exact[n] - counts[n], reverse=True)[:shortfall]:
        counts[n] += 1
    out.update({n: numel[n] for n in dense})
    out.update(counts)
    return {n: out[n] for n in shapes}
