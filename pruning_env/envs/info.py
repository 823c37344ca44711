"""The ``info`` dicts of :class:`~pruning_env.envs.prune_env.PruneEnv`: one layout for ``reset``, ``step`` and the
look-ahead (``evaluate_action``, ``evaluate_actions``, ``evaluate_keep``), assembled here so the env only says what
happened. ``docs/env.md`` lists the keys.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

from pruning_env.costs import Cost, Reductions
from pruning_env.envs.budget import ReductionMeter
from pruning_env.envs.scoring import Candidate


class InfoBuilder:
    """Builds an env's infos: accuracy and reward, the cost report of :meth:`ReductionMeter.report` in the episode's
    metric, the step and evaluation counters, and the timings (zero unless ``config.record_timings``: infos then
    repeat exactly, as Gymnasium's checker expects).

    :param meter: the env's reduction meter.
    :param config: the env's :class:`~pruning_env.envs.config.PruneEnvConfig` (``episode_metric``,
        ``record_timings``).
    :param refines: the scorer refines candidates (multi-fidelity): candidate infos say whether each was refined.
    """

    def __init__(self, meter: ReductionMeter, config: Any, refines: bool) -> None:
        self.meter, self.config, self.refines = meter, config, bool(refines)

    def state(self, accuracy: float, reward: float, cost: Cost, r: Reductions, keep: np.ndarray, step: int,
              counts: Tuple[int, int], time_prune: float = 0.0, time_importance: float = 0.0,
              time_eval: float = 0.0, **extra: Any) -> Dict[str, Any]:
        """The info of a state or candidate reached after ``step`` steps, keeping ``keep`` channels per group.

        :param counts: ``(n_evaluations, n_train_batches)`` of the episode so far.
        :param extra: further keys, appended in order (a ``time_recovery`` among them is zeroed like the others).
        """
        timing = self.config.record_timings
        times = {"time_prune": time_prune, "time_importance": time_importance, "time_eval": time_eval}
        if "time_recovery" in extra and not timing:
            extra["time_recovery"] = 0.0
        return {"accuracy": float(accuracy), "reward": float(reward),
                **self.meter.report(keep, cost, r, self.config.episode_metric), "step": int(step),
                "n_evaluations": int(counts[0]), "train_batches": int(counts[1]),
                **{k: float(v) if timing else 0.0 for k, v in times.items()}, **extra}

    def candidate(self, cand: Candidate, cached: bool, step: int, counts: Tuple[int, int],
                  **extra: Any) -> Dict[str, Any]:
        """The info of a step or look-ahead that produced ``cand`` (``cached``: reused from the state's cache, so
        it cost no surgery or estimate this time): the budget goal and whether it was missed, the refinement.

        :param step: the step it leads to (the state's step index + 1).
        :param counts: ``(n_evaluations, n_train_batches)`` of the episode after it.
        """
        if cand.step.goal is not None:
            extra.update(budget_goal=cand.step.goal, budget_missed=not cand.step.reachable)
        if self.refines:
            extra.update(refined=cand.refined, accuracy_cheap=cand.cheap_accuracy)
        return self.state(cand.accuracy, cand.reward, cand.cost, cand.reductions, cand.step.keep, step, counts,
                          0.0 if cached else cand.time_prune, extra.pop("time_importance", 0.0),
                          0.0 if cached else cand.time_eval, step_budget=cand.step.budget, cached=cached, **extra)


__all__ = ["InfoBuilder"]
