"""Pruning-engine benchmark: group discovery, Taylor importance and building a pruned model, against
Torch-Pruning building the same pruned model (same kept indices) in the same run; full-width CIFAR-100 models.

    python benchmarks/bench_pruner.py                      # vgg19 + resnet56, CPU, 1 thread
    python benchmarks/bench_pruner.py --models vgg19 --repeats 3 --device cuda --tag gpu
Writes benchmarks/results/bench_pruner{_TAG}.md|json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pruning_env.costs import count_costs
from pruning_env.models import create_model
from pruning_env.pruning import Pruner
from pruning_env.runtime import atomic_write_text, sync
from pruning_env.training import evaluate

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vgg19", "resnet56"])
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10_5k.npz"),
                   help="npz with uint8 images x (N,32,32,3) for calibration/validation; random data if missing")
    p.add_argument("--calibration", type=int, default=100, help="images in the one Taylor calibration batch")
    p.add_argument("--val-images", type=int, default=1000, help="images in the validation pass")
    p.add_argument("--sparsity", type=float, default=0.5, help="mean per-group sparsity (uniform in [0, 2s])")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the shared box has 2 cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p


def _images(path: str, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if Path(path).exists():
        x = np.load(path)["x"]
        x = x[rng.choice(len(x), size=min(n, len(x)), replace=False)]
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
        return (t - 0.5) / 0.25
    return torch.from_numpy(rng.standard_normal((n, 3, 32, 32)).astype(np.float32))


def _timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple:
    """Median seconds over ``repeats`` calls (after one warm-up call) and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def _torch_pruning_build(model: nn.Module, pruner: Pruner, plan, example: torch.Tensor) -> Dict[str, Any]:
    """Torch-Pruning on a deep copy with the same removed indices; times of each phase."""
    import torch_pruning as tp

    t0 = time.perf_counter()
    clone = copy.deepcopy(model)
    t1 = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(clone, example_inputs=example)
    t2 = time.perf_counter()
    modules = dict(clone.named_modules())
    for g, kept in zip(pruner.groups, plan.kept):
        removed = np.setdiff1d(np.arange(g.num_channels), kept).tolist()
        if removed:
            layer = modules[g.members[0]]
            fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
            dg.get_pruning_group(layer, fn, idxs=removed).prune()
    t3 = time.perf_counter()
    return {"model": clone, "deepcopy": t1 - t0, "graph": t2 - t1, "prune": t3 - t2, "total": t3 - t0}


def bench_model(name: str, args: argparse.Namespace, calib: tuple, val: tuple) -> Dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = create_model(name, num_classes=args.num_classes, width=args.width).to(device).eval()
    example = torch.randn(1, 3, 32, 32, device=device)
    size = (3, 32, 32)
    r = args.repeats
    t_graph, pruner = _timed(lambda: Pruner(model, example), r, device)
    t_taylor, _ = _timed(lambda: pruner.compute_importance([calib], criterion="taylor"), r, device)
    rng = np.random.default_rng(args.seed)
    sparsity = rng.uniform(0.0, min(1.0, 2 * args.sparsity), pruner.n_groups)
    t_plan, plan = _timed(lambda: pruner.plan(sparsity=sparsity), r, device)
    t_cost, cost = _timed(lambda: pruner.plan_cost(plan), r, device)
    # ours and Torch-Pruning alternate, so that load from other processes hits both alike
    pruned = pruner.apply(plan)
    _torch_pruning_build(model, pruner, plan, example)  # warm-up
    ours, tp_runs = [], []
    for _ in range(r):
        t = time.perf_counter()
        pruned = pruner.apply(plan)
        sync(device)
        ours.append(time.perf_counter() - t)
        tp_runs.append(_torch_pruning_build(model, pruner, plan, example))
    t_apply = statistics.median(ours)
    tp_med = {k: statistics.median(run[k] for run in tp_runs) for k in ("deepcopy", "graph", "prune", "total")}
    t_child, _ = _timed(lambda: pruner.child(pruned, plan), r, device)
    t_retrace, _ = _timed(lambda: Pruner(pruned, example), r, device)
    ours_built = count_costs(pruned, size)
    theirs_built = count_costs(tp_runs[-1]["model"], size)
    t_val, metrics = _timed(lambda: evaluate(pruned, val, device=device, batch_size=250), max(1, r // 2), device)
    base = count_costs(model, size)
    return {
        "model": name, "groups": pruner.n_groups, "channels": int(pruner.num_channels.sum()),
        "params": base.params, "macs": base.macs,
        "pruned_params": ours_built.params, "pruned_macs": ours_built.macs,
        "analytic_equals_built": cost == ours_built, "torch_pruning_equals": theirs_built == ours_built,
        "t_discovery": t_graph, "t_taylor": t_taylor, "t_plan": t_plan, "t_apply": t_apply,
        "t_build": t_plan + t_apply, "t_plan_cost": t_cost, "t_child": t_child, "t_retrace_pruned": t_retrace,
        "tp_deepcopy": tp_med["deepcopy"], "tp_graph": tp_med["graph"], "tp_prune": tp_med["prune"],
        "tp_total": tp_med["total"], "t_val_pass": t_val, "val_top1": metrics["top1"],
        "speedup_vs_tp_total": tp_med["total"] / (t_plan + t_apply),
        "speedup_vs_tp_prune_only": tp_med["prune"] / (t_plan + t_apply),
        "build_over_val_pass": (t_plan + t_apply) / t_val,
    }


def to_markdown(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    ms = lambda s: f"{1000 * s:.1f} ms"  # noqa: E731
    lines = [
        "# Pruning engine benchmark",
        "",
        f"{meta['device']}, torch {meta['torch']}, {meta['threads']} thread(s), {meta['platform']}; "
        f"CIFAR-100 heads, full width; per-group sparsity uniform in [0, {2 * meta['sparsity']:.2f}]; "
        f"median of {meta['repeats']} runs after a warm-up (ours and Torch-Pruning alternate, so load from other "
        f"processes hits both alike; 1-min load average before/after: {meta['load_avg_before_after']}). "
        f"Command: `{meta['command']}`.",
        "",
        "| | " + " | ".join(r["model"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]

    def row(label: str, fn: Callable[[Dict[str, Any]], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in rows) + " |")

    row("groups / channels", lambda r: f"{r['groups']} / {r['channels']}")
    row("params, MACs (full)", lambda r: f"{r['params'] / 1e6:.2f} M, {r['macs'] / 1e6:.1f} M")
    row("params, MACs (pruned)", lambda r: f"{r['pruned_params'] / 1e6:.2f} M, {r['pruned_macs'] / 1e6:.1f} M")
    row("(a) group discovery (trace)", lambda r: ms(r["t_discovery"]))
    row(f"(b) Taylor importance, 1 batch of {meta['calibration']}", lambda r: ms(r["t_taylor"]))
    row("(c) ours: plan + build pruned model", lambda r: ms(r["t_build"]))
    row("(c) Torch-Pruning: deepcopy + graph + prune", lambda r: ms(r["tp_total"]))
    row("(c) Torch-Pruning: prune step only", lambda r: ms(r["tp_prune"]))
    row("speed-up vs Torch-Pruning (total / prune only)",
        lambda r: f"{r['speedup_vs_tp_total']:.1f}x / {r['speedup_vs_tp_prune_only']:.1f}x")
    row(f"validation pass, {meta['val_images']} images (pruned)", lambda r: ms(r["t_val_pass"]))
    row("(c) / validation pass", lambda r: f"{100 * r['build_over_val_pass']:.1f} %")
    row("analytic plan_cost (per call)", lambda r: f"{1e6 * r['t_plan_cost']:.0f} us")
    row("Pruner of the pruned model: child() / re-trace",
        lambda r: f"{ms(r['t_child'])} / {ms(r['t_retrace_pruned'])}")
    row("plan_cost == count_costs(built)", lambda r: str(r["analytic_equals_built"]))
    row("Torch-Pruning costs == ours", lambda r: str(r["torch_pruning_equals"]))
    return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> List[Dict[str, Any]]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    calib_x = _images(args.data, args.calibration, args.seed)
    calib = (calib_x.to(args.device), torch.randint(0, args.num_classes, (len(calib_x),)).to(args.device))
    val_x = _images(args.data, args.val_images, args.seed + 1)
    val = (val_x, torch.randint(0, args.num_classes, (len(val_x),)))
    load_before = os.getloadavg()[0]
    rows = [bench_model(name, args, calib, val) for name in tqdm(args.models, desc="models")]
    load = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
    cpu = f"CPU ({platform.processor() or platform.machine()})"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    meta = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "platform": platform.platform(), "load_avg_before_after": load, "sparsity": args.sparsity, "repeats": args.repeats,
            "calibration": args.calibration, "val_images": args.val_images,
            "command": "python benchmarks/bench_pruner.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    suffix = f"_{args.tag}" if args.tag else ""
    atomic_write_text(json.dumps({"meta": meta, "rows": rows}, indent=2), out / f"bench_pruner{suffix}.json")
    md = to_markdown(rows, meta)
    atomic_write_text(md, out / f"bench_pruner{suffix}.md")
    print(md)
    return rows


if __name__ == "__main__":
    main()
