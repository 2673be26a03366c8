"""Periodic measurements during training (sharpness, gradient/activation scales, ...), kept out of the loop.

A callback is called after the optimizer step every ``every`` steps with a :class:`StepContext`; the metrics it
returns are logged under its ``name`` as the split. Callbacks must not change the model, its BatchNorm statistics,
gradients or the global RNG: resumed runs stay bit-identical whether diagnostics are on or off.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

import sparseopt as so


@dataclass
class StepContext:
    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sparse: so.SparseTraining | None
    train_x: torch.Tensor | None      # the in-memory training set (None for streamed datasets)
    train_y: torch.Tensor | None
    device: torch.device
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None  # what the loader applies to raw batches


class Callback(Protocol):
    name: str
    every: int

    def __call__(self, ctx: StepContext) -> dict[str, float] | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
