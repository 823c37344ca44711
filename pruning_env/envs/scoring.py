"""Candidate scoring, the one work object of the pruning env's look-ahead: :class:`CandidateScorer` builds a pruned
candidate from its plan, estimates its accuracy and turns it into the reward; :class:`CandidateCache` keeps a state's.

The scorer owns the reward images, the reward estimator (with its training images and per-estimate seed), the
teacher logits it caches, the reward's top-1 and the reward formula. The serial backend calls it in this process and
every Ray actor holds a copy of it (``envs/parallel.py``), so both score a candidate with the same code, as SB3's
``DummyVecEnv`` and ``SubprocVecEnv`` step the same env.
"""
from __future__ import annotations

import copy
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from pruning_env.costs import Cost, Reductions, reductions
from pruning_env.envs.budget import StepKeep
from pruning_env.envs.reward import REWARD_ESTIMATORS, logits_on, make_estimator
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
    """

    def __init__(self, estimator: str, options: Dict[str, Any], reward_images: Batch, train_images: Optional[Batch],
                 original: Cost, alpha: float, beta: float, batch_size: int, amp: bool = False,
                 channels_last: bool = False, seed: int = 0) -> None:
        self.estimator = estimator
        self.spec = REWARD_ESTIMATORS[estimator]
        self.options = dict(options)
        self._fn = make_estimator(estimator, **self.options)
        self.x, self.y = reward_images
        self.train_images = train_images
        self.original = original
        self.alpha, self.beta = float(alpha), float(beta)
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
        return cls(cfg.reward_estimator, spec.options_from(cfg), task.reward_data, task.estimator_data, original,
                   cfg.alpha, cfg.beta, cfg.eval_batch_size, amp=cuda and cfg.amp,
                   channels_last=cuda and cfg.channels_last, seed=int(cfg.seed or 0))

    # ---------------------------------------------------------------- where it runs
    @property
    def device(self) -> torch.device:
        """Where the reward images (and so the candidates) are."""
        return self.x.device

    @property
    def needs_teacher(self) -> bool:
        """Whether the estimate depends on the teacher (a Ray actor then receives each state's)."""
        return self.spec.teacher

    @property
    def queues_top1(self) -> bool:
        """Whether the accuracy is the plain top-1 that :meth:`top1_hits` queues without a sync (``vanilla``)."""
        return self.spec.plain_top1

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
        """The reward's accuracy term of ``model`` (left unchanged, its train/eval flag restored).

        :param model: a built candidate, or any model of the task (the original, a recovered one).
        :param teacher: the KD / agreement teacher of the state.
        """
        if self.queues_top1:
            was_training = model.training
            model.eval()
            try:
                return int(self.top1_hits(model)) / self.n_images
            finally:
                model.train(was_training)
        extra = {"teacher_logits": self._logits_of(teacher)} if self.spec.teacher_logits else {}
        with TorchRNG(self.seed, model_device(model)):
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

    def reductions(self, cost: Cost) -> Reductions:
        """Fractions of the original cost that ``cost`` removes."""
        return reductions(cost, self.original)

    def reward(self, accuracy: float, r: Reductions) -> float:
        """The reward of an accuracy estimate at reductions ``r``: ``accuracy + alpha * r.flops + beta * r.params``."""
        return float(accuracy) + self.alpha * r.flops + self.beta * r.params

    def candidates(self, backend: "CandidateBackend", pruner: Pruner, steps: Iterable[StepKeep],
                   teacher: Optional[nn.Module]) -> List[Candidate]:
        """Plan each step's kept channels here (analytic cost) and let ``backend`` build and score them: the one
        path from kept channels to rewarded candidates (an estimator that refines its best candidates, e.g. with a
        short fine-tune, would do it here, through the same backend).

        :param backend: where candidates are scored (``envs/parallel.py``).
        :param pruner: the state's pruner.
        :param steps: budget-mapped actions, consumed lazily: a backend with workers scores the first candidates
            while the next are planned (their budget search included).
        :param teacher: the state's teacher.
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
            out.append(Candidate(s.model, plan, step, cost, r, s.accuracy, self.reward(s.accuracy, r),
                                 t_plan + s.time_prune, s.time_eval))
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
