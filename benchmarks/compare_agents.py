"""Agent comparison as curves (issue 24): every agent's searched model at 2x, 4x and 8x fewer MACs (50 / 75 / 87.5 %
FLOPs reduction), each fine-tuned with several seeds; test top-1 after the fine-tune against MACs kept, a leaderboard
and a verdict per target (the best RL agent against the best non-RL allocation, in pooled seed std).

    python benchmarks/compare_agents.py                                    # the protocol below, resumable
    python benchmarks/compare_agents.py --targets 0.875 --agents uniform ppo --search-seeds 3 --ft-seeds 2
    python benchmarks/compare_agents.py --report-only                      # leaderboard and plot from finished units

Built on the run layer only: a **search unit** (model, target, agent, search seed) is one
``rl_prune.pipeline.run`` with no fine-tune into its run folder ``{out}/{model}/{schedule}/t{target}/{agent}_s{seed}``,
which keeps the searched model as kept-channel indices (``RunFolder.read_searched_model`` rebuilds and hash-checks
it); a **fine-tune unit** (..., fine-tune seed) is ``rl_prune.pipeline.finetune_searched`` of that folder, its result
written atomically to ``.../t{target}/finetune/{agent}_s{seed}_f{ft_seed}.json``. Finished units are skipped, so a
killed benchmark continues where it stopped (rerun the same command); a search killed midway resumes from its run
checkpoint. Protocol: >= 3 search seeds, >= 2 fine-tune seeds per searched model, the same budget (>= 150
evaluations) spent exactly by every searching agent (a unit that used another count is refused), the same fine-tune
for every agent.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: benchmarks.common is imported from the repository root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from agents.registry import AGENTS  # noqa: E402
from benchmarks.common import (best_vs_best, failures_section, fmt, machine_line, markdown_table, mean_std,  # noqa: E402
                               num, pooled_std, provenance, spearman)
from pruning_env.runtime import atomic_write_text  # noqa: E402
from rl_prune.config import ConfigError, PruneRunConfig, load_config, parse_overrides  # noqa: E402
from rl_prune.pipeline import build_env, finetune_searched  # noqa: E402
from rl_prune.run_folder import RunFolder, RunFolderLocked, RunLock  # noqa: E402
from rl_prune.sweep import BENCH_CONFIG, exact_budget, run_unit, unit_config, unit_failure  # noqa: E402

SCRIPT = "benchmarks/compare_agents.py"
#: the agents compared by default (``amc`` too once the registry has it)
DEFAULT_AGENTS = tuple(a for a in ("uniform", "global_taylor", "random_search", "rl_pruner_improved", "ppo", "amc")
                       if a in AGENTS)
#: the protocol's floor (issue 24 item 6): a verdict from less is marked provisional
MIN_BUDGET, MIN_SEARCH_SEEDS, MIN_FT_SEEDS = 150, 3, 2
#: schedules: one-shot (every agent prunes to the target at once), iterative (the authors': several steps with KD
#: recovery between them, the recovery epochs taken from the final fine-tune so every agent trains as long)
SCHEDULES = ("oneshot", "iterative")


def default_budget(n_steps: int) -> int:
    """The smallest budget >= 150 that every searching agent spends exactly (:func:`rl_prune.sweep.exact_budget`:
    151 for one step, 153 for three).

    :param n_steps: pruning steps per episode.
    """
    return exact_budget(n_steps, MIN_BUDGET)

#: the agent whose env the fine-tune units use (a plain PruneEnv: the task's splits, original model and device)
FT_ENV_AGENT = "uniform"
#: search-run settings of every unit: no fine-tune (the fine-tune units do it), no TorchScript export
SEARCH_OVERRIDES = {"finetune.epochs": 0, "run.export_torchscript": False}


def is_rl(agent: str) -> bool:
    """RL agents: RL-Pruner in any mode, every SB3 algorithm, AMC's DDPG; the rest (uniform, global Taylor, random
    search, knapsack, ...) are non-RL allocations.

    :param agent: a key of :data:`agents.registry.AGENTS`.
    """
    spec = AGENTS[agent]
    return spec.sb3_algo is not None or spec.target.startswith("agents.rl_pruner") or agent == "amc"


def spends_budget(agent: str, metrics: Dict[str, Any]) -> bool:
    """Whether the agent searches with the evaluation budget (SB3 timesteps, look-aheads per step, a derived RL
    schedule); uniform and global Taylor evaluate once per step whatever the budget.

    :param agent: agent name.
    :param metrics: the unit's metrics (its ``budget_schedule``).
    """
    spec = AGENTS[agent]
    return spec.sb3_algo is not None or spec.budget_arg is not None or metrics.get("budget_schedule") is not None


def unit_rerank(metrics: Dict[str, Any]) -> int:
    """The ``final_rerank`` a unit was searched with: 1 (off) without a record, else the record's ``k`` (a record
    from before ``k`` was written: its finalists' count)."""
    record = metrics.get("final_rerank")
    if record is None:
        return 1
    return int(record.get("k", len(record.get("finalists", []))))


def budget_problem(agent: str, metrics: Dict[str, Any], budget: int,
                   estimator: Optional[str] = None, rerank: Optional[int] = None) -> Optional[str]:
    """Why a finished search unit cannot enter the comparison (None when it can): a run made with another budget
    or another reward estimator, or a searching agent that used another number of evaluations than the budget.

    :param agent: agent name.
    :param metrics: the unit's ``metrics.json`` (``RunFolder.read_metrics``).
    :param budget: the comparison's budget.
    :param estimator: the comparison's reward estimator (None: not checked).
    :param rerank: the comparison's ``env.final_rerank`` (None: not checked); a searching agent's unit must have
        been made with the same (:func:`unit_rerank`).
    """
    if estimator is not None and metrics.get("reward_estimator", estimator) != estimator:
        return (f"searched with the reward estimator {metrics.get('reward_estimator')!r}, not {estimator!r} (give a "
                f"variant its own --tag)")
    if rerank is not None and spends_budget(agent, metrics) and unit_rerank(metrics) != rerank:
        return (f"searched with final_rerank={unit_rerank(metrics)}, not {rerank} (give a variant its own --tag)")
    if metrics.get("budget") != budget:
        return f"made with budget {metrics.get('budget')}, not {budget}"
    used = int(metrics["n_evaluations"])
    if not AGENTS[agent].budget_exact and used <= budget:
        return None  # a grid sized from the budget (AgentSpec.budget_exact): its own handicap, shown in the table
    if spends_budget(agent, metrics) and used != budget:
        return f"used {used} of its {budget} evaluations (unequal budgets are not compared)"
    return None


# ---------------------------------------------------------------------------------------------- units and paths
def model_tag(cfg: PruneRunConfig) -> str:
    """``vgg19w025`` for the width-0.25 VGG-19: the model part of result names.

    :param cfg: the task's config.
    """
    env = cfg.env
    width = env.get("width")
    suffix = "" if width in (None, 1, 1.0) else f"w{round(float(width) * 100):03d}"
    return f"{env.get('model', 'model')}{suffix}"


def target_name(target: float) -> str:
    """``t0875`` for 0.875 (per mille, so 87.5 % keeps its half).

    :param target: FLOPs reduction.
    """
    return f"t{round(target * 1000):04d}"


def ft_seed_value(search_seed: int, index: int, n_search_seeds: int) -> int:
    """The fine-tune seed of fine-tune ``index`` of search seed ``search_seed``: ``search_seed + index *
    n_search_seeds``, so the first fine-tune is the run's own (seed = search seed) and no two fine-tunes of an agent
    share a seed (uniform's searched model is the same for every search seed: its spread is fine-tune noise).

    :param search_seed: the search seed.
    :param index: 0, 1, ... < fine-tune seeds.
    :param n_search_seeds: search seeds of the comparison.
    """
    return int(search_seed) + int(index) * int(n_search_seeds)


#: the default length of the training after pruning: its fine-tune units live in ``finetune/``, others' in
#: ``finetune_e{epochs}/`` beside them (the same search units fine-tuned for another length: the length check)
DEFAULT_FT_EPOCHS = 15


def finetune_folder(epochs: int) -> str:
    """``finetune`` for :data:`DEFAULT_FT_EPOCHS` training epochs, ``finetune_e{epochs}`` for another length."""
    return "finetune" if int(epochs) == DEFAULT_FT_EPOCHS else f"finetune_e{int(epochs)}"


class Layout:
    """Where the units of one comparison live: ``{out}/{model}/{schedule}/t{target}/``, the fine-tunes of
    ``finetune_epochs`` training epochs in its :func:`finetune_folder`.

    :param out_dir: the benchmark's ``--out-dir``.
    :param model: :func:`model_tag`.
    :param schedule: ``oneshot`` (or the schedule's name).
    :param finetune_epochs: training epochs after pruning (``--finetune-epochs``).
    """

    def __init__(self, out_dir: Path, model: str, schedule: str, finetune_epochs: int = DEFAULT_FT_EPOCHS) -> None:
        self.root = Path(out_dir) / model / schedule
        self.out_dir, self.finetune_epochs = Path(out_dir), int(finetune_epochs)

    def with_epochs(self, epochs: int) -> "Layout":
        """The same comparison's layout for fine-tunes of another length."""
        return Layout(self.out_dir, self.root.parent.name, self.root.name, epochs)

    def lengths(self, target: float) -> List[int]:
        """The fine-tune lengths (training epochs) that have a folder of units at ``target``."""
        found = []
        for d in (self.root / target_name(target)).glob("finetune*"):
            if d.is_dir() and (d.name == "finetune" or d.name.startswith("finetune_e")):
                found.append(DEFAULT_FT_EPOCHS if d.name == "finetune" else int(d.name[len("finetune_e"):]))
        return sorted(found)

    def search(self, target: float, agent: str, seed: int) -> Path:
        """The search unit's run folder."""
        return self.root / target_name(target) / f"{agent}_s{seed}"

    def finetune(self, target: float, agent: str, seed: int, ft_seed: int) -> Path:
        """The fine-tune unit's result file."""
        return (self.root / target_name(target) / finetune_folder(self.finetune_epochs)
                / f"{agent}_s{seed}_f{ft_seed}.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(BENCH_CONFIG), help="train_agent.py YAML config of the task")
    p.add_argument("--agents", nargs="+", default=list(DEFAULT_AGENTS), choices=list(AGENTS), metavar="AGENT",
                   help=f"agents to compare (default: {' '.join(DEFAULT_AGENTS)}; any of {' '.join(AGENTS)})")
    p.add_argument("--targets", nargs="+", type=float, default=[0.875, 0.75, 0.5],
                   help="FLOPs reductions, run in this order (default 0.875 0.75 0.5: 8x, 4x, 2x)")
    p.add_argument("--search-seeds", type=int, default=MIN_SEARCH_SEEDS,
                   help=f"search seeds 0..N-1 (default {MIN_SEARCH_SEEDS})")
    p.add_argument("--ft-seeds", type=int, default=MIN_FT_SEEDS,
                   help=f"fine-tunes of every searched model, each with its own seed (default {MIN_FT_SEEDS})")
    p.add_argument("--budget", type=int, default=None,
                   help=f"evaluations per searching agent, spent exactly (>= {MIN_BUDGET}; default: the smallest "
                        f"such budget every agent spends exactly, 151 for one step, 153 for three)")
    p.add_argument("--schedule", choices=SCHEDULES, default="oneshot",
                   help="oneshot: prune to the target in --n-steps steps (default 1) without training between them; "
                        "iterative: --n-steps steps (default 3) with --recovery-epochs of KD recovery between them, "
                        "taken from the final fine-tune (the same training for every agent and schedule)")
    p.add_argument("--n-steps", type=int, default=None, help="pruning steps (default: 1 oneshot, 3 iterative)")
    p.add_argument("--recovery-epochs", type=int, default=2,
                   help="iterative: KD recovery epochs after each non-final step (default 2)")
    p.add_argument("--finetune-epochs", type=int, default=15,
                   help="training epochs after the search: the final KD fine-tune, less the recovery epochs of the "
                        "iterative schedule (default 15: the length at which compare_agents.md found the ranking "
                        "stable at 70 %%)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides of every unit (give a variant its own --tag)")
    p.add_argument("--tag", default="", metavar="NAME",
                   help="a variant of the comparison (e.g. other --set reward settings): its units, report and units "
                        "file are named <schedule>_<NAME>, so they never mix with the untagged comparison's")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "compare_curves"), help="where the units live")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"),
                   help="where compare_curves_<model>.md|json|png go (report_stem: _<schedule> unless one-shot, "
                        "_e<epochs> unless --finetune-epochs is the default)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--max-units", type=int, default=None, help="stop after running this many units (sizing)")
    p.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                   help="start no unit after this many minutes (the report is written either way)")
    p.add_argument("--note", default="", help="a paragraph for the top of the markdown")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished units")
    p.add_argument("--restore", default=None, metavar="JSON",
                   help="first rebuild the finished units of a compare_curves_<model>_units.json this script wrote "
                        "(its searched models from kept-channel masks, hash-checked against the base checkpoint; its "
                        "fine-tune records) where they are missing: the committed results carry the work to another "
                        "machine")
    return p


def resolve_args(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on the schedule (``n_steps``, ``budget``)."""
    if args.n_steps is None:
        args.n_steps = 3 if args.schedule == "iterative" else 1
    if args.budget is None:
        args.budget = default_budget(max(1, args.n_steps))


def final_epochs(args: argparse.Namespace) -> int:
    """Epochs of the final fine-tune: ``--finetune-epochs`` less the iterative schedule's recovery epochs."""
    recovery = (args.n_steps - 1) * args.recovery_epochs if args.schedule == "iterative" else 0
    return args.finetune_epochs - recovery


def schedule_name(args: argparse.Namespace) -> str:
    """``oneshot``, ``3step`` (several steps, no training between) or ``iterative3_r2`` (3 steps, 2 recovery epochs
    after each non-final one), then ``_<tag>`` for a ``--tag``ged variant: the schedule's folder, and so the
    report's name (:func:`report_stem`) and what a restore and a kept target must match."""
    if args.schedule == "iterative":
        name = f"iterative{args.n_steps}_r{args.recovery_epochs}"
    else:
        name = "oneshot" if args.n_steps == 1 else f"{args.n_steps}step"
    return f"{name}_{args.tag}" if args.tag else name


def check_args(args: argparse.Namespace) -> Optional[str]:
    """The first problem with the command line, or None (after :func:`resolve_args`)."""
    if args.tag and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", args.tag):
        return f"--tag must be lower-case letters, digits and '-' (a folder and file name part), got {args.tag!r}"
    if args.search_seeds < 1 or args.ft_seeds < 1:
        return f"--search-seeds and --ft-seeds must be >= 1, got {args.search_seeds} and {args.ft_seeds}"
    bad = [t for t in args.targets if not 0.0 < t < 1.0]
    if bad:
        return f"--targets must be FLOPs reductions in (0, 1), got {bad}"
    if args.budget < MIN_BUDGET:
        return (f"--budget {args.budget} is below the protocol's {MIN_BUDGET} evaluations per agent (issue 24: a "
                f"smaller budget does not let a search agent search)")
    if args.n_steps < 1 or args.finetune_epochs < 1:
        return f"--n-steps and --finetune-epochs must be >= 1, got {args.n_steps} and {args.finetune_epochs}"
    if args.schedule == "iterative":
        if args.n_steps < 2 or args.recovery_epochs < 1:
            return (f"--schedule iterative needs --n-steps >= 2 and --recovery-epochs >= 1, got {args.n_steps} and "
                    f"{args.recovery_epochs}")
        if final_epochs(args) < 1:
            return (f"--schedule iterative: {args.n_steps - 1} recoveries x {args.recovery_epochs} epochs leave "
                    f"{final_epochs(args)} of the {args.finetune_epochs} training epochs for the final fine-tune; "
                    f"raise --finetune-epochs or lower --recovery-epochs")
        one_step = [a for a in args.agents if AGENTS[a].env.get("n_steps") == 1]
        if one_step:
            return (f"--schedule iterative: {', '.join(one_step)} always prune(s) in one step (their registry env); "
                    f"leave them out of --agents for this schedule")
    try:
        parse_overrides(args.set)
    except ConfigError as err:
        return f"--set: {err}"
    return None


def comparison_rerank(args: argparse.Namespace) -> int:
    """The ``env.final_rerank`` of every unit of the comparison (the config's, or ``--set env.final_rerank=``)."""
    return int(task_config(args).env.get("final_rerank", 1))


def task_config(args: argparse.Namespace) -> PruneRunConfig:
    """The task's config with ``--set`` applied (what every unit shares: the reward estimator among it)."""
    return load_config(args.config, parse_overrides(args.set))


def comparison_estimator(args: argparse.Namespace) -> str:
    """The reward estimator of every unit of the comparison (the config's, or ``--set env.reward_estimator=``)."""
    return task_config(args).env.get("reward_estimator", "vanilla")


def search_config(args: argparse.Namespace, agent: str, seed: int, target: float) -> PruneRunConfig:
    """The search unit's config: the task's, with the target, the schedule, the budget and no fine-tune."""
    return unit_config(args.config, agent, seed, args.budget, unit_overrides(args, target))


def unit_overrides(args: argparse.Namespace, target: float) -> Dict[str, Any]:
    """Config overrides of every unit of one target: ``--set``, the target, the schedule, no fine-tune."""
    over: Dict[str, Any] = {**parse_overrides(args.set), "env.target": float(target), "env.n_steps": args.n_steps,
                            **SEARCH_OVERRIDES}
    if args.schedule == "iterative":
        over.update({"env.recovery": "kd", "env.recovery_epochs": args.recovery_epochs, "env.recovery_batches": 0})
    return over


def finetune_config(args: argparse.Namespace, agent: str, seed: int, target: float) -> PruneRunConfig:
    """The fine-tune unit's config: the search unit's with :func:`final_epochs` of the config's recipe."""
    over = {**unit_overrides(args, target), "finetune.epochs": final_epochs(args)}
    return unit_config(args.config, agent, seed, args.budget, over)


# ---------------------------------------------------------------------------------------------- running
def unit_queue(args: argparse.Namespace) -> List[Tuple[float, int, int, str]]:
    """``(target, search seed, fine-tune index, agent)`` in run order: target by target; within one, the first
    fine-tune of every search seed before any second one, so a table with every search seed exists early."""
    return [(t, s, f, a) for t in args.targets for f in range(args.ft_seeds) for s in range(args.search_seeds)
            for a in args.agents]


def run_finetune_unit(args: argparse.Namespace, layout: Layout, target: float, agent: str, seed: int,
                      ft_seed: int, env: Any) -> Dict[str, Any]:
    """One fine-tune unit: ``finetune_searched`` of the search unit's folder, written atomically with the search's
    numbers, the command and the machine."""
    folder = RunFolder(layout.search(target, agent, seed))
    metrics = folder.read_metrics()
    cfg = finetune_config(args, agent, seed, target)
    result = finetune_searched(cfg, folder, seed=ft_seed, env=env)
    record = {
        "model": layout.root.parent.name, "schedule": layout.root.name, "target": target, "agent": agent,
        "search_seed": seed, "ft_seed": ft_seed, "finetune_epochs": args.finetune_epochs,
        "final_epochs": final_epochs(args),
        "search": search_numbers(metrics), "finetune": result,
        **provenance(SCRIPT, threads=args.threads),
    }
    atomic_write_text(json.dumps(record, indent=2, default=float), layout.finetune(target, agent, seed, ft_seed))
    return record


def search_numbers(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """What the report needs of a search unit's metrics (its cost, its reductions, its reward)."""
    orig, before = metrics["original"], metrics["pruned_before_finetune"]
    return {"n_evaluations": metrics["n_evaluations"], "budget": metrics["budget"],
            "budget_schedule": metrics.get("budget_schedule"), "search_s": metrics["seconds"]["search"],
            "flops_reduction": metrics["flops_reduction"], "params_reduction": metrics["params_reduction"],
            "macs_kept": before["macs"] / orig["macs"], "kept_channels": metrics["kept_channels"],
            "reward_accuracy": metrics["reward_accuracy"], "reward_estimator": metrics["reward_estimator"],
            "test_before_ft": before["test_top1"], "original": orig, "device": metrics["device"]}


def run_all(args: argparse.Namespace, layout: Layout) -> None:
    """Every unit of the queue not finished yet, in order; a failure is recorded and the others go on."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    done = 0
    estimator, rerank = comparison_estimator(args), comparison_rerank(args)
    # the env of the fine-tunes (splits, the original model as teacher and source): one at a time, for the
    # (target, search seed) of the unit; the queue runs a seed's agents together
    env_key: Optional[Tuple[float, int]] = None
    env: Any = None
    queue = unit_queue(args)
    bar = tqdm(queue, desc="compare", unit="unit", dynamic_ncols=True)
    try:
        for target, seed, index, agent in bar:
            if args.max_units is not None and done >= args.max_units:
                print(f"stopping: --max-units {args.max_units} reached", file=sys.stderr)
                break
            if args.stop_after is not None and time.monotonic() - started > 60 * args.stop_after:
                print(f"stopping: --stop-after {args.stop_after} min reached", file=sys.stderr)
                break
            run_dir = layout.search(target, agent, seed)
            bar.set_postfix(unit=f"{target_name(target)}/{agent}_s{seed}")
            folder = RunFolder(run_dir)
            if not folder.is_finished:
                status = run_unit(search_config(args, agent, seed, target), agent, run_dir)
                done += status["status"] == "done"
                if not folder.is_finished:
                    continue  # failed (error.txt) or busy in another worker
                write_report(args, layout)
            problem = budget_problem(agent, folder.read_metrics(), args.budget, estimator, rerank)
            if problem is not None:
                print(f"{run_dir}: {problem}; not fine-tuned", file=sys.stderr)
                continue
            ft_seed = ft_seed_value(seed, index, args.search_seeds)
            path = layout.finetune(target, agent, seed, ft_seed)
            if path.is_file():
                continue
            bar.set_postfix(unit=f"{target_name(target)}/{agent}_s{seed}_f{ft_seed}")
            if env_key != (target, seed):
                if env is not None:
                    env.close()
                # a PruneEnv (uniform's) whatever the agent: its splits, original model and device are the task's
                env = build_env(finetune_config(args, FT_ENV_AGENT, seed, target), FT_ENV_AGENT)
                env_key = (target, seed)
            lock = RunLock(path.with_suffix(".lock"))  # two workers can share the queue: a unit runs once
            try:
                lock.acquire()
            except RunFolderLocked:
                continue
            try:
                if path.is_file():  # another worker finished it before the lock was ours
                    continue
                run_finetune_unit(args, layout, target, agent, seed, ft_seed, env)
            except Exception as err:  # recorded beside the unit; the others go on
                import traceback

                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(traceback.format_exc(), path.with_suffix(".error.txt"))
                print(f"{path.name} FAILED: {err}", file=sys.stderr, flush=True)
                continue
            finally:
                lock.release()
            path.with_suffix(".error.txt").unlink(missing_ok=True)
            done += 1
            write_report(args, layout)
    finally:
        if env is not None:
            env.close()


def restore_units(args: argparse.Namespace, layout: Layout, path: Path) -> int:
    """Rebuild the missing units of this comparison from the ``{stem}_units.json`` :func:`write_report` wrote beside
    the report (each target's ``carry``):
    each search folder through ``RunFolder.restore_search`` (the searched model rebuilt from its kept-channel masks
    on the task's base model and checked against the carried hashes), each fine-tune record as written. Units of
    other agents, targets or seeds are left out; finished units here are kept. Returns the units written.

    :raises SystemExit: the JSON is of another comparison (model, schedule, budget, training epochs or reward
        estimator), or a carried search does not rebuild on this base model; the message names it.
    """
    data = json.loads(Path(path).read_text())
    meta = data["meta"]
    ours = {"model": layout.root.parent.name, "schedule": layout.root.name, "budget": args.budget,
            "finetune_epochs": args.finetune_epochs, "reward_estimator": comparison_estimator(args)}
    differ = [f"{k} {meta.get(k)!r} (here {v!r})" for k, v in ours.items() if meta.get(k) != v]
    if differ:
        raise SystemExit(f"error: --restore {path} is of another comparison: {'; '.join(differ)}")
    sources: Dict[int, Any] = {}

    def source(seed: int, target: float) -> Any:
        if seed not in sources:  # the task's base model (a seeded untrained one differs by seed)
            env = build_env(finetune_config(args, FT_ENV_AGENT, seed, target), FT_ENV_AGENT)
            sources[seed] = env.original_model
            env.close()
        return sources[seed]

    written = 0
    wanted = {f"{t:g}": t for t in args.targets}
    for t, block in data["targets"].items():
        if t not in wanted or not block.get("carry"):
            continue
        target = wanted[t]
        for key, exported in block["carry"]["searches"].items():
            agent, seed = key.rsplit("_s", 1)[0], int(key.rsplit("_s", 1)[1])
            folder = RunFolder(layout.search(target, agent, seed))
            if agent not in args.agents or seed >= args.search_seeds or folder.is_finished:
                continue
            try:
                folder.restore_search(exported, source(seed, target))
                for rec in exported.get("scratch", []):  # what the report reads of its Scratch-E runs
                    atomic_write_text(json.dumps(rec, indent=2), folder.path / f"scratch_e_seed{rec['seed']}.json")
            except ValueError as err:
                raise SystemExit(f"error: --restore {path}: {err}") from None
            written += 1
        records = [(layout, r) for r in block["carry"]["finetunes"]]
        records += [(layout.with_epochs(int(k)), r) for k, rs in block["carry"].get("finetunes_other_lengths",
                                                                                     {}).items() for r in rs]
        for where, rec in records:
            out = where.finetune(target, rec["agent"], int(rec["search_seed"]), int(rec["ft_seed"]))
            if rec["agent"] in args.agents and int(rec["search_seed"]) < args.search_seeds and not out.is_file():
                out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(json.dumps(rec, indent=2, default=float), out)
                written += 1
    return written


# ---------------------------------------------------------------------------------------------- report
def collect(args: argparse.Namespace, layout: Layout, target: float) -> Dict[str, Any]:
    """The finished units of one target: per agent its fine-tune records and search metrics, the refused search
    units (budget), failures and missing units."""
    agents: Dict[str, Dict[str, Any]] = {}
    refused: Dict[str, str] = {}
    failures: Dict[str, str] = {}
    missing: List[str] = []
    carried: Dict[str, Any] = {}
    estimator, rerank = comparison_estimator(args), comparison_rerank(args)
    for agent in args.agents:
        searches, fts = {}, []
        for seed in range(args.search_seeds):
            run_dir = layout.search(target, agent, seed)
            unit = f"{target_name(target)}/{agent}_s{seed}"
            folder = RunFolder(run_dir)
            if not folder.is_finished:
                tb = unit_failure(run_dir)
                if tb is not None:
                    failures[unit] = tb
                else:
                    missing.append(unit)
                continue
            exported = folder.export_search()  # metrics and searched model, read once: the report and the carry
            problem = budget_problem(agent, exported["metrics"], args.budget, estimator, rerank)
            if problem is not None:
                refused[unit] = problem
                continue
            searches[seed] = search_numbers(exported["metrics"])
            exported["scratch"] = searches[seed]["scratch"] = scratch_records(run_dir)
            carried[f"{agent}_s{seed}"] = exported
            searched = exported["searched_model"]
            if searched is None and folder.has_searched_model:  # trained weights: not carried, its hash still read
                record = folder.read_searched_record()
                searched = {"source_hash": record.source_hash, "source": record.source}
            if searched is not None:
                searches[seed].update(source_hash=searched["source_hash"], source=searched["source"])
            for index in range(args.ft_seeds):
                ft_seed = ft_seed_value(seed, index, args.search_seeds)
                path = layout.finetune(target, agent, seed, ft_seed)
                if path.is_file():
                    rec = json.loads(path.read_text())
                    if rec["finetune_epochs"] == args.finetune_epochs:
                        fts.append(rec)
                        continue
                err = path.with_suffix(".error.txt")
                if err.is_file():
                    failures[f"{unit}_f{ft_seed}"] = err.read_text()
                else:
                    missing.append(f"{unit}_f{ft_seed}")
        agents[agent] = {"searches": searches, "finetunes": fts}
    return {"agents": agents, "refused": refused, "failures": failures, "missing": missing, "carried": carried}


def scratch_records(run_dir: Path) -> List[Dict[str, Any]]:
    """The Scratch-E runs of one search unit (``python -m rl_prune.scratch RUN_DIR --seed N --epochs E`` writes
    ``scratch_e_seed{N}.json`` into the unit's folder): seed, epochs, test and best validation top-1 of each."""
    out = []
    for path in sorted(Path(run_dir).glob("scratch_e_seed*.json")):
        rec = json.loads(path.read_text())
        out.append({"seed": int(rec["seed"]), "epochs": int(rec["epochs"]), "test_top1": float(rec["test_top1"]),
                    "best_val_top1": float(rec["best_val_top1"])})
    return out


def scratch_lines(t: str, summary: Dict[str, Dict[str, Any]], final_epochs: int) -> List[str]:
    """Scratch-E at one target: per agent with Scratch-E runs, the pruned model after its fine-tune against its
    architecture trained from scratch (nothing when none was run)."""
    rows = [[f"`{a}`" + (" (RL)" if d["rl"] else ""), fmt(d["test"]), fmt(d["scratch"]), d["scratch"]["n"],
             "/".join(str(e) for e in d["scratch_epochs"])]
            for a, d in sorted(summary.items(), key=lambda kv: -kv[1]["test"]["mean"]) if d["scratch"]["n"]]
    if not rows:
        return []
    return [f"### Scratch-E at {t}", "",
            f"Each searched architecture trained from a fresh initialisation with the base model's pretraining recipe "
            f"for pretraining + fine-tune epochs (Liu et al. 2019), against the pruned model after its "
            f"{final_epochs}-epoch fine-tune: a better allocation as an architecture, or only a better starting "
            f"point.", "",
            *markdown_table(["agent", "pruned + fine-tune (test top-1)", "Scratch-E (test top-1)", "Scratch-E runs",
                             "epochs"], rows), ""]


def summarise(block: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per agent with at least one fine-tune: test top-1 after the fine-tune as the mean over search seeds of each
    searched model's mean over its fine-tune seeds (``test``: mean ± std over search seeds, the unit of the verdict),
    the within-model fine-tune std (pooled over searched models), MACs kept, evaluations and search seconds."""
    out: Dict[str, Dict[str, Any]] = {}
    for agent, data in block["agents"].items():
        by_seed: Dict[int, List[float]] = {}
        for rec in data["finetunes"]:
            by_seed.setdefault(int(rec["search_seed"]), []).append(rec["finetune"]["report"]["test_top1"])
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        per_model = [mean_std(by_seed[s]) for s in seeds]
        with_spread = [s for s in per_model if s["n"] >= 2]
        searches = [data["searches"][s] for s in seeds]
        scratch = [r for s in searches for r in s.get("scratch", [])]
        out[agent] = {
            "rl": is_rl(agent), "search_seeds": seeds, "ft_per_model": [len(by_seed[s]) for s in seeds],
            "test": mean_std([s["mean"] for s in per_model]),
            "all_units": mean_std([v for s in seeds for v in by_seed[s]]),
            "ft_std": pooled_std(*with_spread) if len(with_spread) >= 2 else (
                with_spread[0]["std"] if with_spread else float("nan")),
            "macs_kept": mean_std([s["macs_kept"] for s in searches]),
            "flops_reduction": mean_std([s["flops_reduction"] for s in searches]),
            "test_before_ft": mean_std([s["test_before_ft"] for s in searches]),
            "reward_accuracy": mean_std([s["reward_accuracy"] for s in searches]),
            "n_evaluations": mean_std([s["n_evaluations"] for s in searches]),
            "search_s": mean_std([s["search_s"] for s in searches]),
            "ft_s": mean_std([rec["finetune"]["seconds"] for rec in data["finetunes"]]),
            "scratch": mean_std([r["test_top1"] for r in scratch]) if scratch else
            {"mean": float("nan"), "std": float("nan"), "n": 0},
            "scratch_epochs": sorted({r["epochs"] for r in scratch}),
            "per_model": {str(s): by_seed[s] for s in seeds},
            "per_model_reward": {str(s): data["searches"][s]["reward_accuracy"] for s in seeds},
        }
    return out


def reward_vs_outcome(summary: Dict[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Does the search's reward rank the searched models? Over every searched model (agent, search seed) of one
    target: Spearman's rho between the reward's accuracy term at the end of the search and the test top-1 after
    the fine-tune (the model's mean over its fine-tune seeds), and where the best-rewarded model ended. The
    fidelity benchmark measures the estimator on random candidates; this is the same question on the candidates
    the agents chose, which a search pushes towards the estimator's errors.

    :param summary: :func:`summarise` of one target.
    """
    pairs = [(a, s, float(d["per_model_reward"][s]), float(np.mean(v)))
             for a, d in summary.items() for s, v in d["per_model"].items() if s in d.get("per_model_reward", {})]
    if len(pairs) < 3:
        return None
    best_reward = max(pairs, key=lambda p: p[2])
    best_test = max(pairs, key=lambda p: p[3])
    return {"n": len(pairs), "rho": spearman([p[2] for p in pairs], [p[3] for p in pairs]),
            "best_rewarded": {"model": f"{best_reward[0]}_s{best_reward[1]}", "reward": best_reward[2],
                              "test": best_reward[3]},
            "best_tested": {"model": f"{best_test[0]}_s{best_test[1]}", "reward": best_test[2],
                            "test": best_test[3]}}


def reward_vs_outcome_line(t: str, r: Optional[Dict[str, Any]]) -> str:
    """The markdown line of :func:`reward_vs_outcome`."""
    if r is None:
        return f"- {t}: fewer than 3 searched models with a fine-tune."
    br, bt = r["best_rewarded"], r["best_tested"]
    return (f"- {t}: Spearman rho(reward accuracy, test top-1 after FT) = {num(r['rho'], '+.2f')} over {r['n']} "
            f"searched models; the best-rewarded, `{br['model']}` (reward {br['reward']:.3f}), ends at "
            f"{br['test']:.4f}; the best after the fine-tune, `{bt['model']}` (reward {bt['reward']:.3f}), at "
            f"{bt['test']:.4f}.")


def target_verdict(summary: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Best RL agent vs best non-RL allocation on test top-1 after the fine-tune (mean over search seeds), judged
    in pooled seed std (``benchmarks.common.verdict``); ``provisional`` lists what the protocol still lacks."""
    stats = {a: s["test"] for a, s in summary.items()}
    v = best_vs_best(stats, [a for a in summary if summary[a]["rl"]], [a for a in summary if not summary[a]["rl"]])
    if v is None:
        return None
    lacking = []
    for agent in (v["first"], v["second"]):
        s = summary[agent]
        if len(s["search_seeds"]) < MIN_SEARCH_SEEDS:
            lacking.append(f"{agent}: {len(s['search_seeds'])} search seed(s) of {MIN_SEARCH_SEEDS}")
        if min(s["ft_per_model"]) < MIN_FT_SEEDS:
            lacking.append(f"{agent}: {min(s['ft_per_model'])} fine-tune seed(s) per model of {MIN_FT_SEEDS}")
    missing_agents = [a for a in args.agents if a not in summary]
    if missing_agents:
        lacking.append(f"no result yet for {', '.join(missing_agents)}")
    return {**v, "provisional": lacking}


def verdict_sentence(t: str, v: Optional[Dict[str, Any]]) -> str:
    """The plain verdict line of one target."""
    if v is None:
        return f"**{t}:** no verdict yet (an RL agent and a non-RL allocation both need a finished fine-tune)."
    text = (f"**{t}:** best RL agent `{v['first']}` {v['first_mean']:.4f} vs best non-RL allocation `{v['second']}` "
            f"{v['second_mean']:.4f}: {v['diff']:+.4f} = {num(v['diff_over_std'], '+.2f')} pooled seed std "
            f"({num(v['pooled_std'], '.4f')}): **{v['verdict']}**.")
    if v["provisional"]:
        text += " Provisional: " + "; ".join(v["provisional"]) + "."
    return text


def plot(per_target: Dict[str, Dict[str, Any]], agents: Sequence[str], original: Optional[float], path: Path,
         title: str) -> None:
    """Test top-1 after the fine-tune against MACs kept: one line per agent through its per-target means (error
    bars: std over search seeds), every fine-tune unit as a faint dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.get_cmap("tab10")
    for i, agent in enumerate(agents):
        dodge = 2.0 ** (0.025 * (i - (len(agents) - 1) / 2))  # agents side by side at one target (log x)
        pts = []
        for t, block in per_target.items():
            s = block["summary"].get(agent)
            if s is None:
                continue
            pts.append((s["macs_kept"]["mean"] * dodge, s["test"]["mean"], 0.0 if math.isnan(s["test"]["std"])
                        else s["test"]["std"]))
            for rec in block["units"]["agents"][agent]["finetunes"]:
                ax.scatter(rec["search"]["macs_kept"] * dodge, rec["finetune"]["report"]["test_top1"],
                           color=colors(i % 10), s=10, alpha=0.35)
        if not pts:
            continue
        pts.sort()
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, color=colors(i % 10), marker="o", capsize=3,
                    ls="-" if is_rl(agent) else "--", label=agent + (" (RL)" if is_rl(agent) else ""))
    if original is not None:
        ax.axhline(original, color="k", ls=":", lw=1, label=f"original ({original:.3f})")
    ax.set_xscale("log", base=2)
    ticks = sorted(1.0 - float(t) for t in per_target)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{k:g} ({1 / k:.0f}x fewer)" for k in ticks])
    ax.minorticks_off()
    ax.set_xlim(min(ticks) / 1.3, max(ticks) * 1.3)  # the spread of MACs kept at one target stays readable
    ax.set_xlabel("MACs kept (fraction of the original, log scale; agents dodged side by side)")
    ax.set_ylabel("test top-1 after fine-tune (mean over search seeds ± std)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def leaderboard_lines(t: str, summary: Dict[str, Dict[str, Any]]) -> List[str]:
    """The markdown table of one target, best mean first."""
    rows = []
    for agent, s in sorted(summary.items(), key=lambda kv: -kv[1]["test"]["mean"]):
        rows.append([f"`{agent}`" + (" (RL)" if s["rl"] else ""), len(s["search_seeds"]),
                     "/".join(str(n) for n in s["ft_per_model"]), fmt(s["test"]), num(s["ft_std"], ".4f"),
                     fmt(s["test_before_ft"]), fmt(s["macs_kept"], 4), fmt(s["flops_reduction"], 4),
                     f"{s['n_evaluations']['mean']:.0f}", f"{s['search_s']['mean']:.0f}", f"{s['ft_s']['mean']:.0f}"])
    return [f"### FLOPs reduction {t}", "", *markdown_table(
        ["agent", "search seeds", "fine-tunes per model", "test top-1 after FT (mean ± std over search seeds)",
         "fine-tune seed std (pooled)", "test top-1 before FT", "MACs kept", "FLOPs reduction", "evaluations",
         "search s", "fine-tune s"], rows), ""]


def length_check(args: argparse.Namespace, layout: Layout, target: float,
                 main: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The same search units fine-tuned for other lengths (their ``finetune_e{epochs}`` folders): per length the
    summary, the verdict and Spearman's rho of the agents' means against ``main``'s (the verdict's length), so a
    reader sees whether the ranking is stable in the fine-tune length.

    :param args: the comparison (its ``--finetune-epochs`` is the verdict's length).
    :param layout: its layout.
    :param target: the FLOPs reduction.
    :param main: :func:`summarise` of the verdict's length.
    """
    import copy

    out: Dict[str, Any] = {}
    for epochs in layout.lengths(target):
        if epochs == args.finetune_epochs:
            continue
        other = copy.copy(args)
        other.finetune_epochs = epochs
        block = collect(other, layout.with_epochs(epochs), target)
        summary = summarise(block)
        common = [a for a in summary if a in main]
        rho = spearman([main[a]["test"]["mean"] for a in common],
                       [summary[a]["test"]["mean"] for a in common]) if len(common) >= 3 else float("nan")
        out[str(epochs)] = {"summary": summary, "verdict": target_verdict(summary, other), "agents": common,
                            "rho_vs_main": rho,
                            "finetunes": [r for a in block["agents"].values() for r in a["finetunes"]]}
    return out


def length_lines(t: str, main_epochs: int, main: Dict[str, Dict[str, Any]], lengths: Dict[str, Any]) -> List[str]:
    """The markdown of :func:`length_check` for one target (nothing when no other length was run)."""
    if not lengths:
        return []
    cols = [str(main_epochs), *lengths]
    summaries = {str(main_epochs): main, **{k: v["summary"] for k, v in lengths.items()}}
    agents = sorted(main, key=lambda a: -main[a]["test"]["mean"])
    rows = [[f"`{a}`", *[fmt(summaries[c][a]["test"]) if a in summaries[c] else "–" for c in cols]] for a in agents]
    lines = [f"### Fine-tune length at {t}", "",
             *markdown_table(["agent", *[f"{c} epochs" + (" (verdict)" if c == str(main_epochs) else "")
                                         for c in cols]], rows), ""]
    for k, v in lengths.items():
        lines.append(f"- {k} epochs: agents' ranking vs {main_epochs} epochs Spearman rho "
                     f"{num(v['rho_vs_main'], '+.2f')} over {len(v['agents'])} agents; "
                     + verdict_sentence(f"{t} at {k} epochs", v["verdict"]).replace("**", ""))
    return [*lines, ""]


def base_weights(per_target: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    """The weights hash of the base model the finished search units started from, per base: the config's checkpoint
    (one for every unit), or for a seeded untrained model (no checkpoint) its search seed. Units of one checkpoint
    with two hashes (a retrained or replaced checkpoint at the config's path) are refused, naming them: their numbers
    do not belong in one leaderboard. Units made before searched models were kept carry no hash and are skipped.

    :param per_target: the report's blocks (``collect`` under ``units``).
    """
    seen: Dict[str, Dict[str, List[str]]] = {}
    for t, b in per_target.items():
        for agent, data in b["units"]["agents"].items():
            for seed, s in data["searches"].items():
                if s.get("source_hash"):
                    base = s.get("source") or f"untrained model of search seed {seed}"
                    seen.setdefault(base, {}).setdefault(s["source_hash"], []).append(f"t{t}/{agent}_s{seed}")
    for base, hashes in seen.items():
        if len(hashes) > 1:
            listing = "; ".join(f"{h[:12]}: {', '.join(units[:4])}{' ...' if len(units) > 4 else ''}"
                                for h, units in hashes.items())
            raise SystemExit(f"error: the finished units started from {len(hashes)} different versions of {base} "
                             f"({listing}); move one set to another --out-dir")
    return {base: next(iter(hashes)) for base, hashes in seen.items()}


def write_report(args: argparse.Namespace, layout: Layout) -> Optional[Path]:
    """Leaderboard (md + json) and curve plot of every finished unit: ``compare_curves_<model>.*``."""
    per_target: Dict[str, Dict[str, Any]] = {}
    original = None
    for target in args.targets:
        block = collect(args, layout, target)
        summary = summarise(block)
        per_target[f"{target:g}"] = {"units": block, "summary": summary, "verdict": target_verdict(summary, args),
                                     "lengths": length_check(args, layout, target, summary),
                                     "reward_vs_outcome": reward_vs_outcome(summary)}
        for data in block["agents"].values():
            for s in data["searches"].values():
                original = original or s["original"]
    if original is None:
        print("no finished search unit yet: nothing to report", file=sys.stderr)
        return None
    base = base_weights(per_target)
    cfg = task_config(args)
    model = layout.root.parent.name
    stem = report_stem(model, layout.root.name, args.finetune_epochs)
    results = Path(args.results)
    prov = provenance(SCRIPT, threads=args.threads)
    config = Path(args.config).resolve()
    meta = {"model": model, "schedule": layout.root.name,
            "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(args.config), "agents": list(args.agents),
            "targets": list(args.targets), "budget": args.budget, "search_seeds": args.search_seeds,
            "ft_seeds": args.ft_seeds, "finetune_epochs": args.finetune_epochs, "n_steps": args.n_steps,
            "schedule_kind": args.schedule, "recovery_epochs": args.recovery_epochs if args.schedule == "iterative"
            else 0, "final_epochs": final_epochs(args),
            "set": list(args.set), "note": args.note, "reward_estimator": cfg.env.get("reward_estimator", "vanilla"),
            "reward_samples": cfg.env.get("reward_samples"), "reward_train_images": cfg.env.get("reward_train_images"),
            "reward_kd_batches": cfg.env.get("reward_kd_batches", 10),
            "val_size": cfg.env.get("val_size"), "original": original, "base_weights": base, **prov}
    payload = {"meta": meta, "search_cost": search_cost(per_target, meta), "targets": {
        t: {"summary": b["summary"], "verdict": b["verdict"], "reward_vs_outcome": b["reward_vs_outcome"],
            "refused": b["units"]["refused"],
            "failures": {k: v.strip().splitlines()[-1] for k, v in b["units"]["failures"].items()},
            "missing": b["units"]["missing"],
            "units": [{k: r[k] for k in ("agent", "search_seed", "ft_seed", "search")}
                      | {"test_top1": r["finetune"]["report"]["test_top1"], "ft_s": r["finetune"]["seconds"],
                         "machine": r["machine"]}
                      for a in b["units"]["agents"].values() for r in a["finetunes"]],
            "lengths": {k: {"summary": v["summary"], "verdict": v["verdict"], "rho_vs_main": v["rho_vs_main"]}
                        for k, v in b["lengths"].items()}}
        for t, b in per_target.items()}}
    # what --restore needs to rebuild the units on another machine (a compact file beside the report): each
    # search's metrics and searched model as kept-channel masks (hash-checked), each fine-tune's record
    carry = {"meta": dict(meta), "targets": {t: {"carry": {
        "searches": b["units"]["carried"],
        "finetunes": [r for a in b["units"]["agents"].values() for r in a["finetunes"]],
        "finetunes_other_lengths": {k: v["finetunes"] for k, v in b["lengths"].items()}}}
        for t, b in per_target.items()}}
    results.mkdir(parents=True, exist_ok=True)
    for path in (results / f"{stem}.json", results / f"{stem}_units.json"):
        refuse_other_base(path, base)
    keep_other_targets(carry, results / f"{stem}_units.json")
    kept = keep_other_targets(payload, results / f"{stem}.json")
    if kept:
        meta["note"] = (meta["note"] + " " if meta["note"] else "") + (
            f"The JSON also keeps the earlier report's target(s) {', '.join(kept)} (not in this command's --targets; "
            f"rerun with them to see them here).")
    atomic_write_text(json.dumps(payload, indent=2, default=float), results / f"{stem}.json")
    atomic_write_text(json.dumps(carry, separators=(",", ":"), default=float), results / f"{stem}_units.json")
    plot(per_target, args.agents, original["test_top1"], results / f"{stem}.png",
         f"{model} ({meta['schedule']}, budget {args.budget}, {args.finetune_epochs} training epochs after pruning)")
    atomic_write_text(render_markdown(meta, per_target, stem), results / f"{stem}.md")
    return results / f"{stem}.md"


def report_stem(model: str, schedule: str, finetune_epochs: int) -> str:
    """``compare_curves_<model>[_<schedule>][_e<epochs>]``: the schedule's name unless one-shot, the training epochs
    unless the default; a comparison of another schedule or length (a length check) never writes over another's
    report or units file."""
    return (f"compare_curves_{model}" + ("" if schedule == "oneshot" else f"_{schedule}")
            + ("" if int(finetune_epochs) == DEFAULT_FT_EPOCHS else f"_e{int(finetune_epochs)}"))


def refuse_other_base(path: Path, base: Dict[str, str]) -> None:
    """A ``SystemExit`` when the report (or units file) at ``path`` was made from another version of the base (a
    checkpoint retrained on another CPU has other bytes): writing over it would lose its results, and keeping its
    targets would mix two bases in one curve. The message names both hashes and the way out (``--tag``)."""
    try:
        old = json.loads(path.read_text()).get("meta", {}).get("base_weights") or {}
    except (OSError, ValueError):
        return
    clash = {b: (h, base[b]) for b, h in old.items() if b in base and base[b] != h}
    if clash:
        listing = "; ".join(f"{b}: {o[:12]} in the report, {n[:12]} in these units" for b, (o, n) in clash.items())
        raise SystemExit(f"error: {path} was made from another version of the base ({listing}); give this "
                         f"comparison its own --tag (or --results) so that report is kept (docs/training.md)")


def keep_other_targets(payload: Dict[str, Any], path: Path) -> List[str]:
    """Copy into ``payload`` the targets of the results JSON at ``path`` that ``payload`` lacks, when that JSON is of
    the same comparison (model, schedule, budget, fine-tune length, reward estimator): a command run for one target
    does not drop another's results and carried units. Returns the targets kept."""
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    keys = ("model", "schedule", "budget", "finetune_epochs", "reward_estimator")
    if any(old.get("meta", {}).get(k) != payload["meta"].get(k) for k in keys):
        return []
    kept = [t for t, block in old.get("targets", {}).items() if t not in payload["targets"] and _has_units(block)]
    for t in kept:
        payload["targets"][t] = old["targets"][t]
    payload["meta"]["targets_kept_from_earlier_report"] = kept
    return kept


def _has_units(block: Mapping[str, Any]) -> bool:
    """Whether a target's block of a results or units JSON holds any finished unit (an empty one is not kept)."""
    carry = block.get("carry")
    if carry is not None:
        return bool(carry.get("searches") or carry.get("finetunes"))
    return bool(block.get("summary") or block.get("units"))


#: the authors' protocol (spec: 10 samples x 10 RL epochs per step, every step scored on the full validation set,
#: 1 % of the filters removed per step, a 20-epoch KD recovery after every step)
AUTHORS_EVALS_PER_STEP, AUTHORS_STEP_SPARSITY, AUTHORS_RECOVERY_EPOCHS = 100, 0.01, 20


def authors_steps(target: float) -> int:
    """Pruning steps of the authors' schedule (1 % of the filters per step) to the channel sparsity that removes
    ``target`` of the MACs when every layer is cut alike (MACs ~ kept fraction squared): ``ceil((1 - sqrt(1 -
    target)) / 0.01)``.

    :param target: FLOPs reduction.
    """
    return int(math.ceil(round((1.0 - math.sqrt(1.0 - target)) / AUTHORS_STEP_SPARSITY, 9)))


def bn_images(meta: Dict[str, Any]) -> int:
    """Training images one evaluation runs for BatchNorm statistics (the ``adaptive_bn`` estimator's; 0 otherwise)."""
    return int(meta.get("reward_train_images") or 256) if meta.get("reward_estimator") == "adaptive_bn" else 0


#: the measured cost of each estimator per estimate as a multiple of a vanilla one (``cost_ratio``)
FIDELITY_RESULTS = ROOT / "benchmarks" / "results" / "reward_fidelity_ceiling.json"


def vanilla_share(meta: Dict[str, Any], target: Optional[str] = None) -> Tuple[Optional[float], str]:
    """The cost of a vanilla evaluation of our reward images as a share of one of our evaluations, and how it was
    found: by image count for ``vanilla`` and ``adaptive_bn`` (reward images / reward + BN images); for an
    estimator that trains (``kd_refined``) the measured ``cost_ratio`` of :data:`FIDELITY_RESULTS` (label
    ``kd_refined{reward_kd_batches}``, at ``target`` when it was measured there, else the mean over its targets);
    None when neither applies."""
    estimator, reward = meta.get("reward_estimator"), int(meta.get("reward_samples") or meta["val_size"])
    if estimator in ("vanilla", "adaptive_bn"):
        return reward / (reward + bn_images(meta)), (f"{reward} reward images + {bn_images(meta)} BN images per "
                                                     f"evaluation")
    label = f"{estimator}{meta.get('reward_kd_batches', 10)}"
    if estimator == "kd_refined" and FIDELITY_RESULTS.is_file():
        summary = json.loads(FIDELITY_RESULTS.read_text())["summary"]
        if target in summary:
            summary = {target: summary[target]}
        ratios = [b["estimators"][label]["cost_ratio"] for b in summary.values() if label in b["estimators"]]
        if ratios:
            ratio = float(np.mean(ratios))
            return 1.0 / ratio, (f"`{estimator}` costs {ratio:.1f} vanilla evaluations of the reward images, as "
                                 f"{FIDELITY_RESULTS.name} measured `{label}`")
    return None, f"no measured cost of `{estimator}` relative to a vanilla evaluation"


def search_cost(per_target: Dict[str, Dict[str, Any]], meta: Dict[str, Any]) -> Dict[str, Any]:
    """Search cost per target against the authors' protocol, from the measured cost of one evaluation (search
    seconds / evaluations of the searching agents' units, agent overhead included) scaled to the authors' images
    per evaluation (the full validation split, vanilla accuracy) from ours (reward images + BN images), and the
    measured seconds of one fine-tune epoch (the final fine-tune's seconds / its epochs) for their per-step recovery.
    Under the iterative schedule our own recoveries (steps - 1 times its recovery epochs, at that epoch's seconds)
    are taken out of our search seconds first, so both sides count search alone. The final model's epoch is the
    cheapest (the recoveries train the larger models of the earlier steps), so this takes out too little and the
    per-evaluation cost is an upper bound; the wall ratio does not depend on it (both sides scale with it).
    """
    out: Dict[str, Any] = {}
    if not isinstance(meta.get("val_size"), int):  # a fraction or unset: the image count is not known here
        return out
    for t, block in per_target.items():
        share, _ = vanilla_share(meta, t)
        if share is None:
            continue
        scale = int(meta["val_size"]) / int(meta.get("reward_samples") or meta["val_size"]) * share
        units = [s for data in block["units"]["agents"].values() for s in data["searches"].values()]
        searching = [s for s in units if s["n_evaluations"] == meta["budget"]]
        if not searching:
            continue
        fts = [r for data in block["units"]["agents"].values() for r in data["finetunes"]]
        epoch_s = float(np.mean([r["finetune"]["seconds"] for r in fts])) / meta["final_epochs"] if fts else None
        # the iterative schedule's searches include their KD recoveries: take them out, at the measured epoch
        recovery_s = (meta.get("n_steps", 1) - 1) * meta.get("recovery_epochs", 0) * (epoch_s or 0.0)
        per_eval = float(np.mean([max(s["search_s"] - recovery_s, 0.0) / s["n_evaluations"] for s in searching]))
        steps = authors_steps(float(t))
        a_evals = steps * AUTHORS_EVALS_PER_STEP
        a_search_s = a_evals * per_eval * scale
        a_recovery_s = None if epoch_s is None else (steps - 1) * AUTHORS_RECOVERY_EPOCHS * epoch_s
        ours_s = meta["budget"] * per_eval
        out[t] = {"ours_evaluations": meta["budget"], "ours_search_s": ours_s, "per_evaluation_s": per_eval,
                  "authors_steps": steps, "authors_evaluations": a_evals, "authors_images_scale": scale,
                  "authors_search_s": a_search_s, "authors_recovery_s": a_recovery_s,
                  "evaluation_ratio": meta["budget"] / a_evals, "wall_ratio": ours_s / a_search_s,
                  "finetune_epoch_s": epoch_s}
    return out


def search_cost_lines(cost: Dict[str, Any], meta: Dict[str, Any]) -> List[str]:
    """The markdown of :func:`search_cost`."""
    if not cost:
        return []
    rows = []
    for t, c in cost.items():
        rec = "–" if c["authors_recovery_s"] is None else f"{c['authors_recovery_s'] / 3600:.1f} h"
        rows.append([t, c["ours_evaluations"], f"{c['ours_search_s'] / 60:.1f} min", f"{c['per_evaluation_s']:.2f}",
                     f"{c['authors_steps']} x {AUTHORS_EVALS_PER_STEP} = {c['authors_evaluations']}",
                     f"{c['authors_search_s'] / 3600:.1f} h", rec, f"{c['evaluation_ratio']:.3f}",
                     f"{c['wall_ratio']:.3f}"])
    return ["## Search cost vs the authors' protocol", "",
            "Ours: the budget's evaluations, each timed on this machine (search seconds / evaluations of the "
            f"searching agents' units: {vanilla_share(meta, next(iter(cost)))[1]}; agent overhead included). "
            f"Authors: 10 samples x 10 RL epochs per step, 1 % of the filters per step (steps to the target's "
            f"channel sparsity when every layer is cut alike), every evaluation on the full validation split "
            f"({meta['val_size']} images, vanilla accuracy: our per-evaluation cost x "
            f"{next(iter(cost.values()))['authors_images_scale']:.2f}), plus their {AUTHORS_RECOVERY_EPOCHS}-epoch "
            f"KD recovery between steps (our measured fine-tune epoch). Estimates from measured unit costs, not "
            f"runs of the authors' protocol.", "",
            *markdown_table(["target", "our evaluations", "our search wall", "s / evaluation",
                             "authors' evaluations", "authors' search wall", "authors' recovery",
                             "evaluations ours / authors'", "search wall ours / authors'"], rows), "",
            "A tenth of the authors' search cost or less: "
            + ", ".join(f"{t} **{'yes' if c['wall_ratio'] <= 0.1 else 'no'}** ({c['wall_ratio']:.1%} of their search "
                        f"wall{'' if c['authors_recovery_s'] is None else ', recovery aside'})"
                        for t, c in cost.items())
            + ". " + ("This is the authors' iterative schedule, scaled down: `benchmarks/compare_schedules.py` "
                      "compares its accuracy with the one-shot report of the same base and training."
                      if meta.get("schedule_kind") == "iterative" else
                      "Whether it reaches *the same accuracy* as the authors' schedule takes the iterative "
                      "schedule's report of the same base and training (`benchmarks/compare_schedules.py` sets the "
                      "two side by side)."), ""]


def schedule_text(meta: Dict[str, Any]) -> str:
    """The schedule in words, with its training epochs."""
    if meta["schedule_kind"] == "iterative":
        return (f"{meta['n_steps']} pruning steps with {meta['recovery_epochs']} KD recovery epoch(s) after each "
                f"non-final one, then a {meta['final_epochs']}-epoch fine-tune: {meta['finetune_epochs']} training "
                f"epochs in all, as in the one-shot schedule")
    return (f"{meta['n_steps']} pruning step(s), no training between steps, then the {meta['final_epochs']}-epoch "
            f"fine-tune")


def base_text(bases: Optional[Dict[str, str]]) -> str:
    """``; base checkpoints/x.pt, weights sha256 0123456789ab`` for the protocol line (empty without a hash)."""
    if not bases:
        return ""
    return "; " + ", ".join(f"base `{b}` (weights sha256 `{h[:12]}`)" for b, h in bases.items())


def render_markdown(meta: Dict[str, Any], per_target: Dict[str, Dict[str, Any]], stem: str) -> str:
    orig = meta["original"]
    lines = [f"# Agent comparison as curves: {meta['model']}, 2x to 8x fewer MACs", "",
             *([meta["note"], ""] if meta.get("note") else []),
             "## Verdict per target", "",
             "Best RL agent vs best non-RL allocation on test top-1 after the fine-tune (each searched model's mean "
             "over its fine-tune seeds, then mean ± std over search seeds; the pooled std is of those per-seed "
             "means). More than one pooled std apart is a difference; anything within is level.", ""]
    lines += [verdict_sentence(t, b["verdict"]) for t, b in per_target.items()]
    lines += ["", "**Does the reward rank what the agents found?**", "",
              *[reward_vs_outcome_line(t, b["reward_vs_outcome"]) for t, b in per_target.items()], "",
              "(The reward here is the one each search recorded for its own choice, on the search's images. "
              "`benchmarks/reward_fidelity_searched.py` re-measures every estimator on these searched models, "
              f"from `{stem}_units.json`, and shows how optimistic each search's choice is.)"]
    lines += ["", "## Protocol", "",
              f"Task `{meta['config']}`: original test top-1 **{orig['test_top1']:.4f}** (validation "
              f"{orig['val_top1']:.4f}), {orig['macs'] / 1e6:.2f} M MACs, {orig['params'] / 1e6:.3f} M params"
              f"{base_text(meta.get('base_weights'))}. "
              f"Schedule `{meta['schedule']}`: {schedule_text(meta)}. "
              f"Budget **{meta['budget']} evaluations** per searching agent, spent exactly (a unit that used another "
              f"count is refused below); uniform and global Taylor evaluate once per step. Reward estimator "
              f"`{meta['reward_estimator']}` on {meta['reward_samples']} validation images (never the test split). "
              f"Search seeds 0..{meta['search_seeds'] - 1}; each searched model fine-tuned {meta['ft_seeds']} times "
              f"(fine-tune seed = search seed + i x {meta['search_seeds']}), {meta['final_epochs']} epochs of the "
              f"config's KD recipe, the same for every agent. RL agents: RL-Pruner, the SB3 algorithms and AMC; "
              f"the others are non-RL allocations."
              + (f" Config overrides of every unit (`--set`): `{' '.join(meta['set'])}`." if meta.get("set") else "")
              + (" With `env.final_rerank=k` each search's k best candidates are re-scored on held-out validation "
                 "images after the search (k evaluations apart from the budget, the same for every searching "
                 "agent; `metrics.json` records them)." if any("final_rerank" in o for o in meta.get("set", []))
                 else ""), "",
              machine_line(meta["machine"]) + " Shared by other jobs: wall times are upper bounds.", "",
              "## Leaderboard", ""]
    for t, b in per_target.items():
        if b["summary"]:
            lines += leaderboard_lines(t, b["summary"])
        else:
            lines += [f"### FLOPs reduction {t}", "", "No finished fine-tune yet.", ""]
        for unit, why in b["units"]["refused"].items():
            lines.append(f"- refused: `{unit}` {why}")
        if b["units"]["refused"]:
            lines.append("")
    for t, b in per_target.items():
        lines += length_lines(t, meta["finetune_epochs"], b["summary"], b["lengths"])
        lines += scratch_lines(t, b["summary"], meta["final_epochs"])
    failures = {k: v for b in per_target.values() for k, v in b["units"]["failures"].items()}
    missing = [m for b in per_target.values() for m in b["units"]["missing"]]
    lines += search_cost_lines(search_cost(per_target, meta), meta)
    lines += failures_section(failures, missing, "the unit's error.txt / .error.txt")
    lines += [f"![test top-1 after fine-tune vs MACs kept]({stem}.png)", "", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    resolve_args(args)
    problem = check_args(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    layout = Layout(Path(args.out_dir), model_tag(cfg), schedule_name(args), args.finetune_epochs)
    if args.restore:
        print(f"restored {restore_units(args, layout, Path(args.restore))} unit(s) from {args.restore}")
    if not args.report_only:
        run_all(args, layout)
    path = write_report(args, layout)
    if path is not None:
        print(f"wrote {path} (.json, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
