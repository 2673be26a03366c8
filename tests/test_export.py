"""Export: the compact safetensors file round-trips, loads without sparseopt, and CSR inference is exact."""

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import sparseopt as so
from sparseopt.execution import CSRLinear, csr_for_inference
from sparseopt.export import bake, export_sparse, load_sparse, pack_mask, unpack_mask

from helpers import mlp, train_step

ROOT = Path(__file__).resolve().parents[1]


def trained(density=0.1, steps=3):
    model = mlp((32, 64, 64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = so.SparseTraining(model, opt, density=density, topology=so.RigL(update_every=2, end_step=100))
    for step in range(steps):
        train_step(model, opt, step)
    return model, sparse


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=70), st.integers(1, 3))
def test_mask_packing_round_trips(bits, rows):
    mask = torch.tensor(bits * rows).view(rows, len(bits))
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


def test_export_round_trips_weights_and_masks(tmp_path):
    model, sparse = trained()
    # a just-grown weight is an active zero: the mask must come from the file, not from the zeros
    name = sparse.params[0].name
    idx = sparse.masks[name].view(-1).nonzero()[0]
    with torch.no_grad():
        sparse.params[0].param.view(-1)[idx] = 0.0
    summary = export_sparse(tmp_path / "m.safetensors", sparse)
    state, masks = load_sparse(summary.path)
    expected = bake(sparse)
    assert set(state) == set(model.state_dict())
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert set(masks) == set(sparse.masks)
    for key, mask in sparse.masks.items():
        assert torch.equal(masks[key], mask)
    fresh = mlp((32, 64, 64, 10), seed=1)
    fresh.load_state_dict(state)
    x = torch.randn(5, 32)
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x), model(x))
    assert summary.nnz == sum(sparse.target_nnz.values())
    assert summary.file_bytes < 0.5 * summary.dense_bytes
    assert summary.file_bytes == summary.path.stat().st_size


def test_bake_applies_masks_and_leaves_the_model_alone():
    model, sparse = trained()
    name = sparse.params[0].name
    inactive = ~sparse.masks[name]
    with torch.no_grad():
        sparse.params[0].param[inactive] = 1.0     # as if something wrote into inactive entries
    state = bake(sparse)
    assert not state[name][inactive].any()
    assert (sparse.params[0].param[inactive] == 1.0).all()
    other = next(k for k in state if k.endswith("running_mean"))
    assert torch.equal(state[other], model.state_dict()[other])


def test_documented_loader_needs_only_torch_and_safetensors(tmp_path):
    text = (ROOT / "docs" / "export.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def load_sparseopt_file" in b)
    assert "sparseopt." not in block.replace("load_sparseopt_file", "")
    assert len(block.strip().splitlines()) <= 13
    namespace = {}
    exec(block, namespace)
    _, sparse = trained()
    export_sparse(tmp_path / "m.safetensors", sparse)
    loaded = namespace["load_sparseopt_file"](str(tmp_path / "m.safetensors"))
    expected = bake(sparse)
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_tied_weights_are_stored_once_and_masked_under_both_names(tmp_path):
    torch.manual_seed(0)
    emb, head = nn.Embedding(40, 16), nn.Linear(16, 40, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(16, 16), head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = so.SparseTraining(model, opt, density=0.3, include=["*"])
    summary = export_sparse(tmp_path / "t.safetensors", sparse)
    state, masks = load_sparse(summary.path)
    baked = bake(sparse)
    tied = [k for k in baked if k.endswith("weight") and baked[k].shape == (40, 16)]
    assert len(tied) == 2
    for k in tied:
        assert torch.equal(state[k], baked[k]) and torch.equal(baked[k], baked[tied[0]])
    from safetensors import safe_open
    with safe_open(str(summary.path), framework="pt") as f:
        stored = [k for k in f.keys() if k.endswith("::values") and f.get_slice(k).get_shape()[0] > 100]
    assert len(stored) == 1 and state[tied[0]].count_nonzero() <= 0.3 * 640 + 1


def test_export_rejects_bad_input_and_writes_nothing(tmp_path):
    model, sparse = trained()
    with pytest.raises(ValueError, match="reserved"):
        export_sparse(tmp_path / "a.safetensors", sparse, metadata={"sparse": "x"})
    with pytest.raises(ValueError, match="needs masks"):
        export_sparse(tmp_path / "a.safetensors", model)
    with pytest.raises(ValueError, match="names no entry"):
        export_sparse(tmp_path / "a.safetensors", model, masks={"nope.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_sparse(tmp_path / "missing" / "a.safetensors", sparse)
    assert list(tmp_path.iterdir()) == []
    torch.save({"x": 1}, tmp_path / "not.pt")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a sparseopt export"):
        load_sparse(tmp_path / "plain.safetensors")


@pytest.mark.parametrize("batch", [1, 7, 130])
def test_csr_inference_matches_the_baked_dense_model(batch):
    model, sparse = trained(density=0.1)
    model.load_state_dict(bake(sparse))
    model.eval()
    with pytest.warns(UserWarning, match="keeps these Linear layers dense"):
        fast, converted = csr_for_inference(model)          # the first (dense stem) layer stays dense
    assert set(converted) == {"3", "6"} and all(d <= 0.3 for d in converted.values())
    assert isinstance(fast[3], CSRLinear) and type(model[3]) is nn.Linear
    x = torch.randn(batch, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_csr_inference_refuses_a_dense_model():
    with pytest.raises(ValueError, match="no nn.Linear with density"):
        csr_for_inference(mlp((4, 4, 2)))
