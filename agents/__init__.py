"""Agents that drive the pruning_env environments: the faithful RL-Pruner agent, Stable-Baselines3 baselines,
non-RL baselines (uniform, global Taylor, random search) and, in ``agents.vit_ddqn``, the AgentViT agents.

Classes load on first use, so ``import agents`` stays light (SB3 and torch come in only when needed).
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BasePruningAgent": "agents.common.base",
    "PruneMonitor": "agents.common.monitor",
    "RLPrunerAgent": "agents.rl_pruner.rl_pruner",
    "UniformPruner": "agents.heuristics",
    "GlobalTaylorPruner": "agents.heuristics",
    "RandomSearch": "agents.heuristics",
    "SB3Agent": "agents.sb3_baselines",
    "AMCAgent": "agents.amc",
    "AGENTS": "agents.registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
