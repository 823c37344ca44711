"""AgentViT's other datasets through torchvision's own classes and on-disk formats: FashionMNIST (1 channel,
28 px, the idx files under ``ROOT/FashionMNIST/raw``) and Imagenette (``ROOT/imagenette2-160/{train,val}``).

Reached through :func:`pruning_env.data.make_datasets` (``fashionmnist``, ``imagenette``); validation is held out
from the training images, the official test (FashionMNIST) or val (Imagenette) split is the test split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from torchvision.transforms import v2

from pruning_env.data import DatasetSplits, _from_arrays

#: per-channel statistics of FashionMNIST's 60,000 training images
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
#: ImageNet statistics, the usual ones for its subsets
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENETTE_SIZES = ("160px", "320px", "full")


def load_fashion_mnist(root: Union[str, Path] = "data", download: bool = False,
                       val_size: Union[int, float, None] = None, seed: int = 0, augment: bool = True) -> DatasetSplits:
    """FashionMNIST as 1-channel 28x28 images (a 4 px patch gives a 7x7 grid of 49 tokens).

    :param root: folder holding ``FashionMNIST/raw/`` (torchvision's layout: the four unzipped idx files).
    :param download: let torchvision download it (needs network).
    :param val_size: training images held out for validation: a count, a fraction, or None for 10 %.
    :param seed: seed of the validation split.
    :param augment: random crop (padding 4), horizontal flip and rotation on the train split.
    """
    from torchvision import datasets

    root = Path(root)
    try:
        train = datasets.FashionMNIST(str(root), train=True, download=download)
        test = datasets.FashionMNIST(str(root), train=False, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True ..."
        raise FileNotFoundError(
            f"FashionMNIST was not found under {root / 'FashionMNIST' / 'raw'} (expected train-images-idx3-ubyte, "
            f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte). Download it with "
            f"download=True (--download) on a machine that is online, or point data_root at the folder that "
            f"holds FashionMNIST/.") from err
    return _from_arrays("fashionmnist", train.data.unsqueeze(1).contiguous(), train.targets,
                        test.data.unsqueeze(1).contiguous(), test.targets, list(train.classes), FASHION_MNIST_MEAN,
                        FASHION_MNIST_STD, val_size, seed, augment, flip=True,
                        info={"source": "torchvision.datasets.FashionMNIST", "root": str(root)})


def load_imagenette(root: Union[str, Path] = "data", download: bool = False, val_size: Union[int, float, None] = None,
                    seed: int = 0, augment: bool = True, size: str = "160px", image_size: int = 64) -> DatasetSplits:
    """Imagenette (10 ImageNet classes), every image resized to ``image_size`` square and held in memory.

    The default 64 px with 8 px patches keeps the notebook's 8x8 grid of 64 tokens (``model_kwargs:
    {patch_size: 8}`` in ``configs/agentvit/imagenette_faithful.yaml``).

    :param root: folder holding torchvision's ``imagenette2-160/`` (or ``-320``, or ``imagenette2`` for full size).
    :param download: let torchvision download the archive (needs network).
    :param val_size: training images held out for validation: a count, a fraction, or None for 10 %.
    :param seed: seed of the validation split.
    :param augment: random crop (padding 4), horizontal flip and rotation on the train split.
    :param size: which torchvision archive: ``160px``, ``320px`` or ``full``.
    :param image_size: side the images are resized to.
    """
    from torchvision import datasets

    if size not in IMAGENETTE_SIZES:
        raise ValueError(f"size={size!r}; expected one of {IMAGENETTE_SIZES}")
    root = Path(root)
    resize = v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True), v2.ToDtype(torch.uint8)])

    def load(split: str):
        try:
            ds = datasets.Imagenette(str(root), split=split, size=size, download=download)
        except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True ..."
            folder = "imagenette2" if size == "full" else f"imagenette2-{size[:-2]}"
            raise FileNotFoundError(
                f"Imagenette ({size}) was not found under {root / folder} (expected {folder}/train/<wnid>/*.JPEG "
                f"and {folder}/val/<wnid>/*.JPEG). Download it with download=True (--download) on a machine that "
                f"is online, or point data_root at the folder that holds {folder}/.") from err
        items = [ds[i] for i in range(len(ds))]
        images = torch.stack([resize(image.convert("RGB")) for image, _ in items])
        labels = torch.tensor([label for _, label in items])
        return images, labels, [names[0] for names in ds.classes]

    x, y, classes = load("train")
    x_test, y_test, _ = load("val")
    if len(np.unique(y.numpy())) != len(classes):
        raise ValueError(f"Imagenette under {root}: the train split has {len(np.unique(y.numpy()))} of "
                         f"{len(classes)} classes; is the archive complete?")
    return _from_arrays("imagenette", x, y, x_test, y_test, classes, IMAGENET_MEAN, IMAGENET_STD, val_size, seed,
                        augment, flip=True, info={"source": "torchvision.datasets.Imagenette", "size": size,
                                                  "root": str(root)})


__all__ = ["load_fashion_mnist", "load_imagenette", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "IMAGENET_MEAN",
           "IMAGENET_STD", "IMAGENETTE_SIZES"]
