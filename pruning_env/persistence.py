"""The one persistence format of the project (after SB3's ``common/save_util.py``): a zip holding ``meta.json``
(format name, kind, version, library versions, JSON facts), ``data.pt`` (``torch.save`` of a dict) and raw parts.

Model checkpoints, agent files, run checkpoints and the pretraining resume file are all written by
:func:`save_parts` and read by :func:`load_parts`, which checks format, kind and version and names the file and
what was expected. Files of the layouts used before this format (version 0, :data:`LEGACY_VERSION`) still load.
"""
from __future__ import annotations

import io
import json
import math
import os
import platform
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from pruning_env.runtime import PathLike, atomic_path

#: ``meta.json["format"]`` of every file this module writes
FORMAT = "rl-prune"
#: the version :func:`load_parts` reports for a file written before this format (a plain ``torch.save``)
LEGACY_VERSION = 0
#: the kinds this project writes, and who writes them (for messages)
KINDS: Dict[str, str] = {
    "model": "a model checkpoint (pruning_env.checkpoint.save_checkpoint)",
    "module": "a whole module (torch.save(model) or torch.jit.save), read as a model",
    "agent": "an agent file (agent.save(path))",
    "run-checkpoint": "a run checkpoint (checkpoint.pt of a train_agent.py run folder)",
    "searched-model": "a searched model as kept-channel indices (searched_model.zip of a run folder)",
    "pretrain-state": "a pretraining resume file ({checkpoint}.state of python -m pruning_env.pretrain)",
}

_META = "meta.json"
_DATA = "data.pt"
_FILES = "files/"
#: keys of the pretraining resume file before this format (a plain torch.save of a dict)
_LEGACY_PRETRAIN_KEYS = {"model", "optimizer", "scheduler", "epoch", "best_acc", "best_state"}


class SavedParts(NamedTuple):
    """What :func:`load_parts` read: ``meta`` (the header, :func:`read_header`), ``data`` (the dict given to
    :func:`save_parts`) and ``files`` (raw byte parts by name)."""

    meta: Dict[str, Any]
    data: Dict[str, Any]
    files: Dict[str, bytes]


def _library_versions() -> Dict[str, str]:
    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        import stable_baselines3
    except ImportError:  # optional for ViT-only use
        pass
    else:
        versions["stable_baselines3"] = stable_baselines3.__version__
    return versions


def _json_value(value: Any, where: str) -> Any:
    """``value`` as plain JSON (NumPy scalars and arrays, tuples and paths converted); a TypeError names ``where``."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "tolist"):  # NumPy scalars / arrays, 0-d tensors
        return _json_value(value.tolist(), where)
    raise TypeError(f"{where} must be JSON-serialisable (numbers, strings, lists, dicts), got a "
                    f"{type(value).__name__}")


def save_parts(path: PathLike, kind: str, version: int, data: Dict[str, Any],
               files: Optional[Mapping[str, bytes]] = None, info: Optional[Mapping[str, Any]] = None) -> Path:
    """Write one versioned file atomically (a crash never leaves half a file).

    :param path: destination (any suffix; parent folders are created).
    :param kind: what the file holds, e.g. ``"model"`` or ``"agent"`` (:data:`KINDS`); checked by :func:`load_parts`.
    :param version: version of that kind's layout (>= 1); bump it when ``data``'s layout changes.
    :param data: anything ``torch.save`` pickles (NumPy arrays, tensors, modules, RNG states).
    :param files: raw byte parts by name, e.g. another library's own archive (SB3's model zip).
    :param info: JSON facts shown in ``meta.json`` (e.g. a checkpoint's dataset and validation accuracy), read
        back by :func:`read_meta` without unpickling anything.
    :return: ``path``.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string such as 'agent', got {kind!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be an int >= 1, got {version!r}")
    meta = {"format": FORMAT, "kind": kind, "version": version, "saved_at": time.time(),
            "libraries": _library_versions(), "info": _json_value(dict(info or {}), "info")}
    path = Path(path)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(_META, json.dumps(meta, indent=2))
            with archive.open(_DATA, "w", force_zip64=True) as f:
                torch.save(data, f)
            for name, blob in (files or {}).items():
                archive.writestr(_FILES + name, bytes(blob))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return path


# ------------------------------------------------------------------------------------------------------ reading

def _expected(kind: Optional[str]) -> str:
    what = KINDS.get(kind, f"a {kind!r} file") if kind else "a file written by this project"
    return f"expected {what}, in the {FORMAT!r} format (a zip holding {_META})"


def _check_file(path: Path, kind: Optional[str]) -> None:
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a file; {_expected(kind)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {_expected(kind)}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); {_expected(kind)}")


def _format_header(path: Path) -> Optional[Dict[str, Any]]:
    """The ``meta.json`` of a file in the format; None when the file is not a zip holding one (e.g. an older
    ``torch.save`` file, itself a zip); a ``meta.json`` of another format raises."""
    try:
        with zipfile.ZipFile(path) as archive:
            if _META not in archive.namelist():
                return None
            meta = json.loads(archive.read(_META).decode())
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise ValueError(f"{path} is not an {FORMAT!r} file: its {_META} names format {found!r}")
    return meta


def _legacy_header(kind: str, info: Optional[Mapping[str, Any]] = None, layout: str = "torch.save") -> Dict[str, Any]:
    return {"format": FORMAT, "kind": kind, "version": LEGACY_VERSION, "legacy": layout, "info": dict(info or {})}


def _load_legacy(path: Path, map_location: Union[str, torch.device, None], kind: Optional[str]) -> SavedParts:
    """A file written before this format: a ``torch.save`` dict of the old model checkpoint (``rl-prune/1``) or of
    the old pretraining resume file, a whole module (``torch.save`` / ``torch.jit.save``)."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch reports garbage or truncated files as many error types, none naming the file
        try:
            obj = torch.jit.load(str(path), map_location=map_location)
        except Exception:
            raise ValueError(f"{path} is not an {FORMAT!r} file: it cannot be read ({type(err).__name__}: {err}); "
                             f"it is truncated or not a PyTorch file; {_expected(kind)}") from err
    if isinstance(obj, nn.Module):
        return SavedParts(_legacy_header("module"), {"module": obj}, {})
    if isinstance(obj, dict):
        if obj.get("format") == "rl-prune/1":
            data = {k: v for k, v in obj.items() if k not in ("format", "meta")}
            return SavedParts(_legacy_header("model", obj.get("meta"), "rl-prune/1"), data, {})
        if _LEGACY_PRETRAIN_KEYS <= set(obj):
            return SavedParts(_legacy_header("pretrain-state", {"epoch": obj.get("epoch")}), obj, {})
        if isinstance(obj.get("model"), nn.Module):
            return SavedParts(_legacy_header("module"), {"module": obj["model"]}, {})
    raise ValueError(f"{path} holds a {type(obj).__name__} that is no file of this project; {_expected(kind)}")


def load_any(path: PathLike, map_location: Union[str, torch.device, None] = "cpu",
             kind: Optional[str] = None) -> SavedParts:
    """Read a file in the format, or of an earlier layout (its header then has version :data:`LEGACY_VERSION`
    and a ``legacy`` entry), whatever its kind.

    :param path: the file.
    :param map_location: where tensors (and modules) are loaded (``torch.load``'s argument).
    :param kind: the kind the caller wants, only for messages.
    :raises FileNotFoundError: the file does not exist.
    :raises ValueError: the path is a directory, or the file is empty, unreadable or of no known layout.
    """
    path = Path(path)
    _check_file(path, kind)
    meta = _format_header(path)
    if meta is None:
        return _load_legacy(path, map_location, kind)
    try:
        with zipfile.ZipFile(path) as archive:
            data = torch.load(io.BytesIO(archive.read(_DATA)), map_location=map_location, weights_only=False)
            files = {n[len(_FILES):]: archive.read(n) for n in archive.namelist() if n.startswith(_FILES)}
    except Exception as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}); it is truncated or damaged; "
                         f"{_expected(kind or meta.get('kind'))}") from err
    return SavedParts(meta, data, files)


def load_parts(path: PathLike, kind: str, version: Union[int, Sequence[int]],
               map_location: Union[str, torch.device, None] = "cpu") -> SavedParts:
    """Read a file written by :func:`save_parts`, after checking its format, kind and version.

    :param path: the file.
    :param kind: the kind expected (e.g. ``"agent"``).
    :param version: the version(s) this code reads; any other is refused with a message naming both. Include
        :data:`LEGACY_VERSION` to accept the kind's layout from before this format.
    :param map_location: where tensors (and modules) in ``data`` are loaded.
    """
    path = Path(path)
    versions = (version,) if isinstance(version, int) else tuple(version)
    if LEGACY_VERSION in versions:
        parts = load_any(path, map_location, kind)
    else:
        _check_file(path, kind)
        if _format_header(path) is None:
            raise ValueError(f"{path} is not an {FORMAT!r} file; {_expected(kind)}")
        parts = load_any(path, map_location, kind)
    found_kind, found_version = parts.meta.get("kind"), parts.meta.get("version")
    if found_kind != kind:
        raise ValueError(f"{path} holds a {found_kind!r} file, expected a {kind!r} file "
                         f"({KINDS.get(kind, 'see pruning_env.persistence.KINDS')})")
    if found_version not in versions:
        readable = " or ".join(str(v) for v in versions if v != LEGACY_VERSION) or str(versions[0])
        raise ValueError(f"{path} is a {kind!r} file of version {found_version!r}; this code reads version "
                         f"{readable} (save it again with the matching code)")
    return parts


def read_header(path: PathLike) -> Dict[str, Any]:
    """The header of a file: ``format``, ``kind``, ``version``, ``saved_at``, ``libraries``, ``info`` (for a file
    of an earlier layout: ``kind``, ``version`` 0, ``legacy`` and ``info``).

    Nothing is unpickled for a file in the format; an earlier-layout file has to be loaded to be recognised.

    :param path: the file.
    """
    path = Path(path)
    _check_file(path, None)
    meta = _format_header(path)
    return meta if meta is not None else _load_legacy(path, "cpu", None).meta


def read_meta(path: PathLike) -> Dict[str, Any]:
    """The JSON facts stored with a file (``info`` of :func:`read_header`): a model checkpoint's training facts
    (dataset, epoch, val_top1, seed, val_size, recipe), an agent file's class, a run checkpoint's phase; {} for a
    bare module.

    :param path: the file.
    :raises FileNotFoundError: the file does not exist.
    :raises ValueError: the path is a directory, or the file is empty, unreadable or of no known layout.
    """
    return dict(read_header(path).get("info") or {})


__all__ = ["FORMAT", "LEGACY_VERSION", "KINDS", "SavedParts", "save_parts", "load_parts", "load_any",
           "read_header", "read_meta"]
