"""Stable-Baselines-like base class of the pruning agents: ``Agent(env, ...)``, ``.learn()``, ``.predict()``,
``.save()``, ``Agent.load()``, SB3 callbacks and an SB3 logger (stdout / TensorBoard), on a :class:`PruneEnv`.

Subclasses choose one action per pruning step (``_choose_action``), optionally scoring candidates with the
env's look-ahead first; the base class runs the episode loop through a :class:`PruneMonitor`, which records
the history, the best episode and the evaluation count.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback

from agents.common.monitor import PruneMonitor, PruneRecord, RecordView
from agents.common.save_util import load_agent, save_agent

#: what ``learn(callback=...)`` accepts, as in SB3
MaybeCallback = Union[None, Callable, BaseCallback, Sequence[BaseCallback]]


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


@contextmanager
def callback_session(callback: MaybeCallback, agent: Any, locals_: Dict[str, Any],
                     globals_: Dict[str, Any]) -> Iterator[Optional[BaseCallback]]:
    """SB3's callback life cycle around a learning loop: the callback is converted (:func:`make_callback`),
    initialised with ``agent`` and started; ``on_training_end`` runs when the loop returns.

    :param callback: what ``learn(callback=...)`` received.
    :param agent: the learning agent (``callback.model``).
    :param locals_: ``learn``'s ``locals()``.
    :param globals_: ``learn``'s ``globals()``.
    """
    cb = make_callback(callback)
    if cb is not None:
        cb.init_callback(agent)
        cb.on_training_start(locals_, globals_)
    yield cb
    if cb is not None:
        cb.on_training_end()


def callback_on_step(callback: Optional[BaseCallback], locals_: Dict[str, Any]) -> bool:
    """Run a callback's ``on_step`` with the loop's locals, as SB3's loops do; whether to go on (no callback: True).

    :param callback: from :func:`make_callback`, already initialised (or None).
    :param locals_: the learning loop's ``locals()``.
    """
    if callback is None:
        return True
    callback.update_locals(locals_)
    return bool(callback.on_step())


class BasePruningAgent(RecordView):
    """Base of the agents that drive :class:`pruning_env.envs.PruneEnv` one pruning step at a time.

    The env is wrapped in a :class:`PruneMonitor` (``agent.env``), which owns ``history``, ``best``,
    ``episodes`` and ``n_evaluations``; the agent reads them from there.

    :param env: a ``PruneEnv`` (or a wrapper of one) in the agent's ``action_mode``.
    :param seed: seeds the agent's own random draws (``self.rng``); also passed to ``env.reset``.
    :param verbose: 0 silent, 1 logs a line per step.
    :param tensorboard_log: folder for TensorBoard event files (None = no TensorBoard).
    """

    #: the env ``action_mode`` the agent's actions mean (None = either)
    action_mode: Optional[str] = None
    #: whether a run can checkpoint this agent mid-search and resume it (:meth:`checkpoint_state`)
    supports_resume: bool = True
    #: constructor arguments stored by ``save`` (subclasses extend it)
    _init_keys: Tuple[str, ...] = ("seed", "verbose", "tensorboard_log")

    def __init__(self, env: Any, seed: Optional[int] = None, verbose: int = 0,
                 tensorboard_log: Optional[Union[str, Path]] = None) -> None:
        self.seed = seed
        self.verbose = int(verbose)
        self.tensorboard_log = str(tensorboard_log) if tensorboard_log is not None else None
        self.rng = np.random.default_rng(seed)
        self.num_timesteps = 0
        self.record = PruneRecord()
        self.env: Optional[PruneMonitor] = None
        self.logger = None
        self._last_obs: Optional[np.ndarray] = None
        if env is not None:
            self.set_env(env)

    # ------------------------------------------------------------------ env
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

    def _next_step(self) -> Tuple[Any, Any, float]:
        """``(env, pruner, goal)`` of the step about to be taken: the bare env, its current
        :class:`~pruning_env.pruning.Pruner` and the step's cumulative goal ``target * (t + 1) / n_steps``
        (what the state-reading agents plan against); a ``RuntimeError`` once the episode is over."""
        from pruning_env.envs.budget import cumulative_goal

        env = self.penv
        pruner = env.pruner
        if pruner is None:
            raise RuntimeError("the env's episode is over (no pruner for a final state); reset it before predict()")
        return env, pruner, cumulative_goal(env.target, env.step_index + 1, env.n_steps)

    def get_env(self) -> Optional[PruneMonitor]:
        """The monitored env the agent acts on (SB3 callbacks read it)."""
        return self.env

    def set_env(self, env: Any) -> None:
        """Attach a (new) env, e.g. after :meth:`load`; the episode restarts on the next ``learn``.

        :param env: a ``PruneEnv`` or a wrapper of one; a :class:`PruneMonitor` is used as it is (its record
            becomes the agent's), anything else is wrapped in one that writes into the agent's record.
        """
        self._check_env(env)
        if self.env is not None and self.env.episode_active:  # the abandoned episode's evaluations still count
            self.record.evaluations_done = self.env.n_evaluations
        if isinstance(env, PruneMonitor):
            self.record = env.record
        else:
            env = PruneMonitor(env, self.record)
        self.env = env

    # ------------------------------------------------------------------ what the monitor recorded
    @property
    def n_evaluations(self) -> int:
        """Models evaluated by the env for this agent so far (look-aheads plus steps), over all episodes."""
        return self.env.n_evaluations if self.env is not None else self.record.evaluations_done

    @property
    def episode_active(self) -> bool:
        """An episode is in progress: the next ``learn`` continues it instead of resetting the env."""
        return self.env is not None and self.env.episode_active

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
        self._on_reset(obs, info)

    def learn(self, total_timesteps: Optional[int] = None, callback: MaybeCallback = None, log_interval: int = 1,
              tb_log_name: Optional[str] = None, reset_num_timesteps: bool = True,
              progress_bar: bool = False) -> "BasePruningAgent":
        """Prune: take ``total_timesteps`` pruning steps, or (None) finish the current episode.

        An episode in progress (e.g. after a resume) is continued, not restarted.

        :param total_timesteps: pruning steps to take; episodes restart as needed. None = until the end of
            the current (or a new) episode.
        :param callback: SB3 callback(s) or ``f(locals, globals) -> bool``; ``on_step`` runs after every
            pruning step and returning False stops.
        :param log_interval: dump the logger every this many steps.
        :param tb_log_name: TensorBoard run name (default: the class name).
        :param reset_num_timesteps: restart the step counter and the TensorBoard run.
        :param progress_bar: show a tqdm bar over pruning steps.
        """
        if self.env is None:
            raise RuntimeError(f"{type(self).__name__}.learn needs an env; pass env= or call set_env()")
        if reset_num_timesteps and not self.episode_active:
            self.num_timesteps = 0
        self._setup_logger(tb_log_name or type(self).__name__, reset_num_timesteps)
        with callback_session(callback, self, locals(), globals()) as cb:
            self._learn_steps(total_timesteps, log_interval, progress_bar, cb)
        return self

    def _learn_steps(self, total_timesteps: Optional[int], log_interval: int, progress_bar: bool,
                     cb: Optional[BaseCallback]) -> None:
        from tqdm.auto import tqdm

        if not self.episode_active:
            self._reset_env()
        bar_total = total_timesteps if total_timesteps is not None else self.penv.n_steps - self.penv.step_index
        bar = tqdm(total=bar_total, desc=type(self).__name__, unit="step", disable=not progress_bar,
                   dynamic_ncols=True, leave=False)
        taken = 0
        try:
            while total_timesteps is None or taken < total_timesteps:
                if not self.episode_active:
                    self._reset_env()
                action, extra = self._choose_action(self._last_obs)
                obs, reward, terminated, truncated, info = self.env.step(action)
                self._last_obs = obs
                self._on_step(action, info)
                self.num_timesteps += 1
                taken += 1
                row = self.env.annotate(extra)
                self._log_row(row, extra)
                bar.update(1)
                bar.set_postfix(acc=f"{row['accuracy']:.3f}", flops=f"{row['flops_reduction']:.3f}",
                                evals=row["n_evaluations"])
                if self.num_timesteps % max(1, log_interval) == 0:
                    self.logger.dump(step=self.num_timesteps)
                if not callback_on_step(cb, locals()):
                    break
                if total_timesteps is None and not self.episode_active:
                    break
        finally:
            bar.close()

    def _log_row(self, row: Dict[str, Any], extra: Dict[str, Any]) -> None:
        for key in ("reward", "accuracy", "flops_reduction", "params_reduction", "channel_sparsity"):
            self.logger.record(f"prune/{key}", row[key])
        self.logger.record("prune/n_evaluations", row["n_evaluations"])
        for key, value in extra.items():
            if np.isscalar(value):
                self.logger.record(f"agent/{key}", value)

    # ------------------------------------------------------------------ persistence
    def get_parameters(self) -> Dict[str, Any]:
        """Constructor arguments of this agent (what ``save`` stores to rebuild it)."""
        return {k: getattr(self, k) for k in self._init_keys}

    def _agent_state(self) -> Dict[str, Any]:
        """What changes while learning, apart from the record: counters, RNG state, subclass state."""
        return {"num_timesteps": self.num_timesteps, "rng": self.rng.bit_generator.state, "last_obs": self._last_obs,
                "extra": self._extra_state()}

    def _load_agent_state(self, state: Dict[str, Any]) -> None:
        self.num_timesteps = int(state["num_timesteps"])
        self.rng.bit_generator.state = state["rng"]
        self._last_obs = state["last_obs"]
        self._load_extra_state(state["extra"])

    def _record_state(self, include_model: bool) -> Dict[str, Any]:
        """The record as plain data, the running episode's evaluations included in its count."""
        state = self.record.state_dict(include_model)
        state["evaluations_done"] = self.n_evaluations
        return state

    def checkpoint_state(self) -> Dict[str, Any]:
        """Everything a killed run needs to continue exactly: the agent's state, its record with the best
        episode's model, and, mid-episode, the env's current state; always the env's RNG. Restore it with
        :meth:`restore_checkpoint_state` on an agent built the same way (same config)."""
        if not self.supports_resume:
            raise RuntimeError(f"{type(self).__name__} cannot be checkpointed mid-run (supports_resume is False)")
        env = self.penv
        active = self.episode_active
        return {"agent": self._agent_state(), "record": self._record_state(include_model=True),
                "episode": self.env.episode_state() if active else None,
                "env_state": env.snapshot() if active else None,
                "env_rng": env.np_random.bit_generator.state}

    def restore_checkpoint_state(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` returned: an episode in progress goes on with the next
        ``learn`` (``reset_num_timesteps=False``), counting evaluations from the saved total.

        :param state: a dict from :meth:`checkpoint_state` of an agent of this class on an env built the same way.
        """
        if not self.supports_resume:
            raise RuntimeError(f"{type(self).__name__} cannot resume a checkpoint (supports_resume is False)")
        env = self.penv
        env.reset(seed=self.seed)  # a valid env to restore into; its RNG is set from the checkpoint below
        self._load_agent_state(state["agent"])
        self.record.load_state_dict(state["record"])
        if state["env_state"] is not None:
            env.restore(state["env_state"])
            self.env.resume_episode(state["episode"])
        else:
            self.env.resume_episode({"actions": [], "rewards": [], "active": False})
        env.np_random.bit_generator.state = state["env_rng"]

    def close(self) -> None:
        """Release what the agent started beside its env (worker processes); the env itself is the caller's to
        close. Nothing to release here."""

    def save(self, path: Union[str, Path]) -> Path:
        """Write the agent (constructor arguments, learned state and record, not the env or models) to
        ``path`` in the one agent format (:mod:`agents.common.save_util`)."""
        state = {"agent": self._agent_state(), "record": self._record_state(include_model=False)}
        return save_agent(path, self, self.get_parameters(), state)

    @classmethod
    def load(cls, path: Union[str, Path], env: Any = None, **kwargs: Any) -> "BasePruningAgent":
        """Rebuild an agent written by :meth:`save`; it starts a new episode on its next ``learn``.

        :param path: the saved file.
        :param env: env to attach (needed to ``learn``; ``predict`` of a distribution agent works without).
        :param kwargs: constructor arguments that override the saved ones.

        Called on a base class (``BasePruningAgent.load``), it rebuilds the class the file names; a class with a
        ``load`` of its own reads the file itself (an SB3 agent's file holds SB3's model zip, not this state).
        """
        saved_cls, parts = load_agent(path, cls)
        if saved_cls is not cls and saved_cls.load.__func__ is not BasePruningAgent.load.__func__:
            return saved_cls.load(path, env=env, **kwargs)
        params = dict(parts.data["params"])
        params.update(kwargs)
        agent = saved_cls(env=env, **params)
        agent._load_agent_state(parts.data["state"]["agent"])
        agent.record.load_state_dict(parts.data["state"]["record"])
        return agent


__all__ = ["BasePruningAgent", "make_callback", "callback_session", "callback_on_step", "unwrap_env", "MaybeCallback"]
