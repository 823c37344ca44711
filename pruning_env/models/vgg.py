"""VGG-11/13/16/19 with BatchNorm for 32x32 inputs, in the RL-Pruner / pytorch-cifar100 form.

Source: weiaicunzai/pytorch-cifar100 ``models/vgg.py`` as used by RL-Pruner (spec rl_pruner.md §6).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch
import torch.nn as nn

from pruning_env.models.registry import register_model, scaled

#: Layer configurations of Simonyan & Zisserman (2015): an int is a 3x3 conv with that many filters, "M" a 2x2
#: max-pool. Five pools reduce a 32x32 input to 1x1, so the classifier sees exactly the last conv's channels.
CFGS: Dict[str, List[Union[int, str]]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG feature extractor (conv3x3-BN-ReLU, five max-pools) followed by the three-layer (or a linear) classifier.

    :param cfg: layer configuration (see :data:`CFGS`); channel counts are before width scaling.
    :param num_classes: classifier outputs.
    :param width: multiplier for every conv and for the hidden classifier width (4096 at 1.0).
    :param in_channels: input image channels.
    :param hidden: hidden width of the classifier before scaling.
    :param dropout: dropout probability after each hidden classifier layer.
    :param head: ``"mlp"``, the three-layer dropout classifier of the authors, or ``"linear"``, one linear layer
        on the last conv's channels (better on small data, see docs/training.md).
    """

    def __init__(
        self,
        cfg: Sequence[Union[int, str]],
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
        hidden: int = 4096,
        dropout: float = 0.5,
        head: str = "mlp",
    ):
        super().__init__()
        layers: List[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = scaled(int(item), width)
            # conv bias kept as in pytorch-cifar100 (the authors' definition), although BN makes it redundant
            layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        if head not in ("mlp", "linear"):
            raise ValueError(f"head must be 'mlp' or 'linear', got {head!r}")
        if head == "linear":
            self.classifier = nn.Sequential(nn.Linear(channels, num_classes))
        else:
            hidden_width = scaled(hidden, width)
            self.classifier = nn.Sequential(
                nn.Linear(channels, hidden_width),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_width, hidden_width),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_width, num_classes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


@register_model
def vgg11(num_classes: int = 10, width: float = 1.0, **kwargs) -> nn.Module:
    """VGG-11 (config A) with BatchNorm; kwargs go to :class:`VGG`."""
    return VGG(CFGS["vgg11"], num_classes=num_classes, width=width, **kwargs)


@register_model
def vgg13(num_classes: int = 10, width: float = 1.0, **kwargs) -> nn.Module:
    """VGG-13 (config B) with BatchNorm; kwargs go to :class:`VGG`."""
    return VGG(CFGS["vgg13"], num_classes=num_classes, width=width, **kwargs)


@register_model
def vgg16(num_classes: int = 10, width: float = 1.0, **kwargs) -> nn.Module:
    """VGG-16 (config D) with BatchNorm; kwargs go to :class:`VGG`."""
    return VGG(CFGS["vgg16"], num_classes=num_classes, width=width, **kwargs)


@register_model
def vgg19(num_classes: int = 10, width: float = 1.0, **kwargs) -> nn.Module:
    """VGG-19 (config E) with BatchNorm; kwargs go to :class:`VGG`."""
    return VGG(CFGS["vgg19"], num_classes=num_classes, width=width, **kwargs)
