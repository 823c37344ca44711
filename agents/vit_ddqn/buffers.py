"""Replay memory of the AgentViT agents: a bounded list of transitions with the notebook's random eviction
(or FIFO), sampled uniformly without replacement.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional

import torch

EVICTION_RULES = ("random", "fifo")


@dataclass
class Transition:
    """One reward step: per-image states before (B, N) and after (B, N), the scalar reward, and for the
    double-DQN mode the batch-shared keep-mask (N,) that was applied and the episode end flag."""

    state: torch.Tensor
    next_state: torch.Tensor
    reward: float
    action: Optional[torch.Tensor] = None
    done: bool = False


class ReplayBuffer:
    """Bounded transition memory.

    :param capacity: transitions held (the notebook: 64).
    :param eviction: ``"random"`` (the notebook: a uniformly random old transition is dropped when full) or
        ``"fifo"`` (the oldest is dropped).
    :param seed: seed of the buffer's own random generator (eviction and sampling).
    """

    def __init__(self, capacity: int = 64, eviction: str = "random", seed: Optional[int] = None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if eviction not in EVICTION_RULES:
            raise ValueError(f"eviction={eviction!r}; expected one of {EVICTION_RULES}")
        self.capacity = int(capacity)
        self.eviction = eviction
        self.rng = random.Random(seed)
        self.memory: List[Transition] = []

    def __len__(self) -> int:
        return len(self.memory)

    def push(self, transition: Transition) -> Optional[Transition]:
        """Store ``transition``; return the evicted one when the buffer was full, else None."""
        evicted = None
        if len(self.memory) >= self.capacity:
            index = self.rng.randrange(len(self.memory)) if self.eviction == "random" else 0
            evicted = self.memory.pop(index)
        self.memory.append(transition)
        return evicted

    def sample(self, n: int) -> List[Transition]:
        """``n`` distinct transitions drawn uniformly (``random.sample``, as the notebook)."""
        if n > len(self.memory):
            raise ValueError(f"cannot sample {n} transitions from a buffer holding {len(self.memory)}")
        return self.rng.sample(self.memory, n)
