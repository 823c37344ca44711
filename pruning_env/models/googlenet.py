"""GoogLeNet (Szegedy et al. 2015) for 32x32 inputs, the pytorch-cifar100 variant that RL-Pruner uses.

Source: spec rl_pruner.md §6 (the authors' ``models/googlenet.py``): 3-conv stem, 5x5 branch as two 3x3 convs.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn

from pruning_env.models.registry import register_model, scaled

#: Standard Inception configs (n1x1, n3x3_reduce, n3x3, n5x5_reduce, n5x5, pool_proj), before width scaling.
#: Input channels are not listed: each block takes the concatenated output of the one before.
INCEPTION_CFGS: Dict[str, Tuple[int, int, int, int, int, int]] = {
    "a3": (64, 96, 128, 16, 32, 32),
    "b3": (128, 128, 192, 32, 96, 64),
    "a4": (192, 96, 208, 16, 48, 64),
    "b4": (160, 112, 224, 24, 64, 64),
    "c4": (128, 128, 256, 24, 64, 64),
    "d4": (112, 144, 288, 32, 64, 64),
    "e4": (256, 160, 320, 32, 128, 128),
    "a5": (256, 160, 320, 32, 128, 128),
    "b5": (384, 192, 384, 48, 128, 128),
}


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Bias-free conv ("same" padding) followed by BN and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 | maxpool3x3-1x1.

    :param in_channels: input channels.
    :param n1x1: 1x1 branch width.
    :param n3x3_reduce: reduction before the 3x3 branch.
    :param n3x3: 3x3 branch width.
    :param n5x5_reduce: reduction before the double-3x3 branch (the original 5x5 branch).
    :param n5x5: double-3x3 branch width.
    :param pool_proj: width of the 1x1 projection after the max-pool branch.
    """

    def __init__(self, in_channels: int, n1x1: int, n3x3_reduce: int, n3x3: int, n5x5_reduce: int, n5x5: int,
                 pool_proj: int):
        super().__init__()
        self.b1 = conv_bn_relu(in_channels, n1x1, 1)
        self.b2 = nn.Sequential(conv_bn_relu(in_channels, n3x3_reduce, 1), conv_bn_relu(n3x3_reduce, n3x3, 3))
        # two stacked 3x3 convs: the receptive field of a 5x5 with fewer weights
        self.b3 = nn.Sequential(
            conv_bn_relu(in_channels, n5x5_reduce, 1),
            conv_bn_relu(n5x5_reduce, n5x5, 3),
            conv_bn_relu(n5x5, n5x5, 3),
        )
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn_relu(in_channels, pool_proj, 1))
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class GoogLeNet(nn.Module):
    """CIFAR GoogLeNet: stem, Inception 3a-3b, pool, 4a-4e, pool, 5a-5b, average pool, dropout, Linear.

    Three stride-2 max-pools take 32x32 to 4x4 before the global average pool.

    :param num_classes: classifier outputs.
    :param width: multiplier for every conv (the classifier input is 1024 at 1.0).
    :param in_channels: input image channels.
    :param dropout: channel dropout probability before the classifier.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3, dropout: float = 0.4):
        super().__init__()
        stem_widths = [scaled(c, width) for c in (64, 64, 192)]
        self.prelayer = nn.Sequential(
            conv_bn_relu(in_channels, stem_widths[0], 3),
            conv_bn_relu(stem_widths[0], stem_widths[1], 3),
            conv_bn_relu(stem_widths[1], stem_widths[2], 3),
        )
        channels = stem_widths[2]
        # one max-pool module per use (the pytorch-cifar100 original reuses a single one)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, padding=1)
        blocks = {}
        for name, cfg in INCEPTION_CFGS.items():
            block = Inception(channels, *(scaled(c, width) for c in cfg))
            blocks[name] = block
            channels = block.out_channels
        self.a3, self.b3 = blocks["a3"], blocks["b3"]
        self.maxpool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.a4, self.b4, self.c4, self.d4, self.e4 = (blocks[k] for k in ("a4", "b4", "c4", "d4", "e4"))
        self.maxpool3 = nn.MaxPool2d(3, stride=2, padding=1)
        self.a5, self.b5 = blocks["a5"], blocks["b5"]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout2d(p=dropout)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool1(self.prelayer(x))
        x = self.b3(self.a3(x))
        x = self.maxpool2(x)
        x = self.e4(self.d4(self.c4(self.b4(self.a4(x)))))
        x = self.maxpool3(x)
        x = self.b5(self.a5(x))
        x = self.dropout(self.avgpool(x))
        return self.linear(torch.flatten(x, 1))


@register_model
def googlenet(num_classes: int = 10, width: float = 1.0, **kwargs) -> nn.Module:
    """CIFAR GoogLeNet (RL-Pruner's model); kwargs go to :class:`GoogLeNet`."""
    return GoogLeNet(num_classes=num_classes, width=width, **kwargs)
