"""The sensitivity agent (Li et al. 2017, ``agents/sensitivity.py``) beside uniform pruning on the CPU benchmark task,
from finished run folders: per seed the evaluations, the search's reward, test top-1 (as cut with BN re-estimated,
and after the run's fine-tune), then the seed-0 sensitivity curves and allocation.

The runs (one unit each, resumable: a finished folder is skipped by the loop):

    for seed in 0 1 2; do for agent in uniform sensitivity; do
      python train_agent.py --config configs/bench_cpu_vgg19w025_npz.yaml --agent $agent \\
          --name bench_${agent}_t0875_s$seed env.target=0.875 budget=150 seed=$seed; done
      python train_agent.py --config configs/bench_cpu_vgg19w025_npz.yaml --agent sensitivity \\
          --name bench_sensitivity-threshold_t0875_s$seed env.target=0.875 budget=150 seed=$seed \\
          agents.sensitivity.allocation=threshold; done
    python benchmarks/sensitivity_report.py runs/bench_*_t0875_s*

writes ``benchmarks/results/sensitivity_vgg19w025_t0875.md`` and ``.json`` (``t05`` for the runs at target 0.5,
made by the same loop with ``env.target=0.5`` and names ``*_t05_*``, without the threshold rule).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pruning_env.runtime import atomic_write_text, machine_info  # noqa: E402
from rl_prune.run_folder import RunFolder  # noqa: E402

def command(target: float, threshold: bool) -> str:
    """The loop that made the runs of ``target`` (with the threshold-rule runs when there are some)."""
    tag = f"t{target:g}".replace(".", "")
    run = ("python train_agent.py --config configs/bench_cpu_vgg19w025_npz.yaml --agent {agent} --name "
           "bench_{name}_" + tag + "_s$seed env.target=" + f"{target:g}" + " budget=150 seed=$seed")
    loop = ("for seed in 0 1 2; do for agent in uniform sensitivity; do "
            + run.format(agent="$agent", name="${agent}") + "; done")
    if threshold:
        loop += ("; " + run.format(agent="sensitivity", name="sensitivity-threshold")
                 + " agents.sensitivity.allocation=threshold")
    return loop + "; done"


def row(folder: RunFolder) -> Dict[str, Any]:
    m = folder.read_metrics()
    allocation = ((folder.read_config().get("agents") or {}).get("sensitivity") or {}).get("allocation", "greedy")
    agent = m["agent"] if m["agent"] != "sensitivity" else f"sensitivity ({allocation})"
    out = {"run": str(folder.path), "agent": agent, "seed": m["seed"], "target": m["target"],
           "n_evaluations": m["n_evaluations"], "budget": m["budget"], "flops_reduction": m["flops_reduction"],
           "reward": m["best_reward"], "test_bn_reestimated": (m.get("pruned_bn_reestimated") or {}).get("test_top1"),
           "test_finetuned": m["pruned"]["test_top1"], "original_test": m["original"]["test_top1"],
           "finetune_epochs": m["finetune"]["config"]["epochs"], "kept_channels": m["kept_channels"],
           "group_names": m["group_names"], "original_channels": m["original_channels"],
           "search_seconds": m["seconds"]["search"]}
    if m["agent"] == "sensitivity" and folder.has_checkpoint:  # the curves and the allocation
        extra = folder.read_checkpoint().agent_state["agent"]["extra"]
        out["analysis"] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in extra.items()}
    return out


def spread(values: List[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f} (1 seed)" if values else "-"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} ({len(values)} seeds)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished run folders")
    p.add_argument("--out", default=None,
                   help="output stem (default benchmarks/results/sensitivity_vgg19w025_tTARGET)")
    args = p.parse_args(argv)
    rows = sorted((row(RunFolder(r)) for r in args.runs if RunFolder(r).is_finished),
                  key=lambda r: (r["agent"], r["seed"]))
    targets = sorted({r["target"] for r in rows})
    if len(targets) != 1:
        p.error(f"the runs must share one target, got {targets or 'no finished run'}")
    target = targets[0]
    cmd = command(target, any("threshold" in r["agent"] for r in rows))
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"sensitivity_vgg19w025_t{target:g}".replace(".", ""))
    lines = [f"# Sensitivity analysis (Li et al. 2017) vs uniform, VGG-19 w0.25, {100 * target:g} % fewer FLOPs", "",
             f"Command: `{cmd}`, then `python benchmarks/sensitivity_report.py {' '.join(args.runs)}`.", "",
             f"Machine: {machine_info().get('cpu')}, 2 cores shared with other jobs (wall times are not comparable).",
             "", "Task: `configs/bench_cpu_vgg19w025_npz.yaml` (5k CIFAR-10 images, `adaptive_bn` reward on 250 "
             f"validation images, distribution mode, 3 steps, `min_channels: 4`), target {target:g}, budget 150, the "
             "config's 1-epoch KD fine-tune. Test split: 1,034 images; chance is 0.10 (10 classes); the unpruned model "
             f"scores {rows[0]['original_test']:.4f}.", "",
             "| agent | seed | evaluations | FLOPs −% | search reward | test, BN re-estimated "
             "| test, after fine-tune |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['agent']} | {r['seed']} | {r['n_evaluations']} of {r['budget']} | "
                     f"{100 * r['flops_reduction']:.1f} | {r['reward']:.4f} | {r['test_bn_reestimated']:.4f} | "
                     f"{r['test_finetuned']:.4f} |")
    lines += ["", "| agent | search reward | test after fine-tune (mean ± std over seeds) |", "|---|---|---|"]
    for agent in sorted({r["agent"] for r in rows}):
        rs = [r for r in rows if r["agent"] == agent]
        lines.append(f"| {agent} | {spread([r['reward'] for r in rs])} | {spread([r['test_finetuned'] for r in rs])} |")
    base = [r["test_finetuned"] for r in rows if r["agent"] == "uniform"]
    if len(base) >= 2:
        lines += ["", "Verdict (test top-1 after the fine-tune, against uniform, in pooled seed std):"]
        for agent in sorted({r["agent"] for r in rows} - {"uniform"}):
            xs = [r["test_finetuned"] for r in rows if r["agent"] == agent]
            if len(xs) < 2:
                continue
            diff = statistics.mean(xs) - statistics.mean(base)
            pooled = ((statistics.variance(xs) + statistics.variance(base)) / 2) ** 0.5
            where = "within one pooled std" if abs(diff) <= pooled else "more than one pooled std"
            lines.append(f"- {agent}: {diff:+.4f} ({diff / pooled:+.2f} pooled std {pooled:.4f}): {where} of uniform "
                         f"({len(xs)} and {len(base)} seeds).")
    firsts = {}
    for r in rows:
        if "analysis" in r:
            firsts.setdefault(r["agent"], r)  # the first seed of each allocation
    for r in firsts.values():
        a = r["analysis"]
        rule = (f"drop threshold {a['threshold']:.3f}" if a.get("threshold") is not None else
                "greedy: least drop per unit of FLOPs saved")
        lines += ["", f"{r['agent']}, seed {r['seed']}: the sensitivity curves (reward accuracy with one group pruned "
                      f"alone; unpruned {a['base_accuracy']:.3f}) and the allocation ({rule}; allocated reduction "
                      f"{a['reduction']:.4f} for the goal {a['goal']}, which the env then scales to each step's goal):",
                  "", "| group | channels | " + " | ".join(f"{x:g}" for x in a["ratios"])
                  + " | allocated sparsity | kept |", "|---|---|" + "---|" * len(a["ratios"]) + "---|---|"]
        for g, name in enumerate(r["group_names"]):
            lines.append(f"| {name} | {r['original_channels'][g]} | "
                         + " | ".join(f"{x:.3f}" for x in a["accuracy"][g])
                         + f" | {a['sparsity'][g]:.3f} | {r['kept_channels'][g]} |")
    atomic_write_text("\n".join(lines) + "\n", out.with_suffix(".md"))
    atomic_write_text(json.dumps({"command": cmd, "machine": machine_info(), "runs": rows}, indent=2),
                      out.with_suffix(".json"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
