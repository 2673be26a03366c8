"""Copies to the training device that never make the host wait for it."""

from __future__ import annotations

import torch


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without blocking the host. For CUDA the (small) CPU tensor is pinned first: a copy from
    pageable memory may block until the device has caught up with its queue, a host-device sync on every batch."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
