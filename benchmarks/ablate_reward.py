"""Reward ablation of RL-Pruner: a grid of α (FLOPs bonus) and β (params bonus) at a fixed channel sparsity,
where the learned pruning distribution decides how FLOPs, params and accuracy trade off.

    python benchmarks/ablate_reward.py                    # α, β in {0, 0.25, 0.5}, 30 % channels, 1 seed
    python benchmarks/ablate_reward.py --alphas 0 0.5 --betas 0 0.5 --seeds 2 --set finetune.epochs=0
With a FLOPs budget (the comparison task) the FLOPs reduction is fixed and α does nothing, so every unit here
uses the authors' setting: ``target_metric=channels`` (channel budget), ``action_mode=distribution``.
Each (α, β, seed) is one ``rl_prune.pipeline.run`` into ``{out-dir}/a{α}_b{β}_s{seed}/``; finished units are skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: benchmarks.common is imported from the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.common import failures_section, fmt, mean_std  # noqa: E402
from pruning_env.runtime import atomic_write_text  # noqa: E402
from rl_prune.config import load_config, parse_overrides  # noqa: E402
from rl_prune.sweep import BENCH_CONFIG, load_unit, run_unit, unit_config, unit_failure  # noqa: E402

#: per-run numbers aggregated over seeds: (key, label, reader of metrics.json)
METRICS = (
    ("reward_accuracy", "val acc before FT (reward)", lambda m: m["reward_accuracy"]),
    ("best_reward", "best reward", lambda m: m["best_reward"]),
    ("channel_sparsity", "channel sparsity", lambda m: float(m["_steps"][-1]["channel_sparsity"])),
    ("flops_reduction", "FLOPs reduction", lambda m: m["flops_reduction"]),
    ("params_reduction", "params reduction", lambda m: m["params_reduction"]),
    ("test_before_ft", "test top-1 before FT", lambda m: m["pruned_before_finetune"]["test_top1"]),
    ("test_after_ft", "test top-1 after FT", lambda m: m["pruned"]["test_top1"]),
    ("n_evaluations", "evaluations", lambda m: m["n_evaluations"]),
    ("total_s", "total s", lambda m: m["seconds"]["total"]),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(BENCH_CONFIG), help="train_agent.py YAML config of the task")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5], help="FLOPs-reduction weights α")
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.25, 0.5], help="params-reduction weights β")
    p.add_argument("--sparsity", type=float, default=0.3,
                   help="channel sparsity every unit prunes to (0.3 removes about half the FLOPs of the CPU task's "
                        "VGG-19; 0.5 removed about 77 %% and left it near chance accuracy)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds, run as seeds 0..N-1 (default 1)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="further config overrides for every unit, e.g. finetune.epochs=0 agents.rl_pruner.lr_epoch=5")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "ablate"), help="run folders (one per α, β, seed)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where ablate_reward.* go")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables from finished runs")
    return p


def unit_name(alpha: float, beta: float, seed: int) -> str:
    """Run folder name of one grid cell and seed."""
    return f"a{alpha:g}_b{beta:g}_s{seed}"


def ablation_overrides(args: argparse.Namespace, alpha: float, beta: float) -> Dict[str, Any]:
    """Env settings of one grid cell: a channel budget in distribution mode and the cell's α, β."""
    over = {"env.action_mode": "distribution", "env.budget": "channels", "env.target_metric": "channels",
            "env.target": float(args.sparsity), "env.alpha": float(alpha), "env.beta": float(beta)}
    over.update(parse_overrides(args.overrides))
    return over


def plot(cells: Dict[tuple, List[Dict[str, Any]]], summary: List[Dict[str, Any]], alphas: List[float],
         betas: List[float], original_test: float, path: Path) -> None:
    """Heatmaps over (α, β) of reward accuracy, FLOPs and params reduction and test top-1, plus scatters of
    reward accuracy and of test top-1 after fine-tune vs FLOPs reduction of every run (color α, marker β)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward_accuracy", "val acc before FT (reward)"), ("flops_reduction", "FLOPs reduction"),
            ("params_reduction", "params reduction"), ("test_after_ft", "test top-1 after FT")]
    by_cell = {(r["alpha"], r["beta"]): r for r in summary}
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    for ax, (key, label) in zip(axes.flat, keys):
        grid = np.full((len(alphas), len(betas)), np.nan)
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                if (a, b) in by_cell:
                    grid[i, j] = by_cell[(a, b)][key]["mean"]
        im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
        mid = np.nanmean(grid)
        for i in range(len(alphas)):
            for j in range(len(betas)):
                if not np.isnan(grid[i, j]):  # dark text on the bright half of viridis
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=9,
                            color="k" if grid[i, j] >= mid else "w")
        ax.set_xticks(range(len(betas)))
        ax.set_xticklabels([f"{b:g}" for b in betas])
        ax.set_yticks(range(len(alphas)))
        ax.set_yticklabels([f"{a:g}" for a in alphas])
        ax.set_xlabel("β (params weight)")
        ax.set_ylabel("α (FLOPs weight)")
        ax.set_title(label)
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes.flat[4]
    cmap = plt.get_cmap("plasma")
    markers = "osD^v<>"
    for (a, b), runs in cells.items():
        color = cmap(alphas.index(a) / max(1, len(alphas) - 1) * 0.85)
        marker = markers[betas.index(b) % len(markers)]
        for m in runs:
            ax.scatter(m["flops_reduction"], m["reward_accuracy"], color=color, marker=marker, s=50,
                       label=f"α={a:g}, β={b:g}" if m is runs[0] else None)
    ax.set_xlabel("FLOPs reduction")
    ax.set_ylabel("val acc before FT (reward accuracy)")
    ax.set_title("per run: color = α, marker = β")
    ax.legend(fontsize=7)
    ax = axes.flat[5]
    for (a, b), runs in cells.items():
        color = cmap(alphas.index(a) / max(1, len(alphas) - 1) * 0.85)
        marker = markers[betas.index(b) % len(markers)]
        for m in runs:
            ax.scatter(m["flops_reduction"], m["pruned"]["test_top1"], color=color, marker=marker, s=50)
    ax.axhline(original_test, color="k", ls="--", lw=1, label=f"original ({original_test:.3f})")
    ax.set_xlabel("FLOPs reduction")
    ax.set_ylabel("test top-1 after FT")
    ax.set_title("per run: color = α, marker = β")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(args: argparse.Namespace, seeds: List[int], wall_s: float) -> Path:
    """Gather the finished grid units and write ablate_reward.md|json|png."""
    out_dir, results = Path(args.out_dir), Path(args.results)
    cells: Dict[tuple, List[Dict[str, Any]]] = {}
    failures: Dict[str, str] = {}
    missing: List[str] = []
    for a in args.alphas:
        for b in args.betas:
            for seed in seeds:
                run_dir = out_dir / unit_name(a, b, seed)
                m = load_unit(run_dir)
                if m is not None:
                    cells.setdefault((a, b), []).append(m)
                elif unit_failure(run_dir) is not None:
                    failures[run_dir.name] = unit_failure(run_dir)
                else:
                    missing.append(run_dir.name)
    if not cells:
        print("no finished units yet: nothing to report", file=sys.stderr)
        return results / "ablate_reward.md"
    same = identical_outcomes(cells)
    summary = []
    for (a, b), runs in cells.items():
        row: Dict[str, Any] = {"alpha": a, "beta": b, "seeds": [m["seed"] for m in runs]}
        for key, _, get in METRICS:
            row[key] = mean_std([get(m) for m in runs])
        summary.append(row)
    ref = next(iter(cells.values()))[0]
    cfg = load_config(args.config, ablation_overrides(args, args.alphas[0], args.betas[0]))
    ft = asdict(cfg.finetune)
    ft_text = ("none (finetune.epochs=0): test top-1 after FT equals before FT" if ft["epochs"] == 0 else
               f"the comparison's KD fine-tune ({', '.join(f'{k} {v}' for k, v in ft.items())})")
    meta = {"config": str(args.config), "alphas": args.alphas, "betas": args.betas, "seeds": seeds,
            "sparsity": args.sparsity, "overrides": args.overrides, "finetune": ft_text,
            "rl_pruner": cfg.agents.get("rl_pruner", {}), "env": dict(cfg.env),
            "threads": args.threads, "torch": torch.__version__, "device": ref["device"],
            "original_test_top1": ref["original"]["test_top1"],
            "units_wall_s": float(sum(m["seconds"]["total"] for runs in cells.values() for m in runs)),
            "n_units": sum(len(runs) for runs in cells.values()),
            "wall_s": wall_s,
            "command": "python benchmarks/ablate_reward.py "
                       + " ".join(a for a in sys.argv[1:] if a != "--report-only")}
    per_run = [{k: v for k, v in m.items() if not k.startswith("_") and k not in ("group_names", "actions")}
               for runs in cells.values() for m in runs]
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"meta": meta, "summary": summary, "identical_outcomes": same,
                                  "failures": failures, "missing": missing, "runs": per_run},
                                 indent=2, default=float), results / "ablate_reward.json")
    plot(cells, summary, list(args.alphas), list(args.betas), meta["original_test_top1"],
         results / "ablate_reward.png")
    atomic_write_text(render_markdown(meta, summary, same, failures, missing), results / "ablate_reward.md")
    return results / "ablate_reward.md"


def identical_outcomes(cells: Dict[tuple, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Groups of (α, β) cells whose run with the same seed ended with exactly the same pruned architecture
    (the weights changed no choice of the search)."""
    groups: Dict[tuple, List[str]] = {}
    for (a, b), runs in cells.items():
        for m in runs:
            groups.setdefault((m["seed"], tuple(m["kept_channels"])), []).append(f"α={a:g} β={b:g}")
    return sorted(({"seed": seed, "cells": names} for (seed, _), names in groups.items() if len(names) > 1),
                  key=lambda g: g["seed"])


def trend(summary: List[Dict[str, Any]], weight: str, key: str) -> str:
    """How ``key`` moves from the smallest to the largest ``weight`` (α or β), averaged over the other weight."""
    values = sorted({r[weight] for r in summary})
    if len(values) < 2:
        return ""
    lo = [r[key]["mean"] for r in summary if r[weight] == values[0]]
    hi = [r[key]["mean"] for r in summary if r[weight] == values[-1]]
    return f"{np.mean(lo):.4f} → {np.mean(hi):.4f}"


def render_markdown(meta: Dict[str, Any], summary: List[Dict[str, Any]], same: List[Dict[str, Any]],
                    failures: Dict[str, str], missing: List[str]) -> str:
    env = meta["env"]
    lines = ["# RL-Pruner reward ablation: α (FLOPs) and β (params) weights", "",
             f"Task: {env.get('model')} width {env.get('width')} pretrained on `{env.get('dataset')}` "
             f"(checkpoint `{env.get('checkpoint')}`), original test top-1 {meta['original_test_top1']:.4f}. "
             f"Every unit prunes to **{meta['sparsity']:.0%} channel sparsity** (`target_metric=channels`, "
             f"channel budget, `action_mode=distribution`, {env.get('n_steps')} steps, the authors' setting), so "
             f"FLOPs and params reductions are decided by the learned pruning distribution; reward = accuracy "
             f"on {env.get('reward_samples')} validation images + α · FLOPs reduction + β · params reduction. "
             f"RL-Pruner settings {meta['rl_pruner']}; seeds {meta['seeds']}. "
             f"Fine-tune: {meta['finetune']}. Device {meta['device']}, {meta['threads']} torch threads, "
             f"torch {meta['torch']}.", "",
             "| α | β | seeds | " + " | ".join(label for _, label, _ in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    digits = {"n_evaluations": 0, "total_s": 0}
    for r in sorted(summary, key=lambda r: (r["alpha"], r["beta"])):
        cells = [fmt(r[key], digits.get(key, 4)) for key, _, _ in METRICS]
        lines.append(f"| {r['alpha']:g} | {r['beta']:g} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "The reward accuracy is measured on "
              f"{env.get('reward_samples')} images (steps of {1 / max(1, int(env.get('reward_samples') or 1)):.3f}); "
              "a β (or α) that moves the compression by less than that per candidate cannot change the ranking.",
              "", "Trends (mean over the other weight, smallest → largest weight):", ""]
    for weight, name in (("alpha", "α"), ("beta", "β")):
        parts = [f"{label} {trend(summary, weight, key)}" for key, label in
                 (("flops_reduction", "FLOPs reduction"), ("params_reduction", "params reduction"),
                  ("reward_accuracy", "reward accuracy"), ("test_after_ft", "test top-1 after FT"))
                 if trend(summary, weight, key)]
        if parts:
            lines.append(f"- {name}: " + "; ".join(parts) + ".")
    lines.append("")
    if same:
        lines += ["Cells whose run (same seed) ended with exactly the same pruned architecture, i.e. the weight "
                  "that differs between them changed no decision of the search:", ""]
        lines += [f"- seed {g['seed']}: {', '.join(g['cells'])}" for g in same]
        lines.append("")
    lines += failures_section(failures, missing, "the JSON")
    lines += ["![reward ablation](ablate_reward.png)", "",
              f"Wall time: {meta['units_wall_s'] / 60:.1f} min summed over the {meta['n_units']} finished units "
              f"(each unit's `seconds.total`).", "", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    if not 0.0 < args.sparsity < 1.0:
        print(f"error: --sparsity must be in (0, 1), got {args.sparsity}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    t0 = time.time()
    if not args.report_only:
        from tqdm.auto import tqdm

        units = [(a, b, s) for s in seeds for a in args.alphas for b in args.betas]
        bar = tqdm(units, desc="ablate", unit="run", dynamic_ncols=True)
        for a, b, seed in bar:
            name = unit_name(a, b, seed)
            bar.set_postfix(unit=name)
            cfg = unit_config(args.config, "rl_pruner", seed, load_config(args.config).budget or 300,
                              {**ablation_overrides(args, a, b), "name": name})
            status = run_unit(cfg, "rl_pruner", Path(args.out_dir) / name)
            if status["status"] != "skipped":
                write_report(args, seeds, time.time() - t0)
    path = write_report(args, seeds, time.time() - t0)
    print(f"wrote {path} (.json, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
