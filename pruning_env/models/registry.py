"""Model registry in the style of timm: one decorator registers a constructor by name.

`create_model("resnet56", num_classes=100, width=0.5)` builds a CIFAR-sized (32x32) network.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List

import torch.nn as nn

_MODEL_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name.

    :param fn: a function ``fn(num_classes=..., width=..., **kwargs) -> nn.Module``.
    :return: ``fn`` unchanged, so this can be used as a decorator.
    """
    name = fn.__name__
    if name in _MODEL_REGISTRY and _MODEL_REGISTRY[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice")
    _MODEL_REGISTRY[name] = fn
    return fn


def list_models(pattern: str = "*") -> List[str]:
    """Names of registered models matching a shell-style pattern, sorted.

    :param pattern: e.g. ``"vgg*"`` or ``"resnet?0"``.
    """
    return sorted(n for n in _MODEL_REGISTRY if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _MODEL_REGISTRY


def create_model(name: str, num_classes: int = 10, width: float = 1.0, **kwargs) -> nn.Module:
    """Build a registered model.

    :param name: registered model name (see :func:`list_models`).
    :param num_classes: size of the classifier output.
    :param width: channel multiplier applied to every hidden layer (1.0 = the paper's network).
    :param kwargs: extra, model-specific constructor arguments.
    :return: the model, with ``model.zoo_config`` recording how to rebuild it.
    """
    if name not in _MODEL_REGISTRY:
        known = ", ".join(list_models())
        raise ValueError(f"unknown model {name!r}; known models: {known}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    model = _MODEL_REGISTRY[name](num_classes=num_classes, width=width, **kwargs)
    model.zoo_config = {"name": name, "num_classes": int(num_classes), "width": float(width), **kwargs}
    return model


def scaled(channels: int, width: float, minimum: int = 1) -> int:
    """Scale a channel count by ``width``, rounding to the nearest integer, at least ``minimum``."""
    return max(minimum, int(round(channels * width)))
