"""The one primitive every mask update is built from: drop the weakest active entries, grow the strongest others."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskChange:
    """A drop-and-grow outcome as flat indices, so applying it costs O(changed entries), not O(weights)."""

    mask: torch.Tensor       # the new mask (same shape as the old one)
    removed: torch.Tensor    # flat indices active before, inactive now
    added: torch.Tensor      # flat indices inactive before, active now (grown, not regrown)


def drop_and_grow(mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, n: int,
                  active: torch.Tensor | None = None) -> MaskChange:
    """Drop the ``n`` active entries with the smallest ``drop_score``, then grow the ``n`` entries with the largest
    ``grow_score`` among all not kept (just-dropped ones included); nnz is unchanged.

    ``drop_score`` holds one score per *active* entry, in flat-index order (``score[mask]``), so the drop top-k
    runs over nnz entries, not the whole tensor. ``grow_score`` is full-size and is overwritten (kept entries get
    -inf, so they never compete): pass a fresh tensor. Two ``topk`` calls of size ``n``; no sort, no full copies.
    ``active`` (the flat indices of the mask's active entries) may be passed when the caller has them already.
    """
    flat = mask.reshape(-1)
    if active is None:
        active = flat.nonzero().squeeze(1)
    if n <= 0:
        empty = active[:0]
        return MaskChange(mask.clone(), empty, empty)
    if drop_score.numel() != active.numel():
        raise ValueError(f"drop_score has {drop_score.numel()} entries for {active.numel()} active weights")
    dropped = active[torch.topk(drop_score, n, largest=False, sorted=False).indices]
    grow = grow_score.reshape(-1)
    regrow_scores = grow.index_select(0, dropped)
    grow.index_fill_(0, active, float("-inf"))
    grow.index_copy_(0, dropped, regrow_scores)
    grown = torch.topk(grow, n, sorted=False).indices
    new = flat.clone()
    new.index_fill_(0, dropped, False)
    new.index_fill_(0, grown, True)
    removed = dropped[~new.index_select(0, dropped)]
    added = grown[~flat.index_select(0, grown)]
    return MaskChange(new.view_as(mask), removed, added)
