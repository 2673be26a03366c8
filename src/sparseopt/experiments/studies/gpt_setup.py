"""One function that builds a (sparse) GPT run under SP, μP or SuPar, shared by the coord check and the LR sweep.

Order (the one that keeps every piece consistent):

1. build the GPT at ``width`` (d_head fixed, heads scale with width);
2. per-layer densities exactly as SparseTraining will draw them (:func:`layer_densities`), giving per-layer m_ρ;
3. ``Parameterization(kind, base_width, width, densities=...)``: forward multipliers into the model, ``init_``;
4. optimizer from ``param_groups`` (Adam/AdamW/SGD);
5. ``SparseTraining`` over the hidden projections (``include=GPT.SPARSE_INCLUDE``, ``init=None`` so the
   parameterization's init is kept; it masks the weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseopt.models.gpt import GPT, GPTConfig
from sparseopt.parameterization import Parameterization, layer_densities
from sparseopt.pipeline import SparseTraining

# paper 004 Table 3 / App. C: tuned dense-proxy HPs (σ is an std; SP uses σ = 0.02)
PAPER_HPS = {"sp": {"sigma": 0.02, "alpha_in": 1.0, "alpha_out": 1.0},
             "mup": {"sigma": 0.087, "alpha_in": 9.1705, "alpha_out": 1.0951835},
             "supar": {"sigma": 0.087, "alpha_in": 9.1705, "alpha_out": 1.0951835}}


@dataclass
class GPTRun:
    model: GPT
    optimizer: torch.optim.Optimizer
    sparse: SparseTraining | None
    parameterization: Parameterization


def build_gpt_run(kind: str, *, width: int, base_width: int, density: float = 1.0, lr: float = 1e-2,
                  optimizer: str = "adam", weight_decay: float = 0.0, n_layer: int = 2, d_head: int = 16,
                  ctx: int = 64, vocab_size: int = 256, tied: bool = True, distribution: str = "uniform",
                  sigma: float | None = None, alpha_in: float | None = None, alpha_out: float | None = None,
                  seed: int = 0, topology=None, preconditioner=None) -> GPTRun:
    """A GPT with ``kind``'s parameterization, an optimizer and (for ``density < 1``) a SparseTraining.

    ``sigma``/``alpha_in``/``alpha_out`` default to the paper's values for ``kind`` (:data:`PAPER_HPS`).
    Weights are drawn from ``torch.Generator`` seeded with ``seed``; masks from SparseTraining's ``seed``.
    """
    hps = dict(PAPER_HPS[kind.lower()] if kind.lower() in PAPER_HPS else PAPER_HPS["sp"])
    for k, v in (("sigma", sigma), ("alpha_in", alpha_in), ("alpha_out", alpha_out)):
        if v is not None:
            hps[k] = v
    model = GPT(GPTConfig(vocab_size=vocab_size, d_model=width, n_layer=n_layer, d_head=d_head, ctx=ctx,
                          tied=tied))
    include = list(GPT.SPARSE_INCLUDE)
    densities = (layer_densities(model, density, distribution, include=include) if density < 1.0 else {})
    param = Parameterization(kind, base_width=base_width, width=width, densities=densities, n_layer=n_layer, **hps)
    model.set_parameterization(param)
    gen = torch.Generator()
    gen.manual_seed(seed)
    param.init_(model, generator=gen)
    groups = param.param_groups(model, lr, optimizer=optimizer, weight_decay=weight_decay)
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer.lower()]
    opt = opt_cls(groups, lr=lr)
    sparse = None
    if density < 1.0:
        sparse = SparseTraining(model, opt, density, distribution=distribution, include=include,
                                topology=topology, preconditioner=preconditioner, init=None, seed=seed)
    return GPTRun(model, opt, sparse, param)
