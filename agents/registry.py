"""The table of pruning agents that train_agent.py and the benchmarks can run: one entry per agent kind, with
the env settings it needs and how the shared evaluation budget maps onto its arguments.

Adding an agent is one ``AGENTS`` entry; ``build_env`` and ``build_agent`` do the rest from a config.
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

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
    :param description: one line for ``--help`` and docs.
    """

    target: str
    env: Dict[str, Any] = field(default_factory=dict)
    sb3_algo: Optional[str] = None
    budget_arg: Optional[str] = None
    description: str = ""


def _sb3(algo: str, description: str) -> AgentSpec:
    return AgentSpec("agents.sb3_baselines:SB3Agent", {"action_mode": "sparsity", "n_steps": 1}, sb3_algo=algo,
                     description=description)


AGENTS: Dict[str, AgentSpec] = {
    "rl_pruner": AgentSpec("agents.rl_pruner:RLPrunerAgent", {"action_mode": "distribution"},
                           description="faithful RL-Pruner (pruning distribution, look-ahead, PPO-style clip)"),
    "uniform": AgentSpec("agents.heuristics:UniformPruner", description="same sparsity for every group"),
    "global_taylor": AgentSpec("agents.heuristics:GlobalTaylorPruner",
                               description="globally least important channels (Torch-Pruning global pruning)"),
    "random_search": AgentSpec("agents.heuristics:RandomSearch", budget_arg="n_candidates",
                               description="best of N random actions per step (look-ahead)"),
    "ppo": _sb3("ppo", "Stable-Baselines3 PPO"),
    "a2c": _sb3("a2c", "Stable-Baselines3 A2C"),
    "sac": _sb3("sac", "Stable-Baselines3 SAC"),
    "td3": _sb3("td3", "Stable-Baselines3 TD3"),
    "ddpg": _sb3("ddpg", "Stable-Baselines3 DDPG"),
    "trpo": _sb3("trpo", "sb3-contrib TRPO"),
}

def agent_class(name: str) -> type:
    """The class of agent ``name``."""
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; choose from {', '.join(AGENTS)}")
    module, _, cls = AGENTS[name].target.partition(":")
    return getattr(importlib.import_module(module), cls)


def env_kwargs(cfg: Dict[str, Any], name: str) -> Dict[str, Any]:
    """PruneEnv keyword arguments for agent ``name`` under config ``cfg``: the registered id's defaults, then
    the config's ``env``, then the agent's own settings (e.g. one-step episodes for SB3), then
    ``agents.NAME.env``."""
    spec = AGENTS[name]
    base = dict(cfg.get("env", {}))
    kwargs: Dict[str, Any] = {}
    env_id = base.pop("id", None)
    if env_id is not None:
        import gymnasium as gym

        import pruning_env  # noqa: F401  (registers the ids)

        kwargs.update(copy.deepcopy(gym.spec(env_id).kwargs))
    kwargs.update(base)
    kwargs.update(spec.env)
    kwargs.update(dict((cfg.get("agents", {}).get(name) or {}).get("env", {}) or {}))
    if cfg.get("device") is not None:
        kwargs["device"] = cfg["device"]
    kwargs.setdefault("seed", cfg.get("seed", 0))
    return kwargs


def build_env(cfg: Dict[str, Any], name: str) -> Any:
    """The PruneEnv for agent ``name`` under config ``cfg``."""
    from pruning_env.envs.prune_env import PruneEnv

    return PruneEnv(**env_kwargs(cfg, name))


def sb3_hyperparams(algo: str, cfg_agent: Dict[str, Any], env_id: Optional[str]) -> Dict[str, Any]:
    """Zoo hyperparameters of ``algo`` with the config's per-agent overrides applied."""
    from agents.sb3_baselines import load_zoo_hyperparams

    from agents.config import ConfigError, sb3_keys

    path = cfg_agent.get("config") or SB3_CONFIG_DIR / f"{algo}.yaml"
    hp = load_zoo_hyperparams(algo, path, env_id)
    allowed = sb3_keys(algo) - {"config", "env"}
    bad = sorted(set(hp) - allowed)
    if bad:
        raise ConfigError(f"{path}: unknown {algo} hyperparameters {bad}; valid keys: {', '.join(sorted(allowed))}")
    hp.update({k: v for k, v in cfg_agent.items() if k not in ("config", "env")})
    return hp


def build_agent(cfg: Dict[str, Any], name: str, env: Any,
                tensorboard_log: Optional[str] = None) -> Tuple[Any, Dict[str, Any]]:
    """The agent and the keyword arguments of its ``learn`` call.

    The config's ``budget`` (evaluations) becomes ``total_timesteps`` of an SB3 baseline and
    ``budget // n_steps`` look-aheads per step of a search agent.
    """
    spec = AGENTS[name]
    cls = agent_class(name)
    cfg_agent = dict(cfg.get("agents", {}).get(name) or {})
    budget = cfg.get("budget")
    seed = cfg.get("seed", 0)
    learn: Dict[str, Any] = {}
    if spec.sb3_algo is not None:
        hp = sb3_hyperparams(spec.sb3_algo, cfg_agent, cfg.get("env", {}).get("id"))
        n_timesteps = int(hp.pop("n_timesteps", 1000))
        learn["total_timesteps"] = int(budget) if budget is not None else n_timesteps
        agent = cls(env, algo=spec.sb3_algo, seed=seed, tensorboard_log=tensorboard_log, **hp)
        return agent, learn
    kwargs = {k: v for k, v in cfg_agent.items() if k != "env"}
    if spec.budget_arg is not None and budget is not None:
        kwargs[spec.budget_arg] = max(1, int(budget) // int(env.n_steps))
    agent = cls(env, seed=seed, tensorboard_log=tensorboard_log, **kwargs)
    return agent, learn


__all__ = ["AGENTS", "AgentSpec", "agent_class", "build_env", "build_agent", "env_kwargs", "sb3_hyperparams",
           "SB3_CONFIG_DIR"]
