"""Q-networks of the AgentViT agents: the notebook's MLP over the per-patch state (64-1024-256-64) and
its double-DQN variant with a (drop, keep) value pair per patch.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class QNetwork(nn.Module):
    """MLP from the per-image state (N,) to ``N * values_per_patch`` outputs.

    ``values_per_patch=1`` is the notebook's network (one "Q-value" per patch, used as a score);
    ``values_per_patch=2`` gives Q(s, j, drop) and Q(s, j, keep) for every patch j (double-DQN mode).

    :param n_patches: N, the state and action size.
    :param hidden: hidden widths (the notebook: 1024, 256).
    :param values_per_patch: 1 or 2.
    """

    def __init__(self, n_patches: int, hidden: Sequence[int] = (1024, 256), values_per_patch: int = 1):
        super().__init__()
        if values_per_patch not in (1, 2):
            raise ValueError(f"values_per_patch must be 1 or 2, got {values_per_patch}")
        self.n_patches = int(n_patches)
        self.values_per_patch = int(values_per_patch)
        layers, width = [], self.n_patches
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, self.n_patches * self.values_per_patch))
        self.net = nn.Sequential(*layers)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """(M, N) states to (M, N) values, or (M, N, 2) [drop, keep] values."""
        out = self.net(states)
        if self.values_per_patch == 2:
            out = out.view(states.shape[0], self.n_patches, 2)
        return out
