"""RL-Pruner as a Gymnasium environment: one episode prunes a pretrained CNN from its original state to a
target sparsity in ``n_steps`` steps; the action is a per-group sparsity vector (or pruning distribution).
:class:`PruneEnv` keeps the spaces, reset, step, look-ahead and the states of the trajectory; what a candidate scores
is ``envs/scoring.py``, how an action becomes kept channels ``envs/budget.py``, the infos ``envs/info.py``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from gymnasium import spaces

from pruning_env.costs import Cost, Reductions, count_costs
from pruning_env.envs.actions import real_action
from pruning_env.envs.budget import (ReductionMeter, StepKeep, channel_floor, channel_sparsity, cumulative_goal,
                                     exact_keep, keep_for_action, refuse_unreachable_target, step_channel_budget)
from pruning_env.envs.config import PruneEnvConfig, PruneEnvSettings
from pruning_env.envs.info import InfoBuilder
from pruning_env.envs.parallel import CandidateBackend, SerialBackend, make_backend
from pruning_env.envs.scoring import Candidate, CandidateCache, CandidateScorer
from pruning_env.envs.task import PruningTask
from pruning_env.pruning import Pruner
from pruning_env.runtime import resolve_device, sync
from pruning_env.schema import merged
from pruning_env.training import recover

#: per-group observation features, in order
GROUP_FEATURES = ("original_channels", "remaining_fraction", "flops_share", "params_share", "importance",
                  "position")
#: global observation features, in order (appended after the per-group block)
GLOBAL_FEATURES = ("step_fraction", "flops_reduction", "params_reduction", "channel_sparsity", "accuracy",
                   "target")


@dataclass
class _State:
    """One node of the pruning trajectory. States are never modified after creation (except their candidate
    cache), so a snapshot is just a reference."""

    model: nn.Module
    pruner: Pruner  # the state's groups at its widths; importance only when the episode can go on from it
    channels: np.ndarray
    cost: Cost
    reductions: Reductions
    accuracy: float
    step_index: int
    terminated: bool
    truncated: bool
    group_macs: np.ndarray
    group_params: np.ndarray
    importance: np.ndarray
    teacher: nn.Module  # the KD teacher of the next recovery (the original model until a teacher switch)
    teacher_accuracy: Optional[float] = None
    end_reason: Optional[str] = None
    candidates: CandidateCache = field(default_factory=CandidateCache)

    @property
    def over(self) -> bool:
        return self.terminated or self.truncated


#: ``final_rerank``'s re-measurement seeds its estimates with the env's ``seed`` plus this (other KD batches and BN
#: draws than the search's)
RERANK_SEED_OFFSET = 7919


@dataclass
class _Finalist:
    """A final-step candidate kept for ``final_rerank``: its search reward, and what rebuilds it (its state and
    plan; the state is held, so it outlives its episode)."""
    reward: float
    accuracy: float
    state: _State
    candidate: Candidate


class PruneEnv(PruneEnvSettings, gym.Env):
    """Structured channel pruning of a pretrained CNN as a Gymnasium environment (RL-Pruner, spec §2-§3); the
    settings are the fields of :class:`~pruning_env.envs.config.PruneEnvConfig`, ``docs/env.md`` the full story.

    * **Episode**: ``reset()`` starts from the original model; ``step(action)`` removes channels from every
      prunable group. With a budget, step t meets the cumulative goal ``target * t / n_steps`` and the episode
      ends after ``n_steps`` steps (truncated if its last goal was out of reach); without one it ends at
      ``target`` (truncated after ``max_steps`` steps or at the channel floor, ``info["truncated_reason"]``).
    * **Action**: ``Box(0, 1, (n_groups,))``, mapped to kept channels by
      :func:`~pruning_env.envs.budget.keep_for_action`; NaN, inf, complex or misshaped actions raise ``ValueError``.
    * **Reward** (spec §3, on held-out validation images, never the test set): ``accuracy + alpha *
      flops_reduction + beta * params_reduction`` (``1 - MACs/MACs0``, ``1 - params/params0``) from the env's
      :class:`~pruning_env.envs.scoring.CandidateScorer`; ``recovery`` fine-tunes between steps.
    * **Observation**: the per-group ``GROUP_FEATURES`` (one block of ``n_groups`` each), then ``GLOBAL_FEATURES``.
    * **Look-ahead**: :meth:`evaluate_action`, :meth:`evaluate_actions`, :meth:`lookahead_step`, :meth:`snapshot`
      / :meth:`restore` (score candidates from one state, importance cached); agents also read :attr:`pruner`,
      :attr:`group_importance`, :meth:`keep_for_action`, :meth:`reduction`, and the settings as attributes
      (``env.target``, ``env.budget``, ...: :class:`~pruning_env.envs.config.PruneEnvSettings`).

    :param config: the settings (default: ``PruneEnvConfig()``).
    :param kwargs: settings by name (override ``config``'s).
    """
    metadata = {"render_modes": []}

    def __init__(self, config: Optional[PruneEnvConfig] = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = cfg = merged(PruneEnvConfig, config, kwargs)
        self.render_mode = None
        self.device = resolve_device(cfg.device)
        self.task = task = PruningTask.from_config(cfg, self.device)
        self.splits, self.input_size = task.splits, task.input_size
        self.val_size, self.split_seed = task.val_size, task.split_seed
        self.original_model = task.model
        self.original_cost = count_costs(self.original_model, self.input_size, device=self.device)
        self.scorer = CandidateScorer.from_config(cfg, task, self.original_cost, self.device)
        self.amp, self.channels_last = self.scorer.amp, self.scorer.channels_last
        # the single look-ahead scores in this process; the batched one uses config.parallel (started on first use)
        self._serial = SerialBackend(self.scorer, overlap=False)
        self._backend: Optional[CandidateBackend] = None

        probe = self._make_pruner(copy.deepcopy(self.original_model))
        self.group_names: List[str] = list(probe.group_names)
        self.n_groups = len(self.group_names)
        if self.n_groups == 0:
            raise ValueError("the model has no prunable channel group (every conv/linear is ignored or is the "
                             "classifier); nothing to prune")
        self.original_channels = np.asarray(probe.num_channels, dtype=np.int64).copy()
        self.layer_counts = np.asarray(probe.layer_counts, dtype=np.int64).copy()
        self.latency_model = cfg.build_latency_model(probe) if cfg.uses_latency else None
        self.meter = ReductionMeter(self.original_cost, self.original_channels, self.layer_counts,
                                    latency=None if self.latency_model is None else self.latency_model.predict)
        self._infos = InfoBuilder(self.meter, cfg, self.scorer.refines)
        if cfg.gamma != 0:
            self.scorer.use_latency(cfg.gamma, self.meter.latency_reduction)
        self.step_filter_budget = step_channel_budget(self.original_channels, self.layer_counts, self.target,
                                                      self.n_steps)
        if self.budget is not None:  # a budget-free episode that cannot reach its target ends truncated instead
            # a one-step distribution-mode episode cannot go below the per-group bound either
            bound = self.distribution_max_sparsity if self.action_mode == "distribution" and self.n_steps == 1 \
                else None
            refuse_unreachable_target(self.meter.function(self.episode_metric, lambda k: probe.plan_cost(keep=k)),
                                      channel_floor(probe.keep_counts, self.original_channels, bound), self.target,
                                      self.target_tolerance, self.episode_metric,
                                      f"min_channels={cfg.min_channels}, round_to={cfg.round_to}"
                                      + ("" if bound is None else f", distribution_max_sparsity={bound:g}")
                                      + f" and ignore_layers={list(cfg.ignore_layers)}")
        # the initial state (built at the first reset) reuses the probe: its model is a private copy already
        self._probe: Optional[Pruner] = probe

        self.action_space = spaces.Box(0.0, 1.0, shape=(self.n_groups,), dtype=np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(GROUP_FEATURES) * self.n_groups
                                                             + len(GLOBAL_FEATURES),), dtype=np.float32)
        self._original_accuracy: Optional[float] = None
        self._state = self._initial_state = None  # Optional[_State]: the current one, every episode's first one
        # counters live on the env, not on states: restoring a snapshot does not refund evaluations
        self._spent, self.total_evaluations = np.zeros(2, dtype=np.int64), 0  # episode: evaluations, SGD batches
        # final_rerank: the best final-step candidates evaluated so far, by (state, kept channels)
        self._finalists: Dict[Tuple[int, bytes], _Finalist] = {}

    def _make_pruner(self, model: nn.Module) -> Pruner:
        cfg = self.config
        return Pruner(model, torch.zeros((1, *self.input_size), device=self.device), ignore=cfg.ignore_layers,
                      min_channels=cfg.min_channels, round_to=cfg.round_to, prune_normalized=cfg.prune_normalized)

    # ------------------------------------------------------------------ public properties
    @property
    def model(self) -> nn.Module:
        """The current (pruned) model, shared with snapshots and candidates: read-only (copy it to train it)."""
        return self._require_state().model

    @property
    def pruner(self) -> Optional[Pruner]:
        """The current state's :class:`~pruning_env.pruning.Pruner` (groups, cached importance, analytic costs);
        None once the episode is over. Treat it as read-only."""
        state = self._require_state()
        return None if state.over else state.pruner

    @property
    def group_importance(self) -> np.ndarray:
        """Mean |channel importance| per group at the current state (zeros at the end of an episode)."""
        return self._require_state().importance.copy()

    @property
    def current_channels(self) -> np.ndarray:
        """Channels per group in the current state."""
        return self._require_state().channels.copy()

    @property
    def kept_indices(self) -> List[np.ndarray]:
        """Kept channel indices per group in the original model's numbering (the episode's plans composed):
        ``Pruner(original).apply(PrunePlan(kept_indices))`` rebuilds the current model's structure."""
        return [k.copy() for k in self._require_state().pruner.origin]

    @property
    def step_index(self) -> int:
        """Steps taken in this episode."""
        return self._require_state().step_index

    @property
    def n_evaluations(self) -> int:
        """Models evaluated in this episode (look-aheads plus steps that did not reuse one; a multi-fidelity
        refinement is one more); ``total_evaluations`` counts over the env's lifetime."""
        return int(self._spent[0])

    @property
    def n_train_batches(self) -> int:
        """SGD batches the estimates of this episode trained (``short_kd``, refinements; recovery aside)."""
        return int(self._spent[1])

    @property
    def original_accuracy(self) -> float:
        """The reward's accuracy term of the original model (evaluated once)."""
        if self._original_accuracy is None:
            self._original_accuracy = self.scorer.accuracy(self.original_model, self.original_model)
        return self._original_accuracy

    @property
    def evaluation_backend(self) -> CandidateBackend:
        """The backend of :meth:`evaluate_actions`, as ``config.parallel`` names it (started on first use)."""
        if self._backend is None:
            self._backend = make_backend(self.config.parallel, self.scorer)
        return self._backend

    def keep_for_action(self, action: Any) -> np.ndarray:
        """Kept channels per group that ``step(action)`` would produce from the current state (no evaluation)."""
        return self._step_keep(self._require_active(), self._validate_action(action)).keep.copy()

    def reduction(self, keep: Any, metric: Optional[str] = None) -> Union[float, np.ndarray]:
        """Cumulative reduction (analytic, no evaluation) if the current state kept ``keep`` channels per group.

        :param keep: channels per group, at most the current widths (a float comes back), or a matrix
            ``(m, n_groups)`` of such rows (an array ``(m,)``; a latency reduction costs one call of the latency
            model for all rows).
        :param metric: one of ``METRICS``; default the step's budget metric, else ``target_metric``.
        """
        pruner = self._require_active().pruner
        metric = metric or self.budget or self.target_metric
        k = np.asarray(keep, dtype=np.int64)
        if k.ndim == 2:
            return self.meter.values(metric, k, lambda row: pruner.plan_cost(keep=row))
        return self.meter.function(metric, lambda row: pruner.plan_cost(keep=row))(k)

    # ------------------------------------------------------------------ core
    def _require_state(self) -> _State:
        if self._state is None:
            raise RuntimeError("call reset() before using the environment (no episode has started)")
        return self._state

    def _require_active(self) -> _State:
        state = self._require_state()
        if state.over:
            raise RuntimeError(f"the episode is over (terminated={state.terminated}, truncated={state.truncated}) "
                               f"after {state.step_index} steps; call reset() to start a new one")
        return state

    def _validate_action(self, action: Any) -> np.ndarray:
        names = f"{', '.join(self.group_names[:4])}{', ...' if self.n_groups > 4 else ''}"
        return real_action(action, self.n_groups, f"shape ({self.n_groups},): one value per prunable group "
                                                  f"({names}) in [0, 1]", entries="groups")

    def _step_keep(self, state: _State, a: np.ndarray) -> StepKeep:
        """Kept channels per group for a validated action at ``state`` (see :func:`keep_for_action`)."""
        pruner, reduction, goal = state.pruner, None, None
        if self.budget is not None:
            reduction = self.meter.function(self.budget, lambda keep: pruner.plan_cost(keep=keep))
            goal = cumulative_goal(self.target, state.step_index + 1, self.n_steps)
        return keep_for_action(a, self.action_mode, state.channels, self.layer_counts, pruner.keep_counts,
                               reduction=reduction, goal=goal, max_step_sparsity=self.max_step_sparsity,
                               granularity=pruner.granularity,
                               distribution_max_sparsity=self.distribution_max_sparsity)

    def _lookahead(self, state: _State, actions: Sequence[np.ndarray], batched: bool,
                   max_evaluations: Optional[int] = None) -> List[Tuple[Candidate, bool, Tuple[int, int]]]:
        """``(candidate, cached, (n_evaluations, n_train_batches))`` per validated action: cache hits are reused,
        the misses built and scored together (``batched``: by ``config.parallel``'s backend, a multi-fidelity
        estimator refining the best; else here), costs counted, the cache left as a loop of look-aheads leaves it."""
        def build(misses: List[int]) -> List[Candidate]:
            backend = self.evaluation_backend if batched else self._serial
            steps = (self._step_keep(state, actions[i]) for i in misses)
            return self.scorer.candidates(backend, state.pruner, steps, state.teacher, refine=batched,
                                          max_evaluations=max_evaluations)

        keys = [CandidateCache.key(a) for a in actions]
        out = [(cand, cached, self._charge(None if cached else cand))
               for cand, cached in state.candidates.resolve(keys, self.lookahead_cache, build)]
        if self.config.final_rerank > 1 and self.budget is not None and state.step_index + 1 >= self.n_steps:
            for cand, cached, _ in out:
                if not cached and cand.step.reachable:
                    self._keep_finalist(state, cand)
        return out

    def _keep_finalist(self, state: _State, cand: Candidate) -> None:
        """Keep ``cand`` (a new final-step candidate of ``state``) among the ``final_rerank`` best by reward."""
        key = (id(state), np.asarray(cand.step.keep, dtype=np.int64).tobytes())
        if key in self._finalists:
            return
        self._finalists[key] = _Finalist(float(cand.reward), float(cand.accuracy), state, replace(cand, model=None))
        if len(self._finalists) > self.config.final_rerank:
            worst = min(self._finalists, key=lambda k: self._finalists[k].reward)
            del self._finalists[worst]

    def rerank_finalists(self) -> Optional[Dict[str, Any]]:
        """``final_rerank``: re-score the best final-step candidates evaluated so far (at most ``final_rerank``, by
        the search's reward) with the same estimator and reward on the held-out validation images
        (``task.holdout_data``, never the reward's) and another per-estimate seed, and return the best there: its
        ``model`` (a new one), ``kept_indices`` (per group, in the original numbering), ``kept_channels``,
        ``reductions``, its search ``reward`` / ``accuracy`` and held-out ``holdout_reward`` /
        ``holdout_accuracy``, and ``finalists`` (every re-scored candidate's numbers, best search reward first).
        The re-scores are counted in ``total_evaluations`` (and ``evaluations`` here), not in an episode's.
        None when it is off or fewer than two candidates were evaluated (nothing to choose between).
        """
        if self.config.final_rerank <= 1 or len(self._finalists) < 2:
            return None
        holdout = self.scorer.with_images(self.task.holdout_data, seed=int(self.config.seed or 0) + RERANK_SEED_OFFSET)
        rows = sorted(self._finalists.values(), key=lambda f: -f.reward)
        scored = []
        for f in rows:
            model = self.scorer.build(f.state.pruner, f.candidate.plan)
            acc = holdout.accuracy(model, f.state.teacher)
            scored.append((holdout.reward(acc, f.candidate.reductions, f.candidate.step.keep), acc, model))
        self.total_evaluations += len(rows)
        best = max(range(len(rows)), key=lambda i: (scored[i][0], -i))  # ties: the better search reward
        f, (h_reward, h_acc, model) = rows[best], scored[best]
        return {"model": model, "kept_channels": np.asarray(f.candidate.step.keep, dtype=np.int64).tolist(),
                "kept_indices": [o[k] for o, k in zip(f.state.pruner.origin, f.candidate.plan.kept)],
                "reductions": f.candidate.reductions, "reward": f.reward, "accuracy": f.accuracy,
                "holdout_reward": h_reward, "holdout_accuracy": h_acc, "chosen": best, "evaluations": len(rows),
                "holdout_images": len(self.task.holdout_data[1]),
                "finalists": [{"reward": r.reward, "accuracy": r.accuracy, "holdout_reward": sc[0],
                               "holdout_accuracy": sc[1],
                               "kept_channels": np.asarray(r.candidate.step.keep, dtype=np.int64).tolist()}
                              for r, sc in zip(rows, scored)]}

    def _charge(self, cand: Optional[Candidate]) -> Tuple[int, int]:
        """Count ``cand``'s evaluations and batches (None: a cache hit, free); the episode's counts after it."""
        if cand is not None:
            self._spent += (cand.evaluations, cand.train_batches)
            self.total_evaluations += cand.evaluations
        return self.n_evaluations, self.n_train_batches

    def _make_state(self, model: nn.Module, pruner: Pruner, channels: np.ndarray, cost: Cost, r: Reductions,
                    accuracy: float, step_index: int, final: bool, teacher: nn.Module,
                    teacher_accuracy: Optional[float], missed: bool = False) -> Tuple[_State, float]:
        """A state (its importance only when the episode can go on from it) and the seconds that took; ``missed``:
        the step that led here could not reach its budget goal."""
        t0 = time.perf_counter()
        importance, end_reason = np.zeros(self.n_groups), None
        terminated, truncated = final and not missed, final and missed
        if truncated:
            bound = (f"max_step_sparsity={self.max_step_sparsity:g}" if self.action_mode == "sparsity" else
                     f"distribution_max_sparsity={self.distribution_max_sparsity}")
            end_reason = (f"the {self.budget} budget could not be met: no action reaches the target "
                          f"{self.target:g} from here (every group at its channel floor or at {bound})")
        elif not final:
            pruner.compute_importance(self.task.calibration, criterion=self.config.importance,
                                      train_mode=self.config.importance_train_mode)
            importance = pruner.group_importance()
            sync(self.device)
            if self.budget is None:
                if np.all(channel_floor(pruner.keep_counts, channels) >= channels):
                    truncated, end_reason = True, "every group is at its channel floor: nothing left to prune"
                elif step_index >= self.max_steps:
                    truncated, end_reason = True, f"max_steps={self.max_steps} reached short of the target"
        time_importance = time.perf_counter() - t0
        g_macs, g_params = pruner.group_costs()
        state = _State(model=model, pruner=pruner, channels=np.asarray(channels, dtype=np.int64).copy(), cost=cost,
                       reductions=r, accuracy=float(accuracy), step_index=step_index, terminated=terminated,
                       truncated=truncated, group_macs=g_macs, group_params=g_params, importance=importance,
                       teacher=teacher, teacher_accuracy=teacher_accuracy, end_reason=end_reason)
        return state, time_importance

    def _observation(self, state: _State) -> np.ndarray:
        orig = self.original_channels.astype(np.float64)
        n = self.n_groups
        imp = state.importance
        imp = imp / imp.max() if imp.size and imp.max() > 0 else np.zeros(n)
        macs, params = max(self.original_cost.macs, 1), max(self.original_cost.params, 1)
        group = np.concatenate([orig / orig.max(), state.channels / orig, state.group_macs / macs,
                                state.group_params / params, imp, np.arange(n) / max(n - 1, 1)])
        glob = np.array([min(1.0, state.step_index / self.n_steps), state.reductions.flops, state.reductions.params,
                         channel_sparsity(state.channels, self.original_channels, self.layer_counts), state.accuracy,
                         self.target])
        return np.clip(np.concatenate([group, glob]), 0.0, 1.0).astype(np.float32)

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None) -> Tuple[np.ndarray, dict]:
        """Start an episode from the original model (a private copy, traced and scored on the first reset).

        :param seed: seeds ``np_random`` (recovery draws from it); reward and calibration images follow the
            config's ``seed``.
        :param options: unused.
        """
        super().reset(seed=seed)
        t_imp = 0.0
        if self._initial_state is None:
            # every episode starts from the same state: trace and score it once (states are immutable)
            t0 = time.perf_counter()
            probe, self._probe = self._probe, None
            pruner = probe if probe is not None else self._make_pruner(copy.deepcopy(self.original_model).eval())
            t_trace = time.perf_counter() - t0
            self._initial_state, t_imp = self._make_state(
                pruner.model, pruner, self.original_channels, self.original_cost,
                self.scorer.reductions(self.original_cost), self.original_accuracy, 0, final=False,
                teacher=self.original_model,
                teacher_accuracy=self.original_accuracy if self.config.teacher_switch else None)
            t_imp += t_trace
        state = self._state = self._initial_state
        self._spent[:] = 0
        info = self._infos.state(state.accuracy, self.scorer.reward(state.accuracy, state.reductions, state.channels),
                                 state.cost, state.reductions, state.channels, 0, (0, 0), time_importance=t_imp)
        return self._observation(state), info

    def evaluate_action(self, action: Any) -> Tuple[float, Dict[str, Any]]:
        """``(reward, info)`` that ``step(action)`` would give, without advancing: only the evaluation counters
        move, and the candidate is cached for a following step (``info["cached"]``: an earlier one was reused)."""
        state = self._require_active()
        [(cand, cached, count)] = self._lookahead(state, [self._validate_action(action)], batched=False)
        info = self._infos.candidate(cand, cached, state.step_index + 1, count, lookahead=True)
        return info["reward"], info

    def evaluate_actions(self, actions: Sequence[Any],
                         max_evaluations: Optional[int] = None) -> Tuple[List[float], List[Dict[str, Any]]]:
        """``(rewards, infos)`` of :meth:`evaluate_action` for each action, the new candidates scored together by
        ``config.parallel``'s backend; all ends exactly as after the loop (an invalid action raises first), except
        that a multi-fidelity estimator refines the best new ones, as many as ``max_evaluations`` allows."""
        state = self._require_active()
        acts = [self._validate_action(a) for a in actions]
        infos = [self._infos.candidate(cand, cached, state.step_index + 1, count, lookahead=True)
                 for cand, cached, count in self._lookahead(state, acts, True, max_evaluations)]
        return [info["reward"] for info in infos], infos

    def evaluate_keep(self, keep: Any) -> Tuple[float, Dict[str, Any]]:
        """``(reward, info)`` of the candidate that keeps exactly ``keep`` channels per group at the current state,
        without the budget mapping (a sensitivity probe: one group pruned alone). Scored by the same scorer path
        as a look-ahead (serial, never refined) and counted as one evaluation; not cached, never stepped.

        :param keep: whole channel counts, one per group, each at most the current width and buildable as it is
            (``min_channels`` floor, whole blocks of the granularity).
        """
        state = self._require_active()
        k = exact_keep(keep, state.channels, lambda k: [len(i) for i in state.pruner.plan(keep=k).kept],
                       f"min_channels={self.config.min_channels}, granularity {state.pruner.granularity.tolist()}",
                       caller="evaluate_keep")
        [cand] = self.scorer.candidates(self._serial, state.pruner, [StepKeep(k, 1.0)], state.teacher)
        info = self._infos.candidate(cand, False, state.step_index + 1, self._charge(cand), lookahead=True)
        return info["reward"], info

    def step(self, action: Any) -> Tuple[np.ndarray, float, bool, bool, Dict[str, Any]]:
        """Prune the current model with ``action`` (one per group): ``(obs, reward, terminated, truncated, info)``."""
        return self._advance(action, recover=True)

    def lookahead_step(self, action: Any) -> Tuple[np.ndarray, float, bool, bool, Dict[str, Any]]:
        """:meth:`step` that never fine-tunes: a deeper tree search (spec §2.5) costs evaluations only; see restore."""
        return self._advance(action, recover=False)

    def _advance(self, action: Any, recover: bool) -> Tuple[np.ndarray, float, bool, bool, Dict[str, Any]]:
        state = self._require_active()
        a = self._validate_action(action)
        [(cand, cached, count)] = self._lookahead(state, [a], batched=False)
        step_index = state.step_index + 1
        final = (step_index >= self.n_steps if self.budget is not None else
                 self.meter.value(self.target_metric, cand.step.keep, cand.reductions)
                 >= self.target - self.target_tolerance)
        recovering = (recover and not final and self.config.recovers
                      and step_index % self.config.recovery_period == 0)
        # the candidate leaves the cache: it becomes the new state's model (recovery or train-mode importance
        # may change it in place)
        state.candidates.pop(CandidateCache.key(a))
        model, accuracy, extra = cand.model, cand.accuracy, {}
        if model is None:  # scored on a Ray actor: the same surgery again, no evaluation
            model = self.scorer.build(state.pruner, cand.plan)
        teacher, teacher_accuracy = state.teacher, state.teacher_accuracy
        time_recovery = 0.0
        if recovering:
            t0 = time.perf_counter()
            accuracy = self._recover(model, teacher)
            time_recovery = time.perf_counter() - t0
            extra["accuracy_recovered"] = accuracy
            if teacher_accuracy is not None and accuracy > teacher_accuracy:
                # spec §9.16: the recovered student beats the teacher and becomes the next teacher
                teacher, teacher_accuracy = copy.deepcopy(model).eval(), accuracy
                extra["teacher_switched"] = True
        # the pruned model's groups come from the parent's (no re-trace): the action vector keeps its meaning even
        # where a trace could not tell the structure apart (a depthwise conv left with one channel)
        pruner = state.pruner.child(model, cand.plan)
        new_state, t_imp = self._make_state(model, pruner, cand.step.keep, cand.cost, cand.reductions, accuracy,
                                            step_index, final, teacher, teacher_accuracy,
                                            missed=not cand.step.reachable)
        self._state = new_state
        if new_state.end_reason is not None:
            extra["truncated_reason"] = new_state.end_reason
        info = self._infos.candidate(cand, cached, step_index, count, lookahead=not recover, time_importance=t_imp,
                                     time_recovery=time_recovery, **extra)
        return self._observation(new_state), info["reward"], new_state.terminated, new_state.truncated, info

    def _recover(self, model: nn.Module, teacher: nn.Module) -> float:
        """Fine-tune between steps (KD from ``teacher`` or plain CE) in place; returns the new accuracy."""
        cfg = self.config
        recover(model, self.splits.train, seed=int(self.np_random.integers(2**31 - 1)),
                teacher=teacher if cfg.recovery == "kd" else None,
                val_data=self.task.reward_data if cfg.recovery_best_snapshot else None, device=self.device,
                amp=self.amp, **cfg.recovery_options())
        return self.scorer.accuracy(model, teacher)

    def snapshot(self) -> _State:
        """The current state, to return to with :meth:`restore` (a reference; states are immutable)."""
        return self._require_state()

    def restore(self, snap: _State) -> np.ndarray:
        """Return to a state from :meth:`snapshot` of this env; returns its observation."""
        if not isinstance(snap, _State):
            raise TypeError(f"restore() takes an object returned by snapshot(), got {type(snap).__name__}")
        self._state = snap
        return self._observation(snap)

    def close(self) -> None:
        """Release the models and cached tensors."""
        self._state = self._initial_state = self._probe = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        super().close()


__all__ = ["PruneEnv", "GROUP_FEATURES", "GLOBAL_FEATURES"]
