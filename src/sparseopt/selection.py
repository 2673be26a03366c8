"""The one primitive every mask update is built from: drop the weakest active entries, grow the strongest others."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskChange:
    """What a drop-and-grow changed, as flat indices, so applying it costs O(changed entries), not O(weights)."""

    removed: torch.Tensor      # active before, inactive now
    added: torch.Tensor        # inactive before, active now (grown, not regrown); as many as removed
    removed_at: torch.Tensor   # where the removed entries sit in ``active`` (to replace them by the added ones)


def drop_and_grow_(mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, n: int,
                   active: torch.Tensor | None = None) -> MaskChange:
    """Update ``mask`` in place: drop the ``n`` active entries with the smallest ``drop_score``, then grow the ``n``
    entries with the largest ``grow_score`` among all not kept (just-dropped ones included); nnz is unchanged.

    ``drop_score`` holds one score per *active* entry, in the order of ``active`` (the flat indices of the active
    entries; by default ``mask.nonzero()``, i.e. ``score[mask]``), so the drop top-k runs over nnz entries, not
    the whole tensor; ties go to the earlier position in ``active``. ``grow_score`` is full-size and is overwritten (kept entries get
    -inf, so they never compete): pass a scratch tensor. Two ``topk`` calls of size ``n``; no sort, no full copy.
    """
    flat = mask.view(-1)
    if active is None:
        active = flat.nonzero().squeeze(1)
    if n <= 0:
        return MaskChange(active[:0], active[:0], active[:0])
    if drop_score.numel() != active.numel():
        raise ValueError(f"drop_score has {drop_score.numel()} entries for {active.numel()} active weights")
    dropped_at = torch.topk(drop_score, n, largest=False, sorted=False).indices
    dropped = active[dropped_at]
    grow = grow_score.view(-1)
    regrow_scores = grow.index_select(0, dropped)
    grow.index_fill_(0, active, float("-inf"))
    grow.index_copy_(0, dropped, regrow_scores)
    grown = torch.topk(grow, n, sorted=False).indices
    was_active = flat.index_select(0, grown)
    flat.index_fill_(0, dropped, False)
    flat.index_fill_(0, grown, True)
    gone = ~flat.index_select(0, dropped)
    return MaskChange(dropped[gone], grown[~was_active], dropped_at[gone])
