"""Exploration and topology health of a SparseTraining at a glance (SPEC 4, 1.8b).

Why: RigL collapse at high sparsity shows up as stalled ITOP, zero-fan-in neurons and extreme SparseOpt factors
before it shows up in the loss. Built on ``SparseTraining.report()``; adds the fraction changed and factor spread.
"""

from __future__ import annotations

import torch

from sparseopt.masks import fan_in


def factor_summary(factors: torch.Tensor, mask: torch.Tensor, out_axis: int = 0) -> dict:
    """Distribution of per-neuron SparseOpt factors c_i over neurons with at least one active input."""
    c = factors.reshape(-1).to(torch.float64)[fan_in(mask, out_axis) > 0]
    if c.numel() == 0:
        return {"neurons": 0}
    q = torch.quantile(c, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return {"neurons": int(c.numel()), "min": float(c.min()), "p05": float(q[0]), "median": float(q[1]),
            "mean": float(c.mean()), "p95": float(q[2]), "max": float(c.max())}


def itop_summary(sparse) -> dict:
    """Per-layer and total ITOP, connections changed at the last update (count and fraction of the layer's active
    weights), zero-fan-in neurons, and the SparseOpt factor distribution (layers with a preconditioner only)."""
    report = sparse.report()
    factors = sparse.factors()
    layers = []
    for row in report.layers:
        nnz = int(sparse.masks[row.name].sum())
        entry = {"name": row.name, "numel": row.numel, "density": row.density, "itop": row.itop,
                 "changed": row.changed, "changed_fraction": row.changed / nnz if nnz else 0.0,
                 "zero_fanin": row.zero_fanin, "neurons": row.neurons}
        if row.name in factors:
            entry["factors"] = factor_summary(factors[row.name], sparse.masks[row.name], row.out_axis)
        layers.append(entry)
    active = sum(int(m.sum()) for m in sparse.masks.values())
    return {"step": report.step, "itop": report.itop, "density": report.density, "changed": report.changed,
            "changed_fraction": report.changed / active if active else 0.0,
            "zero_fanin": sum(r.zero_fanin for r in report.layers), "layers": layers}
