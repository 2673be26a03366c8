"""Layer layouts (which weight axis is a neuron), the dense-layer rules, and SparseOpt scopes, on torch models and
on tiny random-init Hugging Face GPT-2 / BERT models (no downloads)."""

import math
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparseopt as so
from sparseopt.distributions import layer_nnz
from sparseopt.graph import layers_feeding_batchnorm
from sparseopt.init import sparse_init_
from sparseopt.masks import fan_in, plan_sparse_params, random_mask


@given(rows=st.integers(1, 9), cols=st.integers(1, 9), k=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_fan_in_follows_the_output_axis(rows, cols, k, seed):
    mask = random_mask((rows, cols, k), (rows * cols * k) // 2, torch.Generator().manual_seed(seed))
    assert torch.equal(fan_in(mask, 1), fan_in(mask.transpose(0, 1), 0))
    assert torch.equal(fan_in(mask, 1), mask.sum(dim=(0, 2)))


def test_core_import_does_not_import_transformers():
    code = "import sys, sparseopt; assert 'transformers' not in sys.modules, 'transformers was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


class InOut(nn.Module):
    """A user layer storing its weight as (in, out), like Hugging Face's Conv1D."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x):
        return x @ self.weight


def test_user_registered_layout_drives_factors_and_fan_in():
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), InOut(8, 5))
    with pytest.raises(ValueError, match="register_layout"):
        plan_sparse_params(net, module_types=[InOut])
    so.register_layout(InOut, out_axis=1, in_axis=0, sparse_by_default=False)
    assert [p.name for p in plan_sparse_params(net, prune_first_layer=True).sparse] == ["0.weight"]
    mask = torch.zeros(8, 5, dtype=torch.bool)
    mask[:, 0], mask[:4, 2:] = True, True  # fan-ins 8, 0, 4, 4, 4 along the output axis (columns)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sparse = so.SparseTraining(net, opt, {"2.weight": 0.5}, masks={"2.weight": mask}, module_types=[InOut],
                               preconditioner=so.SparseOpt())
    k = torch.tensor([8.0, 0, 4, 4, 4], dtype=torch.float64)
    assert torch.allclose(sparse.factors()["2.weight"], torch.sqrt(k / k.mean()).view(1, 5))
    assert sparse.dense_layers == {"0.weight": "Linear is not in module_types"}
    row = sparse.report().layers[0]
    assert row.zero_fanin == 1 and row.neurons == 5  # along axis 0 there would be 8 units and none dead


def test_sparse_init_uses_the_layout_axes():
    mask = random_mask((12, 7), 40, torch.Generator().manual_seed(0))
    w = torch.empty(12, 7)
    sparse_init_(w, mask, "fanin", out_axis=1, in_axis=0, gain=2.0, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(12, 7, generator=torch.Generator().manual_seed(1))
    k_out = mask.sum(0).clamp(min=1).view(1, 7).float()
    assert torch.allclose(w, noise * torch.sqrt(2.0 / k_out) * mask)
    sparse_init_(w, mask, "fanout", out_axis=1, in_axis=0, gain=2.0, generator=torch.Generator().manual_seed(1))
    k_in = mask.sum(1).clamp(min=1).view(12, 1).float()
    assert torch.allclose(w, noise * torch.sqrt(2.0 / k_in) * mask)


# ---- the first-layer and tied-weight rules on torch models --------------------------------------------------------
class TwoStems(nn.Module):
    """Registers its head before its stems; both stems read the input."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.stem_a, self.stem_b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.body = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        x = torch.cat([self.stem_a(x), self.stem_b(x)], dim=1)
        return self.head(self.body(torch.relu(x)).mean(dim=(2, 3)))


def test_every_layer_reading_the_input_stays_dense_not_the_first_registered():
    plan = plan_sparse_params(TwoStems())
    assert [p.name for p in plan.sparse] == ["head.weight", "body.weight"]
    assert set(plan.dense) == {"stem_a.weight", "stem_b.weight"}
    assert "reads the model input (found by fx)" in plan.dense["stem_a.weight"]


class Untraceable(TwoStems):
    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 2
        return super().forward(x + 1e-3 * torch.rand_like(x))  # draws from the global RNG


def test_untraceable_models_are_probed_with_an_example_or_warn():
    with pytest.warns(UserWarning, match="first-layer rule: torch.fx cannot trace Untraceable.*head.weight"):
        plan = plan_sparse_params(Untraceable())
    assert set(plan.dense) == {"head.weight"}  # registration order: the fallback is only a guess, said loudly
    model, example = Untraceable(), torch.randn(2, 3, 8, 8)
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_sparse_params(model, example_input=example)
    assert set(plan.dense) == {"stem_a.weight", "stem_b.weight"}
    assert torch.equal(torch.get_rng_state(), rng)  # the probe leaves the random state as it was
    assert "found by probe" in plan.dense["stem_b.weight"]


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.relu(self.mid(self.emb(ids))))


def test_embeddings_and_tied_heads_stay_dense_unless_asked():
    plan = plan_sparse_params(TiedLM())
    assert [p.name for p in plan.sparse] == ["mid.weight"]  # the embedding reads the input, not mid
    assert plan.dense["out.weight"].startswith("tied to emb (Embedding)")
    with pytest.warns(UserWarning, match="out.weight is made sparse although it is tied to emb"):
        plan = plan_sparse_params(TiedLM(), include=["*"])
    assert [p.name for p in plan.sparse] == ["mid.weight", "out.weight"]
    model = TiedLM()
    sparse = so.SparseTraining(model, torch.optim.SGD(model.parameters(), lr=0.1), {"mid.weight": 0.5})
    assert sparse.dense_layers == {"out.weight": "not in the density map"}


# ---- SparseOpt scopes -----------------------------------------------------------------------------------------
class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style: a BatchNorm2d subclass defined outside torch.nn that calls F.batch_norm itself."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return torch.relu(x)


class FunctionalNorm(nn.Module):
    """Not a _BatchNorm at all: batch statistics through a bare F.batch_norm call."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, training=self.training)


class TimmLike(nn.Module):
    def __init__(self, untraceable=False):
        super().__init__()
        self.untraceable = untraceable
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3), BatchNormAct2d(8)
        self.conv, self.norm = nn.Conv2d(8, 8, 3), FunctionalNorm(8)
        self.plain, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        if self.untraceable and x.sum() > 1e9:
            x = x * 2
        x = self.norm(self.conv(self.bn0(self.stem(x))))
        return self.fc(torch.relu(self.plain(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("untraceable", [False, True])
def test_bn_followed_finds_batchnorm_subclasses_and_functional_batch_norm(untraceable):
    model = TimmLike(untraceable)
    example = torch.randn(2, 3, 8, 8) if untraceable else None
    assert layers_feeding_batchnorm(model, ["stem", "conv", "plain", "fc"], example) == {"stem", "conv"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = so.SparseTraining(model, opt, 0.5, prune_first_layer=True, example_input=example,
                               preconditioner=so.SparseOpt(scope="bn_followed"))
    assert set(sparse.factors()) == {"stem.weight", "conv.weight"}
    assert sparse.following_batchnorms() == {"stem.weight": "bn0", "conv.weight": "norm"}  # who normalises


def test_scope_accepts_names_and_globs_and_rejects_unknown_ones():
    model = TimmLike()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = so.SparseTraining(model, opt, 0.5, prune_first_layer=True,
                               preconditioner=so.SparseOpt(scope=["plain", "f*.weight"]))
    assert set(sparse.factors()) == {"plain.weight", "fc.weight"}
    with pytest.raises(ValueError, match="'blocks.\\*' matches no sparse weight"):
        so.SparseTraining(model, opt, 0.5, preconditioner=so.SparseOpt(scope=["blocks.*"]))
    with pytest.raises(ValueError, match="unknown SparseOpt scope 'bn_follow'"):
        so.SparseOpt(scope="bn_follow")


def test_empty_bn_followed_scope_warns_and_explains_layernorm():
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="preconditions no layer of Sequential: it has no BatchNorm, and its "
                                         "LayerNorm layers do not count.*no effect"):
        sparse = so.SparseTraining(net, opt, 0.5, preconditioner=so.SparseOpt(scope="bn_followed"))
    assert sparse.factors() == {}


# ---- Hugging Face GPT-2 and BERT (tiny, random init) ----------------------------------------------------------
def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_conv1d_is_sparse_with_factors_and_init_along_the_output_axis():
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with an example batch the rules are exact: no fallback warning
        sparse = so.SparseTraining(model, opt, 0.2, topology=so.RigL(update_every=2, end_step=6), init="fanin",
                                   preconditioner=so.SparseOpt(), example_input={"input_ids": ids})
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert set(sparse.masks) == conv1d and len(conv1d) == 8  # every projection, none kept by a first-layer rule
    assert set(sparse.dense_layers) == {"lm_head.weight", "transformer.wpe.weight"}
    assert sparse.dense_layers["lm_head.weight"].startswith("tied to transformer.wte (Embedding)")
    report = sparse.report()
    assert "left dense: lm_head.weight (tied to transformer.wte" in str(report)

    name = "transformer.h.0.mlp.c_fc.weight"  # Conv1D(64, 16): weight (in=16, out=64)
    mask, w = sparse.masks[name], model.get_parameter(name)
    k = mask.sum(dim=0).double()  # fan-in of each output unit = a column
    assert sparse.out_axes[name] == 1
    assert torch.allclose(sparse.factors()[name], torch.sqrt(k / k.mean()).view(1, 64))
    # fan-in init: each output unit's active weights have variance 2 / k_j on average (He, sparse fan-in)
    per_unit_var = (w.detach() ** 2).sum(0) / k.clamp(min=1).float()
    assert abs((per_unit_var * k.float() / 2).mean().item() - 1.0) < 0.15
    row = report.layers[[r.name for r in report.layers].index(name)]
    assert row.neurons == 64 and row.zero_fanin == int((k == 0).sum())
    norms = w.detach().norm(dim=0).double()  # per output unit = per column
    assert math.isclose(row.norm_max, float(norms.max()), rel_tol=1e-6)

    # ERK sees the same budget as for the equivalent (out, in) Linear layers
    shapes = {n: tuple(reversed(model.get_parameter(n).shape)) for n in sparse.masks}
    assert sparse.target_nnz == layer_nnz(shapes, 0.2, "erk")

    def step():
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        (raw,) = torch.autograd.grad(loss, w, retain_graph=True)  # dense; .grad is masked+corrected
        loss.backward()
        opt.step()
        return raw

    step()  # step 0: a RigL mask update (the step itself is skipped)
    before = w.detach().clone()
    raw = step()  # step 1, a plain step: the applied update is lr * c_j * mask * grad, c along the output axis
    c = sparse.factors()[name].float()
    assert torch.allclose(before - w.detach(), 0.1 * c * sparse.masks[name] * raw, atol=1e-6)
    for _ in range(5):  # RigL updates keep the Conv1D weights sparse at the target counts
        step()
    for n, m in sparse.masks.items():
        assert int(m.sum()) == sparse.target_nnz[n]
        assert not model.get_parameter(n).detach()[~m].any()
    assert sparse.itop() > sparse.density()  # RigL explored


def test_gpt2_defaults_without_an_example_warn_and_keep_tied_embeddings_dense():
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="first-layer rule: torch.fx cannot trace GPT2LMHeadModel.*transformer.wte "
                                         "\\(Embedding\\), is not sparse"):
        sparse = so.SparseTraining(model, opt, 0.1)
    assert "lm_head.weight" not in sparse.masks and len(sparse.masks) == 8
    assert bool((model.transformer.wte.weight != 0).all())  # no token lost its embedding


def test_tiny_bert_defaults_are_sensible_and_reported():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=64, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    batch = {"input_ids": torch.randint(0, 64, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sparse = so.SparseTraining(model, opt, 0.3, example_input=batch, preconditioner=so.SparseOpt())
    linears = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert list(sparse.masks) == linears  # layer 0's query included: the input is read by the embeddings
    assert set(sparse.dense_layers) == {f"bert.embeddings.{e}_embeddings.weight"
                                        for e in ("word", "position", "token_type")}
    text = str(sparse.report())
    assert "left dense: bert.embeddings.word_embeddings.weight (Embedding is dense unless module_types" in text
    assert math.isclose(sparse.density(), 0.3, rel_tol=1e-2)


def test_sparsifying_a_tied_embedding_on_request_still_warns():
    model = TiedLM()
    with pytest.warns(UserWarning, match="emb.weight is shared with out \\(Linear\\).*output axis 1"):
        plan = plan_sparse_params(model, module_types=[nn.Linear, nn.Embedding], prune_first_layer=True)
    assert [p.name for p in plan.sparse] == ["emb.weight", "mid.weight"] and plan.sparse[0].out_axis == 1


def test_gpt2_example_runs(capsys):
    pytest.importorskip("transformers")
    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "gpt2_sparse.py"))
    example["main"](steps=3)
    printed = capsys.readouterr().out
    assert "left dense: lm_head.weight (tied to transformer.wte" in printed and "factors (1, 256)" in printed


def test_hf_resnet_stem_and_batchnorm_layers_found_by_probing():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = transformers.ResNetForImageClassification(config)  # torch.fx cannot trace it
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse = so.SparseTraining(model, opt, 0.3, preconditioner=so.SparseOpt(scope="bn_followed"),
                                   example_input=torch.randn(2, 3, 32, 32))
    stem = "resnet.embedder.embedder.convolution.weight"
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(sparse.dense_layers) == {stem} and "found by probe" in sparse.dense_layers[stem]
    assert set(sparse.factors()) == convs - {stem}  # every conv of HF ResNet feeds a BatchNorm2d


def test_config_scope_takes_a_list_of_layer_names():
    from sparseopt.experiments.run.build import build_sparse
    from sparseopt.experiments.config.load import ConfigError, from_dict
    from sparseopt.experiments.config.schema import RunConfig

    cfg = from_dict(RunConfig, {"name": "x", "sparsity": {"method": "static"},
                                "sparseopt": {"enabled": True, "scope": ["plain", "fc.*"]}})
    model = TimmLike()
    sparse = build_sparse(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)
    assert set(sparse.factors()) == {"plain.weight", "fc.weight"}
    with pytest.raises(ConfigError, match="sparseopt.scope: got 'bn_follow'"):
        from_dict(RunConfig, {"name": "x", "sparseopt": {"scope": "bn_follow"}})


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # dynamo import
@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile])
def test_wrappers_are_seen_through(wrap):
    model = wrap(TimmLike())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse = so.SparseTraining(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5,
                                   preconditioner=so.SparseOpt(scope="bn_followed"))
    prefix = "module." if wrap is nn.DataParallel else "_orig_mod."
    assert set(sparse.dense_layers) == {prefix + "stem.weight"}  # found by fx on the bare model
    assert set(sparse.factors()) == {prefix + "conv.weight"}
    assert sparse.following_batchnorms() == {prefix + "conv.weight": prefix + "norm"}
