"""Agent files in the project's one persistence format (:mod:`pruning_env.persistence`): the agent's class, its
constructor arguments and learned state, and raw parts such as SB3's own model zip.

Every agent's ``save``/``load`` goes through :func:`save_agent` / :func:`load_agent`; the format itself (and
``save_parts`` / ``load_parts`` / ``read_meta``, re-exported here) lives in ``pruning_env``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from pruning_env.persistence import FORMAT, SavedParts, load_parts, read_header, read_meta, save_parts
from pruning_env.runtime import PathLike

#: kind and version of agent files (all agent families: pruning agents, SB3 agents, patch agents)
AGENT_KIND = "agent"
AGENT_VERSION = 1


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


__all__ = ["FORMAT", "AGENT_KIND", "AGENT_VERSION", "SavedParts", "save_parts", "load_parts", "read_header",
           "read_meta", "class_path", "save_agent", "load_agent"]
