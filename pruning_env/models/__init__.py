"""Model zoo: CIFAR-sized CNNs (VGG, ResNet, GoogLeNet, DenseNet, MobileNetV3) and SimpleViT.

Every family registers itself on import; use :func:`create_model` and :func:`list_models`.
"""
from pruning_env.models.registry import create_model, is_model, list_models, register_model, scaled

# Importing the family modules registers their constructors.
from pruning_env.models import vgg, resnet, googlenet, densenet, mobilenetv3  # noqa: F401,E402
from pruning_env.models import vit  # noqa: F401

__all__ = ["create_model", "list_models", "register_model", "is_model", "scaled"]
