"""AMC's agent (He et al., ECCV 2018): Stable-Baselines3 DDPG on :class:`~pruning_env.envs.layerwise_env.
LayerwisePruneEnv` with AMC's exploration and reward handling.

What AMC's search does (``amc_search.py`` / ``lib/agent.py`` of mit-han-lab/amc), and where it lives here:

- warm-up episodes of uniform random actions in the action bounds, no policy update
  (:class:`AMCDDPG`: SB3's ``learning_starts`` = warm-up episodes x groups);
- then the actor's action with truncated-normal noise inside the bounds, sigma ``init_delta`` decayed by
  ``delta_decay`` per episode after the warm-up (:meth:`AMCDDPG.noise_sigma`, :func:`truncated_normal`);
- every transition of an episode stored with the episode's final reward, and a moving-average baseline (updated
  from each sampled batch's mean, ``moving_alpha``) subtracted from the sampled rewards (:class:`AMCReplayBuffer`);
- one gradient step per transition after each episode (``train_freq: [1, episode]``, ``gradient_steps: -1``),
  a replay buffer of ``buffer_episodes`` episodes, 300-300 actor and critic, actor / critic learning rates
  1e-4 / 1e-3, tau 0.01, discount 1, batch 64 (``configs/sb3/amc.yaml``).

The evaluation budget counts episodes: the reward is computed once, at an episode's end, so one episode is one
evaluated model (:meth:`AMCAgent.budget_timesteps`). The warm-up is scaled to the budget (``warmup_fraction`` of
the episodes, AMC's 100 of 800) unless ``warmup`` names a number. Deviations: docs/agents.md ("amc").
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import gymnasium as gym
import numpy as np
from stable_baselines3 import DDPG
from stable_baselines3.common.buffers import ReplayBuffer

from agents.common.base import unwrap_env
from agents.sb3_baselines import SB3Agent

#: AMC's warm-up share of the search: 100 warm-up episodes of 800 (``amc_search.py`` defaults)
AMC_WARMUP_FRACTION = 100 / 800
#: AMC's DDPG settings that are SB3 arguments: AMCAgent's defaults when built directly (``configs/sb3/amc.yaml``
#: states the same values for runs; ``tests/test_agent_amc.py`` checks that the two agree)
AMC_DDPG_DEFAULTS: Dict[str, Any] = {"policy_kwargs": {"net_arch": [300, 300]}, "learning_rate": 1e-3,
                                     "batch_size": 64, "tau": 0.01, "gamma": 1.0, "train_freq": (1, "episode"),
                                     "gradient_steps": -1}


def truncated_normal(rng: np.random.Generator, mean: np.ndarray, sigma: float, low: np.ndarray,
                     high: np.ndarray) -> np.ndarray:
    """One draw per element of N(``mean``, ``sigma``) truncated to [``low``, ``high``] (exact: rejection of the
    draws outside; ``mean`` is clipped into the bounds first). ``sigma`` 0 returns the clipped mean.

    :param rng: the generator (the agent's noise stream).
    :param mean: centres, e.g. the actor's actions.
    :param sigma: standard deviation before truncation, >= 0.
    :param low: lower bounds.
    :param high: upper bounds.
    """
    mean = np.clip(np.asarray(mean, dtype=np.float64), low, high)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return mean
    out = mean.copy()
    todo = np.ones(mean.shape, dtype=bool)
    for _ in range(10_000):  # acceptance is >= ~0.3 for AMC's sigma; a pathological one falls to the clip below
        draw = rng.normal(mean[todo], sigma)
        ok = (draw >= np.broadcast_to(low, mean.shape)[todo]) & (draw <= np.broadcast_to(high, mean.shape)[todo])
        idx = np.flatnonzero(todo)[ok]
        out.flat[idx] = draw[ok]
        todo.flat[idx] = False
        if not todo.any():
            return out
    return np.clip(out, low, high)


class AMCReplayBuffer(ReplayBuffer):
    """SB3's replay buffer with AMC's reward handling (one env only).

    - When an episode ends, every transition stored since it began gets the episode's final reward (AMC's
      ``agent.observe(final_reward, ...)`` over the trajectory; the env gives 0 before the last group).
    - :meth:`sample` subtracts a moving-average baseline from the sampled rewards; the baseline starts at the first
      batch's mean and moves by ``moving_alpha`` times (batch mean - baseline) at every sample (AMC's
      ``update_policy``).

    :param moving_alpha: the baseline's step size (AMC: 0.5).
    """

    def __init__(self, *args: Any, moving_alpha: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.n_envs != 1:
            raise ValueError(f"AMCReplayBuffer takes one env (its episodes are filled in order), got {self.n_envs}")
        if not 0.0 < float(moving_alpha) <= 1.0:
            raise ValueError(f"moving_alpha must lie in (0, 1], got {moving_alpha!r}")
        self.moving_alpha = float(moving_alpha)
        self.moving_average: Optional[float] = None
        self.episode_length = 0  # transitions of the running episode stored so far

    def add(self, obs: np.ndarray, next_obs: np.ndarray, action: np.ndarray, reward: np.ndarray, done: np.ndarray,
            infos: List[Dict[str, Any]]) -> None:
        super().add(obs, next_obs, action, reward, done, infos)
        self.episode_length += 1
        if bool(np.asarray(done).reshape(-1)[0]):
            back = np.arange(min(self.episode_length, self.buffer_size))  # the episode's transitions still held
            self.rewards[(self.pos - 1 - back) % self.buffer_size, 0] = float(np.asarray(reward).reshape(-1)[0])
            self.episode_length = 0

    def sample(self, batch_size: int, env: Any = None):
        data = super().sample(batch_size, env=env)
        mean = float(data.rewards.mean())
        if self.moving_average is None:
            self.moving_average = mean
        else:
            self.moving_average += self.moving_alpha * (mean - self.moving_average)
        return data._replace(rewards=data.rewards - self.moving_average)


class AMCDDPG(DDPG):
    """SB3's DDPG with AMC's exploration and separate actor / critic learning rates.

    Before ``learning_starts`` (the warm-up) actions are uniform in the action space (SB3's warm-up, as AMC's
    ``random_action``); after it, the actor's action with :func:`truncated_normal` noise of sigma
    :meth:`noise_sigma` in the env's action units, inside the action bounds. ``action_noise`` is refused (this is
    the noise).

    :param actor_learning_rate: the actor's Adam learning rate (AMC: 1e-4); ``learning_rate`` is the critic's
        (AMC: 1e-3). None: both use ``learning_rate``.
    :param init_delta: sigma of the first episode after the warm-up (AMC: 0.5).
    :param delta_decay: sigma's factor per later episode (AMC's code: 0.95).
    :param warmup_episodes: episodes of the warm-up (sigma stays ``init_delta`` through them and the first episode
        after); ``learning_starts`` is set from it by :class:`AMCAgent`.
    """

    def __init__(self, *args: Any, actor_learning_rate: Optional[float] = None, init_delta: float = 0.5,
                 delta_decay: float = 0.95, warmup_episodes: int = 0, **kwargs: Any) -> None:
        if kwargs.get("action_noise") is not None:
            raise ValueError("AMCDDPG explores with its truncated-normal noise (init_delta, delta_decay); "
                             "action_noise is not taken")
        if float(init_delta) < 0:
            raise ValueError(f"init_delta must be >= 0, got {init_delta!r}")
        if not 0.0 < float(delta_decay) <= 1.0:
            raise ValueError(f"delta_decay must lie in (0, 1], got {delta_decay!r}")
        if actor_learning_rate is not None and not float(actor_learning_rate) > 0:
            raise ValueError(f"actor_learning_rate must be > 0, got {actor_learning_rate!r}")
        self.actor_learning_rate = None if actor_learning_rate is None else float(actor_learning_rate)
        self.init_delta, self.delta_decay = float(init_delta), float(delta_decay)
        self.warmup_episodes = int(warmup_episodes)
        self.noise_rng = np.random.default_rng(kwargs.get("seed"))
        super().__init__(*args, **kwargs)

    def noise_sigma(self, episode: int) -> float:
        """Sigma of the exploration noise in episode ``episode`` (0-based): ``init_delta`` up to the first episode
        after the warm-up, then ``init_delta * delta_decay ** (episode - warmup_episodes)``."""
        return self.init_delta * self.delta_decay ** max(0, int(episode) - self.warmup_episodes)

    def _sample_action(self, learning_starts: int, action_noise: Any = None,
                       n_envs: int = 1) -> Tuple[np.ndarray, np.ndarray]:
        if self.num_timesteps < learning_starts:
            action = np.array([self.action_space.sample() for _ in range(n_envs)])
        else:
            assert self._last_obs is not None, "self._last_obs was not set"
            mean, _ = self.predict(self._last_obs, deterministic=True)  # env units, inside the bounds
            action = truncated_normal(self.noise_rng, mean, self.noise_sigma(self._episode_num),
                                      self.action_space.low, self.action_space.high)
        action = action.astype(self.action_space.dtype)
        return action, self.policy.scale_action(action)

    def _update_learning_rate(self, optimizers: Any) -> None:
        super()._update_learning_rate(optimizers)
        if self.actor_learning_rate is not None:
            for group in self.actor.optimizer.param_groups:
                group["lr"] = self.actor_learning_rate


class AMCAgent(SB3Agent):
    """AMC: DDPG on the layer-by-layer env (:class:`~pruning_env.envs.layerwise_env.LayerwisePruneEnv`), one step
    per prunable group, the reward at an episode's end; everything else is :class:`SB3Agent`'s (the monitor's
    record of the best episode, the final deterministic episode, persistence).

    :param env: a ``LayerwisePruneEnv`` (``gym.make("RLPruneLW-...")``), or a wrapper of one.
    :param warmup: warm-up episodes (uniform random actions, no update); None: ``warmup_fraction`` of the episodes
        of each ``learn`` call, at least 1.
    :param warmup_fraction: the warm-up's share of the episodes when ``warmup`` is None (AMC: 100 / 800).
    :param init_delta: sigma of the truncated-normal noise after the warm-up (AMC: 0.5; env action units).
    :param delta_decay: sigma's factor per episode after the warm-up (AMC's code: 0.95).
    :param actor_learning_rate: the actor's learning rate (AMC: 1e-4); ``learning_rate`` is the critic's.
    :param moving_alpha: step of the reward baseline (:class:`AMCReplayBuffer`; AMC: 0.5).
    :param buffer_episodes: replay buffer size in episodes (AMC's ``rmsize`` 100 per layer); an explicit
        ``buffer_size`` wins.
    :param hyperparams: :class:`SB3Agent`'s arguments and DDPG's (``learning_rate``, ``batch_size``, ``tau``, ...);
        those not given take AMC's values (:data:`AMC_DDPG_DEFAULTS`).
    """

    def __init__(self, env: Any = None, warmup: Optional[int] = None, warmup_fraction: float = AMC_WARMUP_FRACTION,
                 init_delta: float = 0.5, delta_decay: float = 0.95, actor_learning_rate: Optional[float] = 1e-4,
                 moving_alpha: float = 0.5, buffer_episodes: int = 100, **hyperparams: Any) -> None:
        for key, value in AMC_DDPG_DEFAULTS.items():
            hyperparams.setdefault(key, copy.deepcopy(value))
        hyperparams.setdefault("algo", "ddpg")
        if hyperparams["algo"] != "ddpg":
            raise ValueError(f"AMCAgent is DDPG (algo='ddpg'), got algo={hyperparams['algo']!r}")
        if hyperparams.get("noise_type") is not None:
            raise ValueError("AMCAgent explores with AMC's truncated-normal noise (init_delta, delta_decay); "
                             "noise_type is not taken")
        if int(hyperparams.get("n_envs", 1)) != 1:
            raise ValueError("AMCAgent runs one env (its replay buffer fills whole episodes in order): n_envs=1")
        if warmup is not None and (not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0):
            raise ValueError(f"warmup must be None or an integer >= 0, got {warmup!r}")
        if not 0.0 <= float(warmup_fraction) < 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {warmup_fraction!r}")
        if not isinstance(buffer_episodes, int) or isinstance(buffer_episodes, bool) or buffer_episodes < 1:
            raise ValueError(f"buffer_episodes must be an integer >= 1, got {buffer_episodes!r}")
        self.warmup, self.warmup_fraction = warmup, float(warmup_fraction)
        self.init_delta, self.delta_decay = float(init_delta), float(delta_decay)
        self.actor_learning_rate = None if actor_learning_rate is None else float(actor_learning_rate)
        self.moving_alpha, self.buffer_episodes = float(moving_alpha), int(buffer_episodes)
        super().__init__(env, **hyperparams)

    # ------------------------------------------------------------------ SB3Agent's hooks
    def _check_env(self, env: Any) -> None:
        from pruning_env.envs.layerwise_env import LayerwisePruneEnv

        if not isinstance(unwrap_env(env), LayerwisePruneEnv):
            raise TypeError(f"AMCAgent needs a LayerwisePruneEnv (gym ids RLPruneLW-*), got "
                            f"{type(unwrap_env(env)).__name__}")

    def _wrap_env(self, env: gym.Env) -> gym.Env:
        return env  # SB3 rescales the env's Box(0, max_sparsity) itself; the wall keeps the budget reachable

    def _algorithm_class(self) -> type:
        return AMCDDPG

    def _model_kwargs(self) -> Dict[str, Any]:
        kwargs = super()._model_kwargs()
        n_groups = int(self.penv.n_groups)
        kwargs.setdefault("buffer_size", self.buffer_episodes * n_groups)
        kwargs["replay_buffer_class"] = AMCReplayBuffer
        kwargs["replay_buffer_kwargs"] = {**(kwargs.get("replay_buffer_kwargs") or {}),
                                          "moving_alpha": self.moving_alpha}
        kwargs.update(actor_learning_rate=self.actor_learning_rate, init_delta=self.init_delta,
                      delta_decay=self.delta_decay)
        return kwargs

    def _env_action(self, action: np.ndarray) -> np.ndarray:
        return np.asarray(action)  # SB3's predict is already in the env's units

    def get_parameters(self) -> Dict[str, Any]:
        return {**super().get_parameters(), "warmup": self.warmup, "warmup_fraction": self.warmup_fraction,
                "init_delta": self.init_delta, "delta_decay": self.delta_decay,
                "actor_learning_rate": self.actor_learning_rate, "moving_alpha": self.moving_alpha,
                "buffer_episodes": self.buffer_episodes}

    # ------------------------------------------------------------------ budget and warm-up
    def warmup_episodes(self, episodes: int) -> int:
        """Warm-up episodes of a ``learn`` call of ``episodes`` episodes: ``warmup``, or ``warmup_fraction`` of
        them (rounded, at least 1 when there is an episode to warm up with)."""
        if self.warmup is not None:
            return int(self.warmup)
        return max(1 if episodes > 0 else 0, int(round(self.warmup_fraction * episodes)))

    def budget_timesteps(self, budget: int) -> Tuple[int, Optional[str]]:
        """``total_timesteps`` (env steps) of ``budget`` evaluations: ``budget - 1`` episodes of ``n_groups`` steps,
        the last evaluation kept for the final deterministic episode; and the schedule as a line.

        :param budget: the run's evaluation budget (one per episode).
        :raises ValueError: fewer than 2 evaluations.
        """
        if int(budget) < 2:
            raise ValueError(f"{budget} evaluations leave none for training (the final deterministic episode "
                             f"alone evaluates 1); raise the budget to >= 2")
        episodes, n_groups = int(budget) - 1, int(self.penv.n_groups)
        warm = min(self.warmup_episodes(episodes), episodes)
        text = (f"{episodes} episodes x {n_groups} group steps (warm-up {warm} random episode{'s' * (warm != 1)}, "
                f"then DDPG with "
                f"truncated-normal noise sigma {self.init_delta:g} x {self.delta_decay:g}^episode) + 1 deterministic "
                f"episode = {budget} evaluations (one per episode)")
        return episodes * n_groups, text

    def learn(self, total_timesteps: Optional[int] = None, callback: Any = None, log_interval: int = 1,
              tb_log_name: Optional[str] = None, reset_num_timesteps: bool = True,
              progress_bar: bool = False, final_episode: bool = True) -> "AMCAgent":
        """Train for ``total_timesteps`` env steps (``n_groups`` per episode, one evaluation per episode), warm-up
        first (:meth:`warmup_episodes` of this call's episodes; a call with ``reset_num_timesteps=False`` continues
        the search and its schedule instead), then the final deterministic episode.

        :param total_timesteps: env steps; whole episodes are used (a partial last one is dropped).
        """
        if self.model is None:
            raise RuntimeError("AMCAgent.learn needs an env; pass env= or use set_env()")
        if total_timesteps is None:
            raise ValueError("AMCAgent.learn needs total_timesteps (episodes x groups; see budget_timesteps)")
        n_groups = int(self.penv.n_groups)
        episodes = int(total_timesteps) // n_groups
        if episodes < 1:
            raise ValueError(f"total_timesteps={total_timesteps} is below one episode ({n_groups} group steps)")
        if reset_num_timesteps:  # SB3 restarts its step and episode counters: a new search, a new warm-up
            warm = self.warmup_episodes(episodes)
            self.model.warmup_episodes, self.model.learning_starts = warm, warm * n_groups
        return super().learn(episodes * n_groups, callback=callback, log_interval=log_interval,
                             tb_log_name=tb_log_name or "AMC", reset_num_timesteps=reset_num_timesteps,
                             progress_bar=progress_bar, final_episode=final_episode)


__all__ = ["AMCAgent", "AMCDDPG", "AMCReplayBuffer", "truncated_normal", "AMC_WARMUP_FRACTION", "AMC_DDPG_DEFAULTS"]
