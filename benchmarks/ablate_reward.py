"""Reward-shaping ablation: a grid of α (FLOPs), β (params) and γ (predicted latency) reward weights in a setting
where the weights can act, and the accuracy-vs-latency and accuracy-vs-MACs fronts they trace (issue 25 item 6).

    python benchmarks/ablate_reward.py                                   # free mode (PPO, no cost budget), 3 seeds
    python benchmarks/ablate_reward.py --mode channels --sparsity 0.3    # RL-Pruner (improved) at a channel budget
    python benchmarks/ablate_reward.py --alphas 0 1 --betas 0 --gammas 0 1 --seeds 1 --budget 40 --tag smoke
    python benchmarks/ablate_reward.py --report-only                     # tables from the finished units

Modes:

* ``free`` (default): no fixed cost budget. One-step episodes in sparsity mode (``budget: null``, ``max_steps: 1``,
  a ``--free-target`` the episode never reaches, so it ends truncated after its step): the agent chooses every
  group's sparsity and the reward ``accuracy + α·FLOPs + β·params + γ·latency`` reductions alone decides how far to
  prune. With α = β = γ = 0 nothing is gained by pruning; larger weights buy compression with accuracy. Agents
  that take a sparsity action without a budget: ``ppo`` (default), the other SB3 agents, ``random_search``.
* ``channels``: the authors' setting, a channel budget (``--sparsity``) in distribution mode; the weights decide
  only how the channels are distributed (RL-Pruner; the committed first run of this ablation found half its cells
  ending with the same architecture there).

The task is the CPU benchmark's (strong base checkpoint, ``configs/bench_cpu_vgg19w025_npz.yaml``) with the best
reward estimator (``--estimator``, default ``adaptive_bn``: ``benchmarks/results/reward_fidelity.md``). Each
(α, β, γ, seed) is one ``rl_prune.pipeline.run`` into ``{out-dir}/{mode}_{agent}/a{α}_b{β}_g{γ}_s{seed}/``; finished
units are skipped, a killed unit is resumed. The latency of every unit is *predicted* by the task's latency table
(CPU, one thread, batch 1; the table every γ != 0 unit's reward used), so γ = 0 units are placed on the latency
axis too; ``--measure`` also times every pruned model against the original (quiet machine only).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agents.registry import AGENTS  # noqa: E402
from pruning_env.costs import LatencyModel, LatencySetting, measure_latency  # noqa: E402
from pruning_env.envs.reward import REWARD_ESTIMATORS  # noqa: E402
from pruning_env.pruning import Pruner  # noqa: E402
from pruning_env.runtime import atomic_write_text, machine_info  # noqa: E402
from rl_prune.config import ConfigError, load_config, parse_overrides  # noqa: E402
from rl_prune.run_folder import RunFolder  # noqa: E402
from benchmarks.common import command_line, failures_section, fmt, mean_std, repo_relative  # noqa: E402
from rl_prune.sweep import BENCH_CONFIG, load_unit, run_unit, unit_config, unit_failure  # noqa: E402

#: default agent of each mode
MODE_AGENTS = {"free": "ppo", "channels": "rl_pruner_improved"}
#: agents that can act without a budget (sparsity actions)
FREE_AGENTS = ("ppo", "a2c", "sac", "td3", "ddpg", "trpo", "random_search")
#: per-unit file of the measured latency (``--measure``)
MEASURED_FILE = "latency_measured.json"

#: per-unit numbers aggregated over seeds: (key, label)
METRICS = (
    ("reward_accuracy", "val acc before FT (reward)"),
    ("best_reward", "best reward"),
    ("flops_reduction", "MACs reduction"),
    ("params_reduction", "params reduction"),
    ("latency_reduction", "predicted latency reduction"),
    ("measured_speedup", "measured speed-up b1"),
    ("test_before_ft", "test top-1 before FT"),
    ("test_after_ft", "test top-1 after FT"),
    ("n_evaluations", "evaluations"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(BENCH_CONFIG), help="train_agent.py YAML config of the task")
    p.add_argument("--mode", choices=tuple(MODE_AGENTS), default="free",
                   help="free: no cost budget (default); channels: a channel budget at --sparsity")
    p.add_argument("--agent", default=None, choices=sorted(AGENTS),
                   help=f"agent (default: {MODE_AGENTS['free']} in free mode, {MODE_AGENTS['channels']} in channels)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5], help="MACs-reduction weights α")
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5], help="params-reduction weights β")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0],
                   help="predicted-latency-reduction weights γ")
    p.add_argument("--sparsity", type=float, default=0.3, help="channel budget of --mode channels (default 0.3)")
    p.add_argument("--free-target", type=float, default=0.95,
                   help="episode target of --mode free (channels; never reached: each episode is one step)")
    p.add_argument("--estimator", default=None, choices=sorted(REWARD_ESTIMATORS),
                   help="reward estimator (default: the config's, adaptive_bn for the CPU task)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--budget", type=int, default=None, help="evaluations per unit (default: the config's)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="KD fine-tune epochs (default: the config's)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="further config overrides of every unit, e.g. env.reward_samples=500")
    p.add_argument("--measure", action="store_true",
                   help="also time every pruned model against the original (batch 1, one thread; quiet machine)")
    p.add_argument("--measure-rounds", type=int, default=15, help="timing rounds of --measure (default 15)")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "ablate"), help="unit folders")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where ablate_reward* go")
    p.add_argument("--tag", default="", help="suffix of the result files (ablate_reward_TAG.*)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished units")
    return p


def agent_of(args: argparse.Namespace) -> str:
    return args.agent or MODE_AGENTS[args.mode]


def unit_name(alpha: float, beta: float, gamma: float, seed: int) -> str:
    """Run folder name of one grid cell and seed."""
    return f"a{alpha:g}_b{beta:g}_g{gamma:g}_s{seed}"


def mode_dir(args: argparse.Namespace) -> Path:
    return Path(args.out_dir) / f"{args.mode}_{agent_of(args)}"


def unit_overrides(args: argparse.Namespace, alpha: float, beta: float, gamma: float) -> Dict[str, Any]:
    """Env settings of one cell: the mode's episode and budget, the estimator, the cell's weights."""
    if args.mode == "free":
        over: Dict[str, Any] = {"env.action_mode": "sparsity", "env.budget": None, "env.target_metric": "channels",
                                "env.target": float(args.free_target), "env.n_steps": 1, "env.max_steps": 1}
    else:
        over = {"env.action_mode": "distribution", "env.budget": "channels", "env.target_metric": "channels",
                "env.target": float(args.sparsity)}
    over.update({"env.alpha": float(alpha), "env.beta": float(beta), "env.gamma": float(gamma)})
    if args.estimator is not None:
        over["env.reward_estimator"] = args.estimator
    if args.finetune_epochs is not None:
        over["finetune.epochs"] = int(args.finetune_epochs)
    over.update(parse_overrides(args.overrides))
    return over


def cells(args: argparse.Namespace) -> List[Tuple[float, float, float]]:
    return [(a, b, g) for a in args.alphas for b in args.betas for g in args.gammas]


# ----------------------------------------------------------------------------------------------- latency
class TaskLatency:
    """The task's latency table (CPU, one thread, batch 1, the env's pruner options: the one γ's reward uses),
    built once from the first finished unit's original model and cached on disk."""

    def __init__(self) -> None:
        self.model: Optional[LatencyModel] = None

    def reduction(self, run_dir: Path, metrics: Dict[str, Any]) -> float:
        record = metrics.get("latency") or {}
        if record.get("predicted") is not None:
            return float(record["predicted"]["reduction"])
        if self.model is None:
            folder = RunFolder(run_dir)
            original = torch.load(folder.file(RunFolder.ORIGINAL_MODEL), map_location="cpu",
                                  weights_only=False).eval()
            opts = record.get("pruner") or {}
            pruner = Pruner(copy.deepcopy(original), torch.zeros(1, *metrics["input_size"]),
                            ignore=tuple(opts.get("ignore_layers", ())), min_channels=int(opts.get("min_channels", 1)),
                            round_to=int(opts.get("round_to", 1)),
                            prune_normalized=bool(opts.get("prune_normalized", False)))
            setting = LatencySetting(**record["setting"]) if record.get("setting") else LatencySetting()
            cache = True if record.get("cache") is None else record["cache"]
            grid = tuple(record["grid"]) if record.get("grid") else None
            self.model = LatencyModel.build(pruner, setting, cache=cache, **({"grid": grid} if grid else {}))
        keep = np.asarray(metrics["kept_channels"], dtype=np.int64)
        return 1.0 - float(self.model.predict(keep)) / float(self.model.original)


def measure_unit(run_dir: Path, rounds: int) -> Optional[Dict[str, Any]]:
    """``latency_measured.json``: the unit's pruned model and the original timed together (batch 1, one thread)."""
    path = Path(run_dir) / MEASURED_FILE
    if path.is_file():
        return json.loads(path.read_text())
    folder = RunFolder(run_dir)
    if not folder.is_finished:
        return None
    metrics = folder.read_metrics()
    models = [torch.load(folder.file(name), map_location="cpu", weights_only=False).eval()
              for name in (RunFolder.ORIGINAL_MODEL, RunFolder.PRUNED_MODEL)]
    setting = LatencySetting(threads=1, batch_size=1)
    t = measure_latency(models, metrics["input_size"], setting, rounds=rounds, desc=f"{Path(run_dir).name}")
    out = {"setting": setting.tag, "clock": setting.resolve_clock(), "rounds": int(rounds),
           "original_s": float(t[0]), "pruned_s": float(t[1]), "speedup": float(t[0] / t[1]),
           "machine": machine_info(1), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    atomic_write_text(json.dumps(out, indent=2), path)
    return out


# ------------------------------------------------------------------------------------------------ report
def unit_values(m: Dict[str, Any], latency_reduction: float, measured: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return {"seed": m["seed"], "reward_accuracy": m["reward_accuracy"], "best_reward": m["best_reward"],
            "flops_reduction": m["flops_reduction"], "params_reduction": m["params_reduction"],
            "latency_reduction": latency_reduction,
            "measured_speedup": None if measured is None else measured["speedup"],
            "test_before_ft": m["pruned_before_finetune"]["test_top1"], "test_after_ft": m["pruned"]["test_top1"],
            "n_evaluations": m["n_evaluations"], "kept_channels": m["kept_channels"]}


def pareto(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point beats in both coordinates (higher is better in both), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y = [], -np.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def identical_outcomes(per_cell: Dict[Tuple[float, float, float], List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Groups of cells whose run with the same seed ended with exactly the same architecture."""
    groups: Dict[tuple, List[str]] = {}
    for (a, b, g), runs in per_cell.items():
        for r in runs:
            groups.setdefault((r["seed"], tuple(r["kept_channels"])), []).append(f"α={a:g} β={b:g} γ={g:g}")
    return sorted(({"seed": s, "cells": names} for (s, _), names in groups.items() if len(names) > 1),
                  key=lambda x: x["seed"])


def plot(summary: List[Dict[str, Any]], per_cell: Dict[Tuple[float, float, float], List[Dict[str, Any]]],
         original_test: float, path: Path) -> None:
    """Test top-1 after the fine-tune against the predicted latency reduction and against the MACs reduction:
    every unit (small), every cell's mean (large, labelled), the front of the cell means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("viridis")
    gammas = sorted({r["gamma"] for r in summary})
    for ax, key, label in ((axes[0], "latency_reduction", "predicted latency reduction (CPU, batch 1)"),
                           (axes[1], "flops_reduction", "MACs reduction")):
        pts = []
        for r in summary:
            color = cmap(gammas.index(r["gamma"]) / max(1, len(gammas) - 1) * 0.9)
            runs = per_cell[(r["alpha"], r["beta"], r["gamma"])]
            ax.scatter([100 * u[key] for u in runs], [100 * u["test_after_ft"] for u in runs], color=color, s=12,
                       alpha=0.5)
            x, y = 100 * r[key]["mean"], 100 * r["test_after_ft"]["mean"]
            ax.scatter([x], [y], color=color, s=60, edgecolor="k")
            ax.annotate(f"{r['alpha']:g}/{r['beta']:g}/{r['gamma']:g}", (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
            pts.append((x, y))
        front = pareto(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="front of the cell means")
        ax.axhline(100 * original_test, color="#999999", lw=0.8, label=f"original ({100 * original_test:.1f} %)")
        ax.set_xlabel(f"{label} (%)")
        ax.set_ylabel("test top-1 after KD fine-tune (%)")
        ax.legend(fontsize=7)
    axes[0].set_title("accuracy vs latency (labels α/β/γ; color γ)")
    axes[1].set_title("accuracy vs MACs (labels α/β/γ; color γ)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(meta: Dict[str, Any], summary: List[Dict[str, Any]], same: List[Dict[str, Any]],
           failures: Dict[str, str], missing: List[str], stem: str) -> str:
    env = meta["env"]
    setting = ("no fixed cost budget: one-step episodes in sparsity mode (`budget: null`, `max_steps: 1`), the "
               "reward alone decides how far to prune" if meta["mode"] == "free" else
               f"a channel budget of {meta['sparsity']:.0%} (distribution mode, {env.get('n_steps')} steps): the "
               f"weights decide how the channels are distributed")
    lines = ["# Reward-shaping ablation: α (MACs), β (params), γ (predicted latency)", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']['cpu']}, {meta['machine']['cpu_count']} cores, torch "
             f"{meta['machine']['torch']}.", ""]
    if meta["smoke"]:
        lines += ["**Smoke run** (tiny budget and fine-tune, shared machine): it shows the harness end to end; its "
                  "numbers are not results.", ""]
    lines += [f"Task: {env.get('model')} width {env.get('width')} on `{env.get('dataset')}` (checkpoint "
              f"`{env.get('checkpoint')}`), original test top-1 {meta['original_test_top1']:.4f}. Agent "
              f"`{meta['agent']}`, {setting}; reward = accuracy ({meta['estimator']} estimator, "
              f"{env.get('reward_samples')} validation images) + α · MACs + β · params + γ · predicted latency "
              f"reductions. Evaluation budget {meta['budget']} per unit; fine-tune: {meta['finetune']}; seeds "
              f"{meta['seeds']}. Latency is predicted by the task's table (CPU, one thread, batch 1)"
              + ("; measured speed-ups from `--measure`." if meta["measured"] else "."), "",
              "| α | β | γ | seeds | " + " | ".join(label for _, label in METRICS) + " |",
              "|---|---|---|---|" + "---|" * len(METRICS)]
    digits = {"n_evaluations": 0, "measured_speedup": 2}
    for r in sorted(summary, key=lambda r: (r["alpha"], r["beta"], r["gamma"])):
        cells_ = ["n/a" if r[key] is None else fmt(r[key], digits.get(key, 4)) for key, _ in METRICS]
        lines.append(f"| {r['alpha']:g} | {r['beta']:g} | {r['gamma']:g} | {len(r['seeds'])} | "
                     + " | ".join(cells_) + " |")
    lines.append("")
    if same:
        lines += ["Cells whose run (same seed) ended with exactly the same architecture (the differing weight "
                  "changed no decision):", ""]
        lines += [f"- seed {g['seed']}: {', '.join(g['cells'])}" for g in same]
        lines.append("")
    else:
        lines += ["No two cells ended with the same architecture for the same seed.", ""]
    lines += failures_section(failures, missing, "the units' error.txt")
    lines += [f"![fronts]({stem}.png)", ""]
    return "\n".join(lines)


def write_report(args: argparse.Namespace, seeds: List[int], budget: int) -> Optional[Path]:
    """Gather the finished units and write ablate_reward[_TAG].md|json|png."""
    folder = mode_dir(args)
    latency = TaskLatency()
    per_cell: Dict[Tuple[float, float, float], List[Dict[str, Any]]] = {}
    failures: Dict[str, str] = {}
    missing: List[str] = []
    ref: Optional[Dict[str, Any]] = None
    for cell in cells(args):
        for seed in seeds:
            run_dir = folder / unit_name(*cell, seed)
            m = load_unit(run_dir)
            if m is None:
                tb = unit_failure(run_dir)
                if tb is not None:
                    failures[run_dir.name] = tb
                else:
                    missing.append(run_dir.name)
                continue
            ref = ref or m
            measured = measure_unit(run_dir, args.measure_rounds) if args.measure else None
            per_cell.setdefault(cell, []).append(unit_values(m, latency.reduction(run_dir, m), measured))
    if ref is None:
        print("no finished units yet: nothing to report", file=sys.stderr)
        return None
    summary = []
    for (a, b, g), runs in per_cell.items():
        row: Dict[str, Any] = {"alpha": a, "beta": b, "gamma": g, "seeds": [r["seed"] for r in runs]}
        for key, _ in METRICS:
            values = [r[key] for r in runs if r[key] is not None]
            row[key] = mean_std(values) if values else None
        summary.append(row)
    cfg = load_config(args.config, unit_overrides(args, *cells(args)[0]))
    meta = {"config": repo_relative(args.config), "mode": args.mode, "agent": agent_of(args), "alphas": args.alphas,
            "betas": args.betas, "gammas": args.gammas, "seeds": seeds, "sparsity": args.sparsity,
            "budget": budget, "estimator": cfg.env.get("reward_estimator", "vanilla"), "env": dict(cfg.env),
            "finetune": ", ".join(f"{k} {v}" for k, v in asdict(cfg.finetune).items()),
            "original_test_top1": ref["original"]["test_top1"], "measured": bool(args.measure),
            "machine": machine_info(torch.get_num_threads()), "smoke": "smoke" in args.tag,
            "command": command_line("benchmarks/ablate_reward.py", sys.argv[1:])}
    same = identical_outcomes(per_cell)
    stem = "ablate_reward" + (f"_{args.tag}" if args.tag else "")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    fronts = {}
    for key in ("latency_reduction", "flops_reduction"):
        pts = [(r[key]["mean"], r["test_after_ft"]["mean"]) for r in summary]
        fronts[key] = [{"alpha": summary[i]["alpha"], "beta": summary[i]["beta"], "gamma": summary[i]["gamma"]}
                       for i in pareto(pts)]
    payload = {"meta": meta, "summary": summary, "fronts": fronts, "identical_outcomes": same, "failures": failures,
               "missing": missing,
               "units": {f"{a:g}/{b:g}/{g:g}": runs for (a, b, g), runs in per_cell.items()}}
    atomic_write_text(json.dumps(payload, indent=2, default=float), results / f"{stem}.json")
    plot(summary, per_cell, meta["original_test_top1"], results / f"{stem}.png")
    atomic_write_text(render(meta, summary, same, failures, missing, stem), results / f"{stem}.md")
    return results / f"{stem}.md"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    agent = agent_of(args)
    problems = []
    if args.seeds < 1:
        problems.append(f"--seeds must be >= 1, got {args.seeds}")
    if not 0.0 < args.sparsity < 1.0 or not 0.0 < args.free_target < 1.0:
        problems.append("--sparsity and --free-target must be in (0, 1)")
    if args.mode == "free" and agent not in FREE_AGENTS:
        problems.append(f"--mode free needs an agent that acts without a budget ({', '.join(FREE_AGENTS)}), "
                        f"not {agent!r}")
    if args.mode == "channels" and AGENTS[agent].sb3_algo is not None:
        problems.append(f"--mode channels uses distribution-mode agents (RL-Pruner); {agent!r} prunes one step "
                        f"in sparsity mode")
    try:
        parse_overrides(args.overrides)
        budget = int(args.budget or load_config(args.config).budget or 300)
    except ConfigError as err:
        problems.append(str(err))
        budget = 0
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    if not args.report_only:
        from tqdm.auto import tqdm

        units = [(cell, s) for s in seeds for cell in cells(args)]
        bar = tqdm(units, desc="ablate", unit="run", dynamic_ncols=True)
        for cell, seed in bar:
            name = unit_name(*cell, seed)
            bar.set_postfix(unit=name)
            cfg = unit_config(args.config, agent, seed, budget, {**unit_overrides(args, *cell), "name": name})
            started = time.perf_counter()
            status = run_unit(cfg, agent, mode_dir(args) / name)
            if status["status"] == "done":
                print(f"{name}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    path = write_report(args, seeds, budget)
    if path is not None:
        print(f"wrote {path} (.json, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
