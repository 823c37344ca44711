"""Stable-Baselines-like base class of the pruning agents: ``Agent(env, ...)``, ``.learn()``, ``.predict()``,
``.save()``, ``Agent.load()``, SB3 callbacks and an SB3 logger (stdout / TensorBoard), on a :class:`PruneEnv`.

Subclasses choose one action per pruning step (``_choose_action``), optionally scoring candidates with the
env's look-ahead first; the base class runs the episode loop, counts evaluations and keeps the best episode.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback

from pruning_env.runtime import atomic_save

#: what ``learn(callback=...)`` accepts, as in SB3
MaybeCallback = Union[None, Callable, BaseCallback, Sequence[BaseCallback]]

#: info keys copied into every per-step history row
STEP_KEYS = ("reward", "accuracy", "flops_reduction", "params_reduction", "channel_sparsity", "macs", "params")


def unwrap_env(env: Any) -> Any:
    """The bare :class:`PruneEnv` under any Gymnasium wrappers."""
    return getattr(env, "unwrapped", env)


def make_callback(callback: MaybeCallback) -> Optional[BaseCallback]:
    """SB3's conversion: a list becomes a ``CallbackList``, a function ``f(locals, globals) -> bool`` a
    ``ConvertCallback``; None stays None."""
    if callback is None or isinstance(callback, BaseCallback):
        return callback
    if isinstance(callback, (list, tuple)):
        return CallbackList([make_callback(c) for c in callback])
    if callable(callback):
        return ConvertCallback(callback)
    raise TypeError(f"callback must be a BaseCallback, a list of them or a function, got {type(callback).__name__}")


class BasePruningAgent:
    """Base of the agents that drive :class:`pruning_env.envs.PruneEnv` one pruning step at a time.

    :param env: a ``PruneEnv`` (or a wrapper of one) in the agent's ``action_mode``.
    :param seed: seeds the agent's own random draws (``self.rng``); also passed to ``env.reset``.
    :param verbose: 0 silent, 1 logs a line per step.
    :param tensorboard_log: folder for TensorBoard event files (None = no TensorBoard).
    """

    #: the env ``action_mode`` the agent's actions mean (None = either)
    action_mode: Optional[str] = None
    #: constructor arguments stored by ``save`` (subclasses extend it)
    _init_keys: Tuple[str, ...] = ("seed", "verbose", "tensorboard_log")

    def __init__(self, env: Any, seed: Optional[int] = None, verbose: int = 0,
                 tensorboard_log: Optional[Union[str, Path]] = None) -> None:
        self.env = env
        self.seed = seed
        self.verbose = int(verbose)
        self.tensorboard_log = str(tensorboard_log) if tensorboard_log is not None else None
        self.rng = np.random.default_rng(seed)
        self.num_timesteps = 0
        self.episodes = 0
        self.history: List[Dict[str, Any]] = []
        self.best: Optional[Dict[str, Any]] = None
        self.logger = None
        self._episode_active = False
        self._episode_actions: List[np.ndarray] = []
        self._last_obs: Optional[np.ndarray] = None
        self._evals_done = 0  # evaluations of finished episodes (and before a resume)
        self._env_evals_at_start = 0  # env counter when this agent started counting the current episode
        if env is not None:
            self._check_env(env)

    # ------------------------------------------------------------------ env helpers
    def _check_env(self, env: Any) -> None:
        base = unwrap_env(env)
        for attr in ("evaluate_action", "n_groups", "n_evaluations"):
            if not hasattr(base, attr):
                raise TypeError(f"{type(self).__name__} needs a PruneEnv (missing {attr!r}); got {type(base).__name__}")
        if self.action_mode is not None and getattr(base, "action_mode", None) != self.action_mode:
            raise ValueError(f"{type(self).__name__} acts in action_mode={self.action_mode!r} but the env uses "
                             f"action_mode={base.action_mode!r}; build the env with action_mode={self.action_mode!r}")

    @property
    def penv(self) -> Any:
        """The bare PruneEnv."""
        if self.env is None:
            raise RuntimeError(f"{type(self).__name__} has no env; pass env= to the constructor or load()")
        return unwrap_env(self.env)

    def get_env(self) -> Any:
        """The env the agent acts on (SB3 callbacks read it)."""
        return self.env

    def set_env(self, env: Any) -> None:
        """Attach a (new) env, e.g. after :meth:`load`; the episode restarts on the next ``learn``."""
        self._check_env(env)
        self.env = env
        self._episode_active = False

    @property
    def n_evaluations(self) -> int:
        """Models evaluated by the env for this agent so far (look-aheads plus steps), over all episodes."""
        current = 0
        if self._episode_active and self.env is not None:
            current = self.penv.n_evaluations - self._env_evals_at_start
        return self._evals_done + current

    def attach_resumed_env(self) -> None:
        """Call after restoring the env to the state saved with this agent: the episode goes on and evaluation
        counting continues from the saved total."""
        self._env_evals_at_start = self.penv.n_evaluations

    # ------------------------------------------------------------------ to override
    def _choose_action(self, obs: np.ndarray) -> Tuple[np.ndarray, Dict[str, Any]]:
        """The action of the current pruning step and extra numbers to log with it."""
        raise NotImplementedError

    def _on_reset(self, obs: np.ndarray, info: Dict[str, Any]) -> None:
        """Hook at the start of an episode."""

    def _on_step(self, action: np.ndarray, info: Dict[str, Any]) -> None:
        """Hook after ``env.step`` (learning agents update their schedules here)."""

    def predict(self, observation: Any = None, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> Tuple[np.ndarray, Any]:
        """The agent's action for the env's current state, SB3-style ``(action, state)``."""
        raise NotImplementedError

    def _extra_state(self) -> Dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ training loop
    def _setup_logger(self, tb_log_name: str, reset_num_timesteps: bool) -> None:
        from stable_baselines3.common.utils import configure_logger

        if self.logger is None or reset_num_timesteps:
            self.logger = configure_logger(self.verbose, self.tensorboard_log, tb_log_name, reset_num_timesteps)

    def _reset_env(self) -> None:
        seed = None if self.seed is None else int(self.seed) + self.episodes
        obs, info = self.env.reset(seed=seed)
        self._last_obs = obs
        self._episode_active = True
        self._episode_actions = []
        self._env_evals_at_start = self.penv.n_evaluations
        self._on_reset(obs, info)

    def learn(self, total_timesteps: Optional[int] = None, callback: MaybeCallback = None, log_interval: int = 1,
              tb_log_name: Optional[str] = None, reset_num_timesteps: bool = True,
              progress_bar: bool = False) -> "BasePruningAgent":
        """Prune: take ``total_timesteps`` pruning steps, or (None) finish the current episode.

        An episode in progress (e.g. after a resume) is continued, not restarted.

        :param total_timesteps: pruning steps to take; episodes restart as needed. None = until the end of
            the current (or a new) episode.
        :param callback: SB3 callback(s) or ``f(locals, globals) -> bool``; ``on_step`` runs after every
            pruning step and returning False stops learning.
        :param log_interval: dump the logger every this many steps.
        :param tb_log_name: TensorBoard run name (default: the class name).
        :param reset_num_timesteps: restart the step counter and the TensorBoard run.
        :param progress_bar: show a tqdm bar over pruning steps.
        """
        from tqdm.auto import tqdm

        if self.env is None:
            raise RuntimeError(f"{type(self).__name__}.learn needs an env; pass env= or call set_env()")
        if reset_num_timesteps and not self._episode_active:
            self.num_timesteps = 0
        self._setup_logger(tb_log_name or type(self).__name__, reset_num_timesteps)
        cb = make_callback(callback)
        if cb is not None:
            cb.init_callback(self)
            cb.on_training_start(locals(), globals())
        if not self._episode_active:
            self._reset_env()
        bar_total = total_timesteps if total_timesteps is not None else self.penv.n_steps - self.penv.step_index
        bar = tqdm(total=bar_total, desc=type(self).__name__, unit="step", disable=not progress_bar,
                   dynamic_ncols=True, leave=False)
        taken = 0
        try:
            while total_timesteps is None or taken < total_timesteps:
                if not self._episode_active:
                    self._reset_env()
                t0 = time.perf_counter()
                action, extra = self._choose_action(self._last_obs)
                obs, reward, terminated, truncated, info = self.env.step(action)
                self._last_obs = obs
                self._episode_actions.append(np.asarray(action, dtype=np.float64).copy())
                self._on_step(action, info)
                self.num_timesteps += 1
                taken += 1
                row = self._record(info, extra, time.perf_counter() - t0)
                if terminated or truncated:
                    self._end_episode(info)
                bar.update(1)
                bar.set_postfix(acc=f"{row['accuracy']:.3f}", flops=f"{row['flops_reduction']:.3f}",
                                evals=row["n_evaluations"])
                if self.num_timesteps % max(1, log_interval) == 0:
                    self.logger.dump(step=self.num_timesteps)
                if cb is not None:
                    cb.update_locals(locals())
                    if not cb.on_step():
                        break
                if total_timesteps is None and not self._episode_active:
                    break
        finally:
            bar.close()
        if cb is not None:
            cb.on_training_end()
        return self

    def _record(self, info: Dict[str, Any], extra: Dict[str, Any], seconds: float) -> Dict[str, Any]:
        row: Dict[str, Any] = {"timestep": self.num_timesteps, "episode": self.episodes, "step": int(info["step"])}
        for key in STEP_KEYS:
            row[key] = float(info[key]) if key in info else float("nan")
        if "accuracy_recovered" in info:
            row["accuracy_recovered"] = float(info["accuracy_recovered"])
        row["n_evaluations"] = self.n_evaluations
        row["seconds"] = seconds
        row["kept_channels"] = [int(k) for k in np.asarray(info.get("kept_channels", []))]
        row.update(extra)
        self.history.append(row)
        for key in ("reward", "accuracy", "flops_reduction", "params_reduction", "channel_sparsity"):
            self.logger.record(f"prune/{key}", row[key])
        self.logger.record("prune/n_evaluations", row["n_evaluations"])
        for key, value in extra.items():
            if np.isscalar(value):
                self.logger.record(f"agent/{key}", value)
        return row

    def _end_episode(self, info: Dict[str, Any]) -> None:
        reward = float(info["reward"])
        if self.best is None or reward > self.best["reward"]:
            self.best = {"reward": reward, "episode": self.episodes, "model": self.penv.model,
                         "info": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in info.items()},
                         "actions": [a.tolist() for a in self._episode_actions]}
        self._evals_done = self.n_evaluations
        self._episode_active = False
        self.episodes += 1

    # ------------------------------------------------------------------ persistence
    def get_parameters(self) -> Dict[str, Any]:
        """Constructor arguments of this agent (what ``save`` stores to rebuild it)."""
        return {k: getattr(self, k) for k in self._init_keys}

    def state_dict(self, include_models: bool = False) -> Dict[str, Any]:
        """Everything that changes while learning: counters, RNG state, history, subclass state.

        :param include_models: also keep the best episode's pruned model (for run checkpoints).
        """
        best = None
        if self.best is not None:
            best = {k: v for k, v in self.best.items() if include_models or k != "model"}
        return {"num_timesteps": self.num_timesteps, "episodes": self.episodes, "history": list(self.history),
                "best": best, "rng": self.rng.bit_generator.state, "episode_active": self._episode_active,
                "episode_actions": [a.copy() for a in self._episode_actions], "last_obs": self._last_obs,
                "n_evaluations": self.n_evaluations,
                "extra": self._extra_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; call :meth:`attach_resumed_env` after restoring the env."""
        self.num_timesteps = int(state["num_timesteps"])
        self.episodes = int(state["episodes"])
        self.history = list(state["history"])
        self.best = state["best"]
        self.rng.bit_generator.state = state["rng"]
        self._episode_active = bool(state["episode_active"])
        self._episode_actions = [np.asarray(a) for a in state["episode_actions"]]
        self._last_obs = state["last_obs"]
        self._evals_done = int(state["n_evaluations"])
        self._load_extra_state(state["extra"])

    def save(self, path: Union[str, Path]) -> Path:
        """Write the agent (constructor arguments and learned state, not the env) to ``path`` atomically."""
        cls = type(self)
        payload = {"format": "rl-prune-agent/1", "class": f"{cls.__module__}:{cls.__qualname__}",
                   "params": self.get_parameters(), "state": self.state_dict()}
        return atomic_save(payload, path)

    @classmethod
    def load(cls, path: Union[str, Path], env: Any = None, **kwargs: Any) -> "BasePruningAgent":
        """Rebuild an agent written by :meth:`save`.

        :param path: the saved file.
        :param env: env to attach (needed to ``learn``; ``predict`` of a distribution agent works without).
        :param kwargs: constructor arguments that override the saved ones.
        """
        import importlib

        import torch

        payload = torch.load(Path(path), map_location="cpu", weights_only=False)
        if not isinstance(payload, dict) or payload.get("format") != "rl-prune-agent/1":
            raise ValueError(f"{path} is not an agent saved by BasePruningAgent.save")
        module, _, name = payload["class"].partition(":")
        saved_cls = getattr(importlib.import_module(module), name)
        if not issubclass(saved_cls, cls):
            raise TypeError(f"{path} holds a {saved_cls.__name__}, not a {cls.__name__}")
        params = dict(payload["params"])
        params.update(kwargs)
        agent = saved_cls(env=env, **params)
        agent.load_state_dict(payload["state"])
        agent._episode_active = False  # a loaded agent starts a new episode unless a run restores the env
        return agent


__all__ = ["BasePruningAgent", "make_callback", "unwrap_env", "MaybeCallback", "STEP_KEYS"]
