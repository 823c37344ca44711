"""The table of pruning agents that the run layer (``rl_prune``) and the benchmarks can run: one entry per agent
kind, with the env settings it needs and how the shared evaluation budget maps onto its arguments.

Adding an agent is one ``AGENTS`` entry; ``rl_prune.pipeline.build_env`` / ``build_agent`` do the rest from a
config.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

#: zoo-style hyperparameter files of the SB3 baselines
SB3_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "sb3"


@dataclass(frozen=True)
class AgentSpec:
    """How to build and run one agent kind.

    :param target: ``"module:Class"`` of the agent.
    :param env: PruneEnv arguments the agent needs (the config's ``env`` and ``agents.NAME.env`` may override
        those that are not forced).
    :param sb3_algo: SB3 algorithm name for SB3 baselines (hyperparameters from ``configs/sb3/{algo}.yaml``).
    :param budget_arg: for search agents, the constructor argument that receives ``budget / n_steps``.
    :param kwargs: constructor arguments of this entry (a mode of a class another entry also uses); the
        config's ``agents.NAME`` overrides them.
    :param description: one line for ``--help`` and docs.
    :param env_class: ``"module:Class"`` of the env built with those arguments (default: PruneEnv).
    :param sb3_config: stem of the zoo file in ``configs/sb3/`` when it is not ``sb3_algo``'s.
    :param budget_exact: a search agent spends its budget exactly; False for a grid sized from the budget that may
        end under it (a probe whose kept channels equal an earlier one's is a free cache hit), never over.
    """

    target: str
    env: Dict[str, Any] = field(default_factory=dict)
    sb3_algo: Optional[str] = None
    budget_arg: Optional[str] = None
    description: str = ""
    kwargs: Dict[str, Any] = field(default_factory=dict)
    env_class: str = "pruning_env.envs.prune_env:PruneEnv"
    sb3_config: Optional[str] = None
    budget_exact: bool = True


def _sb3(algo: str, description: str) -> AgentSpec:
    return AgentSpec("agents.sb3_baselines:SB3Agent", {"action_mode": "sparsity", "n_steps": 1}, sb3_algo=algo,
                     description=description)


AGENTS: Dict[str, AgentSpec] = {
    "rl_pruner": AgentSpec("agents.rl_pruner:RLPrunerAgent", {"action_mode": "distribution"},
                           description="faithful RL-Pruner (pruning distribution, look-ahead, PPO-style clip)"),
    "rl_pruner_improved": AgentSpec("agents.rl_pruner:RLPrunerAgent", {"action_mode": "distribution"},
                                    kwargs={"collapse_reference": "reset_candidate"},
                                    description="RL-Pruner whose collapse guard compares with the width-proportional "
                                                "reset point (docs/agents.md)"),
    "rl_pruner_bounded": AgentSpec("agents.rl_pruner:RLPrunerAgent", {"action_mode": "distribution"},
                                   kwargs={"collapse_reference": "reset_candidate", "min_keep_fraction": 0.3},
                                   description="rl_pruner_improved that keeps >= 30 % of every group's channels "
                                               "(docs/agents.md)"),
    "uniform": AgentSpec("agents.heuristics:UniformPruner", description="same sparsity for every group"),
    "global_taylor": AgentSpec("agents.heuristics:GlobalTaylorPruner",
                               description="globally least important channels (Torch-Pruning global pruning)"),
    "latency_knapsack": AgentSpec("agents.knapsack:LatencyKnapsackPruner",
                                  description="HALP-style greedy knapsack: least importance per unit of the budget "
                                              "metric saved (latency or MACs)"),
    "sensitivity": AgentSpec("agents.sensitivity:SensitivityPruner",
                             description="Li et al. 2017 sensitivity analysis: each group pruned alone at a grid of "
                                         "ratios (budget-derived), greedy allocation to the target (docs/agents.md)",
                             budget_exact=False),
    "random_search": AgentSpec("agents.heuristics:RandomSearch", budget_arg="n_candidates",
                               description="best of N random actions per step (look-ahead)"),
    "ppo": _sb3("ppo", "Stable-Baselines3 PPO"),
    "a2c": _sb3("a2c", "Stable-Baselines3 A2C"),
    "sac": _sb3("sac", "Stable-Baselines3 SAC"),
    "td3": _sb3("td3", "Stable-Baselines3 TD3"),
    "ddpg": _sb3("ddpg", "Stable-Baselines3 DDPG"),
    "trpo": _sb3("trpo", "sb3-contrib TRPO"),
    "amc": AgentSpec("agents.amc:AMCAgent", {"action_mode": "sparsity", "n_steps": 1}, sb3_algo="ddpg",
                     sb3_config="amc", env_class="pruning_env.envs.layerwise_env:LayerwisePruneEnv",
                     description="AMC: DDPG on the layer-by-layer env (one group per step, FLOPs wall, "
                                 "truncated-normal exploration; docs/amc.md)"),
}


def _import(target: str) -> type:
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def env_class(name: str) -> type:
    """The env class agent ``name`` runs on (PruneEnv, or AMC's LayerwisePruneEnv).

    :param name: a key of :data:`AGENTS`.
    """
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; choose from {', '.join(AGENTS)}")
    return _import(AGENTS[name].env_class)


def agent_class(name: str) -> type:
    """The class of agent ``name``.

    :param name: a key of :data:`AGENTS`, e.g. ``"rl_pruner"``.
    """
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; choose from {', '.join(AGENTS)}")
    return _import(AGENTS[name].target)


__all__ = ["AGENTS", "AgentSpec", "agent_class", "env_class", "SB3_CONFIG_DIR"]
