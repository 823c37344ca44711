"""Model checkpoints: zoo checkpoints that rebuild without the training code, whole-module files, and their
metadata. Writes are atomic (:mod:`pruning_env.runtime`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

from pruning_env.runtime import PathLike, atomic_save


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
    """Save a model so that it can be rebuilt without the code that trained it.

    Zoo models (with ``zoo_config``) are stored as config + state_dict; any other module (e.g. a pruned
    model, whose shapes no longer match its constructor) is stored whole. ``meta`` is kept alongside.
    """
    config = getattr(model, "zoo_config", None)
    payload = {"format": "rl-prune/1", "meta": meta}
    if config is not None and not getattr(model, "pruned", False):
        payload.update(kind="zoo", zoo_config=dict(config), state_dict=model.state_dict())
    else:
        payload.update(kind="module", module=model)
    return atomic_save(payload, path)


def _read(path: Path, map_location: Union[str, torch.device]) -> Any:
    """The object stored in a checkpoint file, or an error naming the file and what was expected."""
    expected = "a file written by pruning_env.checkpoint.save_checkpoint, torch.save(model) or torch.jit.save"
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory, not a file; expected {expected}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes); expected {expected}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch reports garbage or truncated files as many error types, none naming the file
        try:
            return torch.jit.load(str(path), map_location=map_location)
        except Exception:
            raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it is truncated or "
                             f"not a PyTorch file; expected {expected}") from err


def load_model(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load a model written by :func:`save_checkpoint`, a pickled ``nn.Module`` or a TorchScript file.

    :param path: checkpoint file.
    :param map_location: device for the tensors.
    :raises FileNotFoundError: the file does not exist.
    :raises ValueError: the path is a directory, or the file is empty, unreadable or holds no model.
    """
    path = Path(path)
    obj = _read(path, map_location)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and obj.get("kind") == "zoo":
        from pruning_env.models import create_model

        cfg = dict(obj["zoo_config"])
        model = create_model(cfg.pop("name"), **cfg)
        model.load_state_dict(obj["state_dict"])
        return model.to(map_location)
    if isinstance(obj, dict) and obj.get("kind") == "module":
        return obj["module"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], nn.Module):
        return obj["model"]
    raise ValueError(f"{path} holds no model this project can load (a {type(obj).__name__}); "
                     f"expected a file written by pruning_env.checkpoint.save_checkpoint or torch.save(model)")


def read_meta(path: PathLike) -> dict:
    """The metadata stored by :func:`save_checkpoint` (empty for other model files).

    :param path: checkpoint file.
    :raises FileNotFoundError: the file does not exist.
    :raises ValueError: the path is a directory, or the file is empty or unreadable.
    """
    obj = _read(Path(path), "cpu")
    return dict(obj.get("meta", {})) if isinstance(obj, dict) else {}
