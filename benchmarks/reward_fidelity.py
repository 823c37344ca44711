"""Reward fidelity: how well each reward estimator ranks random budgeted candidates by their test top-1 after
one fixed knowledge-distillation fine-tune (Spearman rho, bootstrap spread, cost relative to a vanilla reward).

    python benchmarks/reward_fidelity.py                       # the CPU benchmark model, 30 candidates a target
    python benchmarks/reward_fidelity.py --candidates 4 --finetune-epochs 1 --tag smoke
Candidates are built with the engine (Pruner plan/apply): per-group sparsities ``min(lambda * u_g, max_sparsity)``
with ``u_g ~ U(0, 1)`` and ``lambda`` bisected to the FLOPs-reduction target. Finished candidates are cached in
``--cache`` (JSON), so an interrupted run resumes. Writes benchmarks/results/reward_fidelity{_TAG}.md|json|png.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pruning_env.checkpoint import load_model, read_meta
from pruning_env.data import make_datasets, preload
from pruning_env.envs.budget import bisect_increasing
from pruning_env.envs.reward import make_estimator
from pruning_env.pruning import Pruner
from pruning_env.runtime import atomic_write_text, seed_everything
from pruning_env.training import evaluate, finetune

ROOT = Path(__file__).resolve().parents[1]

#: estimator label -> (registered name, options); vanilla is first: every cost is a ratio to it
ESTIMATORS = {
    "vanilla": ("vanilla", {}),
    "adaptive_bn": ("adaptive_bn", {"n_images": 256, "bn_batch_size": 64}),
    "short_kd": ("short_kd", {"n_batches": 10, "lr": 0.01, "train_batch_size": 64}),
    "teacher_agreement_top1": ("teacher_agreement", {"metric": "top1"}),
    "teacher_agreement_kl": ("teacher_agreement", {"metric": "kl"}),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/vgg19_w0.25_cifar10_5k.pt",
                   help="pretrained zoo checkpoint (its meta gives the dataset, split seed and val size); relative "
                        "paths, also the dataset path in its meta, are read from the working directory (run "
                        "from the repository root)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7], help="FLOPs reductions")
    p.add_argument("--candidates", type=int, default=30, help="random candidates per target")
    p.add_argument("--max-sparsity", type=float, default=0.9, help="per-group cap on the removed fraction")
    p.add_argument("--reward-samples", type=int, default=250, help="validation images each estimator sees")
    p.add_argument("--calibration", type=int, default=100, help="training images of the Taylor importance")
    p.add_argument("--finetune-epochs", type=int, default=5, help="the fixed KD fine-tune of every candidate")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples of the candidates for rho's spread")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the shared box has 2 cores)")
    p.add_argument("--finetune-device", default="cpu",
                   help="where the fine-tune runs (the estimators always run on the CPU, so costs compare)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="only fill the cache with candidates i where i %% N == K (parallel workers; no summary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="/work/scratch_recipe/reward_fidelity_cache.json",
                   help="JSON of finished candidates (resume); settings must match")
    p.add_argument("--summary-only", action="store_true",
                   help="summarize the cached candidates without computing missing ones")
    p.add_argument("--note", default="", help="a paragraph for the markdown (e.g. how the cache was filled)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p


def random_sparsity(pruner: Pruner, target: float, rng: np.random.Generator, cap: float) -> np.ndarray:
    """Per-group sparsities ``min(lambda * u, cap)`` whose plan removes ``target`` of the MACs.

    :param pruner: the Pruner of the unpruned model.
    :param target: FLOPs (MACs) reduction to reach.
    :param rng: source of ``u ~ U(0, 1)`` per group.
    :param cap: largest removed fraction of any group.
    """
    u = rng.uniform(0.0, 1.0, pruner.n_groups)
    full = pruner.plan_cost(sparsity=0.0).macs

    def reduction(lam: float) -> float:
        return 1.0 - pruner.plan_cost(sparsity=np.minimum(lam * u, cap)).macs / full

    lam, reached = bisect_increasing(reduction, target, 0.0, cap / max(u.min(), 1e-6), iters=40)
    if abs(reached - target) > 0.02:
        raise ValueError(f"could not reach a FLOPs reduction of {target} with max_sparsity {cap} "
                         f"(reached {reached:.3f}); raise --max-sparsity")
    return np.minimum(lam * u, cap)


def _timed(fn: Callable[[], float]) -> Tuple[float, float]:
    t0 = time.perf_counter()
    value = fn()
    return float(value), time.perf_counter() - t0


def run_candidate(pruner: Pruner, teacher: nn.Module, sparsity: np.ndarray, reward, bn_train, splits,
                  args: argparse.Namespace, seed: int, ft_teacher: nn.Module) -> Dict[str, Any]:
    """Every estimator on one candidate (CPU), then the fixed KD fine-tune (from ``ft_teacher``, on
    ``--finetune-device``) and its test top-1."""
    plan = pruner.plan(sparsity=sparsity)
    student = pruner.apply(plan).eval()
    cost = pruner.plan_cost(plan)
    row: Dict[str, Any] = {"keep": plan.num_kept.tolist(), "macs": cost.macs, "params": cost.params,
                           "estimates": {}, "seconds": {}}
    for label, (name, options) in ESTIMATORS.items():
        fn = make_estimator(name, **options)
        torch.manual_seed(seed)
        row["estimates"][label], row["seconds"][label] = _timed(lambda: fn(student, teacher, reward, bn_train))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    student = student.to(args.finetune_device)
    finetune(student, splits.train, epochs=args.finetune_epochs, lr=args.finetune_lr, teacher=ft_teacher,
             batch_size=128, device=args.finetune_device, seed=seed, progress=False)
    row["finetune_seconds"] = time.perf_counter() - t0
    row["test_top1"] = evaluate(student, splits.test)["top1"]
    row["val_top1"] = evaluate(student, splits.val)["top1"]
    return row


def _ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the tie-averaged ranks); nan if one side is constant."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def bootstrap_rho(x: Sequence[float], y: Sequence[float], n: int, seed: int) -> Dict[str, float]:
    """Spearman rho of (x, y) and its spread over ``n`` resamples of the pairs."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rho = spearman(x, y)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        idx = rng.integers(0, len(x), len(x))
        if np.ptp(x[idx]) > 0 and np.ptp(y[idx]) > 0:
            draws.append(spearman(x[idx], y[idx]))
    draws = np.asarray(draws, float)
    return {"rho": rho, "boot_mean": float(draws.mean()), "boot_std": float(draws.std()),
            "ci95_low": float(np.percentile(draws, 2.5)), "ci95_high": float(np.percentile(draws, 97.5))}


def spearman_brown(r: float, k: int = 2) -> float:
    """Reliability of the mean of ``k`` parallel measurements whose single-measurement reliability is ``r``:
    ``k r / (1 + (k - 1) r)`` (e.g. the test-retest rho of two fine-tune seeds gives the mean-of-two's)."""
    if not (-1.0 <= r <= 1.0):
        raise ValueError(f"a reliability must lie in [-1, 1], got {r}")
    if k < 1:
        raise ValueError(f"k must be a positive count of measurements, got {k}")
    denominator = 1.0 + (k - 1) * r
    return float(k * r / denominator) if denominator > 0 else float("nan")


def fidelity_vs_ceiling(estimate: Sequence[float], seed_a: Sequence[float], seed_b: Sequence[float]) -> Dict[str, float]:
    """An estimator's Spearman rho against the mean-of-two-seeds truth, against that truth's own ceiling.

    ``retest``: rho between the two seeds' truths; ``reliability``: its Spearman-Brown value for their mean;
    ``ceiling``: the highest rho any estimator can reach against a criterion of that reliability,
    ``sqrt(reliability)`` (attenuation); ``share``: ``rho / ceiling`` (nan when the truth is not reliable).
    """
    a, b = np.asarray(seed_a, float), np.asarray(seed_b, float)
    if not (len(estimate) == len(a) == len(b)):
        raise ValueError(f"estimate, seed_a and seed_b need one value per candidate, got lengths "
                         f"{len(estimate)}, {len(a)}, {len(b)}")
    retest = spearman(a, b)
    rel = spearman_brown(retest) if np.isfinite(retest) else float("nan")
    ceiling = float(np.sqrt(rel)) if np.isfinite(rel) and rel > 0 else float("nan")
    rho = spearman(estimate, (a + b) / 2.0)
    return {"rho": rho, "retest": retest, "reliability": rel, "ceiling": ceiling,
            "share": rho / ceiling if np.isfinite(ceiling) else float("nan"),
            "distinct": int(len(np.unique(np.asarray(estimate, float))))}


def bootstrap_fidelity(estimate: Sequence[float], seed_a: Sequence[float], seed_b: Sequence[float], n: int,
                       seed: int) -> Dict[str, Any]:
    """:func:`fidelity_vs_ceiling` and the spread of each of its numbers over ``n`` resamples of the candidates
    (fixed ``seed``; resamples where a quantity is undefined are left out of that quantity)."""
    e, a, b = (np.asarray(v, float) for v in (estimate, seed_a, seed_b))
    point = fidelity_vs_ceiling(e, a, b)
    rng = np.random.default_rng(seed)
    draws: Dict[str, list] = {k: [] for k in ("rho", "retest", "ceiling", "share")}
    for _ in range(n):
        idx = rng.integers(0, len(e), len(e))
        d = fidelity_vs_ceiling(e[idx], a[idx], b[idx])
        for k in draws:
            if np.isfinite(d[k]):
                draws[k].append(d[k])
    out: Dict[str, Any] = dict(point)
    for k, v in draws.items():
        v = np.asarray(v, float)
        out[f"{k}_std"] = float(v.std()) if len(v) else float("nan")
        out[f"{k}_ci95"] = ([float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v)
                            else [float("nan"), float("nan")])
    return out


def summarize(rows: Dict[str, Dict[str, Any]], targets: Sequence[float], n_boot: int, seed: int) -> Dict[str, Any]:
    """rho, its bootstrap spread and the cost ratio of every estimator, per target and pooled."""
    out: Dict[str, Any] = {}
    groups = {f"{t:g}": [r for r in rows.values() if r["target"] == t] for t in targets}
    for key, rs in groups.items():
        if len(rs) < 3:
            continue
        test = [r["test_top1"] for r in rs]
        vanilla_s = np.median([r["seconds"]["vanilla"] for r in rs])
        out[key] = {"n": len(rs), "test_top1_mean": float(np.mean(test)), "test_top1_std": float(np.std(test)),
                    "finetune_seconds_median": float(np.median([r["finetune_seconds"] for r in rs])),
                    "vanilla_seconds_median": float(vanilla_s), "estimators": {}}
        for label in ESTIMATORS:
            est = [r["estimates"][label] for r in rs]
            stats = bootstrap_rho(est, test, n_boot, seed)
            stats["cost_ratio"] = float(np.median([r["seconds"][label] for r in rs]) / vanilla_s)
            stats["mean"] = float(np.mean(est))
            out[key]["estimators"][label] = stats
    return out


def write_markdown(path: Path, summary: Dict[str, Any], settings: Dict[str, Any], command: str,
                   base: Dict[str, Any]) -> None:
    lines = ["# Reward fidelity: which accuracy estimate predicts fine-tuned accuracy?", "",
             f"Command: `{command}`", "",
             f"Base model: `{settings['checkpoint']}` (val top-1 {base['val_top1']:.3f}, test top-1 "
             f"{base['test_top1']:.3f}). Candidates: random budgeted per-group sparsities (cap "
             f"{settings['max_sparsity']}), Taylor order from {settings['calibration']} training images. "
             f"Estimators see {settings['reward_samples']} validation images; BN statistics and KD batches "
             f"come from training images only. Ground truth: test top-1 (all test images) after "
             f"{settings['finetune_epochs']} epochs of KD fine-tune (lr {settings['finetune_lr']}, batch 128, "
             f"teacher = base model). rho: Spearman; spread: {settings['bootstrap']} bootstrap resamples of "
             f"the candidates; cost: median seconds per candidate / median seconds of a vanilla evaluation.", ""]
    for key, s in summary.items():
        lines += [f"## FLOPs reduction {float(key):.0%} ({s['n']} candidates)", "",
                  f"Fine-tuned test top-1 {s['test_top1_mean']:.3f} ± {s['test_top1_std']:.3f} across candidates; "
                  f"fine-tune {s['finetune_seconds_median']:.1f} s, vanilla evaluation "
                  f"{s['vanilla_seconds_median']:.2f} s (medians).", "",
                  "| estimator | rho | bootstrap mean ± std | 95% interval | cost (x vanilla) | mean value |",
                  "|---|---|---|---|---|---|"]
        for label, e in s["estimators"].items():
            lines.append(f"| {label} | {e['rho']:.3f} | {e['boot_mean']:.3f} ± {e['boot_std']:.3f} | "
                         f"[{e['ci95_low']:.3f}, {e['ci95_high']:.3f}] | {e['cost_ratio']:.1f} | {e['mean']:.3f} |")
        lines.append("")
    if settings["note"]:
        lines += [settings["note"], ""]
    lines += [f"Summarized on: {settings['machine']}, {settings['threads']} torch thread(s).", ""]
    atomic_write_text("\n".join(lines), path)


def write_plot(path: Path, rows: Dict[str, Dict[str, Any]], targets: Sequence[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(targets), len(ESTIMATORS), figsize=(3.2 * len(ESTIMATORS), 3.0 * len(targets)),
                             squeeze=False)
    for i, t in enumerate(targets):
        rs = [r for r in rows.values() if r["target"] == t]
        for j, label in enumerate(ESTIMATORS):
            ax = axes[i][j]
            ax.scatter([r["estimates"][label] for r in rs], [r["test_top1"] for r in rs], s=12)
            ax.set_title(f"{label}, -{t:.0%} FLOPs", fontsize=9)
            ax.set_xlabel("estimate", fontsize=8)
            if j == 0:
                ax.set_ylabel("test top-1 after KD", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_shard(text: Optional[str]) -> Tuple[int, int]:
    if text is None:
        return 0, 1
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise SystemExit(f"error: --shard must be K/N with 0 <= K < N, got {text!r}")
    return int(k), int(n)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    meta = read_meta(args.checkpoint)
    teacher = load_model(args.checkpoint).eval()
    splits = make_datasets(meta["dataset"], val_size=meta["val_size"], seed=meta["seed"])
    plain = make_datasets(meta["dataset"], val_size=meta["val_size"], seed=meta["seed"], augment=False)
    reward = preload(splits.val, n=args.reward_samples, seed=args.seed)
    bn_train = preload(plain.train, n=1024, seed=args.seed + 1)  # training images only, never val / test
    calib = preload(plain.train, n=args.calibration, seed=args.seed + 2)
    pruner = Pruner(teacher, torch.zeros(1, *splits.input_size))
    pruner.compute_importance([calib], criterion="taylor")
    base = {"val_top1": evaluate(teacher, splits.val)["top1"], "test_top1": evaluate(teacher, splits.test)["top1"]}

    settings = {k: getattr(args, k) for k in ("checkpoint", "max_sparsity", "reward_samples", "calibration",
                                              "finetune_epochs", "finetune_lr", "seed")}
    settings["estimators"] = {k: [n, o] for k, (n, o) in ESTIMATORS.items()}
    cache_path = Path(args.cache)
    rows: Dict[str, Dict[str, Any]] = {}
    if cache_path.is_file():
        cached = json.loads(cache_path.read_text())
        if cached["settings"] != json.loads(json.dumps(settings)):
            print(f"error: {cache_path} was made with other settings {cached['settings']}; pass another --cache",
                  file=sys.stderr)
            return 2
        rows = cached["rows"]
    shard, n_shards = _parse_shard(args.shard)
    todo = [(t, i) for t in args.targets for i in range(args.candidates)
            if f"{t:g}/{i}" not in rows and i % n_shards == shard and not args.summary_only]
    ft_teacher = copy.deepcopy(teacher).to(args.finetune_device)
    for t, i in tqdm(todo, desc="candidates", dynamic_ncols=True):
        seed = args.seed * 100003 + int(round(t * 1000)) * 1009 + i
        sparsity = random_sparsity(pruner, t, np.random.default_rng(seed), args.max_sparsity)
        row = run_candidate(pruner, teacher, sparsity, reward, bn_train, splits, args, seed, ft_teacher)
        row["target"] = t
        rows[f"{t:g}/{i}"] = row
        atomic_write_text(json.dumps({"settings": settings, "rows": rows}), cache_path)
    if args.shard:
        return 0

    chosen = {k: r for k, r in rows.items() if r["target"] in args.targets and int(k.split("/")[1]) < args.candidates}
    summary = summarize(chosen, args.targets, args.bootstrap, args.seed)
    settings.update(bootstrap=args.bootstrap, threads=args.threads, note=args.note,
                    machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    given = list(sys.argv[1:] if argv is None else argv)
    if "--note" in given:  # the note is printed below the tables, not inside the command
        i = given.index("--note")
        given[i + 1] = "..."
    command = shlex.join(["python", "benchmarks/reward_fidelity.py", *given])
    out = Path(args.out)
    stem = "reward_fidelity" + (f"_{args.tag}" if args.tag else "")
    atomic_write_text(json.dumps({"command": command, "settings": settings, "base": base,
                                  "summary": summary, "candidates": chosen}, indent=1), out / f"{stem}.json")
    write_markdown(out / f"{stem}.md", summary, settings, command, base)
    write_plot(out / f"{stem}.png", chosen, args.targets)
    print((out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
