"""The native selection kernels (sparseopt/native/selection_kernels.cpp) give exactly what the torch path of
sparseopt.selection gives: the same candidate lists, the same picks (ties included), the same masks and changes."""

import contextlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseopt import selection
from sparseopt.native import selection as native
from sparseopt.selection import _pick, drop_and_grow_, topk_indices, topk_outside


@contextlib.contextmanager
def torch_path():
    """The selection on torch ops only, as where the build failed or SPARSEOPT_NATIVE_KERNELS=0."""
    saved = native.library
    native.library = lambda: None
    try:
        yield
    finally:
        native.library = saved


def both(fn):
    """fn() on the native kernels and on the torch path (the native build must work here: warnings are errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is not None
    on_native = fn()
    with torch_path():
        on_torch = fn()
    return on_native, on_torch


def scores(n, seed, levels):
    """Continuous scores (levels 0), or few distinct values with -0/+0 and infinities (many ties)."""
    g = torch.Generator().manual_seed(seed)
    if levels == 0:
        return torch.randn(n, generator=g), g
    x = torch.randint(-levels, levels + 1, (n,), generator=g).float()
    x[x == 0] = torch.where(torch.rand(int((x == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    x[torch.rand(n, generator=g) < 0.05] = float("-inf")
    x[torch.rand(n, generator=g) < 0.05] = float("inf")
    return x, g


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 2000), st.floats(0.0, 1.0), st.booleans(), st.integers(0, 4), st.integers(0, 2**31 - 1))
def test_pick_is_the_same_on_both_paths_and_the_topk_set_without_ties(n, fraction, largest, levels, seed):
    x, _ = scores(n, seed, levels)
    k = max(1, int(fraction * n))
    a, b = both(lambda: _pick(x, k, largest))
    assert torch.equal(a, b) and a.numel() == k == a.unique().numel()
    if levels == 0:
        assert set(a.tolist()) == set(torch.topk(x, k, largest=largest).indices.tolist())
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[a] = True
    if k < n:
        assert (x[chosen].min() >= x[~chosen].max()) if largest else (x[chosen].max() <= x[~chosen].min())


def test_pick_with_a_nan_ranks_on_torch_topk_on_both_paths():
    x = torch.tensor([1.0, float("nan"), 3.0, 2.0])
    a, b = both(lambda: _pick(x, 2, True))
    assert set(a.tolist()) == set(b.tolist()) == set(torch.topk(x, 2).indices.tolist())


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3000), st.floats(0.0, 1.0), st.booleans(), st.integers(0, 4), st.integers(0, 2**31 - 1))
def test_sampled_topk_is_the_same_on_both_paths(n, fraction, largest, levels, seed):
    x, _ = scores(n, seed, levels)
    x = x.nan_to_num(posinf=1e30, neginf=-1e30) if levels else x
    k = int(fraction * n)
    a, b = both(lambda: topk_indices(x, k, largest=largest, min_numel=0))
    assert torch.equal(a, b) and a.numel() == k


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3000), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(0, 4),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_topk_outside_is_the_same_on_both_paths(n, excluded_share, also_share, fraction, levels, absolute, seed):
    x, g = scores(n, seed, levels)
    excluded = torch.rand(n, generator=g) < excluded_share
    listed = excluded & (torch.rand(n, generator=g) < also_share)
    also = listed.nonzero().squeeze(1)[torch.randperm(int(listed.sum()), generator=g)]
    eligible = ~excluded | listed
    k = int(fraction * int(eligible.sum()))
    a, b = both(lambda: topk_outside(x, k, excluded, int(excluded.sum()), also=also, min_numel=0, absolute=absolute))
    for got, want in zip(a, b):
        assert torch.equal(got, want)
    s = x.abs() if absolute else x
    expected = torch.topk(torch.where(eligible, s, float("-inf")), k).indices
    if levels == 0:
        assert set(a[0].tolist()) == set(expected.tolist())


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(1, 60), st.integers(1, 60)), density=st.floats(0.05, 0.95),
       seed=st.integers(0, 2**31), frac=st.floats(0, 1), absolute=st.booleans())
def test_drop_and_grow_is_the_same_on_both_paths_on_the_sampled_paths(shape, density, seed, frac, absolute):
    g = torch.Generator().manual_seed(seed)
    mask0 = torch.rand(shape, generator=g) < density
    w = torch.randn(shape, generator=g) * mask0
    grad = torch.randn(shape, generator=g)
    n = int(frac * int(mask0.sum()))
    saved = selection.SAMPLED_TOPK_MIN, selection.SAMPLED_GROW_MIN
    selection.SAMPLED_TOPK_MIN = selection.SAMPLED_GROW_MIN = 0

    def run():
        mask = mask0.clone()
        change = drop_and_grow_(mask, w.abs()[mask], grad if absolute else grad.abs(), n, grow_absolute=absolute)
        return mask, change.removed, change.added, change.removed_at

    try:
        a, b = both(run)
    finally:
        selection.SAMPLED_TOPK_MIN, selection.SAMPLED_GROW_MIN = saved
    for got, want in zip(a, b):
        assert torch.equal(got, want)


@given(st.integers(1, 5000), st.floats(-2.0, 2.0), st.booleans(), st.booleans(), st.integers(1, 64),
       st.integers(0, 2**31 - 1))
def test_above_is_compare_and_not_nonzero_whatever_the_capacity(n, t, absolute, with_excluded, capacity, seed):
    x, g = scores(n, seed, 0)
    excluded = torch.rand(n, generator=g) < 0.5 if with_excluded else None
    s = x.abs() if absolute else x
    hit = (s > t) & (~excluded if with_excluded else True)
    idx, val = native.above(native.library(), x, t, excluded, absolute, capacity)   # small capacity: a rerun
    assert torch.equal(idx, hit.nonzero().squeeze(1)) and torch.equal(val, s[idx])


@given(st.integers(1, 5000), st.booleans(), st.integers(1, 64), st.integers(0, 2**31 - 1))
def test_bracket_is_the_two_comparisons_whatever_the_capacity(n, largest, capacity, seed):
    x, _ = scores(n, seed, 3)
    inner, outer = (1.0, -1.0) if largest else (-1.0, 1.0)
    n_sure, sure, band, band_val = native.bracket(native.library(), x, inner, outer, largest, n, capacity)
    beyond = x > inner if largest else x < inner
    reached = x >= outer if largest else x <= outer
    assert n_sure == int(beyond.sum()) and torch.equal(sure, beyond.nonzero().squeeze(1))
    assert torch.equal(band, (reached ^ beyond).nonzero().squeeze(1)) and torch.equal(band_val, x[band])


def test_gather_and_fill_are_index_select_and_index_fill_and_count_as_writes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g)
    idx = torch.randperm(1000, generator=g)[:300]
    assert torch.equal(native.gather_at(x, idx, absolute=True), x.index_select(0, idx).abs())
    for p, value in ((torch.randn(1000, generator=g), 0.0), (torch.rand(1000, generator=g) < 0.5, True)):
        expected = p.clone().index_fill_(0, idx, value)
        version = p._version
        native.fill_at_(p, idx, value)
        assert torch.equal(p, expected) and p._version > version   # resume reads the version counter


def test_a_failed_native_build_warns_and_the_update_runs_on_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SPARSEOPT_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build the native selection kernels"):
            assert native.library() is None
        mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
        drop_and_grow_(mask, torch.tensor([0.2, 0.1]), torch.tensor([0.0, 0.0, 1.0, 0.5]), 1)
        assert mask.tolist() == [True, False, True, False]
    finally:
        native.library.cache_clear()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SPARSEOPT_NATIVE_KERNELS", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        native.library.cache_clear()


@given(st.integers(1, 3000), st.integers(0, 4), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_kth_is_kthvalue(n, levels, fraction, seed):
    x, _ = scores(n, seed, levels)
    rank = int(fraction * (n - 1))
    assert native.kth(native.library(), x, rank) == torch.kthvalue(x, rank + 1).values.item()   # -0 == +0


@given(st.integers(1, 3000), st.integers(0, 2**31 - 1))
def test_the_itop_merge_is_the_same_on_both_paths(n, seed):
    from sparseopt.bits import PackedMasks, unpack_mask

    g = torch.Generator().manual_seed(seed)
    start, more = torch.rand(n, generator=g) < 0.3, torch.rand(n, generator=g) < 0.1

    def run():
        packed = PackedMasks({"w": start})
        packed.merge_("w", more)
        return packed.packed()["w"]

    a, b = both(run)
    assert torch.equal(a, b) and torch.equal(unpack_mask(a, (n,)), start | more)
