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
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: benchmarks.common is imported from the repository root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from agents.registry import AGENTS  # noqa: E402
from benchmarks.common import (best_vs_best, failures_section, fmt, machine_line, markdown_table, mean_std,  # noqa: E402
                               num, pooled_std, provenance)
from pruning_env.runtime import atomic_write_text  # noqa: E402
from rl_prune.config import ConfigError, PruneRunConfig, load_config, parse_overrides  # noqa: E402
from rl_prune.pipeline import build_env, finetune_searched  # noqa: E402
from rl_prune.run_folder import RunFolder  # noqa: E402
from rl_prune.sweep import BENCH_CONFIG, run_unit, unit_config, unit_failure  # noqa: E402

SCRIPT = "benchmarks/compare_agents.py"
#: the agents compared by default (``amc`` too once the registry has it)
DEFAULT_AGENTS = tuple(a for a in ("uniform", "global_taylor", "random_search", "rl_pruner_improved", "ppo", "amc")
                       if a in AGENTS)
#: the protocol's floor (issue 24 item 6): a verdict from less is marked provisional
MIN_BUDGET, MIN_SEARCH_SEEDS, MIN_FT_SEEDS = 150, 3, 2
#: default budget: >= 150 and spent exactly by RL-Pruner's derived schedule in one step (15 RL epochs x 10 samples
#: + the reset point), random search (151 candidates) and the SB3 agents (150 timesteps + the final episode)
DEFAULT_BUDGET = 151
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


def budget_problem(agent: str, metrics: Dict[str, Any], budget: int) -> Optional[str]:
    """Why a finished search unit cannot enter the comparison (None when it can): a run made with another budget,
    or a searching agent that used another number of evaluations than the budget.

    :param agent: agent name.
    :param metrics: the unit's ``metrics.json`` (``RunFolder.read_metrics``).
    :param budget: the comparison's budget.
    """
    if metrics.get("budget") != budget:
        return f"made with budget {metrics.get('budget')}, not {budget}"
    used = int(metrics["n_evaluations"])
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


class Layout:
    """Where the units of one comparison live: ``{out}/{model}/{schedule}/t{target}/``.

    :param out_dir: the benchmark's ``--out-dir``.
    :param model: :func:`model_tag`.
    :param schedule: ``oneshot`` (or the schedule's name).
    """

    def __init__(self, out_dir: Path, model: str, schedule: str) -> None:
        self.root = Path(out_dir) / model / schedule

    def search(self, target: float, agent: str, seed: int) -> Path:
        """The search unit's run folder."""
        return self.root / target_name(target) / f"{agent}_s{seed}"

    def finetune(self, target: float, agent: str, seed: int, ft_seed: int) -> Path:
        """The fine-tune unit's result file."""
        return self.root / target_name(target) / "finetune" / f"{agent}_s{seed}_f{ft_seed}.json"


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
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                   help=f"evaluations per searching agent, spent exactly (>= {MIN_BUDGET}; default {DEFAULT_BUDGET})")
    p.add_argument("--n-steps", type=int, default=1,
                   help="pruning steps of every agent (default 1: one-shot; the SB3 agents always prune in one)")
    p.add_argument("--finetune-epochs", type=int, default=15,
                   help="epochs of every fine-tune unit, the config's recipe otherwise (default 15: the length "
                        "at which compare_agents.md found the ranking stable at 70 %%)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides of every unit (give a variant its own --out-dir)")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "compare_curves"), help="where the units live")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"),
                   help="where compare_curves_<model>.md|json|png go")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--max-units", type=int, default=None, help="stop after running this many units (sizing)")
    p.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                   help="start no unit after this many minutes (the report is written either way)")
    p.add_argument("--note", default="", help="a paragraph for the top of the markdown")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished units")
    return p


def check_args(args: argparse.Namespace) -> Optional[str]:
    """The first problem with the command line, or None."""
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
    try:
        parse_overrides(args.set)
    except ConfigError as err:
        return f"--set: {err}"
    return None


def search_config(args: argparse.Namespace, agent: str, seed: int, target: float) -> PruneRunConfig:
    """The search unit's config: the task's, with the target, the schedule, the budget and no fine-tune."""
    over: Dict[str, Any] = {**parse_overrides(args.set), "env.target": float(target), "env.n_steps": args.n_steps,
                            **SEARCH_OVERRIDES}
    return unit_config(args.config, agent, seed, args.budget, over)


def finetune_config(args: argparse.Namespace, agent: str, seed: int, target: float) -> PruneRunConfig:
    """The fine-tune unit's config: the search unit's with ``--finetune-epochs`` of the config's recipe."""
    over: Dict[str, Any] = {**parse_overrides(args.set), "env.target": float(target), "env.n_steps": args.n_steps,
                            **SEARCH_OVERRIDES, "finetune.epochs": args.finetune_epochs}
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
            problem = budget_problem(agent, folder.read_metrics(), args.budget)
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
                env, env_key = build_env(finetune_config(args, agent, seed, target), agent), (target, seed)
            try:
                run_finetune_unit(args, layout, target, agent, seed, ft_seed, env)
            except Exception as err:  # recorded beside the unit; the others go on
                import traceback

                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(traceback.format_exc(), path.with_suffix(".error.txt"))
                print(f"{path.name} FAILED: {err}", file=sys.stderr, flush=True)
                continue
            path.with_suffix(".error.txt").unlink(missing_ok=True)
            done += 1
            write_report(args, layout)
    finally:
        if env is not None:
            env.close()


# ---------------------------------------------------------------------------------------------- report
def collect(args: argparse.Namespace, layout: Layout, target: float) -> Dict[str, Any]:
    """The finished units of one target: per agent its fine-tune records and search metrics, the refused search
    units (budget), failures and missing units."""
    agents: Dict[str, Dict[str, Any]] = {}
    refused: Dict[str, str] = {}
    failures: Dict[str, str] = {}
    missing: List[str] = []
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
            metrics = folder.read_metrics()
            problem = budget_problem(agent, metrics, args.budget)
            if problem is not None:
                refused[unit] = problem
                continue
            searches[seed] = search_numbers(metrics)
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
    return {"agents": agents, "refused": refused, "failures": failures, "missing": missing}


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
            "per_model": {str(s): by_seed[s] for s in seeds},
        }
    return out


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
        pts = []
        for t, block in per_target.items():
            s = block["summary"].get(agent)
            if s is None:
                continue
            pts.append((s["macs_kept"]["mean"], s["test"]["mean"], 0.0 if math.isnan(s["test"]["std"])
                        else s["test"]["std"]))
            for rec in block["units"]["agents"][agent]["finetunes"]:
                ax.scatter(rec["search"]["macs_kept"], rec["finetune"]["report"]["test_top1"], color=colors(i % 10),
                           s=10, alpha=0.35)
        if not pts:
            continue
        pts.sort()
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, color=colors(i % 10), marker="o", capsize=3,
                    ls="-" if is_rl(agent) else "--", label=agent + (" (RL)" if is_rl(agent) else ""))
    if original is not None:
        ax.axhline(original, color="k", ls=":", lw=1, label=f"original ({original:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("MACs kept (fraction of the original, log scale)")
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


def write_report(args: argparse.Namespace, layout: Layout) -> Optional[Path]:
    """Leaderboard (md + json) and curve plot of every finished unit: ``compare_curves_<model>.*``."""
    per_target: Dict[str, Dict[str, Any]] = {}
    original = None
    for target in args.targets:
        block = collect(args, layout, target)
        summary = summarise(block)
        per_target[f"{target:g}"] = {"units": block, "summary": summary, "verdict": target_verdict(summary, args)}
        for data in block["agents"].values():
            for s in data["searches"].values():
                original = original or s["original"]
    if original is None:
        print("no finished search unit yet: nothing to report", file=sys.stderr)
        return None
    cfg = load_config(args.config)
    model = layout.root.parent.name
    stem = f"compare_curves_{model}"
    results = Path(args.results)
    prov = provenance(SCRIPT, threads=args.threads)
    meta = {"model": model, "schedule": layout.root.name, "config": str(args.config), "agents": list(args.agents),
            "targets": list(args.targets), "budget": args.budget, "search_seeds": args.search_seeds,
            "ft_seeds": args.ft_seeds, "finetune_epochs": args.finetune_epochs, "n_steps": args.n_steps,
            "set": list(args.set), "note": args.note, "reward_estimator": cfg.env.get("reward_estimator", "vanilla"),
            "reward_samples": cfg.env.get("reward_samples"), "original": original, **prov}
    payload = {"meta": meta, "targets": {
        t: {"summary": b["summary"], "verdict": b["verdict"], "refused": b["units"]["refused"],
            "failures": {k: v.strip().splitlines()[-1] for k, v in b["units"]["failures"].items()},
            "missing": b["units"]["missing"],
            "units": [{k: r[k] for k in ("agent", "search_seed", "ft_seed", "search")}
                      | {"test_top1": r["finetune"]["report"]["test_top1"], "ft_s": r["finetune"]["seconds"],
                         "machine": r["machine"]}
                      for a in b["units"]["agents"].values() for r in a["finetunes"]]}
        for t, b in per_target.items()}}
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(payload, indent=2, default=float), results / f"{stem}.json")
    plot(per_target, args.agents, original["test_top1"], results / f"{stem}.png",
         f"{model} ({meta['schedule']}, budget {args.budget}, {args.finetune_epochs}-epoch KD fine-tune)")
    atomic_write_text(render_markdown(meta, per_target, stem), results / f"{stem}.md")
    return results / f"{stem}.md"


def render_markdown(meta: Dict[str, Any], per_target: Dict[str, Dict[str, Any]], stem: str) -> str:
    orig = meta["original"]
    lines = [f"# Agent comparison as curves: {meta['model']}, 2x to 8x fewer MACs", "",
             *([meta["note"], ""] if meta.get("note") else []),
             "## Verdict per target", "",
             "Best RL agent vs best non-RL allocation on test top-1 after the fine-tune (each searched model's mean "
             "over its fine-tune seeds, then mean ± std over search seeds; the pooled std is of those per-seed "
             "means). More than one pooled std apart is a difference; anything within is level.", ""]
    lines += [verdict_sentence(t, b["verdict"]) for t, b in per_target.items()]
    lines += ["", "## Protocol", "",
              f"Task `{meta['config']}`: original test top-1 **{orig['test_top1']:.4f}** (validation "
              f"{orig['val_top1']:.4f}), {orig['macs'] / 1e6:.2f} M MACs, {orig['params'] / 1e6:.3f} M params. "
              f"Schedule `{meta['schedule']}` ({meta['n_steps']} pruning step(s), no fine-tune between steps). "
              f"Budget **{meta['budget']} evaluations** per searching agent, spent exactly (a unit that used another "
              f"count is refused below); uniform and global Taylor evaluate once per step. Reward estimator "
              f"`{meta['reward_estimator']}` on {meta['reward_samples']} validation images (never the test split). "
              f"Search seeds 0..{meta['search_seeds'] - 1}; each searched model fine-tuned {meta['ft_seeds']} times "
              f"(fine-tune seed = search seed + i x {meta['search_seeds']}), {meta['finetune_epochs']} epochs of the "
              f"config's KD recipe, the same for every agent. RL agents: RL-Pruner, the SB3 algorithms and AMC; "
              f"the others are non-RL allocations.", "",
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
    failures = {k: v for b in per_target.values() for k, v in b["units"]["failures"].items()}
    missing = [m for b in per_target.values() for m in b["units"]["missing"]]
    lines += failures_section(failures, missing, "the unit's error.txt / .error.txt")
    lines += [f"![test top-1 after fine-tune vs MACs kept]({stem}.png)", "", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
    layout = Layout(Path(args.out_dir), model_tag(cfg), "oneshot" if args.n_steps == 1 else f"{args.n_steps}step")
    if not args.report_only:
        run_all(args, layout)
    path = write_report(args, layout)
    if path is not None:
        print(f"wrote {path} (.json, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
