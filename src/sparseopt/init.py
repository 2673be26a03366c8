"""Sparse-aware re-initialisation (SPEC 3.5): keep each neuron's pre-activation variance at its dense value.

A neuron with k_i active inputs drawn from N(0, gain/F) has variance shrunk by k_i/F; re-sampling from
N(0, gain/k_i) restores it. ``"layer"`` is the layer-average form (also SuPar's): dense init / sqrt(density).
"""

from __future__ import annotations

import math

import torch

from sparseopt.masks import fan_in, per_unit

MODES = ("fanin", "fanout", "fanavg", "layer")
DISTRIBUTIONS = ("normal", "uniform")


def _fan_out(mask: torch.Tensor, in_axis: int) -> torch.Tensor:
    """Active outgoing connections of each input unit, counting kernel positions, broadcast to the weight shape."""
    dims = [d for d in range(mask.dim()) if d != in_axis]
    return mask.sum(dim=dims, keepdim=True).expand_as(mask)


def sparse_init_(
    weight: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "fanin",
    *,
    out_axis: int = 0,
    in_axis: int = 1,
    gain: float = 2.0,
    distribution: str = "normal",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Re-initialise ``weight`` in place for ``mask``; pruned entries become exactly 0.

    ``gain`` is the variance gain: 2 for ReLU (He). The RigL TF2 configs use 1.0 (``fanin_normal``); pass gain=1.0
    for parity with them. ``out_axis``/``in_axis``: the weight's layout (``SparseParam.layout``; Hugging Face
    ``Conv1D`` stores (in, out): out_axis=1, in_axis=0).
    """
    if mode not in MODES:
        raise ValueError(f"unknown sparse init mode {mode!r}; choose one of {MODES}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown init distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    with torch.no_grad():
        if mode == "layer":
            density = mask.float().mean().item()
            return weight.mul_(mask).div_(math.sqrt(density) if density > 0 else 1.0)
        fan_i = per_unit(fan_in(mask, out_axis), mask.dim(), out_axis).expand_as(mask).to(weight.dtype)
        fan = {"fanin": lambda: fan_i,
               "fanout": lambda: _fan_out(mask, in_axis).to(weight.dtype),
               "fanavg": lambda: (fan_i + _fan_out(mask, in_axis).to(weight.dtype)) / 2}[mode]()
        std = torch.sqrt(gain / fan.clamp(min=1.0))
        if distribution == "normal":
            noise = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)
        else:  # U(-a, a) has variance a²/3
            noise = (torch.rand(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype) * 2 - 1)
            noise *= math.sqrt(3.0)
        return weight.copy_(noise * std * mask)
