"""Non-learning patch policies with the agents' surface, used as baselines of the joint training:
all patches (the plain ViT) and random masks (a random k-subset, or the notebook's mean-thresholded noise).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from agents.vit_ddqn.base import PatchAgent
from pruning_env.envs.patch_env import mean_threshold_mask, random_topk_mask


class AllPatches(PatchAgent):
    """Keeps every patch: training through the env is then plain ViT training (plus the state pass)."""

    def mask_for_states(self, states: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        return torch.ones(self.n_patches, dtype=torch.bool, device=self.device)


class RandomPatches(PatchAgent):
    """A fresh random mask per batch, ignoring the state.

    :param env: the patch env (or None with ``n_patches``).
    :param n_keep: kept count of ``rule="topk"`` (default: the env's n_keep).
    :param rule: ``"topk"`` (exactly n_keep random patches) or ``"mean"`` (U[0,1)^N thresholded at its mean,
        the notebook's random action, about N/2 kept).
    :param seed: seeds the draws.
    """

    _init_keys = PatchAgent._init_keys + ("rule",)

    def __init__(self, env=None, n_keep: Optional[int] = None, rule: str = "topk", n_patches: Optional[int] = None,
                 device: Union[str, torch.device, None] = None, seed: Optional[int] = None):
        if rule not in ("topk", "mean"):
            raise ValueError(f"rule={rule!r}; expected 'topk' or 'mean'")
        super().__init__(env=env, n_patches=n_patches, n_keep=n_keep, device=device, seed=seed)
        self.rule = rule

    def mask_for_states(self, states: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        if self.rule == "mean":
            return mean_threshold_mask(torch.rand(self.n_patches, generator=self.generator)).to(self.device)
        return random_topk_mask(self.n_patches, self.n_keep, self.generator, self.device)
