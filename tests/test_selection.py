import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseopt.selection import drop_and_grow_


def test_hand_built_drop_smallest_active_grow_largest_gradient():
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    w = torch.tensor([0.5, -0.1, 0.3, -0.05, 0.0, 0.0, 0.0, 0.0])
    g = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.9, 0.1, 0.7, 0.2])
    change = drop_and_grow_(mask, w.abs()[mask], g.abs(), 2)
    # drop |w| = 0.05 and 0.1 (entries 3, 1); grow |g| = 0.9 and 0.7 (entries 4, 6)
    assert mask.tolist() == [True, False, True, False, True, False, True, False]
    assert sorted(change.removed.tolist()) == [1, 3] and sorted(change.added.tolist()) == [4, 6]


def test_just_dropped_entries_can_be_regrown():
    mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    w = torch.tensor([0.2, 0.1, 0.0, 0.0])
    g = torch.tensor([0.0, 5.0, 1.0, 0.5])  # the dropped entry 1 has the largest gradient
    change = drop_and_grow_(mask, w.abs()[mask], g.abs(), 1)
    assert mask.tolist() == [True, True, False, False]
    assert change.removed.numel() == 0 and change.added.numel() == 0  # regrown: nothing changed


def test_zero_valued_active_weight_is_dropped_before_any_inactive_entry():
    mask = torch.tensor([1, 1, 0], dtype=torch.bool)
    drop_and_grow_(mask, torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0, 3.0]), 1)
    assert mask.tolist() == [False, True, True]


def reference_drop_and_grow(mask, w, g, n):
    """The same rule by full sorting (the slow way), for continuous scores without ties."""
    flat_mask, aw, ag = mask.flatten(), w.abs().flatten(), g.abs().flatten()
    active = flat_mask.nonzero().flatten()
    dropped = active[torch.argsort(aw[active])[:n]]
    kept = flat_mask.clone()
    kept[dropped] = False
    candidates = (~kept).nonzero().flatten()
    grown = candidates[torch.argsort(ag[candidates], descending=True)[:n]]
    kept[grown] = True
    return kept.view_as(mask)


@given(shape=st.tuples(st.integers(1, 12), st.integers(1, 12)), density=st.floats(0.05, 0.95),
       seed=st.integers(0, 2**31), frac=st.floats(0, 1))
def test_matches_full_sort_reference_and_preserves_nnz(shape, density, seed, frac):
    _check_against_reference(shape, density, seed, frac)


def _check_against_reference(shape, density, seed, frac):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < density
    nnz = int(mask.sum())
    n = int(frac * nnz)
    w = torch.randn(shape, generator=g) * mask
    grad = torch.randn(shape, generator=g)
    expected = reference_drop_and_grow(mask, w, grad, n)
    old = mask.clone()
    change = drop_and_grow_(mask, w.abs()[mask], grad.abs(), n)
    assert int(mask.sum()) == nnz
    assert torch.equal(mask, expected)
    flat_old, flat_new = old.flatten(), mask.flatten()
    assert torch.equal(torch.sort(change.removed).values, (flat_old & ~flat_new).nonzero().flatten())
    assert torch.equal(torch.sort(change.added).values, (flat_new & ~flat_old).nonzero().flatten())


# ---- the linear-time top-k selection -------------------------------------------------------------------------------
from sparseopt.selection import topk_indices  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000), st.floats(0.0, 1.0), st.booleans(), st.integers(0, 2**31 - 1))
def test_sampled_topk_is_the_topk_set_without_ties(n, fraction, largest, seed):
    x = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).float() / 7   # distinct values
    k = int(fraction * n)
    got = topk_indices(x, k, largest=largest, min_numel=0)
    expected = torch.topk(x, k, largest=largest).indices
    assert got.numel() == k and set(got.tolist()) == set(expected.tolist())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000), st.floats(0.0, 1.0), st.booleans(), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_sampled_topk_keeps_the_exact_count_with_ties(n, fraction, largest, levels, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n,), generator=g).float()
    x[torch.rand(n, generator=g) < 0.2] = float("-inf")                      # kept entries of a grow score
    k = int(fraction * n)
    got = topk_indices(x, k, largest=largest, min_numel=0)
    assert got.numel() == k == got.unique().numel()
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[got] = True
    if 0 < k < n:  # every chosen score is at least as good as every one left out
        assert (x[chosen].min() >= x[~chosen].max()) if largest else (x[chosen].max() <= x[~chosen].min())


def test_sampled_topk_on_a_large_tensor_takes_the_sampled_path_and_matches():
    x = torch.randn(600_000, generator=torch.Generator().manual_seed(0))
    for k, largest in [(18_000, True), (180_000, False)]:
        assert set(topk_indices(x, k, largest=largest).tolist()) == set(
            torch.topk(x, k, largest=largest).indices.tolist())


# ---- the grow selection: largest among the not-excluded entries plus a list (the just-dropped) ---------------------
from sparseopt import selection  # noqa: E402
from sparseopt.selection import _compact, topk_outside  # noqa: E402


def _outside_case(n, seed, excluded_share, also_share):
    g = torch.Generator().manual_seed(seed)
    excluded = torch.rand(n, generator=g) < excluded_share
    listed = excluded & (torch.rand(n, generator=g) < also_share)
    also = listed.nonzero().squeeze(1)[torch.randperm(int(listed.sum()), generator=g)]
    return g, excluded, listed, also


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3000), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_topk_outside_is_the_topk_with_kept_entries_at_minus_inf(n, excluded_share, also_share, fraction, seed):
    g, excluded, listed, also = _outside_case(n, seed, excluded_share, also_share)
    x = torch.randperm(n, generator=g).float() / 7                          # distinct values
    eligible = ~excluded | listed
    k = int(fraction * int(eligible.sum()))
    got, came, at = topk_outside(x, k, excluded, int(excluded.sum()), also=also, min_numel=0)
    expected = torch.topk(torch.where(eligible, x, float("-inf")), k).indices
    assert got.numel() == k and set(got.tolist()) == set(expected.tolist())
    assert torch.equal(came, excluded[got])                                 # came from ``also`` = was excluded
    assert torch.equal(torch.sort(also[at]).values, torch.sort(got[came]).values)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000), st.floats(0.0, 1.0), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_topk_outside_keeps_the_exact_count_with_ties(n, fraction, levels, seed):
    g, excluded, listed, also = _outside_case(n, seed, 0.3, 0.5)
    x = torch.randint(0, levels, (n,), generator=g).float()
    eligible = ~excluded | listed
    k = int(fraction * int(eligible.sum()))
    got, _, _ = topk_outside(x, k, excluded, int(excluded.sum()), also=also, min_numel=0)
    assert got.numel() == k == got.unique().numel() and bool(eligible[got].all())
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[got] = True
    if 0 < k < int(eligible.sum()):  # every chosen score is at least as large as every eligible one left out
        assert x[chosen].min() >= x[eligible & ~chosen].max()


def test_topk_outside_on_a_large_tensor_takes_the_sampled_path_and_matches():
    g, excluded, listed, also = _outside_case(600_000, 0, 0.1, 0.3)
    x = torch.randn(600_000, generator=g).abs()
    eligible = ~excluded | listed
    got, _, _ = topk_outside(x, 18_000, excluded, int(excluded.sum()), also=also)
    expected = torch.topk(torch.where(eligible, x, float("-inf")), 18_000).indices
    assert set(got.tolist()) == set(expected.tolist())


@given(st.integers(0, 5000), st.floats(0.0, 0.2), st.integers(0, 9), st.integers(0, 2**31 - 1))
def test_compact_is_nonzero(n, density, offset, seed):
    hit = torch.rand(n + offset, generator=torch.Generator().manual_seed(seed)) < density
    for few in (True, False):
        assert torch.equal(_compact(hit[offset:], few), hit[offset:].nonzero().squeeze(1))


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(1, 40), st.integers(1, 40)), density=st.floats(0.05, 0.95),
       seed=st.integers(0, 2**31), frac=st.floats(0, 1))
def test_sampled_paths_match_the_full_sort_reference(shape, density, seed, frac):
    """The same rule as the reference with both selections on their sampled paths (thresholds at 0)."""
    saved = selection.SAMPLED_TOPK_MIN, selection.SAMPLED_GROW_MIN
    selection.SAMPLED_TOPK_MIN = selection.SAMPLED_GROW_MIN = 0
    try:
        _check_against_reference(shape, density, seed, frac)
    finally:
        selection.SAMPLED_TOPK_MIN, selection.SAMPLED_GROW_MIN = saved
