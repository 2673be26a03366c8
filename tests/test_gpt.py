"""The byte-level GPT, its text data, and SuPar + RigL + SparseOpt together."""

import pytest
import torch

import sparseopt as so
from sparseopt.data.text import RandomWindowSampler, load_corpus, split_corpus, text_samplers
from sparseopt.experiments.studies.gpt_setup import build_gpt_run
from sparseopt.models.gpt import GPT, GPTConfig, alibi_slopes
from sparseopt.parameterization import Parameterization, layer_densities


def tiny(**kw):
    cfg = dict(d_model=32, n_layer=2, d_head=8, ctx=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def test_default_size_and_shapes():
    assert 0.8e6 < GPT().num_params() < 1.2e6
    model = tiny()
    idx = torch.randint(0, 256, (3, 16))
    assert model(idx).shape == (3, 16, 256)
    assert model.loss(idx, idx).ndim == 0
    names = dict(model.named_parameters())
    assert names["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert names["blocks.1.ffn.down.weight"].shape == (32, 96)
    assert names["blocks.1.ffn.up.weight"].shape == (192, 32)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of d_head"):
        GPTConfig(d_model=30, d_head=8)


@pytest.mark.parametrize("kind", ["sp", "supar"])
def test_causal(kind):
    torch.manual_seed(0)
    model = tiny()
    model.set_parameterization(Parameterization(kind, base_width=16, width=32))
    idx = torch.randint(0, 256, (2, 16))
    ref = model(idx)
    idx2 = idx.clone()
    idx2[:, 9:] = torch.randint(0, 256, (2, 7))
    out = model(idx2)
    torch.testing.assert_close(out[:, :9], ref[:, :9])
    assert not torch.allclose(out[:, 9:], ref[:, 9:])


def test_alibi_slopes():
    assert torch.allclose(alibi_slopes(4), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]))
    assert len(alibi_slopes(6)) == 6 and torch.all(alibi_slopes(6) > 0)


def test_tied_embeddings_share_storage():
    model = tiny(tied=True)
    assert model.unembedding_weight() is model.wte.weight
    assert model.unembedding_weight().data_ptr() == model.wte.weight.data_ptr()
    assert "lm_head.weight" not in dict(model.named_parameters())
    untied = tiny(tied=False)
    assert untied.unembedding_weight().data_ptr() != untied.wte.weight.data_ptr()


def test_forward_multipliers_from_parameterization():
    model = tiny()
    p = Parameterization("supar", base_width=8, width=32, alpha_in=2.0, alpha_out=3.0)
    model.set_parameterization(p)
    assert model.input_mult == 2.0 and model.output_mult == pytest.approx(3.0 / 4)
    assert model.blocks[0].attn.scale == pytest.approx(1 / 8)
    # logits scale linearly with the output multiplier
    idx = torch.randint(0, 256, (1, 8))
    a = model(idx)
    model.output_mult *= 2
    torch.testing.assert_close(model(idx), 2 * a)


def test_default_selection_skips_unembedding():
    model = tiny(tied=False)
    opt = torch.optim.Adam(model.parameters())
    st = so.SparseTraining(model, opt, 0.5, include=list(GPT.SPARSE_INCLUDE))
    assert set(st.masks) == set(model.hidden_names())


def test_supar_rigl_sparseopt_exact_nnz():
    torch.manual_seed(0)
    model = tiny()
    include = list(GPT.SPARSE_INCLUDE)
    dens = layer_densities(model, 0.3, "erk", include=include)
    p = Parameterization("supar", base_width=16, width=32, densities=dens, sigma=0.087, alpha_in=9.17,
                         alpha_out=1.1)
    model.set_parameterization(p)
    p.init_(model)
    opt = torch.optim.AdamW(p.param_groups(model, 1e-2, "adamw", 0.01))
    st = so.SparseTraining(model, opt, 0.3, distribution="erk", include=include,
                           topology=so.RigL(update_every=2, drop_fraction=0.3, end_step=8),
                           preconditioner=so.SparseOpt(), init=None)
    nnz0 = {n: int(m.sum()) for n, m in st.masks.items()}
    assert {n: v / st.masks[n].numel() for n, v in nnz0.items()} == pytest.approx(dens)
    sampler = RandomWindowSampler(split_corpus(load_corpus())[0], 4, 16, seed=0)
    before = {n: m.clone() for n, m in st.masks.items()}
    for _ in range(8):
        x, y = sampler.sample()
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        for n, m in st.masks.items():
            assert int(m.sum()) == nnz0[n]
            w = dict(model.named_parameters())[n]
            assert torch.all(w[~m] == 0)
    assert any(not torch.equal(before[n], st.masks[n]) for n in before)  # RigL moved some weights


def test_build_gpt_run_dense_and_sparse():
    run = build_gpt_run("supar", width=32, base_width=16, density=0.5, n_layer=1, d_head=8, ctx=8)
    assert run.sparse is not None and set(run.sparse.masks) == set(run.model.hidden_names())
    assert run.parameterization.m_rho("blocks.0.attn.qkv.weight") == pytest.approx(0.5, abs=1e-3)
    assert build_gpt_run("sp", width=32, base_width=16, density=1.0, n_layer=1, d_head=8, ctx=8).sparse is None


def test_text_corpus_and_sampler_resume():
    data = load_corpus()
    assert data.dtype == torch.uint8 and len(data) > 400_000
    train, val = split_corpus(data)
    assert len(train) + len(val) == len(data) and len(val) == pytest.approx(0.1 * len(data), rel=0.01)
    s = RandomWindowSampler(train, 4, 32, seed=3)
    x, y = s.sample()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    state = s.state_dict()
    a = [s.sample() for _ in range(3)]
    s2 = RandomWindowSampler(train, 4, 32, seed=99)
    s2.load_state_dict(state)
    b = [s2.sample() for _ in range(3)]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    tr, va = text_samplers(2, 16, seed=0)
    assert tr.sample()[0].shape == va.sample()[0].shape == (2, 16)
    with pytest.raises(ValueError):
        load_corpus("no/such/corpus")
    with pytest.raises(ValueError):
        RandomWindowSampler(train[:10], 2, 32)
