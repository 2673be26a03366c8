"""He-normal (fan_out) convolutions and identity BatchNorm, the initialisation of He et al. and torchvision."""

from __future__ import annotations

from torch import nn


def he_init_(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
