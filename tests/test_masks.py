import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparseopt.masks import fan_in, random_mask, select_sparse_params


def convnet():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8, 4))


def names(params):
    return [p.name for p in params]


def test_default_sparse_set_skips_stem_keeps_last_and_never_bn_or_bias():
    assert names(select_sparse_params(convnet())) == ["3.weight", "6.weight"]


def test_first_and_last_layer_switches():
    m = convnet()
    assert names(select_sparse_params(m, prune_first_layer=True)) == ["0.weight", "3.weight", "6.weight"]
    assert names(select_sparse_params(m, prune_last_layer=False)) == ["3.weight"]


def test_include_exclude_patterns_and_module_types():
    m = convnet()
    assert names(select_sparse_params(m, include=["0.*", "6.*"])) == ["0.weight", "6.weight"]
    assert names(select_sparse_params(m, exclude=["6.*"])) == ["3.weight"]
    assert names(select_sparse_params(m, module_types=[nn.Linear], prune_first_layer=True)) == ["6.weight"]


def test_unknown_pattern_is_named():
    with pytest.raises(ValueError, match="'layer9.\\*' matches no sparsifiable weight"):
        select_sparse_params(convnet(), exclude=["layer9.*"])


def test_model_without_layers_explains_fix():
    with pytest.raises(ValueError, match="no weights of types"):
        select_sparse_params(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()))


def test_everything_excluded_is_an_error():
    with pytest.raises(ValueError, match="no weight is left"):
        select_sparse_params(convnet(), exclude=["*"])


@given(rows=st.integers(1, 20), cols=st.integers(1, 20), frac=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_random_mask_has_exact_count(rows, cols, frac, seed):
    nnz = round(frac * rows * cols)
    g = torch.Generator().manual_seed(seed)
    m = random_mask((rows, cols), nnz, g)
    assert m.dtype == torch.bool and m.shape == (rows, cols) and int(m.sum()) == nnz
    assert fan_in(m).sum() == nnz


def test_random_mask_is_reproducible_from_its_generator():
    a = random_mask((10, 10), 30, torch.Generator().manual_seed(1))
    b = random_mask((10, 10), 30, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_a_tied_weight_gets_one_mask():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(nn.Linear(4, 4), a, nn.ReLU(), b)
    assert names(select_sparse_params(model)) == ["1.weight"]
