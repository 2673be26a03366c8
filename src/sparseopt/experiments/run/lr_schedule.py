"""Per-iteration linear warmup then cosine decay (SPEC 9.1), as a LambdaLR so it checkpoints like any scheduler."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``: t/T_w during warmup, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                            peak_lr: float, min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    min_ratio = min_lr / peak_lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: warmup_cosine(t, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio))
