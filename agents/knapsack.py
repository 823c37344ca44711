"""Greedy knapsack channel allocation in the spirit of HALP: remove the channel steps with the least importance per
unit of cost saved (predicted latency, or MACs) until a budget is met.

A pure function over a ``Pruner`` (its groups, cached per-channel importance and widths) and a cost function of kept
counts; it builds no model. ``pruner.plan(keep=result.keep)`` then picks the channels (the least important go).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

__all__ = ["KnapsackResult", "knapsack_keep", "macs_cost"]

#: A cost of kept channels: a matrix ``(m, n_groups)`` of candidates in, ``(m,)`` costs out (``LatencyModel.predict``
#: is one; :func:`macs_cost` wraps a pruner's analytic MACs).
CostFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class KnapsackResult:
    """What :func:`knapsack_keep` chose.

    :ivar keep: kept channels per group.
    :ivar cost: the cost at ``keep``.
    :ivar budget: the budget it was asked to meet.
    :ivar met: whether ``cost <= budget`` (false when even the narrowest allowed widths cost more).
    :ivar steps: channel steps removed, in order, as group indices.
    """

    keep: np.ndarray
    cost: float
    budget: float
    met: bool
    steps: List[int]


def macs_cost(pruner: Any) -> CostFn:
    """The analytic MACs of ``pruner``'s model at kept counts, as a :data:`CostFn`.

    :param pruner: a ``pruning_env.pruning.Pruner``.
    """
    def cost(keep: np.ndarray) -> np.ndarray:
        rows = np.atleast_2d(np.asarray(keep, dtype=np.int64))
        return np.array([pruner.costs.evaluate(k)[0] for k in rows], dtype=np.float64)

    return cost


def knapsack_keep(pruner: Any, cost: CostFn, budget: float, importance: Optional[Sequence[np.ndarray]] = None,
                  round_to: Optional[int] = None, min_channels: Optional[int] = None, normalize: str = "mean",
                  keep: Optional[Sequence[int]] = None) -> KnapsackResult:
    """Kept channels per group that meet ``cost(keep) <= budget``, removing the cheapest importance first.

    Each move removes one step (``lcm(round_to, granularity)`` channels, so kept counts stay hardware-friendly
    multiples) from one group: the group whose next step loses the least importance per unit of cost it saves
    (``cost`` evaluated for every group's candidate at once). Steps that save nothing only go when no step saves
    anything, the least important first. Removal stops as soon as the budget is met, so a tighter budget continues the
    same sequence: kept counts never grow when the budget shrinks.

    :param pruner: the ``Pruner`` whose groups are allocated (its widths are the start, unless ``keep`` is given).
    :param cost: cost of kept counts, vectorised over rows (see :data:`CostFn`).
    :param budget: the cost to meet (same unit as ``cost``: seconds for a latency model, MACs for :func:`macs_cost`).
    :param importance: per-channel scores per group (higher = more important); default ``pruner.importance``.
    :param round_to: channels per step (default ``pruner.round_to``); a group's first step first rounds its width down
        to a multiple.
    :param min_channels: floor per group (default ``pruner.min_channels``, rounded up to a whole step).
    :param normalize: ``"mean"`` divides each group's scores by their mean (groups compete on one scale, as global
        Taylor pruning does), ``"none"`` uses them as they are.
    :param keep: start from these kept counts instead of the pruner's widths (the least important channels are
        taken as already removed).
    """
    scores_in = pruner.importance if importance is None else importance
    if scores_in is None:
        raise RuntimeError("the pruner has no importance scores: call pruner.compute_importance(...) first or pass "
                           "`importance`")
    n = pruner.n_groups
    if len(scores_in) != n:
        raise ValueError(f"importance must have one score array per group ({n}), got {len(scores_in)}")
    if normalize not in ("mean", "none"):
        raise ValueError(f"normalize must be 'mean' or 'none', got {normalize!r}")
    if not np.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget}")
    width = pruner.num_channels.astype(np.int64)
    gran = pruner.granularity.astype(np.int64)
    r = int(pruner.round_to if round_to is None else round_to)
    floor_channels = int(pruner.min_channels if min_channels is None else min_channels)
    if r < 1 or floor_channels < 1:
        raise ValueError(f"round_to and min_channels must be >= 1, got {r}, {floor_channels}")
    step = np.lcm(gran, r).astype(np.int64)
    floor = np.maximum(step, -(-floor_channels // step) * step)
    floor = np.minimum(floor, width)  # a group narrower than one step stays as it is
    cumulative = []  # per group: running sum of its units' scores, least important unit first
    for g, sc in enumerate(scores_in):
        sc = np.abs(np.asarray(sc, dtype=np.float64)).copy()
        if sc.shape != (width[g],):
            raise ValueError(f"importance of group {g} ({pruner.groups[g].name!r}) must have {width[g]} scores, got "
                             f"shape {sc.shape}")
        sc[~np.isfinite(sc)] = 0.0
        if normalize == "mean":
            sc = sc / max(float(sc.mean()), 1e-12)
        units = np.sort(sc.reshape(-1, gran[g]).sum(1))  # whole blocks, ranked as Pruner.plan ranks them
        cumulative.append(np.concatenate([[0.0], np.cumsum(units)]))
    k = width.copy() if keep is None else np.asarray(keep, dtype=np.int64).copy()
    if k.shape != (n,) or np.any(k < 1) or np.any(k > width) or np.any(k % gran):
        raise ValueError(f"keep must give 1..width channels (whole blocks of the granularity) for each of the {n} "
                         f"groups, got {k}")

    def next_keep(g: int) -> int:
        rem = int(k[g] % step[g])  # a width off the step grid first drops to the multiple below
        return int(k[g] - (rem if rem else step[g]))

    def loss(g: int, new: int) -> float:
        c = cumulative[g]
        return float(c[(width[g] - new) // gran[g]] - c[(width[g] - k[g]) // gran[g]])

    current = float(np.asarray(cost(k[None]))[0])
    steps: List[int] = []
    while current > budget:
        movable = [g for g in range(n) if next_keep(g) >= floor[g]]
        if not movable:
            break
        cands = np.repeat(k[None], len(movable), axis=0)
        for row, g in enumerate(movable):
            cands[row, g] = next_keep(g)
        costs = np.asarray(cost(cands), dtype=np.float64)
        saved = current - costs
        lost = np.array([loss(g, int(cands[row, g])) for row, g in enumerate(movable)])
        if np.any(saved > 0):
            ratio = np.where(saved > 0, lost / np.where(saved > 0, saved, 1.0), np.inf)
            pick = int(np.argmin(ratio))
        else:
            pick = int(np.argmin(lost))
        g = movable[pick]
        k[g] = cands[pick, g]
        current = float(costs[pick])
        steps.append(g)
    return KnapsackResult(keep=k, cost=current, budget=float(budget), met=bool(current <= budget), steps=steps)


# --------------------------------------------------------------------------------------------------------------
# The agent: knapsack_keep on the env's state, cost and budget
# --------------------------------------------------------------------------------------------------------------
from agents.common.base import BasePruningAgent  # noqa: E402  (the allocation above needs no agent machinery)
from agents.heuristics import _to_action  # noqa: E402


class LatencyKnapsackPruner(BasePruningAgent):
    """HALP-style greedy knapsack as an agent: each step keeps what :func:`knapsack_keep` chooses with the env's
    importance scores and the env's own budget metric as the cost (predicted latency with ``budget="latency"``,
    MACs with ``budget="flops"``, params, channels), so the same agent serves latency and MACs budgets.

    The cost of kept counts is ``1 - env.reduction(keep)`` (the fraction of the original model left in the budget
    metric, the env's one budget mapping; each move's candidates go to ``env.reduction`` as one matrix, so a latency
    budget costs one call of the latency model per move) and the budget is ``1 - goal`` of the step; the action is the removed
    fraction of each group, which the env's budget mapping then meets exactly.

    :param env: a ``PruneEnv`` with a budget; its importance criterion (Taylor by default) is used.
    :param normalize: ``"mean"`` (groups' scores on one scale, as global Taylor) or ``"none"``.
    """

    _init_keys = BasePruningAgent._init_keys + ("normalize",)

    def __init__(self, env: Any = None, normalize: str = "mean", seed: Optional[int] = None, verbose: int = 0,
                 tensorboard_log: Any = None) -> None:
        if normalize not in ("mean", "none"):
            raise ValueError(f"normalize must be 'mean' or 'none', got {normalize!r}")
        self.normalize = normalize
        super().__init__(env, seed=seed, verbose=verbose, tensorboard_log=tensorboard_log)

    def _choose_action(self, obs: np.ndarray):
        action, _ = self.predict(obs)
        return action, {"knapsack_met": self._met}

    _met = False

    def predict(self, observation: Any = None, state: Any = None, episode_start: Any = None,
                deterministic: bool = True):
        """The knapsack action for the env's current state."""
        env, pruner, goal = self._next_step()
        if env.budget is None:
            raise ValueError("the knapsack agent needs an env with a budget (budget='latency', 'flops', ...)")
        metric = env.budget

        def cost(keep: np.ndarray) -> np.ndarray:  # every candidate at once (latency: one call of the table)
            return 1.0 - env.reduction(np.atleast_2d(np.asarray(keep, dtype=np.int64)), metric=metric)

        result = knapsack_keep(pruner, cost, 1.0 - goal, normalize=self.normalize)
        self._met = bool(result.met)
        current = np.asarray(env.current_channels, dtype=np.float64)
        return _to_action(env, 1.0 - result.keep / np.maximum(current, 1.0)), state


__all__ += ["LatencyKnapsackPruner"]
