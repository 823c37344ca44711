"""RL-Pruner as a Gymnasium environment: one episode prunes a pretrained CNN from its original state to a
target sparsity in ``n_steps`` steps; the action is a per-group sparsity vector (or pruning distribution).

Reward (spec §3, on held-out validation images, never the test set):
``accuracy + alpha * (1 - MACs/MACs0) + beta * (1 - params/params0)``. Look-ahead (``evaluate_action``,
``snapshot``/``restore``) lets agents score candidate actions from one state with the importance cached.
"""
from __future__ import annotations

import copy
import functools
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from gymnasium import spaces

from pruning_env.costs import Cost, count_costs, reductions
from pruning_env.envs.budget import StepKeep, channel_sparsity, cumulative_goal, keep_for_action, step_channel_budget
from pruning_env.envs.config import PruneEnvConfig
from pruning_env.envs.reward import BoundEstimator, logits_on, make_estimator
from pruning_env.envs.parallel import CandidateBackend, RewardData, SerialBackend, build_model, make_backend
from pruning_env.envs.task import PruningTask
from pruning_env.pruning import Pruner, PrunePlan
from pruning_env.runtime import resolve_device, sync
from pruning_env.training import finetune

#: per-group observation features, in order
GROUP_FEATURES = ("original_channels", "remaining_fraction", "flops_share", "params_share", "importance",
                  "position")
#: global observation features, in order (appended after the per-group block)
GLOBAL_FEATURES = ("step_fraction", "flops_reduction", "params_reduction", "channel_sparsity", "accuracy",
                   "target")


@dataclass
class _Candidate:
    """A pruned model built from one state and one action, with everything the reward needs."""

    model: Optional[nn.Module]  # None when a Ray actor built it: rebuilt from the plan if stepped
    plan: PrunePlan
    step: StepKeep
    cost: Cost
    accuracy: float
    time_prune: float
    time_eval: float


@dataclass
class _State:
    """One node of the pruning trajectory. States are never modified after creation (except their candidate
    cache), so a snapshot is just a reference."""

    model: nn.Module
    pruner: Pruner  # the state's groups at its widths; importance only when the episode can go on from it
    channels: np.ndarray
    cost: Cost
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
    candidates: "OrderedDict[bytes, _Candidate]" = field(default_factory=OrderedDict)

    @property
    def over(self) -> bool:
        return self.terminated or self.truncated


def _estimator_for(cfg: PruneEnvConfig, task: PruningTask) -> Optional[BoundEstimator]:
    """The config's reward estimator with its options and training images bound; None for ``vanilla`` (the env's
    own fast top-1, with AMP / channels-last)."""
    name = cfg.reward_estimator
    if name == "vanilla":
        return None
    options: Dict[str, Any] = {"batch_size": int(cfg.eval_batch_size)}
    if name == "adaptive_bn":
        options["n_images"] = int(cfg.reward_train_images)
    elif name == "short_kd":
        options.update(n_batches=int(cfg.reward_kd_batches), T=float(cfg.kd_T),
                       soft_weight=float(cfg.kd_soft_weight))
    else:
        options["metric"] = cfg.reward_agreement
    return BoundEstimator(name, make_estimator(name, **options), task.estimator_data, int(cfg.seed or 0))


class PruneEnv(gym.Env):
    """Structured channel pruning of a pretrained CNN as a Gymnasium environment (RL-Pruner, spec §2-§3).

    Every setting is a field of :class:`~pruning_env.envs.config.PruneEnvConfig` (documented and validated
    there); pass a config, keyword arguments (as ``gym.make`` does), or a config plus keyword overrides.

    **Episode.** ``reset()`` starts from the original model; each ``step(action)`` removes channels from every
    prunable group (coupled layers, e.g. a residual add, form one group and share one value) and returns the
    reward of the pruned model. With a budget (any ``budget``, and always in ``"distribution"`` mode) every step
    meets the cumulative goal ``target * step / n_steps`` (within channel granularity) and the episode
    *terminates* after exactly ``n_steps`` steps; if the goal cannot be reached (every group at its floor or at
    ``max_step_sparsity``) the info says ``budget_missed`` and an episode whose last step misses is *truncated*
    with ``info["truncated_reason"]``; a budget target that no action can reach is refused at construction.
    Without a budget the episode terminates when the ``target_metric`` reduction is within ``target_tolerance``
    of ``target``, and is truncated (with the reason) after ``max_steps`` steps or when no channel can be removed.

    **Action.** ``Box(0, 1, (n_groups,), float32)``, mapped to kept channels by
    :func:`pruning_env.envs.budget.keep_for_action` (``"sparsity"``: fraction of each group's current channels
    removed; ``"distribution"``: the authors' pruning distribution, spec §2.1-2.4). Values outside the space
    are clipped; NaN/inf entries or a wrong shape raise ``ValueError``; stepping before ``reset()`` or after
    the end raises ``RuntimeError``.

    **Reward.** ``accuracy + alpha * flops_reduction + beta * params_reduction``: top-1 (a fraction) of the
    pruned model right after pruning (before any recovery), on a fixed seeded subset of ``reward_samples``
    validation images held out from the training data; reductions relative to the original model. How the
    accuracy is estimated is ``reward_estimator`` (``"vanilla"``: that top-1, the authors'; ``"adaptive_bn"``:
    after re-estimating BatchNorm statistics on training images; ``"short_kd"``; ``"teacher_agreement"``); the
    same estimator scores look-aheads, steps, the original model and recovered models.

    **Recovery.** ``recovery="kd"`` / ``"ce"`` fine-tunes after every ``recovery_period``-th non-final step;
    ``recovery_best_snapshot`` and ``teacher_switch`` complete the authors' procedure (spec §5.2, §9.16).
    Look-aheads never fine-tune.

    **Observation.** ``Box(0, 1, (6 * n_groups + 6,), float32)``: the per-group ``GROUP_FEATURES`` (each a
    block of ``n_groups``) then the ``GLOBAL_FEATURES``.

    **Look-ahead.** :meth:`evaluate_action` scores an action from the current state without advancing; the last
    ``lookahead_cache`` candidates are kept so ``step()`` with an identical action reuses the built model.
    :meth:`lookahead_step` advances to the child without recovery, and :meth:`snapshot` / :meth:`restore` return
    to a state (a cheap reference: states are never modified). For agents: :attr:`pruner`,
    :attr:`group_importance` and :meth:`keep_for_action`.

    :param config: the settings (default: ``PruneEnvConfig()``).
    :param kwargs: settings by name (override ``config``'s); see :class:`PruneEnvConfig`.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: Optional[PruneEnvConfig] = None, **kwargs: Any) -> None:
        super().__init__()
        if config is not None and not isinstance(config, PruneEnvConfig):
            raise TypeError(f"config must be a PruneEnvConfig (or pass settings by name), got {type(config).__name__}")
        if config is None or kwargs:
            base = {} if config is None else {f.name: getattr(config, f.name) for f in fields(config)}
            config = PruneEnvConfig.from_kwargs(**{**base, **kwargs})
        self.config = cfg = config
        self.render_mode = None
        self.action_mode, self.target, self.target_metric = cfg.action_mode, float(cfg.target), cfg.target_metric
        self.n_steps = int(cfg.n_steps)
        #: the metric each step is matched to (``budget``, or ``target_metric`` in distribution mode; None: free)
        self.budget = cfg.step_metric
        self.episode_metric = cfg.episode_metric
        self.alpha, self.beta = float(cfg.alpha), float(cfg.beta)
        self.max_step_sparsity = float(cfg.max_step_sparsity)
        self.target_tolerance = float(cfg.target_tolerance)
        self.max_steps = cfg.step_cap
        self.lookahead_cache = int(cfg.lookahead_cache)
        self.eval_batch_size = int(cfg.eval_batch_size)
        self.device = resolve_device(cfg.device)
        cuda = self.device.type == "cuda"
        self.amp = cuda and cfg.amp
        self.channels_last = cuda and cfg.channels_last

        self.task = task = PruningTask.from_config(cfg, self.device)
        self._estimator = _estimator_for(cfg, task)
        self._teacher_logits: Optional[torch.Tensor] = None
        self.splits, self.input_size = task.splits, task.input_size
        self.val_size, self.split_seed = task.val_size, task.split_seed
        self.original_model = task.model
        self.original_cost = count_costs(self.original_model, self.input_size, device=self.device)
        self._reward_images = RewardData(*task.reward_data, self.eval_batch_size, self.amp, self.channels_last)
        # the single look-ahead builds in this process; the batched one uses config.parallel (started on first use)
        self._serial = SerialBackend(self._reward_images, self.device, overlap=False)
        self._backend: Optional[CandidateBackend] = None

        probe = self._make_pruner(copy.deepcopy(self.original_model))
        self.group_names: List[str] = list(probe.group_names)
        self.n_groups = len(self.group_names)
        if self.n_groups == 0:
            raise ValueError("the model has no prunable channel group (every conv/linear is ignored or is the "
                             "classifier); nothing to prune")
        self.original_channels = np.asarray(probe.num_channels, dtype=np.int64).copy()
        self.layer_counts = np.asarray(probe.layer_counts, dtype=np.int64).copy()
        self.step_filter_budget = step_channel_budget(self.original_channels, self.layer_counts, self.target,
                                                      self.n_steps)
        self._refuse_unreachable_target(probe)
        # the initial state (built at the first reset) reuses the probe: its model is a private copy already
        self._probe: Optional[Pruner] = probe

        self.action_space = spaces.Box(0.0, 1.0, shape=(self.n_groups,), dtype=np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(GROUP_FEATURES) * self.n_groups
                                                             + len(GLOBAL_FEATURES),), dtype=np.float32)
        self._original_accuracy: Optional[float] = None
        self._state: Optional[_State] = None
        self._initial_state: Optional[_State] = None
        # counters live on the env, not on states: restoring a snapshot does not refund evaluations
        self._episode_evaluations = 0
        self.total_evaluations = 0

    # ------------------------------------------------------------------ construction helpers
    def _make_pruner(self, model: nn.Module) -> Pruner:
        return Pruner(model, torch.zeros((1, *self.input_size), device=self.device),
                      ignore=self.config.ignore_layers, min_channels=self.config.min_channels,
                      round_to=self.config.round_to, prune_normalized=self.config.prune_normalized)

    def _refuse_unreachable_target(self, probe: Pruner) -> None:
        """A budget whose target even every group at its channel floor cannot reach is refused before any
        episode (a budget-free episode that cannot reach its target ends truncated instead)."""
        if self.budget is None:
            return
        floor = np.minimum(probe.keep_counts(np.ones(self.n_groups)), self.original_channels)
        most = self._metric(self.episode_metric, floor, probe.plan_cost(keep=floor))
        if most < self.target - self.target_tolerance:
            cfg = self.config
            raise ValueError(f"target={self.target:g} ({self.episode_metric} reduction) is unreachable: with "
                             f"min_channels={cfg.min_channels}, round_to={cfg.round_to} and "
                             f"ignore_layers={list(cfg.ignore_layers)} every group at its floor removes only "
                             f"{most:.4f}; lower target to at most {most:.4f} or lower min_channels / round_to")

    # ------------------------------------------------------------------ public properties
    @property
    def model(self) -> nn.Module:
        """The current (pruned) model; after ``reset()`` a copy of ``original_model`` shared by all episodes.

        Treat it as read-only (copy it before training it yourself): states, snapshots and look-ahead
        candidates reference their models instead of copying them."""
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
    def step_index(self) -> int:
        """Steps taken in this episode."""
        return self._require_state().step_index

    @property
    def n_evaluations(self) -> int:
        """Models evaluated in this episode (look-aheads plus steps that did not reuse one);
        ``total_evaluations`` counts over the env's lifetime."""
        return self._episode_evaluations

    @property
    def original_accuracy(self) -> float:
        """Reward-subset top-1 of the original model (evaluated once)."""
        if self._original_accuracy is None:
            self._original_accuracy = self._evaluate(self.original_model)
        return self._original_accuracy

    @property
    def evaluation_backend(self) -> CandidateBackend:
        """The backend of :meth:`evaluate_actions`, as ``config.parallel`` names it (started on first use)."""
        if self._backend is None:
            self._backend = make_backend(self.config.parallel, self._reward_images, self.device, self._estimator)
        return self._backend

    def keep_for_action(self, action: Any) -> np.ndarray:
        """Kept channels per group that ``step(action)`` would produce from the current state (no evaluation).

        :param action: as for :meth:`step`.
        """
        state = self._require_active()
        return self._step_keep(state, self._validate_action(action)).keep.copy()

    def reduction(self, keep: Any, metric: Optional[str] = None) -> float:
        """Cumulative reduction (vs. the original model) if the current state kept ``keep`` channels per group:
        analytic cost, no evaluation (heuristics search their own kept vectors with it).

        :param keep: channels per group, at most the current widths.
        :param metric: ``"flops"``, ``"params"`` or ``"channels"``; default the step's budget metric, else
            ``target_metric``.
        """
        state = self._require_active()
        return self._reduction(state, np.asarray(keep, dtype=np.int64), metric or self.budget or self.target_metric)

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

    def _evaluate(self, model: nn.Module, teacher: Optional[nn.Module] = None) -> float:
        """The reward's accuracy term of ``model``: the config's ``reward_estimator`` on the reward images
        (``vanilla``: plain top-1). BN statistics and KD batches come from ``task.estimator_data`` (training
        images); ``model`` is left unchanged; the RNG streams of the caller are left alone.

        :param teacher: the KD / agreement teacher (default the original model).
        """
        if self._estimator is None:
            return self._reward_images.accuracy(model, self.device)
        teacher = self.original_model if teacher is None else teacher
        options: Dict[str, Any] = {}
        if self.config.reward_estimator == "teacher_agreement" and teacher is self.original_model:
            if self._teacher_logits is None:  # one teacher pass for every candidate
                self._teacher_logits = logits_on(teacher, self.task.reward_data, self.eval_batch_size)
            options["teacher_logits"] = self._teacher_logits
        return self._estimator(model, teacher, self.task.reward_data, **options)

    def _make_state(self, model: nn.Module, pruner: Pruner, channels: np.ndarray, cost: Cost, accuracy: float,
                    step_index: int, final: bool, teacher: nn.Module, teacher_accuracy: Optional[float],
                    missed: bool = False) -> Tuple[_State, float]:
        """Build a state; its importance only when the episode can go on from it.

        :param pruner: the state's pruner: traced for the initial state, ``parent.child(model, plan)`` after a
            step (same groups without a re-trace).
        :param missed: the step that led here could not reach its budget goal.
        """
        t0 = time.perf_counter()
        importance = np.zeros(self.n_groups)
        end_reason = None
        terminated = truncated = False
        if final:
            terminated = not missed
            truncated = missed
            if missed:
                end_reason = (f"the {self.budget} budget could not be met: no action reaches the target "
                              f"{self.target:g} from here (every group at its channel floor or at "
                              f"max_step_sparsity={self.max_step_sparsity:g})")
        else:
            pruner.compute_importance(self.task.calibration, criterion=self.config.importance,
                                      train_mode=self.config.importance_train_mode)
            importance = pruner.group_importance()
            sync(self.device)
            if self.budget is None:
                stuck = bool(np.all(self._floor_keep(pruner, channels) >= channels))
                if stuck:
                    truncated, end_reason = True, "every group is at its channel floor: nothing left to prune"
                elif step_index >= self.max_steps:
                    truncated, end_reason = True, f"max_steps={self.max_steps} reached short of the target"
        time_importance = time.perf_counter() - t0
        g_macs, g_params = pruner.group_costs()
        state = _State(model=model, pruner=pruner, channels=np.asarray(channels, dtype=np.int64).copy(), cost=cost,
                       accuracy=float(accuracy), step_index=step_index, terminated=terminated, truncated=truncated,
                       group_macs=g_macs, group_params=g_params, importance=importance, teacher=teacher,
                       teacher_accuracy=teacher_accuracy, end_reason=end_reason)
        return state, time_importance

    def _floor_keep(self, pruner: Pruner, channels: np.ndarray) -> np.ndarray:
        """Fewest channels each group may keep (the pruner's floor and rounding)."""
        return np.minimum(np.asarray(pruner.keep_counts(np.full(self.n_groups, 1.0)), dtype=np.int64), channels)

    def _reduction(self, state: _State, keep: np.ndarray, metric: str) -> float:
        """Cumulative reduction in ``metric`` if ``state`` kept ``keep`` channels per group (analytic)."""
        # the channel metric needs no cost: skip the analytic plan cost
        cost = self.original_cost if metric == "channels" else state.pruner.plan_cost(keep=keep)
        return self._metric(metric, keep, cost)

    def _metric(self, metric: str, keep: np.ndarray, cost: Cost) -> float:
        if metric == "channels":
            return channel_sparsity(keep, self.original_channels, self.layer_counts)
        r = reductions(cost, self.original_cost)
        return r.flops if metric == "flops" else r.params

    def _validate_action(self, action: Any) -> np.ndarray:
        try:
            a = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"action must be numeric with shape ({self.n_groups},), got {action!r}") from err
        if a.size != self.n_groups or np.squeeze(a).ndim > 1 or (a.ndim > 1 and a.shape[-1] != self.n_groups):
            raise ValueError(f"action must have shape ({self.n_groups},): one value per prunable group "
                             f"({', '.join(self.group_names[:4])}{', ...' if self.n_groups > 4 else ''}), "
                             f"got shape {a.shape}")
        a = a.reshape(self.n_groups)
        if not np.all(np.isfinite(a)):
            bad = np.flatnonzero(~np.isfinite(a)).tolist()
            raise ValueError(f"action has NaN/inf entries at groups {bad}; every entry must be a finite number "
                             f"in [0, 1]")
        return a

    def _step_keep(self, state: _State, a: np.ndarray) -> StepKeep:
        """Kept channels per group for a validated action at ``state`` (see :func:`keep_for_action`)."""
        pruner, metric = state.pruner, self.budget
        if metric is None:
            return keep_for_action(a, self.action_mode, state.channels, self.layer_counts, pruner.keep_counts,
                                   max_step_sparsity=self.max_step_sparsity)

        def reduction(keep: np.ndarray) -> float:
            return self._reduction(state, keep, metric)

        return keep_for_action(a, self.action_mode, state.channels, self.layer_counts, pruner.keep_counts,
                               reduction=reduction, goal=cumulative_goal(self.target, state.step_index + 1,
                                                                         self.n_steps),
                               max_step_sparsity=self.max_step_sparsity, granularity=pruner.granularity)

    def _build_candidates(self, state: _State, actions: Sequence[np.ndarray],
                          backend: CandidateBackend) -> List[_Candidate]:
        """Plan validated actions here (budget search, analytic cost) and let ``backend`` build and score them;
        the evaluation counters are left to the caller."""
        planned = []

        def plans():  # lazily: a backend with workers scores the first candidates while the next are planned
            for a in actions:
                t0 = time.perf_counter()
                step = self._step_keep(state, a)
                plan = state.pruner.plan(keep=step.keep)
                planned.append((step, plan, state.pruner.plan_cost(plan), time.perf_counter() - t0))
                yield plan

        # the vanilla reward is the backends' own top-1 (overlapped on CUDA); an estimator is the env's
        score = None if self._estimator is None else functools.partial(self._evaluate, teacher=state.teacher)
        scored = backend.evaluate(state.pruner, plans(), score, teacher=state.teacher)
        return [_Candidate(model=s.model, plan=plan, step=step, cost=cost, accuracy=s.accuracy,
                           time_prune=t_plan + s.time_prune, time_eval=s.time_eval)
                for (step, plan, cost, t_plan), s in zip(planned, scored)]

    def _count_evaluation(self) -> None:
        self._episode_evaluations += 1
        self.total_evaluations += 1

    def _remember(self, state: _State, key: bytes, cand: _Candidate) -> None:
        """Cache a new candidate, evicting the least recently used beyond ``lookahead_cache``."""
        if self.lookahead_cache > 0:
            state.candidates[key] = cand
            while len(state.candidates) > self.lookahead_cache:
                state.candidates.popitem(last=False)

    def _candidate(self, state: _State, a: np.ndarray) -> Tuple[_Candidate, bool]:
        key = a.astype(np.float32).tobytes()
        if key in state.candidates:
            state.candidates.move_to_end(key)
            return state.candidates[key], True
        cand = self._build_candidates(state, [a], self._serial)[0]
        self._count_evaluation()
        self._remember(state, key, cand)
        return cand, False

    def _reward(self, accuracy: float, cost: Cost) -> float:
        r = reductions(cost, self.original_cost)
        return accuracy + self.alpha * r.flops + self.beta * r.params

    def _info(self, accuracy: float, cost: Cost, keep: np.ndarray, step: int, n_evaluations: int,
              time_prune: float = 0.0, time_importance: float = 0.0, time_eval: float = 0.0,
              **extra: Any) -> Dict[str, Any]:
        keep = np.asarray(keep, dtype=np.int64)
        timing = self.config.record_timings
        r = reductions(cost, self.original_cost)
        info = {
            "accuracy": float(accuracy),
            "reward": float(self._reward(accuracy, cost)),
            "macs": int(cost.macs),
            "params": int(cost.params),
            "macs_ratio": 1.0 - r.flops,
            "params_ratio": 1.0 - r.params,
            "flops_reduction": r.flops,
            "params_reduction": r.params,
            "channel_sparsity": channel_sparsity(keep, self.original_channels, self.layer_counts),
            "group_sparsity": 1.0 - keep / self.original_channels,
            "kept_channels": keep.copy(),
            "step": int(step),
            "n_evaluations": int(n_evaluations),
            "time_prune": float(time_prune) if timing else 0.0,
            "time_importance": float(time_importance) if timing else 0.0,
            "time_eval": float(time_eval) if timing else 0.0,
        }
        info["target_progress"] = self._metric(self.episode_metric, keep, cost)
        info.update(extra)
        return info

    def _step_info(self, state: _State, cand: _Candidate, cached: bool, **extra: Any) -> Dict[str, Any]:
        step = cand.step
        if step.goal is not None:
            extra.update(budget_goal=step.goal, budget_missed=not step.reachable)
        return self._info(cand.accuracy, cand.cost, step.keep, state.step_index + 1, self._episode_evaluations,
                          0.0 if cached else cand.time_prune, extra.pop("time_importance", 0.0),
                          0.0 if cached else cand.time_eval, step_budget=step.budget, cached=cached, **extra)

    def _observation(self, state: _State) -> np.ndarray:
        orig = self.original_channels.astype(np.float64)
        n = self.n_groups
        imp = state.importance
        imp = imp / imp.max() if imp.size and imp.max() > 0 else np.zeros(n)
        position = np.arange(n) / max(n - 1, 1)
        r = reductions(state.cost, self.original_cost)
        group = np.concatenate([
            orig / orig.max(),
            state.channels / orig,
            state.group_macs / max(self.original_cost.macs, 1),
            state.group_params / max(self.original_cost.params, 1),
            imp,
            position,
        ])
        glob = np.array([
            min(1.0, state.step_index / self.n_steps),
            r.flops,
            r.params,
            channel_sparsity(state.channels, self.original_channels, self.layer_counts),
            state.accuracy,
            self.target,
        ])
        return np.clip(np.concatenate([group, glob]), 0.0, 1.0).astype(np.float32)

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None) -> Tuple[np.ndarray, dict]:
        """Start an episode from the original model (a private copy, traced and scored on the first reset).

        :param seed: seeds ``np_random`` (used for recovery shuffling); the reward subset and calibration
            data are fixed by the config's ``seed``.
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
                pruner.model, pruner, self.original_channels, self.original_cost, self.original_accuracy, 0,
                final=False, teacher=self.original_model,
                teacher_accuracy=self.original_accuracy if self.config.teacher_switch else None)
            t_imp += t_trace
        self._state = self._initial_state
        self._episode_evaluations = 0
        info = self._info(self._state.accuracy, self.original_cost, self.original_channels, 0, 0,
                          time_importance=t_imp)
        return self._observation(self._state), info

    def evaluate_action(self, action: Any) -> Tuple[float, Dict[str, Any]]:
        """Reward and info that ``step(action)`` would give, without advancing (look-ahead).

        The state (model, channels, step, observation) is unchanged; only the evaluation counters move.
        The built candidate is cached, so a following ``step`` with the same action does no pruning work.

        :param action: as for :meth:`step`.
        :return: ``(reward, info)``; ``info["cached"]`` says whether an earlier look-ahead was reused.
        """
        state = self._require_active()
        cand, cached = self._candidate(state, self._validate_action(action))
        info = self._step_info(state, cand, cached, lookahead=True)
        return info["reward"], info

    def evaluate_actions(self, actions: Sequence[Any]) -> Tuple[List[float], List[Dict[str, Any]]]:
        """:meth:`evaluate_action` for several actions from the current state, the new candidates built and
        scored together by ``config.parallel``'s backend (serial, or Ray actors). Rewards, infos, evaluation
        counts and the candidate cache end up exactly as after ``[evaluate_action(a) for a in actions]`` (an
        invalid action raises before anything is evaluated).

        :param actions: actions as for :meth:`step`.
        :return: ``(rewards, infos)``, one of each per action, in order.
        """
        state = self._require_active()
        acts = [self._validate_action(a) for a in actions]
        keys = [a.astype(np.float32).tobytes() for a in acts]
        # replay the loop's cache traffic on the keys alone: the actions it would build are the misses
        lru = OrderedDict.fromkeys(state.candidates)
        misses = []
        for i, key in enumerate(keys):
            if key in lru:
                lru.move_to_end(key)
                continue
            misses.append(i)
            if self.lookahead_cache > 0:
                lru[key] = None
                while len(lru) > self.lookahead_cache:
                    lru.popitem(last=False)
        built = {}
        if misses:
            cands = self._build_candidates(state, [acts[i] for i in misses], self.evaluation_backend)
            built = dict(zip(misses, cands))
        rewards, infos = [], []
        for i, key in enumerate(keys):
            if i in built:
                cand, cached = built[i], False
                self._count_evaluation()
                self._remember(state, key, cand)
            else:
                cand, cached = state.candidates[key], True
                state.candidates.move_to_end(key)
            info = self._step_info(state, cand, cached, lookahead=True)
            rewards.append(info["reward"])
            infos.append(info)
        return rewards, infos

    def step(self, action: Any) -> Tuple[np.ndarray, float, bool, bool, Dict[str, Any]]:
        """Prune the current model with ``action`` and return ``(obs, reward, terminated, truncated, info)``.

        :param action: one value per group (see the class docstring).
        """
        return self._advance(action, recover=True)

    def lookahead_step(self, action: Any) -> Tuple[np.ndarray, float, bool, bool, Dict[str, Any]]:
        """Advance to the state ``step(action)`` would reach, but as a look-ahead: never fine-tunes (no
        recovery), so a deeper tree search (spec §2.5) costs evaluations only. Return with :meth:`restore`.

        :param action: as for :meth:`step`.
        """
        return self._advance(action, recover=False)

    def _advance(self, action: Any, recover: bool) -> Tuple[np.ndarray, float, bool, bool, Dict[str, Any]]:
        state = self._require_active()
        a = self._validate_action(action)
        cand, cached = self._candidate(state, a)
        step_index = state.step_index + 1
        if self.budget is not None:
            final = step_index >= self.n_steps
        else:
            final = self._metric(self.target_metric, cand.step.keep, cand.cost) >= self.target - self.target_tolerance
        recovering = (recover and not final and self.config.recovers
                      and step_index % self.config.recovery_period == 0)
        # the candidate leaves the cache: it becomes the new state's model (recovery or train-mode importance
        # may change it in place)
        state.candidates.pop(a.astype(np.float32).tobytes(), None)
        model, accuracy, extra = cand.model, cand.accuracy, {}
        if model is None:  # scored on a Ray actor: the same surgery again, no evaluation
            model = build_model(state.pruner, cand.plan, self.channels_last)
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
        new_state, t_imp = self._make_state(model, pruner, cand.step.keep, cand.cost, accuracy, step_index, final,
                                            teacher, teacher_accuracy, missed=not cand.step.reachable)
        self._state = new_state
        if new_state.end_reason is not None:
            extra["truncated_reason"] = new_state.end_reason
        info = self._step_info(state, cand, cached, lookahead=not recover, time_importance=t_imp,
                               time_recovery=time_recovery if self.config.record_timings else 0.0, **extra)
        return self._observation(new_state), info["reward"], new_state.terminated, new_state.truncated, info

    def _recover(self, model: nn.Module, teacher: nn.Module) -> float:
        """Fine-tune between steps (KD from ``teacher`` or plain CE) in place; returns the new accuracy."""
        cfg = self.config
        seed = int(self.np_random.integers(2**31 - 1))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            finetune(model, self.splits.train, val_data=self.task.reward_data if cfg.recovery_best_snapshot else None,
                     epochs=max(1, cfg.recovery_epochs),
                     max_batches=cfg.recovery_batches if cfg.recovery_batches > 0 else None, lr=cfg.recovery_lr,
                     teacher=teacher if cfg.recovery == "kd" else None, T=cfg.kd_T, soft_weight=cfg.kd_soft_weight,
                     batch_size=cfg.recovery_batch_size, device=self.device, amp=self.amp, seed=seed, progress=False)
        model.eval()
        return self._evaluate(model, teacher)

    def snapshot(self) -> _State:
        """The current state, to return to with :meth:`restore` (a reference; states are immutable)."""
        return self._require_state()

    def restore(self, snap: _State) -> np.ndarray:
        """Return to a state from :meth:`snapshot` of this env; returns its observation.

        :param snap: an object returned by ``snapshot()``.
        """
        if not isinstance(snap, _State):
            raise TypeError(f"restore() takes an object returned by snapshot(), got {type(snap).__name__}")
        self._state = snap
        return self._observation(snap)

    def close(self) -> None:
        """Release the models and cached tensors."""
        self._state = None
        self._initial_state = None
        self._probe = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        super().close()


__all__ = ["PruneEnv", "GROUP_FEATURES", "GLOBAL_FEATURES"]
