"""Candidate-evaluation backends of the pruning env's batched look-ahead: they decide where the env's
:class:`~pruning_env.envs.scoring.CandidateScorer` runs, in this process (``serial``) or on long-lived Ray actors
(``ray``), and so give identical rewards.

The env maps each action to kept channels per group (cheap and analytic); a backend turns the state's
:class:`~pruning_env.pruning.Pruner` (groups and importance, computed once per state in the env's process) and the
plans into scored candidates by calling the scorer, here or on an actor holding a copy of it.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import os
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Deque, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from pruning_env.envs.scoring import CandidateScorer, Scored
from pruning_env.pruning import Pruner, PrunePlan
from pruning_env.runtime import model_device
from pruning_env.schema import Settings, setting

BACKENDS = ("serial", "ray")


@dataclass
class ParallelConfig(Settings):
    """How the env's batched look-ahead (``env.evaluate_actions``) evaluates candidates: the ``parallel``
    section of a run config, e.g. ``parallel: {backend: ray, num_workers: 8}``."""

    section = "parallel"  # errors name parallel.FIELD

    backend: str = setting("serial", choices=BACKENDS)
    """``"serial"`` (this process, no extra dependency) or ``"ray"`` (Ray actors, ``pip install -e ".[ray]"``;
    they run the env's ``reward_estimator`` themselves, with the same result)."""
    num_workers: int = setting(2, low=1)
    """Ray actors, each with one CPU thread (CPU env) or one GPU (CUDA env); >= 1, ignored by ``serial``."""
    address: Optional[str] = setting(None, what="a Ray address such as 'auto' or 'ray://head:10001'")
    """Ray cluster to attach to (``ray.init(address=...)``: ``"auto"``, ``"ray://head:10001"``); None starts a
    local one on this machine."""
    max_restarts: int = setting(3, low=0)
    """times Ray restarts a dead actor (its candidates are retried on it, then re-run on another actor); >= 0."""
    overlap: Optional[bool] = None
    """serial backend: build the next candidate while the device evaluates the current one, one sync per batch;
    None = on CUDA only."""


class SerialBackend:
    """Candidates one after another in this process: the scorer's :meth:`~CandidateScorer.score` in a loop.

    With ``overlap`` (default on CUDA) and the plain top-1 reward, the next candidate's surgery runs on the CPU
    while the device still evaluates the current one; the hit counts stay on the device and the batch syncs
    once at the end.

    :param scorer: the env's scorer.
    :param overlap: see above; None = on CUDA only.
    """

    name = "serial"

    def __init__(self, scorer: CandidateScorer, overlap: Optional[bool] = None) -> None:
        self.scorer = scorer
        self.device = scorer.device
        self.overlap = self.device.type == "cuda" if overlap is None else bool(overlap)
        self._side: Optional[torch.cuda.Stream] = None

    def evaluate(self, pruner: Pruner, plans: Iterable[PrunePlan], teacher: Optional[nn.Module] = None,
                 method: str = "score") -> List[Scored]:
        """Score one candidate per plan.

        :param pruner: the state's pruner (importance computed).
        :param plans: :class:`~pruning_env.pruning.PrunePlan` of ``pruner``, one per candidate.
        :param teacher: the state's KD / agreement teacher.
        :param method: the scorer's method run per candidate, ``method(pruner, plan, teacher) -> Scored``.
        """
        if not (self.overlap and method == "score" and self.scorer.queues_top1):
            work = getattr(self.scorer, method)
            return [work(pruner, plan, teacher) for plan in plans]
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
                model = self.scorer.build(pruner, plan)
            if cuda:
                main = torch.cuda.current_stream(self.device)
                main.wait_stream(self._side)
                for t in itertools.chain(model.parameters(), model.buffers()):
                    t.record_stream(main)  # freed later: memory goes back only after the main stream's work on it
            prune_times.append(time.perf_counter() - t0)
            models.append(model)
            hits.append(self.scorer.top1_hits(model))
        counts = torch.stack(hits).tolist() if hits else []  # the batch's one sync
        # evaluation overlaps surgery: charge the wall time not spent in surgery evenly to the candidates
        t_eval = max(time.perf_counter() - t_start - sum(prune_times), 0.0) / max(len(models), 1)
        n = self.scorer.n_images
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
    """A Ray actor: holds a copy of the env's scorer (reward images, estimator, training images) once, the current
    state's pruner (and teacher) once per state, and scores candidates sent as keep vectors."""

    def __init__(self, scorer: CandidateScorer, device: str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.scorer = scorer.to(self.device)
        self.state_key: Optional[int] = None
        self.pruner: Optional[Pruner] = None
        self.teacher: Optional[nn.Module] = None

    def pid(self) -> int:
        """The actor's process id (tests kill it)."""
        return os.getpid()

    def evaluate(self, state_key: int, pruner_box: List[Any], keep: np.ndarray, method: str = "score") -> Scored:
        """One candidate scored by the scorer's ``method`` (its model stays here).

        :param state_key: identifies the state; the pruner is fetched from the object store when it changes.
        :param pruner_box: ``[ObjectRef]`` of the state's pruner and, when the estimator reads it, of its teacher
            (boxed so Ray does not fetch them every call).
        :param keep: kept channels per group.
        :param method: as for :meth:`SerialBackend.evaluate`.
        """
        if state_key != self.state_key:
            import ray

            self.pruner = self.teacher = None  # free the previous state's models first
            pruner = ray.get(pruner_box[0])
            pruner.model.to(self.device)
            if len(pruner_box) > 1:
                self.teacher = ray.get(pruner_box[1]).to(self.device).eval()
            self.pruner, self.state_key = pruner, state_key
        scored = getattr(self.scorer, method)(self.pruner, self.pruner.plan(keep=keep), self.teacher)
        return replace(scored, model=None)


class RayBackend:
    """Candidates on ``num_workers`` long-lived Ray actors (one CPU thread or one GPU each).

    The reward images go to the object store once, at start; each new state's pruner (model, groups,
    importance) goes there once and every actor fetches it once; each candidate is a keep vector. Results do not
    depend on which actor scored a candidate. A dead actor is restarted by Ray (up to ``max_restarts`` times)
    and its candidates retried; an actor that stays dead is dropped and its candidates re-run on the others.

    :param scorer: the env's scorer (every actor receives a copy once, with its images); the scorer's device
        decides the actors': ``cuda`` gives each actor one GPU, ``cpu`` one CPU thread.
    :param num_workers: actors.
    :param address: Ray cluster to attach to; None starts a local one (stopped again by :meth:`close`). When
        this process is already connected to Ray, that connection is used and left open.
    :param max_restarts: Ray restarts per actor.
    """

    name = "ray"
    #: candidates queued per actor, so that an actor never waits for the driver between two candidates
    in_flight = 2

    def __init__(self, scorer: CandidateScorer, num_workers: int = 2, address: Optional[str] = None,
                 max_restarts: int = 3) -> None:
        ray = import_ray()
        self.scorer = scorer
        self._ray = ray
        self.device = scorer.device
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
        # one copy in the object store for every actor (and a restarted one); the driver keeps it alive
        self._scorer_ref = ray.put(scorer.to(torch.device("cpu")))
        worker_device = "cuda" if gpu else "cpu"
        self.actors = [actor.remote(self._scorer_ref, worker_device) for _ in range(self.num_workers)]
        self._source: Optional[Pruner] = None
        self._teacher: Optional[nn.Module] = None
        self._dead: set = set()
        self._pruner_box: List[Any] = []
        self._state_key = 0

    def _publish(self, pruner: Pruner, teacher: Optional[nn.Module]) -> None:
        """Put a new state's pruner (and teacher, when the estimator reads it) into the object store (once per
        state)."""
        if not self.scorer.needs_teacher:
            teacher = None
        if pruner is self._source and teacher is self._teacher:
            return
        shipped = pruner
        on_cpu = model_device(pruner.model).type == "cpu"
        if not on_cpu:
            # actors map tensors onto their own device: ship a CPU copy (the env's pruner is left untouched)
            shipped = copy.copy(pruner)
            shipped.model = copy.deepcopy(pruner.model).cpu()
        self._pruner_box = [self._ray.put(shipped)]
        if teacher is not None:
            self._pruner_box.append(self._ray.put(teacher if on_cpu else copy.deepcopy(teacher).cpu()))
        self._source, self._teacher = pruner, teacher  # held, so their ids cannot be reused by a later state
        self._state_key += 1

    def evaluate(self, pruner: Pruner, plans: Iterable[PrunePlan], teacher: Optional[nn.Module] = None,
                 method: str = "score") -> List[Scored]:
        """Score one candidate per plan on the actors, each sent as its kept-channel counts (the actor plans
        again from the same importance); the models stay there: ``Scored.model`` is None. Plans are taken from
        ``plans`` as actors have room, so planning the next candidates overlaps scoring the first ones.

        :param pruner: the state's pruner (importance computed).
        :param plans: :class:`~pruning_env.pruning.PrunePlan` of ``pruner``, one per candidate.
        :param teacher: the state's KD / agreement teacher, shipped to the actors when the estimator reads it.
        :param method: as for :meth:`SerialBackend.evaluate`.
        """
        ray = self._ray
        self._publish(pruner, teacher)
        source = iter(plans)
        keeps: List[np.ndarray] = []
        results: Dict[int, Scored] = {}
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
                ref = self.actors[slot].evaluate.remote(self._state_key, self._pruner_box, keeps[i], method)
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
        return [results[i] for i in range(len(keeps))]

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


def make_backend(config: ParallelConfig, scorer: CandidateScorer) -> CandidateBackend:
    """The backend a :class:`ParallelConfig` names, running ``scorer``.

    :param config: the ``parallel`` settings.
    :param scorer: the env's scorer (on the env's device).
    """
    if config.backend == "ray":
        return RayBackend(scorer, num_workers=config.num_workers, address=config.address,
                          max_restarts=config.max_restarts)
    return SerialBackend(scorer, overlap=config.overlap)


__all__ = ["BACKENDS", "ParallelConfig", "SerialBackend", "RayBackend", "CandidateBackend", "RayNotInstalledError",
           "import_ray", "make_backend"]
