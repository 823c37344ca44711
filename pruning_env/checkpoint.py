"""Saving and loading models and run state: atomic writes, zoo checkpoints that rebuild without the
training code, device resolution and seeding shared by every command.
"""
from __future__ import annotations

import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]


@contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only when the block succeeds: a crash never leaves half
    a file. The file gets the mode a plain ``open`` would give (0666 minus the umask), not mkstemp's 0600.

    :param path: destination; parent folders are created.
    :param suffix: suffix of the temporary name (exporters that look at the extension need the real one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=str(path.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename (see :func:`atomic_path`).

    :param obj: anything ``torch.save`` accepts.
    :param path: destination; parent folders are created.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(text: str, path: PathLike) -> Path:
    """Write a text file atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return Path(path)


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


def load_model(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load a model written by :func:`save_checkpoint`, a pickled ``nn.Module`` or a TorchScript file.

    :param path: checkpoint file.
    :param map_location: device for the tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except RuntimeError as err:
        try:
            return torch.jit.load(str(path), map_location=map_location)
        except Exception:
            raise err
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
    """The metadata stored by :func:`save_checkpoint` (empty for other files)."""
    obj = torch.load(Path(path), map_location="cpu", weights_only=False)
    return dict(obj.get("meta", {})) if isinstance(obj, dict) else {}


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when available, else CPU; an unavailable CUDA request is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was requested but CUDA is not available; use device='cpu'")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so that CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    """All RNG states, for resumable checkpoints."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states captured by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
