"""Candidate-evaluation backends of the pruning env's batched look-ahead: score many pruned candidates of one
state in this process (``serial``) or on long-lived Ray actors (``ray``), with identical accuracies.

The env maps each action to kept channels per group (cheap and analytic); a backend turns the state's
:class:`~pruning_env.pruning.Pruner` (groups and importance, computed once per state in the env's process) and
the plans into pruned models and reward-image accuracies. Ray actors need no calibration data for that.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import os
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from pruning_env.envs.reward import BoundEstimator
from pruning_env.pruning import Pruner, PrunePlan
from pruning_env.runtime import sync
from pruning_env.training import iter_batches, model_logits

BACKENDS = ("serial", "ray")


@dataclass
class ParallelConfig:
    """How the env's batched look-ahead (``env.evaluate_actions``) evaluates candidates: the ``parallel``
    section of a run config, e.g. ``parallel: {backend: ray, num_workers: 8}``."""

    backend: str = "serial"
    """``"serial"`` (this process, no extra dependency) or ``"ray"`` (Ray actors, ``pip install -e ".[ray]"``;
    they run the env's ``reward_estimator`` themselves, with the same result)."""
    num_workers: int = 2
    """Ray actors, each with one CPU thread (CPU env) or one GPU (CUDA env); >= 1, ignored by ``serial``."""
    address: Optional[str] = None
    """Ray cluster to attach to (``ray.init(address=...)``: ``"auto"``, ``"ray://head:10001"``); None starts a
    local one on this machine."""
    max_restarts: int = 3
    """times Ray restarts a dead actor (its candidates are retried on it, then re-run on another actor); >= 0."""
    overlap: Optional[bool] = None
    """serial backend: build the next candidate while the device evaluates the current one, one sync per batch;
    None = on CUDA only."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"parallel.backend must be one of {BACKENDS}, got {self.backend!r}")
        for name, low in (("num_workers", 1), ("max_restarts", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"parallel.{name} must be an integer >= {low}, got {value!r}")
        if self.address is not None and not isinstance(self.address, str):
            raise TypeError(f"parallel.address must be None or a Ray address string such as 'auto', "
                            f"got {type(self.address).__name__} {self.address!r}")
        if self.overlap is not None and not isinstance(self.overlap, bool):
            raise TypeError(f"parallel.overlap must be None, true or false, got {self.overlap!r}")

    @classmethod
    def from_dict(cls, values: Union["ParallelConfig", Mapping[str, Any], None]) -> "ParallelConfig":
        """A config from a mapping (a YAML section), naming any unknown key.

        :param values: the section; None gives the defaults, a ``ParallelConfig`` is returned as is.
        """
        if values is None:
            return cls()
        if isinstance(values, cls):
            return values
        if not isinstance(values, Mapping):
            raise TypeError(f"parallel must be a mapping such as {{backend: ray, num_workers: 2}}, got {values!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown parallel key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**dict(values))


@dataclass
class RewardData:
    """The reward images and how they are evaluated: what every backend (and every Ray actor) holds once.

    :param x: preloaded validation images.
    :param y: their labels.
    :param batch_size: evaluation batch size.
    :param amp: float16 autocast on CUDA.
    :param channels_last: channels-last evaluation on CUDA.
    """

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    amp: bool = False
    channels_last: bool = False

    def to(self, device: torch.device) -> "RewardData":
        """The same data on ``device``."""
        return RewardData(self.x.to(device), self.y.to(device), self.batch_size, self.amp, self.channels_last)

    def accuracy(self, model: nn.Module, device: torch.device) -> float:
        """Top-1 (a fraction) of ``model`` on the reward images: the env's reward accuracy.

        :param model: the pruned model.
        :param device: where it runs.
        """
        was_training = model.training
        model.eval()
        try:
            return int(self.launch(model, device)) / len(self.y)
        finally:
            model.train(was_training)

    def launch(self, model: nn.Module, device: torch.device) -> torch.Tensor:
        """Queue the evaluation of ``model`` without waiting for it: the top-1 hit count stays on the device
        (0-dim int64 tensor) until the caller reads it. ``count / len(y)`` equals :meth:`accuracy` (same
        batches, same ``topk``, same autocast: it is the one top-1 of the env's reward path).

        :param model: the pruned model, in eval mode.
        :param device: where it runs.
        """
        use_amp = self.amp and device.type == "cuda"
        hits = torch.zeros((), dtype=torch.int64, device=device)
        with torch.no_grad():
            for x, y in iter_batches((self.x, self.y), self.batch_size):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # no-op when already there
                if self.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    logits = model_logits(model(x))
                logits = logits.float()
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hits += top[:, 0].eq(y).sum()
        return hits


@dataclass
class Scored:
    """One evaluated candidate.

    :param model: the pruned model, or None when it was built elsewhere (a Ray actor): the env rebuilds it
        from the plan when the candidate is stepped (surgery is deterministic).
    :param accuracy: reward-image top-1.
    :param time_prune: seconds of plan and surgery.
    :param time_eval: seconds of evaluation.
    """

    model: Optional[nn.Module]
    accuracy: float
    time_prune: float
    time_eval: float


def build_model(pruner: Pruner, plan: PrunePlan, channels_last: bool = False) -> nn.Module:
    """The candidate model of ``plan``, ready for evaluation: the one way every backend (and the env, for a
    candidate scored elsewhere) builds it.

    :param pruner: the state's pruner.
    :param plan: a :class:`~pruning_env.pruning.PrunePlan` of that pruner.
    :param channels_last: convert to channels-last memory format (CUDA evaluation).
    """
    model = pruner.apply(plan)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


class SerialBackend:
    """Candidates one after another in this process: the same work as the env's single look-ahead in a loop.

    With ``overlap`` (default on CUDA) the next candidate's surgery runs on the CPU while the device still
    evaluates the current one; the hit counts stay on the device and the batch syncs once at the end.

    :param reward: reward images on ``device``.
    :param device: where candidates are evaluated.
    :param overlap: see above; None = on CUDA only.
    """

    name = "serial"

    def __init__(self, reward: RewardData, device: torch.device, overlap: Optional[bool] = None) -> None:
        self.reward = reward
        self.device = torch.device(device)
        self.overlap = self.device.type == "cuda" if overlap is None else bool(overlap)
        self._side: Optional[torch.cuda.Stream] = None

    def evaluate(self, pruner: Pruner, plans: Iterable[PrunePlan],
                 score: Optional[Callable[[nn.Module], float]] = None,
                 teacher: Optional[nn.Module] = None) -> List[Scored]:
        """Build and score one candidate per plan.

        :param pruner: the state's pruner (importance computed).
        :param plans: :class:`~pruning_env.pruning.PrunePlan` of ``pruner``, one per candidate.
        :param score: the reward's accuracy term of a built model when it is not the plain top-1 of
            :class:`RewardData` (a reward estimator); candidates are then scored one after another.
        :param teacher: unused here (``score`` already holds it); the Ray backend ships it to its actors.
        """
        channels_last = self.reward.channels_last
        if not self.overlap or score is not None:
            score = score or functools.partial(self.reward.accuracy, device=self.device)
            out = []
            for plan in plans:
                t0 = time.perf_counter()
                model = build_model(pruner, plan, channels_last)
                sync(self.device)  # the surgery's device work counts as pruning time
                t1 = time.perf_counter()
                accuracy = score(model)
                out.append(Scored(model, accuracy, t1 - t0, time.perf_counter() - t1))
            return out
        t_start = time.perf_counter()
        models, hits, prune_times = [], [], []
        cuda = self.device.type == "cuda"
        if cuda:
            if self._side is None:
                self._side = torch.cuda.Stream(self.device)
            self._side.wait_stream(torch.cuda.current_stream(self.device))  # the state's weights are ready
        for plan in plans:
            t0 = time.perf_counter()
            # surgery on a side stream: its host-to-device index copies wait for that stream only, not for the
            # evaluation still running on the main stream
            with torch.cuda.stream(self._side) if cuda else contextlib.nullcontext():
                model = build_model(pruner, plan, channels_last)
            if cuda:
                main = torch.cuda.current_stream(self.device)
                main.wait_stream(self._side)
                for t in itertools.chain(model.parameters(), model.buffers()):
                    t.record_stream(main)  # freed later: memory goes back only after the main stream's work on it
            prune_times.append(time.perf_counter() - t0)
            models.append(model)
            hits.append(self.reward.launch(model, self.device))
        counts = torch.stack(hits).tolist() if hits else []  # the batch's one sync
        # evaluation overlaps surgery: charge the wall time not spent in surgery evenly to the candidates
        t_eval = max(time.perf_counter() - t_start - sum(prune_times), 0.0) / max(len(models), 1)
        n = len(self.reward.y)
        return [Scored(m, c / n, tp, t_eval) for m, c, tp in zip(models, counts, prune_times)]

    def close(self) -> None:
        """Nothing to release."""


class RayNotInstalledError(ImportError):
    """``parallel.backend: ray`` was asked for but Ray is not installed."""


def import_ray() -> Any:
    """The ``ray`` module, or :class:`RayNotInstalledError` saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise RayNotInstalledError(
            "parallel.backend='ray' needs Ray, which is not installed: `pip install \"ray>=2.9\"` (in a clone: "
            "`pip install -e \".[ray]\"`), or use parallel.backend='serial'") from err
    return ray


class _CandidateWorker:
    """A Ray actor: holds the reward images (and the reward estimator with its training images) once, the current
    state's pruner (and teacher) once per state, and scores candidates sent as keep vectors."""

    def __init__(self, reward: RewardData, device: str, estimator: Optional[BoundEstimator] = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.reward = reward.to(self.device)
        self.estimator = None if estimator is None else estimator.to(self.device)
        self.state_key: Optional[int] = None
        self.pruner: Optional[Pruner] = None
        self.teacher: Optional[nn.Module] = None

    def pid(self) -> int:
        """The actor's process id (tests kill it)."""
        return os.getpid()

    def evaluate(self, state_key: int, pruner_box: List[Any], keep: np.ndarray) -> Tuple[float, float, float]:
        """``(accuracy, time_prune, time_eval)`` of one candidate.

        :param state_key: identifies the state; the pruner is fetched from the object store when it changes.
        :param pruner_box: ``[ObjectRef]`` of the state's pruner and, when the estimator reads it, of its teacher
            (boxed so Ray does not fetch them every call).
        :param keep: kept channels per group.
        """
        if state_key != self.state_key:
            import ray

            self.pruner = self.teacher = None  # free the previous state's models first
            pruner = ray.get(pruner_box[0])
            pruner.model.to(self.device)
            if len(pruner_box) > 1:
                self.teacher = ray.get(pruner_box[1]).to(self.device).eval()
            self.pruner, self.state_key = pruner, state_key
        t0 = time.perf_counter()
        model = build_model(self.pruner, self.pruner.plan(keep=keep), self.reward.channels_last)
        t1 = time.perf_counter()
        if self.estimator is None:
            accuracy = self.reward.accuracy(model, self.device)
        else:
            accuracy = self.estimator(model, self.teacher, (self.reward.x, self.reward.y))
        return accuracy, t1 - t0, time.perf_counter() - t1


class RayBackend:
    """Candidates on ``num_workers`` long-lived Ray actors (one CPU thread or one GPU each).

    The reward images go to the object store once, at start; each new state's pruner (model, groups,
    importance) goes there once and every actor fetches it once; each candidate is a keep vector. Results do not
    depend on which actor scored a candidate. A dead actor is restarted by Ray (up to ``max_restarts`` times)
    and its candidates retried; an actor that stays dead is dropped and its candidates re-run on the others.

    :param reward: the reward images and evaluation settings.
    :param device: the env's device: ``cuda`` gives each actor one GPU, ``cpu`` one CPU thread.
    :param num_workers: actors.
    :param address: Ray cluster to attach to; None starts a local one (stopped again by :meth:`close`). When
        this process is already connected to Ray, that connection is used and left open.
    :param max_restarts: Ray restarts per actor.
    :param estimator: the env's reward estimator (None: the vanilla top-1); it goes to every actor once, with its
        training images, and each state's teacher goes with the state's pruner when the estimator reads it.
    """

    name = "ray"
    #: candidates queued per actor, so that an actor never waits for the driver between two candidates
    in_flight = 2

    def __init__(self, reward: RewardData, device: torch.device, num_workers: int = 2,
                 address: Optional[str] = None, max_restarts: int = 3,
                 estimator: Optional[BoundEstimator] = None) -> None:
        ray = import_ray()
        self.estimator = estimator
        self._ray = ray
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        gpu = self.device.type == "cuda"
        self._initialized_ray = False
        if not ray.is_initialized():
            kwargs: Dict[str, Any] = dict(include_dashboard=False, configure_logging=False,
                                          log_to_driver=False)
            if address is None:
                # a local cluster with room for every actor, whatever the core count
                kwargs["num_cpus"] = max(os.cpu_count() or 1, self.num_workers)
            ray.init(address=address, **kwargs)
            self._initialized_ray = True
        need = "GPU" if gpu else "CPU"
        have = ray.cluster_resources().get(need, 0)
        if have < self.num_workers:
            self.close()
            raise ValueError(f"parallel.num_workers={self.num_workers} needs {self.num_workers} {need}s, the Ray "
                             f"cluster at {address or 'this machine'} has {have:g}; lower num_workers or add nodes")
        actor = ray.remote(_CandidateWorker).options(
            num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0, max_restarts=int(max_restarts),
            max_task_retries=int(max_restarts))
        reward_ref = ray.put(RewardData(reward.x.cpu(), reward.y.cpu(), reward.batch_size, reward.amp,
                                        reward.channels_last))
        worker_device = "cuda" if gpu else "cpu"
        # one copy in the object store for every actor (and a restarted one); the driver keeps it alive
        self._reward_ref = reward_ref
        estimator_ref = None if estimator is None else ray.put(estimator.to("cpu"))
        self._estimator_ref = estimator_ref
        self.actors = [actor.remote(reward_ref, worker_device, estimator_ref) for _ in range(self.num_workers)]
        self._source: Optional[Pruner] = None
        self._teacher: Optional[nn.Module] = None
        self._dead: set = set()
        self._pruner_box: List[Any] = []
        self._state_key = 0

    def _publish(self, pruner: Pruner, teacher: Optional[nn.Module]) -> None:
        """Put a new state's pruner (and teacher, when the estimator reads it) into the object store (once per
        state)."""
        if not (self.estimator is not None and self.estimator.needs_teacher):
            teacher = None
        if pruner is self._source and teacher is self._teacher:
            return
        shipped = pruner
        on_cpu = next(pruner.model.parameters(), torch.empty(0)).device.type == "cpu"
        if not on_cpu:
            # actors map tensors onto their own device: ship a CPU copy (the env's pruner is left untouched)
            shipped = copy.copy(pruner)
            shipped.model = copy.deepcopy(pruner.model).cpu()
        self._pruner_box = [self._ray.put(shipped)]
        if teacher is not None:
            self._pruner_box.append(self._ray.put(teacher if on_cpu else copy.deepcopy(teacher).cpu()))
        self._source, self._teacher = pruner, teacher  # held, so their ids cannot be reused by a later state
        self._state_key += 1

    def evaluate(self, pruner: Pruner, plans: Iterable[PrunePlan],
                 score: Optional[Callable[[nn.Module], float]] = None,
                 teacher: Optional[nn.Module] = None) -> List[Scored]:
        """Score one candidate per plan on the actors, each sent as its kept-channel counts (the actor plans
        again from the same importance); the models stay there: ``Scored.model`` is None. Plans are taken from
        ``plans`` as actors have room, so planning the next candidates overlaps scoring the first ones.

        :param pruner: the state's pruner (importance computed).
        :param plans: :class:`~pruning_env.pruning.PrunePlan` of ``pruner``, one per candidate.
        :param score: the env's scoring of a built model; the actors run the backend's own ``estimator`` (the
            same one) instead, so a ``score`` without an estimator here is an error.
        :param teacher: the state's KD / agreement teacher, shipped to the actors when the estimator reads it.
        """
        if score is not None and self.estimator is None:
            raise ValueError("this Ray backend was started without the env's reward estimator, so its actors "
                             "would score the vanilla top-1; pass estimator= to RayBackend / make_backend")
        ray = self._ray
        self._publish(pruner, teacher)
        source = iter(plans)
        keeps: List[np.ndarray] = []
        results: Dict[int, Tuple[float, float, float]] = {}
        retry: Deque[int] = deque()  # candidates of a dead actor, to run again
        alive = [a for a in range(len(self.actors)) if a not in self._dead]
        load = [0] * len(self.actors)
        running: Dict[Any, Tuple[int, int]] = {}
        exhausted = False
        while True:
            while alive:
                slot = min(alive, key=lambda a: load[a])
                if load[slot] >= self.in_flight:
                    break
                if retry:
                    i = retry.popleft()
                else:
                    plan = None if exhausted else next(source, None)
                    if plan is None:
                        exhausted = True
                        break
                    keeps.append(plan.num_kept)
                    i = len(keeps) - 1
                ref = self.actors[slot].evaluate.remote(self._state_key, self._pruner_box, keeps[i])
                running[ref] = (slot, i)
                load[slot] += 1
            if not running:
                if exhausted and not retry:
                    break
                raise RuntimeError(f"every Ray worker died for good ({len(self.actors)} started, each restarted "
                                   f"up to its max_restarts); candidates were left unevaluated")
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                slot, i = running.pop(ref)
                load[slot] -= 1
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:
                    retry.append(i)  # the actor is restarting: it can get the candidate again
                except ray.exceptions.RayActorError:
                    # Ray restarted the actor and retried there up to max_restarts times: it is gone for good,
                    # its candidates run on the others
                    retry.append(i)
                    if slot in alive:
                        alive.remove(slot)
                        self._dead.add(slot)
        return [Scored(None, *results[i]) for i in range(len(keeps))]

    def worker_pids(self) -> List[int]:
        """Process ids of the actors (for tests and diagnostics)."""
        return self._ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        """Stop the actors; when this backend called ``ray.init``, disconnect (which also stops a local cluster
        it started; a cluster it attached to keeps running)."""
        for a in getattr(self, "actors", []):
            self._ray.kill(a)
        self.actors = []
        if self._initialized_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._initialized_ray = False


CandidateBackend = Union[SerialBackend, RayBackend]


def make_backend(config: ParallelConfig, reward: RewardData, device: torch.device,
                 estimator: Optional[BoundEstimator] = None) -> CandidateBackend:
    """The backend a :class:`ParallelConfig` names.

    :param config: the ``parallel`` settings.
    :param reward: the env's reward images (on ``device``).
    :param device: the env's device.
    :param estimator: the env's reward estimator (None: vanilla top-1); Ray actors run it themselves.
    """
    if config.backend == "ray":
        return RayBackend(reward, device, num_workers=config.num_workers, address=config.address,
                          max_restarts=config.max_restarts, estimator=estimator)
    return SerialBackend(reward, device, overlap=config.overlap)


__all__ = ["BACKENDS", "ParallelConfig", "RewardData", "Scored", "build_model", "SerialBackend", "RayBackend",
           "CandidateBackend", "RayNotInstalledError", "import_ray", "make_backend"]
