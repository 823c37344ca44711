"""Pure budget arithmetic of the pruning env: the action -> kept-channels mapping (:func:`keep_for_action`), the
metrics a budget is met in (:class:`ReductionMeter`), distributions to per-group channel counts (RL-Pruner's count
matching, spec §2.4), the authors' channel sparsity, cumulative per-step goals and monotone bisection.

Nothing here touches torch or an env; every function works on NumPy arrays indexed by prunable group, and costs
come in as functions (a pruner's analytic ``plan_cost``, or any other cost model).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from pruning_env.costs import Cost, Reductions, reductions
from pruning_env.envs.actions import real_action

ArrayLike = Sequence[float] | np.ndarray
#: what a budget or an episode target is measured in: a field of ``Reductions``, or the authors' channel sparsity
METRICS = ("flops", "channels", "params", "latency")
#: what an action means (:func:`keep_for_action`): per-group sparsity, or the authors' pruning distribution
ACTION_MODES = ("sparsity", "distribution")


def _as_counts(layer_counts: ArrayLike, n: int, what: str = "layer_counts") -> np.ndarray:
    counts = np.asarray(layer_counts, dtype=np.int64).reshape(-1)
    if counts.shape != (n,):
        raise ValueError(f"{what} must have one entry per group ({n}), got shape {counts.shape}")
    if np.any(counts < 1):
        raise ValueError(f"{what} must be >= 1 for every group, got {counts.tolist()}")
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


def channel_floor(keep_counts: Callable[[np.ndarray], np.ndarray], current: ArrayLike,
                  max_sparsity: Optional[float] = None) -> np.ndarray:
    """Kept channels per group with every group pruned to its floor (``keep_counts`` at sparsity 1), never above
    ``current``: the most a state can still remove. With ``max_sparsity`` the floor of one step that removes at
    most that fraction of each group (``keep_counts`` at that sparsity, never below the sparsity-1 floor).

    :param keep_counts: sparsity per group -> kept channels per group (a pruner's ``keep_counts``).
    :param current: channels per group now.
    :param max_sparsity: largest fraction of a group one step removes, in (0, 1); None: no bound.
    """
    cur = np.asarray(current, dtype=np.int64).reshape(-1)
    floor = np.asarray(keep_counts(np.ones(cur.size)), dtype=np.int64)
    if max_sparsity is not None:
        floor = np.maximum(floor, np.asarray(keep_counts(np.full(cur.size, float(max_sparsity))), dtype=np.int64))
    return np.minimum(floor, cur)


def refuse_unreachable_target(reduction: Callable[[np.ndarray], float], floor: np.ndarray, target: float,
                              tolerance: float, metric: str, limits: str) -> None:
    """A ``ValueError`` when even ``floor`` (every group at its channel floor) reduces ``metric`` by less than
    ``target - tolerance``: a budget that no episode can meet, refused before any episode.

    :param reduction: kept channels -> cumulative reduction in ``metric`` (:meth:`ReductionMeter.function`).
    :param floor: kept channels with every group at its floor (:func:`channel_floor`).
    :param limits: the settings that set the floor, in words (named in the message).
    """
    most = reduction(floor)
    if most < target - tolerance:
        raise ValueError(f"target={target:g} ({metric} reduction) is unreachable: with {limits} every group at its "
                         f"floor removes only {most:.4f}; lower target to at most {most:.4f} or lower min_channels / "
                         f"round_to")


def exact_keep(keep: Any, current: ArrayLike, built: Callable[[np.ndarray], Sequence[int]], limits: str,
               caller: str = "keep") -> np.ndarray:
    """``keep`` checked as kept channels to use as they are (no budget mapping): whole counts in [1, current width]
    per group that a plan keeps exactly; int64, or a ``ValueError`` saying what is wrong.

    :param keep: kept channels per group (array, list, tensor).
    :param current: channels per group now.
    :param built: kept channels -> the channels a plan of them keeps, e.g.
        ``lambda k: [len(i) for i in pruner.plan(keep=k).kept]``.
    :param limits: what sets the buildable counts, in words (named in the message).
    :param caller: what is checked, prefixed to a shape or value error (e.g. ``"evaluate_keep"``).
    """
    cur = np.asarray(current, dtype=np.int64).reshape(-1)
    try:
        k = real_action(keep, cur.size, f"shape ({cur.size},): kept channels per group", entries="groups")
    except ValueError as err:
        raise ValueError(f"{caller}: {err}") from err
    if np.any(k != np.round(k)) or np.any(k < 1) or np.any(k > cur):
        raise ValueError(f"keep must hold whole channel counts in [1, current width] per group; got "
                         f"{k.tolist()} for widths {cur.tolist()}")
    k = k.astype(np.int64)
    got = np.asarray(built(k), dtype=np.int64)
    if not np.array_equal(got, k):
        raise ValueError(f"keep {k.tolist()} cannot be built as it is ({limits}): the plan keeps {got.tolist()}")
    return k


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


@dataclass(frozen=True)
class StepKeep:
    """What one action does at one state: kept channels per group and how the step's budget was met.

    :ivar keep: channels each group keeps after the step (int64, never above the current widths).
    :ivar budget: the step's budget knob: the action scale (sparsity mode) or M, layer-channels removed
        (distribution mode); 1.0 without a budget.
    :ivar goal: the cumulative reduction the step aims at (None without a budget).
    :ivar reached: the budget metric's reduction of ``keep`` (None without a budget).
    :ivar reachable: False when no action could reach ``goal`` from this state (every group at its floor or at
        ``max_step_sparsity`` / ``distribution_max_sparsity`` falls short); the reached value is then the most this
        step can remove.
    """

    keep: np.ndarray
    budget: float
    goal: Optional[float] = None
    reached: Optional[float] = None
    reachable: bool = True


@dataclass(frozen=True)
class ReductionMeter:
    """How much of the original model a kept vector removes, in each of :data:`METRICS`: the cost side of the
    budget mapping. A metric that is a field of :class:`~pruning_env.costs.Reductions` is read from the kept
    vector's cost; ``channels`` needs no cost.

    :ivar original: the original model's cost.
    :ivar original_channels: its channels per group.
    :ivar layer_counts: prunable layers per group.
    """

    original: Cost
    original_channels: np.ndarray
    layer_counts: np.ndarray
    #: predicted seconds per forward pass of a kept vector (``LatencyModel.predict``); None without a latency model
    latency: Optional[Callable[[np.ndarray], float]] = None

    def reductions(self, cost: Cost) -> Reductions:
        """The fractions of the original cost that ``cost`` removes."""
        return reductions(cost, self.original)

    def value(self, metric: str, keep: np.ndarray, r: Optional[Reductions]) -> float:
        """The reduction in ``metric`` of a kept vector whose cost reductions are ``r`` (None for ``channels``).

        :param metric: one of :data:`METRICS`.
        :param keep: channels per group.
        :param r: the kept vector's reductions.
        """
        if metric == "channels":
            return channel_sparsity(keep, self.original_channels, self.layer_counts)
        if metric == "latency":
            return self.latency_reduction(keep)
        return float(getattr(r, metric))

    @cached_property
    def original_latency(self) -> float:
        """Predicted seconds per forward pass of the original model (predicted once)."""
        if self.latency is None:
            raise ValueError("the latency metric needs a latency model (target_metric/budget 'latency' or gamma != 0)")
        return float(self.latency(np.asarray(self.original_channels, dtype=np.int64)))

    def latency_reduction(self, keep: np.ndarray) -> Union[float, np.ndarray]:
        """``1 - latency(keep) / latency(original)``, predicted by the latency model.

        :param keep: channels per group (a float comes back), or a matrix ``(m, n_groups)`` of such rows (an array
            ``(m,)``, from one call of the latency model).
        """
        if self.latency is None:
            raise ValueError("the latency metric needs a latency model (target_metric/budget 'latency' or gamma != 0)")
        k = np.asarray(keep, dtype=np.int64)
        if k.ndim == 2:
            return 1.0 - np.asarray(self.latency(k), dtype=np.float64).reshape(len(k)) / self.original_latency
        return 1.0 - float(self.latency(k)) / self.original_latency

    def function(self, metric: str, cost_of: Callable[[np.ndarray], Cost]) -> Callable[[np.ndarray], float]:
        """``keep -> reduction in metric``, the function :func:`keep_for_action` meets a budget with.

        :param metric: one of :data:`METRICS`.
        :param cost_of: the cost of a kept vector, e.g. ``lambda keep: pruner.plan_cost(keep=keep)`` (analytic).
        """
        if metric in ("channels", "latency"):  # no cost needed: skip the analytic plan cost
            return lambda keep: self.value(metric, keep, None)
        return lambda keep: self.value(metric, keep, self.reductions(cost_of(keep)))

    def values(self, metric: str, keeps: np.ndarray, cost_of: Callable[[np.ndarray], Cost]) -> np.ndarray:
        """The reductions in ``metric`` of every row of ``keeps``, as :meth:`function` gives them one at a time
        (latency: one call of the latency model for all rows).

        :param metric: one of :data:`METRICS`.
        :param keeps: a matrix ``(m, n_groups)`` of kept vectors.
        :param cost_of: the cost of one kept vector (as for :meth:`function`).
        """
        rows = np.asarray(keeps, dtype=np.int64)
        if rows.ndim != 2 or rows.shape[1] != len(self.original_channels):
            raise ValueError(f"keeps must be a matrix with one column per group ({len(self.original_channels)}), "
                             f"got shape {rows.shape}")
        if metric == "latency":
            return np.asarray(self.latency_reduction(rows), dtype=np.float64)
        one = self.function(metric, cost_of)
        return np.array([one(k) for k in rows], dtype=np.float64)

    def report(self, keep: np.ndarray, cost: Cost, r: Reductions, metric: str) -> Dict[str, Any]:
        """The cost part of an env info for a kept vector: absolute cost, ratios and reductions, the authors'
        channel sparsity, per-group sparsity and kept channels, and ``target_progress`` in ``metric``.

        :param keep: channels per group.
        :param cost: its cost.
        :param r: its reductions.
        :param metric: the episode's metric.
        """
        keep = np.asarray(keep, dtype=np.int64)
        extra = {} if self.latency is None else {"predicted_latency": float(self.latency(keep)),
                                                 "latency_reduction": self.latency_reduction(keep)}
        return {**extra, "macs": int(cost.macs), "params": int(cost.params), "macs_ratio": 1.0 - r.flops,
                "params_ratio": 1.0 - r.params, "flops_reduction": r.flops, "params_reduction": r.params,
                "channel_sparsity": channel_sparsity(keep, self.original_channels, self.layer_counts),
                "group_sparsity": 1.0 - keep / self.original_channels, "kept_channels": keep.copy(),
                "target_progress": self.value(metric, keep, r)}


def keep_for_action(action: ArrayLike, action_mode: str, current: ArrayLike, layer_counts: ArrayLike,
                    keep_counts: Callable[[np.ndarray], np.ndarray],
                    reduction: Optional[Callable[[np.ndarray], float]] = None, goal: Optional[float] = None,
                    max_step_sparsity: float = 0.9, granularity: Optional[ArrayLike] = None,
                    distribution_max_sparsity: Optional[float] = None) -> StepKeep:
    """Kept channels per group for a validated action: the env's whole action -> budget mapping.

    * ``"sparsity"``: entry g is the fraction of group g's current channels to remove, clipped to
      ``[0, max_step_sparsity]``. With a budget the vector is rescaled by one scalar (bisection) so the
      step's ``reduction`` is closest to ``goal``; an all-zero action counts as uniform; when the named
      groups cannot carry the goal at ``max_step_sparsity`` every group is raised to a common sparsity floor.
    * ``"distribution"``: the action (clipped at 0, groups at their floor zeroed, normalised) splits a budget
      of M layer-channels with :func:`distribution_to_counts`; M is found by bisection so the step's
      ``reduction`` is closest to ``goal``. When the distribution's groups all reach their floor short of the
      goal, the remaining groups are pruned uniformly, as little as needed. ``distribution_max_sparsity`` moves
      each group's floor up to what removing that fraction of it keeps (AMC's per-layer bound; None: down to the
      ``min_channels`` floor, the authors').

    :param action: finite values, one per group.
    :param action_mode: ``"sparsity"`` or ``"distribution"``.
    :param current: current channels per group.
    :param layer_counts: prunable layers per group (the charge of one removed channel).
    :param keep_counts: the pruner's rule from a per-group sparsity vector (fractions of the current widths)
        to kept channels (its ``min_channels`` floor and ``round_to`` rounding included).
    :param reduction: cumulative reduction of the budget metric for a kept vector (None: no budget, only in
        sparsity mode); must not decrease as fewer channels are kept.
    :param goal: cumulative reduction the step must reach (with ``reduction``).
    :param max_step_sparsity: largest fraction of a group removed in one step (sparsity mode).
    :param granularity: channels each group removes together (grouped convs: channels per conv group; default
        1): distribution-mode removals are counted in whole blocks, so the costed kept vector is the one built.
    :param distribution_max_sparsity: largest fraction of a group removed in one step (distribution mode), in
        (0, 1); None: no bound beyond the channel floor.
    """
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    cur = np.asarray(current, dtype=np.int64).reshape(-1)
    counts = _as_counts(layer_counts, cur.size)
    if a.shape != cur.shape:
        raise ValueError(f"action has {a.size} entries, expected one per group ({cur.size})")
    if (reduction is None) != (goal is None):
        raise ValueError("pass both `reduction` and `goal` (a budgeted step) or neither (budget-free)")
    if action_mode not in ACTION_MODES:
        raise ValueError(f"action_mode must be one of {ACTION_MODES}, got {action_mode!r}")
    if distribution_max_sparsity is not None and not 0.0 < distribution_max_sparsity < 1.0:
        raise ValueError(f"distribution_max_sparsity must be in (0, 1) or None, got {distribution_max_sparsity!r}")

    def kept(sparsity: np.ndarray) -> np.ndarray:
        return np.minimum(np.asarray(keep_counts(sparsity), dtype=np.int64), cur)

    if reduction is None:
        if action_mode == "distribution":
            raise ValueError("distribution mode always has a budget: pass `reduction` and `goal`")
        return StepKeep(kept(np.clip(a, 0.0, max_step_sparsity)), 1.0)

    seen: Dict[bytes, float] = {}

    def reached(keep: np.ndarray) -> float:
        # many scales give the same kept counts: cost each distinct plan once
        key = keep.tobytes()
        if key not in seen:
            seen[key] = float(reduction(keep))
        return seen[key]

    def result(keep: np.ndarray, knob: float, best: np.ndarray) -> StepKeep:
        return StepKeep(keep, float(knob), float(goal), reached(keep), reached(best) >= goal - 1e-9)

    if action_mode == "sparsity":
        s = np.clip(a, 0.0, max_step_sparsity)
        # entries a trillion times below the largest name no group (and would overflow the scale bracket)
        s = np.where(s > s.max() * 1e-12, s, 0.0)
        if not np.any(s > 0):
            s = np.full(cur.size, max_step_sparsity)
        hi = max_step_sparsity / float(s[s > 0].min())

        def keep_at(scale: float) -> np.ndarray:
            return kept(np.clip(scale * s, 0.0, max_step_sparsity))

        # below this bracket width no group's removed count can move by more than 1/100 of a channel
        tol = 1e-2 / max(float((s * cur).max()), 1e-12)
        scale, _ = bisect_increasing(lambda x: reached(keep_at(x)), goal, 0.0, hi, iters=60, tol=tol)
        if reached(keep_at(scale)) >= goal - 1e-9 or scale < hi:
            return result(keep_at(scale), scale, keep_at(hi))
        # the groups the action names are all at max_step_sparsity and the goal is still out of reach:
        # raise every group's sparsity to a common floor, as little as needed, instead of missing the budget
        top = np.clip(hi * s, 0.0, max_step_sparsity)

        def keep_floor(f: float) -> np.ndarray:
            return kept(np.maximum(top, f))

        tol = 1e-2 / max(float(cur.max()), 1.0)
        f, _ = bisect_increasing(lambda x: reached(keep_floor(x)), goal, 0.0, max_step_sparsity, iters=60, tol=tol)
        return result(keep_floor(f), hi, keep_floor(max_step_sparsity))

    floor = channel_floor(kept, cur, distribution_max_sparsity)
    max_remove = cur - floor
    dist = normalize_distribution(np.clip(a, 0.0, None), eligible=max_remove > 0)
    block = np.ones(cur.size, dtype=np.int64) if granularity is None else _as_counts(granularity, cur.size, "granularity")

    def removed_by(d: np.ndarray, m: int, cap: np.ndarray) -> np.ndarray:
        # whole blocks only (down: removals never exceed what the budget M pays for)
        return distribution_to_counts(d, counts, m, cap) // block * block

    def keep_for_budget(m: int) -> np.ndarray:
        return cur - removed_by(dist, m, max_remove)

    # the M at which every group the distribution names reaches its floor (rounding half-way included)
    named = (dist > 0) & (max_remove > 0)
    saturate = 0
    if named.any():
        saturate = int(min(np.ceil(((max_remove[named] + 1) * counts[named] / dist[named]).max()), 2 ** 40))
    m, _ = bisect_increasing(lambda x: reached(keep_for_budget(int(x))), goal, 0, saturate, integer=True)
    if reached(keep_for_budget(int(m))) >= goal - 1e-9 or int(m) < saturate:
        return result(keep_for_budget(int(m)), m, keep_for_budget(saturate))
    # the named groups are all at their floor short of the goal: prune the others uniformly, as little as needed
    base = removed_by(dist, saturate, max_remove)
    rest_cap = max_remove - base
    rest = normalize_distribution(np.ones(cur.size), eligible=rest_cap > 0)

    def keep_rest(m2: int) -> np.ndarray:
        return cur - base - removed_by(rest, m2, rest_cap)

    rest_hi = charged(rest_cap, counts) * 2 + int(counts.max()) * cur.size
    m2, _ = bisect_increasing(lambda x: reached(keep_rest(int(x))), goal, 0, rest_hi, integer=True)
    return result(keep_rest(int(m2)), saturate + charged(cur - keep_rest(int(m2)) - base, counts),
                  keep_rest(rest_hi))


__all__ = ["keep_for_action", "StepKeep", "ReductionMeter", "METRICS", "ACTION_MODES", "normalize_distribution",
           "distribution_to_counts", "charged",
           "channel_sparsity", "filter_num", "step_channel_budget", "cumulative_goal", "bisect_increasing", "channel_floor",
           "refuse_unreachable_target", "exact_keep"]
