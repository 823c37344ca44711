"""Pure budget arithmetic of the pruning env: distributions to per-group channel counts (RL-Pruner's count
matching, spec §2.4), the authors' channel sparsity, cumulative per-step goals and monotone bisection.

Nothing here touches torch; every function works on NumPy arrays indexed by prunable group.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _as_counts(layer_counts: ArrayLike, n: int) -> np.ndarray:
    counts = np.asarray(layer_counts, dtype=np.int64).reshape(-1)
    if counts.shape != (n,):
        raise ValueError(f"layer_counts must have one entry per group ({n}), got shape {counts.shape}")
    if np.any(counts < 1):
        raise ValueError(f"layer_counts must be >= 1 for every group, got {counts.tolist()}")
    return counts


def normalize_distribution(action: ArrayLike, eligible: Optional[ArrayLike] = None) -> np.ndarray:
    """Turn a non-negative action into a pruning distribution over groups (sums to 1).

    Negative entries are clipped to 0 and ineligible groups (e.g. already at their channel floor, the
    authors' ``adjust_PD`` zeroing) get 0. An all-zero result falls back to uniform over the eligible groups;
    with no eligible group at all the result is all zeros.

    :param action: one entry per group.
    :param eligible: boolean mask of groups that may still lose channels (all when None).
    """
    a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), 0.0, None)
    mask = np.ones_like(a, dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool).reshape(-1)
    if mask.shape != a.shape:
        raise ValueError(f"eligible mask has shape {mask.shape}, expected {a.shape}")
    a = np.where(mask, a, 0.0)
    total = a.sum()
    if total <= 0:
        if not mask.any():
            return np.zeros_like(a)
        a = mask.astype(np.float64)
        total = a.sum()
    return a / total


def charged(counts: ArrayLike, layer_counts: ArrayLike) -> int:
    """Budget used by per-group removal ``counts``: each member layer of a group is charged (spec §2.4.4).

    :param counts: channels removed from each group's shared tensor.
    :param layer_counts: prunable layers per group.
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    return int((_as_counts(layer_counts, c.size) * c).sum())


def distribution_to_counts(dist: ArrayLike, layer_counts: ArrayLike, budget: int,
                           max_remove: Optional[ArrayLike] = None) -> np.ndarray:
    """RL-Pruner's count matching (spec §2.4): split ``budget`` layer-channels by a group distribution.

    Each member layer of group g gets probability ``p_g = dist_g / layer_counts_g`` and count
    ``c_g = round(p_g · M')`` (half to even, as ``torch.round``); the group is charged ``layer_counts_g · c_g``.
    If the charge differs from ``budget`` (M), ``M' = M±1, M±2, …`` is tried in the direction that reduces the
    error until the error changes sign (or vanishes); the ``M'`` with the charge closest to M is kept (the first
    one on ties). Finally each count is floored by ``max_remove`` (a group never loses its last channels).

    :param dist: group distribution (non-negative; normally sums to 1, a smaller sum is absorbed by M').
    :param layer_counts: prunable layers per group.
    :param budget: M, layer-channels to remove (counted per layer, the authors' ``filter_num`` unit).
    :param max_remove: per-group upper bound on the count (current channels minus the floor).
    :return: channels to remove from each group, int64.
    """
    p = np.asarray(dist, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"dist must be finite and non-negative, got {p.tolist()}")
    k = _as_counts(layer_counts, p.size)
    budget = int(budget)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    p = p / k

    def counts_for(m: int) -> Tuple[np.ndarray, int]:
        c = np.rint(p * m).astype(np.int64)
        return c, int((k * c).sum())

    counts, total = counts_for(budget)
    if budget > 0 and total != budget and p.sum() > 0:
        best_err, best_counts = abs(budget - total), counts
        start_sign = np.sign(budget - total)
        step = 1 if total < budget else -1
        # the charge grows with M' at rate sum(k·p); give the search room for a distribution summing below 1
        limit = int(np.ceil(2 * budget / max(float((k * p).sum()), 1e-12))) + 2
        m = budget
        while True:
            m += step
            if m < 0 or m > limit:
                break
            c, t = counts_for(m)
            err = budget - t
            if abs(err) < best_err:
                best_err, best_counts = abs(err), c
            if err == 0 or np.sign(err) != start_sign:
                break
        counts = best_counts
    if max_remove is not None:
        cap = np.asarray(max_remove, dtype=np.int64).reshape(-1)
        if cap.shape != counts.shape:
            raise ValueError(f"max_remove must have one entry per group ({counts.size}), got shape {cap.shape}")
        counts = np.minimum(counts, np.maximum(cap, 0))
    return counts


def channel_sparsity(current: ArrayLike, original: ArrayLike, layer_counts: ArrayLike) -> float:
    """The authors' sparsity: fraction of output channels/neurons removed, counting every member layer.

    :param current: current channels per group.
    :param original: original channels per group.
    :param layer_counts: prunable layers per group.
    """
    cur = np.asarray(current, dtype=np.int64).reshape(-1)
    orig = np.asarray(original, dtype=np.int64).reshape(-1)
    if cur.shape != orig.shape:
        raise ValueError(f"current {cur.shape} and original {orig.shape} channel vectors differ in shape")
    k = _as_counts(layer_counts, cur.size)
    total = int((k * orig).sum())
    return 0.0 if total == 0 else 1.0 - float((k * cur).sum()) / total


def filter_num(original: ArrayLike, layer_counts: ArrayLike) -> int:
    """``Σ_i d_i`` over prunable layers (spec §2.1): original channels counted once per member layer."""
    orig = np.asarray(original, dtype=np.int64).reshape(-1)
    return int((_as_counts(layer_counts, orig.size) * orig).sum())


def step_channel_budget(original: ArrayLike, layer_counts: ArrayLike, target: float, n_steps: int) -> int:
    """The authors' fixed per-step budget ``M = int(filter_num × target / n_steps)`` (spec §2.1).

    :param target: overall fraction of layer-channels to remove.
    :param n_steps: pruning steps of an episode.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    return int(filter_num(original, layer_counts) * target / n_steps)


def cumulative_goal(target: float, step: int, n_steps: int) -> float:
    """Reduction that should be reached after ``step`` of ``n_steps`` steps: ``target · step / n_steps``.

    :param step: 1-based index of the step being taken (capped at ``n_steps``).
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    return float(target) * min(max(step, 0), n_steps) / n_steps


def bisect_increasing(fn: Callable[[float], float], goal: float, lo: float, hi: float, iters: int = 40,
                      integer: bool = False, tol: float = 0.0) -> Tuple[float, float]:
    """Argument of a non-decreasing step function ``fn`` whose value is closest to ``goal`` on ``[lo, hi]``.

    Bisection brackets the smallest argument reaching ``goal``; the bracket ends are then compared and the
    closer one wins (ties go to the lower end, so a budget is never overshot without reason). Values of
    ``fn`` are cached, so an expensive ``fn`` is evaluated at most ``iters + 2`` times.

    :param fn: e.g. the FLOPs reduction as a function of an action scale or of a channel budget.
    :param goal: value to reach.
    :param lo: lower end (``fn(lo)`` is typically 0).
    :param hi: upper end (the largest allowed argument).
    :param iters: bisection steps for real arguments (integer search stops when the bracket closes).
    :param integer: search integers only.
    :param tol: stop once the bracket is at most this wide (real arguments).
    :return: ``(argument, fn(argument))``.
    """
    cache = {}

    def f(x):
        if x not in cache:
            cache[x] = float(fn(x))
        return cache[x]

    if integer:
        lo, hi = int(lo), int(hi)
    if hi < lo:
        raise ValueError(f"empty search interval [{lo}, {hi}]")
    if f(hi) <= goal:
        return hi, f(hi)
    if f(lo) >= goal:
        return lo, f(lo)
    a, b = lo, hi  # invariant: f(a) < goal <= f(b)
    for _ in range(iters if not integer else 64):
        if (integer and b - a <= 1) or (not integer and b - a <= tol):
            break
        mid = (a + b) // 2 if integer else 0.5 * (a + b)
        if f(mid) >= goal:
            b = mid
        else:
            a = mid
    return (a, f(a)) if goal - f(a) <= f(b) - goal else (b, f(b))


__all__ = ["normalize_distribution", "distribution_to_counts", "charged", "channel_sparsity", "filter_num",
           "step_channel_budget", "cumulative_goal", "bisect_increasing"]
