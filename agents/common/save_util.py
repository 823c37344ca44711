"""The one save format of agents and runs, after SB3's ``common/save_util.py``: a zip holding ``meta.json``
(format name, kind, version, library versions), ``data.pt`` (``torch.save`` of a dict) and raw byte parts.

Every agent's ``save``/``load`` and the run checkpoint go through :func:`save_parts` / :func:`load_parts`;
loading checks the format, the kind and the version, and says which file was wrong and what was expected.
"""
from __future__ import annotations

import importlib
import io
import json
import os
import platform
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import torch

from pruning_env.runtime import PathLike, atomic_path

#: ``meta.json["format"]`` of every file this module writes
FORMAT = "rl-prune"
#: kind and version of agent files (all agent families: pruning agents, SB3 agents, patch agents)
AGENT_KIND = "agent"
AGENT_VERSION = 1

_META = "meta.json"
_DATA = "data.pt"
_FILES = "files/"


class SavedParts(NamedTuple):
    """What :func:`load_parts` read: ``meta`` (the JSON entry), ``data`` (the dict given to :func:`save_parts`)
    and ``files`` (raw byte parts by name)."""

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


def save_parts(path: PathLike, kind: str, version: int, data: Dict[str, Any],
               files: Optional[Mapping[str, bytes]] = None, info: Optional[Dict[str, Any]] = None) -> Path:
    """Write one versioned file atomically (a crash never leaves half a file).

    :param path: destination (any suffix; parent folders are created).
    :param kind: what the file holds, e.g. ``"agent"`` or ``"run-checkpoint"``; checked by :func:`load_parts`.
    :param version: version of that kind's layout; bump it when ``data``'s layout changes.
    :param data: anything ``torch.save`` pickles (NumPy arrays, tensors, modules, RNG states).
    :param files: raw byte parts by name, e.g. another library's own archive (SB3's model zip).
    :param info: JSON-serialisable facts shown in ``meta.json`` (e.g. the agent class), for people and tools
        that read a file without unpickling it.
    :return: ``path``.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string such as 'agent', got {kind!r}")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be an int >= 1, got {version!r}")
    meta = {"format": FORMAT, "kind": kind, "version": version, "saved_at": time.time(),
            "libraries": _library_versions(), "info": dict(info or {})}
    try:
        meta_text = json.dumps(meta, indent=2)
    except TypeError as err:
        raise TypeError(f"info must be JSON-serialisable (numbers, strings, lists, dicts): {err}") from err
    path = Path(path)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(_META, meta_text)
            with archive.open(_DATA, "w", force_zip64=True) as f:
                torch.save(data, f)
            for name, blob in (files or {}).items():
                archive.writestr(_FILES + name, bytes(blob))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return path


def read_meta(path: PathLike) -> Dict[str, Any]:
    """The ``meta.json`` entry of a file written by :func:`save_parts` (nothing is unpickled).

    :param path: the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            meta = json.loads(archive.read(_META).decode())
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        raise ValueError(f"{path} is not an {FORMAT!r} file (expected a zip with {_META} written by "
                         f"agents.common.save_util.save_parts)") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT!r} file: its {_META} names format "
                         f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta


def load_parts(path: PathLike, kind: str, version: int,
               map_location: Optional[str | torch.device] = "cpu") -> SavedParts:
    """Read a file written by :func:`save_parts`, after checking its format, kind and version.

    :param path: the file.
    :param kind: the kind expected (e.g. ``"agent"``).
    :param version: the version this code reads; any other is refused with a message naming both.
    :param map_location: where tensors (and modules) in ``data`` are loaded (``torch.load``'s argument).
    """
    meta = read_meta(path)
    if meta.get("kind") != kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r} file, expected a {kind!r} file")
    if meta.get("version") != version:
        raise ValueError(f"{path} is a {kind!r} file of version {meta.get('version')!r}; this code reads version "
                         f"{version} (save it again with the matching code)")
    with zipfile.ZipFile(path) as archive:
        data = torch.load(io.BytesIO(archive.read(_DATA)), map_location=map_location, weights_only=False)
        files = {name[len(_FILES):]: archive.read(name) for name in archive.namelist() if name.startswith(_FILES)}
    return SavedParts(meta, data, files)


def class_path(cls: type) -> str:
    """``"module:QualName"`` of a class, as agent files store it."""
    return f"{cls.__module__}:{cls.__qualname__}"


def save_agent(path: PathLike, agent: Any, params: Dict[str, Any], state: Dict[str, Any],
               files: Optional[Mapping[str, bytes]] = None) -> Path:
    """Write an agent file: its class, constructor arguments and learned state (kind ``"agent"``).

    :param path: destination.
    :param agent: the agent (its class is stored, and checked on load).
    :param params: constructor arguments that rebuild it.
    :param state: what changed while learning.
    :param files: raw parts, e.g. SB3's model zip.
    """
    cls = class_path(type(agent))
    return save_parts(path, AGENT_KIND, AGENT_VERSION, {"class": cls, "params": params, "state": state}, files,
                      info={"class": cls})


def load_agent(path: PathLike, cls: type) -> Tuple[type, SavedParts]:
    """Read an agent file written by :func:`save_agent` for ``cls.load``.

    :param path: the file.
    :param cls: the class ``load`` was called on; the saved class must be it or a subclass.
    :return: ``(saved class, parts)``; ``parts.data`` has ``"params"`` and ``"state"``.
    """
    parts = load_parts(path, AGENT_KIND, AGENT_VERSION)
    module, _, name = parts.data["class"].partition(":")
    saved_cls: Any = importlib.import_module(module)
    for attr in name.split("."):
        saved_cls = getattr(saved_cls, attr)
    if not (isinstance(saved_cls, type) and issubclass(saved_cls, cls)):
        raise ValueError(f"{path} holds a {name}, not a {cls.__name__}; load it with {name}.load")
    return saved_cls, parts


__all__ = ["FORMAT", "AGENT_KIND", "AGENT_VERSION", "SavedParts", "save_parts", "load_parts", "read_meta",
           "class_path", "save_agent", "load_agent"]
