"""Model checkpoints: zoo checkpoints that rebuild without the training code, whole-module files, and their
metadata, in the one persistence format (:mod:`pruning_env.persistence`); files of earlier layouts still load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

from pruning_env.persistence import load_any, read_meta, save_parts
from pruning_env.runtime import PathLike

#: kind and version of a model checkpoint in :mod:`pruning_env.persistence`
MODEL_KIND = "model"
MODEL_VERSION = 1


def default_checkpoint_path(model: str, dataset: str, width: float = 1.0, root: PathLike = "checkpoints") -> Path:
    """Where ``pruning_env.pretrain`` writes (and the envs look for) a pretrained model.

    ``vgg19`` on ``cifar100`` gives ``checkpoints/vgg19_cifar100.pt``; width 0.25 adds ``_w0.25``;
    ``npz:/a/b/c.npz`` is named after the file stem (``npz-c``).
    """
    ds = dataset
    if ":" in dataset:
        kind, _, rest = dataset.partition(":")
        ds = f"{kind}-{Path(rest).stem or Path(rest).name}"
    suffix = "" if float(width) == 1.0 else f"_w{float(width):g}"
    return Path(root) / f"{model}{suffix}_{ds}.pt"


def save_checkpoint(model: nn.Module, path: PathLike, **meta: Any) -> Path:
    """Save a model so that it can be rebuilt without the code that trained it (atomically).

    Zoo models (with ``zoo_config``) are stored as config + state_dict; any other module (e.g. a pruned
    model, whose shapes no longer match its constructor) is stored whole.

    :param model: the model.
    :param path: destination file.
    :param meta: JSON facts kept alongside (dataset, epoch, val_top1, ...), read back by :func:`read_meta`.
    """
    config = getattr(model, "zoo_config", None)
    if config is not None and not getattr(model, "pruned", False):
        data = {"kind": "zoo", "zoo_config": dict(config), "state_dict": model.state_dict()}
    else:
        data = {"kind": "module", "module": model}
    return save_parts(path, MODEL_KIND, MODEL_VERSION, data, info=meta)


def load_model(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load a model written by :func:`save_checkpoint` (this or an earlier layout), a pickled ``nn.Module`` or a
    TorchScript file.

    :param path: checkpoint file.
    :param map_location: device for the tensors.
    :raises FileNotFoundError: the file does not exist.
    :raises ValueError: the path is a directory, or the file is empty, unreadable or holds no model.
    """
    path = Path(path)
    parts = load_any(path, map_location, kind=MODEL_KIND)
    kind, version, data = parts.meta.get("kind"), parts.meta.get("version"), parts.data
    if kind == "module":
        return data["module"]
    if kind != MODEL_KIND:
        raise ValueError(f"{path} holds a {kind!r} file, not a model; expected a file written by "
                         f"pruning_env.checkpoint.save_checkpoint, torch.save(model) or torch.jit.save")
    if version not in (0, MODEL_VERSION):
        raise ValueError(f"{path} is a model checkpoint of version {version!r}; this code reads version "
                         f"{MODEL_VERSION} (save it again with the matching code)")
    if data.get("kind") == "zoo":
        from pruning_env.models import create_model

        cfg = dict(data["zoo_config"])
        model = create_model(cfg.pop("name"), **cfg)
        model.load_state_dict(data["state_dict"])
        return model.to(map_location)
    if data.get("kind") == "module" and isinstance(data.get("module"), nn.Module):
        return data["module"]
    raise ValueError(f"{path} holds no model this project can load (a model checkpoint of kind "
                     f"{data.get('kind')!r}); expected a file written by pruning_env.checkpoint.save_checkpoint")


__all__ = ["default_checkpoint_path", "save_checkpoint", "load_model", "read_meta", "MODEL_KIND", "MODEL_VERSION"]
