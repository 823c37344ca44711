"""The one recorder of every pruning agent, after SB3's ``Monitor``: a wrapper of :class:`PruneEnv` that writes
one row per pruning step, keeps the best finished episode and counts episodes and evaluated models.

:class:`PruneRecord` is what it writes into (plain data that outlives an env: saved with an agent, restored
by a run checkpoint); :class:`PruneMonitor` is the wrapper every agent, SB3 ones included, steps through.
"""
from __future__ import annotations

import inspect
import time
from typing import Any, Dict, List, Optional, Sequence

import gymnasium as gym
import numpy as np
from stable_baselines3.common.monitor import Monitor

#: info keys copied into every per-step row (NaN when the env does not give one)
STEP_KEYS = ("reward", "accuracy", "flops_reduction", "params_reduction", "channel_sparsity", "macs", "params")
#: info keys a history row carries when the env reports them: recovery, the step's budget goal in the episode's
#: metric and whether the budget mapping missed it, the latency model's prediction (``budget: latency`` envs)
OPTIONAL_STEP_KEYS = ("accuracy_recovered", "budget_goal", "budget_missed", "predicted_latency", "latency_reduction")


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _kept_indices(env: Any) -> Optional[List[List[int]]]:
    """The env's kept channel indices per group in the original model's numbering (``PruneEnv.kept_indices``), or
    None for an env that does not track them."""
    kept = getattr(env, "kept_indices", None)
    return None if kept is None else [[int(i) for i in k] for k in kept]


class EvaluationBudgetExhausted(RuntimeError):
    """A look-ahead went past the monitor's ``max_evaluations``."""


class PruneRecord:
    """What a :class:`PruneMonitor` has recorded, over all the episodes and envs it was attached to.

    ``history`` holds one row per pruning step; ``best`` is ``{"reward", "episode", "model", "info",
    "actions", "kept_indices"}`` of the best finished episode (None before one ends); ``episodes`` counts finished episodes;
    ``evaluations_done`` and ``train_batches_done`` count the models evaluated and the estimators' SGD batches
    (the env's ``n_train_batches``) in episodes that are no longer running.
    """

    def __init__(self) -> None:
        self.history: List[Dict[str, Any]] = []
        self.best: Optional[Dict[str, Any]] = None
        self.episodes = 0
        self.evaluations_done = 0
        self.train_batches_done = 0

    def state_dict(self, include_model: bool = False) -> Dict[str, Any]:
        """The record as plain data.

        :param include_model: keep the best episode's pruned model (run checkpoints do, agent files do not).
        """
        best = None
        if self.best is not None:
            best = {k: v for k, v in self.best.items() if include_model or k != "model"}
        return {"history": [dict(row) for row in self.history], "best": best, "episodes": self.episodes,
                "evaluations_done": self.evaluations_done, "train_batches_done": self.train_batches_done}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (in place: monitors sharing this record see it)."""
        self.history = [dict(row) for row in state["history"]]
        self.best = None if state["best"] is None else dict(state["best"])
        self.episodes = int(state["episodes"])
        self.evaluations_done = int(state["evaluations_done"])
        self.train_batches_done = int(state.get("train_batches_done", 0))  # absent in records saved before it


class RecordView:
    """Read access to a :class:`PruneRecord` held in ``self.record`` (monitors and agents both offer it)."""

    record: PruneRecord

    @property
    def history(self) -> List[Dict[str, Any]]:
        """One row per recorded pruning step (see :class:`PruneMonitor`)."""
        return self.record.history

    @property
    def best(self) -> Optional[Dict[str, Any]]:
        """The best finished episode: ``{"reward", "episode", "model", "info", "actions", "kept_indices"}``
        (``kept_indices``: per group, the kept channels in the original model's numbering; None for an env that
        does not track them)."""
        return self.record.best

    @property
    def episodes(self) -> int:
        """Finished episodes."""
        return self.record.episodes


class PruneMonitor(RecordView, Monitor):
    """SB3's ``Monitor`` for :class:`~pruning_env.envs.PruneEnv`: besides episode returns and lengths it writes
    the pruning record (:class:`PruneRecord`).

    Every ``step`` adds a history row: ``timestep``, ``episode``, ``step``, the :data:`STEP_KEYS` of the env's
    info, those of :data:`OPTIONAL_STEP_KEYS` it reports (``accuracy_recovered`` when the env recovers between
    steps, ``budget_goal`` / ``budget_missed`` with a budget, ``predicted_latency`` / ``latency_reduction`` with a
    latency model), ``n_evaluations`` and ``train_batches``
    (running totals: models evaluated, and SGD batches of the estimators: ``short_kd``, multi-fidelity refinements),
    ``seconds`` (wall time since the previous ``reset``/``step`` returned: the agent's choice plus the step)
    and ``kept_channels``; agents add their own numbers with :meth:`annotate`. An episode's end updates the
    best episode. Look-aheads go through :meth:`evaluate_action`; the evaluation count is the env's own
    (cache hits are free), so look-aheads an agent makes on the bare env (a deeper look-ahead tree that steps
    and restores it) are counted too, without history rows.

    :param env: a ``PruneEnv`` or a wrapper of one (look-ahead actions go to the bare env unchanged).
    :param record: record to write into (a new one when None); an agent passes its own so that history and
        best episode carry over when it gets a new env.
    :param max_evaluations: the evaluation budget (None: unlimited). A look-ahead that would evaluate a new
        model beyond it raises :class:`EvaluationBudgetExhausted` (cache hits stay free); agents read
        :attr:`evaluations_left` to stop at it. Steps are never refused: an episode can always finish. A
        multi-fidelity refinement counts one evaluation, and a batched look-ahead refines only as many candidates
        as the budget leaves room for.
    """

    def __init__(self, env: gym.Env, record: Optional[PruneRecord] = None,
                 max_evaluations: Optional[int] = None) -> None:
        super().__init__(env)
        self.record = record if record is not None else PruneRecord()
        if max_evaluations is not None and (not isinstance(max_evaluations, int) or max_evaluations < 1):
            raise ValueError(f"max_evaluations must be None or an integer >= 1, got {max_evaluations!r}")
        self.max_evaluations = max_evaluations
        self.episode_actions: List[np.ndarray] = []
        self._counting = False  # the env's counter belongs to an episode not yet folded into the record
        self._env_evals_at_start = self._env_batches_at_start = 0
        self._last_time = time.perf_counter()

    # ------------------------------------------------------------------ episode and evaluation count
    @property
    def episode_active(self) -> bool:
        """An episode has started and not ended (stepping needs no ``reset``)."""
        return not self.needs_reset

    @property
    def n_evaluations(self) -> int:
        """Models the env evaluated (look-aheads plus steps that did not reuse one), over all episodes."""
        current = self.unwrapped.n_evaluations - self._env_evals_at_start if self._counting else 0
        return self.record.evaluations_done + current

    @property
    def n_train_batches(self) -> int:
        """SGD batches the env's estimators trained (``short_kd``, multi-fidelity refinements), over all episodes."""
        current = self._env_batches() - self._env_batches_at_start if self._counting else 0
        return self.record.train_batches_done + current

    def _env_batches(self) -> int:
        return int(getattr(self.unwrapped, "n_train_batches", 0))

    @property
    def evaluations_left(self) -> Optional[int]:
        """Evaluations left of ``max_evaluations`` (None: no budget)."""
        return None if self.max_evaluations is None else max(0, self.max_evaluations - self.n_evaluations)

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, **kwargs: Any):
        """Start an episode (an unfinished one keeps its evaluations in the count)."""
        self._fold_counts()
        out = super().reset(**kwargs)
        self.episode_actions = []
        self._env_evals_at_start, self._env_batches_at_start = self.unwrapped.n_evaluations, self._env_batches()
        self._counting = True
        self._last_time = time.perf_counter()
        return out

    def step(self, action: Any):
        """Step the env and record the step (and, at the episode's end, the episode)."""
        obs, reward, terminated, truncated, info = super().step(action)
        self.episode_actions.append(np.asarray(action, dtype=np.float64).copy())
        now = time.perf_counter()
        row: Dict[str, Any] = {"timestep": len(self.record.history) + 1, "episode": self.record.episodes,
                               "step": int(info["step"])}
        for key in STEP_KEYS:
            row[key] = float(info[key]) if key in info else float("nan")
        for key in OPTIONAL_STEP_KEYS:
            if key in info:
                row[key] = bool(info[key]) if key == "budget_missed" else float(info[key])
        row["n_evaluations"], row["train_batches"] = self.n_evaluations, self.n_train_batches
        row["seconds"] = now - self._last_time
        row["kept_channels"] = [int(k) for k in np.asarray(info.get("kept_channels", []))]
        self.record.history.append(row)
        self._last_time = now
        if terminated or truncated:
            self._end_episode(info)
        return obs, reward, terminated, truncated, info

    def evaluate_action(self, action: Any):
        """The env's look-ahead: ``(reward, info)`` that ``step(action)`` would give, without stepping.

        :raises EvaluationBudgetExhausted: the look-ahead evaluated a new model past ``max_evaluations`` (the
            agent did not stop at :attr:`evaluations_left`); its result is withheld.
        """
        reward, info = self.unwrapped.evaluate_action(action)
        if self.max_evaluations is not None and not info.get("cached", False) \
                and self.n_evaluations > self.max_evaluations:
            raise EvaluationBudgetExhausted(f"look-ahead past the evaluation budget of {self.max_evaluations}: "
                                            f"stop sampling when evaluations_left reaches 0")
        return reward, info

    def evaluate_actions(self, actions: Sequence[Any], max_evaluations: Optional[int] = None):
        """The env's batched look-ahead: ``(rewards, infos)`` of ``evaluate_action`` for every action.

        :param actions: the actions.
        :param max_evaluations: evaluations this call may use, at most :attr:`evaluations_left`: a multi-fidelity
            estimator refines fewer candidates to fit (an agent keeping evaluations for later steps passes less).
        :raises EvaluationBudgetExhausted: as :meth:`evaluate_action`, when the batch went past the budget.
        """
        left = self.evaluations_left
        if max_evaluations is not None:
            left = int(max_evaluations) if left is None else min(left, int(max_evaluations))
        # the cap goes to envs that take one (PruneEnv; a scripted or wrapping env may not)
        cap = left is not None and "max_evaluations" in inspect.signature(self.unwrapped.evaluate_actions).parameters
        rewards, infos = self.unwrapped.evaluate_actions(actions, **({"max_evaluations": left} if cap else {}))
        if self.max_evaluations is not None and self.n_evaluations > self.max_evaluations:
            raise EvaluationBudgetExhausted(f"batched look-ahead past the evaluation budget of "
                                            f"{self.max_evaluations}: send at most evaluations_left actions")
        return rewards, infos

    def evaluate_keep(self, keep: Any):
        """The env's budget-free probe (``PruneEnv.evaluate_keep``): ``(reward, info)`` of the candidate keeping
        ``keep`` channels per group; one evaluation, counted as a look-ahead's.

        :raises EvaluationBudgetExhausted: as :meth:`evaluate_action`.
        """
        reward, info = self.unwrapped.evaluate_keep(keep)
        if self.max_evaluations is not None and self.n_evaluations > self.max_evaluations:
            raise EvaluationBudgetExhausted(f"probe past the evaluation budget of {self.max_evaluations}: stop "
                                            f"probing when evaluations_left reaches 0")
        return reward, info

    # ------------------------------------------------------------------ agents' additions
    def annotate(self, values: Dict[str, Any]) -> Dict[str, Any]:
        """Add an agent's own numbers (e.g. RL-Pruner's ``epsilon``) to the last step's row; returns the row.

        :param values: column name -> value.
        """
        if not self.record.history:
            raise RuntimeError("annotate() needs a recorded step: call it after step()")
        row = self.record.history[-1]
        row.update(values)
        return row

    def _end_episode(self, info: Dict[str, Any]) -> None:
        reward = float(info["reward"])
        if self.record.best is None or reward > self.record.best["reward"]:
            self.record.best = {"reward": reward, "episode": self.record.episodes, "model": self.unwrapped.model,
                                "info": {k: _plain(v) for k, v in info.items() if k != "episode"},
                                "actions": [a.tolist() for a in self.episode_actions],
                                "kept_indices": _kept_indices(self.unwrapped)}
        self._fold_counts()
        self.record.episodes += 1
        self.episode_actions = []

    def _fold_counts(self) -> None:
        """Add the running episode's counts to the record (the env's counters restart with its next episode)."""
        self.record.evaluations_done, self.record.train_batches_done = self.n_evaluations, self.n_train_batches
        self._counting = False

    # ------------------------------------------------------------------ resume
    def episode_state(self) -> Dict[str, Any]:
        """The running episode's part of a checkpoint (actions and rewards so far)."""
        return {"actions": [a.copy() for a in self.episode_actions], "rewards": list(self.rewards),
                "active": self.episode_active}

    def resume_episode(self, state: Dict[str, Any]) -> None:
        """Continue the episode of :meth:`episode_state` after the env was restored to the matching state:
        counting goes on from the record's total.

        :param state: what :meth:`episode_state` returned.
        """
        self.episode_actions = [np.asarray(a, dtype=np.float64) for a in state["actions"]]
        self.rewards = [float(r) for r in state["rewards"]]
        self.needs_reset = not state["active"]
        self._counting = bool(state["active"])
        self._env_evals_at_start, self._env_batches_at_start = self.unwrapped.n_evaluations, self._env_batches()
        self._last_time = time.perf_counter()


__all__ = ["PruneMonitor", "PruneRecord", "RecordView", "EvaluationBudgetExhausted", "STEP_KEYS"]
