"""YAML run configs for train_agent.py and the benchmarks: load, apply ``key=value`` overrides (dotted keys for
nested sections), fill defaults and validate, with errors that name the bad key and list the valid ones.

A config has the sections ``env`` (PruneEnv keyword arguments, optionally ``id`` of a registered env),
``agent`` (the default agent name), ``agents`` (per-agent constructor arguments and ``env`` overrides),
``finetune`` (the final knowledge-distillation fine-tune) and ``run`` (output folder, checkpoints).
"""
from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import yaml

#: top-level keys and their defaults
TOP_LEVEL: Dict[str, Any] = {
    "name": None,  # run folder name (default: the config file's stem)
    "seed": 0,
    "device": None,  # cpu | cuda | null (CUDA when available)
    "agent": "rl_pruner",
    "budget": None,  # evaluations for budgeted agents (random search, SB3); null = the agent's own setting
    "env": {},
    "agents": {},
    "finetune": {},
    "run": {},
}
FINETUNE_DEFAULTS: Dict[str, Any] = {
    "epochs": 1,  # 0 = no final fine-tune
    "max_batches": None,  # cap on batches (one short pass) for smoke runs
    "lr": 1e-3,
    "min_lr": 1e-6,
    "warmup_ratio": 0.1,
    "batch_size": 128,
    "T": 2.0,
    "soft_weight": 0.75,
    "teacher": "original",  # original | none (plain cross-entropy)
}
RUN_DEFAULTS: Dict[str, Any] = {
    "out_dir": "runs",
    "checkpoint_every": 1,  # pruning steps between checkpoints (0 = never)
    "progress": True,
    "export_torchscript": True,
    "eval_batch_size": 256,
}


class ConfigError(ValueError):
    """A config file or override that is not valid; the message names the key."""


def parse_overrides(items: Iterable[str]) -> Dict[str, Any]:
    """``["env.target=0.3", "agents.rl_pruner.lr_epoch=2"]`` to ``{"env.target": 0.3, ...}`` (YAML-typed values).

    :param items: ``key=value`` strings; values are parsed as YAML (numbers, bools, null, lists, strings).
    """
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value, e.g. env.target=0.5")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def apply_overrides(cfg: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Set dotted keys in a nested dict (missing sections are created); returns a new dict."""
    cfg = copy.deepcopy(cfg)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = cfg
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i + 1])!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return cfg


def _check_keys(section: Dict[str, Any], allowed: Iterable[str], where: str) -> None:
    allowed = set(allowed)
    for key in section:
        if key not in allowed:
            raise ConfigError(f"unknown key {where}.{key}; valid keys: {', '.join(sorted(allowed))}")


def _signature_keys(fn: Any) -> List[str]:
    params = inspect.signature(fn).parameters
    return [n for n, p in params.items() if n not in ("self", "env") and p.kind is not p.VAR_KEYWORD]


#: agent arguments that train_agent.py sets itself (top-level ``seed``, the run folder's ``tb/``)
RUN_SET = ("seed", "tensorboard_log")


def sb3_keys(algo: str) -> set:
    """Keys an ``agents.{algo}`` section (or ``configs/sb3/{algo}.yaml``) may hold: the SB3 algorithm's
    constructor arguments plus ``n_timesteps``, ``noise_type``, ``noise_std``, ``action_floor``, ``config``, ``env``."""
    from agents.sb3_baselines import sb3_algorithms

    algos = sb3_algorithms()
    if algo not in algos:
        raise ConfigError(f"SB3 algorithm {algo!r} is not available (sb3-contrib missing?); have {sorted(algos)}")
    own = set(_signature_keys(algos[algo].__init__)) - {"_init_setup_model"} - set(RUN_SET)
    return own | {"n_timesteps", "noise_type", "noise_std", "action_floor", "config", "env"}


def validate(cfg: Dict[str, Any], source: str = "config") -> Dict[str, Any]:
    """Fill defaults and check every key and the obvious value ranges; returns the completed config.

    :param cfg: the parsed YAML (after overrides).
    :param source: where it came from, for messages.
    """
    from agents.registry import AGENTS, agent_class
    from pruning_env.envs.prune_env import PruneEnv

    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(cfg).__name__}")
    _check_keys(cfg, TOP_LEVEL, source)
    out = copy.deepcopy(TOP_LEVEL)
    out.update(copy.deepcopy(cfg))
    for section in ("env", "agents", "finetune", "run"):
        if out[section] is None:
            out[section] = {}
        if not isinstance(out[section], dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {out[section]!r}")

    env_keys = set(_signature_keys(PruneEnv.__init__)) | {"id"}
    _check_keys(out["env"], env_keys, f"{source}: env")
    if "id" in out["env"]:
        import gymnasium as gym

        import pruning_env  # noqa: F401  (registers the ids)

        if out["env"]["id"] not in gym.registry:
            raise ConfigError(f"{source}: env.id {out['env']['id']!r} is not registered; e.g. RLPrune-quickstart, "
                              f"RLPrune-vgg19-cifar100")

    if out["agent"] not in AGENTS:
        raise ConfigError(f"{source}: agent {out['agent']!r} is unknown; choose from {', '.join(AGENTS)}")
    for name, kwargs in out["agents"].items():
        if name not in AGENTS:
            raise ConfigError(f"{source}: agents.{name} is not an agent; choose from {', '.join(AGENTS)}")
        if kwargs is None:
            out["agents"][name] = kwargs = {}
        if not isinstance(kwargs, dict):
            raise ConfigError(f"{source}: agents.{name} must be a mapping of constructor arguments")
        spec = AGENTS[name]
        env_over = kwargs.get("env", {}) or {}
        if not isinstance(env_over, dict):
            raise ConfigError(f"{source}: agents.{name}.env must be a mapping of PruneEnv arguments")
        _check_keys(env_over, env_keys - {"id"}, f"{source}: agents.{name}.env")
        # seed and the TensorBoard folder come from the top level and the run folder
        if spec.sb3_algo is None:
            allowed = set(_signature_keys(agent_class(name).__init__)) - set(RUN_SET) | {"env"}
        else:
            allowed = sb3_keys(spec.sb3_algo)
        _check_keys(kwargs, allowed, f"{source}: agents.{name}")

    ft = dict(FINETUNE_DEFAULTS)
    _check_keys(out["finetune"], FINETUNE_DEFAULTS, f"{source}: finetune")
    ft.update(out["finetune"])
    if int(ft["epochs"]) < 0:
        raise ConfigError(f"{source}: finetune.epochs must be >= 0, got {ft['epochs']}")
    if ft["teacher"] not in ("original", "none", None):
        raise ConfigError(f"{source}: finetune.teacher must be 'original' or 'none', got {ft['teacher']!r}")
    out["finetune"] = ft
    run = dict(RUN_DEFAULTS)
    _check_keys(out["run"], RUN_DEFAULTS, f"{source}: run")
    run.update(out["run"])
    if int(run["checkpoint_every"]) < 0:
        raise ConfigError(f"{source}: run.checkpoint_every must be >= 0, got {run['checkpoint_every']}")
    out["run"] = run
    if out["budget"] is not None and int(out["budget"]) < 1:
        raise ConfigError(f"{source}: budget must be a positive number of evaluations or null, got {out['budget']}")
    return out


def load_config(path: Optional[Union[str, Path]] = None, overrides: Union[Sequence[str], Dict[str, Any], None] = None,
                data: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Read a YAML config (or take ``data``), apply overrides, fill defaults and validate.

    :param path: YAML file.
    :param overrides: ``key=value`` strings or a ``{dotted.key: value}`` dict.
    :param data: an already parsed config instead of ``path``.
    """
    if data is None:
        if path is None:
            raise ConfigError("pass a config path or data")
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if overrides:
        if not isinstance(overrides, dict):
            overrides = parse_overrides(overrides)
        data = apply_overrides(data, overrides)
    cfg = validate(data, str(path) if path is not None else "config")
    if cfg["name"] is None:
        cfg["name"] = Path(path).stem if path is not None else "run"
    return cfg


__all__ = ["load_config", "validate", "parse_overrides", "apply_overrides", "sb3_keys", "ConfigError",
           "FINETUNE_DEFAULTS", "RUN_DEFAULTS", "TOP_LEVEL", "RUN_SET"]
