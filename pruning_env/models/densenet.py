"""DenseNet-121 (Huang et al. 2017, DenseNet-BC) for 32x32 inputs, pytorch-cifar100 style.

Growth 32, blocks 6/12/24/16, bottleneck layers, compression 0.5; CIFAR stem: one 3x3 conv, no max-pool.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from pruning_env.models.registry import register_model, scaled


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); the k new maps are concatenated after the input.

    :param in_channels: input channels.
    :param growth_rate: ``k``, channels added by this layer.
    """

    def __init__(self, in_channels: int, growth_rate: int):
        super().__init__()
        inner = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (channel compression) then 2x2 average pool.

    :param in_channels: input channels.
    :param out_channels: output channels (``floor(reduction * in_channels)``).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    """DenseNet-BC for 32x32 inputs: conv3x3(2k), dense blocks joined by transitions, BN-ReLU-avgpool-Linear.

    :param block_sizes: bottleneck layers per dense block.
    :param num_classes: classifier outputs.
    :param width: multiplier for the growth rate, hence for every hidden layer.
    :param growth_rate: ``k`` before width scaling.
    :param reduction: transition compression factor.
    :param in_channels: input image channels.
    """

    def __init__(
        self,
        block_sizes: Sequence[int],
        num_classes: int = 10,
        width: float = 1.0,
        growth_rate: int = 32,
        reduction: float = 0.5,
        in_channels: int = 3,
    ):
        super().__init__()
        if not 0.0 < reduction <= 1.0:
            raise ValueError(f"reduction must be in (0, 1], got {reduction}")
        k = scaled(growth_rate, width)
        channels = 2 * k
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        stages: List[nn.Module] = []
        for i, n_layers in enumerate(block_sizes):
            layers = []
            for _ in range(n_layers):
                layers.append(Bottleneck(channels, k))
                channels += k
            stages.append(nn.Sequential(*layers))
            if i < len(block_sizes) - 1:
                out = max(1, int(reduction * channels))
                stages.append(Transition(channels, out))
                channels = out
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv1(x))
        x = self.avgpool(self.relu(self.bn(x)))
        return self.linear(torch.flatten(x, 1))


@register_model
def densenet121(num_classes: int = 10, width: float = 1.0, **kwargs) -> nn.Module:
    """DenseNet-121 (blocks 6/12/24/16, growth 32); kwargs go to :class:`DenseNet`."""
    return DenseNet((6, 12, 24, 16), num_classes=num_classes, width=width, **kwargs)
