"""Base of the patch-selection agents, with their own (Stable-Baselines-like) surface: ``Agent(env, ...)``,
``learn``, ``predict``, ``save``, ``Agent.load``; subclasses only choose masks and, if they learn, update on steps.

It is not :class:`~agents.common.base.BasePruningAgent`: a patch env step is one ViT training batch, with no
look-ahead, evaluation budget or pruned model to keep, so there is no pruning record to monitor. It shares
the pruning agents' callbacks (:func:`~agents.common.base.make_callback`) and save format
(:mod:`agents.common.save_util`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from tqdm.auto import tqdm

from agents.common.base import MaybeCallback, callback_on_step, callback_session
from agents.common.save_util import load_agent, save_agent
from pruning_env.runtime import resolve_device


def _unwrap(env):
    return getattr(env, "unwrapped", env)


class PatchAgent:
    """Base class: runs the env loop, converts masks to the env's action format, saves and loads.

    :param env: a :class:`~pruning_env.envs.patch_env.PatchSelectEnv` (or a wrapper of one); may be None
        for an agent used only to ``predict`` (then pass ``n_patches``).
    :param n_patches: N when ``env`` is None.
    :param n_keep: target kept count (default: the env's ``n_keep``).
    :param device: where the agent's tensors live (default: the env's device).
    :param seed: seeds the agent's own random draws.
    """

    #: arguments stored in checkpoints; subclasses extend it
    _init_keys = ("n_patches", "n_keep", "seed")

    def __init__(self, env=None, n_patches: Optional[int] = None, n_keep: Optional[int] = None,
                 device: Union[str, torch.device, None] = None, seed: Optional[int] = None):
        self.env = env
        base = _unwrap(env) if env is not None else None
        if base is not None:
            n_patches = int(env.observation_space.shape[-1])
            if n_keep is None:
                n_keep = int(getattr(base, "n_keep", max(1, n_patches // 2)))
        if n_patches is None:
            raise ValueError("pass env, or n_patches for an agent without an env")
        self.n_patches = int(n_patches)
        self.n_keep = int(n_keep) if n_keep is not None else max(1, self.n_patches // 2)
        if not 1 <= self.n_keep <= self.n_patches:
            raise ValueError(f"n_keep must be in 1..{self.n_patches}, got {self.n_keep}")
        if device is None and base is not None and hasattr(base, "device"):
            device = base.device
        self.device = resolve_device(device if device is not None else "cpu")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        self.rng = np.random.default_rng(seed)
        self.num_timesteps = 0
        self.kept_history: list = []
        self._last_obs = None

    # ---------------------------------------------------------------- to override
    def mask_for_states(self, states: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """The bool keep-mask (N,) shared by a batch with per-image states ``states`` (B, N)."""
        raise NotImplementedError

    def _scores_for_states(self, states: torch.Tensor, deterministic: bool) -> torch.Tensor:
        """Per-patch scores sent to a Box-action env; by default the chosen mask as 0/1 (any rule keeps it)."""
        return self.mask_for_states(states, deterministic).float()

    def _on_step(self, obs: torch.Tensor, reward: float, next_obs: torch.Tensor, terminated: bool,
                 info: Dict[str, Any]) -> None:
        """Hook after every env step (learning agents store transitions and update here)."""

    def _extra_state(self) -> Dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- helpers
    def _as_states(self, obs: Any) -> torch.Tensor:
        states = torch.as_tensor(np.asarray(obs) if not torch.is_tensor(obs) else obs, dtype=torch.float32)
        if states.dim() == 1:
            states = states.unsqueeze(0)
        if states.shape[-1] != self.n_patches:
            raise ValueError(f"observation has {states.shape[-1]} patches; this agent expects {self.n_patches}")
        return states.to(self.device)

    def _to_action(self, states: torch.Tensor, deterministic: bool) -> np.ndarray:
        space = getattr(self.env, "action_space", None) if self.env is not None else None
        if space is not None and space.__class__.__name__ == "Box":
            return self._scores_for_states(states, deterministic).cpu().numpy().astype(np.float32)
        return self.mask_for_states(states, deterministic).cpu().numpy().astype(np.int8)

    # ---------------------------------------------------------------- public surface
    def get_env(self) -> Any:
        """The env the agent acts on (SB3 callbacks read it)."""
        return self.env

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                deterministic: bool = True):
        """The action for ``observation`` (B, N) in the env's action format, and ``None`` (no recurrent state).

        :param observation: per-image states of one batch.
        :param deterministic: greedy (True) or exploring with the current exploration rate.
        """
        with torch.no_grad():
            return self._to_action(self._as_states(observation), deterministic), None

    def learn(self, total_timesteps: int, callback: MaybeCallback = None, progress_bar: bool = False,
              reset_num_timesteps: bool = True, tb_log_name: str = "agentvit") -> "PatchAgent":
        """Run ``total_timesteps`` env steps (ViT training batches), learning where the agent learns.

        An episode that ends inside the budget is followed by ``env.reset()`` (a new training run); the last
        one is not reset, so ``env.model`` is the ViT trained by the final run.

        :param total_timesteps: env steps; ``env.total_steps`` is one full training run.
        :param callback: SB3 callback(s) or ``f(locals_, globals_) -> bool``, as for the pruning agents:
            ``on_step`` runs after every env step and a false return (None included) stops.
        :param progress_bar: show a tqdm bar.
        :param reset_num_timesteps: restart the step counter (and the exploration schedule).
        """
        if self.env is None:
            raise ValueError("this agent has no env; pass env= to the constructor or to load()")
        if reset_num_timesteps:
            self.num_timesteps = 0
            self._last_obs = None
        with callback_session(callback, self, locals(), globals()) as cb:
            self._learn_steps(int(total_timesteps), progress_bar, cb)
        return self

    def _learn_steps(self, total_timesteps: int, progress_bar: bool, cb: Optional[BaseCallback]) -> None:
        bar = tqdm(total=int(total_timesteps), desc=type(self).__name__, disable=not progress_bar, leave=False)
        steps = 0
        try:
            while steps < total_timesteps:
                if self._last_obs is None:
                    obs, _ = self.env.reset()
                    self._last_obs = self._as_states(obs)
                states = self._last_obs
                with torch.no_grad():
                    action = self._to_action(states, deterministic=False)
                next_obs, reward, terminated, truncated, info = self.env.step(action)
                next_states = self._as_states(next_obs)
                self.num_timesteps += 1
                steps += 1
                self.kept_history.append(int(info.get("kept", -1)))
                self._on_step(states, float(reward), next_states, bool(terminated), info)
                self._last_obs = None if (terminated or truncated) else next_states
                bar.update(1)
                if steps % 10 == 0:
                    bar.set_postfix(self._postfix(info))
                if not callback_on_step(cb, locals()):
                    break
        finally:
            bar.close()

    def _postfix(self, info: Dict[str, Any]) -> Dict[str, str]:
        return {"epoch": str(info.get("epoch")), "kept": str(info.get("kept")), "loss": f"{info.get('loss', 0):.3f}"}

    def save(self, path: Union[str, Path]) -> Path:
        """Write the agent (hyperparameters and learned state) to ``path`` in the one agent format
        (:mod:`agents.common.save_util`)."""
        params = {k: getattr(self, k) for k in self._init_keys}
        return save_agent(path, self, params, {"num_timesteps": self.num_timesteps, "extra": self._extra_state()})

    @classmethod
    def load(cls, path: Union[str, Path], env=None, device: Union[str, torch.device, None] = None) -> "PatchAgent":
        """Rebuild an agent written by :meth:`save` (of this class or a subclass).

        :param path: file from :meth:`save`.
        :param env: env to attach (needed for ``learn``; ``predict`` works without).
        :param device: where to put the agent's tensors.
        """
        saved_cls, parts = load_agent(path, cls)
        params = dict(parts.data["params"])
        if env is not None:
            params.pop("n_patches", None)
        agent = saved_cls(env=env, device=device, **params)
        agent.num_timesteps = int(parts.data["state"]["num_timesteps"])
        agent._load_extra_state(parts.data["state"]["extra"])
        return agent
