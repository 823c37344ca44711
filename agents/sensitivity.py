"""Per-layer sensitivity analysis (Li et al. 2017, "Pruning Filters for Efficient ConvNets"):
prune each group alone at several ratios, score each candidate with the env's reward estimator, then allocate
per-group sparsities that meet the budget, the least sensitive groups pruned most.

Every probe is one evaluation of the env's one scoring path (``PruneEnv.evaluate_keep`` through the agent's
:class:`~agents.common.monitor.PruneMonitor`), so the probes count against the same ``budget`` as every other
agent's look-aheads; the episode's steps cost one evaluation each on top. The ratio grid is derived from the budget:
``(budget - n_steps) // n_groups`` ratios per group (an explicit grid longer than that is thinned, and the run's
summary says so); a budget that cannot pay one ratio per group is refused.

``allocation="threshold"`` is Li et al.'s own reading instead, automated: one accuracy-drop threshold for all
groups, each pruned to its largest grid ratio within it, the smallest threshold whose allocation meets the target.

The allocation (where this differs from the paper; ``docs/agents.md``): Li et al. read the curves by hand, skip the
sensitive layers and prune the others at one ratio. Here a greedy exchange over the measured curves decides: from
the unpruned model, repeatedly move the group whose next grid ratio costs the least accuracy (monotone envelope of
its measured drop) per unit of the budget metric it saves (the env's analytic reduction of the joint kept vector,
so layer interactions in MACs are counted), until the episode's target is met. The env's budget mapping then scales
the allocation to each step's goal exactly.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from agents.common.base import BasePruningAgent
from agents.heuristics import _to_action

#: ratios per group of a derived grid when there is no budget (Li et al.'s curves: 10 % ... 90 %)
DEFAULT_RATIOS = 9
#: the allocation rules over the measured curves
ALLOCATIONS = ("greedy", "threshold")


def derived_grid(n: int, max_ratio: float) -> np.ndarray:
    """``n`` evenly spaced pruning ratios ``max_ratio * i / n`` (i = 1..n)."""
    return max_ratio * np.arange(1, n + 1, dtype=np.float64) / n


def thin_grid(ratios: np.ndarray, n: int) -> np.ndarray:
    """``n`` of the sorted ``ratios``, evenly spread by index and always including the largest (9 -> 3: the 3rd,
    6th and 9th)."""
    if n >= len(ratios):
        return np.asarray(ratios, dtype=np.float64).copy()
    idx = np.round(np.arange(1, n + 1) * len(ratios) / n).astype(int) - 1
    return np.asarray(ratios, dtype=np.float64)[idx]


class SensitivityPruner(BasePruningAgent):
    """Li et al.'s per-layer sensitivity analysis as an agent: probes at the first step, a greedy allocation of the
    measured curves to the episode's target, then each step sends the allocation's share of its goal.

    :param env: a ``PruneEnv`` with a budget (``budget="flops"`` etc., or distribution mode).
    :param ratios: the pruning ratios probed per group (each in (0, 1), at most the env's ``max_step_sparsity`` in
        sparsity mode); None derives ``n_ratios`` evenly spaced ratios up to ``max_ratio``.
    :param n_ratios: size of a derived grid; None: as many as the budget pays for (``DEFAULT_RATIOS`` without one).
    :param max_ratio: largest ratio of a derived grid.
    :param allocation: ``"greedy"`` (default: least accuracy drop per unit of the budget metric saved) or
        ``"threshold"`` (Li et al.'s reading of the curves, automated: every group pruned to its largest ratio whose
        drop stays within one threshold, the smallest threshold that meets the target).
    :param seed: seeds ``env.reset`` (the analysis draws nothing at random).
    """

    _init_keys = BasePruningAgent._init_keys + ("ratios", "n_ratios", "max_ratio", "allocation")

    def __init__(self, env: Any = None, ratios: Optional[Sequence[float]] = None, n_ratios: Optional[int] = None,
                 max_ratio: float = 0.9, allocation: str = "greedy", seed: Optional[int] = None, verbose: int = 0,
                 tensorboard_log: Optional[Union[str, Path]] = None) -> None:
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        self.allocation = allocation
        if ratios is not None:
            r = np.asarray(ratios, dtype=np.float64).reshape(-1)
            if r.size == 0 or not np.all(np.isfinite(r)) or np.any(r <= 0) or np.any(r >= 1) \
                    or np.any(np.diff(np.sort(r)) == 0):
                raise ValueError(f"ratios must be distinct numbers in (0, 1), got {list(ratios)}")
            ratios = [float(x) for x in np.sort(r)]
        if n_ratios is not None and (isinstance(n_ratios, bool) or int(n_ratios) != n_ratios or n_ratios < 1):
            raise ValueError(f"n_ratios must be None or an integer >= 1, got {n_ratios!r}")
        if not 0.0 < float(max_ratio) < 1.0:
            raise ValueError(f"max_ratio must be in (0, 1), got {max_ratio}")
        self.ratios = ratios
        self.n_ratios = None if n_ratios is None else int(n_ratios)
        self.max_ratio = float(max_ratio)
        self._analysis: Optional[Dict[str, Any]] = None
        self.budget_schedule: Optional[str] = None
        super().__init__(env, seed=seed, verbose=verbose, tensorboard_log=tensorboard_log)
        if env is not None:
            self.budget_schedule = self.grid()[1]

    _progress = False

    def learn(self, *args: Any, progress_bar: bool = False, **kwargs: Any) -> "SensitivityPruner":
        """:meth:`BasePruningAgent.learn`; ``progress_bar`` also shows a bar over the sensitivity probes."""
        self._progress = bool(progress_bar)
        try:
            return super().learn(*args, progress_bar=progress_bar, **kwargs)
        finally:
            self._progress = False

    # ------------------------------------------------------------------ the grid the budget pays for
    def grid(self, budget: Optional[int] = None, warn: bool = True) -> Tuple[np.ndarray, str]:
        """The ratios probed per group and a one-line account of the evaluations, for the env's budget.

        :param budget: evaluations available from the episode's start (default: the monitor's
            ``max_evaluations``; None: no budget).
        :param warn: warn when an explicit grid is thinned to fit.
        :raises ValueError: the budget cannot pay one ratio per group plus the episode's steps.
        """
        env = self.penv
        if budget is None:
            budget = getattr(self.env, "max_evaluations", None)
        groups, steps = int(env.n_groups), int(env.n_steps)
        asked = (np.asarray(self.ratios) if self.ratios is not None else
                 derived_grid(self.n_ratios or DEFAULT_RATIOS, self.max_ratio))
        if budget is None:
            grid, note = asked, "no budget"
        else:
            fits = (int(budget) - steps) // groups
            if fits < 1:
                raise ValueError(f"budget: {budget} evaluations cannot pay the sensitivity analysis: one ratio for "
                                 f"each of the {groups} groups plus the episode's {steps} steps needs "
                                 f"{groups + steps}; raise the budget")
            if self.ratios is None and self.n_ratios is None:
                grid, note = derived_grid(fits, self.max_ratio), f"derived from budget {budget}"
            elif fits < len(asked):
                grid = thin_grid(asked, fits)
                note = f"grid reduced from {len(asked)} to {len(grid)} ratios to fit budget {budget}"
                if warn:
                    warnings.warn(f"sensitivity: {note}", stacklevel=3)
            else:
                grid, note = asked, f"of budget {budget}"
        if env.action_mode == "sparsity" and grid.max() > env.max_step_sparsity + 1e-12:
            raise ValueError(f"ratios go up to {grid.max():g}, above the env's max_step_sparsity "
                             f"{env.max_step_sparsity:g}: lower max_ratio / ratios or raise max_step_sparsity")
        text = (f"{groups} groups x {len(grid)} ratio{'s' if len(grid) != 1 else ''} ({', '.join(f'{r:.3g}' for r in grid)}) = "
                f"{groups * len(grid)} sensitivity probes at most (identical kept counts scored once) + {steps} "
                f"steps = {groups * len(grid) + steps} evaluations, {note}")
        return grid, text

    # ------------------------------------------------------------------ the analysis
    @property
    def analysis(self) -> Optional[Dict[str, Any]]:
        """The measured curves and the allocation (None before the first step): ``ratios``, ``keep`` (group x
        ratio kept channels), ``accuracy`` (group x ratio), ``base_accuracy``, ``levels`` (grid index per group,
        -1 = unpruned), ``sparsity`` (allocated fraction removed per group), ``reduction`` (its budget-metric
        reduction), ``goal`` and ``met``."""
        return self._analysis

    def analyse(self) -> Dict[str, Any]:
        """Probe every group alone at every ratio of the unpruned model (the first step), then allocate.

        Each distinct kept vector is one evaluation through the monitor (its budget is enforced there); a ratio
        whose rounding keeps the whole group needs none (the unpruned model's score).
        """
        from tqdm.auto import tqdm

        env = self.penv
        if env.budget is None:
            raise ValueError("the sensitivity agent needs an env with a budget (budget='flops', 'params', 'channels' "
                             "or 'latency', or action_mode='distribution') to allocate for")
        pruner = env.pruner
        if pruner is None or env.step_index != 0:
            raise RuntimeError("the sensitivity analysis probes the unpruned model: reset the env first")
        # what is left of the budget pays for the probes and the episode's steps
        grid, _ = self.grid(self.env.evaluations_left, warn=False)
        current = np.asarray(env.current_channels, dtype=np.int64)
        base = float(env.original_accuracy)  # the unpruned model's score (the env's, not an evaluation)
        n, m = int(env.n_groups), len(grid)
        keep = np.zeros((n, m), dtype=np.int64)
        for g in range(n):
            for i, r in enumerate(grid):
                s = np.zeros(n)
                s[g] = r
                keep[g, i] = min(int(pruner.keep_counts(s)[g]), int(current[g]))
        accuracy = np.full((n, m), np.nan)
        todo = [(g, i) for g in range(n) for i in range(m)]
        seen: Dict[Tuple[int, int], float] = {}
        bar = tqdm(total=len(todo), desc="sensitivity", unit="probe", disable=not self._progress, leave=False,
                   dynamic_ncols=True)
        try:
            for g, i in todo:
                k = int(keep[g, i])
                if k >= current[g]:
                    accuracy[g, i] = base
                elif (g, k) in seen:
                    accuracy[g, i] = seen[(g, k)]
                else:
                    probe = current.copy()
                    probe[g] = k
                    _, info = self.env.evaluate_keep(probe)
                    accuracy[g, i] = seen[(g, k)] = float(info["accuracy"])
                bar.update(1)
        finally:
            bar.close()
        self._analysis = {"ratios": grid.copy(), "keep": keep, "accuracy": accuracy, "base_accuracy": base,
                          "current": current.copy(), **self._allocate(keep, accuracy, base, current)}
        return self._analysis

    def _allocate(self, keep: np.ndarray, accuracy: np.ndarray, base: float, current: np.ndarray) -> Dict[str, Any]:
        """Grid levels per group meeting the target, by the ``allocation`` rule over the curves (module docstring)."""
        env = self.penv
        n, m = keep.shape
        # drop at level l (0 = unpruned, l = grid index + 1), made non-decreasing: pruning more is never cheaper
        drop = np.maximum.accumulate(np.concatenate([np.zeros((n, 1)), np.maximum(0.0, base - accuracy)], axis=1),
                                     axis=1)
        options = np.concatenate([current[:, None], keep], axis=1)
        goal = float(env.target)

        def kept(lv: np.ndarray) -> np.ndarray:
            return options[np.arange(n), lv]

        threshold = None
        if self.allocation == "threshold":
            # the drop allowed per group: the smallest of the measured drops whose levels meet the target
            for threshold in np.unique(drop):
                level = (drop <= threshold).sum(axis=1) - 1  # the envelope is non-decreasing: a prefix
                reduction = env.reduction(kept(level))
                if reduction >= goal - 1e-12:
                    break
            threshold = float(threshold)
        else:
            level = np.zeros(n, dtype=np.int64)
            reduction = env.reduction(kept(level))
            while reduction < goal - 1e-12:
                best = None
                for g in np.flatnonzero(level < m):
                    lv = level.copy()
                    lv[g] += 1
                    red = env.reduction(kept(lv))
                    gain, cost = red - reduction, drop[g, lv[g]] - drop[g, level[g]]
                    # least accuracy per unit saved; ties: the larger saving, then the lower group
                    key = (0, cost / gain, -gain, g) if gain > 0 else (1, cost, 0.0, g)
                    if best is None or key < best[0]:
                        best = (key, g, red)
                if best is None:
                    break
                _, g, reduction = best
                level[g] += 1
        k = kept(level)
        return {"levels": level - 1, "sparsity": 1.0 - k / np.asarray(env.original_channels, dtype=np.float64),
                "reduction": float(reduction), "goal": goal, "met": bool(reduction >= goal - 1e-12),
                "threshold": threshold}

    # ------------------------------------------------------------------ acting
    def _choose_action(self, obs: np.ndarray) -> Tuple[np.ndarray, Dict[str, Any]]:
        if self._analysis is None:
            self.analyse()
        action, _ = self.predict(obs)
        a = self._analysis
        return action, {"allocation_reduction": a["reduction"], "allocation_met": float(a["met"])}

    def predict(self, observation: Any = None, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> Tuple[np.ndarray, Any]:
        """The allocation's action for the env's current step: each group is cut towards
        ``original * (1 - sparsity * t / n_steps)`` after step t (the env scales it to the step's goal)."""
        if self._analysis is None:
            raise RuntimeError("the sensitivity agent has no allocation yet: call learn() (it probes first)")
        env = self.penv
        t = (int(env.step_index) + 1) / int(env.n_steps)
        want = np.asarray(env.original_channels, dtype=np.float64) * (1.0 - self._analysis["sparsity"] * t)
        current = np.asarray(env.current_channels, dtype=np.float64)
        removed = np.clip(1.0 - want / np.maximum(current, 1.0), 0.0, 1.0)
        if env.action_mode == "sparsity":
            removed = np.minimum(removed, env.max_step_sparsity)
        return _to_action(env, removed), state

    # ------------------------------------------------------------------ persistence
    def _extra_state(self) -> Dict[str, Any]:
        if self._analysis is None:
            return {}
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self._analysis.items()}

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        self._analysis = dict(state) if state else None


__all__ = ["SensitivityPruner", "derived_grid", "thin_grid", "DEFAULT_RATIOS", "ALLOCATIONS"]
