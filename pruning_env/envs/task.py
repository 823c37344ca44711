"""PruningTask: what a pruning env works on (the original model, the data splits, the reward images and the
calibration batches), built from a :class:`~pruning_env.envs.config.PruneEnvConfig` in one place.

Checkpoint metadata decides the validation split (so reward images were never trained on); a missing
checkpoint is pretrained first when the config asks for it; every file is checked before any training starts.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from pruning_env.checkpoint import default_checkpoint_path, load_model, read_meta
from pruning_env.data import ArrayDataset, DatasetSplits, make_datasets, preload
from pruning_env.envs.config import DEFAULT_VAL_SIZE, PruneEnvConfig
from pruning_env.envs.reward import REWARD_ESTIMATORS
from pruning_env.runtime import TorchRNG

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class PruningTask:
    """The original model and the data around it, ready for an env on ``device``.

    :ivar model: the original model on ``device``, in eval mode (a private copy; never pruned in place).
    :ivar splits: train / validation / test splits (validation held out from training: the reward's images).
    :ivar input_size: one input's shape ``(C, H, W)``.
    :ivar reward_data: the fixed, seeded validation subset ``(x, y)`` the reward is measured on, on ``device``.
    :ivar calibration: seeded, augmented training batches for the importance criterion, on ``device``.
    :ivar estimator_data: seeded, un-augmented training images ``(x, y)`` for the reward estimator (BN
        statistics, KD batches), on ``device``; None when ``cfg.reward_estimator`` reads none (its registry
        entry says). Never validation or test images.
    :ivar holdout_data: validation images ``(x, y)`` disjoint from ``reward_data``, for ``final_rerank`` (None
        when it is off).
    :ivar val_size: the held-out validation size that was used (count or fraction).
    :ivar split_seed: the seed of the train/validation split.
    :ivar checkpoint: the checkpoint file the weights came from (None for a module or an untrained model).
    :ivar checkpoint_meta: the metadata stored in that checkpoint (empty when none).
    """

    model: nn.Module
    splits: DatasetSplits
    input_size: Tuple[int, ...]
    reward_data: Batch
    calibration: List[Batch]
    estimator_data: Optional[Batch]
    val_size: Union[int, float]
    split_seed: int
    checkpoint: Optional[Path] = None
    checkpoint_meta: Dict[str, Any] = field(default_factory=dict)
    holdout_data: Optional[Batch] = None

    @classmethod
    def from_config(cls, cfg: PruneEnvConfig, device: torch.device) -> "PruningTask":
        """Load (or pretrain) the model, the splits, the reward images and the calibration batches.

        :param cfg: a validated env config.
        :param device: where the model and the preloaded tensors live.
        """
        seed = 0 if cfg.seed is None else int(cfg.seed)
        path = checkpoint_path(cfg)
        meta = read_meta(path) if path is not None and path.is_file() else {}
        # the checkpoint's split (seed and held-out count) by default: reward images were never trained on
        split_seed = int(cfg.split_seed if cfg.split_seed is not None else meta.get("seed", seed))
        val_size = cfg.val_size if cfg.val_size is not None else meta.get("val_size", DEFAULT_VAL_SIZE)
        if isinstance(cfg.dataset, DatasetSplits):
            splits = cfg.dataset
        else:
            splits = make_datasets(cfg.dataset, root=cfg.data_root, download=cfg.download, val_size=val_size,
                                   seed=split_seed, augment=True)
            _warn_split_mismatch(meta, cfg.dataset, splits, val_size)
        input_size = tuple(splits.input_size)
        net = _load_model(cfg, splits, path, device, val_size, split_seed, seed)
        _check_outputs(net, splits, input_size)
        net = net.to(device).eval()
        reward_data = preload(splits.val, n=cfg.reward_samples, seed=seed, device=device)
        calibration = _calibration_batches(splits, cfg.calibration_size, cfg.calibration_batches, seed, device)
        estimator_data = (_estimator_images(splits, cfg.reward_train_images, seed, device)
                          if REWARD_ESTIMATORS[cfg.reward_estimator].train_images else None)
        holdout = None
        if cfg.final_rerank > 1:  # the images after the reward's in the same seeded order: never the reward's
            holdout = preload(splits.val, n=cfg.final_rerank_samples, seed=seed, device=device,
                              skip=len(reward_data[1]))
            if len(holdout[1]) == 0:
                raise ValueError(f"final_rerank={cfg.final_rerank}: the reward reads all {len(splits.val)} validation "
                                 f"images (reward_samples={cfg.reward_samples}); none is left to re-score on")
        return cls(model=net, splits=splits, input_size=input_size, reward_data=reward_data, calibration=calibration,
                   estimator_data=estimator_data,
                   val_size=val_size, split_seed=split_seed, checkpoint=path,
                   checkpoint_meta=meta, holdout_data=holdout)


def checkpoint_path(cfg: PruneEnvConfig) -> Optional[Path]:
    """The checkpoint file a config loads (None when it builds no pretrained zoo model).

    :param cfg: the env config.
    :raises ValueError: when the path exists but is not a file (e.g. a directory).
    """
    if not (isinstance(cfg.model, str) and cfg.pretrained):
        return None
    ds_name = cfg.dataset if isinstance(cfg.dataset, str) else cfg.dataset.name
    path = Path(cfg.checkpoint) if cfg.checkpoint is not None else default_checkpoint_path(cfg.model, ds_name,
                                                                                             cfg.width)
    if path.exists() and not path.is_file():
        raise ValueError(f"checkpoint {path} is a directory, not a file; pass checkpoint=PATH to a .pt file "
                         f"written by `python -m pruning_env.pretrain --out PATH` (or torch.save(model))")
    return path


def _warn_split_mismatch(meta: Dict[str, Any], dataset: str, splits: DatasetSplits,
                         val_size: Union[int, float]) -> None:
    """Warn when the validation split differs from the one the checkpoint was pretrained with."""
    held_out = meta.get("val_size")
    if held_out is not None and meta.get("dataset") == dataset and len(splits.val) != int(held_out):
        warnings.warn(f"val_size={val_size!r} holds out {len(splits.val)} images but the checkpoint was pretrained "
                      f"holding out {int(held_out)}: some reward images were trained on. Leave val_size unset to "
                      f"use the checkpoint's split", stacklevel=4)


def _load_model(cfg: PruneEnvConfig, splits: DatasetSplits, path: Optional[Path], device: torch.device,
                val_size: Union[int, float], split_seed: int, seed: int) -> nn.Module:
    if isinstance(cfg.model, nn.Module):
        return copy.deepcopy(cfg.model)  # the caller's module is never touched
    if path is None:
        from pruning_env.models import create_model

        with TorchRNG(seed):
            return create_model(cfg.model, num_classes=splits.num_classes, width=cfg.width)
    if not path.is_file() and cfg.auto_pretrain_epochs > 0:
        from pruning_env.pretrain import ensure_pretrained

        ensure_pretrained(cfg.model, splits.name, width=cfg.width, epochs=cfg.auto_pretrain_epochs, out=path,
                          data_root=cfg.data_root, download=cfg.download, device=str(device), val_size=val_size,
                          seed=split_seed)
    if not path.is_file():
        width_arg = "" if float(cfg.width) == 1.0 else f" --width {float(cfg.width):g}"
        raise FileNotFoundError(
            f"pretrained checkpoint not found: {path}. Train it with `python -m pruning_env.pretrain "
            f"--model {cfg.model} --dataset {splits.name}{width_arg} --out {path}`, pass checkpoint=PATH, or use "
            f"pretrained=False for an untrained model")
    return load_model(path, map_location="cpu")


def _check_outputs(net: nn.Module, splits: DatasetSplits, input_size: Tuple[int, ...]) -> None:
    """A model whose classifier does not match the dataset's classes is refused."""
    cfg = getattr(net, "zoo_config", None)
    if cfg is not None and "num_classes" in cfg:
        out: Optional[int] = int(cfg["num_classes"])
    else:
        out = _traced_outputs(net, input_size)
    if out is not None and out != splits.num_classes:
        raise ValueError(f"the model has {out} outputs but dataset {splits.name!r} has {splits.num_classes} "
                         f"classes; use a checkpoint trained on this dataset")


def _traced_outputs(net: nn.Module, input_size: Tuple[int, ...]) -> Optional[int]:
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros((1, *input_size)))
    except Exception:  # the pruner's trace gives the precise error later
        return None
    finally:
        net.train(was_training)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None


def _calibration_batches(splits: DatasetSplits, size: int, n_batches: int, seed: int,
                         device: torch.device) -> List[Batch]:
    # the train split is augmented with torch's global RNG: a private stream, so calibration is seeded and the
    # caller's RNG stream is left alone
    with TorchRNG(seed + 1):
        x, y = preload(splits.train, n=size * n_batches, seed=seed + 1, device=device)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _estimator_images(splits: DatasetSplits, n: int, seed: int, device: torch.device) -> Batch:
    """``n`` seeded training images for the reward estimator, without the training augmentation (crop, flip,
    rotation would skew BatchNorm statistics away from the evaluation images); an augmented split that is not
    an :class:`ArrayDataset` is preloaded with its augmentation, on a private RNG stream."""
    train = splits.train
    if isinstance(train, ArrayDataset) and train.augmented and isinstance(splits.val, ArrayDataset):
        train = ArrayDataset(train.images, train.labels, splits.val.transform)
    with TorchRNG(seed + 2):
        return preload(train, n=n, seed=seed + 2, device=device)


__all__ = ["PruningTask", "checkpoint_path"]
