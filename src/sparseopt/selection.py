"""The one primitive every mask update is built from: drop the weakest active entries, grow the strongest others.

Each full-size pass runs on the native kernels of :mod:`sparseopt.native.selection` where they apply (float32
contiguous CPU tensors) and on torch ops otherwise; both paths give the same indices in the same order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sparseopt.native import selection as native
from sparseopt.native.selection import fill_at_

#: Below this many scores :func:`topk_indices` picks over all of them (:func:`_pick`) without the sampled bracket
#: (measured on torch ops: at k = 0.3 n, the drop selection's, the bracket pays from about 10^5 scores; not
#: re-tuned for the native kernels, where the bracket measured 19-26 % faster at 2^18-2^21 scores).
SAMPLED_TOPK_MIN = 1 << 16
#: Below this many scores :func:`topk_outside` picks over all not-excluded entries (measured).
SAMPLED_GROW_MIN = 1 << 14
_SAMPLE = 1 << 12        # the drop selection's sample: k = 0.3 n leaves a wide band whatever the sample
_GROW_SAMPLE = 1 << 14   # the grow selection's: every candidate beyond k costs a gather and a topk slot
_MARGIN_SIGMAS = 5.0


@dataclass(frozen=True)
class MaskChange:
    """What a drop-and-grow changed, as flat indices, so applying it costs O(changed entries), not O(weights)."""

    removed: torch.Tensor      # active before, inactive now
    added: torch.Tensor        # inactive before, active now (grown, not regrown); as many as removed
    removed_at: torch.Tensor   # where the removed entries sit in ``active`` (to replace them by the added ones)


def drop_and_grow_(mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, n: int,
                   active: torch.Tensor | None = None, work: torch.Tensor | None = None,
                   grow_absolute: bool = False) -> MaskChange:
    """Update ``mask`` in place: drop the ``n`` active entries with the smallest ``drop_score``, then grow the ``n``
    entries with the largest ``grow_score`` among all not kept (just-dropped ones included); nnz is unchanged.

    ``drop_score`` holds one score per *active* entry, in the order of ``active`` (the flat indices of the active
    entries; by default ``mask.nonzero()``, i.e. ``score[mask]``), so the drop selection runs over nnz entries, not
    the whole tensor. ``grow_score`` is full-size and only read: the grow selection (:func:`topk_outside`) leaves
    the active entries out by the mask and takes the just-dropped ones as a list, so nothing is written into the
    scores and the regrown entries come out of the selection itself. ``work``: an optional float buffer of at
    least ``grow_score.numel()`` entries the selections may overwrite (saves allocating one per call).
    ``grow_absolute``: grow by ``|grow_score|`` (RigL passes the gradient itself; see :func:`topk_outside`). Two
    selections of size ``n``, linear in the number of scores.
    """
    flat = mask.view(-1)
    if active is None:
        active = flat.nonzero().squeeze(1)
    if n <= 0:
        return MaskChange(active[:0], active[:0], active[:0])
    if drop_score.numel() != active.numel():
        raise ValueError(f"drop_score has {drop_score.numel()} entries for {active.numel()} active weights")
    dropped_at = topk_indices(drop_score, n, largest=False, work=work)
    dropped = active.index_select(0, dropped_at)
    grown, regrown, regrown_at = topk_outside(grow_score.reshape(-1), n, flat, active.numel(), also=dropped,
                                              work=work, absolute=grow_absolute)
    if regrown_at.numel():
        again = torch.zeros(n, dtype=torch.bool, device=mask.device).index_fill_(0, regrown_at, True)
        dropped, dropped_at = _without_flagged(again, dropped, dropped_at)
        (grown,) = _without_flagged(regrown, grown)
    fill_at_(flat, dropped, False)
    fill_at_(flat, grown, True)
    return MaskChange(dropped, grown, dropped_at)


def _without_flagged(flags: torch.Tensor, *arrays: torch.Tensor) -> list[torch.Tensor]:
    """The entries of each of ``arrays`` (fresh tensors as long as the bool ``flags``) where ``flags`` is False,
    in some order, the same for all: the few flagged entries at the front are overwritten, in place, by the
    unflagged ones at the back. One ``nonzero`` over few hits, not a boolean index that writes almost all; one
    native pass where the kernel applies (int64 arrays), with the same result."""
    lib = native.kernels_for(flags, *arrays) if all(a.dtype == torch.long for a in arrays) else None
    if lib is not None:
        return native.without_flagged(lib, flags, arrays)
    flagged = flags.nonzero().squeeze(1)
    keep = flags.numel() - flagged.numel()
    holes = flagged[flagged < keep]
    movers = (~flags[keep:]).nonzero().squeeze(1).add_(keep)    # as many as holes
    out = []
    for a in arrays:
        a.index_copy_(0, holes, a.index_select(0, movers))
        out.append(a[:keep])
    return out


@functools.lru_cache(maxsize=256)
def _prime_stride(n: int, sample: int = _SAMPLE) -> int:
    """A prime near ``n / sample``: a strided sample that does not lock onto a row or channel period."""
    c = max(2, n // sample)
    while any(c % d == 0 for d in range(2, int(c ** 0.5) + 1)):
        c += 1
    return c


def _compact(hit: torch.Tensor, few: bool) -> torch.Tensor:
    """``hit.nonzero()`` of a 1-D bool tensor, as flat indices. ``few``: most entries are False, so first find
    the 8-entry words (one int64 each) holding a True entry and scan only inside those: ``nonzero`` costs about a
    nanosecond per entry scanned, and this scans an eighth plus the words hit."""
    n = hit.numel()
    head = n - n % 8
    if not few or head < 64 or hit.storage_offset() % 8:
        return hit.nonzero().squeeze(1)
    body = hit[:head]
    words = body.view(torch.int64).nonzero().squeeze(1)
    inside = body.view(-1, 8).index_select(0, words).view(-1).nonzero().squeeze(1)
    out = words.index_select(0, inside >> 3).mul_(8).add_(inside & 7)
    if head < n:
        out = torch.cat([out, hit[head:].nonzero().squeeze(1).add_(head)])
    return out


def _beyond(x: torch.Tensor, t: torch.Tensor, largest: bool, out: torch.Tensor) -> torch.Tensor:
    """Bool: the entries strictly better than ``t`` (above it, or below when not ``largest``). The comparison
    goes to float 0/1 in ``out`` and then to bool: on CPU both are vectorised, a comparison straight to bool is
    not (3x slower). NaN compares false, so it is never beyond."""
    (torch.gt if largest else torch.lt)(x, t, out=out)
    return out.to(torch.bool)


def topk_indices(x: torch.Tensor, k: int, largest: bool = True, min_numel: int | None = None,
                 work: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices (unordered) of the ``k`` largest (or smallest) entries of the 1-D ``x``, in O(numel).

    The same set as ``torch.topk(x, k, largest=largest).indices`` when ``x`` has no ties at the k-th value, and
    exactly ``k`` entries with ties. A strided sample of ~16k scores brackets the k-th value by two thresholds
    (its rank ± 5 standard deviations); entries beyond the inner one are in, and an exact pick (:func:`_pick`) over
    the thin band between the two (a few % of the entries) fixes the rest. When the sample misses (the counts do
    not bracket k), it falls back to the pick over all scores, so the result never depends on the sample's luck,
    only the time. NaN scores are never selected on the sampled path; they should not occur in masks' scores.
    Below ``min_numel`` scores (default ``SAMPLED_TOPK_MIN``, measured) the pick over all is faster and is used.
    ``work``: an optional float buffer of at least ``x.numel()`` entries to compare into.
    """
    n = x.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    if n < (SAMPLED_TOPK_MIN if min_numel is None else min_numel) or k >= n:
        return _pick(x, min(k, n), largest)
    stride = _prime_stride(n)
    bounds = _sample_bounds(x[stride // 2::stride], k / n, (True, True), largest)
    if bounds is None:
        return _pick(x, k, largest)
    outer_t, inner_t, share = bounds      # the k-th value lies between them; ``inner_t`` is the stricter one
    lib = native.kernels_for(x)
    if lib is not None:   # one pass for both lists; the same lists, in the same order, as the torch ops below
        n_sure, sure, band, band_scores = native.bracket(lib, x, float(inner_t), float(outer_t), largest, k,
                                                         int(share * n) + 1024)
        if n_sure > k or n_sure + band.numel() < k:
            return _pick(x, k, largest)
        band_at = _pick(band_scores, k - n_sure, largest)
        return torch.cat([sure, band.index_select(0, band_at)])
    out = work[:n] if work is not None else torch.empty_like(x)
    beyond = _beyond(x, inner_t, largest, out)
    sure = _compact(beyond, few=k < n // 8)
    if sure.numel() > k:
        return _pick(x, k, largest)
    # the band: reached outer_t (not strictly worse than it) but not beyond inner_t (beyond implies reached)
    (torch.ge if largest else torch.le)(x, outer_t, out=out)
    band = _compact(out.to(torch.bool) ^ beyond, few=True)
    if sure.numel() + band.numel() < k:
        return _pick(x, k, largest)
    band_at = _pick(x.index_select(0, band), k - sure.numel(), largest)
    return torch.cat([sure, band.index_select(0, band_at)])


def _pick(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Positions of the ``k`` best of the 1-D ``scores``: every entry strictly better than the k-th best value,
    then those equal to it, lowest positions first. Without ties the set ``torch.topk`` gives; with ties a
    definite one, so the native kernel (a radix select, where it applies) and the torch ops here give the
    same positions in the same order. Scores with a NaN go to ``torch.topk`` on both paths (it ranks NaN first)."""
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    lib = native.kernels_for(scores)
    if lib is not None:
        at = native.pick(lib, scores, k, largest)
    elif bool(torch.isnan(scores).any()):
        at = None
    else:
        v = torch.kthvalue(scores, n - k + 1 if largest else k).values
        sure = (scores > v if largest else scores < v).nonzero().squeeze(1)
        at = torch.cat([sure, (scores == v).nonzero().squeeze(1)[:k - sure.numel()]])
    return torch.topk(scores, k, largest=largest, sorted=False).indices if at is None else at


def _sample_bounds(sample: torch.Tensor, fraction: float, which: tuple[bool, bool], largest: bool,
                   valid: int | None = None):
    """From a sample of the scores, the values at the rank of the best ``fraction`` of them ± 5 standard
    deviations: (outer, inner, share), the looser and the stricter threshold (each only if asked for in
    ``which``) and the share of the sample at least as good as the outer one; None when the margin runs off
    either end of the sample. ``valid``: how many entries of the sample count, the others being worst of all
    (-inf for ``largest``)."""
    total = sample.numel()
    s = total if valid is None else valid
    rank = fraction * s
    margin = _MARGIN_SIGMAS * (rank * (1 - fraction)) ** 0.5 + 2
    outer, inner = int(rank + margin), int(rank - margin)    # 0-based positions, best first
    if outer >= s or (which[1] and inner < 0):
        return None

    lib = native.kernels_for(sample.contiguous())
    sample = sample.contiguous() if lib is not None else sample

    def at(position: int) -> torch.Tensor | float:
        j = total - position if largest else position + 1                # 1-based rank, ascending
        value = native.kth(lib, sample, j - 1) if lib is not None else None  # the same value, by a radix select
        return torch.kthvalue(sample, j).values if value is None else value

    return (at(outer) if which[0] else None), (at(inner) if which[1] else None), (outer + 1) / s


def topk_outside(x: torch.Tensor, k: int, excluded: torch.Tensor, n_excluded: int, also: torch.Tensor | None = None,
                 work: torch.Tensor | None = None, min_numel: int | None = None, absolute: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of the 1-D ``x`` among those where the bool ``excluded`` is False (``n_excluded``
    of them are True) and those listed in ``also`` (distinct flat indices of excluded entries), without writing
    -inf into ``x``: the set ``torch.topk`` gives on ``x`` with the other excluded entries at -inf when there are
    no ties at the k-th value, and exactly ``k`` with ties. Returns the flat indices, a bool per index saying it
    came from ``also``, and where in ``also`` those sit.

    A strided sample of the eligible scores gives a threshold t safely below the k-th value (its rank + 5 standard
    deviations); the candidates are the not-excluded entries strictly above t (a few % of them: one comparison,
    one bool AND-NOT with ``excluded`` and one ``nonzero``) and the ``also`` entries above t, and :func:`_pick`
    over their scores picks k. At least k candidates means every entry at least as large as the k-th is among
    them, so the result is exact; fewer (the sample missed) falls back to the pick over all eligible
    entries, so the result never depends on the sample's luck, only the time. NaN scores are never candidates.
    Below ``min_numel`` scores (default ``SAMPLED_GROW_MIN``, measured) that fallback is the faster way and is
    used. ``work``: an optional float buffer of at least ``x.numel()`` entries to compare into. ``absolute``: the
    scores are ``|x|`` (RigL's |g| from the gradient itself: the native scan takes the magnitude on the fly, one
    full-size pass less; the torch path computes ``x.abs()`` first).

    Where the native kernels apply (:mod:`sparseopt.native.selection`) the comparison, the AND-NOT and the
    compaction are one pass that also returns the candidates' scores, and the pick among them is one
    radix select; the same candidates and the same result as the torch ops.
    """
    n = x.numel()
    lib = native.kernels_for(x, excluded)
    if absolute and lib is None:
        x, absolute = x.abs(), False
    also = x.new_empty(0, dtype=torch.long) if also is None else also
    at_also = native.gather_at(x, also, absolute)
    pool = n - n_excluded + also.numel()
    if k <= 0:
        return also[:0], also[:0].bool(), also[:0]
    if k > pool:
        raise ValueError(f"cannot select {k} of {pool} eligible entries")
    candidates = None
    if n >= (SAMPLED_GROW_MIN if min_numel is None else min_numel) and k < pool:
        stride = _prime_stride(n, _GROW_SAMPLE)
        start = stride // 2
        if lib is not None:
            sample, valid = native.sample(lib, x, excluded, start, stride, absolute, at_also)
            valid += sample.numel() - len(range(start, n, stride))
        else:
            skip = excluded[start::stride]
            valid = skip.numel() - int(skip.sum())
            strided = x[start::stride].abs() if absolute else x[start::stride]
            sample = torch.cat([strided.masked_fill(skip, float("-inf")), at_also[start::stride]])
            valid += sample.numel() - skip.numel()
        bounds = _sample_bounds(sample, k / pool, (True, False), largest=True, valid=valid) if valid else None
        if bounds is not None:
            t = bounds[0]
            expected = bounds[2] * pool / n                      # the share of entries expected to be candidates
            if lib is not None:   # compare, AND-NOT and compaction in one pass; the torch ops' list and order
                outside, outside_scores = native.above(lib, x, float(t), excluded, absolute,
                                                       int(expected * n) + 4096)
            else:
                above = _beyond(x, t, True, work[:n] if work is not None else torch.empty_like(x))
                outside = _compact(torch.gt(above, excluded, out=above), few=expected < 0.025)
                outside_scores = None
            inside = (at_also > t).nonzero().squeeze(1)          # positions in ``also``
            if outside.numel() + inside.numel() >= k:
                candidates, candidate_scores = outside, outside_scores
    if candidates is None:
        candidates, candidate_scores = (~excluded).nonzero().squeeze(1), None
        inside = torch.arange(also.numel(), device=x.device)
    if candidate_scores is None:
        candidate_scores = native.gather_at(x, candidates, absolute)
    scores = torch.cat([candidate_scores, at_also.index_select(0, inside)])
    at = _pick(scores, k, True)
    came = at >= candidates.numel()
    chosen = torch.cat([candidates, also.index_select(0, inside)]).index_select(0, at)
    return chosen, came, inside.index_select(0, at[came] - candidates.numel())


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
