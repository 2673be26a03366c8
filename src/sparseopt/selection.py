"""The one primitive every mask update is built from: drop the weakest active entries, grow the strongest others."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

#: Below this many scores ``torch.topk`` is used directly (the sampled threshold only pays on large layers).
SAMPLED_TOPK_MIN = 1 << 19
_SAMPLE = 1 << 14
_MARGIN_SIGMAS = 5.0


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
    the whole tensor. ``grow_score`` is full-size and is overwritten (kept entries get -inf, so they never compete):
    pass a scratch tensor. Two :func:`topk_indices` selections of size ``n``, linear in the number of scores.
    """
    flat = mask.view(-1)
    if active is None:
        active = flat.nonzero().squeeze(1)
    if n <= 0:
        return MaskChange(active[:0], active[:0], active[:0])
    if drop_score.numel() != active.numel():
        raise ValueError(f"drop_score has {drop_score.numel()} entries for {active.numel()} active weights")
    dropped_at = topk_indices(drop_score, n, largest=False)
    dropped = active[dropped_at]
    grow = grow_score.view(-1)
    regrow_scores = grow.index_select(0, dropped)
    grow.index_fill_(0, active, float("-inf"))
    grow.index_copy_(0, dropped, regrow_scores)
    grown = topk_indices(grow, n)
    was_active = flat.index_select(0, grown)
    flat.index_fill_(0, dropped, False)
    flat.index_fill_(0, grown, True)
    gone = ~flat.index_select(0, dropped)
    return MaskChange(dropped[gone], grown[~was_active], dropped_at[gone])


@functools.lru_cache(maxsize=256)
def _prime_stride(n: int) -> int:
    """A prime near ``n / _SAMPLE``: a strided sample that does not lock onto a row or channel period."""
    c = max(2, n // _SAMPLE)
    while any(c % d == 0 for d in range(2, int(c ** 0.5) + 1)):
        c += 1
    return c


def topk_indices(x: torch.Tensor, k: int, largest: bool = True, min_numel: int | None = None) -> torch.Tensor:
    """Flat indices (unordered) of the ``k`` largest (or smallest) entries of the 1-D ``x``, in O(numel).

    The same set as ``torch.topk(x, k, largest=largest).indices`` when ``x`` has no ties at the k-th value, and
    exactly ``k`` entries with ties. A strided sample of ~16k scores brackets the k-th value by two thresholds
    (its rank ± 5 standard deviations); entries beyond the outer one are in, and an exact ``torch.topk`` over the
    thin band between the two (about 1% of the entries) fixes the rest. When the sample misses (the counts do not
    bracket k), it falls back to ``torch.topk``, so the result never depends on the sample's luck, only the time.
    NaN scores are never selected (``torch.topk`` ranks them first); they should not occur in masks' scores.
    Below ``min_numel`` scores (default ``SAMPLED_TOPK_MIN``, measured) ``torch.topk`` is faster and is used.
    """
    n = x.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    if n < (SAMPLED_TOPK_MIN if min_numel is None else min_numel) or k >= n:
        return torch.topk(x, min(k, n), largest=largest, sorted=False).indices
    stride = _prime_stride(n)
    sample = torch.sort(x[stride // 2::stride], descending=largest).values
    s = sample.numel()
    rank = k * s / n
    margin = _MARGIN_SIGMAS * (rank * (1 - k / n)) ** 0.5 + 2
    outer, inner = int(rank + margin), int(rank - margin)
    if outer >= s or inner < 0:
        return torch.topk(x, k, largest=largest, sorted=False).indices
    outer_t, inner_t = sample[outer], sample[inner]   # k-th value between them: ``inner_t`` is the stricter one
    reached = x >= outer_t if largest else x <= outer_t
    beyond = x > inner_t if largest else x < inner_t
    band = (reached ^ beyond).nonzero().squeeze(1)     # beyond implies reached: the thin band between them
    sure = beyond.nonzero().squeeze(1)
    if sure.numel() > k or sure.numel() + band.numel() < k:
        return torch.topk(x, k, largest=largest, sorted=False).indices
    band_at = torch.topk(x.index_select(0, band), k - sure.numel(), largest=largest, sorted=False).indices
    return torch.cat([sure, band[band_at]])


def drop_and_grow_per_neuron_(mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, n: int,
                              active: torch.Tensor, out_axis: int = 0) -> MaskChange:
    """:func:`drop_and_grow_` within each output neuron (along ``out_axis``): every neuron drops its ``n`` active
    entries with the smallest ``drop_score`` and grows ``n`` of its entries with the largest ``grow_score`` among
    those not kept, so every neuron's fan-in is unchanged (constant fan-in masks).

    ``drop_score`` is per active entry in the order of ``active``, as for :func:`drop_and_grow_`; ``grow_score``
    is full-size and overwritten. Every neuron needs at least ``n`` active entries."""
    from sparseopt.masks import unit_grid

    if n <= 0:
        return MaskChange(active[:0], active[:0], active[:0])
    if drop_score.numel() != active.numel():
        raise ValueError(f"drop_score has {drop_score.numel()} entries for {active.numel()} active weights")
    flat = mask.view(-1)
    grid = unit_grid(mask.shape, out_axis, mask.device)
    drop = torch.full((flat.numel(),), float("inf"), dtype=drop_score.dtype, device=drop_score.device)
    drop.index_copy_(0, active, drop_score)
    dropped = grid.gather(1, torch.topk(drop[grid], n, dim=1, largest=False, sorted=False).indices).reshape(-1)
    grow = grow_score.view(-1)
    regrow_scores = grow.index_select(0, dropped)
    grow.index_fill_(0, active, float("-inf"))
    grow.index_copy_(0, dropped, regrow_scores)
    grown = grid.gather(1, torch.topk(grow[grid], n, dim=1, sorted=False).indices).reshape(-1)
    was_active = flat.index_select(0, grown)
    flat.index_fill_(0, dropped, False)
    flat.index_fill_(0, grown, True)
    removed = dropped[~flat.index_select(0, dropped)]
    position = torch.full((flat.numel(),), -1, dtype=torch.long, device=mask.device)
    position.index_copy_(0, active, torch.arange(active.numel(), device=mask.device))
    return MaskChange(removed, grown[~was_active], position.index_select(0, removed))
