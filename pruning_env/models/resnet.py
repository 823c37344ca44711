"""CIFAR ResNet-20/32/56/110 (He et al. 2016, §4.2): three stages of BasicBlocks with 16/32/64 channels.

Shortcuts use option B (1x1 conv + BN projection where the shape changes), which RL-Pruner's tracer can prune.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from pruning_env.models.registry import register_model, scaled


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    :param in_channels: input channels.
    :param out_channels: output channels of both convs.
    :param stride: stride of the first conv (2 at the start of stages 2 and 3).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: conv3x3(16)-BN-ReLU, 3 stages of n blocks, global average pool, Linear.

    :param depth: total depth, ``6n + 2`` (20, 32, 44, 56, 110, ...).
    :param num_classes: classifier outputs.
    :param width: multiplier for every hidden layer (stage widths 16/32/64 at 1.0).
    :param in_channels: input image channels.
    """

    def __init__(self, depth: int, num_classes: int = 10, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (e.g. 20, 56, 110), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        stage_widths = [scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, stage_widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stage_widths[0])
        self.relu = nn.ReLU()
        channels = stage_widths[0]
        stages: List[nn.Sequential] = []
        for i, out in enumerate(stage_widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(channels, out, stride))
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def resnet20(num_classes: int = 10, width: float = 1.0, **kwargs) -> nn.Module:
    """ResNet-20 (3 blocks per stage); kwargs go to :class:`CifarResNet`."""
    return CifarResNet(20, num_classes=num_classes, width=width, **kwargs)


@register_model
def resnet32(num_classes: int = 10, width: float = 1.0, **kwargs) -> nn.Module:
    """ResNet-32 (5 blocks per stage); kwargs go to :class:`CifarResNet`."""
    return CifarResNet(32, num_classes=num_classes, width=width, **kwargs)


@register_model
def resnet56(num_classes: int = 10, width: float = 1.0, **kwargs) -> nn.Module:
    """ResNet-56 (9 blocks per stage), RL-Pruner's main ResNet; kwargs go to :class:`CifarResNet`."""
    return CifarResNet(56, num_classes=num_classes, width=width, **kwargs)


@register_model
def resnet110(num_classes: int = 10, width: float = 1.0, **kwargs) -> nn.Module:
    """ResNet-110 (18 blocks per stage); kwargs go to :class:`CifarResNet`."""
    return CifarResNet(110, num_classes=num_classes, width=width, **kwargs)
