"""Fully connected classifiers, including paper 001's 784-64-BatchNorm-ReLU-10 network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .norm import Norm, norm_1d


class MLP(nn.Module):
    """Flatten -> [Linear -> norm -> ReLU] per hidden width -> Linear(num_classes)."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        norm: Norm = "none",
        bias: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h, bias=bias), norm_1d(norm, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes, bias=bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp_bn_mnist(num_classes: int = 10, in_features: int = 784, norm: Norm = "batch", bias: bool = True) -> MLP:
    """Paper 001's 784-64-BatchNorm-ReLU-10 MLP; ``norm="none"`` gives the BatchNorm-free control."""
    return MLP(in_features, [64], num_classes, norm=norm, bias=bias)
