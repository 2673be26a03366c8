"""Gradient renormalisation (SPEC 1.6, the ICML App. F ablation).

SparseOpt changes both the direction and, slightly, the norm of the gradient. Rescaling the corrected gradient to
the global norm τ of the uncorrected (masked) one isolates the direction change: ``"clip"`` caps the norm at τ,
``"exact"`` sets it to τ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RENORM_MODES = ("clip", "exact")


def global_grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all tensors taken together (a 0-dim tensor, so no device sync)."""
    if not grads:
        return torch.tensor(0.0, dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float64)
                                                 for g in grads]))


@torch.no_grad()
def renormalize_(
    grads: Sequence[torch.Tensor], reference_norm: float | torch.Tensor, mode: str = "clip"
) -> torch.Tensor:
    """Scale ``grads`` in place by ``min(1, τ/‖g‖)`` (``"clip"``) or ``τ/‖g‖`` (``"exact"``), τ = reference_norm.

    All-zero gradients are left alone. Returns the factor applied (a 0-dim tensor).
    """
    if mode not in RENORM_MODES:
        raise ValueError(f"unknown renormalisation mode {mode!r}; choose one of {RENORM_MODES}")
    norm = global_grad_norm(grads)
    reference = torch.as_tensor(reference_norm, dtype=torch.float64, device=norm.device)
    scale = torch.where(norm > 0, reference / norm, torch.ones_like(norm))
    if mode == "clip":
        scale = scale.clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(device=g.device, dtype=g.dtype))
    return scale
