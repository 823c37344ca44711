"""Typed configurations of the two run CLIs (a prune run of ``train_agent.py``, a ViT run of ``train_vit_agent.py``)
and their one loader: a YAML file plus ``key=value`` overrides, checked with errors that name the dotted key.

Every field below is documented where it is declared, its limits declared with it in the project's one grammar
(:mod:`pruning_env.schema`, shared with the env configs); ``configs/`` holds examples of both kinds.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Type, TypeVar, Union

import yaml

from agents.registry import AGENTS, agent_class
from pruning_env.schema import Settings, limits_of, setting

Config = TypeVar("Config")

#: the configs shipped with the repository
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
#: agent arguments a prune run sets itself (top-level ``seed``, the run folder's ``tb/``)
RUN_SET = ("seed", "tensorboard_log")
#: patch policies of a ViT run: two agent modes of ``ViTDDQN`` and two baselines
VIT_POLICIES = ("full", "random", "faithful", "double_dqn")
#: the ViT run's offline quickstart env (digits, a CPU-sized ViT, a few epochs); a config's ``env`` is merged over it
VIT_QUICKSTART_ENV: Dict[str, Any] = {"dataset": "digits", "width": 0.25, "depth": 2, "batch_size": 64, "epochs": 3,
                                      "reward_every": 1, "n_keep": 30}
#: the quickstart's DDQN agent settings, used when a DDQN policy's config has no ``agent`` section
VIT_QUICKSTART_AGENT: Dict[str, Any] = {"exploration_decay": 40, "skip_first_epoch": False}


class ConfigError(ValueError):
    """A config file or override that is not valid; the message names the dotted key and what would be valid."""


# --------------------------------------------------------------------------------------------------- prune run

@dataclass
class FinetuneConfig(Settings):
    """The knowledge-distillation fine-tune of the best pruned model (``finetune`` section)."""

    section = "finetune"  # errors name finetune.FIELD

    epochs: int = setting(1, low=0)
    """passes over the training split; 0: no fine-tune"""
    max_batches: Optional[int] = setting(None, low=1)
    """cap on batches (one short pass) for smoke runs; null: whole epochs"""
    lr: float = setting(1e-3, low=0, low_open=True)
    """peak SGD learning rate (warm-up, then cosine to ``min_lr``)"""
    min_lr: float = setting(1e-6, low=0)
    """final learning rate of the cosine schedule"""
    warmup_ratio: float = setting(0.1, low=0, high=1)
    """share of the steps spent warming up"""
    batch_size: int = setting(128, low=1)
    """training batch size"""
    T: float = setting(2.0, low=0, low_open=True)
    """distillation temperature"""
    soft_weight: float = setting(0.75, low=0, high=1)
    """weight of the teacher's soft targets (the rest is cross-entropy on the labels)"""
    teacher: Optional[str] = setting("original", choices=("original", "none"))
    """``original``: distil from the unpruned model; ``none``: plain cross-entropy"""


@dataclass
class RunOptions(Settings):
    """Where a prune run writes and how it reports (``run`` section)."""

    section = "run"  # errors name run.FIELD

    out_dir: str = "runs"
    """parent folder of the run folders (``{out_dir}/{name}``)"""
    checkpoint_every: int = setting(1, low=0)
    """pruning steps between run checkpoints (0: never)"""
    progress: bool = True
    """show progress bars"""
    export_torchscript: bool = True
    """also write ``pruned_model.ts``"""
    eval_batch_size: int = setting(256, low=1)
    """batch size of the accuracy reports"""


@dataclass
class PruneRunConfig(Settings):
    """A prune run: search with one agent on PruneEnv, fine-tune, report, export (``train_agent.py``)."""

    name: Optional[str] = None
    """run folder name under ``run.out_dir`` (default: the config file's stem)"""
    seed: int = 0
    """seed of the env, the agent, and every phase of the run (search, fine-tune)"""
    device: Optional[str] = None
    """``cpu``, ``cuda`` or null (CUDA when available)"""
    agent: str = "rl_pruner"
    """the agent to run (``agents.registry.AGENTS``)"""
    budget: Optional[int] = setting(None, low=1)
    """evaluations for budgeted agents (random search, SB3); null: the agent's own setting"""
    env: Dict[str, Any] = field(default_factory=dict)
    """PruneEnv keyword arguments, optionally ``id`` of a registered env whose settings come first"""
    agents: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """per-agent constructor arguments (``agents.NAME``), each with optional PruneEnv overrides ``env``"""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """the final knowledge-distillation fine-tune"""
    run: RunOptions = field(default_factory=RunOptions)
    """output folder, checkpoints, progress"""

    def to_dict(self) -> Dict[str, Any]:
        """The config as plain data (what ``config.yaml`` holds)."""
        return dataclasses.asdict(self)

    def agent_kwargs(self, agent: str) -> Dict[str, Any]:
        """Constructor arguments of ``agent`` from ``agents.NAME`` (without its ``env`` overrides)."""
        return {k: v for k, v in (self.agents.get(agent) or {}).items() if k != "env"}

    def env_kwargs(self, agent: str) -> Dict[str, Any]:
        """PruneEnv keyword arguments for ``agent``: the registered id's settings, then ``env``, then the agent's own
        (e.g. one-step episodes for SB3), then ``agents.NAME.env``, then the top-level ``device`` and ``seed``."""
        base = dict(self.env)
        env_id = base.pop("id", None)
        kwargs: Dict[str, Any] = {}
        if env_id is not None:
            import gymnasium as gym

            import pruning_env  # noqa: F401  (registers the ids)

            kwargs.update(copy.deepcopy(gym.spec(env_id).kwargs))
        kwargs.update(base)
        kwargs.update(AGENTS[agent].env)
        kwargs.update(dict((self.agents.get(agent) or {}).get("env") or {}))
        if self.device is not None:
            kwargs["device"] = self.device
        kwargs.setdefault("seed", self.seed)
        return kwargs

    def finalize(self, source: str, path: Optional[Path]) -> None:
        """Check what the field types cannot: agent names and arguments, the env settings (by PruneEnv's own
        config, so a value is checked the same way from a file, an override or ``gym.make``).

        :param source: where the config came from, for messages.
        :param path: the YAML file, whose stem names the run when ``name`` is null.
        """
        if self.name is None:
            self.name = path.stem if path is not None else "run"
        if self.agent not in AGENTS:
            raise ConfigError(f"{source}: agent {self.agent!r} is unknown; choose from {', '.join(AGENTS)}")
        env_keys = prune_env_keys()
        _check_keys(self.env, env_keys | {"id"}, f"{source}: ", "env")
        if "id" in self.env:
            import gymnasium as gym

            import pruning_env  # noqa: F401  (registers the ids)

            if self.env["id"] not in gym.registry:
                raise ConfigError(f"{source}: env.id {self.env['id']!r} is not registered; e.g. RLPrune-quickstart, "
                                  f"RLPrune-vgg19-cifar100")
        for name in list(self.agents):
            if name not in AGENTS:
                raise ConfigError(f"{source}: agents.{name} is not an agent; choose from {', '.join(AGENTS)}")
            kwargs = self.agents[name]
            if kwargs is None:
                self.agents[name] = kwargs = {}
            if not isinstance(kwargs, dict):
                raise ConfigError(f"{source}: agents.{name} must be a mapping of constructor arguments, got "
                                  f"{kwargs!r}")
            env_over = kwargs.get("env") or {}
            if not isinstance(env_over, dict):
                raise ConfigError(f"{source}: agents.{name}.env must be a mapping of PruneEnv arguments")
            _check_keys(env_over, env_keys, f"{source}: ", f"agents.{name}.env")
            spec = AGENTS[name]
            if spec.sb3_algo is None:
                allowed = set(_signature_keys(agent_class(name).__init__)) - set(RUN_SET) | {"env"}
            else:
                allowed = sb3_keys(spec.sb3_algo, agent_class(name))
            _check_keys(kwargs, allowed, f"{source}: ", f"agents.{name}")
        for name in dict.fromkeys([self.agent, *self.agents]):
            problem = prune_env_problem(self.env_kwargs(name))
            if problem:
                if name != self.agent:
                    raise ConfigError(f"{source}: env of agent {name!r} (env with agents.{name}.env): {problem}")
                field_first = problem.split(" ", 1)[0] in env_keys  # name the dotted key: env.target ...
                raise ConfigError(f"{source}: env{'.' if field_first else ': '}{problem}")


def prune_env_keys() -> set:
    """The PruneEnv settings a config's ``env`` may hold (:class:`~pruning_env.envs.config.PruneEnvConfig`)."""
    from pruning_env.envs.config import PruneEnvConfig

    return set(PruneEnvConfig.field_names())


def prune_env_problem(kwargs: Dict[str, Any]) -> Optional[str]:
    """Why PruneEnv would refuse ``kwargs`` (:class:`~pruning_env.envs.config.PruneEnvConfig`'s checks), or None.

    :param kwargs: PruneEnv keyword arguments.
    """
    from pruning_env.envs.config import PruneEnvConfig

    return _problem(PruneEnvConfig, kwargs)


def _problem(config_class: Any, kwargs: Dict[str, Any]) -> Optional[str]:
    """Why ``config_class.from_kwargs(**kwargs)`` refuses the settings, or None."""
    try:
        config_class.from_kwargs(**kwargs)
    except (TypeError, ValueError) as err:
        return str(err)
    return None


def sb3_keys(algo: str, agent: Optional[type] = None) -> set:
    """Keys an ``agents.{algo}`` section (or ``configs/sb3/{algo}.yaml``) may hold: the SB3 algorithm's
    constructor arguments plus ``n_timesteps``, ``noise_type``, ``noise_std``, ``action_floor``, ``n_envs``,
    ``config``, ``env``, and ``agent``'s own constructor arguments (e.g. AMC's ``warmup``).

    :param algo: SB3 algorithm name (``ppo``, ``sac``, ...).
    :param agent: the agent class (None: the SB3 baselines' keys only).
    """
    from agents.sb3_baselines import sb3_algorithms

    algos = sb3_algorithms()
    if algo not in algos:
        raise ConfigError(f"SB3 algorithm {algo!r} is not available (sb3-contrib missing?); have {sorted(algos)}")
    own = set(_signature_keys(algos[algo].__init__)) - {"_init_setup_model"} - set(RUN_SET)
    if agent is not None:
        own |= set(_signature_keys(agent.__init__)) - set(RUN_SET)
    return own | {"n_timesteps", "noise_type", "noise_std", "action_floor", "n_envs", "config", "env"}


# ----------------------------------------------------------------------------------------------------- ViT run

@dataclass
class ViTEvalOptions(Settings):
    """How a ViT run is evaluated (``eval`` section)."""

    section = "eval"  # errors name eval.FIELD

    batch_size: int = setting(128, low=1)
    """batch size of the validation and test passes"""
    val_each_epoch: bool = True
    """validate after every training epoch (the run's ``history``)"""
    throughput: bool = True
    """measure images/s with all and with the kept patches"""
    throughput_batch: int = setting(128, low=1)
    """batch size of the throughput measurement"""


@dataclass
class ViTRunConfig(Settings):
    """A ViT run: train a ViT jointly with a patch-selection policy, then evaluate it (``train_vit_agent.py``)."""

    policy: str = setting("double_dqn", choices=VIT_POLICIES)
    """``double_dqn`` / ``faithful`` (ViTDDQN modes), or the baselines ``full`` (all patches), ``random``"""
    seed: int = 0
    """seed of the env, the agent and the evaluation masks"""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``"""
    out: Optional[str] = "runs/agentvit/quickstart"
    """output folder (results.json, summary.md, vit.pt, agent.pt); null: write nothing"""
    progress: bool = True
    """show progress bars"""
    env: Dict[str, Any] = setting(default_factory=lambda: dict(VIT_QUICKSTART_ENV), merge=True)
    """PatchSelectEnv keyword arguments, merged over the quickstart's"""
    agent: Optional[Dict[str, Any]] = None
    """constructor arguments of the policy (replace the quickstart's DDQN settings; null: those for the DDQN
    policies, none for the baselines)"""
    eval: ViTEvalOptions = field(default_factory=ViTEvalOptions)
    """evaluation settings"""

    def to_dict(self) -> Dict[str, Any]:
        """The config as plain data (what ``results.json`` records)."""
        return dataclasses.asdict(self)

    def finalize(self, source: str, path: Optional[Path]) -> None:
        """Fill the agent section and check env and agent arguments against the classes that take them.

        :param source: where the config came from, for messages.
        :param path: the YAML file (unused: a ViT run names its folder with ``out``).
        """
        from agents.vit_ddqn import AllPatches, RandomPatches, ViTDDQN
        from pruning_env.envs.config import PatchEnvConfig

        if self.agent is None:
            self.agent = dict(VIT_QUICKSTART_AGENT) if self.policy in ("faithful", "double_dqn") else {}
        _check_keys(self.env, set(PatchEnvConfig.field_names()) - {"device", "seed"}, f"{source}: ", "env")
        problem = _problem(PatchEnvConfig, {**self.env, "seed": self.seed})
        if problem:  # the same check as the env's, before any data is read
            raise ConfigError(f"{source}: env.{problem}")
        agent_cls = {"full": AllPatches, "random": RandomPatches}.get(self.policy, ViTDDQN)
        _check_keys(self.agent, set(_signature_keys(agent_cls.__init__)) - {"mode"}, f"{source}: ",
                    f"agent (policy {self.policy})")


# ------------------------------------------------------------------------------------------------------ loader

def parse_overrides(items: Iterable[str]) -> Dict[str, Any]:
    """``["env.target=0.3", "agents.rl_pruner.lr_epoch=2"]`` to ``{"env.target": 0.3, ...}`` (YAML-typed values).

    :param items: ``key=value`` strings; values are parsed as YAML (numbers, bools, null, lists, strings).
    """
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value, e.g. env.target=0.5")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from err
    return out


def apply_overrides(data: Dict[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """Set dotted keys in a nested dict (missing sections are created); returns a new dict.

    :param data: the parsed config.
    :param overrides: ``{dotted.key: value}``.
    """
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i + 1])!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: Union[str, Path, None] = None, overrides: Union[Sequence[str], Mapping[str, Any], None] = None,
                schema: Type[Config] = PruneRunConfig, data: Optional[Mapping[str, Any]] = None) -> Config:
    """Read a YAML config (or take ``data``), apply overrides and build the typed, checked config.

    :param path: YAML file.
    :param overrides: ``key=value`` strings or a ``{dotted.key: value}`` mapping.
    :param schema: :class:`PruneRunConfig` or :class:`ViTRunConfig`.
    :param data: an already parsed config instead of ``path``.
    :raises ConfigError: naming the dotted key and the allowed values.
    """
    source = "config"
    if data is None:
        if path is None:
            raise ConfigError("pass a config path or data")
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
    elif path is not None:
        path = Path(path)
        source = str(path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    data = dict(data)
    if overrides:
        if not isinstance(overrides, Mapping):
            overrides = parse_overrides(overrides)
        data = apply_overrides(data, overrides)
    cfg = _build(schema, data, "", source)
    cfg.finalize(source, path)
    return cfg


def _build(schema: type, data: Any, prefix: str, source: str) -> Any:
    """An instance of the dataclass ``schema`` from a mapping: YAML values coerced to the field types, then the
    schema's own checks (:func:`pruning_env.schema.validate`), whose errors name the dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    _check_keys(data, fields, f"{source}: ", prefix.rstrip("."))
    hints = typing.get_type_hints(schema)
    kwargs = {name: _coerce(value, hints[name], fields[name], f"{prefix}{name}", source)
              for name, value in data.items()}
    try:
        return schema(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from err


def _coerce(value: Any, hint: Any, f: dataclasses.Field, key: str, source: str) -> Any:
    """``value`` read the way YAML users write it: nested sections built, mapping fields merged when declared
    so, ``1e-3`` (a string to YAML) as a number, ``2.0`` as an integer; the field's checks come after."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union:
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.", source)
    if typing.get_origin(hint) is dict:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return {**f.default_factory(), **value} if limits_of(f).merge else dict(value)
    if hint in (int, float) and not isinstance(value, bool):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return value  # the field's check names it
        if isinstance(number, (int, float)) and math.isfinite(number):
            if hint is float:
                return float(number)
            if float(number).is_integer():
                return int(number)
        return value  # not of the field's type: the check names the value as given
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _check_keys(section: Mapping[str, Any], allowed: Iterable[str], source: str, where: str) -> None:
    allowed = set(allowed)
    for key in section:
        if key not in allowed:
            dotted = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"{source}unknown key {dotted}; valid keys: {', '.join(sorted(allowed))}")


def _signature_keys(fn: Any) -> List[str]:
    params = inspect.signature(fn).parameters
    return [n for n, p in params.items() if n not in ("self", "env") and p.kind is not p.VAR_KEYWORD]


__all__ = ["CONFIG_DIR", "ConfigError", "PruneRunConfig", "FinetuneConfig", "RunOptions", "ViTRunConfig", "ViTEvalOptions",
           "load_config", "parse_overrides", "apply_overrides", "sb3_keys", "prune_env_keys",
           "prune_env_problem", "RUN_SET", "VIT_POLICIES", "VIT_QUICKSTART_ENV", "VIT_QUICKSTART_AGENT"]
