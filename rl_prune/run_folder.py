"""The run folder a prune run writes (``runs/{name}/``): the one place that knows its file names, the
``metrics.json`` schema, the ``steps.csv`` layout and the run checkpoint, for writing and for reading.

Layout: config.yaml, metrics.json, steps.csv, original_model.pt, pruned_model.pt (``torch.save`` of the modules),
pruned_model.ts (TorchScript), searched_model.zip (the searched model before the fine-tune, as kept-channel indices
per group and structure / weight hashes: :meth:`RunFolder.read_searched_model` rebuilds it from the source model),
distribution.png, tb/ (TensorBoard), checkpoint.pt (resumable runs), and run.lock
while a run writes the folder (:class:`RunLock`: no run ever writes into another's folder).
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import yaml

from pruning_env.export import export_torchscript
from pruning_env.persistence import load_parts, save_parts
from pruning_env.runtime import PathLike, atomic_path, atomic_save, atomic_write_text, model_device
from rl_prune.config import ConfigError

#: ``metrics.json``: every key a finished run writes, and what it holds
METRICS_SCHEMA: Dict[str, str] = {
    "name": "run name (the folder's name)",
    "agent": "agent that searched (agents.registry.AGENTS)",
    "seed": "seed of every phase of the run",
    "device": "device of the search and the fine-tune",
    "dataset": "dataset name of the task",
    "data": "what evaluate.py needs to rebuild the split: dataset, data_root, val_size, split_seed",
    "input_size": "(C, H, W) of one image",
    "target": "fraction of the target metric removed by the end of an episode",
    "target_metric": "flops | channels | params | latency",
    "n_steps": "pruning steps per episode",
    "action_mode": "sparsity | distribution",
    "alpha": "reward weight of the FLOPs reduction",
    "beta": "reward weight of the params reduction",
    "gamma": "reward weight of the predicted latency reduction",
    "latency": "the env's latency device setting (device, threads, batch_size, dtype, channels_last), the table's "
               "grid and cache folder and the pruner options of its groups (what evaluate.py rebuilds the table "
               "from), and predicted: the predicted seconds per forward pass of the original and the pruned model "
               "(null when the env built no latency model: no latency budget and gamma 0)",
    "n_evaluations": "pruned models scored by the search",
    "budget": "the config's evaluation budget (None: no cap)",
    "budget_schedule": "the schedule an agent derived from the budget (RL-Pruner's RL epochs), None if fixed",
    "final_rerank": "the env's final_rerank (PruneEnv.rerank_finalists): the finalists' search and held-out "
                    "rewards, the chosen one, the re-scores it cost (apart from n_evaluations); None when off",
    "timesteps": "env steps of the search",
    "best_episode": "episode whose final model was kept",
    "best_reward": "its final reward",
    "reward_accuracy": "its validation accuracy on the reward images (before the fine-tune), as the reward "
                       "estimator measured it",
    "reward_estimator": "how the search estimated that accuracy (vanilla: right after pruning; adaptive_bn: after "
                        "BatchNorm re-estimation; ...; docs/env.md)",
    "flops_reduction": "1 - pruned MACs / original MACs",
    "params_reduction": "1 - pruned params / original params",
    "speedup_macs": "original MACs / pruned MACs",
    "group_names": "channel groups of the model",
    "original_channels": "channels per group before pruning",
    "kept_channels": "channels per group kept",
    "actions": "actions of the best episode",
    "pd": "learned pruning distribution (RL-Pruner) or null",
    "original": "report of the original model: val_top1, test_top1, test_top5, macs, params",
    "pruned_before_finetune": "the same report of the pruned model as cut: BatchNorm statistics of the unpruned "
                              "model, no training",
    "pruned_bn_reestimated": "the same report after the BatchNorm re-estimation of the adaptive_bn reward (what "
                             "the search saw), or null for the other estimators",
    "pruned": "the same report after the fine-tune",
    "finetune": "fine-tune statistics and its config",
    "torchscript": "how pruned_model.ts was exported (script | trace) or null",
    "seconds": "wall time of the search, the fine-tune and the whole run",
}
#: kind and version of ``checkpoint.pt`` in the one persistence format (:mod:`pruning_env.persistence`)
CHECKPOINT_KIND = "run-checkpoint"
CHECKPOINT_VERSION = 1
#: kind and version of ``searched_model.zip``
SEARCHED_KIND = "searched-model"
SEARCHED_VERSION = 1
#: the settings of a run that ``evaluate.py`` takes from its folder
DATA_SETTINGS = ("dataset", "data_root", "val_size", "split_seed")


def structure_hash(model: nn.Module) -> str:
    """SHA-256 of a model's structure: every module's name, class and ``extra_repr`` (channels, kernel, stride,
    ...) and every parameter's and buffer's name, shape and dtype; equal for two models of the same architecture
    whatever their weights.

    :param model: the model.
    """
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"{name}|{type(module).__module__}.{type(module).__qualname__}|{module.extra_repr()}\n".encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
    return h.hexdigest()


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names and the bytes of every tensor): equal only for bit-identical weights,
    on any device.

    :param model: the model.
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


@dataclass
class SearchedModel:
    """What ``searched_model.zip`` holds: the searched model (the best episode's, before the fine-tune) as kept
    channel indices per group of the source model, with what it takes to rebuild and check it."""

    group_names: List[str]
    """the groups of the source model's :class:`~pruning_env.pruning.Pruner`, in order"""
    kept_indices: List[List[int]]
    """per group, the kept channels in the source model's numbering"""
    input_size: Tuple[int, ...]
    """(C, H, W) of one image: the example input the Pruner traces"""
    pruner: Dict[str, Any]
    """the Pruner settings that decide the groups: ``ignore`` (layer names) and ``prune_normalized``"""
    structure_hash: str
    """:func:`structure_hash` of the searched model"""
    weights_hash: str
    """:func:`weights_hash` of the searched model"""
    source_hash: str
    """:func:`weights_hash` of the source (unpruned) model the indices refer to"""
    source: Optional[str]
    """where the source model came from (the config's checkpoint), for messages"""
    state_dict: Optional[Dict[str, torch.Tensor]] = None
    """the searched model's weights when the search trained them (recovery between steps): the indices then give
    the structure only; None when slicing the source rebuilds the searched model bit-exactly"""


def rebuild_pruned(source: nn.Module, kept_indices: Sequence[Sequence[int]], input_size: Sequence[int],
                   pruner: Mapping[str, Any]) -> Tuple[nn.Module, List[str]]:
    """The source model cut to ``kept_indices`` (the source is left unchanged), and the Pruner's group names.

    :param source: the unpruned model.
    :param kept_indices: per group, the kept channels in the source's numbering.
    :param input_size: (C, H, W) of the example input.
    :param pruner: ``ignore`` and ``prune_normalized`` of the Pruner that defined the groups.
    """
    from pruning_env.pruning import Pruner
    from pruning_env.pruning.pruner import PrunePlan

    model = copy.deepcopy(source)
    example = torch.zeros((1, *[int(v) for v in input_size]), device=model_device(model))
    p = Pruner(model, example, ignore=tuple(pruner.get("ignore", ())),
               prune_normalized=bool(pruner.get("prune_normalized", False)))
    if len(kept_indices) != p.n_groups:
        raise ValueError(f"{len(kept_indices)} groups of kept indices for a model with {p.n_groups} groups "
                         f"({', '.join(p.group_names)})")
    return p.apply(PrunePlan.from_indices(kept_indices)), list(p.group_names)


@dataclass
class RunCheckpoint:
    """What ``checkpoint.pt`` holds: enough for ``--resume`` to continue a killed run exactly."""

    phase: str
    """``search`` (the search is under way) or ``search_done``"""
    agent_name: str
    """the agent of the run"""
    config: Dict[str, Any]
    """the run's config (``PruneRunConfig.to_dict()``)"""
    timesteps: int
    """env steps done by the search"""
    agent_state: Dict[str, Any]
    """``agent.checkpoint_state()``: the agent, its best episode, the env's current state and RNG"""
    rng: Dict[str, Any]
    """the global RNG states (``pruning_env.runtime.rng_state``)"""


class RunFolder:
    """One run folder: paths of its files, and their writers and readers.

    :param path: the folder (created by the first write).
    """

    CONFIG = "config.yaml"
    METRICS = "metrics.json"
    STEPS = "steps.csv"
    CHECKPOINT = "checkpoint.pt"
    ORIGINAL_MODEL = "original_model.pt"
    PRUNED_MODEL = "pruned_model.pt"
    PRUNED_TORCHSCRIPT = "pruned_model.ts"
    SEARCHED_MODEL = "searched_model.zip"
    DISTRIBUTION_PLOT = "distribution.png"
    TENSORBOARD = "tb"
    LOCK = "run.lock"

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        """The run's name (the folder's)."""
        return self.path.name

    def file(self, name: str) -> Path:
        """Path of one of the class's file names inside the folder.

        :param name: e.g. ``RunFolder.METRICS``.
        """
        return self.path / name

    @property
    def tensorboard_dir(self) -> Path:
        """TensorBoard folder of the search."""
        return self.path / self.TENSORBOARD

    @property
    def is_finished(self) -> bool:
        """Whether the run wrote its metrics (its last file)."""
        return self.file(self.METRICS).is_file()

    @property
    def has_checkpoint(self) -> bool:
        """Whether a run checkpoint exists."""
        return self.file(self.CHECKPOINT).is_file()

    # ------------------------------------------------------------------------------------------------ config
    def write_config(self, config: Mapping[str, Any]) -> None:
        """``config.yaml``: the run's config (it works as ``--config`` to resume or repeat the run).

        :param config: ``PruneRunConfig.to_dict()`` with the agent that ran.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(yaml.safe_dump(dict(config), sort_keys=False), self.file(self.CONFIG))

    def read_config(self) -> Dict[str, Any]:
        """The parsed ``config.yaml`` ({} when missing)."""
        path = self.file(self.CONFIG)
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}

    # ----------------------------------------------------------------------------------------------- metrics
    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        """``metrics.json``; its keys must be exactly those of :data:`METRICS_SCHEMA` (those of
        :data:`METRICS_ADDED` may be missing: a restored run from before them).

        :param metrics: the run's numbers.
        """
        missing = sorted(set(METRICS_SCHEMA) - set(metrics) - set(METRICS_ADDED))
        extra = sorted(set(metrics) - set(METRICS_SCHEMA))
        if missing or extra:
            raise ValueError(f"metrics do not match METRICS_SCHEMA: missing {missing}, unexpected {extra}")
        atomic_write_text(json.dumps(dict(metrics), indent=2, default=float), self.file(self.METRICS))

    def read_metrics(self) -> Dict[str, Any]:
        """The parsed ``metrics.json`` of a finished run."""
        path = self.file(self.METRICS)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the run did not finish")
        return json.loads(path.read_text())

    def data_settings(self) -> Dict[str, Any]:
        """Data settings, input size and seed of the run, from ``metrics.json`` (or ``config.yaml`` when the run
        did not finish): the keys found among ``dataset``, ``data_root``, ``val_size``, ``split_seed``,
        ``input_size`` and ``seed``."""
        settings: Dict[str, Any] = {}
        if self.is_finished:
            metrics = self.read_metrics()
            data = metrics.get("data") or {}
            settings.update({k: data[k] for k in DATA_SETTINGS if k in data})
            settings.setdefault("dataset", metrics.get("dataset"))
            if metrics.get("input_size"):
                settings["input_size"] = tuple(int(v) for v in metrics["input_size"])
            if metrics.get("seed") is not None:
                settings["seed"] = int(metrics["seed"])
        else:
            cfg = self.read_config()
            env = cfg.get("env") or {}
            settings.update({k: env[k] for k in DATA_SETTINGS if k in env})
            if cfg.get("seed") is not None:
                settings["seed"] = int(cfg["seed"])
        return {k: v for k, v in settings.items() if v is not None}

    def latency_info(self) -> Optional[Dict[str, Any]]:
        """The run's latency record (``metrics.json``'s ``latency``, see :func:`rl_prune.pipeline.latency_record`)
        with the kept channels and group names it applies to, or None for a run that did not finish or was written
        before runs recorded it."""
        if not self.is_finished:
            return None
        metrics = self.read_metrics()
        record = metrics.get("latency")
        if not isinstance(record, dict) or not isinstance(record.get("setting"), dict):
            return None
        return {**record, "kept_channels": metrics.get("kept_channels"), "group_names": metrics.get("group_names"),
                "original_channels": metrics.get("original_channels")}

    # -------------------------------------------------------------------------------------------------- steps
    def write_steps(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """``steps.csv``: one row per pruning step (per env step for SB3 baselines); list cells are ``;``-joined.

        :param rows: the agent's history.
        """
        keys: List[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.file(self.STEPS)) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _format_cell(row.get(k, "")) for k in keys})

    def read_steps(self) -> List[Dict[str, str]]:
        """The rows of ``steps.csv`` as strings ([] when missing)."""
        path = self.file(self.STEPS)
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    # ------------------------------------------------------------------------------------------------- models
    def write_models(self, original: nn.Module, pruned: nn.Module, example: Optional[torch.Tensor]) -> Optional[str]:
        """``original_model.pt`` and ``pruned_model.pt`` (CPU, eval mode), and ``pruned_model.ts`` when
        ``example`` is given; returns the TorchScript method (``script`` / ``trace``) or None.

        :param original: the unpruned model.
        :param pruned: the pruned, fine-tuned model.
        :param example: an input batch for the TorchScript export (checked against the module), or None.
        """
        pruned_cpu = copy.deepcopy(pruned).cpu().eval()
        atomic_save(pruned_cpu, self.file(self.PRUNED_MODEL))
        atomic_save(copy.deepcopy(original).cpu().eval(), self.file(self.ORIGINAL_MODEL))
        if example is None:
            return None
        return export_torchscript(pruned_cpu, example, self.file(self.PRUNED_TORCHSCRIPT))

    # ----------------------------------------------------------------------------------------- searched model
    @property
    def has_searched_model(self) -> bool:
        """Whether ``searched_model.zip`` exists."""
        return self.file(self.SEARCHED_MODEL).is_file()

    def write_searched_model(self, searched: nn.Module, source: nn.Module, kept_indices: Sequence[Sequence[int]],
                             input_size: Sequence[int], pruner: Mapping[str, Any],
                             source_name: Optional[str] = None) -> SearchedModel:
        """``searched_model.zip`` (atomically, in :mod:`pruning_env.persistence`'s format): the searched model as
        kept-channel indices of ``source``, checked here by rebuilding it (its structure must match; its weights
        are stored too only when slicing the source does not give them, i.e. the search trained the model).

        :param searched: the searched model (before the fine-tune).
        :param source: the unpruned model the search started from.
        :param kept_indices: per group, the kept channels in the source's numbering (``PruneEnv.kept_indices``).
        :param input_size: (C, H, W) of one image.
        :param pruner: ``ignore`` (layer names) and ``prune_normalized`` of the env's Pruner.
        :param source_name: where the source came from (the checkpoint path), for messages.
        :raises RuntimeError: the indices do not rebuild the searched model's structure.
        """
        kept = [[int(i) for i in k] for k in kept_indices]
        settings = {"ignore": [str(n) for n in pruner.get("ignore", ())],
                    "prune_normalized": bool(pruner.get("prune_normalized", False))}
        rebuilt, names = rebuild_pruned(source, kept, input_size, settings)
        expected = structure_hash(searched)
        if structure_hash(rebuilt) != expected:
            raise RuntimeError(f"the kept-channel indices do not rebuild the searched model's structure "
                               f"(kept {[len(k) for k in kept]} per group of {names}); {self.path} is left without "
                               f"{self.SEARCHED_MODEL}")
        w = weights_hash(searched)
        record = SearchedModel(group_names=names, kept_indices=kept, input_size=tuple(int(v) for v in input_size),
                               pruner=settings, structure_hash=expected, weights_hash=w,
                               source_hash=weights_hash(source), source=source_name,
                               state_dict=None if weights_hash(rebuilt) == w else
                               {k: v.detach().cpu().clone() for k, v in searched.state_dict().items()})
        self.path.mkdir(parents=True, exist_ok=True)
        save_parts(self.file(self.SEARCHED_MODEL), SEARCHED_KIND, SEARCHED_VERSION,
                   {k: v for k, v in record.__dict__.items()},
                   info={"kept_channels": [len(k) for k in kept], "structure_hash": expected, "weights_hash": w,
                         "source": source_name, "weights_stored": record.state_dict is not None})
        return record

    def read_searched_record(self) -> SearchedModel:
        """The contents of ``searched_model.zip`` (no model built); a file that is not one raises ``ValueError``
        naming it."""
        path = self.file(self.SEARCHED_MODEL)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the run did not finish its search, or it was made by a "
                                    f"version that did not keep the searched model (rerun it)")
        data = load_parts(path, SEARCHED_KIND, SEARCHED_VERSION).data
        return SearchedModel(**data)

    def read_searched_model(self, source: nn.Module) -> nn.Module:
        """The searched model (before the fine-tune, eval mode, on ``source``'s device), rebuilt by cutting
        ``source`` to the stored kept-channel indices and checked against the stored hashes.

        :param source: the unpruned model the search started from (e.g. ``PruneEnv.original_model``, loaded from
            the run's checkpoint); it is left unchanged.
        :raises ValueError: ``source`` is not the model the run searched (its weights differ), or the rebuilt model's
            structure or weights differ from the searched model's; the message names the file.
        """
        path = self.file(self.SEARCHED_MODEL)
        record = self.read_searched_record()
        if weights_hash(source) != record.source_hash:
            origin = record.source or "the run's source model"
            raise ValueError(f"{path}: the source model given is not the one this run searched (its weights differ "
                             f"from those of {origin}); pass the run's original model")
        model, names = rebuild_pruned(source, record.kept_indices, record.input_size, record.pruner)
        if names != list(record.group_names):
            raise ValueError(f"{path}: the source model's groups {names} differ from the run's {record.group_names}")
        if structure_hash(model) != record.structure_hash:
            raise ValueError(f"{path}: the model rebuilt from the kept-channel indices does not have the searched "
                             f"model's structure (structure hash {structure_hash(model)[:12]} != "
                             f"{record.structure_hash[:12]}); the file or the pruning engine changed since the run")
        if record.state_dict is not None:
            model.load_state_dict(record.state_dict)
        found = weights_hash(model)
        if found != record.weights_hash:
            raise ValueError(f"{path}: the rebuilt model's weights differ from the searched model's (weights hash "
                             f"{found[:12]} != {record.weights_hash[:12]})")
        return model.eval()

    # ------------------------------------------------------------------------------------ carrying a search
    def export_search(self) -> Dict[str, Any]:
        """A finished search as plain JSON data (:meth:`restore_search` writes it back, on any machine): its
        ``metrics.json`` and its searched model as kept-channel masks (:func:`indices_to_mask`) with the hashes
        that check the rebuild, no weights (a few kB: a committed results file can carry it). ``searched_model``
        is None when there is none to carry: a run from before searched models were kept, or one whose search
        trained the model (recovery between steps: its weights are not a slice of the source's).

        :raises FileNotFoundError: the run did not finish.
        """
        out: Dict[str, Any] = {"metrics": self.read_metrics(), "searched_model": None}
        if self.has_searched_model:
            record = self.read_searched_record()
            if record.state_dict is None:
                out["searched_model"] = {
                    "group_names": list(record.group_names), "kept_masks": [indices_to_mask(k) for k in
                                                                            record.kept_indices],
                    "input_size": list(record.input_size), "pruner": dict(record.pruner),
                    "structure_hash": record.structure_hash, "weights_hash": record.weights_hash,
                    "source_hash": record.source_hash, "source": record.source}
        return out

    def restore_search(self, data: Mapping[str, Any], source: nn.Module) -> None:
        """Write a finished search folder from :meth:`export_search`'s ``data``: ``searched_model.zip`` rebuilt by
        cutting ``source`` to the carried masks and checked against the carried hashes, then ``metrics.json`` (the
        last file: it marks the run finished). A carried search without a searched model restores the metrics
        only (what a report reads; a fine-tune of it is refused by the missing file).

        :param data: one :meth:`export_search` result.
        :param source: the unpruned model the search started from (e.g. the env's original model); unchanged.
        :raises RunFolderError: the folder already holds a finished run.
        :raises ValueError: ``source`` is not the model the search started from, or the rebuild does not give the
            searched model (structure or weights hash); the message names the folder.
        """
        if self.is_finished:
            raise RunFolderError(f"{self.path} already holds a finished run; restore into an empty folder")
        carried = data.get("searched_model")
        if carried is not None:
            if weights_hash(source) != carried["source_hash"]:
                raise ValueError(f"{self.path}: the source model given is not the one the carried search started "
                                 f"from (weights sha256 {weights_hash(source)[:12]} != "
                                 f"{carried['source_hash'][:12]} of {carried.get('source') or 'its source'}; a "
                                 f"checkpoint retrained on another CPU has other bytes: docs/training.md)")
            kept = [mask_to_indices(m) for m in carried["kept_masks"]]
            model, names = rebuild_pruned(source, kept, carried["input_size"], carried["pruner"])
            if names != list(carried["group_names"]) or structure_hash(model) != carried["structure_hash"] or \
                    weights_hash(model) != carried["weights_hash"]:
                raise ValueError(f"{self.path}: the model rebuilt from the carried kept channels is not the searched "
                                 f"model (groups, structure or weights hash differ): the pruning engine changed "
                                 f"since the search")
            self.write_searched_model(model, source, kept, carried["input_size"], carried["pruner"],
                                      source_name=carried.get("source"))
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_metrics(data["metrics"])

    # --------------------------------------------------------------------------------------------- checkpoint
    def write_checkpoint(self, checkpoint: RunCheckpoint) -> None:
        """``checkpoint.pt`` (atomically, in :mod:`pruning_env.persistence`'s versioned format).

        :param checkpoint: the run's state.
        """
        data = {"phase": checkpoint.phase, "agent_name": checkpoint.agent_name, "config": checkpoint.config,
                "timesteps": int(checkpoint.timesteps), "agent_state": checkpoint.agent_state, "rng": checkpoint.rng}
        save_parts(self.file(self.CHECKPOINT), CHECKPOINT_KIND, CHECKPOINT_VERSION, data,
                   info={"phase": checkpoint.phase, "agent": checkpoint.agent_name,
                         "timesteps": int(checkpoint.timesteps)})

    def read_checkpoint(self) -> RunCheckpoint:
        """The run checkpoint; a file that is not one raises ``ValueError`` naming it."""
        path = self.file(self.CHECKPOINT)
        data = load_parts(path, CHECKPOINT_KIND, CHECKPOINT_VERSION).data
        return RunCheckpoint(phase=data["phase"], agent_name=data["agent_name"], config=data["config"],
                             timesteps=int(data["timesteps"]), agent_state=data["agent_state"], rng=data["rng"])

    # ----------------------------------------------------------------------------- ownership: lock, status, reuse
    def lock(self) -> "RunLock":
        """The folder's lock (``run.lock``): ``with folder.lock(): ...`` refuses to start while another live process
        writes the folder (:class:`RunFolderLocked`); re-entrant within one process."""
        return RunLock(self.path)

    def lock_owner(self) -> Optional[Dict[str, Any]]:
        """Who writes the folder now: the live owner recorded in ``run.lock`` (pid, host, started, command), or None
        when no lock exists or its process is gone (a stale lock, e.g. after SIGKILL)."""
        owner = _read_owner(self.file(self.LOCK))
        return owner if owner is not None and _owner_alive(owner, self.file(self.LOCK)) else None

    @property
    def is_empty(self) -> bool:
        """No folder, or a folder with nothing in it."""
        return not self.path.is_dir() or next(self.path.iterdir(), None) is None

    @property
    def status(self) -> str:
        """``empty``, ``running`` (another live process holds the lock), ``finished`` (metrics.json), ``resumable``
        (checkpoint.pt of an unfinished run), ``unfinished`` (files of a run killed before its first checkpoint)
        or ``other`` (files that are not a run's)."""
        if self.lock_owner() is not None and not self.lock().held:
            return "running"
        if self.is_finished:
            return "finished"
        if self.has_checkpoint:
            return "resumable"
        # unit.lock: the benchmark sweeps' lock before RunLock (a killed worker's may remain)
        names = {p.name for p in self.path.iterdir()} - {self.LOCK, "unit.lock"} if self.path.is_dir() else set()
        if not names:
            return "empty"
        return "unfinished" if names & {self.CONFIG, self.STEPS, self.TENSORBOARD} else "other"

    def clear(self) -> None:
        """Remove everything in the folder but its lock (a new run then starts from nothing: no old TensorBoard
        events, exports or evaluation files remain). Refused for a folder whose files are not a run's."""
        if self.status == "other":
            raise RunFolderError(f"{self.path} holds files that are not a run's; nothing was removed. Pick another "
                                 f"run name (--name)")
        if not self.path.is_dir():
            return
        for entry in self.path.iterdir():
            if entry.name == self.LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


# ------------------------------------------------------------------------------ claiming a folder: lock and names

class RunFolderError(ConfigError):
    """A run folder cannot be used as asked (it holds another run, or files that are not a run's); the message
    names the folder and the options (``--resume``, ``--overwrite``, ``--name``). Nothing was changed."""


class RunFolderLocked(RunFolderError):
    """Another live process writes the run folder (its ``run.lock``).

    :param path: the run folder.
    :param owner: the lock's owner record (pid, host, started, command), or None when unreadable.
    """

    def __init__(self, path: Path, owner: Optional[Dict[str, Any]]) -> None:
        self.path, self.owner = Path(path), owner
        who = describe_owner(owner)
        super().__init__(f"{path} is being written by another run ({who}); wait for it to finish, or stop that "
                         f"process: a stale lock (its process gone) is taken over by the next run")


#: run-folder locks this process holds: lock file -> [fd, depth] (re-entrant: the CLI or a sweep claims a folder,
#: then :func:`rl_prune.pipeline.run` locks it again)
_HELD: Dict[str, List[int]] = {}
#: the folders each held lock created
_CREATED: Dict[str, List[Path]] = {}


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote something) or already gone
            return


class RunLock:
    """The lock file ``run.lock`` of a run folder: an exclusive ``flock`` (released by the kernel when its process
    dies, SIGKILL included) on a file that records the owner (pid, host, start time, command) for messages.

    A lock file left by a killed process holds no ``flock``: the next acquirer takes it over and says so. Locks are
    re-entrant within a process. Use as a context manager, or :meth:`acquire` / :meth:`release`.

    :param folder: the run folder (created on :meth:`acquire`).
    """

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)
        self.file = self.folder / RunFolder.LOCK
        self.stale: Optional[Dict[str, Any]] = None
        """the owner record of a stale lock this acquisition took over, or None"""

    def _key(self) -> str:
        return os.path.realpath(self.file)

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._key() in _HELD

    def acquire(self) -> "RunLock":
        """Take the lock; :class:`RunFolderLocked` when a live process holds it."""
        key = self._key()
        if key in _HELD:
            _HELD[key][1] += 1
            return self
        created = []  # folders made here: removed again on release while they stay empty
        for folder in (self.folder, *self.folder.parents):
            if folder.exists():
                break
            created.append(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._take(key)
        except BaseException:
            _remove_empty(created)
            raise
        _CREATED[key] = created
        return self

    def _take(self, key: str) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: an exclusive create, liveness by pid
            fcntl = None
        while True:
            if fcntl is None:
                try:
                    fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    owner = _read_owner(self.file)
                    if owner is not None and _owner_alive(owner, self.file):
                        raise RunFolderLocked(self.folder, owner) from None
                    self.stale = owner
                    self.file.unlink(missing_ok=True)
                    continue
            else:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    raise RunFolderLocked(self.folder, _read_owner(self.file)) from None
                # the previous holder unlinks the file before it lets go: then this fd is an orphan, try again
                try:
                    current = os.stat(self.file).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if not current:
                    os.close(fd)
                    continue
                previous = _parse_owner(os.pread(fd, 65536, 0))
                self.stale = previous if previous is not None and previous.get("pid") != os.getpid() else None
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                 "process_start": _process_start(os.getpid()), "command": " ".join(sys.argv)})
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
            os.fsync(fd)
            _HELD[key] = [fd, 1]
            if self.stale is not None:
                print(f"note: took over the stale lock of {self.folder} ({describe_owner(self.stale)}, no longer "
                      f"running)", file=sys.stderr)
            return

    def release(self) -> None:
        """Let go (the file is removed when the outermost holder in this process lets go)."""
        key = self._key()
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[key]
        try:
            self.file.unlink(missing_ok=True)  # before closing: a waiting acquirer then sees an orphan and retries
        finally:
            os.close(entry[0])
            # a run refused before writing anything leaves no empty folder behind
            _remove_empty(_CREATED.pop(key, []))

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _parse_owner(raw: bytes) -> Optional[Dict[str, Any]]:
    try:
        owner = json.loads(raw.decode() or "null")
    except (UnicodeDecodeError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _read_owner(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return _parse_owner(path.read_bytes())
    except OSError:
        return None


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of process ``pid`` (Linux), to tell a live owner from a new process with its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, after the parenthesised command name


def _owner_alive(owner: Dict[str, Any], lock_file: Path) -> bool:
    """Whether the process recorded in a lock still runs (another host's lock is assumed alive)."""
    pid = int(owner["pid"])
    if owner.get("host") not in (None, socket.gethostname()):
        return True
    if pid == os.getpid():
        return os.path.realpath(lock_file) in _HELD
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    recorded, now = owner.get("process_start"), _process_start(pid)
    return recorded is None or now is None or recorded == now


def describe_owner(owner: Optional[Dict[str, Any]]) -> str:
    """``pid N on HOST, started DATE`` of a lock's owner record (:meth:`RunFolder.lock_owner`).

    :param owner: the record, or None.
    """
    if owner is None:
        return "owner unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("started", 0))))
    host = owner.get("host")
    return f"pid {owner['pid']}" + (f" on {host}" if host else "") + f", started {started}"


def numbered_run_dirs(out_dir: PathLike, name: str) -> List[Tuple[int, Path]]:
    """The existing folders of a run name, SB3-style: ``name`` is number 1, then ``name_2``, ``name_3``, ...

    :param out_dir: the runs folder (``run.out_dir``).
    :param name: the run name.
    :return: ``(number, path)`` sorted by number.
    """
    out = Path(out_dir)
    found = [(1, out / name)] if (out / name).is_dir() else []
    if out.is_dir():
        pattern = re.compile(re.escape(name) + r"_(\d+)")
        for entry in out.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir() and int(match.group(1)) >= 2:
                found.append((int(match.group(1)), entry))
    return sorted(found)


def claim_new_run_folder(out_dir: PathLike, name: str) -> Tuple[RunFolder, RunLock]:
    """A folder for a new run that holds nothing, locked by this process: ``{out_dir}/{name}`` when it is empty,
    else the next number after the highest existing one (``name_2``, ``name_3``, ..., as SB3 numbers its logs).
    Two runs started at once get different folders; no earlier run is touched.

    :param out_dir: the runs folder.
    :param name: the run name.
    :return: the folder and its (held) lock; release it, or use it as a context manager.
    """
    out = Path(out_dir)
    existing = numbered_run_dirs(out, name)
    number = 1
    if existing:
        top, path = existing[-1]
        number = top if RunFolder(path).is_empty else top + 1
    while True:
        folder = RunFolder(out / (name if number == 1 else f"{name}_{number}"))
        number += 1
        if not folder.is_empty:
            continue
        lock = RunLock(folder.path)
        try:
            lock.acquire()
        except RunFolderLocked:  # claimed by a run started at the same moment
            continue
        if folder.status != "empty":  # a run wrote it between the check and the lock
            lock.release()
            continue
        return folder, lock


def latest_run_folder(out_dir: PathLike, name: str) -> Optional[RunFolder]:
    """The latest (highest-numbered) existing folder of a run name, the one ``--resume`` continues; None if none.

    :param out_dir: the runs folder.
    :param name: the run name.
    """
    existing = numbered_run_dirs(out_dir, name)
    return RunFolder(existing[-1][1]) if existing else None


def indices_to_mask(indices: Sequence[int]) -> str:
    """Kept channel indices as a hexadecimal bit mask (bit ``i`` set: channel ``i`` kept): a compact JSON form.

    :param indices: distinct non-negative channel indices.
    """
    mask = 0
    for i in indices:
        if int(i) < 0:
            raise ValueError(f"channel indices must be >= 0, got {i}")
        mask |= 1 << int(i)
    return format(mask, "x")


def mask_to_indices(mask: str) -> List[int]:
    """The sorted channel indices of an :func:`indices_to_mask` mask."""
    value = int(mask, 16)
    return [i for i in range(value.bit_length()) if value >> i & 1]


#: keys of :data:`METRICS_SCHEMA` added after runs were carried in committed units files: a restored run from before
#: them may lack them
METRICS_ADDED = ("final_rerank",)


def _format_cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, np.ndarray)):
        return ";".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in value)
    return value


__all__ = ["RunFolder", "RunCheckpoint", "SearchedModel", "structure_hash", "weights_hash", "rebuild_pruned",
           "SEARCHED_KIND", "SEARCHED_VERSION", "METRICS_SCHEMA", "METRICS_ADDED", "CHECKPOINT_KIND", "CHECKPOINT_VERSION", "DATA_SETTINGS",
           "RunLock", "RunFolderError", "RunFolderLocked", "numbered_run_dirs", "claim_new_run_folder",
           "latest_run_folder", "describe_owner", "indices_to_mask", "mask_to_indices"]
