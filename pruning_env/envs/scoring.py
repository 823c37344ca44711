"""Candidate scoring, the one work object of the pruning env's look-ahead: :class:`CandidateScorer` builds a pruned
candidate from its plan, estimates its accuracy and turns it into the reward; :class:`CandidateCache` keeps a state's.

The scorer owns the reward images, the reward estimator (with its training images and per-estimate seed), the
teacher logits it caches, the reward's top-1, the reward formula and, for a multi-fidelity estimator, the
refinement of a batch's best candidates. The serial backend calls it in this process and
every Ray actor holds a copy of it (``envs/parallel.py``), so both score a candidate with the same code, as SB3's
``DummyVecEnv`` and ``SubprocVecEnv`` step the same env.
"""
from __future__ import annotations

import copy
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from pruning_env.costs import Cost, Reductions, reductions
from pruning_env.envs.budget import StepKeep
from pruning_env.envs.reward import CHEAP_ESTIMATORS, REWARD_ESTIMATORS, EstimatorSpec, logits_on, make_estimator
from pruning_env.pruning import Pruner, PrunePlan
from pruning_env.runtime import TorchRNG, model_device, sync
from pruning_env.training import iter_batches, model_logits

if TYPE_CHECKING:
    from pruning_env.envs.config import PruneEnvConfig
    from pruning_env.envs.parallel import CandidateBackend
    from pruning_env.envs.task import PruningTask

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class Scored:
    """One candidate as a backend returns it.

    :param model: the pruned model, or None when it was built elsewhere (a Ray actor): the env rebuilds it from
        the plan when the candidate is stepped (surgery is deterministic).
    :param accuracy: the reward's accuracy term.
    :param time_prune: seconds of surgery.
    :param time_eval: seconds of the estimate.
    """

    model: Optional[nn.Module]
    accuracy: float
    time_prune: float
    time_eval: float


@dataclass
class Candidate:
    """A pruned candidate of one state, with everything a step or a look-ahead reports.

    :param model: the pruned model (None when a Ray actor built it: rebuilt from ``plan`` if it is stepped).
    :param plan: the plan it was built from.
    :param step: how the action's budget was met (kept channels, goal, reachability).
    :param cost: its analytic cost.
    :param reductions: its reductions against the original model, computed once.
    :param accuracy: the reward's accuracy term.
    :param reward: the reward.
    :param time_prune: seconds of budget search, planning and surgery.
    :param time_eval: seconds of the estimate.
    :param cheap_accuracy: the cheap estimate (equal to ``accuracy`` unless refined).
    :param refined: a multi-fidelity refinement gave ``accuracy``.
    :param evaluations: models evaluated for it: 1, or 2 when refined (the search's cost unit).
    :param train_batches: SGD batches its estimates trained (``short_kd``'s, a refinement's fine-tune).
    """

    model: Optional[nn.Module]
    plan: PrunePlan
    step: StepKeep
    cost: Cost
    reductions: Reductions
    accuracy: float
    reward: float
    time_prune: float
    time_eval: float
    cheap_accuracy: float
    refined: bool = False
    evaluations: int = 1
    train_batches: int = 0


def build_model(pruner: Pruner, plan: PrunePlan, channels_last: bool = False) -> nn.Module:
    """The candidate model of ``plan``, ready for evaluation: the one way a candidate is built.

    :param pruner: the state's pruner.
    :param plan: a :class:`~pruning_env.pruning.PrunePlan` of that pruner.
    :param channels_last: convert to channels-last memory format (CUDA evaluation).
    """
    model = pruner.apply(plan)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


class CandidateScorer:
    """Scores pruned candidates: ``accuracy`` is the reward estimator on the reward images, ``reward`` is
    ``accuracy + alpha * flops_reduction + beta * params_reduction``. Picklable: a Ray actor receives one copy
    (:meth:`to` its device) and scores exactly as the env's own.

    The estimator runs on a private torch RNG stream seeded with ``seed`` for every estimate (the same model gets
    the same estimate, the caller's RNG is left alone); the teacher's logits on the reward images are computed
    once per teacher for estimators that read them. ``vanilla`` (an entry with ``plain_top1``) is the scorer's own
    top-1 (AMP / channels-last on CUDA), which a backend may queue without waiting (:meth:`top1_hits`).

    A multi-fidelity estimator (an entry with ``refine_top``, e.g. ``multi_fidelity``) scores every candidate with
    its cheap ``base`` estimator (:meth:`accuracy`, :meth:`score`); :meth:`candidates` then refines the
    ``refine_top`` best of a batch (:meth:`refine`). ``kd_refined`` (built on a ``base`` with no ``refine_top``)
    gives every estimate that refined score.

    :param estimator: a name in :data:`~pruning_env.envs.reward.REWARD_ESTIMATORS`.
    :param options: its keyword options.
    :param reward_images: the reward's validation images ``(x, y)``, on the scoring device.
    :param train_images: training images for the estimator (BN statistics, KD batches), or None.
    :param original: the original model's cost (reductions are relative to it).
    :param alpha: weight of the FLOPs reduction.
    :param beta: weight of the params reduction.
    :param batch_size: evaluation batch size of the top-1.
    :param amp: float16 autocast of the top-1 on CUDA.
    :param channels_last: build and evaluate candidates channels-last.
    :param seed: the per-estimate seed.
    :param base_options: a multi-fidelity estimator's: the keyword options of its cheap ``base`` estimator.
    :param refine_top: a multi-fidelity estimator's: candidates of a batch refined (>= 1).
    """

    def __init__(self, estimator: str, options: Dict[str, Any], reward_images: Batch, train_images: Optional[Batch],
                 original: Cost, alpha: float, beta: float, batch_size: int, amp: bool = False,
                 channels_last: bool = False, seed: int = 0, base_options: Optional[Dict[str, Any]] = None,
                 refine_top: int = 2) -> None:
        self.estimator = estimator
        self.options = dict(options)
        make_estimator(estimator, **self.options)  # an unknown name or option is refused here
        self.refine_spec: Optional[EstimatorSpec] = None
        self.refine_top = 0
        #: every estimate is the refined one (``kd_refined``: an entry built on a ``base`` with no ``refine_top``)
        self.refine_all = False
        cheap, cheap_options = estimator, self.options
        entry = REWARD_ESTIMATORS[estimator]
        if "base" in entry.options:  # built on a cheap estimator: multi-fidelity, or refined for every candidate
            if entry.refine_top is not None:
                if int(refine_top) < 1:
                    raise ValueError(f"refine_top must be an integer >= 1, got {refine_top!r}")
                self.refine_top = int(refine_top)
            else:
                self.refine_all = True
            self.refine_spec = entry
            cheap = self.options.pop("base", self.refine_spec.default("base"))
            if cheap not in CHEAP_ESTIMATORS:
                raise ValueError(f"{estimator}'s base must score one candidate on its own, one of "
                                 f"{CHEAP_ESTIMATORS}; got {cheap!r}")
            cheap_options = dict(base_options or {})
            self._refine_fn = make_estimator(estimator, **self.options)
        self.cheap = cheap
        self.spec = REWARD_ESTIMATORS[cheap]
        self._fn = make_estimator(cheap, **cheap_options)
        #: SGD batches of one cheap estimate, and of one refinement (its fine-tune, then the cheap estimate again)
        self.cheap_batches = self.spec.batches_per_call(cheap_options)
        self.refine_batches = (self.refine_spec.batches_per_call(self.options) + self.cheap_batches
                               if self.refine_spec is not None else 0)
        #: SGD batches of one estimate of :meth:`accuracy` / :meth:`score`
        self.score_batches = self.refine_batches if self.refine_all else self.cheap_batches
        self.x, self.y = reward_images
        self.train_images = train_images
        self.original = original
        self.alpha, self.beta = float(alpha), float(beta)
        self.gamma = 0.0  # weight of the predicted latency reduction: set with the latency model by use_latency
        self.latency_reduction: Optional[Callable[[np.ndarray], float]] = None
        self.batch_size, self.amp, self.channels_last = int(batch_size), bool(amp), bool(channels_last)
        self.seed = int(seed)
        self._teacher: Optional[nn.Module] = None  # the teacher whose logits are cached (held: ids are not reused)
        self._teacher_logits: Optional[torch.Tensor] = None

    @classmethod
    def from_config(cls, cfg: "PruneEnvConfig", task: "PruningTask", original: Cost,
                    device: torch.device) -> "CandidateScorer":
        """The scorer of an env: its estimator and options from the config, its images from the task.

        :param cfg: the env config.
        :param task: the env's task (reward images, estimator training images).
        :param original: the original model's cost.
        :param device: the env's device (AMP and channels-last apply on CUDA only).
        """
        cuda = torch.device(device).type == "cuda"
        spec = REWARD_ESTIMATORS[cfg.reward_estimator]
        refine: Dict[str, Any] = {}
        if "base" in spec.options:  # built on a cheap estimator: the base's own options (and how many are refined)
            refine = dict(base_options=REWARD_ESTIMATORS[cfg.reward_refine_base].options_from(cfg))
            if spec.refine_top is not None:
                refine["refine_top"] = getattr(cfg, spec.refine_top)
        return cls(cfg.reward_estimator, spec.options_from(cfg), task.reward_data, task.estimator_data, original,
                   cfg.alpha, cfg.beta, cfg.eval_batch_size, amp=cuda and cfg.amp,
                   channels_last=cuda and cfg.channels_last, seed=int(cfg.seed or 0), **refine)

    # ---------------------------------------------------------------- where it runs
    @property
    def device(self) -> torch.device:
        """Where the reward images (and so the candidates) are."""
        return self.x.device

    @property
    def needs_teacher(self) -> bool:
        """Whether the estimate depends on the teacher (a Ray actor then receives each state's)."""
        return self.spec.teacher or self.refine_spec is not None

    @property
    def refines(self) -> bool:
        """Whether the estimator is multi-fidelity: :meth:`candidates` refines a batch's best candidates."""
        return self.refine_top > 0

    @property
    def queues_top1(self) -> bool:
        """Whether the accuracy is the plain top-1 that :meth:`top1_hits` queues without a sync (``vanilla``)."""
        return self.spec.plain_top1 and not self.refine_all

    @property
    def n_images(self) -> int:
        """Reward images."""
        return len(self.y)

    def to(self, device: torch.device) -> "CandidateScorer":
        """The same scorer with its images on ``device`` (the teacher-logit cache is not carried)."""
        other = copy.copy(self)
        other.x, other.y = self.x.to(device), self.y.to(device)
        if self.train_images is not None:
            other.train_images = tuple(t.to(device) for t in self.train_images)
        other._teacher = other._teacher_logits = None
        return other

    def with_images(self, images: Batch, seed: int) -> "CandidateScorer":
        """The same estimator and reward on other validation images ``images`` (on this scorer's device), with
        its own per-estimate ``seed`` (other KD batches and BN draws): an independent re-measurement."""
        other = copy.copy(self)
        other.x, other.y = images[0].to(self.device), images[1].to(self.device)
        other.seed = int(seed)
        other._teacher = other._teacher_logits = None
        return other

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_teacher"] = state["_teacher_logits"] = None  # an actor computes its own
        return state

    # ---------------------------------------------------------------- scoring
    def build(self, pruner: Pruner, plan: PrunePlan) -> nn.Module:
        """The candidate model of ``plan`` (see :func:`build_model`)."""
        return build_model(pruner, plan, self.channels_last)

    def top1_hits(self, model: nn.Module) -> torch.Tensor:
        """Queue the reward top-1 of ``model`` (eval mode) without waiting: the hit count stays on the device
        (0-dim int64) until read; ``hits / n_images`` is :meth:`accuracy` under ``vanilla``."""
        device = self.device
        use_amp = self.amp and device.type == "cuda"
        hits = torch.zeros((), dtype=torch.int64, device=device)
        with torch.no_grad():
            for x, y in iter_batches((self.x, self.y), self.batch_size):
                if self.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    logits = model_logits(model(x))
                top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
                hits += top[:, 0].eq(y).sum()
        return hits

    def accuracy(self, model: nn.Module, teacher: Optional[nn.Module]) -> float:
        """The reward's accuracy term of ``model`` (left unchanged, its train/eval flag restored); a multi-fidelity
        estimator's cheap one.

        :param model: a built candidate, or any model of the task (the original, a recovered one).
        :param teacher: the KD / agreement teacher of the state.
        """
        if self.refine_all:
            return self._refined(model, teacher)
        if self.queues_top1:
            return self._top1(model)
        with TorchRNG(self.seed, model_device(model)):
            return self._estimate(model, teacher)

    def _top1(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            return int(self.top1_hits(model)) / self.n_images
        finally:
            model.train(was_training)

    def _estimate(self, model: nn.Module, teacher: Optional[nn.Module]) -> float:
        """The cheap estimate, on the caller's RNG stream."""
        if self.queues_top1:
            return self._top1(model)
        extra = {"teacher_logits": self._logits_of(teacher)} if self.spec.teacher_logits else {}
        return float(self._fn(model, teacher, (self.x, self.y), self.train_images, **extra))

    def _logits_of(self, teacher: Optional[nn.Module]) -> Optional[torch.Tensor]:
        if teacher is None:
            return None
        if teacher is not self._teacher:  # one teacher pass for every candidate of every state it teaches
            self._teacher, self._teacher_logits = teacher, logits_on(teacher, (self.x, self.y), self.batch_size)
        return self._teacher_logits

    def score(self, pruner: Pruner, plan: PrunePlan, teacher: Optional[nn.Module]) -> Scored:
        """Build the candidate of ``plan`` and estimate its accuracy (timed): what every backend runs per candidate.

        :param pruner: the state's pruner (importance computed).
        :param plan: a plan of that pruner.
        :param teacher: the state's teacher.
        """
        t0 = time.perf_counter()
        model = self.build(pruner, plan)
        sync(self.device)  # the surgery's device work counts as pruning time
        t1 = time.perf_counter()
        accuracy = self.accuracy(model, teacher)
        return Scored(model, accuracy, t1 - t0, time.perf_counter() - t1)

    def refine(self, pruner: Pruner, plan: PrunePlan, teacher: Optional[nn.Module]) -> Scored:
        """Build the candidate of ``plan`` and give its refined score (timed; multi-fidelity estimators): the cheap
        estimate of a copy after the estimator's short KD fine-tune on training images. What a backend runs per
        refined candidate (``method="refine"``); the candidate itself is left unchanged.

        :param pruner: the state's pruner (importance computed).
        :param plan: a plan of that pruner.
        :param teacher: the state's teacher (the fine-tune's).
        """
        if not self.refines:
            raise RuntimeError(f"the {self.estimator!r} estimator does not refine candidates (no refine_top entry)")
        t0 = time.perf_counter()
        model = self.build(pruner, plan)
        sync(self.device)
        t1 = time.perf_counter()
        accuracy = self._refined(model, teacher)
        return Scored(None, accuracy, t1 - t0, time.perf_counter() - t1)

    def _refined(self, model: nn.Module, teacher: Optional[nn.Module]) -> float:
        """The cheap estimate of a copy of ``model`` after the estimator's short KD fine-tune (its own RNG stream)."""
        with TorchRNG(self.seed, model_device(model)):
            base = self._top1 if self.spec.plain_top1 else (lambda net: self._estimate(net, teacher))
            return float(self._refine_fn(model, teacher, (self.x, self.y), self.train_images,
                                         base=lambda net, *_: base(net)))

    def reductions(self, cost: Cost) -> Reductions:
        """Fractions of the original cost that ``cost`` removes."""
        return reductions(cost, self.original)

    def use_latency(self, gamma: float, latency_reduction: Callable[[np.ndarray], float]) -> None:
        """Add ``gamma * latency_reduction(keep)`` (the predicted latency reduction of the kept channels) to every
        reward (``ReductionMeter.latency_reduction``)."""
        self.gamma, self.latency_reduction = float(gamma), latency_reduction

    def reward(self, accuracy: float, r: Reductions, keep: Optional[np.ndarray] = None) -> float:
        """The reward of an accuracy estimate at reductions ``r`` of kept channels ``keep``:
        ``accuracy + alpha * r.flops + beta * r.params + gamma * latency_reduction(keep)`` (the last term only
        when ``gamma != 0``)."""
        out = float(accuracy) + self.alpha * r.flops + self.beta * r.params
        if self.gamma != 0:
            if keep is None or self.latency_reduction is None:
                raise ValueError("gamma != 0 needs the kept channels and the latency model (use_latency)")
            out += self.gamma * self.latency_reduction(keep)
        return out

    def candidates(self, backend: "CandidateBackend", pruner: Pruner, steps: Iterable[StepKeep],
                   teacher: Optional[nn.Module], refine: bool = False,
                   max_evaluations: Optional[int] = None) -> List[Candidate]:
        """Plan each step's kept channels here (analytic cost) and let ``backend`` build and score them: the one
        path from kept channels to rewarded candidates.

        With a multi-fidelity estimator and ``refine``, the ``refine_top`` candidates with the best cheap rewards
        (ties: the earlier) are then refined through the same backend (:meth:`refine`): a refined candidate's
        accuracy is the better of its cheap and its refined score (a fine-tune that keeps its best snapshot, the
        start included), so no unrefined candidate of the batch rewards more than the best refined one; the others
        keep their cheap rewards. A refined candidate counts two evaluations and its fine-tune's batches.

        :param backend: where candidates are scored (``envs/parallel.py``).
        :param pruner: the state's pruner.
        :param steps: budget-mapped actions, consumed lazily: a backend with workers scores the first candidates
            while the next are planned (their budget search included).
        :param teacher: the state's teacher.
        :param refine: refine the batch's best (a batched look-ahead; a single candidate keeps its cheap score).
        :param max_evaluations: evaluations the batch may use, refinements included: fewer candidates are refined
            when the cheap ones leave less room (None: no limit).
        """
        planned: List[Tuple[StepKeep, PrunePlan, Cost, float]] = []

        def plans() -> Iterator[PrunePlan]:
            source = iter(steps)
            while True:
                t0 = time.perf_counter()
                step = next(source, None)
                if step is None:
                    return
                plan = pruner.plan(keep=step.keep)
                planned.append((step, plan, pruner.plan_cost(plan), time.perf_counter() - t0))
                yield plan

        scored = backend.evaluate(pruner, plans(), teacher)
        out = []
        for (step, plan, cost, t_plan), s in zip(planned, scored):
            r = self.reductions(cost)
            out.append(Candidate(s.model, plan, step, cost, r, s.accuracy, self.reward(s.accuracy, r, step.keep),
                                 t_plan + s.time_prune, s.time_eval, s.accuracy, train_batches=self.score_batches))
        n = min(self.refine_top if refine else 0, len(out))
        if max_evaluations is not None:
            n = max(0, min(n, int(max_evaluations) - len(out)))
        best = sorted(range(len(out)), key=lambda i: -out[i].reward)[:n]  # a stable sort: ties go to the earlier
        refined = backend.evaluate(pruner, [out[i].plan for i in best], teacher, method="refine") if best else []
        for i, s in zip(best, refined):
            c = out[i]
            accuracy = max(c.accuracy, s.accuracy)  # a diverged fine-tune (NaN) keeps the cheap score too
            out[i] = replace(c, accuracy=accuracy, reward=self.reward(accuracy, c.reductions, c.step.keep), refined=True,
                             evaluations=2, train_batches=c.train_batches + self.refine_batches,
                             time_prune=c.time_prune + s.time_prune, time_eval=c.time_eval + s.time_eval)
        return out


class CandidateCache:
    """A state's built candidates by action, least recently used first: a step or look-ahead with an action seen
    before reuses its candidate. The capacity is given with each insertion (an agent may raise the env's
    ``lookahead_cache`` during a run); 0 keeps nothing."""

    def __init__(self) -> None:
        self._items: "OrderedDict[bytes, Any]" = OrderedDict()

    @staticmethod
    def key(action: np.ndarray) -> bytes:
        """The cache key of a validated action (its float32 bytes: the precision of the action space)."""
        return np.asarray(action, dtype=np.float32).tobytes()

    def get(self, key: bytes) -> Optional[Any]:
        """The cached candidate (now the most recently used), or None."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: bytes, candidate: Any, capacity: int) -> None:
        """Cache a new candidate, evicting the least recently used beyond ``capacity``."""
        if capacity > 0:
            self._items[key] = candidate
            while len(self._items) > capacity:
                self._items.popitem(last=False)

    def pop(self, key: bytes) -> Optional[Any]:
        """Take a candidate out (it becomes a state's model), or None."""
        return self._items.pop(key, None)

    def resolve(self, keys: Sequence[bytes], capacity: int,
                build: Callable[[List[int]], List[Any]]) -> List[Tuple[Any, bool]]:
        """``(candidate, cached)`` per key, exactly as looking each up in turn and caching it on a miss would give:
        the misses are found on the keys alone first, so ``build`` makes them all in one batch.

        :param keys: :meth:`key` of each action, in order.
        :param capacity: the cache's size.
        :param build: positions in ``keys`` -> their new candidates, in order (called once, only with misses).
        """
        shadow = CandidateCache()
        shadow._items = OrderedDict.fromkeys(self._items, True)
        misses = []
        for i, key in enumerate(keys):
            if shadow.get(key) is None:
                misses.append(i)
                shadow.put(key, True, capacity)
        built = dict(zip(misses, build(misses))) if misses else {}
        out = []
        for i, key in enumerate(keys):
            if i in built:
                self.put(key, built[i], capacity)
                out.append((built[i], False))
            else:
                out.append((self.get(key), True))
        return out

    def clear(self) -> None:
        """Drop every candidate."""
        self._items.clear()

    def __getitem__(self, key: bytes) -> Any:
        return self._items[key]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


__all__ = ["CandidateScorer", "CandidateCache", "Candidate", "Scored", "build_model"]
