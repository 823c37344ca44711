"""Stable-Baselines3 (and sb3-contrib) baselines on the very same PruneEnv: PPO, A2C, SAC, TD3, DDPG, TRPO.

The env runs in ``"sparsity"`` mode with a budget, its action mapped from SB3's [-1, 1]; every env step is
one evaluated model, so ``total_timesteps`` is the evaluation budget. The best finished episode is kept,
as random search keeps its best candidate. Hyperparameters come from ``configs/sb3/{algo}.yaml`` (zoo style).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import gymnasium as gym
import numpy as np

from stable_baselines3.common.callbacks import BaseCallback, CallbackList

from agents.common.base import BasePruningAgent, make_callback, unwrap_env
from pruning_env.runtime import atomic_save


def sb3_algorithms() -> Dict[str, type]:
    """Algorithm classes by lower-case name; TRPO only when sb3-contrib is installed."""
    from stable_baselines3 import A2C, DDPG, PPO, SAC, TD3

    algos = {"ppo": PPO, "a2c": A2C, "sac": SAC, "td3": TD3, "ddpg": DDPG}
    try:
        from sb3_contrib import TRPO
    except ImportError:  # optional extra
        pass
    else:
        algos["trpo"] = TRPO
    return algos


#: the off-policy algorithms, whose zoo configs may name an action noise
OFF_POLICY = ("sac", "td3", "ddpg")


class EpisodeTracker(gym.Wrapper):
    """Records every env step (the per-step history) and keeps the best finished episode's pruned model."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.history: List[Dict[str, Any]] = []
        self.best: Optional[Dict[str, Any]] = None
        self.episodes = 0
        self.evaluations_done = 0
        self._actions: List[np.ndarray] = []
        self._finished = True  # no episode is being counted

    @property
    def n_evaluations(self) -> int:
        """Evaluations over all episodes (finished ones plus the current one)."""
        current = 0 if self._finished else unwrap_env(self.env).n_evaluations
        return self.evaluations_done + current

    def reset(self, **kwargs):
        if not self._finished:  # an episode abandoned midway still spent its evaluations
            self.evaluations_done += unwrap_env(self.env).n_evaluations
        self._actions = []
        out = self.env.reset(**kwargs)
        self._finished = False
        return out

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._actions.append(np.asarray(action, dtype=np.float64).copy())
        row = {"timestep": len(self.history) + 1, "episode": self.episodes, "step": int(info["step"])}
        for key in ("reward", "accuracy", "flops_reduction", "params_reduction", "channel_sparsity", "macs",
                    "params"):
            row[key] = float(info[key])
        row["n_evaluations"] = self.n_evaluations
        row["kept_channels"] = [int(k) for k in np.asarray(info["kept_channels"])]
        self.history.append(row)
        if terminated or truncated:
            if self.best is None or float(reward) > self.best["reward"]:
                self.best = {"reward": float(reward), "episode": self.episodes, "model": unwrap_env(self.env).model,
                             "info": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in info.items()},
                             "actions": [a.tolist() for a in self._actions]}
            self.episodes += 1
            self.evaluations_done += unwrap_env(self.env).n_evaluations
            self._finished = True
            self._actions = []
        return obs, reward, terminated, truncated, info


class StopAtTimesteps(BaseCallback):
    """Stops SB3 learning after exactly ``limit`` env steps (= evaluations). On-policy algorithms otherwise finish
    their last rollout of ``n_steps`` and overshoot the budget (112 evaluations for a budget of 100 with
    ``n_steps=16``). A rollout (or off-policy collection) that is complete at the limit is still trained on;
    an incomplete one is dropped."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = int(limit)

    def _on_step(self) -> bool:
        if self.num_timesteps < self.limit:
            return True
        loc = self.locals
        if "n_rollout_steps" in loc:  # on-policy: ``n_steps`` counts the steps before this one
            return int(loc["n_steps"]) + 1 >= int(loc["n_rollout_steps"])
        if "train_freq" in loc:  # off-policy: episodes are counted after the callback
            from stable_baselines3.common.utils import should_collect_more_steps

            episodes = int(loc["num_collected_episodes"]) + int(np.sum(loc.get("dones", 0)))
            return not should_collect_more_steps(loc["train_freq"], int(loc["num_collected_steps"]), episodes)
        return False


#: smallest sparsity an SB3 action maps to (see :class:`SymmetricAction`)
ACTION_FLOOR = 0.01


class SymmetricAction(gym.ActionWrapper):
    """SB3's symmetric box [-1, 1] to the env's per-group sparsities [floor, 1]: ``floor + (1 - floor)(x + 1)/2``.

    The floor keeps every group's value positive. The env rescales a sparsity action by one scalar to meet the
    step's budget, so a group sent exactly 0 takes no part in that scale: when a policy clips most groups to -1
    (SB3's Gaussian policies often do), the env's fallback (a common sparsity floor for all groups) decides
    where the rest of the budget goes. With a positive floor the policy's own action carries the budget, as
    random search's U(0, 1) actions do.

    :param env: the env (or wrapper) with a ``Box(0, 1)`` action space.
    :param floor: smallest value sent to the env (0 gives the plain linear map of ``RescaleAction``).
    """

    def __init__(self, env: gym.Env, floor: float = ACTION_FLOOR) -> None:
        super().__init__(env)
        if not 0.0 <= float(floor) < 1.0:
            raise ValueError(f"action_floor must be in [0, 1), got {floor}")
        self.floor = float(floor)
        shape = env.action_space.shape
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=shape, dtype=np.float32)

    def action(self, action: np.ndarray) -> np.ndarray:
        return to_sparsity(action, self.floor)


def to_sparsity(action: np.ndarray, floor: float = ACTION_FLOOR) -> np.ndarray:
    """The env action of an SB3 action in [-1, 1] (clipped first)."""
    x = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
    return floor + (1.0 - floor) * (x + 1.0) / 2.0


def _action_noise(name: Optional[str], std: float, dim: int):
    if name is None:
        return None
    from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise

    if name == "normal":
        return NormalActionNoise(np.zeros(dim), std * np.ones(dim))
    if name == "ornstein-uhlenbeck":
        return OrnsteinUhlenbeckActionNoise(np.zeros(dim), std * np.ones(dim))
    raise ValueError(f"noise_type must be 'normal' or 'ornstein-uhlenbeck', got {name!r}")


class SB3Agent(BasePruningAgent):
    """A Stable-Baselines3 algorithm behind the pruning agents' surface.

    :param env: ``PruneEnv(action_mode="sparsity", budget=...)``; it is wrapped in an :class:`EpisodeTracker`
        and :class:`SymmetricAction` (SB3's Gaussian and tanh policies expect a symmetric box).
    :param algo: ``"ppo"``, ``"a2c"``, ``"sac"``, ``"td3"``, ``"ddpg"`` or ``"trpo"``.
    :param policy: SB3 policy name.
    :param noise_type: off-policy exploration noise, ``"normal"`` or ``"ornstein-uhlenbeck"`` (zoo style).
    :param noise_std: its standard deviation.
    :param action_floor: smallest per-group sparsity an action maps to (keeps the budget reachable, see
        :class:`SymmetricAction`; 0 = the plain linear map).
    :param seed: seeds SB3 (torch, numpy, action space).
    :param device: torch device of the SB3 networks (the MLPs are small: CPU is usually fastest).
    :param hyperparams: any other keyword of the SB3 algorithm (``learning_rate``, ``n_steps``, ...).
    """

    action_mode = "sparsity"

    def __init__(self, env: Any = None, algo: str = "ppo", policy: str = "MlpPolicy",
                 noise_type: Optional[str] = None, noise_std: float = 0.1, action_floor: float = ACTION_FLOOR,
                 seed: Optional[int] = None, verbose: int = 0, tensorboard_log: Optional[Union[str, Path]] = None,
                 device: str = "cpu", **hyperparams: Any) -> None:
        algos = sb3_algorithms()
        if algo not in algos:
            raise ValueError(f"unknown SB3 algorithm {algo!r}; choose from {sorted(algos)}")
        if noise_type is not None and algo not in OFF_POLICY:
            raise ValueError(f"noise_type is for off-policy algorithms {OFF_POLICY}, not {algo!r}")
        self.algo, self.policy = algo, policy
        self.noise_type, self.noise_std = noise_type, float(noise_std)
        if not 0.0 <= float(action_floor) < 1.0:
            raise ValueError(f"action_floor must be in [0, 1), got {action_floor}")
        self.action_floor = float(action_floor)
        self.hyperparams = dict(hyperparams)
        self.device = device
        super().__init__(env, seed=seed, verbose=verbose, tensorboard_log=tensorboard_log)
        self.model = None
        if env is not None:
            self._build(env)

    def _build(self, env: Any) -> None:
        self.tracker = EpisodeTracker(env)
        self.wrapped = SymmetricAction(self.tracker, self.action_floor)
        kwargs = copy.deepcopy(self.hyperparams)  # SB3 edits policy_kwargs in place (e.g. DDPG's n_critics)
        if self.noise_type is not None:
            kwargs["action_noise"] = _action_noise(self.noise_type, self.noise_std, env.action_space.shape[0])
        cls = sb3_algorithms()[self.algo]
        self.model = cls(self.policy, self.wrapped, seed=self.seed, verbose=self.verbose,
                         tensorboard_log=self.tensorboard_log, device=self.device, **kwargs)

    def get_parameters(self) -> Dict[str, Any]:
        return {"algo": self.algo, "policy": self.policy, "noise_type": self.noise_type, "noise_std": self.noise_std,
                "action_floor": self.action_floor, "seed": self.seed, "verbose": self.verbose,
                "tensorboard_log": self.tensorboard_log,
                "device": self.device, **self.hyperparams}

    @property
    def n_evaluations(self) -> int:
        return self.tracker.n_evaluations if self.model is not None else 0

    def learn(self, total_timesteps: Optional[int] = None, callback: Any = None, log_interval: int = 1,
              tb_log_name: Optional[str] = None, reset_num_timesteps: bool = True,
              progress_bar: bool = False, final_episode: bool = True) -> "SB3Agent":
        """Train for ``total_timesteps`` env steps (= evaluations), then run one deterministic episode.

        :param total_timesteps: env steps; required (SB3 has no "one episode" default).
        :param callback: SB3 callback(s), called by SB3 after every env step.
        :param final_episode: finish with a deterministic episode of the learned policy (its evaluations are
            counted too); the best finished episode is kept either way.
        """
        if self.model is None:
            raise RuntimeError("SB3Agent.learn needs an env; pass env= or use set_env()")
        if total_timesteps is None:
            raise ValueError("SB3Agent.learn needs total_timesteps (the evaluation budget)")
        start = 0 if reset_num_timesteps else self.model.num_timesteps
        stop = StopAtTimesteps(start + int(total_timesteps))
        user_cb = make_callback(callback)
        cb = stop if user_cb is None else CallbackList([stop, user_cb])
        self.model.learn(total_timesteps=int(total_timesteps), callback=cb, log_interval=log_interval,
                         tb_log_name=tb_log_name or self.algo.upper(), reset_num_timesteps=reset_num_timesteps,
                         progress_bar=progress_bar)
        if final_episode:
            obs, _ = self.wrapped.reset(seed=None if self.seed is None else int(self.seed) + 10_000)
            done = False
            while not done:
                action, _ = self.model.predict(obs, deterministic=True)
                obs, _, terminated, truncated, _ = self.wrapped.step(action)
                done = terminated or truncated
            # SB3's vectorised env shares this env: give it a fresh episode so a later learn() can go on
            self.model._last_obs = self.model.get_env().reset()
            self.model._last_episode_starts = np.ones((self.model.get_env().num_envs,), dtype=bool)
        self.num_timesteps = self.model.num_timesteps
        return self

    @property
    def history(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        return self.tracker.history if self.model is not None else self._history

    @history.setter
    def history(self, value: List[Dict[str, Any]]) -> None:
        self._history = value

    @property
    def best(self) -> Optional[Dict[str, Any]]:  # type: ignore[override]
        return self.tracker.best if self.model is not None else self._best

    @best.setter
    def best(self, value: Optional[Dict[str, Any]]) -> None:
        self._best = value

    def predict(self, observation: Any = None, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> Tuple[np.ndarray, Any]:
        """The policy's action in the env's [0, 1] units (SB3 acts in [-1, 1])."""
        if self.model is None:
            raise RuntimeError("no SB3 model: give the agent an env or load one")
        action, state = self.model.predict(observation, state, episode_start, deterministic)
        return to_sparsity(action, self.action_floor), state

    @staticmethod
    def _files(path: Union[str, Path]) -> Tuple[Path, Path]:
        """(results file, SB3 zip) of a save path: ``x.pt`` -> ``x.pt`` + ``x.zip``; ``x.zip`` -> ``x.pt`` +
        ``x.zip`` (the two files never collide)."""
        path = Path(path)
        meta = path.with_suffix(".pt") if path.suffix == ".zip" else path
        return meta, path.with_suffix(".zip")

    def save(self, path: Union[str, Path]) -> Path:
        """SB3's zip of the model (``path`` with ``.zip``) plus a small file with the tracker's results
        (``path``, or ``path`` with ``.pt`` when it ends in ``.zip``); returns the latter."""
        if self.model is None:
            raise RuntimeError("no SB3 model to save: give the agent an env first")
        path, zip_path = self._files(path)
        self.model.save(zip_path)
        best = None if self.tracker.best is None else {k: v for k, v in self.tracker.best.items() if k != "model"}
        return atomic_save({"format": "rl-prune-sb3/1", "params": self.get_parameters(),
                            "history": self.tracker.history, "best": best}, path)

    @classmethod
    def load(cls, path: Union[str, Path], env: Any = None, **kwargs: Any) -> "SB3Agent":
        """Rebuild an agent written by :meth:`save` (``env`` is needed to keep learning)."""
        import torch

        path, zip_path = cls._files(path)
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(payload, dict) or payload.get("format") != "rl-prune-sb3/1":
            raise ValueError(f"{path} is not an SB3Agent file (written by SB3Agent.save)")
        params = dict(payload["params"])
        params.update(kwargs)
        agent = cls(env=None, **params)
        algo_cls = sb3_algorithms()[agent.algo]
        if env is not None:
            agent._build(env)
            agent.model = algo_cls.load(zip_path, env=agent.wrapped, device=agent.device)
            agent.tracker.history = list(payload["history"])
        else:
            agent.model = algo_cls.load(zip_path, device=agent.device)
            agent.tracker = EpisodeTracker.__new__(EpisodeTracker)
            agent.tracker.history, agent.tracker.best = list(payload["history"]), payload["best"]
            agent.tracker.evaluations_done, agent.tracker._finished = 0, True
        return agent


def load_zoo_hyperparams(algo: str, path: Union[str, Path], env_id: Optional[str] = None) -> Dict[str, Any]:
    """Hyperparameters of ``algo`` from an rl-baselines3-zoo style YAML: ``{env_id | default: {...}}``.

    :param algo: algorithm name (for error messages).
    :param path: the YAML file, e.g. ``configs/sb3/ppo.yaml``.
    :param env_id: section to use when present; otherwise ``default``.
    """
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of env ids to hyperparameters")
    section = env_id if env_id in data else "default"
    if section not in data:
        raise ValueError(f"{path}: no {env_id!r} or 'default' section for {algo}; sections: {sorted(data)}")
    return copy.deepcopy(dict(data[section]))


__all__ = ["SB3Agent", "EpisodeTracker", "StopAtTimesteps", "SymmetricAction", "to_sparsity", "ACTION_FLOOR",
           "sb3_algorithms", "load_zoo_hyperparams", "OFF_POLICY"]
