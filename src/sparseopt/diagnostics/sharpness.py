"""One call for an edge-of-stability measurement on a (sparse) model: what ``sparseopt diagnose hessian`` prints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseopt.diagnostics.hessian import HessianOperator, LossFn, hutchinson_trace, lanczos, stability_threshold


def sharpness_report(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn = F.cross_entropy,
    masks: dict[str, torch.Tensor] | None = None,
    factors: dict[str, torch.Tensor] | None = None,
    k: int = 4,
    smallest: int = 0,
    lr: float | None = None,
    momentum: float = 0.0,
    nesterov: bool = False,
    physical_batch: int = 1000,
    trace_samples: int = 0,
    train_mode: bool | None = True,
    dropout: str = "error",
    seed: int = 0,
) -> dict:
    """Top-k eigenvalues of H (and P H P with ``masks``, D^1/2 P H P D^1/2 with SparseOpt ``factors``), threshold.

    For a ``SparseTraining`` ``st`` pass ``masks=st.masks, factors=st.factors()``. Keys: ``"unrestricted"``,
    ``"restricted"`` (with masks), ``"preconditioned"`` (with non-empty factors), each an ``EigenResult.to_dict()``
    plus ``"trace"`` when ``trace_samples`` >= 2; ``"threshold"`` (SPEC 6.2) when ``lr`` is given.
    """
    common = dict(loss_fn=loss_fn, physical_batch=physical_batch, train_mode=train_mode, dropout=dropout)
    variants = {"unrestricted": HessianOperator(model, x, y, **common)}
    if masks:
        variants["restricted"] = HessianOperator(model, x, y, masks=masks, **common)
    if factors:
        variants["preconditioned"] = HessianOperator(model, x, y, masks=masks, precondition=factors, **common)
    out: dict = {"k": k, "examples": len(x)}
    for name, op in variants.items():
        res = lanczos(op, k, smallest=smallest, seed=seed).to_dict()
        if trace_samples >= 2:
            res["trace"] = hutchinson_trace(op, trace_samples, seed=seed).to_dict()
        res["active_dim"] = op.active_dim
        out[name] = res
    if lr is not None:
        out["threshold"] = stability_threshold(lr, momentum, nesterov)
        out["lr"], out["momentum"], out["nesterov"] = lr, momentum, nesterov
    return out
