"""Stable-Baselines3 (and sb3-contrib) baselines on the very same PruneEnv: PPO, A2C, SAC, TD3, DDPG, TRPO.

The env runs in ``"sparsity"`` mode with a budget, its action mapped from SB3's [-1, 1]; every env step is
one evaluated model, so ``total_timesteps`` is the evaluation budget. The best finished episode is kept,
as random search keeps its best candidate. Hyperparameters come from ``configs/sb3/{algo}.yaml`` (zoo style).
"""
from __future__ import annotations

import copy
import functools
import io
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import gymnasium as gym
import numpy as np

from stable_baselines3.common.callbacks import BaseCallback, CallbackList

from agents.common.base import BasePruningAgent, make_callback, unwrap_env
from agents.common.save_util import load_agent, save_agent


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


class StepProgressBar(BaseCallback):
    """The project's tqdm bar over SB3's env steps (one step = one evaluated model), as the other agents show it,
    in place of SB3's own ``progress_bar`` (which needs ``rich``, not a dependency here).

    :param total: env steps of this ``learn`` call.
    :param desc: the bar's label.
    """

    def __init__(self, total: int, desc: str) -> None:
        super().__init__()
        self.total, self.desc = int(total), desc
        self.bar: Any = None

    def _on_training_start(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc=self.desc, unit="step", dynamic_ncols=True, leave=False)

    def _on_step(self) -> bool:
        self.bar.update(int(self.training_env.num_envs) if self.training_env is not None else 1)
        info = (self.locals.get("infos") or [{}])[0]
        if "accuracy" in info:
            self.bar.set_postfix(acc=f"{info['accuracy']:.3f}", flops=f"{info.get('flops_reduction', 0.0):.3f}")
        return True

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.close()


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

    The env goes through the agents' :class:`~agents.common.monitor.PruneMonitor` (which SB3 takes as its
    ``Monitor``, so episode returns reach SB3's logger too) and :class:`SymmetricAction` (SB3's Gaussian and
    tanh policies expect a symmetric box); ``history``, ``best`` and ``n_evaluations`` come from the monitor,
    as for every agent. A run cannot resume it mid-search (``supports_resume`` is False: SB3's rollout and
    replay buffers are not part of a run checkpoint).

    :param env: ``PruneEnv(action_mode="sparsity", budget=...)``.
    :param algo: ``"ppo"``, ``"a2c"``, ``"sac"``, ``"td3"``, ``"ddpg"`` or ``"trpo"``.
    :param policy: SB3 policy name.
    :param noise_type: off-policy exploration noise, ``"normal"`` or ``"ornstein-uhlenbeck"`` (zoo style).
    :param noise_std: its standard deviation.
    :param action_floor: smallest per-group sparsity an action maps to (keeps the budget reachable, see
        :class:`SymmetricAction`; 0 = the plain linear map).
    :param seed: seeds SB3 (torch, numpy, action space).
    :param device: torch device of the SB3 networks (the MLPs are small: CPU is usually fastest).
    :param n_envs: envs SB3 collects from at once; above 1 each is built from ``env.config`` in its own worker
        process (:class:`~agents.vec_env.PruneVecEnv`) and the agent's record gathers theirs (every evaluation
        counted once); a budget is then used in whole multiples of ``n_envs``. ``env`` itself runs the final
        deterministic episode.
    :param hyperparams: any other keyword of the SB3 algorithm (``learning_rate``, ``n_steps``, ...).
    """

    action_mode = "sparsity"
    supports_resume = False
    #: name of SB3's own model zip inside the agent file
    MODEL_PART = "sb3_model.zip"

    def __init__(self, env: Any = None, algo: str = "ppo", policy: str = "MlpPolicy",
                 noise_type: Optional[str] = None, noise_std: float = 0.1, action_floor: float = ACTION_FLOOR,
                 seed: Optional[int] = None, verbose: int = 0, tensorboard_log: Optional[Union[str, Path]] = None,
                 device: str = "cpu", n_envs: int = 1, **hyperparams: Any) -> None:
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
        if not isinstance(n_envs, int) or isinstance(n_envs, bool) or n_envs < 1:
            raise ValueError(f"n_envs must be an integer >= 1, got {n_envs!r}")
        self.n_envs = n_envs
        self.hyperparams = dict(hyperparams)
        self.device = device
        self.model = None
        self.wrapped: Optional[SymmetricAction] = None
        super().__init__(env, seed=seed, verbose=verbose, tensorboard_log=tensorboard_log)

    def set_env(self, env: Any) -> None:
        """Attach a (new) env; a model built or loaded before keeps its weights (SB3's ``set_env``)."""
        super().set_env(env)
        self.wrapped = self._wrap_env(self.env)
        sb3_env: Any = self.wrapped
        if self.n_envs > 1:
            from agents.vec_env import PruneVecEnv

            sb3_env = PruneVecEnv(unwrap_env(self.env).config, self.n_envs,
                                  functools.partial(SymmetricAction, floor=self.action_floor))
        if self.model is not None:
            self.close()  # the previous env's worker processes
            self.model.set_env(sb3_env)
            return
        cls = self._algorithm_class()
        self.model = cls(self.policy, sb3_env, seed=self.seed, verbose=self.verbose,
                         tensorboard_log=self.tensorboard_log, device=self.device, **self._model_kwargs())

    # the hooks a subclass on another env formulation overrides (agents.amc.AMCAgent)
    def _wrap_env(self, env: gym.Env) -> gym.Env:
        """The env SB3 acts on: the monitored env behind :class:`SymmetricAction`."""
        return SymmetricAction(env, self.action_floor)

    def _algorithm_class(self) -> type:
        """The SB3 class that is built and loaded."""
        return sb3_algorithms()[self.algo]

    def _model_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of the SB3 class: the hyperparameters and the action noise."""
        kwargs = copy.deepcopy(self.hyperparams)  # SB3 edits policy_kwargs in place (e.g. DDPG's n_critics)
        if isinstance(kwargs.get("train_freq"), list):  # YAML's [1, episode]: SB3 takes a tuple only
            kwargs["train_freq"] = tuple(kwargs["train_freq"])
        if self.noise_type is not None:
            kwargs["action_noise"] = _action_noise(self.noise_type, self.noise_std, self.wrapped.action_space.shape[0])
        return kwargs

    def _env_action(self, action: np.ndarray) -> np.ndarray:
        """The env action of an SB3 action (:func:`to_sparsity`)."""
        return to_sparsity(action, self.action_floor)

    def budget_timesteps(self, budget: int) -> Tuple[int, Optional[str]]:
        """``learn``'s ``total_timesteps`` that spend exactly ``budget`` evaluations, and a line describing it
        (None: nothing to add). One env step is one evaluated model; the final deterministic episode's
        ``n_steps`` are kept back.

        :param budget: the run's evaluation budget.
        :raises ValueError: the budget leaves no training steps.
        """
        n_steps = int(self.penv.n_steps)
        if int(budget) <= n_steps:
            raise ValueError(f"{budget} evaluations leave none for training (the final deterministic episode alone "
                             f"evaluates {n_steps}); raise the budget")
        return int(budget) - n_steps, None

    def get_parameters(self) -> Dict[str, Any]:
        return {"algo": self.algo, "policy": self.policy, "noise_type": self.noise_type, "noise_std": self.noise_std,
                "action_floor": self.action_floor, "seed": self.seed, "verbose": self.verbose,
                "tensorboard_log": self.tensorboard_log,
                "device": self.device, "n_envs": self.n_envs, **self.hyperparams}

    def learn(self, total_timesteps: Optional[int] = None, callback: Any = None, log_interval: int = 1,
              tb_log_name: Optional[str] = None, reset_num_timesteps: bool = True,
              progress_bar: bool = False, final_episode: bool = True) -> "SB3Agent":
        """Train for ``total_timesteps`` env steps (= evaluations), then run one deterministic episode.

        :param total_timesteps: env steps; required (SB3 has no "one episode" default).
        :param callback: SB3 callback(s), called by SB3 after every env step.
        :param progress_bar: show a tqdm bar over the env steps (:class:`StepProgressBar`; SB3's own bar needs
            ``rich``).
        :param final_episode: finish with a deterministic episode of the learned policy (its evaluations are
            counted too); the best finished episode is kept either way.
        """
        if self.model is None:
            raise RuntimeError("SB3Agent.learn needs an env; pass env= or use set_env()")
        if total_timesteps is None:
            raise ValueError("SB3Agent.learn needs total_timesteps (the evaluation budget)")
        if int(total_timesteps) < self.n_envs:
            raise ValueError(f"total_timesteps={total_timesteps} is below n_envs={self.n_envs}: every vectorised "
                             f"step evaluates n_envs models")
        # every vectorised step evaluates n_envs models: the budget's last whole multiple of n_envs is used
        total_timesteps = int(total_timesteps) // self.n_envs * self.n_envs
        start = 0 if reset_num_timesteps else self.model.num_timesteps
        stop = StopAtTimesteps(start + int(total_timesteps))
        user_cb = make_callback(callback)
        cbs = [stop] + ([] if user_cb is None else [user_cb])
        if progress_bar:
            cbs.append(StepProgressBar(int(total_timesteps), f"SB3Agent({self.algo})"))
        self.model.learn(total_timesteps=int(total_timesteps), callback=CallbackList(cbs), log_interval=log_interval,
                         tb_log_name=tb_log_name or self.algo.upper(), reset_num_timesteps=reset_num_timesteps,
                         progress_bar=False)
        if self.n_envs > 1:
            self.model.get_env().collect(self.record)
        if final_episode:
            obs, _ = self.wrapped.reset(seed=None if self.seed is None else int(self.seed) + 10_000)
            done = False
            while not done:
                action, _ = self.model.predict(obs, deterministic=True)
                obs, _, terminated, truncated, _ = self.wrapped.step(action)
                done = terminated or truncated
            # SB3's vectorised env shares this env: make SB3 reset it before it collects again
            self.model.set_env(self.model.get_env(), force_reset=True)
        self.num_timesteps = self.model.num_timesteps
        return self

    def close(self) -> None:
        """Stop the worker-process envs of ``n_envs > 1`` (the agent's own env stays open: it is the caller's)."""
        vec = None if self.model is None else self.model.get_env()
        if self.n_envs > 1 and vec is not None and not getattr(vec, "closed", True):
            vec.close()

    def predict(self, observation: Any = None, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> Tuple[np.ndarray, Any]:
        """The policy's action in the env's [0, 1] units (SB3 acts in [-1, 1])."""
        if self.model is None:
            raise RuntimeError("no SB3 model: give the agent an env or load one")
        action, state = self.model.predict(observation, state, episode_start, deterministic)
        return self._env_action(action), state

    def save(self, path: Union[str, Path]) -> Path:
        """One agent file (:mod:`agents.common.save_util`): constructor arguments, the record, and SB3's own
        model zip as a part."""
        if self.model is None:
            raise RuntimeError("no SB3 model to save: give the agent an env first")
        buffer = io.BytesIO()
        self.model.save(buffer)
        state = {"num_timesteps": self.num_timesteps, "record": self._record_state(include_model=False)}
        return save_agent(path, self, self.get_parameters(), state, files={self.MODEL_PART: buffer.getvalue()})

    @classmethod
    def load(cls, path: Union[str, Path], env: Any = None, **kwargs: Any) -> "SB3Agent":
        """Rebuild an agent written by :meth:`save` (``env`` is needed to keep learning).

        :param path: the saved file.
        :param env: env to attach.
        :param kwargs: constructor arguments that override the saved ones.
        """
        saved_cls, parts = load_agent(path, cls)
        params = dict(parts.data["params"])
        params.update(kwargs)
        agent = saved_cls(env=None, **params)
        agent.model = agent._algorithm_class().load(io.BytesIO(parts.files[cls.MODEL_PART]), device=agent.device)
        agent.num_timesteps = int(parts.data["state"]["num_timesteps"])
        agent.record.load_state_dict(parts.data["state"]["record"])
        if env is not None:
            agent.set_env(env)
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


__all__ = ["SB3Agent", "StopAtTimesteps", "SymmetricAction", "to_sparsity", "ACTION_FLOOR",
           "sb3_algorithms", "load_zoo_hyperparams", "OFF_POLICY"]
