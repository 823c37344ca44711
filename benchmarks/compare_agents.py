"""RL agents against the non-RL baselines on one PruneEnv task, at several FLOPs targets, at equal evaluation budgets
and with the same final KD fine-tune: mean ± std tables, a verdict per target, markdown + JSON + plot.

    python benchmarks/compare_agents.py                                   # default agents, 50 % and 70 %, 5 seeds
    python benchmarks/compare_agents.py --agents rl_pruner uniform --seeds 1 --targets 0.7
    python benchmarks/compare_agents.py --report-only                     # tables from the finished runs
    python benchmarks/compare_agents.py --ft-check-epochs 3               # also: is the ranking stable vs FT length?

Each (target, agent, seed) is one ``rl_prune.pipeline.run`` (``rl_prune.sweep.run_unit``) into
``{out-dir}/t{target%}/{agent}_s{seed}/``; finished units are skipped, so a killed benchmark continues where it
stopped (rerun the same command). Every agent's monitor stops look-aheads at the budget (``PruneMonitor``'s
``max_evaluations``), and the env counts evaluations the same way for every agent.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from agents.registry import AGENTS
from pruning_env.costs import count_costs
from pruning_env.runtime import atomic_write_text, seed_everything
from pruning_env.training import evaluate, finetune
from rl_prune.config import ConfigError, load_config, parse_overrides
from rl_prune.run_folder import RunFolder
from rl_prune.sweep import (BENCH_CONFIG, failures_section, fmt, load_unit, mean_std, num, run_unit, unit_config,
                            unit_failure)

ROOT = Path(__file__).resolve().parents[1]
#: the agents compared by default (the SB3 baselines are left out on 2 CPU cores: see the results note)
DEFAULT_AGENTS = ("rl_pruner", "rl_pruner_improved", "uniform", "global_taylor", "random_search")
#: the non-RL baselines the best RL agent has to beat (uniform, global Taylor, random search at equal budget)
BASELINES = ("uniform", "global_taylor", "random_search")
#: the RL-Pruner entries (their collapse guard is reported)
RL_PRUNER_AGENTS = ("rl_pruner", "rl_pruner_improved", "rl_pruner_bounded")
#: per-run numbers aggregated over seeds: (key in the summary, label, how to read it from metrics.json)
METRICS = (
    ("reward_accuracy", "reward acc (val, estimator)", lambda m: m["reward_accuracy"]),
    ("test_before_ft", "test top-1 before FT", lambda m: m["pruned_before_finetune"]["test_top1"]),
    ("test_after_ft", "test top-1 after FT", lambda m: m["pruned"]["test_top1"]),
    ("flops_reduction", "FLOPs reduction", lambda m: m["flops_reduction"]),
    ("params_reduction", "params reduction", lambda m: m["params_reduction"]),
    ("n_evaluations", "evaluations used", lambda m: m["n_evaluations"]),
    ("search_s", "search s", lambda m: m["seconds"]["search"]),
    ("total_s", "total s", lambda m: m["seconds"]["total"]),
)
#: file a fine-tune-length check writes into a unit's run folder
FT_CHECK_FILE = "ft_check.json"


def is_rl(agent: str) -> bool:
    """RL agents: RL-Pruner in any mode and the SB3 baselines.

    :param agent: a key of :data:`agents.registry.AGENTS`.
    """
    return agent in RL_PRUNER_AGENTS or AGENTS[agent].sb3_algo is not None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(BENCH_CONFIG), help="train_agent.py YAML config of the task")
    p.add_argument("--agents", nargs="+", default=list(DEFAULT_AGENTS), choices=list(AGENTS), metavar="AGENT",
                   help=f"agents to compare (default: {' '.join(DEFAULT_AGENTS)}; any of {' '.join(AGENTS)})")
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.7],
                   help="FLOPs reductions to prune to (default 0.5 0.7)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds, run as seeds 0..N-1 (default 5)")
    p.add_argument("--budget", type=int, default=None,
                   help="evaluations per agent (default: the config's budget, else 300)")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "compare"), help="run folders (per target/agent/seed)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where compare_agents.* go")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="epochs of the final KD fine-tune, the same for every agent (default: the config's)")
    p.add_argument("--ft-check-epochs", type=int, default=0,
                   help="also fine-tune the searched models of the first --ft-check-seeds seeds for this many "
                        "epochs (same recipe otherwise) and report whether the ranking changes (0: skip)")
    p.add_argument("--ft-check-seeds", type=int, default=2, help="seeds in the fine-tune-length check (default 2)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides of every unit, e.g. env.n_steps=1 env.action_mode=sparsity (give the "
                        "variant its own --out-dir)")
    p.add_argument("--verdict-epochs", type=int, default=None,
                   help="judge the bar on the fine-tune-length check of this many epochs (every seed of an agent "
                        "must have it) instead of the runs' own fine-tune")
    p.add_argument("--tag", default="", help="suffix of the result files (compare_agents_TAG.*), e.g. for a "
                   "--set variant")
    p.add_argument("--note", default="", help="a paragraph for the top of the markdown (e.g. what was cut)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables from finished runs")
    return p


def target_dir(out_dir: Path, target: float) -> Path:
    """Run folders of one target: ``{out_dir}/t50`` for 0.5.

    :param out_dir: the benchmark's ``--out-dir``.
    :param target: the FLOPs reduction.
    """
    return Path(out_dir) / f"t{round(target * 100):d}"


def unit_overrides(args: argparse.Namespace, target: float) -> Dict[str, Any]:
    """Config overrides of every unit of one target: the target, and the fine-tune length when given.

    :param args: the parsed command line.
    :param target: the FLOPs reduction.
    """
    over: Dict[str, Any] = parse_overrides(args.set)
    over["env.target"] = float(target)
    if args.finetune_epochs is not None:
        over["finetune.epochs"] = int(args.finetune_epochs)
    return over


def collapse_stats(metrics: Dict[str, Any]) -> Dict[str, int]:
    """RL-Pruner's collapse guard in one run: pruning steps, steps where it reset the PD, and steps that ended
    with the evaluation budget spent (``budget_stopped``)."""
    rows = metrics["_steps"]
    flag = lambda r, k: int(float(r.get(k) or 0))  # noqa: E731
    return {"steps": len(rows), "resets": sum(flag(r, "collapse_reset") for r in rows),
            "budget_stopped": sum(flag(r, "budget_stopped") for r in rows)}


# ---------------------------------------------------------------------------------------------- summarising
#: summary key of the test top-1 after the longer fine-tune of ``--verdict-epochs``
LONG_KEY = "test_after_long_ft"


def summarise(units: Dict[str, List[Dict[str, Any]]], long_epochs: Optional[int] = None) -> Dict[str, Any]:
    """Per-agent mean ± std of every :data:`METRICS` entry (plus RL-Pruner's collapse-guard counts, and the test
    top-1 after the ``long_epochs`` fine-tune-length check when every seed of the agent has one).

    :param units: per agent, the finished units' metrics (with their ``ft_check`` results attached).
    :param long_epochs: the fine-tune-length check to summarise as :data:`LONG_KEY`.
    """
    out: Dict[str, Any] = {}
    for agent, runs in units.items():
        if not runs:
            continue
        row: Dict[str, Any] = {"seeds": [m["seed"] for m in runs]}
        for key, _, get in METRICS:
            row[key] = mean_std([get(m) for m in runs])
        if long_epochs is not None and all(str(long_epochs) in m.get("ft_check", {}) for m in runs):
            row[LONG_KEY] = mean_std([m["ft_check"][str(long_epochs)]["test_top1"] for m in runs])
        if agent in RL_PRUNER_AGENTS:
            row["collapse"] = [collapse_stats(m) for m in runs]
        out[agent] = row
    return out


def pooled_std(a: Dict[str, float], b: Dict[str, float]) -> float:
    """Pooled seed standard deviation of two :func:`mean_std` results (NaN with one seed).

    :param a: one agent's statistic.
    :param b: the other's.
    """
    if a["n"] < 2 or b["n"] < 2:
        return float("nan")
    return math.sqrt(((a["n"] - 1) * a["std"] ** 2 + (b["n"] - 1) * b["std"] ** 2) / (a["n"] + b["n"] - 2))


def compare(summary: Dict[str, Any], agent: str, other: str, key: str = "test_after_ft") -> Dict[str, Any]:
    """``agent`` minus ``other`` on ``key`` against the pooled seed std, with a plain word.

    :param summary: from :func:`summarise`.
    :param agent: the RL agent.
    :param other: the baseline.
    :param key: a :data:`METRICS` key.
    """
    a, b = summary[agent][key], summary[other][key]
    diff = a["mean"] - b["mean"]
    pooled = pooled_std(a, b)
    if math.isnan(pooled):
        word = "higher (one seed, noise unknown)" if diff > 0 else "not higher (one seed, noise unknown)"
    elif diff > pooled:
        word = "higher by more than one pooled std"
    elif diff < -pooled:
        word = "lower by more than one pooled std"
    else:
        word = "level (within one pooled std)"
    return {"agent": agent, "other": other, "metric": key, "diff": diff, "pooled_std": pooled,
            "diff_over_std": diff / pooled if pooled and not math.isnan(pooled) else float("nan"), "verdict": word}


def bar_verdict(summary: Dict[str, Any], target: float, key: str = "test_after_ft") -> Optional[Dict[str, Any]]:
    """Best RL agent vs best non-RL baseline on test top-1 after fine-tune, against the issue's bar: more than
    one pooled std better at 70 % (any target >= 0.6), at least level (not more than one std worse) below.

    :param summary: from :func:`summarise`.
    :param target: the FLOPs reduction of these runs.
    :param key: ``"test_after_ft"`` (the runs' fine-tune) or :data:`LONG_KEY`; agents without it are left out.
    """
    rl = [a for a in summary if is_rl(a) and key in summary[a]]
    base = [a for a in summary if a in BASELINES and key in summary[a]]
    if not rl or not base:
        return None
    best_rl = max(rl, key=lambda a: summary[a][key]["mean"])
    best_base = max(base, key=lambda a: summary[a][key]["mean"])
    c = compare(summary, best_rl, best_base, key)
    strict = target >= 0.6
    if math.isnan(c["pooled_std"]):
        met = None
    else:
        met = c["diff"] > c["pooled_std"] if strict else c["diff"] >= -c["pooled_std"]
    c.update(bar="beats by more than one pooled std" if strict else "at least level (within one pooled std or "
             "better)", met=met)
    return c


# ---------------------------------------------------------------------------------------------- FT-length check
def ft_check_model(cfg: Any, model: torch.nn.Module, epochs: int, env: Any) -> Dict[str, Any]:
    """Fine-tune a searched model for ``epochs`` epochs with the unit's recipe and return its test top-1.

    :param cfg: the unit's config (its ``finetune`` section and ``seed``).
    :param model: the searched model before fine-tuning (a copy is trained).
    :param epochs: fine-tune epochs.
    :param env: a PruneEnv of the task (its splits, original model and device).
    """
    model = copy.deepcopy(model).to(env.device)
    ft = cfg.finetune
    seed_everything(cfg.seed)
    finetune(model, env.splits.train, val_data=env.splits.val, epochs=epochs, lr=ft.lr, min_lr=ft.min_lr,
             warmup_ratio=ft.warmup_ratio, teacher=env.original_model if ft.teacher == "original" else None,
             T=ft.T, soft_weight=ft.soft_weight, batch_size=ft.batch_size, device=env.device, seed=cfg.seed,
             progress=False)
    model.eval()
    return {"epochs": epochs, "test_top1": evaluate(model, env.splits.test, env.device)["top1"],
            "device": str(env.device)}


def ft_check_unit(cfg: Any, agent: str, run_dir: Path, epochs: int, env: Any) -> Optional[Dict[str, Any]]:
    """Fine-tune the unit's searched model (its run checkpoint's best episode, before fine-tuning) for
    ``epochs`` epochs with the run's recipe otherwise (:func:`ft_check_model`), and store the test top-1 in
    ``ft_check.json``.

    :param cfg: the unit's config.
    :param agent: agent name.
    :param run_dir: the finished unit's folder.
    :param epochs: fine-tune epochs.
    :param env: a PruneEnv of the task (its splits, original model and device).
    """
    path = run_dir / FT_CHECK_FILE
    done = json.loads(path.read_text()) if path.is_file() else {}
    if str(epochs) in done:
        return done[str(epochs)]
    folder = RunFolder(run_dir)
    if not folder.is_finished:
        return None
    if folder.has_checkpoint:
        model = folder.read_checkpoint().agent_state["record"]["best"]["model"]
    else:  # agents without a run checkpoint (SB3): replay the best episode's recorded actions
        model = replay_best(cfg, agent, json.loads((run_dir / "metrics.json").read_text()))
    done[str(epochs)] = ft_check_model(cfg, model, epochs, env)
    atomic_write_text(json.dumps(done, indent=2), path)
    return done[str(epochs)]


def replay_best(cfg: Any, agent: str, metrics: Dict[str, Any]) -> torch.nn.Module:
    """The searched model of a finished unit rebuilt by stepping a fresh env of the unit (same config and seed)
    with the best episode's recorded actions; checked against the unit's MACs, params and kept channels.

    :param cfg: the unit's config.
    :param agent: agent name (its env settings, e.g. SB3's one-step sparsity mode).
    :param metrics: the unit's ``metrics.json``.
    """
    from rl_prune.pipeline import build_env

    env = build_env(cfg, agent)
    try:
        env.reset(seed=cfg.seed)
        for action in metrics["actions"]:
            env.step(np.asarray(action, dtype=np.float32))
        model = copy.deepcopy(env.model).eval()
        kept = [int(k) for k in env.current_channels]
        cost = count_costs(model, env.input_size, device=env.device)
        top1 = evaluate(model, env.splits.test, env.device)["top1"]
    finally:
        env.close()
    expected = metrics["pruned_before_finetune"]
    if (kept, cost.macs, cost.params, top1) != (metrics["kept_channels"], expected["macs"], expected["params"],
                                                 expected["test_top1"]):
        raise RuntimeError(f"replaying {agent}'s best actions did not rebuild its searched model: kept {kept}, "
                           f"MACs {cost.macs}, test top-1 {top1} vs {metrics['kept_channels']}, {expected['macs']}, "
                           f"{expected['test_top1']}")
    return model


def ft_check(args: argparse.Namespace, budget: int) -> None:
    """Run :func:`ft_check_unit` on the first ``--ft-check-seeds`` seeds of every agent and target."""
    from rl_prune.pipeline import build_env

    for target in args.targets:
        env = None
        for seed in range(min(args.ft_check_seeds, args.seeds)):
            for agent in args.agents:
                run_dir = target_dir(Path(args.out_dir), target) / f"{agent}_s{seed}"
                if load_unit(run_dir) is None:
                    continue
                cfg = unit_config(args.config, agent, seed, budget, unit_overrides(args, target))
                if env is None:
                    env = build_env(cfg, agent)
                print(f"ft-check {run_dir.parent.name}/{run_dir.name}: {args.ft_check_epochs} epochs", flush=True)
                ft_check_unit(cfg, agent, run_dir, args.ft_check_epochs, env)
        if env is not None:
            env.close()


def ft_check_table(units: Dict[str, List[Dict[str, Any]]], seeds: int) -> Optional[Dict[str, Any]]:
    """Agents' mean test top-1 over the checked seeds with the run's fine-tune and with each checked length, and
    whether the agents' order is the same.

    :param units: per agent, the finished units' metrics with their ``ft_check`` results attached.
    :param seeds: the first seeds to include.
    """
    rows: Dict[str, Dict[str, List[float]]] = {}
    lengths: set = set()
    for agent, runs in units.items():
        for m in runs:
            if m["seed"] >= seeds or not m.get("ft_check"):
                continue
            row = rows.setdefault(agent, {})
            row.setdefault("run", []).append(m["pruned"]["test_top1"])
            for k, v in m["ft_check"].items():
                row.setdefault(k, []).append(v["test_top1"])
                lengths.add(k)
    if not rows or not lengths:
        return None
    lengths_sorted = sorted(lengths, key=int)
    complete = {a: r for a, r in rows.items() if all(len(r.get(k, [])) == len(r["run"]) for k in lengths_sorted)}
    from scipy.stats import spearmanr

    means = {a: {k: float(np.mean(v)) for k, v in r.items()} for a, r in complete.items()}
    agents = list(means)
    run = [means[a]["run"] for a in agents]
    rho = {k: float(spearmanr(run, [means[a][k] for a in agents])[0]) if len(agents) > 2 else float("nan")
           for k in lengths_sorted}
    spread = {k: float(np.ptp([means[a][k] for a in agents])) for k in ["run"] + lengths_sorted}
    best = {k: [a for a in agents if means[a][k] == max(means[b][k] for b in agents)] for k in ["run"] + lengths_sorted}
    return {"lengths": lengths_sorted, "means": means, "spearman_vs_run": rho, "spread": spread, "best": best,
            "n_seeds": max(len(r["run"]) for r in complete.values())}


# ---------------------------------------------------------------------------------------------- output
def plot(per_target: Dict[str, Dict[str, Any]], path: Path) -> None:
    """One row per target: test top-1 after (o) / before (x) fine-tune per run, and per-agent means ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [t for t in per_target if per_target[t]["summary"]]
    if not targets:
        return
    fig, axes = plt.subplots(len(targets), 2, figsize=(14, 4.8 * len(targets)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.1, 1]})
    colors = plt.get_cmap("tab10")
    for (ax, bx), t in zip(axes, targets):
        units, summary, orig = per_target[t]["units"], per_target[t]["summary"], per_target[t]["original_test"]
        agents = [a for a in units if units[a]]
        for i, agent in enumerate(agents):
            c = colors(i % 10)
            for m in units[agent]:
                ax.scatter(m["flops_reduction"], m["pruned"]["test_top1"], color=c, marker="o", s=40,
                           label=agent if m is units[agent][0] else None)
                ax.scatter(m["flops_reduction"], m["pruned_before_finetune"]["test_top1"], color=c, marker="x",
                           s=40)
        ax.axhline(orig, color="k", ls="--", lw=1, label=f"original ({orig:.3f})")
        ax.set_xlabel("FLOPs reduction")
        ax.set_ylabel("test top-1")
        ax.set_title(f"target {t}: per run, o after fine-tune, x before")
        ax.legend(fontsize=7, ncol=3)
        x = np.arange(len(agents))
        nz = lambda s: 0.0 if math.isnan(s["std"]) else s["std"]  # noqa: E731
        after = [summary[a]["test_after_ft"] for a in agents]
        before = [summary[a]["test_before_ft"] for a in agents]
        long_ft = [summary[a].get(LONG_KEY) for a in agents]
        w = 0.27 if any(long_ft) else 0.4
        bx.bar(x - w / 2 * (2 if any(long_ft) else 1), [s["mean"] for s in before], w, yerr=[nz(s) for s in before],
               color="#bbbbbb", label="before fine-tune", capsize=3)
        bx.bar(x + (0 if any(long_ft) else w / 2), [s["mean"] for s in after], w, yerr=[nz(s) for s in after],
               color="#1f77b4", label="after the runs' fine-tune", capsize=3)
        if any(long_ft):
            bx.bar(x + w, [s["mean"] if s else 0.0 for s in long_ft], w, yerr=[nz(s) if s else 0.0 for s in long_ft],
                   color="#2ca02c", label=f"after {per_target[t]['verdict_epochs']}-epoch fine-tune", capsize=3)
        bx.axhline(orig, color="k", ls="--", lw=1, label="original")
        bx.set_xticks(x)
        bx.set_xticklabels(agents, rotation=30, ha="right")
        bx.set_ylabel("test top-1 (mean ± seed std)")
        bx.set_title(f"target {t}")
        bx.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def target_section(t: str, block: Dict[str, Any], budget: int) -> List[str]:
    """Markdown of one target: table, the bar verdict, each RL agent vs each baseline, the collapse guard."""
    summary = block["summary"]
    lines = [f"## FLOPs reduction target {t}", ""]
    if not summary:
        return lines + ["No finished run yet.", ""]
    long_epochs = block.get("verdict_epochs")
    columns = [(key, label) for key, label, _ in METRICS]
    if long_epochs is not None:
        columns.insert(3, (LONG_KEY, f"test top-1 after {long_epochs}-epoch FT"))
    lines += ["| agent | seeds | " + " | ".join(label for _, label in columns) + " |",
              "|---|---|" + "---|" * len(columns)]
    digits = {"n_evaluations": 0, "search_s": 0, "total_s": 0}
    for agent, row in summary.items():
        cells = [fmt(row[key], digits.get(key, 4)) if key in row else "–" for key, _ in columns]
        lines.append(f"| {agent} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines.append("")
    bar = block["bar"]
    if bar is not None:
        met = {True: "**met**", False: "**not met**", None: "undecided (one seed)"}[bar["met"]]
        which = f"the {long_epochs}-epoch fine-tune" if long_epochs is not None else "fine-tune"
        lines += [f"**Verdict at {t}:** best RL agent `{bar['agent']}` "
                  f"({summary[bar['agent']][bar['metric']]['mean']:.4f}) vs best non-RL baseline `{bar['other']}` "
                  f"({summary[bar['other']][bar['metric']]['mean']:.4f}) on test top-1 after {which}: "
                  f"{bar['diff']:+.4f} = {num(bar['diff_over_std'], '+.2f')} pooled seed std "
                  f"({num(bar['pooled_std'], '.4f')}): {bar['verdict']}. The bar ({bar['bar']}) is {met}.", ""]
    if block["pairs"]:
        lines += ["| RL agent | vs | metric | difference | pooled seed std | diff / std | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for v in block["pairs"]:
            lines.append(f"| {v['agent']} | {v['other']} | {v['metric']} | {v['diff']:+.4f} | "
                         f"{num(v['pooled_std'], '.4f')} | {num(v['diff_over_std'], '+.2f')} | {v['verdict']} |")
        lines.append("")
    for agent in RL_PRUNER_AGENTS:
        if agent in summary:
            cs = summary[agent]["collapse"]
            lines.append(f"Collapse guard of `{agent}`: PD resets per seed {[c['resets'] for c in cs]} of "
                         f"{[c['steps'] for c in cs]} steps; steps that ended with the budget of {budget} spent "
                         f"(no room for another sample) {[c['budget_stopped'] for c in cs]}.")
    lines.append("")
    check = block.get("ft_check")
    if check:
        lines += [f"Fine-tune length check ({check['n_seeds']} seed(s)): the same searched models fine-tuned with the "
                  f"runs' recipe for {', '.join(check['lengths'])} epoch(s) instead; mean test top-1:", "",
                  "| agent | run's fine-tune | " + " | ".join(f"{k} epochs" for k in check["lengths"]) + " |",
                  "|---|---|" + "---|" * len(check["lengths"])]
        for agent, m in check["means"].items():
            lines.append(f"| {agent} | {m['run']:.4f} | " + " | ".join(f"{m[k]:.4f}" for k in check["lengths"])
                         + " |")
        lines += ["", "Spearman ρ of the agents' means, run's fine-tune vs longer: "
                  + ", ".join(f"{k} epochs {num(v, '+.2f')}" for k, v in check["spearman_vs_run"].items())
                  + "; spread (best − worst mean): "
                  + ", ".join(f"{'run' if k == 'run' else k + ' epochs'} {v:.4f}" for k, v in check["spread"].items())
                  + "; best: " + ", ".join(f"{'run' if k == 'run' else k + ' epochs'} {'/'.join(v)}"
                                           for k, v in check["best"].items()) + ".", ""]
    return lines


def missing_units(missing: Sequence[Tuple[str, str, int]]) -> List[str]:
    """``t70/agent seeds [2, 3]`` lines for the units not run, one per target and agent.

    :param missing: ``(target folder, agent, seed)`` of every unit without results.
    """
    grouped: Dict[Tuple[str, str], List[int]] = {}
    for target, agent, seed in missing:
        grouped.setdefault((target, agent), []).append(seed)
    return [f"{t}/{a} seeds {seeds}" for (t, a), seeds in grouped.items()]


def render_markdown(meta: Dict[str, Any], per_target: Dict[str, Dict[str, Any]], failures: Dict[str, str],
                    missing: List[Tuple[str, str, int]], stem: str = "compare_agents") -> str:
    lines = [f"# RL agents vs non-RL baselines at equal evaluation budget ({meta['task']})", "",
             meta["task_long"], "",
             *([meta["note"], ""] if meta["note"] else []),
             f"Budget: **{meta['budget']} evaluations per agent**, enforced: every agent's `PruneMonitor` stops "
             f"look-aheads at it and the env counts evaluations the same way for all (look-aheads plus steps that "
             f"did not reuse a built model). Uniform and global Taylor need one evaluation per pruning step. Seeds "
             f"{meta['seeds']}. The same final KD fine-tune for every agent ({meta['finetune']}). Reward accuracy "
             f"estimator: `{meta['reward_estimator']}` (BN statistics from {meta['reward_train_images']} training "
             f"images; accuracy on {meta['reward_samples']} validation images; never the test split). Device "
             f"{meta['device']}, {meta['threads']} torch thread(s) per run on 2 CPU cores shared with other jobs, "
             f"torch {meta['torch']}.", "",
             f"Original model: test top-1 **{meta['original_test_top1']:.4f}**, validation top-1 "
             f"{meta['original_val_top1']:.4f}, {meta['original_macs'] / 1e6:.2f} M MACs, "
             f"{meta['original_params'] / 1e6:.3f} M params.", "",
             "Pooled seed std = sqrt(((n1-1)s1² + (n2-1)s2²) / (n1+n2-2)) of the two agents' test top-1 after "
             "fine-tune. Reward acc = the estimator's value on the validation subset for the best episode (what "
             "the search maximises; biased upward by selection); test top-1 before FT is the same model measured "
             "without bias.", ""]
    for t, block in per_target.items():
        lines += target_section(t, block, meta["budget"])
    lines += failures_section(failures, missing_units(missing), "the run folder's error.txt")
    lines += [f"![test accuracy per agent and target]({stem}.png)", "",
              f"Benchmark wall time: {meta['units_wall_s'] / 60:.1f} min summed over the {meta['n_units']} "
              f"finished units (each unit's `seconds.total`).", "",
              f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def command_args(argv: Sequence[str]) -> List[str]:
    """The command-line arguments that made the runs: without ``--report-only`` and the ``--note`` text.

    :param argv: ``sys.argv[1:]``.
    """
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif a != "--report-only" and not a.startswith("--note="):
            out.append(a)
    return out


def write_report(args: argparse.Namespace, seeds: List[int], budget: int) -> Path:
    """Gather every finished unit of ``--agents`` x ``--targets`` x seeds; write compare_agents.md|json|png."""
    results = Path(args.results)
    stem = "compare_agents" + (f"_{args.tag}" if args.tag else "")
    failures: Dict[str, str] = {}
    missing: List[Tuple[str, str, int]] = []
    per_target: Dict[str, Dict[str, Any]] = {}
    done: List[Dict[str, Any]] = []
    for target in args.targets:
        out = target_dir(Path(args.out_dir), target)
        units: Dict[str, List[Dict[str, Any]]] = {a: [] for a in args.agents}
        for agent in args.agents:
            for seed in seeds:
                run_dir = out / f"{agent}_s{seed}"
                m = load_unit(run_dir)
                if m is not None:
                    units[agent].append(m)
                elif unit_failure(run_dir) is not None:
                    failures[f"{out.name}/{run_dir.name}"] = unit_failure(run_dir)
                else:
                    missing.append((out.name, agent, seed))
        for agent, runs in units.items():
            for m in runs:
                path = out / f"{agent}_s{m['seed']}" / FT_CHECK_FILE
                m["ft_check"] = json.loads(path.read_text()) if path.is_file() else {}
        finished = [m for runs in units.values() for m in runs]
        done += finished
        summary = summarise(units, args.verdict_epochs)
        key = LONG_KEY if args.verdict_epochs is not None else "test_after_ft"
        pairs = [compare(summary, a, b, key) for a in summary if is_rl(a) and key in summary[a]
                 for b in summary if b in BASELINES and key in summary[b]]
        per_target[f"{target:g}"] = {
            "units": units, "summary": summary, "pairs": pairs, "bar": bar_verdict(summary, target, key),
            "verdict_epochs": args.verdict_epochs,
            "ft_check": ft_check_table(units, args.ft_check_seeds),
            "original_test": finished[0]["original"]["test_top1"] if finished else float("nan")}
    if not done:
        print("no finished units yet: nothing to report", file=sys.stderr)
        return results / f"{stem}.md"
    ref = done[0]
    cfg = load_config(args.config, unit_overrides(args, args.targets[0]))
    env = cfg.env_kwargs(args.agents[0])
    meta = {
        "task": f"{env.get('model')} w{env.get('width')} on {ref['dataset']}",
        "task_long": (f"Task: {env.get('model')} width {env.get('width')} pretrained on `{ref['dataset']}` "
                      f"(checkpoint `{env.get('checkpoint')}`), pruned to each target FLOPs reduction (budget), "
                      f"reward = accuracy + {ref['alpha']} · FLOPs reduction + {ref['beta']} · params reduction. "
                      f"RL-Pruner and the heuristics prune in {env.get('n_steps')} step(s) ({env.get('action_mode')} mode), "
                      f"without fine-tuning between steps; SB3 agents always prune in one step (sparsity mode)."),
        "budget": budget, "seeds": seeds, "targets": args.targets, "agents": args.agents, "config": str(args.config),
        "reward_estimator": env.get("reward_estimator", "vanilla"),
        "reward_train_images": env.get("reward_train_images", 256), "reward_samples": env.get("reward_samples"),
        "finetune": ", ".join(f"{k} {v}" for k, v in asdict(cfg.finetune).items()),
        "device": ref["device"], "threads": args.threads, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "original_test_top1": ref["original"]["test_top1"], "original_val_top1": ref["original"]["val_top1"],
        "original_macs": ref["original"]["macs"], "original_params": ref["original"]["params"],
        "units_wall_s": float(sum(m["seconds"]["total"] for m in done)), "n_units": len(done),
        "note": args.note,
        "command": "python benchmarks/compare_agents.py " + " ".join(command_args(sys.argv[1:])),
    }
    payload = {"meta": meta, "failures": failures, "missing": missing,
               "targets": {t: {"summary": b["summary"], "pairs": b["pairs"], "bar": b["bar"],
                               "ft_check": b["ft_check"]} for t, b in per_target.items()},
               "runs": [{k: v for k, v in m.items() if not k.startswith("_") and k not in ("group_names", "actions")}
                        for m in done]}
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(payload, indent=2, default=float), results / f"{stem}.json")
    plot(per_target, results / f"{stem}.png")
    atomic_write_text(render_markdown(meta, per_target, failures, missing, stem), results / f"{stem}.md")
    return results / f"{stem}.md"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    bad = [t for t in args.targets if not 0.0 < t < 1.0]
    if bad:
        print(f"error: --targets must be FLOPs reductions in (0, 1), got {bad}", file=sys.stderr)
        return 2
    try:
        parse_overrides(args.set)
    except ConfigError as err:
        print(f"error: --set: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    budget = args.budget or load_config(args.config).budget or 300
    if not args.report_only:
        from tqdm.auto import tqdm

        # seed-major order: a complete one-seed table for every target exists as early as possible
        units: List[Tuple[int, float, str]] = [(s, t, a) for s in seeds for t in args.targets for a in args.agents]
        bar = tqdm(units, desc="compare", unit="run", dynamic_ncols=True)
        for seed, target, agent in bar:
            run_dir = target_dir(Path(args.out_dir), target) / f"{agent}_s{seed}"
            bar.set_postfix(unit=f"{run_dir.parent.name}/{run_dir.name}")
            cfg = unit_config(args.config, agent, seed, budget, unit_overrides(args, target))
            status = run_unit(cfg, agent, run_dir)
            if status["status"] != "skipped":
                write_report(args, seeds, budget)
        if args.ft_check_epochs > 0:
            ft_check(args, budget)
    path = write_report(args, seeds, budget)
    print(f"wrote {path} (.json, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
