"""AgentViT's FashionMNIST and Imagenette loaders on small generated files in torchvision's own on-disk formats
(idx files; imagenette2-160/{train,val}/<wnid>/*.JPEG), offline; and one env step on each.
"""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pruning_env.data import make_datasets
from pruning_env.envs.patch_env import PatchSelectEnv

WNIDS = ("n01440764", "n02102040", "n03888257")  # tench, English springer, parachute


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file as in MNIST/FashionMNIST: magic (0, 0, uint8 type 0x08, ndim), big-endian sizes, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(root: Path, n_train: int = 48, n_test: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    raw = root / "FashionMNIST" / "raw"
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    write_idx(raw / "train-images-idx3-ubyte", train)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(n_train) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10)
    return train


def make_imagenette(root: Path, per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c, wnid in enumerate(WNIDS):
            folder = root / "imagenette2-160" / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (160, 213, 3), dtype=np.uint8)  # 160 px short side, as the archive
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG")


def test_fashion_mnist_is_one_channel_28px_with_torchvision_classes(tmp_path):
    train = make_fashion_mnist(tmp_path)
    splits = make_datasets("fashionmnist", root=tmp_path, val_size=8, seed=0, augment=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 8, 16)
    assert splits.input_size == (1, 28, 28) and splits.num_classes == 10
    assert splits.classes[0] == "T-shirt/top" and splits.mean == (0.2860,)
    x, y = splits.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    # the pixels are the file's, normalised with FashionMNIST's statistics
    raw = splits.train.images[0, 0].numpy()
    match = np.flatnonzero((train == raw).all(axis=(1, 2)))
    assert match.size == 1 and y == match[0] % 10
    assert torch.allclose(x[0] * 0.3530 + 0.2860, torch.from_numpy(raw).float() / 255, atol=1e-4)


def test_fashion_mnist_missing_files_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="FashionMNIST/raw"):
        make_datasets("fashionmnist", root=tmp_path)


def test_imagenette_reads_the_archive_layout_and_resizes(tmp_path):
    make_imagenette(tmp_path)
    splits = make_datasets("imagenette", root=tmp_path, val_size=3, seed=0, augment=True)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 3, 6)
    assert splits.input_size == (3, 64, 64) and splits.classes == ["tench", "English springer", "parachute"]
    assert sorted(set(splits.test.labels.tolist())) == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="imagenette2-160"):
        make_datasets("imagenette", root=tmp_path / "nowhere")


def test_patch_env_runs_on_both_datasets(tmp_path):
    make_fashion_mnist(tmp_path)
    make_imagenette(tmp_path)
    # FashionMNIST: 4 px patches on 28 px -> 7 x 7 = 49 tokens, 1 input channel
    env = PatchSelectEnv(dataset="fashionmnist", data_root=str(tmp_path), val_size=8, width=0.125, depth=1,
                         batch_size=8, epochs=1, n_keep=23, action_mode="mask", seed=0, time_info=False)
    assert env.n_patches == 49 and env.model.channels == 1
    obs, _ = env.reset(seed=0)
    mask = np.zeros(49, dtype=np.int8)
    mask[:23] = 1
    _, _, _, _, info = env.step(mask)
    assert obs.shape == (8, 49) and info["kept"] == 23
    # Imagenette: 8 px patches on 64 px -> the notebook's 8 x 8 = 64 tokens
    env = PatchSelectEnv(dataset="imagenette", data_root=str(tmp_path), val_size=3, width=0.125, depth=1,
                         batch_size=5, epochs=1, model_kwargs={"patch_size": 8}, seed=0, time_info=False)
    obs, _ = env.reset(seed=0)
    assert env.n_patches == 64 and env.model.patch_dim == 8 * 8 * 3 and obs.shape == (5, 64)
    env.step(np.random.default_rng(0).random(64).astype(np.float32))
