"""The ``norm`` switch shared by the small models: BatchNorm, LayerNorm or nothing.

The switch exists because BatchNorm is what skews gradients under sparsity; experiments compare with and
without it on otherwise identical architectures.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

Norm = Literal["batch", "layer", "none"]
NORMS: tuple[str, ...] = ("batch", "layer", "none")


def check_norm(norm: str, allowed: tuple[str, ...] = NORMS) -> None:
    if norm not in allowed:
        raise ValueError(f"norm must be one of {allowed}, got {norm!r}")


def norm_1d(norm: Norm, features: int) -> nn.Module:
    """Normalization over the features of (N, features) activations."""
    check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm1d(features)
    if norm == "layer":
        return nn.LayerNorm(features)
    return nn.Identity()
