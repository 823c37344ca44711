"""AgentViT benchmark: the same ViT trained with all patches, the faithful agent, the double-DQN agent and
random masks at the same kept count (same epochs and seeds); table of accuracy, training time and GFLOPs.

    python benchmarks/agentvit.py                       # CPU-sized run on ../shared/data/cifar10_5k.npz
    python benchmarks/agentvit.py --device cuda --width 1 --depth 6 --epochs 20 --seeds 0 1 2 --tag gpu
Writes benchmarks/results/agentvit{_TAG}.md|json|png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from pruning_env.runtime import atomic_write_text
from rl_prune.vit_run import run_training

ROOT = Path(__file__).resolve().parents[1]

POLICY_LABELS = {"full": "all patches (plain ViT)", "faithful": "faithful agent (notebook)",
                 "double_dqn": "double-DQN agent (top-k)", "random": "random masks (top-k)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10_5k.npz"),
                   help="dataset: an npz path, cifar10, or digits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--policies", nargs="+", default=["full", "faithful", "double_dqn", "random"],
                   choices=list(POLICY_LABELS))
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-keep", type=int, default=30, help="target kept patches k* (of 64)")
    p.add_argument("--reward-every", type=int, default=2, help="reward / agent-update period in batches")
    p.add_argument("--eps-fraction", type=float, default=1 / 3,
                   help="exploration time constant as a fraction of the run's steps")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the table/json/png")
    p.add_argument("--tag", default="", help="suffix of the result files (agentvit_TAG.*)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the training split")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--render", metavar="JSON", help="only rewrite the md/png of an earlier run from its json")
    return p


def _mean_std(values: Sequence[float]) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return "-"
    return f"{v.mean():.4f}" if v.size == 1 else f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"


def _fmt(values: Sequence[float], digits: int = 1) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.{digits}f}" if v.size == 1 else f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def make_table(runs: List[Dict[str, Any]], policies: Sequence[str]) -> str:
    """Markdown table aggregated over seeds (mean ± sample std)."""
    full_time = np.mean([r["train_time_s"] for r in runs if r["policy"] == "full"]) if any(
        r["policy"] == "full" for r in runs) else None
    head = ("| training policy | test top-1, all patches | test top-1, agent masks | test top-1, random masks "
            "(same k) | eval k | kept in training | train time (s) | saving vs full | fwd GFLOPs/img (train) "
            "| + state GFLOPs/img | img/s all / k |")
    lines = [head, "|" + "---|" * 11]
    for p in policies:
        rs = [r for r in runs if r["policy"] == p]
        if not rs:
            continue
        t = [r["train_time_s"] for r in rs]
        saving = f"{100 * (1 - np.mean(t) / full_time):.1f} %" if full_time and p != "full" else "-"
        agent = _mean_std([r["test"]["agent"]["top1"] for r in rs]) if "agent" in rs[0]["test"] else "-"
        ips = "-"
        if "images_per_s_all" in rs[0]:
            ips = (f"{np.mean([r['images_per_s_all'] for r in rs]):.0f} / "
                   f"{np.mean([r['images_per_s_kept'] for r in rs]):.0f}")
        lines.append(
            f"| {POLICY_LABELS[p]} | {_mean_std([r['test']['all']['top1'] for r in rs])} | {agent} | "
            f"{_mean_std([r['test']['random']['top1'] for r in rs])} | {_fmt([r['eval_kept'] for r in rs])} | "
            f"{_fmt([r['train_mean_kept'] for r in rs])} | {_fmt(t)} | {saving} | "
            f"{np.mean([r['train_gflops_per_image'] for r in rs]):.4f} | "
            f"{np.mean([r['state_gflops_per_image'] for r in rs]):.4f} | {ips} |")
    return "\n".join(lines)


def make_plot(runs: List[Dict[str, Any]], policies: Sequence[str], path: Path) -> None:
    """Validation accuracy per epoch (all patches) and training time per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for p in policies:
        rs = [r for r in runs if r["policy"] == p and r["history"]]
        if not rs:
            continue
        acc = np.mean([[h["val_top1"] for h in r["history"]] for r in rs], axis=0)
        ax1.plot(np.arange(1, len(acc) + 1), acc, marker="o", label=POLICY_LABELS[p])
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("validation top-1 (all patches)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    present = [p for p in policies if any(r["policy"] == p for r in runs)]
    times = [np.mean([r["train_time_s"] for r in runs if r["policy"] == p]) for p in present]
    ax2.bar(range(len(present)), times, color="tab:gray")
    ax2.set_xticks(range(len(present)), [POLICY_LABELS[p].split(" (")[0] for p in present], rotation=15, fontsize=8)
    ax2.set_ylabel("training wall time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        path = Path(args.render)
        payload = json.loads(path.read_text())
        if "step_times_s" not in payload:
            raise ValueError(f"{path} holds no step times; rerun the benchmark")
        render(payload, path.parent, path.stem)
        return 0
    dataset = args.data if args.data in ("cifar10", "digits") or args.data.startswith("npz:") else f"npz:{args.data}"
    runs: List[Dict[str, Any]] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "agentvit" + (f"_{args.tag}" if args.tag else "")
    t_start = time.perf_counter()
    steps = args.epochs * _batches_per_epoch(dataset, args.batch_size)
    # timed first, so that an interrupted benchmark still has them in its partial json
    step_times = interleaved_step_times(dataset, args)
    command = f"python benchmarks/agentvit.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    for seed in args.seeds:
        for policy in args.policies:
            env = {"dataset": dataset, "width": args.width, "depth": args.depth, "batch_size": args.batch_size,
                   "epochs": args.epochs, "n_keep": args.n_keep, "reward_every": args.reward_every,
                   "val_size": 0.1, "num_workers": args.num_workers}
            agent: Dict[str, Any] = {}
            if policy in ("faithful", "double_dqn"):
                # the notebook's schedule (20,000 batches) would keep epsilon ~1 in a short run: scale it to
                # the run; and let epoch 1 feed the replay, since there are only a few epochs
                agent = {"exploration_decay": max(1.0, args.eps_fraction * steps), "skip_first_epoch": False}
            config = {"policy": policy, "seed": seed, "device": args.device, "out": None,
                      "progress": not args.no_progress, "env": env, "agent": agent}
            print(f"[agentvit] seed {seed} policy {policy} ...", flush=True)
            result = run_training(config)
            result.pop("config", None)
            runs.append(result)
            test = result["test"]
            print(f"[agentvit]   test all {test['all']['top1']:.4f} random {test['random']['top1']:.4f}"
                  + (f" agent {result['test']['agent']['top1']:.4f}" if "agent" in result["test"] else "")
                  + f" train {result['train_time_s']:.1f}s kept {result['train_mean_kept']:.1f}", flush=True)
            # partial results survive an interrupted benchmark
            atomic_write_text(json.dumps({"settings": vars(args), "command": command, "partial": True,
                                          "wall_time_s": time.perf_counter() - t_start, "step_times_s": step_times,
                                          "runs": runs}, indent=2, default=str), out / f"{stem}.json")
    total = time.perf_counter() - t_start
    payload = {"settings": vars(args), "command": command, "wall_time_s": total, "step_times_s": step_times,
               "runs": runs}
    atomic_write_text(json.dumps(payload, indent=2, default=str), out / f"{stem}.json")
    render(payload, out, stem)
    return 0


def paired_lines(runs: List[Dict[str, Any]], policies: Sequence[str]) -> List[str]:
    """Agent masks minus random masks at the same k on the same trained ViT, per seed (paired)."""
    lines = []
    for p in policies:
        rs = [r for r in runs if r["policy"] == p and "agent" in r["test"]]
        if not rs:
            continue
        diff = np.array([r["test"]["agent"]["top1"] - r["test"]["random"]["top1"] for r in rs])
        spread = f" ± {diff.std(ddof=1) * 100:.2f}" if diff.size > 1 else ""
        lines.append(f"- {POLICY_LABELS[p]}: agent − random masks at the same k = {diff.mean() * 100:+.2f}{spread} "
                     f"points (agent better in {int((diff > 0).sum())} of {diff.size} seeds)")
    return lines


def render(payload: Dict[str, Any], out: Path, stem: str) -> None:
    """Write ``stem``.md and ``stem``.png from a benchmark payload (also used by ``--render``)."""
    args = argparse.Namespace(**payload["settings"])
    runs, times = payload["runs"], payload["step_times_s"]
    first = runs[0]
    settings = (f"dataset `{first['dataset'].replace(str(ROOT.parent) + '/', '../')}`, model `{first['model']}`, "
                f"{args.epochs} epochs, batch {args.batch_size}, k* = {args.n_keep} of {first['n_patches']}, "
                f"reward every {args.reward_every} batches, seeds {args.seeds}, device {first['device']}, "
                f"benchmark wall time {payload['wall_time_s'] / 60:.1f} min")
    if payload.get("partial"):
        settings += (f". **Partial: interrupted after {len(runs)} of {len(args.seeds) * len(args.policies)} runs** "
                     f"(seeds {sorted({r['seed'] for r in runs})})")
    full = times["all 64 tokens"]
    step_rows = ["| training step | median ms | saving vs all tokens |", "|---|---|---|"]
    step_rows += [f"| {name} | {1000 * t:.1f} | {100 * (1 - t / full):.1f} % |" for name, t in times.items()]
    md = [f"# AgentViT benchmark{(' (' + args.tag + ')') if args.tag else ''}", "", settings, "",
          make_table(runs, args.policies), "",
          "Paired test-time comparison (same trained ViT, same test batches):", "",
          *paired_lines(runs, args.policies), "",
          "Per-step cost measured interleaved (median of 20 rounds; the joint-loop times above are taken one "
          "run after another and move with the machine's load):", "", *step_rows, "",
          "Test top-1 on the held-out test split (the validation split, held out from train, is only used for the "
          "per-epoch curve). \"agent masks\": greedy agent, one mask per test batch of 128 (batch-mean state); "
          "\"random masks (same k)\": uniformly random k-subsets per batch with k = the agent's mean kept count "
          "(k* for the baselines). Train time: synchronised wall time of the joint loop (ViT steps, state "
          "passes, agent updates, data loading), validation excluded. GFLOPs analytic (2 x MACs, "
          "`pruning_env.costs.vit_macs`, checked against FlopCounterMode in tests); the state pass runs "
          "once per batch (twice on reward steps for the faithful agent).",
          "", f"Command: `{payload.get('command', 'python benchmarks/agentvit.py')}`"]
    atomic_write_text("\n".join(md) + "\n", out / f"{stem}.md")
    make_plot(runs, args.policies, out / f"{stem}.png")
    sys.stdout.write("\n".join(md) + "\n")


def interleaved_step_times(dataset: str, args) -> Dict[str, float]:
    """Median time of one training step with all tokens, with k* tokens, and with k* tokens plus the agent's
    state pass (1, and 2 as on the faithful agent's reward steps), timed in turn on the benchmark's ViT."""
    import torch

    from agents.vit_ddqn.evaluation import time_train_steps
    from pruning_env.models import create_model

    from pruning_env.data import make_datasets

    splits = make_datasets(dataset, val_size=0.1, seed=0, augment=False)
    c, h, _ = splits.input_size
    model = create_model("vit_tiny_patch4", num_classes=splits.num_classes, width=args.width, depth=args.depth,
                         image_size=h, channels=c)
    k = args.n_keep
    settings = {"all 64 tokens": (64, 0), f"{k} tokens (random masks)": (k, 0),
                f"{k} tokens + 1 state pass (agent)": (k, 1),
                f"{k} tokens + 2 state passes (faithful reward step)": (k, 2)}
    times = time_train_steps(model, settings, batch_size=args.batch_size, device=torch.device(args.device),
                             repeats=20, warmup=3)
    return times


def _batches_per_epoch(dataset: str, batch_size: int) -> int:
    """Training batches per epoch (drop_last) of ``dataset`` with the benchmark's split (val 10 %)."""
    from pruning_env.data import make_datasets

    splits = make_datasets(dataset, val_size=0.1, seed=0, augment=False)
    return max(1, len(splits.train) // batch_size)


if __name__ == "__main__":
    raise SystemExit(main())
