"""What both framework callbacks share: attach SparseTraining to an optimizer the framework built, fresh or resumed.

Frameworks load a checkpoint's weights and optimizer state *before* a callback sees the optimizer. On resume the
callbacks therefore build SparseTraining with the saved masks (the loaded weights and optimizer state are already
zero outside them, so construction changes no loaded value) and without re-initialisation, after checking that the
loaded weights fit those masks; then the rest of the saved state (step, generator, ITOP, ...) is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparseopt.pipeline import SparseTraining

DENSITY_KEY = "sparseopt/density"
ITOP_KEY = "sparseopt/itop"


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, options: Mapping[str, Any],
           state: Mapping | None = None) -> SparseTraining:
    """``SparseTraining(model, optimizer, **options)``, continuing from ``state`` (a saved ``state_dict()``)."""
    if state is None:
        return SparseTraining(model, optimizer, **options)
    check_consistent(model, state)
    sparse = SparseTraining(model, optimizer, **{**options, "masks": state["masks"], "init": None})
    sparse.load_state_dict(state)
    return sparse


def check_consistent(model: nn.Module, state: Mapping) -> None:
    """The loaded weights must be zero wherever the saved masks are: otherwise the weights and the sparse state
    come from different checkpoints, and masking them would silently destroy trained weights."""
    params = dict(model.named_parameters())
    masks = state.get("masks", {}) if isinstance(state, Mapping) else {}
    for name, mask in masks.items():
        param = params.get(name)
        if param is None or param.shape != mask.shape:
            continue  # SparseTraining.load_state_dict names the mismatch
        outside = int((param.detach() != 0).logical_and_(~mask.to(param.device)).sum())
        if outside:
            raise ValueError(f"the loaded weight {name!r} has {outside} non-zero entries outside its saved mask: the "
                             "model weights and the sparse state come from different checkpoints")


def metrics(sparse: SparseTraining) -> dict[str, float]:
    """What both callbacks log: the active fraction of the sparse weights and the ITOP rate."""
    return {DENSITY_KEY: sparse.density(), ITOP_KEY: sparse.itop()}
