"""Datasets with one entry point: CIFAR-10/100 (torchvision), npz arrays, ImageFolder, the embedded
offline ``digits`` set and a generated ``synthetic`` set, each split into train / validation / test.

The validation split is always held out from the training data (seeded) and is what rewards are measured
on; the test split is only for final reports.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

DATASET_NAMES = ("cifar10", "cifar100", "fashionmnist", "imagenette", "npz:PATH", "imagefolder:PATH", "digits",
                 "synthetic")


@dataclass
class DatasetSplits:
    """Train (augmented), validation and test splits of one dataset, with what a model needs to know."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    classes: List[str]
    input_size: Tuple[int, int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"DatasetSplits({self.name!r}, train={len(self.train)}, val={len(self.val)}, "
                f"test={len(self.test)}, num_classes={self.num_classes}, input_size={self.input_size})")


class ArrayDataset(Dataset):
    """Images held as one uint8 tensor (N, C, H, W) with integer labels, and an optional tensor transform.

    :param augmented: the transform draws random augmentations, so :func:`preload` applies it image by image.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None, augmented: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.transform = transform
        self.augmented = bool(augmented)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _transforms(mean, std, size: int, augment: bool, flip: bool):
    """CIFAR recipe (spec 5.1): crop with padding 4, horizontal flip, rotation 15 on train; normalise always."""
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if not augment:
        return v2.Compose(tail)
    aug = [v2.RandomCrop(size, padding=4)]
    if flip:
        aug.append(v2.RandomHorizontalFlip())
    aug.append(v2.RandomRotation(15))
    return v2.Compose(aug + tail)


def _channel_stats(images: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    x = images.float() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def _split_indices(n: int, held_out: Union[int, float, None], seed: int, default_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (kept, held_out)."""
    if held_out is None:
        k = max(1, int(round(n * default_fraction)))
    elif isinstance(held_out, float) and 0 < held_out < 1:
        k = max(1, int(round(n * held_out)))
    else:
        k = int(held_out)
    if not 0 < k < n:
        raise ValueError(f"cannot hold out {held_out!r} of {n} training images; choose 0 < size < {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _from_arrays(name, x_train, y_train, x_test, y_test, classes, mean, std, val_size, seed,
                 augment, flip, info=None) -> DatasetSplits:
    """Build splits from uint8 NCHW tensors; validation is held out from the training arrays."""
    keep, val_idx = _split_indices(len(x_train), val_size, seed, default_fraction=0.1)
    if mean is None:
        mean, std = _channel_stats(x_train[keep])
    size = x_train.shape[-1]
    train_tf = _transforms(mean, std, size, augment, flip)
    eval_tf = _transforms(mean, std, size, False, flip)
    return DatasetSplits(
        name=name,
        train=ArrayDataset(x_train[keep], y_train[keep], train_tf, augmented=augment),
        val=ArrayDataset(x_train[val_idx], y_train[val_idx], eval_tf),
        test=ArrayDataset(x_test, y_test, eval_tf),
        num_classes=len(classes),
        classes=list(classes),
        input_size=tuple(x_train.shape[1:]),
        mean=tuple(mean),
        std=tuple(std),
        info=info or {},
    )


def _nhwc_to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.uint8).transpose(0, 3, 1, 2)))


def _load_cifar(name: str, root: Path, download: bool):
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise FileNotFoundError(
            f"{name.upper()} was not found (or is corrupted) under {root / folder}. "
            f"Download it with --download (download=True) on a machine that is online, or point "
            f"--data-root (data_root=) at the folder that holds {folder}/."
        ) from err
    return train, test


def make_datasets(
    name: str,
    root: Union[str, os.PathLike] = "data",
    download: bool = False,
    val_size: Union[int, float, None] = None,
    seed: int = 0,
    augment: bool = True,
    **kwargs,
) -> DatasetSplits:
    """Load a dataset and split it into train / validation / test.

    :param name: ``cifar10``, ``cifar100``, ``fashionmnist`` (1 channel, 28 px), ``imagenette`` (kwargs ``size``,
        ``image_size``; :mod:`pruning_env.data.vision_extra`), ``npz:PATH``, ``imagefolder:PATH``, ``digits``
        (embedded, offline) or ``synthetic`` (generated; kwargs ``n_train``, ``n_test``, ``num_classes``,
        ``image_size``).
    :param root: folder that holds (or will receive) torchvision's CIFAR, FashionMNIST or Imagenette files.
    :param download: let torchvision download CIFAR when missing (needs network).
    :param val_size: images held out from the training data for validation: a count, a fraction in (0, 1),
        or None for 10% (5,000 on CIFAR).
    :param seed: seed of the validation (and, where needed, test) split.
    :param augment: apply the training augmentation to the train split.
    """
    root = Path(root)
    key = name.lower()
    if key in ("cifar10", "cifar100"):
        train, test = _load_cifar(key, root, download)
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if key == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
        return _from_arrays(
            key, _nhwc_to_tensor(train.data), torch.tensor(train.targets), _nhwc_to_tensor(test.data),
            torch.tensor(test.targets), train.classes, mean, std, val_size, seed, augment, flip=True,
        )
    if key in ("fashionmnist", "imagenette"):
        from pruning_env.data.vision_extra import load_fashion_mnist, load_imagenette

        loader = load_fashion_mnist if key == "fashionmnist" else load_imagenette
        return loader(root, download=download, val_size=val_size, seed=seed, augment=augment, **kwargs)
    if key.startswith("npz:"):
        return _load_npz(Path(name[4:]), val_size, seed, augment)
    if key.startswith("imagefolder:"):
        return _load_imagefolder(Path(name[len("imagefolder:"):]), val_size, seed, augment, **kwargs)
    if key == "digits":
        return _load_digits(val_size, seed, augment)
    if key == "synthetic":
        return make_synthetic(val_size=val_size, seed=seed, augment=augment, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")


def _load_npz(path: Path, val_size, seed: int, augment: bool) -> DatasetSplits:
    """Arrays ``x`` (N,H,W,C uint8) and ``y``; optional ``x_test``/``y_test``, else 20% is held out as test."""
    if not path.is_file():
        raise FileNotFoundError(f"npz dataset file not found: {path} (expected arrays 'x' (N,H,W,C uint8) and 'y')")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            files = list(f.files)
            missing = [k for k in ("x", "y") if k not in files]
            if not missing:
                x, y = f["x"], f["y"].astype(np.int64)
                x_test = f["x_test"] if "x_test" in files else None
                y_test = f["y_test"].astype(np.int64) if "y_test" in files else None
                classes = [str(c) for c in f["classes"]] if "classes" in files else None
    except Exception as err:  # numpy reports garbage, empty or truncated files without naming them
        raise ValueError(f"{path} is not a readable .npz archive ({type(err).__name__}: {err}); expected one "
                         f"written by numpy.savez with arrays 'x' (N,H,W,C uint8) and 'y'") from err
    if missing:
        raise ValueError(f"{path} lacks array(s) {missing}; it has {files} (expected 'x' N,H,W,C uint8 and 'y')")
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"{path}: 'x' must be uint8 with shape (N, H, W, C), got {x.dtype} {x.shape}")
    if x_test is None:
        keep, test_idx = _split_indices(len(x), 0.2, seed + 7919, default_fraction=0.2)
        x, y, x_test, y_test = x[keep], y[keep], x[test_idx], y[test_idx]
    n_classes = int(max(y.max(), y_test.max())) + 1
    classes = classes if classes is not None and len(classes) >= n_classes else [str(i) for i in range(n_classes)]
    return _from_arrays(f"npz:{path}", _nhwc_to_tensor(x), torch.from_numpy(y), _nhwc_to_tensor(x_test),
                        torch.from_numpy(y_test), classes, None, None, val_size, seed, augment, flip=True,
                        info={"path": str(path)})


def _load_imagefolder(path: Path, val_size, seed: int, augment: bool, image_size: int = 32) -> DatasetSplits:
    """``PATH/train`` and ``PATH/test`` (or ``PATH/val``) in torchvision ImageFolder layout, or one folder split 80/20."""
    from torchvision import datasets

    if not path.is_dir():
        raise FileNotFoundError(f"imagefolder root not found: {path}")

    def load(folder: Path):
        ds = datasets.ImageFolder(str(folder))
        resize = v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True),
                             v2.ToDtype(torch.uint8)])
        images = torch.stack([resize(ds.loader(p)) for p, _ in ds.samples])
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1).contiguous()
        return images[:, :3], torch.tensor(ds.targets), ds.classes

    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        x, y, classes = load(path / "train")
        x_test, y_test, _ = load(test_dir)
    else:
        x_all, y_all, classes = load(path)
        keep, test_idx = _split_indices(len(x_all), 0.2, seed + 7919, default_fraction=0.2)
        x, y, x_test, y_test = x_all[keep], y_all[keep], x_all[test_idx], y_all[test_idx]
    return _from_arrays(f"imagefolder:{path}", x, y, x_test, y_test, classes, None, None, val_size, seed,
                        augment, flip=True, info={"path": str(path)})


def _load_digits(val_size, seed: int, augment: bool) -> DatasetSplits:
    """scikit-learn's 1,797 handwritten digits (shipped inside the package), upsampled to 32x32x3."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N,1,8,8) in [0,1]
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(digits.target.astype(np.int64))
    keep, test_idx = _split_indices(len(x), 0.2, 12345, default_fraction=0.2)  # fixed test split
    # digits are not mirror-symmetric: no horizontal flip
    return _from_arrays("digits", x[keep], y[keep], x[test_idx], y[test_idx], [str(i) for i in range(10)],
                        None, None, val_size, seed, augment, flip=False, info={"source": "sklearn.datasets.load_digits"})


def make_synthetic(n_train: int = 256, n_test: int = 64, num_classes: int = 10, image_size: int = 32,
                   val_size=None, seed: int = 0, augment: bool = False) -> DatasetSplits:
    """A tiny generated, learnable dataset for tests: each class is a fixed random pattern plus noise.

    :param n_train: training images (validation is held out from these).
    :param n_test: test images.
    :param num_classes: number of classes.
    :param image_size: side of the square RGB images.
    """
    g = torch.Generator().manual_seed(1000 + num_classes)
    templates = torch.rand(num_classes, 3, image_size, image_size, generator=g)
    g.manual_seed(seed)

    def sample(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = 0.6 * templates[y] + 0.4 * torch.rand(n, 3, image_size, image_size, generator=g)
        return (x * 255).round().to(torch.uint8), y

    x, y = sample(n_train)
    x_test, y_test = sample(n_test)
    return _from_arrays("synthetic", x, y, x_test, y_test, [f"class{i}" for i in range(num_classes)],
                        None, None, val_size, seed, augment, flip=True)


def preload(dataset: Dataset, n: Optional[int] = None, seed: int = 0,
            device: Union[str, torch.device] = "cpu", skip: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded subset of ``dataset`` as two tensors ``(x, y)``: the fast path for repeated evaluation.

    :param dataset: usually ``splits.val`` (no augmentation, so the tensors are deterministic); an augmented
        split (calibration data) gets its random transform drawn per image, from torch's global RNG.
    :param n: number of items (all when None or larger than the dataset).
    :param seed: which subset.
    :param device: where the tensors live (keep them on the GPU for the reward path).
    :param skip: leave out the first ``skip`` items of the seed's order: ``preload(d, m, seed, skip=n)`` is
        disjoint from ``preload(d, n, seed)`` (held-out images beside a fixed subset); None ``n``: all the rest.
    """
    total = len(dataset)
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    if skip == 0 and (n is None or n >= total):
        idx = np.arange(total)
    else:
        order = np.random.default_rng(seed).permutation(total)[skip:]
        idx = np.sort(order if n is None else order[:n])
    if isinstance(dataset, ArrayDataset):
        xs = dataset.images[torch.from_numpy(idx)]
        if dataset.transform is None:
            x = xs.float() / 255
        elif dataset.augmented and len(xs):
            # per image, as a DataLoader would: a random crop / flip / rotation drawn for each image, never one
            # shared by the whole batch
            x = torch.stack([dataset.transform(image) for image in xs])
        else:
            x = dataset.transform(xs)
        y = dataset.labels[torch.from_numpy(idx)]
    else:
        items = [dataset[int(i)] for i in idx]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([int(it[1]) for it in items])
    return x.to(device).contiguous(), y.to(device)


def make_loader(dataset: Dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0,
                num_workers: int = 0, drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose shuffling order is fixed by ``seed`` (repeatable runs on CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)


__all__ = ["DatasetSplits", "ArrayDataset", "make_datasets", "make_synthetic", "preload", "make_loader",
           "DATASET_NAMES", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD"]
