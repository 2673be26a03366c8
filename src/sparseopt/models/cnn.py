"""A small BatchNorm CNN for MNIST-sized inputs: quick on CPU (~56k parameters, ~6M MACs per 28x28 image)."""

from __future__ import annotations

import torch
from torch import nn

from .norm import check_norm


def _conv_block(cin: int, cout: int, norm: str) -> list[nn.Module]:
    use_bn = norm == "batch"
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not use_bn)]
    if use_bn:
        layers.append(nn.BatchNorm2d(cout))
    return layers + [nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv32, pool, conv64, pool, conv64, global average pool, Linear; BN after each conv if norm="batch"."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, norm: str = "batch") -> None:
        super().__init__()
        check_norm(norm, ("batch", "none"))
        self.features = nn.Sequential(
            *_conv_block(in_channels, 32, norm),
            nn.MaxPool2d(2),
            *_conv_block(32, 64, norm),
            nn.MaxPool2d(2),
            *_conv_block(64, 64, norm),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
