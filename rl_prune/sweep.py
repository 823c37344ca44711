"""Sweeps of prune runs for the benchmarks: one unit = one :func:`rl_prune.pipeline.run` in its own run folder,
skipped when finished, resumed when killed, locked while a worker runs it (the benchmarks' tables and statistics
are in ``benchmarks/common.py``).

``benchmarks/compare_agents.py`` and ``benchmarks/ablate_reward.py`` are built on it.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from pruning_env.runtime import atomic_write_text
from rl_prune.config import CONFIG_DIR, PruneRunConfig, load_config
from rl_prune.pipeline import ResumeMismatch, rl_pruner_costs, run
from rl_prune.run_folder import RunFolder, RunFolderLocked

#: the CPU benchmark task (VGG-19 width 0.25 on the 5k-image CIFAR-10 npz)
BENCH_CONFIG = CONFIG_DIR / "bench_cpu_vgg19w025_npz.yaml"
#: file a failed unit leaves in its run folder (the traceback)
ERROR_FILE = "error.txt"
#: file that marks a unit a live worker is running (the run folder's lock, :class:`rl_prune.run_folder.RunLock`)
LOCK_FILE = RunFolder.LOCK


def exact_budget(n_steps: int, minimum: int, rl_pruner: Optional[Mapping[str, Any]] = None) -> int:
    """The smallest evaluation budget ``>= minimum`` that every searching agent spends exactly: ``n_steps`` divides it
    (random search: ``budget / n_steps`` candidates per step; SB3 agents spend any budget) and RL-Pruner's
    budget-derived schedule (:func:`rl_prune.pipeline.rl_pruner_schedule`, its costs from
    :func:`rl_prune.pipeline.rl_pruner_costs`) spends all of it. With the improved
    agent's defaults (10 samples per RL epoch + the reset point per step): 151 for one step and a minimum of 150, 93
    for three steps and a minimum of 90.

    :param n_steps: pruning steps per episode (>= 1).
    :param minimum: the fewest evaluations the budget may have.
    :param rl_pruner: RL-Pruner's constructor arguments (``sample_num``, ``sample_step``, ``collapse_reference``;
        default: the improved agent's reset point and 10 samples).
    """
    if n_steps < 1 or minimum < 1:
        raise ValueError(f"exact_budget needs n_steps >= 1 and minimum >= 1, got {n_steps} and {minimum}")
    sample_num, q_cost, reserve = rl_pruner_costs(rl_pruner if rl_pruner is not None
                                                  else {"collapse_reference": "reset_candidate"})
    budget = int(minimum)
    # n_steps divides it, and each step's share is the reset point plus a whole number (>= 1) of RL epochs
    while budget % n_steps or (budget // n_steps - reserve) % (sample_num * q_cost) \
            or budget // n_steps - reserve < sample_num * q_cost:
        budget += 1
    return budget


def unit_config(config: Union[str, Path], agent: str, seed: int, budget: int,
                overrides: Optional[Mapping[str, Any]] = None) -> PruneRunConfig:
    """The checked config of one (agent, seed) unit.

    :param config: YAML file of the task.
    :param agent: agent name (agents.registry.AGENTS).
    :param seed: seed of the env, the agent and the fine-tune.
    :param budget: evaluations for budgeted agents.
    :param overrides: further dotted-key overrides (e.g. an ablation's env settings).
    """
    over = {"seed": int(seed), "budget": int(budget), "agent": agent, "name": f"{agent}_s{seed}",
            "run.progress": False}
    over.update(overrides or {})
    return load_config(config, over)


def run_unit(cfg: PruneRunConfig, agent: str, run_dir: Path) -> Dict[str, Any]:
    """:func:`rl_prune.pipeline.run` of one unit, continuing a killed search from its checkpoint when it has one.

    Returns ``{"status": "done" | "skipped" | "busy" | "failed", ...}``; a failure writes ``error.txt`` with
    the traceback into the run folder and does not raise, so the other units go on. A unit another live
    process is running (its run folder's lock) is left to it ("busy"), so two workers can share a queue.

    :param cfg: the unit's config (:func:`unit_config`).
    :param agent: agent name.
    :param run_dir: the unit's run folder.
    """
    folder = RunFolder(run_dir)
    if folder.is_finished:
        return {"status": "skipped"}
    try:
        lock = folder.lock().acquire()
    except RunFolderLocked:
        return {"status": "busy"}
    try:
        if folder.is_finished:  # another worker finished it before the lock was ours
            return {"status": "skipped"}
        return _run_locked(cfg, agent, Path(run_dir))
    finally:
        lock.release()


def _run_locked(cfg: PruneRunConfig, agent: str, run_dir: Path) -> Dict[str, Any]:
    resume = RunFolder(run_dir).has_checkpoint
    (run_dir / ERROR_FILE).unlink(missing_ok=True)  # the last attempt's: the folder then holds only run files
    try:
        try:
            run(cfg, agent, run_dir, resume=resume)
        except ResumeMismatch as err:
            # a checkpoint of another config (e.g. a changed budget): start the unit again
            print(f"{run_dir}: {err}; starting it again", file=sys.stderr)
            run(cfg, agent, run_dir, resume=False, overwrite=True)
    except Exception:  # any agent bug: record it, go on with the next unit
        tb = traceback.format_exc()
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tb, run_dir / ERROR_FILE)
        print(f"\n{run_dir.name} FAILED:\n{tb}", file=sys.stderr, flush=True)
        return {"status": "failed", "traceback": tb}
    return {"status": "done"}


def load_unit(run_dir: Path) -> Optional[Dict[str, Any]]:
    """``metrics.json`` of a finished unit plus its ``steps.csv`` rows under ``"_steps"`` (None when unfinished).

    :param run_dir: the unit's run folder.
    """
    folder = RunFolder(run_dir)
    if not folder.is_finished:
        return None
    metrics = folder.read_metrics()
    metrics["_steps"] = folder.read_steps()
    return metrics


def unit_failure(run_dir: Path) -> Optional[str]:
    """The traceback a failed unit left, or None.

    :param run_dir: the unit's run folder.
    """
    path = Path(run_dir) / ERROR_FILE
    return path.read_text() if path.is_file() else None


__all__ = ["BENCH_CONFIG", "ERROR_FILE", "LOCK_FILE", "unit_config", "run_unit", "load_unit", "unit_failure"]
