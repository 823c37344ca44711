"""The run folder a prune run writes (``runs/{name}/``): the one place that knows its file names, the
``metrics.json`` schema, the ``steps.csv`` layout and the run checkpoint, for writing and for reading.

Layout: config.yaml, metrics.json, steps.csv, original_model.pt, pruned_model.pt (``torch.save`` of the modules),
pruned_model.ts (TorchScript), distribution.png, tb/ (TensorBoard), checkpoint.pt (resumable runs).
"""
from __future__ import annotations

import copy
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import yaml

from pruning_env.export import export_torchscript
from pruning_env.persistence import load_parts, save_parts
from pruning_env.runtime import PathLike, atomic_path, atomic_save, atomic_write_text

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
    "target_metric": "flops | channels | params",
    "n_steps": "pruning steps per episode",
    "action_mode": "sparsity | distribution",
    "alpha": "reward weight of the FLOPs reduction",
    "beta": "reward weight of the params reduction",
    "n_evaluations": "pruned models scored by the search",
    "timesteps": "env steps of the search",
    "best_episode": "episode whose final model was kept",
    "best_reward": "its final reward",
    "reward_accuracy": "its validation accuracy on the reward images (before the fine-tune)",
    "flops_reduction": "1 - pruned MACs / original MACs",
    "params_reduction": "1 - pruned params / original params",
    "speedup_macs": "original MACs / pruned MACs",
    "group_names": "channel groups of the model",
    "original_channels": "channels per group before pruning",
    "kept_channels": "channels per group kept",
    "actions": "actions of the best episode",
    "pd": "learned pruning distribution (RL-Pruner) or null",
    "original": "report of the original model: val_top1, test_top1, test_top5, macs, params",
    "pruned_before_finetune": "the same report of the pruned model before the fine-tune",
    "pruned": "the same report after the fine-tune",
    "finetune": "fine-tune statistics and its config",
    "torchscript": "how pruned_model.ts was exported (script | trace) or null",
    "seconds": "wall time of the search, the fine-tune and the whole run",
}
#: kind and version of ``checkpoint.pt`` in the one persistence format (:mod:`pruning_env.persistence`)
CHECKPOINT_KIND = "run-checkpoint"
CHECKPOINT_VERSION = 1
#: the settings of a run that ``evaluate.py`` takes from its folder
DATA_SETTINGS = ("dataset", "data_root", "val_size", "split_seed")


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
    DISTRIBUTION_PLOT = "distribution.png"
    TENSORBOARD = "tb"

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
        """``metrics.json``; its keys must be exactly those of :data:`METRICS_SCHEMA`.

        :param metrics: the run's numbers.
        """
        missing, extra = sorted(set(METRICS_SCHEMA) - set(metrics)), sorted(set(metrics) - set(METRICS_SCHEMA))
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


def _format_cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, np.ndarray)):
        return ";".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in value)
    return value


__all__ = ["RunFolder", "RunCheckpoint", "METRICS_SCHEMA", "CHECKPOINT_KIND", "CHECKPOINT_VERSION", "DATA_SETTINGS"]
