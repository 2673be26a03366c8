"""SP, μP and SuPar in one builder: per-parameter init std, learning-rate multipliers and forward multipliers.

SPEC 8 (paper 004 Table 1, App. B.4/B.5). Every parameter has a *role*:

* ``"input"``  - the token embedding (also the tied unembedding);
* ``"hidden"`` - matrix-like projections whose fan-in and fan-out both grow with width (attention QKV and output,
  FFN in and out); the only parameters that may be sparse, so the only ones with a density multiplier;
* ``"output"`` - an untied unembedding (readout);
* ``"vector"`` - biases and normalisation gains.

With width multiplier ``m_d = width / base_width`` and per-layer density multiplier ``m_ρ^l = ρ_l / ρ_base`` and
``m_eff = m_d · m_ρ^l`` (SuPar) or ``m_d`` (μP) or 1 (SP):

=========================  =======================  =====================================================
quantity                   SP                       μP / SuPar
=========================  =======================  =====================================================
input/output/init std       σ                        σ
hidden init std             σ                        σ / sqrt(m_eff)   (residual projections: / sqrt(2 L))
hidden LR (Adam, AdamW)     η                        η / m_eff
hidden LR (SGD)             η                        μP: η (fan-in/fan-out ratio fixed), SuPar: η / m_ρ
vector-like LR (SGD)        η                        η · m_d           (input, output, biases, LN; MuSGD)
vector-like LR (Adam)       η                        η
embedding forward           X W                      α_in · X W
unembedding forward         X Wᵀ                     α_out · X Wᵀ / m_d
attention logits            QᵀK / sqrt(d_head)       QᵀK / d_head
=========================  =======================  =====================================================

Multipliers reach the optimizer through parameter groups: each group's ``lr`` is ``base_lr · lr_mult`` (and the
group also records ``lr_mult``), so ``torch.optim.lr_scheduler`` schedulers that scale the initial lr
multiplicatively (LambdaLR, MultiplicativeLR, StepLR, CosineAnnealingLR with ``eta_min=0``, LinearLR, ...) keep the
ratios between groups. Weight decay is left unchanged by default (as the reference SuPar code does, SPEC 8.2);
``weight_decay_rule="lr_invariant"`` divides it by the group's lr multiplier so that AdamW's ``lr·wd`` is kept.

This module depends on torch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("sp", "mup", "supar")
ROLES = ("input", "hidden", "output", "vector")
OPTIMIZERS = ("adam", "adamw", "sgd")
WEIGHT_DECAY_RULES = ("unchanged", "lr_invariant")


@dataclass(frozen=True)
class Multipliers:
    """What the parameterization does to one parameter (``init_std`` is ``None`` for vectors: zeros/ones)."""

    name: str
    role: str
    m_d: float
    m_rho: float
    init_std: float | None
    lr_mult_adam: float
    lr_mult_sgd: float
    residual: bool = False

    def lr_mult(self, optimizer: str) -> float:
        optimizer = _check_optimizer(optimizer)
        return self.lr_mult_sgd if optimizer == "sgd" else self.lr_mult_adam


def _check_optimizer(optimizer: str) -> str:
    if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    return optimizer.lower()


def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def _density(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {value!r}")
    return float(value)


class Parameterization:
    """One of ``"sp"``, ``"mup"``, ``"supar"`` for a model of ``width`` relative to a base of ``base_width``.

    Args:
        kind: ``"sp"``, ``"mup"`` or ``"supar"``.
        base_width, width: d_base and d (``width >= base_width``); ``m_d = width / base_width``.
        base_density: ρ_base of the base (proxy) model, 1 for the paper's dense proxy; a float for every hidden
            layer or a ``{name: density}`` map.
        densities: per-layer densities ρ_l of the hidden layers of this model (e.g. ERK's, see
            :func:`layer_densities`); layers not listed are dense. Only SuPar uses them (``m_ρ = ρ_l / ρ_base``),
            but every kind validates them.
        sigma: base init std σ (paper: 0.02 for SP, 0.087 for μP/SuPar).
        alpha_in, alpha_out: embedding and output-logit multipliers (μP/SuPar only; SP uses 1).
        n_layer: number of transformer blocks; when given, residual projections get the GPT-2 extra
            ``1/sqrt(2·n_layer)`` init factor. ``None`` takes ``model.n_layer`` when the model has one.
        roles: ``{param_name: role}``; ``None`` takes ``model.roles()`` when a model is passed.
        residual: names of residual output projections; ``None`` takes ``model.residual_projections()``.
    """

    def __init__(
        self,
        kind: str = "supar",
        base_width: int = 128,
        width: int = 128,
        base_density: float | Mapping[str, float] = 1.0,
        densities: Mapping[str, float] | None = None,
        sigma: float = 0.02,
        alpha_in: float = 1.0,
        alpha_out: float = 1.0,
        n_layer: int | None = None,
        *,
        roles: Mapping[str, str] | None = None,
        residual: Iterable[str] | None = None,
    ) -> None:
        if not isinstance(kind, str) or kind.lower() not in KINDS:
            raise ValueError(f"unknown parameterization {kind!r}; choose one of {KINDS}")
        self.kind = kind.lower()
        self.base_width = _positive(base_width, "base_width")
        self.width = _positive(width, "width")
        if self.base_width > self.width:
            raise ValueError(f"the base configuration (base_width={base_width}) is larger than the model "
                             f"(width={width}); the base must be the smaller proxy (base_width <= width)")
        self.sigma = _positive(sigma, "sigma")
        self.alpha_in = _positive(alpha_in, "alpha_in")
        self.alpha_out = _positive(alpha_out, "alpha_out")
        if n_layer is not None and (isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1):
            raise ValueError(f"n_layer must be a positive int or None, got {n_layer!r}")
        self.n_layer = n_layer
        if isinstance(base_density, Mapping):
            self.base_density = {str(k): _density(v, f"base density of {k}") for k, v in base_density.items()}
        else:
            self.base_density = _density(base_density, "base_density")
        self.densities = {str(k): _density(v, f"density of {k}") for k, v in (densities or {}).items()}
        self.roles: dict[str, str] | None = None
        self.residual: set[str] = set(residual or ())
        if roles is not None:
            self._set_roles(roles)

    # ---- global multipliers ---------------------------------------------------------------------------------
    @property
    def m_d(self) -> float:
        return self.width / self.base_width

    @property
    def input_mult(self) -> float:
        """Embedding forward multiplier α_in (1 for SP)."""
        return 1.0 if self.kind == "sp" else self.alpha_in

    @property
    def output_mult(self) -> float:
        """Logit multiplier α_out / m_d (1 for SP)."""
        return 1.0 if self.kind == "sp" else self.alpha_out / self.m_d

    def attn_scale(self, d_head: int) -> float:
        """Attention-logit scale: 1/sqrt(d_head) for SP, 1/d_head for μP and SuPar."""
        d_head = _positive(d_head, "d_head")
        return 1.0 / math.sqrt(d_head) if self.kind == "sp" else 1.0 / d_head

    def forward_multipliers(self, d_head: int) -> dict[str, float]:
        return {"input_mult": self.input_mult, "output_mult": self.output_mult, "attn_scale": self.attn_scale(d_head)}

    # ---- roles ----------------------------------------------------------------------------------------------
    def _set_roles(self, roles: Mapping[str, str]) -> None:
        bad = {n: r for n, r in roles.items() if r not in ROLES}
        if bad:
            raise ValueError(f"unknown roles {bad}; every parameter's role must be one of {ROLES}")
        not_hidden = sorted(n for n in self.densities if roles.get(n) != "hidden")
        if not_hidden:
            raise ValueError(f"density multipliers given for parameters that are not sparse hidden weights: "
                             f"{not_hidden} (roles: {[roles.get(n, 'unknown') for n in not_hidden]}); only "
                             "'hidden' parameters can be sparse")
        if isinstance(self.base_density, dict):
            not_hidden = sorted(n for n in self.base_density if roles.get(n) != "hidden")
            if not_hidden:
                raise ValueError(f"base densities given for parameters that are not hidden weights: {not_hidden}")
        self.roles = dict(roles)

    def bind(self, model: nn.Module) -> Parameterization:
        """Take roles, residual projections and n_layer from ``model`` (``roles()``, ``residual_projections()``,
        ``n_layer``) unless given explicitly, and check every parameter has a role."""
        if self.roles is None:
            if not hasattr(model, "roles"):
                raise ValueError(f"{type(model).__name__} has no roles() method; pass roles={{name: role}} "
                                 f"with roles in {ROLES}")
            self._set_roles(model.roles())
        if not self.residual and hasattr(model, "residual_projections"):
            self.residual = set(model.residual_projections())
        if self.n_layer is None and isinstance(getattr(model, "n_layer", None), int):
            self.n_layer = model.n_layer
        missing = sorted(n for n, _ in model.named_parameters() if n not in self.roles)
        if missing:
            raise ValueError(f"parameters without a role: {missing}; roles must cover every parameter")
        return self

    def m_rho(self, name: str) -> float:
        base = self.base_density.get(name, 1.0) if isinstance(self.base_density, dict) else self.base_density
        return self.densities.get(name, 1.0) / base

    def multipliers(self, name: str, role: str | None = None) -> Multipliers:
        """Init std and LR multipliers of one parameter (role from ``roles`` unless given)."""
        if role is None:
            if self.roles is None or name not in self.roles:
                raise ValueError(f"no role known for {name!r}; bind a model (bind/init_/param_groups) or pass role=")
            role = self.roles[name]
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} for {name!r}; choose one of {ROLES}")
        if role != "hidden" and name in self.densities:
            raise ValueError(f"a density multiplier is given for {name!r}, a dense {role!r} parameter")
        m_d = self.m_d
        m_rho = self.m_rho(name) if role == "hidden" else 1.0
        residual = role == "hidden" and name in self.residual
        if role == "hidden":
            m_eff = {"sp": 1.0, "mup": m_d, "supar": m_d * m_rho}[self.kind]
            std = self.sigma / math.sqrt(m_eff)
            if residual and self.n_layer is not None:
                std /= math.sqrt(2 * self.n_layer)
            adam = 1.0 / m_eff
            # SGD: μP keeps η when fan-in and fan-out scale together (MuSGD: 1/(fanin_mult/fanout_mult) = 1);
            # SuPar adds 1/m_ρ (paper 004 App. B.4)
            sgd = {"sp": 1.0, "mup": 1.0, "supar": 1.0 / m_rho}[self.kind]
        else:
            std = None if role == "vector" else self.sigma
            adam = 1.0
            # MuSGD: vector-like parameters (one width dimension) get η·m_d
            sgd = 1.0 if self.kind == "sp" else m_d
        return Multipliers(name=name, role=role, m_d=m_d, m_rho=m_rho, init_std=std, lr_mult_adam=adam,
                           lr_mult_sgd=sgd, residual=residual)

    # ---- application ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_(self, model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None,
              generator: torch.Generator | None = None) -> nn.Module:
        """Re-initialise every parameter: normal(0, init_std) for matrices, zeros for biases, ones for gains.

        Call it before building :class:`sparseopt.SparseTraining` (which then masks the weights), or pass the
        ``masks`` to zero pruned entries here.
        """
        self.bind(model)
        for name, p in model.named_parameters():
            m = self.multipliers(name)
            if m.init_std is None:
                if name.endswith("bias"):
                    p.zero_()
                else:
                    p.fill_(1.0)
            else:
                p.normal_(0.0, m.init_std, generator=generator)
            if masks is not None and name in masks:
                p.mul_(masks[name].to(p.dtype))
        return model

    def param_groups(self, model: nn.Module, lr: float, optimizer: str = "adamw", weight_decay: float = 0.0,
                     *, decay_vectors: bool = False, weight_decay_rule: str = "unchanged") -> list[dict]:
        """Optimizer parameter groups: one per distinct (lr multiplier, weight decay).

        Each group carries ``lr = lr · lr_mult``, ``lr_mult``, ``base_lr`` and ``weight_decay`` (0 for vectors
        unless ``decay_vectors``) and ``names``; pass the list straight to ``torch.optim.AdamW``/``Adam``/``SGD``.
        """
        optimizer = _check_optimizer(optimizer)
        lr = _positive(lr, "lr")
        if weight_decay_rule not in WEIGHT_DECAY_RULES:
            raise ValueError(f"unknown weight_decay_rule {weight_decay_rule!r}; choose one of {WEIGHT_DECAY_RULES}")
        self.bind(model)
        groups: dict[tuple[float, float], dict] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            m = self.multipliers(name)
            mult = m.lr_mult(optimizer)
            wd = 0.0 if (m.role == "vector" and not decay_vectors) else float(weight_decay)
            if weight_decay_rule == "lr_invariant":
                wd /= mult
            key = (mult, wd)
            if key not in groups:
                groups[key] = {"params": [], "names": [], "lr": lr * mult, "lr_mult": mult, "base_lr": lr,
                               "weight_decay": wd}
            groups[key]["params"].append(p)
            groups[key]["names"].append(name)
        return list(groups.values())

    def table(self, model: nn.Module | None = None) -> list[Multipliers]:
        """All parameters' multipliers (for logging)."""
        if model is not None:
            self.bind(model)
        if self.roles is None:
            raise ValueError("no roles known; pass a model")
        return [self.multipliers(n) for n in self.roles]

    def __repr__(self) -> str:
        return (f"Parameterization({self.kind!r}, base_width={self.base_width:g}, width={self.width:g}, "
                f"m_d={self.m_d:g}, sparse layers={len(self.densities)}, sigma={self.sigma:g})")


def set_base_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set a new base LR on groups built by :meth:`Parameterization.param_groups`, keeping each multiplier."""
    for group in optimizer.param_groups:
        group["base_lr"] = lr
        group["lr"] = lr * group.get("lr_mult", 1.0)


def layer_densities(model: nn.Module, density: float | Mapping[str, float], distribution: str = "erk", *,
                    include: Iterable[str] | None = None, **kwargs) -> dict[str, float]:
    """Per-layer densities ``{name: nnz/numel}`` exactly as :class:`sparseopt.SparseTraining` will draw them
    with the same ``density``, ``distribution`` and ``include`` (and other selection kwargs)."""
    from sparseopt.distributions import layer_nnz
    from sparseopt.masks import select_sparse_params

    if isinstance(density, Mapping):
        return {str(k): _density(v, f"density of {k}") for k, v in density.items()}
    sel_keys = {"exclude", "module_types", "prune_first_layer", "prune_last_layer"}
    params = select_sparse_params(model, include=list(include) if include is not None else None,
                                  **{k: v for k, v in kwargs.items() if k in sel_keys})
    shapes = {p.name: tuple(p.shape) for p in params}
    nnz = layer_nnz(shapes, density, distribution,
                    **{k: v for k, v in kwargs.items() if k in ("erk_power_scale", "custom")})
    return {n: nnz[n] / math.prod(shapes[n]) for n in shapes}


def densities_of(sparse_training) -> dict[str, float]:
    """Current per-layer densities of a :class:`sparseopt.SparseTraining` (constant under RigL/SET)."""
    return {n: int(m.sum()) / m.numel() for n, m in sparse_training.masks.items()}
