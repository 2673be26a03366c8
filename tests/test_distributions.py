import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparseopt.distributions import erk_raw_scores, layer_nnz
from sparseopt.masks import nnz_for_density

shape_st = st.one_of(
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    st.tuples(st.integers(1, 32), st.integers(1, 32), st.sampled_from([1, 3]), st.sampled_from([1, 3])),
)
shapes_st = st.lists(shape_st, min_size=1, max_size=6).map(lambda ss: {f"l{i}.weight": s for i, s in enumerate(ss)})


def budget(shapes, density):
    return sum(nnz_for_density(math.prod(s), density) for s in shapes.values())


@given(shapes=shapes_st, density=st.floats(0.01, 1.0), p=st.sampled_from([0.5, 1.0, 2.0]))
def test_erk_meets_budget_exactly_and_follows_formula(shapes, density, p):
    nnz = layer_nnz(shapes, density, "erk", erk_power_scale=p)
    assert sum(nnz.values()) == budget(shapes, density)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    assert all(0 <= nnz[n] <= sizes[n] for n in shapes)
    sparse = [n for n in shapes if nnz[n] < sizes[n]]
    if len(sparse) >= 2:
        # Layers ERK did not force dense share one epsilon: density_l ∝ raw_l, up to one weight of rounding.
        raw = {n: erk_raw_scores(shapes[n], p) for n in sparse}
        remaining = budget(shapes, density) - sum(sizes[n] for n in shapes if n not in sparse)
        eps = remaining / sum(raw[n] * sizes[n] for n in sparse)
        for n in sparse:
            assert abs(nnz[n] - eps * raw[n] * sizes[n]) < 1.0 + 1e-6
    for n in shapes:
        if n not in sparse and len(sparse) > 0:
            # a layer is dense only because its ERK density would exceed 1: its raw score is at least every other
            assert erk_raw_scores(shapes[n], p) >= max(erk_raw_scores(shapes[m], p) for m in sparse) - 1e-12


@given(shapes=shapes_st, density=st.floats(0.01, 1.0))
def test_uniform_is_exact_per_layer(shapes, density):
    nnz = layer_nnz(shapes, density, "uniform")
    for n, s in shapes.items():
        assert nnz[n] == math.prod(s) - math.floor((1 - density) * math.prod(s) + 1e-9)


def test_erk_known_values():
    # Two linear layers 100x100 and 10x100: raw = 0.02 and 0.11; budget 0.1 * 11000 = 1100.
    nnz = layer_nnz({"a": (100, 100), "b": (10, 100)}, 0.1, "erk")
    eps = 1100 / (0.02 * 10000 + 0.11 * 1000)
    assert nnz == {"a": round(eps * 0.02 * 10000), "b": 1100 - round(eps * 0.02 * 10000)}
    assert sum(nnz.values()) == 1100


def test_erk_pushes_small_layers_dense_and_resolves():
    nnz = layer_nnz({"big": (512, 512), "tiny": (2, 2)}, 0.5, "erk")
    assert nnz["tiny"] == 4
    assert sum(nnz.values()) == budget({"big": (512, 512), "tiny": (2, 2)}, 0.5)


def test_power_scale_zero_is_uniform():
    shapes = {"a": (30, 40), "b": (5, 7, 3, 3)}
    assert layer_nnz(shapes, 0.3, "erk", erk_power_scale=0) == layer_nnz(shapes, 0.3, "uniform")


def test_custom_layers_are_outside_the_budget():
    shapes = {"a": (30, 40), "b": (50, 40), "c": (10, 40)}
    nnz = layer_nnz(shapes, 0.2, "erk", custom={"a": 0.5})
    assert nnz["a"] == 600
    assert nnz["b"] + nnz["c"] == budget({"b": (50, 40), "c": (10, 40)}, 0.2)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_bad_density_is_named(bad):
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        layer_nnz({"a": (3, 3)}, bad)


def test_unknown_distribution_and_custom_layer():
    with pytest.raises(ValueError, match="unknown distribution 'er'"):
        layer_nnz({"a": (3, 3)}, 0.5, "er")
    with pytest.raises(ValueError, match=r"unknown layers \['zz'\]"):
        layer_nnz({"a": (3, 3)}, 0.5, custom={"zz": 0.5})
