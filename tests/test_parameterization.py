"""SP / μP / SuPar parameterization (SPEC 8): init std, LR multipliers, forward multipliers, schedulers, errors."""

import math

import pytest
import torch

import sparseopt as so
from sparseopt.models.gpt import GPT, GPTConfig
from sparseopt.parameterization import Parameterization, layer_densities, set_base_lr

SIGMA = 0.05


def small_gpt(width=64, n_layer=2, tied=True, bias=False):
    return GPT(GPTConfig(d_model=width, n_layer=n_layer, d_head=16, ctx=16, tied=tied, bias=bias))


def param(kind, width=64, base=16, densities=None, **kw):
    return Parameterization(kind, base_width=base, width=width, densities=densities, sigma=SIGMA,
                            alpha_in=3.0, alpha_out=2.0, **kw)


QKV, PROJ, UP = "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.1.ffn.up.weight"


@pytest.mark.parametrize("kind", ["sp", "mup", "supar"])
def test_table_hand_set(kind):
    model = small_gpt(width=64, tied=False, bias=True)
    dens = {QKV: 0.25, UP: 0.5}
    p = param(kind, densities=dens, n_layer=2).bind(model)
    m_d = 4.0
    for name, role in model.roles().items():
        m = p.multipliers(name)
        assert m.role == role
        rho = dens.get(name, 1.0) if role == "hidden" else 1.0
        if role == "hidden":
            m_eff = {"sp": 1.0, "mup": m_d, "supar": m_d * rho}[kind]
            std = SIGMA / math.sqrt(m_eff)
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                std /= math.sqrt(2 * 2)
            assert m.init_std == pytest.approx(std)
            assert m.lr_mult("adamw") == pytest.approx(1 / m_eff)
            assert m.lr_mult("adam") == pytest.approx(1 / m_eff)
            assert m.lr_mult("sgd") == pytest.approx({"sp": 1.0, "mup": 1.0, "supar": 1 / rho}[kind])
        else:
            assert m.init_std == (None if role == "vector" else SIGMA)
            assert m.lr_mult("adamw") == 1.0
            assert m.lr_mult("sgd") == pytest.approx(1.0 if kind == "sp" else m_d)
    # hand-checked single values
    if kind == "supar":
        assert p.multipliers(QKV).init_std == pytest.approx(SIGMA / math.sqrt(4 * 0.25))
        assert p.multipliers(QKV).lr_mult("adamw") == pytest.approx(1.0)
        assert p.multipliers(UP).lr_mult("adamw") == pytest.approx(1 / 2)
        assert p.multipliers(UP).lr_mult("sgd") == pytest.approx(2.0)
    # forward multipliers
    fm = p.forward_multipliers(16)
    if kind == "sp":
        assert fm == {"input_mult": 1.0, "output_mult": 1.0, "attn_scale": pytest.approx(0.25)}
    else:
        assert fm == {"input_mult": 3.0, "output_mult": pytest.approx(2.0 / 4), "attn_scale": pytest.approx(1 / 16)}


def test_roles_of_gpt():
    roles = small_gpt(tied=False, bias=True).roles()
    assert roles["wte.weight"] == "input" and roles["lm_head.weight"] == "output"
    assert roles[QKV] == roles[PROJ] == roles[UP] == "hidden"
    assert roles["blocks.0.ln1.weight"] == roles["blocks.0.attn.qkv.bias"] == "vector"
    assert "lm_head.weight" not in small_gpt(tied=True).roles()


def test_mup_equals_supar_at_density_one():
    model = small_gpt()
    a = param("mup", densities={}).bind(model)
    b = param("supar", densities={n: 1.0 for n in model.hidden_names()}).bind(model)
    for name in model.roles():
        assert a.multipliers(name) == b.multipliers(name)
    assert a.forward_multipliers(16) == b.forward_multipliers(16)
    ga = a.param_groups(model, 1e-2, "adamw", 0.1)
    gb = b.param_groups(model, 1e-2, "adamw", 0.1)
    assert [(g["lr"], g["names"]) for g in ga] == [(g["lr"], g["names"]) for g in gb]


def test_init_std_measured():
    model = GPT(GPTConfig(d_model=256, n_layer=1, d_head=32, ctx=8, tied=False, bias=True))
    p = Parameterization("supar", base_width=64, width=256, densities={QKV: 0.25}, sigma=0.1, n_layer=1)
    gen = torch.Generator().manual_seed(0)
    p.init_(model, generator=gen)
    w = dict(model.named_parameters())
    assert w[QKV].std().item() == pytest.approx(0.1 / math.sqrt(4 * 0.25), rel=0.03)
    assert w["blocks.0.ffn.up.weight"].std().item() == pytest.approx(0.1 / 2, rel=0.03)
    assert w[PROJ].std().item() == pytest.approx(0.1 / 2 / math.sqrt(2), rel=0.03)
    assert w["wte.weight"].std().item() == pytest.approx(0.1, rel=0.03)
    assert w["lm_head.weight"].std().item() == pytest.approx(0.1, rel=0.03)
    assert torch.all(w["blocks.0.ln1.weight"] == 1) and torch.all(w["blocks.0.attn.qkv.bias"] == 0)
    # masks passed to init_ zero the pruned entries
    mask = torch.rand(w[QKV].shape, generator=gen) < 0.25
    p.init_(model, masks={QKV: mask}, generator=gen)
    assert torch.all(w[QKV][~mask] == 0)


def test_param_groups_and_weight_decay():
    model = small_gpt(bias=True)
    p = param("supar", densities={QKV: 0.5})
    groups = p.param_groups(model, 1e-2, "adamw", weight_decay=0.1)
    seen = [n for g in groups for n in g["names"]]
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())
    for g in groups:
        assert g["lr"] == pytest.approx(1e-2 * g["lr_mult"])
        for n in g["names"]:
            assert g["lr_mult"] == pytest.approx(p.multipliers(n).lr_mult("adamw"))
            assert g["weight_decay"] == (0.0 if p.multipliers(n).role == "vector" else 0.1)
    inv = p.param_groups(model, 1e-2, "adamw", 0.1, weight_decay_rule="lr_invariant")
    for g in inv:
        if g["weight_decay"]:
            assert g["lr"] * g["weight_decay"] == pytest.approx(1e-2 * 0.1)
    opt = torch.optim.AdamW(groups)
    set_base_lr(opt, 1e-3)
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_mult"]) for g in opt.param_groups)


@pytest.mark.parametrize("make_sched", [
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    lambda o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[g["lr"] for g in o.param_groups], total_steps=20),
])
def test_schedulers_keep_multipliers(make_sched):
    model = small_gpt()
    p = param("supar", densities={QKV: 0.5})
    opt = torch.optim.AdamW(p.param_groups(model, 1e-2, "adamw"))
    sched = make_sched(opt)
    ref = max(opt.param_groups, key=lambda g: g["lr_mult"])
    for _ in range(7):
        opt.step()
        sched.step()
        for g in opt.param_groups:
            assert g["lr"] / ref["lr"] == pytest.approx(g["lr_mult"] / ref["lr_mult"], rel=1e-6)
    assert len({g["lr_mult"] for g in opt.param_groups}) >= 3  # 1, 1/m_d, 1/(m_d m_rho)


def test_layer_densities_match_sparse_training():
    model = small_gpt(width=64)
    dens = layer_densities(model, 0.2, "erk", include=list(GPT.SPARSE_INCLUDE))
    assert set(dens) == set(model.hidden_names())
    opt = torch.optim.Adam(model.parameters())
    st = so.SparseTraining(model, opt, 0.2, distribution="erk", include=list(GPT.SPARSE_INCLUDE))
    assert {n: int(m.sum()) / m.numel() for n, m in st.masks.items()} == pytest.approx(dens)
    assert len(set(dens.values())) > 1  # ERK: per-layer m_rho


def test_errors():
    model = small_gpt(tied=False, bias=True)
    with pytest.raises(ValueError, match="larger than the model"):
        Parameterization("mup", base_width=128, width=64)
    with pytest.raises(ValueError, match="unknown parameterization"):
        Parameterization("ntk", base_width=16, width=64)
    with pytest.raises(ValueError, match="not sparse hidden"):
        param("supar", densities={"wte.weight": 0.5}).bind(model)
    with pytest.raises(ValueError, match="not sparse hidden"):
        param("supar", densities={"blocks.0.ln1.weight": 0.5}).bind(model)
    with pytest.raises(ValueError, match="not sparse hidden"):
        param("supar", densities={"nope.weight": 0.5}).bind(model)
    with pytest.raises(ValueError, match="unknown roles"):
        param("supar", roles={"wte.weight": "embedding"})
    with pytest.raises(ValueError, match="unknown role"):
        param("supar").multipliers("x", role="weird")
    with pytest.raises(ValueError, match="without a role"):
        param("supar", roles={"wte.weight": "input"}).bind(model)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        param("supar", densities={QKV: 0.0})
    with pytest.raises(ValueError, match="unknown optimizer"):
        param("supar").param_groups(model, 1e-2, "lion")
    with pytest.raises(ValueError, match="positive"):
        Parameterization("sp", base_width=0, width=64)


@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_mup_library_cross_check(opt_name):
    """Our μP LR multipliers equal microsoft/mup's MuAdam/MuSGD (skips when mup is not installed)."""
    mup = pytest.importorskip("mup")
    model, base = small_gpt(width=64, bias=True), small_gpt(width=16, bias=True)
    mup.set_base_shapes(model, base, rescale_params=False)
    mu_cls = mup.MuAdam if opt_name == "adam" else mup.MuSGD
    mu_opt = mu_cls(model.parameters(), lr=1e-2)
    mu_lr = {id(p): g["lr"] for g in mu_opt.param_groups for p in g["params"]}
    ours = torch.optim.SGD(param("mup").param_groups(model, 1e-2, opt_name), lr=1e-2)
    our_lr = {id(p): g["lr"] for g in ours.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert our_lr[id(p)] == pytest.approx(mu_lr[id(p)]), name
