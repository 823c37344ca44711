"""AgentViT's patch-selection environment: one step is one ViT training batch on the patches the agent keeps.

Observation = the per-patch state of the batch (spec §1.2); action = per-patch scores or a keep-mask; reward =
loss_weight * L0/Lt + patch_weight * (-|k - k*| / z*) (spec §2.4). An episode is one joint training run.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Optional, Tuple, Union

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces

from pruning_env.data import DatasetSplits, make_datasets, make_loader
from pruning_env.envs.actions import real_action
from pruning_env.envs.config import ConfigAttribute, PatchEnvConfig
# the ids live in the light registration module (this one pulls in torchvision); re-exported for old imports
from pruning_env.envs.registration import PATCH_ENV_IDS, register_patch_envs
from pruning_env.envs.registration import PATCH_QUICKSTART_KWARGS as QUICKSTART_KWARGS
from pruning_env.runtime import TorchRNG, resolve_device, sync
from pruning_env.schema import merged
from pruning_env.training import warmup_cosine

#: bound of the "scores" action Box. Scores act only through their order and mean, and any finite score is
#: accepted (outside the bound too); the bound is finite so that samplers and SB3's checker can use the space.
SCORE_BOUND = 1e6


def mean_threshold_mask(scores: torch.Tensor) -> torch.Tensor:
    """The notebook's ``set_patches``: keep patch j when ``scores[j] >= mean(scores)`` (never empty).

    :param scores: (N,) per-patch scores.
    """
    return scores >= scores.mean()


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest-scoring patches (ties broken by index order of ``torch.topk``).

    :param scores: (N,) per-patch scores.
    :param k: number kept, 1..N.
    """
    n = scores.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores, k).indices] = True
    return mask


def random_topk_mask(n: int, k: int, generator: Optional[torch.Generator] = None,
                     device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """A uniformly random set of ``k`` of ``n`` patches as a bool mask (the random-mask baseline at count k).

    :param n: number of patches.
    :param k: number kept, 1..n.
    :param generator: CPU generator for repeatable draws.
    :param device: where the mask lives.
    """
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:k]] = True
    return mask.to(device)



class PatchSelectEnv(gym.Env):
    """Joint ViT training as a Gymnasium env: the agent picks which patches each training batch keeps.

    * **Episode** = one training run: ``reset()`` restores the ViT's initial weights and a fresh Adam
      (``options={"keep_model": True}`` continues from the current weights instead); it ends (terminated)
      after ``epochs`` passes over the training split, i.e. ``total_steps = epochs * batches_per_epoch``.
    * **Observation** = ``(batch_size, N)`` float32: for every image of the *next* batch, the mean over the
      embedding of block 1's attention output on all N patches (the authors' state). The same state as a
      tensor on the env's device is ``env.state``.
    * **Action**: ``action_mode="scores"`` is a ``Box(N,)`` of per-patch scores, binarised by ``binarize``
      (``"mean"``: keep scores >= their mean, the notebook's rule, count not controlled; ``"topk"``: keep the
      ``n_keep`` best); ``action_mode="mask"`` is a ``MultiBinary(N)`` keep-mask used as is (an all-zero mask
      keeps every patch, flagged ``info["empty_mask"]``). One mask is shared by the whole batch.
    * **Step** = one Adam step of the ViT on the current batch with only the kept tokens (dropped before
      block 1), then the state of the next batch.
    * **Reward**, on every ``reward_every``-th batch of an epoch (0 on the others, as in the notebook):
      ``loss_weight * L0 / Lt + patch_weight * (-|k - n_keep| / (N - n_keep))``, Lt the batch loss before the
      update and L0 the loss at the first reward step of the episode (``loss_reference="first_step"``: the
      very first step). On reward steps with ``same_batch_next_state`` the state of the same batch after the
      update is in ``info["next_state_same_batch"]`` (the notebook's s').
    * **Info**: ``kept``, ``loss``, ``step_time`` (synchronised seconds of the ViT step), ``state_time``
      (seconds of the state passes), both summed over the episode in ``env.train_time``/``env.state_time``,
      ``reward_step``, ``r_loss``, ``r_patch`` (reward steps), ``epoch`` (0-based), ``batch`` (1-based in the epoch),
      ``epoch_end``, ``global_step``, ``mask`` (np.bool_ array).

    **Settings** are the fields of :class:`~pruning_env.envs.config.PatchEnvConfig` (documented and checked
    there): pass a config, keyword arguments (as ``gym.make`` does), or both. **Randomness**: the env's torch work
    (weight init, augmentation, dropout, shuffling) draws from its own stream (seeded by ``seed`` and by
    ``reset(seed=...)``), never from or into the global RNGs of the program that uses it.

    :param config: the settings (default: ``PatchEnvConfig()``).
    :param kwargs: settings by name (override ``config``'s).
    """

    metadata = {"render_modes": []}
    # settings read from the config (agents and the trainer read them here)
    batch_size = ConfigAttribute()
    epochs = ConfigAttribute()
    lr = ConfigAttribute()
    optimizer_name = ConfigAttribute("optimizer")
    weight_decay = ConfigAttribute()
    lr_schedule = ConfigAttribute()
    warmup_epochs = ConfigAttribute()
    min_lr = ConfigAttribute()
    label_smoothing = ConfigAttribute()
    action_mode = ConfigAttribute()
    binarize = ConfigAttribute()
    n_keep = ConfigAttribute()
    loss_weight = ConfigAttribute()
    patch_weight = ConfigAttribute()
    reward_every = ConfigAttribute()
    loss_reference = ConfigAttribute()
    same_batch_next_state = ConfigAttribute()
    num_workers = ConfigAttribute()
    time_info = ConfigAttribute()
    observe = ConfigAttribute()
    seed = ConfigAttribute()

    def __init__(self, config: Optional[PatchEnvConfig] = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = cfg = merged(PatchEnvConfig, config, kwargs)
        self.device = resolve_device(cfg.device)
        seed = cfg.seed
        self.splits = cfg.dataset if isinstance(cfg.dataset, DatasetSplits) else make_datasets(
            cfg.dataset, root=cfg.data_root, download=cfg.download, val_size=cfg.val_size,
            seed=0 if seed is None else seed, augment=cfg.augment)
        model = cfg.model
        if isinstance(model, str):
            from pruning_env.models import create_model

            c, h, _ = self.splits.input_size
            with TorchRNG(seed) if seed is not None else contextlib.nullcontext():
                model = create_model(model, num_classes=self.splits.num_classes, width=cfg.width, depth=cfg.depth,
                                     image_size=h, channels=c, **(cfg.model_kwargs or {}))
        if not (hasattr(model, "patch_state") and hasattr(model, "num_patches")):
            raise TypeError(f"model must be a SimpleViT-like module with patch_state() and num_patches, "
                            f"got {type(model).__name__}")
        self.model = model.to(self.device)
        self.n_patches = int(model.num_patches)
        if not 1 <= self.n_keep <= self.n_patches:
            raise ValueError(f"n_keep must be in 1..{self.n_patches} (the model's patches), got {self.n_keep}")
        if len(self.splits.train) < self.batch_size:
            raise ValueError(f"batch_size={self.batch_size} exceeds the {len(self.splits.train)} training images")
        self.train_time = 0.0
        self.state_time = 0.0
        self._rng: Optional[TorchRNG] = None  # the torch stream of the current training run (set by reset)
        self._initial_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.batches_per_epoch = len(self.splits.train) // self.batch_size
        self.total_steps = self.epochs * self.batches_per_epoch

        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(self.batch_size, self.n_patches),
                                            dtype=np.float32)
        if self.action_mode == "scores":
            self.action_space = spaces.Box(-SCORE_BOUND, SCORE_BOUND, shape=(self.n_patches,), dtype=np.float32)
        else:
            self.action_space = spaces.MultiBinary(self.n_patches)

        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        self.state: Optional[torch.Tensor] = None
        self._loader = None
        self._iter = None
        self._batch: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.loss_ref: Optional[float] = None
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0

    # ------------------------------------------------------------------ helpers
    def action_to_mask(self, action: Any) -> torch.Tensor:
        """The bool keep-mask (N,) on the env's device that ``action`` stands for (see the class docstring).

        NaN / inf and complex entries, non-numbers and a wrong size raise ``ValueError`` in both action modes."""
        return self._keep_mask(action)[0]

    def _keep_mask(self, action: Any) -> Tuple[torch.Tensor, bool]:
        """The keep-mask and whether a mask action kept nothing (then every patch is kept)."""
        what = "one score" if self.action_mode == "scores" else "one keep flag (0 or 1)"
        values = real_action(action, self.n_patches, f"shape ({self.n_patches},): {what} per patch",
                             entries="patches")
        if self.action_mode == "mask":
            raw = np.asarray(action.detach().cpu() if hasattr(action, "detach") else action).reshape(-1)
            mask = torch.as_tensor(raw != 0 if raw.dtype.kind in "biu" else values > 0.5, device=self.device)
            return (mask, False) if bool(mask.any()) else (torch.ones_like(mask), True)
        a = torch.as_tensor(values, device=self.device).float()
        return (mean_threshold_mask(a) if self.binarize == "mean" else topk_mask(a, self.n_keep)), False

    def patch_reward(self, kept: int) -> float:
        """The patch-count term -|k - k*| / z* with z* = N - k* dropped patches wanted (unweighted)."""
        z_star = max(self.n_patches - self.n_keep, 1)
        return -abs(int(kept) - self.n_keep) / z_star

    def compute_state(self, x: torch.Tensor) -> torch.Tensor:
        """Per-patch state (B, N) of images ``x`` with the current ViT (no gradients; zeros if not ``observe``)."""
        if not self.observe:
            return torch.zeros(x.shape[0], self.n_patches, device=x.device)
        return self.model.patch_state(x)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """A fresh ViT optimiser (and, for the cosine schedule, ``self.scheduler``) for one training run."""
        if self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": self.weight_decay},
                      {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
            optimizer = torch.optim.AdamW(groups, lr=self.lr)
        self.scheduler = None
        if self.lr_schedule == "cosine":
            warmup = int(round(self.warmup_epochs * self.batches_per_epoch))
            self.scheduler = warmup_cosine(optimizer, self.total_steps, warmup, min_lr=self.min_lr)
        return optimizer

    def _new_epoch_iterator(self) -> None:
        self._iter = iter(self._loader)

    def _next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self._iter)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _timed_state(self, x: torch.Tensor) -> Tuple[torch.Tensor, float]:
        sync(self.device)
        t0 = time.perf_counter()
        state = self.compute_state(x)
        sync(self.device)
        return state, time.perf_counter() - t0

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        """Start a training run: initial ViT weights (unless ``options["keep_model"]``), fresh Adam, epoch 0.

        ``seed`` seeds the run's torch stream and data order (never the global RNGs), so a seeded reset repeats
        exactly.
        """
        # the first reset without a seed takes the constructor's; a later one draws its seed from np_random, so
        # reset(seed=s) then reset() repeats exactly
        if seed is None and self._np_random is None:
            seed = self.seed
        super().reset(seed=seed)
        options = options or {}
        data_seed = seed if seed is not None else int(self.np_random.integers(2**31 - 1))
        self._rng = TorchRNG(data_seed, self.device)
        with self._rng:
            return self._start_run(data_seed, keep_model=bool(options.get("keep_model", False)))

    def _start_run(self, data_seed: int, keep_model: bool) -> Tuple[np.ndarray, Dict[str, Any]]:
        if not keep_model:
            self.model.load_state_dict(self._initial_state)
        self.optimizer = self._make_optimizer()
        self._loader = make_loader(self.splits.train, batch_size=self.batch_size, shuffle=True, seed=data_seed,
                                   num_workers=self.num_workers, drop_last=True,
                                   pin_memory=self.device.type == "cuda")
        self._new_epoch_iterator()
        self.loss_ref = None
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self._batch = self._next_batch()
        self.state, state_time = self._timed_state(self._batch[0])
        self.train_time = 0.0
        self.state_time = state_time
        info = {"epoch": 0, "state_time": state_time} if self.time_info else {"epoch": 0}
        return self.state.cpu().numpy().astype(np.float32), info

    def step(self, action: Any):
        """One ViT training step on the current batch with the patches ``action`` keeps; see the class docstring."""
        if self._batch is None or self.optimizer is None:
            raise RuntimeError("call reset() before step()")
        if self.epoch >= self.epochs:
            raise RuntimeError("the training run is over (terminated); call reset()")
        mask, empty = self._keep_mask(action)
        with self._rng:
            return self._train_step(mask, empty)

    def _train_step(self, mask: torch.Tensor, empty: bool):
        kept = int(mask.sum())
        x, y = self._batch
        self.batch_in_epoch += 1
        self.global_step += 1

        self.model.train()
        sync(self.device)
        t0 = time.perf_counter()
        logits = self.model(x, keep=None if kept == self.n_patches else mask)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        sync(self.device)
        step_time = time.perf_counter() - t0

        reward_step = self.batch_in_epoch % self.reward_every == 0
        self.train_time += step_time
        info: Dict[str, Any] = {"kept": kept, "reward_step": reward_step,
                                "epoch": self.epoch, "batch": self.batch_in_epoch, "global_step": self.global_step,
                                "mask": mask.cpu().numpy().astype(bool), "empty_mask": empty}
        loss_value = float(loss.detach())
        info["loss"] = loss_value
        reward = 0.0
        if self.loss_reference == "first_step" and self.loss_ref is None:
            self.loss_ref = loss_value
        if reward_step:
            if self.loss_ref is None:
                self.loss_ref = loss_value
            r_loss = self.loss_ref / max(loss_value, 1e-12)
            r_patch = self.patch_reward(kept)
            reward = self.loss_weight * r_loss + self.patch_weight * r_patch
            info.update(r_loss=r_loss, r_patch=r_patch)
        state_time = 0.0
        if reward_step and self.same_batch_next_state:
            same, dt = self._timed_state(x)
            state_time += dt
            info["next_state_same_batch"] = same.cpu().numpy().astype(np.float32)

        epoch_end = self.batch_in_epoch == self.batches_per_epoch
        terminated = False
        if epoch_end:
            self.epoch += 1
            self.batch_in_epoch = 0
            terminated = self.epoch >= self.epochs
            if not terminated:
                self._new_epoch_iterator()
        if terminated:
            # no next batch: the terminal observation is the same batch after the update
            self.state, dt = self._timed_state(x)
        else:
            self._batch = self._next_batch()
            self.state, dt = self._timed_state(self._batch[0])
        state_time += dt
        self.state_time += state_time
        info["epoch_end"] = epoch_end
        if self.time_info:
            info.update(step_time=step_time, state_time=state_time)
        return self.state.cpu().numpy().astype(np.float32), float(reward), terminated, False, info

    def close(self) -> None:
        self._iter = None
        self._loader = None


__all__ = ["PatchSelectEnv", "mean_threshold_mask", "topk_mask", "random_topk_mask", "register_patch_envs",
           "PATCH_ENV_IDS", "QUICKSTART_KWARGS", "SCORE_BOUND"]
