"""Every pruning agent on one PruneEnv task at the same evaluation budget, several seeds, the same final KD
fine-tune: mean ± std table (markdown + JSON) and an accuracy-vs-FLOPs plot in benchmarks/results/.

    python benchmarks/compare_agents.py                                   # all agents, 3 seeds, budget 300
    python benchmarks/compare_agents.py --agents rl_pruner uniform --seeds 1 --threads 2
    python benchmarks/compare_agents.py --report-only                     # tables from the finished runs
Each (agent, seed) is one ``train_agent.run`` into ``{out-dir}/{agent}_s{seed}/``; units whose metrics.json
exists are skipped, so a killed benchmark continues where it stopped (rerun the same command).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from agents.config import load_config  # noqa: E402
from agents.registry import AGENTS, env_kwargs  # noqa: E402
from pruning_env.runtime import atomic_write_text  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "bench_cpu_vgg19w025_npz.yaml"
#: the evaluation budget the issue asks for (RL-Pruner: 3 steps x 10 samples x 10 RL epochs)
ISSUE_BUDGET = 300
#: the baselines RL-Pruner has to beat at equal budget (the statement in the markdown)
BASELINES = ("uniform", "global_taylor", "random_search")
#: per-run numbers aggregated over seeds: (key in the summary, label, how to read it from metrics.json)
METRICS = (
    ("reward_accuracy", "val acc before FT (reward)", lambda m: m["reward_accuracy"]),
    ("test_before_ft", "test top-1 before FT", lambda m: m["pruned_before_finetune"]["test_top1"]),
    ("test_after_ft", "test top-1 after FT", lambda m: m["pruned"]["test_top1"]),
    ("flops_reduction", "FLOPs reduction", lambda m: m["flops_reduction"]),
    ("params_reduction", "params reduction", lambda m: m["params_reduction"]),
    ("n_evaluations", "evaluations used", lambda m: m["n_evaluations"]),
    ("search_s", "search s", lambda m: m["seconds"]["search"]),
    ("total_s", "total s", lambda m: m["seconds"]["total"]),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="train_agent.py YAML config of the task")
    p.add_argument("--agents", nargs="+", default=list(AGENTS), choices=list(AGENTS), metavar="AGENT",
                   help=f"agents to compare (default: all: {' '.join(AGENTS)})")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, run as seeds 0..N-1 (default 3)")
    p.add_argument("--budget", type=int, default=None,
                   help="evaluations per agent (default: the config's budget, else 300)")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "compare"), help="run folders (one per agent/seed)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where compare_agents.* go")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables from finished runs")
    return p


# ---------------------------------------------------------------------------------------------- running units
def unit_config(config: str, agent: str, seed: int, budget: int, overrides: Optional[Dict[str, Any]] = None
                ) -> Dict[str, Any]:
    """The validated train_agent config of one (agent, seed) unit.

    :param config: YAML file of the task.
    :param agent: agent name (agents.registry.AGENTS).
    :param seed: seed of the env, the agent and the fine-tune.
    :param budget: evaluations for budgeted agents.
    :param overrides: further dotted-key overrides (the ablation's env settings).
    """
    over = {"seed": int(seed), "budget": int(budget), "agent": agent, "name": f"{agent}_s{seed}",
            "run.progress": False}
    over.update(overrides or {})
    return load_config(config, over)


def run_unit(cfg: Dict[str, Any], agent: str, run_dir: Path) -> Dict[str, Any]:
    """``train_agent.run`` of one unit, continuing a killed search from its checkpoint when it has one.

    Returns ``{"status": "done" | "skipped" | "busy" | "failed", ...}``; a failure writes ``error.txt`` with
    the traceback into the run folder and does not raise, so the other units go on. A unit another live
    benchmark process is running (its ``unit.lock``) is left to it ("busy"), so two workers can share a queue.
    """
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        return {"status": "skipped"}
    lock = run_dir / "unit.lock"
    if not _acquire(lock):
        return {"status": "busy"}
    try:
        return _run_locked(cfg, agent, run_dir)
    finally:
        lock.unlink(missing_ok=True)


def _acquire(lock: Path) -> bool:
    """Create ``lock`` holding this process id; False when a live process holds it (a dead one's is taken)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # left by a killed worker
                continue
            except PermissionError:  # alive, another user's
                return False
            return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _run_locked(cfg: Dict[str, Any], agent: str, run_dir: Path) -> Dict[str, Any]:
    import train_agent

    resume = (run_dir / "checkpoint.pt").is_file()
    try:
        try:
            train_agent.run(cfg, agent, run_dir, resume=resume)
        except ValueError as err:
            if not (resume and "config differs" in str(err)):
                raise
            # a checkpoint of another config (e.g. a changed budget): start the unit again
            print(f"{run_dir}: {err}; starting it again", file=sys.stderr)
            train_agent.run(cfg, agent, run_dir, resume=False)
    except Exception:  # any agent bug: record it, go on with the next unit
        tb = traceback.format_exc()
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tb, run_dir / "error.txt")
        print(f"\n{run_dir.name} FAILED:\n{tb}", file=sys.stderr, flush=True)
        return {"status": "failed", "traceback": tb}
    (run_dir / "error.txt").unlink(missing_ok=True)
    return {"status": "done"}


def load_unit(run_dir: Path) -> Optional[Dict[str, Any]]:
    """metrics.json of a finished unit plus what its steps.csv says (collapse resets, per-step rewards)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    rows: List[Dict[str, str]] = []
    steps = run_dir / "steps.csv"
    if steps.is_file():
        with open(steps, newline="") as f:
            rows = list(csv.DictReader(f))
    metrics["_steps"] = rows
    return metrics


def collapse_resets(metrics: Dict[str, Any]) -> int:
    """RL-Pruner collapse-guard resamples in the run (each costs another sampling phase of evaluations)."""
    return sum(int(float(r.get("collapse_reset") or 0)) for r in metrics["_steps"])


def learning_evidence(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Did an SB3 baseline learn? Mean reward of the first vs last quarter of its training episodes (one-step
    episodes: one row per evaluated model), and the reward of the final deterministic episode."""
    rows = metrics["_steps"]
    n_train = min(int(metrics["timesteps"]), len(rows))
    rewards = np.array([float(r["reward"]) for r in rows[:n_train]])
    q = max(1, n_train // 4)
    first, last = rewards[:q], rewards[-q:]
    final = float(rows[-1]["reward"]) if len(rows) > n_train else float("nan")
    # Welch t of last vs first quarter: > 2 means the late policy is clearly better than the early one
    se = math.sqrt(first.var(ddof=1) / len(first) + last.var(ddof=1) / len(last)) if q > 1 else float("nan")
    return {"episodes": n_train, "quarter": q, "first_quarter_mean": float(first.mean()),
            "first_quarter_std": float(first.std(ddof=1)) if q > 1 else float("nan"),
            "last_quarter_mean": float(last.mean()),
            "last_quarter_std": float(last.std(ddof=1)) if q > 1 else float("nan"),
            "improvement": float(last.mean() - first.mean()),
            "welch_t": float((last.mean() - first.mean()) / se) if se and se > 0 else float("nan"),
            "best_training_reward": float(rewards.max()), "final_deterministic_reward": final}


# ---------------------------------------------------------------------------------------------- summarising
def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else float("nan"), "n": len(a)}


def num(value: float, spec: str) -> str:
    """``format(value, spec)``, or "n/a" for NaN (one seed has no std)."""
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def fmt(stat: Dict[str, float], digits: int = 4, pct: bool = False) -> str:
    """``mean ± std`` (just the mean for one seed)."""
    scale, unit = (100.0, "") if pct else (1.0, "")
    mean = stat["mean"] * scale
    if math.isnan(stat["std"]):
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {stat['std'] * scale:.{digits}f}{unit}"


def summarise(units: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    """Per-agent mean ± std of every :data:`METRICS` entry (plus RL-Pruner's collapse resets and the SB3
    learning evidence)."""
    out: Dict[str, Any] = {}
    for agent, runs in units.items():
        if not runs:
            continue
        row: Dict[str, Any] = {"seeds": [m["seed"] for m in runs]}
        for key, _, get in METRICS:
            row[key] = mean_std([get(m) for m in runs])
        if agent == "rl_pruner":
            row["collapse_resets"] = [collapse_resets(m) for m in runs]
        if AGENTS[agent].sb3_algo is not None:
            row["learning"] = [dict(seed=m["seed"], **learning_evidence(m)) for m in runs]
        out[agent] = row
    return out


def verdict(summary: Dict[str, Any], key: str, other: str) -> Dict[str, Any]:
    """RL-Pruner minus ``other`` on metric ``key``, against the seed noise (pooled standard deviation)."""
    a, b = summary["rl_pruner"][key], summary[other][key]
    diff = a["mean"] - b["mean"]
    pooled = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2) if a["n"] > 1 and b["n"] > 1 else float("nan")
    if math.isnan(pooled):
        word = "higher (one seed, noise unknown)" if diff > 0 else "not higher (one seed, noise unknown)"
    elif pooled == 0:
        word = "higher" if diff > 0 else ("equal" if diff == 0 else "lower")
    elif diff > pooled:
        word = "higher, by more than the seed std"
    elif diff < -pooled:
        word = "lower, by more than the seed std"
    else:
        word = "within the seed std (no clear difference)"
    return {"metric": key, "other": other, "diff": diff, "pooled_std": pooled,
            "diff_over_std": diff / pooled if pooled and not math.isnan(pooled) else float("nan"), "verdict": word}


def plot(units: Dict[str, List[Dict[str, Any]]], summary: Dict[str, Any], original_test: float, path: Path) -> None:
    """Left: test top-1 after (o) and before (x) fine-tune vs FLOPs reduction per agent and seed; right: the
    per-agent means with seed std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = [a for a in units if units[a]]
    colors = plt.get_cmap("tab10")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1.1, 1]})
    for i, agent in enumerate(agents):
        c = colors(i % 10)
        for m in units[agent]:
            ax.scatter(m["flops_reduction"], m["pruned"]["test_top1"], color=c, marker="o", s=40,
                       label=agent if m is units[agent][0] else None)
            ax.scatter(m["flops_reduction"], m["pruned_before_finetune"]["test_top1"], color=c, marker="x", s=40)
    ax.axhline(original_test, color="k", ls="--", lw=1, label=f"original ({original_test:.3f})")
    ax.set_xlabel("FLOPs reduction")
    ax.set_ylabel("test top-1")
    ax.set_title("per run: o after fine-tune, x before fine-tune")
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.12))  # below: points fill the axes
    x = np.arange(len(agents))
    after = [summary[a]["test_after_ft"] for a in agents]
    before = [summary[a]["test_before_ft"] for a in agents]
    nz = lambda s: 0.0 if math.isnan(s["std"]) else s["std"]  # noqa: E731
    bx.bar(x - 0.2, [s["mean"] for s in before], 0.4, yerr=[nz(s) for s in before], color="#bbbbbb",
           label="before fine-tune", capsize=3)
    bx.bar(x + 0.2, [s["mean"] for s in after], 0.4, yerr=[nz(s) for s in after], color="#1f77b4",
           label="after fine-tune", capsize=3)
    bx.axhline(original_test, color="k", ls="--", lw=1, label="original")
    bx.set_xticks(x)
    bx.set_xticklabels(agents, rotation=40, ha="right")
    bx.set_ylabel("test top-1 (mean ± std over seeds)")
    bx.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(meta: Dict[str, Any], summary: Dict[str, Any], verdicts: List[Dict[str, Any]],
                    failures: Dict[str, str], missing: List[str]) -> str:
    lines = [f"# Agent comparison at equal evaluation budget ({meta['task']})", "",
             f"{meta['task_long']} Budget: {meta['budget']} evaluations per agent; seeds {meta['seeds']}; same "
             f"final KD fine-tune for every agent ({meta['finetune']}). Device {meta['device']}, "
             f"{meta['threads']} torch threads (2 shared CPU cores), torch {meta['torch']}.", "",
             *([f"**Reduced budget:** {meta['budget']} evaluations instead of the issue's {ISSUE_BUDGET}, so "
                f"that every agent and seed fits the time on 2 CPU cores shared with other jobs (the config's "
                f"header lists what was cut and the settings for a free machine).", ""]
               if meta["budget"] < ISSUE_BUDGET else []),
             f"Original model: test top-1 **{meta['original_test_top1']:.4f}**, validation top-1 "
             f"{meta['original_val_top1']:.4f}, {meta['original_macs'] / 1e6:.2f} M MACs, "
             f"{meta['original_params'] / 1e6:.3f} M params.", "",
             "| agent | seeds | " + " | ".join(label for _, label, _ in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    digits = {"n_evaluations": 0, "search_s": 0, "total_s": 0}
    for agent, row in summary.items():
        cells = [fmt(row[key], digits.get(key, 4)) for key, _, _ in METRICS]
        lines.append(f"| {agent} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "Val acc before FT = top-1 on the fixed reward subset of the validation split (what the search "
              "maximises; never the test set). Test top-1 on the held-out test split (20 % of the npz, 1034 "
              "images). Evaluations used = models the env evaluated for the agent (look-aheads + uncached steps), "
              "counted by the env: RL-Pruner's includes collapse-guard resamples and re-evaluations of a chosen "
              "candidate that had left the env's look-ahead cache; the SB3 baselines' includes their final "
              "deterministic episode (budget + 1); uniform and global Taylor need only one per pruning step. "
              "The reward accuracy of a searching agent is the best of many noisy evaluations on the same "
              "images (selection bias grows with the evaluations used); test top-1 before FT is the unbiased "
              "measure of the same pruned model. Search and total seconds depend on the load of the shared "
              "machine at the time of each run.", ""]
    if "rl_pruner" in summary:
        cr = summary["rl_pruner"]["collapse_resets"]
        used = summary["rl_pruner"]["n_evaluations"]["mean"]
        lines += [f"RL-Pruner collapse-guard resets per seed: {cr} (each resamples a whole step: "
                  f"sample_num x lr_epoch more evaluations). It used {used:.0f} evaluations on average, "
                  f"{used / meta['budget']:.2f}x the budget of {meta['budget']}"
                  + (", so at \"equal budget\" it actually had more evaluations than the budgeted baselines."
                     if used > meta["budget"] * 1.05 else "."), ""]
    best = max(summary, key=lambda a: summary[a]["test_after_ft"]["mean"])
    best_before = max(summary, key=lambda a: summary[a]["test_before_ft"]["mean"])
    lines += [f"Highest mean test top-1 after fine-tune: {best} ({fmt(summary[best]['test_after_ft'])}); before "
              f"fine-tune: {best_before} ({fmt(summary[best_before]['test_before_ft'])}).", ""]
    if verdicts:
        lines += ["## RL-Pruner vs the baselines at equal budget", ""]
        lines += ["| metric | vs | RL-Pruner − baseline | pooled seed std | diff / std | verdict |",
                  "|---|---|---|---|---|---|"]
        for v in verdicts:
            lines.append(f"| {v['metric']} | {v['other']} | {v['diff']:+.4f} | {num(v['pooled_std'], '.4f')} | "
                         f"{num(v['diff_over_std'], '+.2f')} | {v['verdict']} |")
        lines += ["", meta["statement"], ""]
    sb3 = [(a, r["learning"]) for a, r in summary.items() if "learning" in r]
    if sb3:
        lines += ["## Do the SB3 baselines learn?", "",
                  "One-step episodes (each one evaluated model): mean reward (= reward-subset accuracy, α = β = 0) "
                  "of the first vs the last quarter of the training episodes, Welch t of the difference "
                  "(> 2: clearly better late than early), and the reward of the final deterministic episode.", "",
                  "| agent | seed | episodes | first quarter | last quarter | last − first | Welch t | best "
                  "training reward | final deterministic |", "|---|---|---|---|---|---|---|---|---|"]
        for agent, evs in sb3:
            for e in evs:
                lines.append(f"| {agent} | {e['seed']} | {e['episodes']} | {e['first_quarter_mean']:.4f} ± "
                             f"{e['first_quarter_std']:.4f} | {e['last_quarter_mean']:.4f} ± "
                             f"{e['last_quarter_std']:.4f} | {e['improvement']:+.4f} | {num(e['welch_t'], '+.2f')} | "
                             f"{e['best_training_reward']:.4f} | {e['final_deterministic_reward']:.4f} |")
        lines += ["", meta["sb3_statement"], ""]
    lines += failures_section(failures, missing, "the run folder's error.txt and the JSON")
    lines += ["![test accuracy vs FLOPs reduction](compare_agents.png)", "",
              f"Benchmark wall time: {meta['units_wall_s'] / 60:.1f} min summed over the "
              f"{meta['n_units']} finished units (each unit's `seconds.total`).", "",
              f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def failures_section(failures: Dict[str, str], missing: Sequence[str], where: str) -> List[str]:
    """Markdown lines listing failed units (last traceback line) and units not run yet; empty when none.

    :param where: where the full tracebacks are, for the reader.
    """
    if not failures and not missing:
        return []
    lines = ["## Missing or failed units", ""]
    for unit, tb in failures.items():
        last = tb.strip().splitlines()[-1] if tb.strip() else "?"
        lines.append(f"- `{unit}` failed: `{last}` (traceback in {where})")
    lines += [f"- `{unit}` not run (yet)" for unit in missing]
    return lines + [""]


def statement(summary: Dict[str, Any], verdicts: List[Dict[str, Any]]) -> str:
    """The plain sentence(s) on RL-Pruner vs each baseline, from the numbers."""
    if "rl_pruner" not in summary:
        return ""
    parts = []
    for other in BASELINES:
        if other not in summary:
            continue
        v = {x["metric"]: x for x in verdicts if x["other"] == other}
        after, reward = v["test_after_ft"], v["reward_accuracy"]
        beats = after["diff"] > 0 and (math.isnan(after["pooled_std"]) or after["diff"] > after["pooled_std"])
        parts.append(
            f"**vs {other}: RL-Pruner {'beats' if beats else 'does not clearly beat'} it** on test top-1 after "
            f"fine-tune ({summary['rl_pruner']['test_after_ft']['mean']:.4f} vs "
            f"{summary[other]['test_after_ft']['mean']:.4f}, difference {after['diff']:+.4f} = "
            f"{num(after['diff_over_std'], '+.2f')} pooled seed std); on the reward accuracy it is "
            f"{reward['diff']:+.4f} ({num(reward['diff_over_std'], '+.2f')} std: {reward['verdict']}); "
            f"evaluations used {summary['rl_pruner']['n_evaluations']['mean']:.0f} vs "
            f"{summary[other]['n_evaluations']['mean']:.0f}.")
    return " ".join(parts)


def sb3_statement(summary: Dict[str, Any]) -> str:
    """One sentence per SB3 baseline on whether its late episodes beat its early ones."""
    parts = []
    for agent, row in summary.items():
        if "learning" not in row:
            continue
        ts = [e["welch_t"] for e in row["learning"]]
        imp = [e["improvement"] for e in row["learning"]]
        learned = sum(1 for t in ts if t > 2)
        parts.append(f"{agent}: last-quarter reward − first-quarter reward {np.mean(imp):+.4f} on average; clearly "
                     f"better late (Welch t > 2) in {learned} of {len(ts)} seeds.")
    return ("Learning evidence: " + " ".join(parts)) if parts else ""


def write_report(args: argparse.Namespace, seeds: List[int], budget: int, wall_s: float) -> Path:
    """Gather every finished unit of ``--agents`` x seeds and write compare_agents.md|json|png."""
    out_dir, results = Path(args.out_dir), Path(args.results)
    units: Dict[str, List[Dict[str, Any]]] = {a: [] for a in args.agents}
    failures: Dict[str, str] = {}
    missing: List[str] = []
    for agent in args.agents:
        for seed in seeds:
            run_dir = out_dir / f"{agent}_s{seed}"
            m = load_unit(run_dir)
            if m is not None:
                units[agent].append(m)
            elif (run_dir / "error.txt").is_file():
                failures[run_dir.name] = (run_dir / "error.txt").read_text()
            else:
                missing.append(run_dir.name)
    done = [m for runs in units.values() for m in runs]
    if not done:
        print("no finished units yet: nothing to report", file=sys.stderr)
        return results / "compare_agents.md"
    summary = summarise(units)
    verdicts: List[Dict[str, Any]] = []
    if "rl_pruner" in summary:
        for other in BASELINES:
            if other in summary:
                verdicts += [verdict(summary, k, other) for k in ("reward_accuracy", "test_before_ft", "test_after_ft")]
    ref = done[0]
    cfg = load_config(args.config)
    env = env_kwargs(cfg, "rl_pruner")  # the id's defaults resolved, as the runs saw them
    meta = {
        "task": f"{env.get('model')} w{env.get('width')} on {ref['dataset']}",
        "task_long": (f"Task: {env.get('model')} width {env.get('width')} pretrained on `{ref['dataset']}` "
                      f"(checkpoint `{env.get('checkpoint')}`), pruned to {ref['target']:.0%} "
                      f"{ref['target_metric']} reduction (budget), reward = accuracy on "
                      f"{env.get('reward_samples')} validation images + {ref['alpha']} · FLOPs reduction + "
                      f"{ref['beta']} · params reduction. RL-Pruner and the heuristics prune in "
                      f"{env.get('n_steps')} steps (distribution mode); the SB3 baselines use one-step episodes "
                      f"in sparsity mode with the same FLOPs budget."),
        "budget": budget, "seeds": seeds, "agents": args.agents, "config": str(args.config),
        "finetune": ", ".join(f"{k} {v}" for k, v in cfg["finetune"].items()),
        "device": ref["device"], "threads": args.threads, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "original_test_top1": ref["original"]["test_top1"], "original_val_top1": ref["original"]["val_top1"],
        "original_macs": ref["original"]["macs"], "original_params": ref["original"]["params"],
        "units_wall_s": float(sum(m["seconds"]["total"] for m in done)), "n_units": len(done), "wall_s": wall_s,
        "command": "python benchmarks/compare_agents.py " + " ".join(a for a in sys.argv[1:] if a != "--report-only"),
    }
    meta["statement"] = statement(summary, verdicts)
    meta["sb3_statement"] = sb3_statement(summary)
    per_run = [{k: v for k, v in m.items() if not k.startswith("_") and k not in ("group_names", "actions")}
               for m in done]
    payload = {"meta": meta, "summary": summary, "verdicts": verdicts, "failures": failures, "missing": missing,
               "runs": per_run}
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(payload, indent=2, default=float), results / "compare_agents.json")
    plot(units, summary, meta["original_test_top1"], results / "compare_agents.png")
    atomic_write_text(render_markdown(meta, summary, verdicts, failures, missing), results / "compare_agents.md")
    return results / "compare_agents.md"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    budget = args.budget or load_config(args.config)["budget"] or 300
    t0 = time.time()
    if not args.report_only:
        from tqdm.auto import tqdm

        # seed-major order: a complete one-seed table exists as early as possible
        units = [(agent, seed) for seed in seeds for agent in args.agents]
        bar = tqdm(units, desc="compare", unit="run", dynamic_ncols=True)
        for agent, seed in bar:
            bar.set_postfix(unit=f"{agent}_s{seed}")
            run_dir = Path(args.out_dir) / f"{agent}_s{seed}"
            status = run_unit(unit_config(args.config, agent, seed, budget), agent, run_dir)
            if status["status"] != "skipped":
                write_report(args, seeds, budget, time.time() - t0)
    path = write_report(args, seeds, budget, time.time() - t0)
    print(f"wrote {path} (.json, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
