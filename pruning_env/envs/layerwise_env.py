"""AMC's layer-by-layer formulation (He et al., ECCV 2018) as a Gymnasium env over PruneEnv.

An episode walks the prunable channel groups one by one; the action is that group's sparsity
(``Box(1,)`` in ``[0, max_sparsity]``); the observation is AMC's layer state normalised to [0, 1]
(``LAYER_FEATURES``). A FLOPs wall clips each action so that the budget stays reachable with every later
group at ``max_sparsity``. Reward 0 until the last group; then the full sparsity vector is applied through
an inner one-step :class:`~pruning_env.envs.prune_env.PruneEnv` (same config, task, pruner, budget mapping,
analytic plan costs and :class:`~pruning_env.envs.scoring.CandidateScorer`), whose reward is returned.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import gymnasium as gym
import numpy as np
import torch.nn as nn
from gymnasium import spaces

from pruning_env.envs.prune_env import PruneEnv

LAYER_FEATURES = ("index", "channels", "kernel", "stride", "macs", "macs_removed", "macs_to_remove",
                  "previous_action")
#: read-only attributes of the inner PruneEnv that runs, reports and agents read through this env (task, data,
#: costs, the evaluation counters; ``model`` / ``current_channels`` are the pruned ones after the last step)
INNER_ATTRS = frozenset({"splits", "device", "input_size", "original_model", "config", "task", "val_size",
                         "split_seed", "episode_metric", "target_metric", "alpha", "beta", "layer_counts", "scorer",
                         "model", "current_channels", "n_evaluations", "n_train_batches", "total_evaluations",
                         "kept_indices", "latency_model", "rerank_finalists"})


class LayerwisePruneEnv(gym.Env):
    """AMC-style env: one step per prunable group; the inner PruneEnv (forced to ``n_steps=1``, sparsity
    action, ``budget=target_metric``) meets the budget exactly at the end. Other kwargs: PruneEnv's config.

    :param max_sparsity: the largest per-group sparsity an action may ask for (AMC: 0.8).
    """

    metadata = {"render_modes": []}
    #: what an action means here (PruneEnv's are ``"sparsity"`` / ``"distribution"`` over all groups)
    action_mode = "layerwise"

    def __init__(self, max_sparsity: float = 0.8, **kwargs: Any) -> None:
        super().__init__()
        if not 0.0 < float(max_sparsity) <= 1.0:
            raise ValueError(f"max_sparsity must lie in (0, 1], got {max_sparsity!r}")
        self.max_sparsity = float(max_sparsity)
        kwargs.update(n_steps=1, action_mode="sparsity")
        kwargs.setdefault("budget", kwargs.get("target_metric", "flops"))
        self.inner = PruneEnv(**kwargs)
        self.render_mode = None
        inner = self.inner
        self.n_groups, self.group_names = inner.n_groups, inner.group_names
        self.target, self.metric = inner.target, inner.budget
        self.original_channels = inner.original_channels
        self.action_space = spaces.Box(0.0, self.max_sparsity, shape=(1,), dtype=np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(LAYER_FEATURES),), dtype=np.float32)
        kernels, strides = self._layer_geometry()
        self._kernel = kernels / max(kernels.max(), 1.0)
        self._stride = strides / max(strides.max(), 1.0)
        self._index = 0
        self._sparsity = np.zeros(self.n_groups)
        self._prev = 0.0
        self._clipped = 0

    def __getattr__(self, name: str) -> Any:
        """The inner env's :data:`INNER_ATTRS` (only those: anything else is this env's own or missing)."""
        if name in INNER_ATTRS and "inner" in self.__dict__:
            return getattr(self.inner, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def n_steps(self) -> int:
        """Steps of an episode: one per prunable group."""
        return self.n_groups

    def _layer_geometry(self) -> Tuple[np.ndarray, np.ndarray]:
        """Kernel size and stride of each group's first conv (1 for linear layers / unknown groups)."""
        modules = dict(self.inner.original_model.named_modules())
        k, s = np.ones(self.n_groups), np.ones(self.n_groups)
        for i, name in enumerate(self.group_names):
            m = modules.get(name)
            if isinstance(m, nn.Conv2d):
                k[i], s[i] = float(m.kernel_size[0]), float(m.stride[0])
        return k, s

    # -------------------------------------------------------------- costs (the inner env's analytic plan costs)
    def _reduction(self, sparsity: np.ndarray) -> float:
        pruner = self.inner._require_state().pruner
        keep = np.minimum(pruner.keep_counts(np.clip(sparsity, 0.0, 1.0)), self.original_channels)
        return float(self.inner.reduction(keep, metric=self.metric))

    def _best_case(self, index: int, a: float) -> float:
        s = self._sparsity.copy()
        s[index] = a
        s[index + 1:] = self.max_sparsity
        return self._reduction(s)

    def wall(self, a: float) -> float:
        """The FLOPs wall: the smallest sparsity >= ``a`` for the current group such that the budget is still
        reachable with every later group at ``max_sparsity`` (bisection on the analytic plan cost)."""
        i = self._index
        if self._best_case(i, a) >= self.target:
            return a
        lo, hi = a, self.max_sparsity
        if self._best_case(i, hi) < self.target:
            return hi  # unreachable even at max: the inner env's mapping settles the rest
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if self._best_case(i, mid) >= self.target else (mid, hi)
        return hi

    def _observation(self) -> np.ndarray:
        i = min(self._index, self.n_groups - 1)
        macs = np.asarray(self.inner._require_state().group_macs, dtype=np.float64)
        share = macs / max(macs.sum(), 1e-12)
        removed = self._reduction(self._sparsity) if self._index > 0 else 0.0
        obs = np.array([i / max(self.n_groups - 1, 1), self.original_channels[i] / self.original_channels.max(),
                        self._kernel[i], self._stride[i], share[i], removed, max(self.target - removed, 0.0),
                        self._prev / self.max_sparsity], dtype=np.float32)
        return np.clip(obs, 0.0, 1.0)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None) -> Tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.inner.reset(seed=seed, options=options)
        self._index, self._prev, self._clipped = 0, 0.0, 0
        self._sparsity = np.zeros(self.n_groups)
        return self._observation(), {"group": self.group_names[0]}

    def step(self, action: Any) -> Tuple[np.ndarray, float, bool, bool, Dict[str, Any]]:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (1,) or not np.all(np.isfinite(a)):
            raise ValueError(f"action must be one finite sparsity (shape (1,)), got {action!r}")
        if self._index >= self.n_groups:
            raise RuntimeError("the episode is over; call reset()")
        asked = float(np.clip(a[0], 0.0, self.max_sparsity))
        taken = self.wall(asked)
        self._clipped += int(taken > asked)
        self._sparsity[self._index] = taken
        self._prev = taken
        self._index += 1
        info: Dict[str, Any] = {"step": self._index, "asked": asked, "sparsity": taken, "wall_clipped": taken > asked}
        if self._index < self.n_groups:
            info["reward"] = 0.0  # nothing evaluated before the last group (a monitor's other columns: NaN)
            return self._observation(), 0.0, False, False, info
        _, reward, terminated, truncated, inner_info = self.inner.step(self._sparsity.astype(np.float32))
        info.update(inner_info)
        info["step"] = self._index  # the group steps, not the inner env's single step
        info["layer_sparsity"] = self._sparsity.copy()
        info["wall_clips"] = self._clipped
        info.setdefault("budget_missed", bool(truncated))
        self._index = self.n_groups
        obs = np.zeros(len(LAYER_FEATURES), dtype=np.float32)
        return obs, float(reward), bool(terminated), bool(truncated), info

    def close(self) -> None:
        self.inner.close()


__all__ = ["LayerwisePruneEnv", "LAYER_FEATURES", "INNER_ATTRS"]
