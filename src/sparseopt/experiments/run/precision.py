"""Mixed precision for the training step: the autocast dtype, fp16's GradScaler, and what the sparse pipeline sees.

bf16 has fp32's exponent range and needs no loss scaling. fp16 uses ``torch.amp.GradScaler``; the gradients are
unscaled *before* ``optimizer.step()``, so SparseTraining's step hooks (masking, SparseOpt factors, RigL's grow
scores, ``grow_init="grad_scale"`` values, the gradient norm that is logged) all act on true gradients. A step the
scaler skips for an overflow never calls ``optimizer.step()``: the hooks do not run and the mask schedule
(``SparseTraining.step_count``) does not advance; the learning-rate schedule does, as in plain PyTorch AMP.

GradScaler reads its overflow flag on the host once per step (``found_inf.item()``): fp16 keeps that one sync,
bf16 and fp32 have none.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from sparseopt.experiments.errors import UserError

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """Autocast plus (for fp16) loss scaling around one optimizer step; ``precision`` is fp32, bf16 or fp16."""

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision not in AUTOCAST_DTYPES:
            raise UserError(f"train.precision: got {precision!r}, expected one of {', '.join(AUTOCAST_DTYPES)}")
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("train.precision is bf16 but this GPU has no bfloat16 support; use fp16 or fp32")
        self.precision, self.device_type = precision, device.type
        self.dtype = AUTOCAST_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> AbstractContextManager:
        return nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backpropagate ``loss``; leaves the optimizer's gradients unscaled (true values) for what follows."""
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, which GradScaler skips when the fp16 gradients overflowed."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
