"""ResNet-20/32/56 for 32x32 inputs (He et al. 2016, section 4.2), with a switch that removes every skip.

Shortcuts use option B: identity when shapes match, otherwise a 1x1 convolution + BatchNorm projection (the
paper's CIFAR numbers use option A, zero-padded identity; B adds ~2.7k parameters to ResNet-20 and keeps
every shortcut a real, maskable layer). ``skip_connections=False`` drops the shortcut branch entirely,
projections included, giving the plain deep network of paper 000.
"""

from __future__ import annotations

import torch
from torch import nn

from .weight_init import he_init_


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut when ``skip`` is on, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, skip: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if skip:
            needs_projection = stride != 1 or cin != cout
            self.shortcut = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                if needs_projection
                else nn.Identity()
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu(out)


class CifarResNet(nn.Module):
    """Stem conv3x3(16w) then three stages of ``n`` BasicBlocks at 16w/32w/64w channels, global pool, Linear.

    Depth is ``6n + 2``: n=3 gives ResNet-20, 5 gives ResNet-32, 9 gives ResNet-56.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        skip_connections: bool = True,
    ) -> None:
        super().__init__()
        widths = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, cout in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride, skip=skip_connections))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        he_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0, skip_connections: bool = True
) -> CifarResNet:
    return CifarResNet(3, num_classes, in_channels, width, skip_connections)


def resnet32(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0, skip_connections: bool = True
) -> CifarResNet:
    return CifarResNet(5, num_classes, in_channels, width, skip_connections)


def resnet56(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0, skip_connections: bool = True
) -> CifarResNet:
    return CifarResNet(9, num_classes, in_channels, width, skip_connections)
