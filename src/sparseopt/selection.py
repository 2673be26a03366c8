"""The one primitive every mask update is built from: drop the weakest active entries, grow the strongest others."""

from __future__ import annotations

import torch


def drop_and_grow(mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, n: int) -> torch.Tensor:
    """Return a new mask with the same nnz: ``n`` active entries with the smallest ``drop_score`` are dropped, then
    the ``n`` entries with the largest ``grow_score`` among all not kept (just-dropped ones included) are grown.

    Inactive entries are never "kept" (their drop score is +inf, the JaxPruner rule), and kept entries never compete
    for growth (-inf), so the count is exact whatever the scores' ties. Two ``topk`` calls of size ``n``: no sort.
    """
    if n <= 0:
        return mask.clone()
    flat_mask = mask.reshape(-1)
    inf = torch.tensor(float("inf"), dtype=drop_score.dtype, device=drop_score.device)
    dropped = torch.topk(torch.where(flat_mask, drop_score.reshape(-1), inf), n, largest=False, sorted=False).indices
    kept = flat_mask.clone()
    kept[dropped] = False
    neg_inf = torch.tensor(float("-inf"), dtype=grow_score.dtype, device=grow_score.device)
    grown = torch.topk(torch.where(kept, neg_inf, grow_score.reshape(-1)), n, sorted=False).indices
    kept[grown] = True
    return kept.view_as(mask)
