"""MobileNetV3-Large/Small (Howard et al. 2019) in the xiaolai-sqlai/mobilenetv3 form used by RL-Pruner.

Source: spec rl_pruner.md §6. Adapted to 32x32 inputs: the stem and the first stride-2 bneck use stride 1.

The spec's (authors') network downsamples five times (stride-2 stem + four stride-2 bnecks), so a 32x32 image
is 1x1 before the last four (Large) or three (Small) bnecks. Following the usual CIFAR adaptation (as in
kuangliu/pytorch-cifar's MobileNetV2), we change exactly two strides from 2 to 1: the stem conv and the first
bneck that has stride 2 (Large: bneck 2, 16->24; Small: bneck 1, 16->16). Three downsamples remain, so the
last feature map is 4x4 (32 / 2**3). Block rules are unchanged, so the re-strided Large bneck 2 (16->24,
stride 1) gets the 1x1 conv + BN skip and the re-strided Small bneck 1 (16->16) an identity skip.
``original_strides=True`` builds the authors' strides unchanged.

Other choices: every 1x1 skip conv is bias-free (the original's stride-2 skip has a bias before its BN,
which the BN makes redundant); with ``width != 1`` the SE bottleneck is ``max(c // 4, scaled(8, width))``
so it shrinks with the network instead of staying at 8; which skips get a 1x1 projection is decided on the
unscaled table, so that rounding at small widths (24 and 40 both become 2 at width 1/16) keeps the topology.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn

from pruning_env.models.registry import register_model, scaled

RE, HS = nn.ReLU, nn.Hardswish

#: bneck rows (kernel, in, expand, out, activation, squeeze-excitation, stride), channels before width scaling.
LARGE_CFG: List[Tuple[int, int, int, int, Type[nn.Module], bool, int]] = [
    (3, 16, 16, 16, RE, False, 1),
    (3, 16, 64, 24, RE, False, 2),  # first stride-2 bneck: stride 1 for 32x32 inputs
    (3, 24, 72, 24, RE, False, 1),
    (5, 24, 72, 40, RE, True, 2),
    (5, 40, 120, 40, RE, True, 1),
    (5, 40, 120, 40, RE, True, 1),
    (3, 40, 240, 80, HS, False, 2),
    (3, 80, 200, 80, HS, False, 1),
    (3, 80, 184, 80, HS, False, 1),
    (3, 80, 184, 80, HS, False, 1),
    (3, 80, 480, 112, HS, True, 1),
    (3, 112, 672, 112, HS, True, 1),
    (5, 112, 672, 160, HS, True, 2),
    (5, 160, 672, 160, HS, True, 1),
    (5, 160, 960, 160, HS, True, 1),
]

SMALL_CFG: List[Tuple[int, int, int, int, Type[nn.Module], bool, int]] = [
    (3, 16, 16, 16, RE, True, 2),  # first stride-2 bneck: stride 1 for 32x32 inputs
    (3, 16, 72, 24, RE, False, 2),
    (3, 24, 88, 24, RE, False, 1),
    (5, 24, 96, 40, HS, True, 2),
    (5, 40, 240, 40, HS, True, 1),
    (5, 40, 240, 40, HS, True, 1),
    (5, 40, 120, 48, HS, True, 1),
    (5, 48, 144, 48, HS, True, 1),
    (5, 48, 288, 96, HS, True, 2),
    (5, 96, 576, 96, HS, True, 1),
    (5, 96, 576, 96, HS, True, 1),
]


class SqueezeExcite(nn.Module):
    """x * hardsigmoid(conv1x1(relu(bn(conv1x1(avgpool(x)))))).

    :param channels: input (and output) channels.
    :param hidden: bottleneck channels.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.conv2(self.relu(self.bn(self.conv1(self.pool(x))))))
        return x * scale


class Bneck(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, optional SE, 1x1 project, plus skip, then activation.

    The skip is identity for stride 1 and equal widths, a 1x1 conv + BN for stride 1 and different widths,
    a depthwise 3x3 stride-2 conv + BN (then 1x1 conv + BN if widths differ) for stride 2.

    :param kernel_size: depthwise kernel size.
    :param in_channels: input channels.
    :param expand: expanded (depthwise) channels.
    :param out_channels: output channels.
    :param act: activation class (``nn.ReLU`` or ``nn.Hardswish``), instantiated once per use.
    :param se_hidden: SE bottleneck channels, or None for no SE.
    :param stride: depthwise stride (1 or 2).
    :param project_skip: give the skip a 1x1 conv + BN; by default when ``in_channels != out_channels``. The
        network decides it from the unscaled table so that rounding at small widths never changes the topology.
    """

    def __init__(self, kernel_size: int, in_channels: int, expand: int, out_channels: int, act: Type[nn.Module],
                 se_hidden: Optional[int], stride: int, project_skip: Optional[bool] = None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"bneck stride must be 1 or 2, got {stride}")
        self.conv1 = nn.Conv2d(in_channels, expand, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(expand)
        self.act1 = act()
        self.conv2 = nn.Conv2d(expand, expand, kernel_size, stride=stride, padding=kernel_size // 2,
                               groups=expand, bias=False)
        self.bn2 = nn.BatchNorm2d(expand)
        self.act2 = act()
        self.se: nn.Module = SqueezeExcite(expand, se_hidden) if se_hidden is not None else nn.Identity()
        self.conv3 = nn.Conv2d(expand, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        if project_skip is None:
            project_skip = in_channels != out_channels
        if not project_skip and in_channels != out_channels:
            raise ValueError(f"a skip without projection needs in_channels == out_channels, "
                             f"got {in_channels} and {out_channels}")
        self.skip: nn.Module = nn.Identity()
        if stride == 2:
            layers: List[nn.Module] = [
                nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
                nn.BatchNorm2d(in_channels),
            ]
            if project_skip:
                layers += [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
            self.skip = nn.Sequential(*layers)
        elif project_skip:
            self.skip = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      nn.BatchNorm2d(out_channels))
        self.act3 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.se(out)))
        return self.act3(out + self.skip(x))


class MobileNetV3(nn.Module):
    """Stem conv3x3(16)-BN-Hardswish, bnecks, conv1x1-BN-Hardswish, avgpool, Linear-BN1d-Hardswish-Dropout-Linear.

    :param cfg: bneck rows (see :data:`LARGE_CFG`), channels before width scaling.
    :param last_channels: width of the final 1x1 conv (960 Large, 576 Small) before scaling.
    :param num_classes: classifier outputs.
    :param width: multiplier for every hidden layer (including the 1280-wide classifier layer).
    :param in_channels: input image channels.
    :param dropout: dropout before the last Linear.
    :param original_strides: keep the authors' ImageNet strides (32x32 -> 1x1) instead of the CIFAR ones.
    """

    def __init__(
        self,
        cfg: Sequence[Tuple[int, int, int, int, Type[nn.Module], bool, int]],
        last_channels: int,
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
        dropout: float = 0.2,
        original_strides: bool = False,
    ):
        super().__init__()
        stem = scaled(16, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=2 if original_strides else 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.hs1 = nn.Hardswish()
        channels = stem
        blocks = []
        first_stride2 = next(i for i, row in enumerate(cfg) if row[6] == 2)
        se_min = scaled(8, width)
        for i, (k, base_in, exp, out, act, use_se, stride) in enumerate(cfg):
            if i == first_stride2 and not original_strides:
                stride = 1
            exp_c, out_c = scaled(exp, width), scaled(out, width)
            se_hidden = max(exp_c // 4, se_min) if use_se else None
            blocks.append(Bneck(k, channels, exp_c, out_c, act, se_hidden, stride, project_skip=base_in != out))
            channels = out_c
        self.bneck = nn.Sequential(*blocks)
        last = scaled(last_channels, width)
        self.conv2 = nn.Conv2d(channels, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.hs2 = nn.Hardswish()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = scaled(1280, width)
        self.linear3 = nn.Linear(last, hidden, bias=False)
        self.bn3 = nn.BatchNorm1d(hidden)
        self.hs3 = nn.Hardswish()
        self.drop = nn.Dropout(dropout)
        self.linear4 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hs1(self.bn1(self.conv1(x)))
        x = self.bneck(x)
        x = self.hs2(self.bn2(self.conv2(x)))
        x = torch.flatten(self.avgpool(x), 1)
        x = self.drop(self.hs3(self.bn3(self.linear3(x))))
        return self.linear4(x)


@register_model
def mobilenetv3_large(num_classes: int = 10, width: float = 1.0, **kwargs) -> nn.Module:
    """MobileNetV3-Large, CIFAR strides (see the module docstring); kwargs go to :class:`MobileNetV3`."""
    return MobileNetV3(LARGE_CFG, 960, num_classes=num_classes, width=width, **kwargs)


@register_model
def mobilenetv3_small(num_classes: int = 10, width: float = 1.0, **kwargs) -> nn.Module:
    """MobileNetV3-Small, CIFAR strides (see the module docstring); kwargs go to :class:`MobileNetV3`."""
    return MobileNetV3(SMALL_CFG, 576, num_classes=num_classes, width=width, **kwargs)
