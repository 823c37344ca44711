"""Gymnasium environments: ``PruneEnv`` (RL-Pruner channel pruning, configured by ``PruneEnvConfig``, working on
a ``PruningTask``, scoring with a ``CandidateScorer``) and ``PatchSelectEnv`` (AgentViT patch selection, configured
by ``PatchEnvConfig``), with their registered ids. The env classes are imported on first use to keep imports light.
"""
from __future__ import annotations

from typing import Any

from pruning_env.envs.registration import prune_env_ids, register_envs

_LAZY = {
    "PruneEnv": "pruning_env.envs.prune_env",
    "PruneEnvConfig": "pruning_env.envs.config",
    "PatchEnvConfig": "pruning_env.envs.config",
    "CandidateScorer": "pruning_env.envs.scoring",
    "PruningTask": "pruning_env.envs.task",
    "keep_for_action": "pruning_env.envs.budget",
    "PatchSelectEnv": "pruning_env.envs.patch_env",
    "distribution_to_counts": "pruning_env.envs.budget",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PruneEnv", "PruneEnvConfig", "PatchEnvConfig", "CandidateScorer", "PruningTask", "keep_for_action",
           "PatchSelectEnv", "distribution_to_counts", "register_envs", "prune_env_ids"]
