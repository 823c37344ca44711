"""The RL-Pruner "policy": a pruning distribution (PD) over prunable groups, with the authors' action noise,
lambda step, PPO-style ratio clip, epsilon schedule and top-K replay buffer as small pure NumPy functions (spec §2).

Everything here works on group-level vectors (one entry per prunable group; coupled layers share one value,
which is the authors' cluster equalisation). Nothing touches torch or the environment.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import numpy as np

#: ``RL_PROBABILITY_LOWER_BOUND`` of the authors: floor of every entry after noise or an update
PROBABILITY_LOWER_BOUND = 1e-5
#: value written over zero entries of the old PD before the PPO ratio is taken (authors: in place, 1e-6)
RATIO_ZERO_FILL = 1e-6
EXPLORE_STRATEGIES = ("constant", "linear", "cosine")


def adjust_distribution(pd: Sequence[float], eligible: Optional[Sequence[bool]] = None) -> np.ndarray:
    """The authors' ``adjust_PD`` at group level: normalise to sum 1, then zero the ineligible groups.

    Groups at their channel floor (authors: conv layers with ``out_channels <= 1``) get 0. As in the authors'
    code the vector is **not** renormalised after the zeroing (spec §2.2.4); the env's count matching
    absorbs the missing mass.

    :param pd: non-negative weights, one per group.
    :param eligible: boolean mask of groups that may still lose channels (all when None).
    """
    p = np.asarray(pd, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"a pruning distribution must be finite and non-negative, got {p.tolist()}")
    total = p.sum()
    p = p / total if total > 0 else np.full_like(p, 1.0 / max(p.size, 1))
    if eligible is not None:
        mask = np.asarray(eligible, dtype=bool).reshape(-1)
        if mask.shape != p.shape:
            raise ValueError(f"eligible mask has shape {mask.shape}, expected {p.shape}")
        p = np.where(mask, p, 0.0)
    return p


def initial_distribution(channels: Sequence[int], layer_counts: Sequence[int],
                         eligible: Optional[Sequence[bool]] = None) -> np.ndarray:
    """Width-proportional PD (spec §2.2): ``PD_g ∝ layer_counts_g · channels_g``.

    The authors give every prunable layer ``d_i / filter_num``; a group of ``k`` coupled layers of width ``d``
    therefore holds ``k·d / filter_num`` in total, which is what the env's count matching expects.

    :param channels: widths the PD is proportional to (original widths at the start, current widths when the
        collapse guard resets the PD).
    :param layer_counts: prunable layers per group.
    :param eligible: groups that may still lose channels.
    """
    c = np.asarray(channels, dtype=np.float64).reshape(-1)
    k = np.asarray(layer_counts, dtype=np.float64).reshape(-1)
    if c.shape != k.shape:
        raise ValueError(f"channels {c.shape} and layer_counts {k.shape} must have one entry per group")
    return adjust_distribution(c * k, eligible)


def sample_action(pd: np.ndarray, rng: np.random.Generator, noise_var: float = 0.04,
                  eligible: Optional[Sequence[bool]] = None,
                  lower_bound: float = PROBABILITY_LOWER_BOUND,
                  noise_scale: Optional[Sequence[float]] = None) -> np.ndarray:
    """One noisy action (spec §2.3): ``a = PD + σ·u·s·ξ``, floored at ``lower_bound``, normalised, adjusted.

    ``ξ ~ N(0, I)`` has one entry per **group** and ``u ~ U(0, 1)`` is one scalar per sample. ``noise_var`` is,
    as in the authors' code, a standard-deviation multiplier. The authors draw ``ξ`` per *layer* and average
    it over a cluster of ``k`` coupled layers, so a group's total moves by ``σ·u·√k·N(0, 1)``:
    ``noise_scale = √layer_counts`` reproduces that exactly (up to the per-layer floor); None means 1 for
    every group (the same for single-layer groups).

    :param pd: current pruning distribution.
    :param rng: the agent's generator (draw order: ``ξ`` then ``u``).
    :param noise_var: σ.
    :param eligible: groups that may still lose channels.
    :param lower_bound: floor after adding the noise.
    :param noise_scale: per-group multiplier ``s`` of the noise.
    """
    pd = np.asarray(pd, dtype=np.float64)
    xi = rng.standard_normal(pd.shape)
    u = rng.random()
    if noise_scale is not None:
        xi = xi * np.asarray(noise_scale, dtype=np.float64).reshape(pd.shape)
    a = np.maximum(pd + noise_var * u * xi, lower_bound)
    return adjust_distribution(a / a.sum(), eligible)


def update_distribution(pd: np.ndarray, best_action: np.ndarray, step_length: float = 0.1, ppo: bool = True,
                        ppo_clip: float = 0.25, eligible: Optional[Sequence[bool]] = None,
                        lower_bound: float = PROBABILITY_LOWER_BOUND,
                        zero_fill: float = RATIO_ZERO_FILL) -> np.ndarray:
    """The policy update (spec §2.8): a λ step toward the best buffered action, then the PPO-style ratio clip.

    1. ``PD' = adjust(max(PD + λ (a* − PD), lower_bound))``;
    2. with ``ppo``: ``ρ = PD' / PD`` (zeros of the old PD read as ``zero_fill``),
       ``PD'' = adjust(max(clip(ρ, 1 − ε, 1 + ε) · PD, lower_bound))``.

    :param pd: current PD (not modified).
    :param best_action: ``a*``, the highest-Q action of the replay buffer.
    :param step_length: λ.
    :param ppo: apply the ratio clip (the authors' CLI cannot switch it off).
    :param ppo_clip: ε of the clip.
    :param eligible: groups that may still lose channels.
    """
    old = np.asarray(pd, dtype=np.float64).copy()
    a = np.asarray(best_action, dtype=np.float64)
    if a.shape != old.shape:
        raise ValueError(f"best_action has shape {a.shape}, the PD has {old.shape}")
    new = adjust_distribution(np.maximum(old + step_length * (a - old), lower_bound), eligible)
    if not ppo:
        return new
    old[old == 0] = zero_fill
    ratio = np.clip(new / old, 1.0 - ppo_clip, 1.0 + ppo_clip)
    return adjust_distribution(np.maximum(ratio * old, lower_bound), eligible)


def epsilon_at(t: int, total_steps: int, epsilon0: float = 0.4, strategy: str = "cosine",
               explore_fraction: float = 0.1) -> float:
    """Exploration rate after ``t`` pruning steps (spec §2.9): decays over the first ``explore_fraction·T``.

    ``cosine``: ``ε0·½(1 + cos(π t / T10))``; ``linear``: ``ε0 (1 − t / T10)``; ``constant``: ``ε0``; all three
    are 0 once ``t > T10`` (for ``constant`` that is the authors' code, probably an oversight). ``t = 0``
    always gives ``ε0``: the first step explores.

    :param t: steps completed.
    :param total_steps: T, the steps of the run.
    :param epsilon0: ε0.
    :param strategy: ``"constant"``, ``"linear"`` or ``"cosine"``.
    :param explore_fraction: share of the run with exploration (authors: 0.1).
    """
    if strategy not in EXPLORE_STRATEGIES:
        raise ValueError(f"explore_strategy must be one of {EXPLORE_STRATEGIES}, got {strategy!r}")
    horizon = explore_fraction * total_steps
    if t <= 0:
        return float(epsilon0)
    if t > horizon:
        return 0.0
    if strategy == "cosine":
        return float(epsilon0 * 0.5 * (1.0 + math.cos(math.pi * t / horizon)))
    if strategy == "linear":
        return float(epsilon0 * (1.0 - t / horizon))
    return float(epsilon0)


@dataclass
class BufferEntry:
    """One candidate: its Q value, its (noisy, normalised) action and whatever the caller keeps with it."""

    q: float
    action: np.ndarray
    payload: Any = None


@dataclass
class TopKBuffer:
    """The authors' replay buffer (spec §2.6): the best ``capacity`` candidates of the current pruning step.

    A candidate enters when its Q is at least the smallest Q held, overwriting that row (the first row on ties,
    as ``argmin``). Free rows are filled first: the authors start from all-zero Q rows, which is the same for
    the non-negative rewards they use, but would silently reject negative Q values.
    """

    capacity: int
    entries: List[BufferEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        if int(self.capacity) < 1:
            raise ValueError(f"buffer capacity (sample_num) must be >= 1, got {self.capacity}")
        self.capacity = int(self.capacity)

    def __len__(self) -> int:
        return len(self.entries)

    def offer(self, q: float, action: np.ndarray, payload: Any = None) -> bool:
        """Insert a candidate if it belongs in the top K; returns whether it entered."""
        entry = BufferEntry(float(q), np.asarray(action, dtype=np.float64).copy(), payload)
        if len(self.entries) < self.capacity:
            self.entries.append(entry)
            return True
        qs = np.array([e.q for e in self.entries])
        worst = int(np.argmin(qs))
        if entry.q >= qs[worst]:
            self.entries[worst] = entry
            return True
        return False

    def best(self) -> BufferEntry:
        """The highest-Q entry (the first one on ties)."""
        if not self.entries:
            raise RuntimeError("the replay buffer is empty")
        return self.entries[int(np.argmax([e.q for e in self.entries]))]

    def clear(self) -> None:
        """Drop every entry (the authors' ``clear_cache`` at the end of a pruning step)."""
        self.entries.clear()


__all__ = ["adjust_distribution", "initial_distribution", "sample_action", "update_distribution", "epsilon_at",
           "TopKBuffer", "BufferEntry", "PROBABILITY_LOWER_BOUND", "RATIO_ZERO_FILL", "EXPLORE_STRATEGIES"]
