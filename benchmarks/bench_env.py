"""PruneEnv speed: one step and one look-ahead split into prune / importance / eval, against a plain
evaluation pass of the same pruned model on the same images (the physical floor of a reward).

    python benchmarks/bench_env.py                                   # CPU, ../shared/data/cifar10_5k.npz
    python benchmarks/bench_env.py --device cuda --tag gpu --reward-samples 250 1000
    python benchmarks/bench_env.py --merge cpu gpu          # summary bench_env.md|json of tagged runs
Writes benchmarks/results/bench_env{_TAG}.md|json. Target: look-ahead <= 1.15 x the plain pass.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from pruning_env.checkpoint import default_checkpoint_path
from pruning_env.envs.prune_env import PruneEnv
from pruning_env.runtime import atomic_write_text, resolve_device, sync
from pruning_env.training import evaluate

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "sparsity": dict(action_mode="sparsity", budget=None),
    "sparsity+flops budget": dict(action_mode="sparsity", budget="flops"),
    "distribution+flops budget": dict(action_mode="distribution", budget="flops"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10_5k.npz"),
                   help="npz file (x: N,H,W,C uint8, y) used as dataset npz:PATH")
    p.add_argument("--model", default="vgg19")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--checkpoint", default=None, help="pretrained weights (default: checkpoints/...; trained "
                   "first with --pretrain-epochs when missing)")
    p.add_argument("--pretrain-epochs", type=int, default=30, help="epochs when the checkpoint must be trained")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reward-samples", type=int, nargs="+", default=[1000],
                   help="validation images per reward (one table row block per value)")
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="", help="suffix of the result files (bench_env_TAG.*)")
    p.add_argument("--merge", nargs="+", default=None, metavar="TAG",
                   help="only merge existing bench_env_TAG.json files into bench_env.md|json (no timing)")
    return p



def _actions(n_groups: int, count: int, seed: int) -> List[np.ndarray]:
    """Distinct moderate actions (a look-ahead cache hit would time nothing)."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.2, 0.6, n_groups).astype(np.float32) for _ in range(count)]


def bench_config(env: PruneEnv, repeats: int) -> Dict[str, Any]:
    """Median timings of look-ahead, step and the plain evaluation pass for one env configuration.

    Each look-ahead is timed twice from the reset state: cold (the first model of its shapes, paying the
    backend's one-off kernel selection) and warm (same action again with the candidate cache cleared), and the
    warm one is compared with a plain evaluation of the very model it built.
    """
    device = env.device
    env.reset(seed=0)
    root = env.snapshot()
    actions = _actions(env.n_groups, 3 * repeats + 1, seed=1)
    env.evaluate_action(actions[-1])  # warm-up (allocator, library init)
    rows, step = [], []
    for i in range(repeats):
        env.restore(root)
        root.candidates.clear()
        t0 = time.perf_counter()
        env.evaluate_action(actions[i])
        sync(device)
        cold = time.perf_counter() - t0
        root.candidates.clear()
        t0 = time.perf_counter()
        _, info = env.evaluate_action(actions[i])
        sync(device)
        total = time.perf_counter() - t0
        cand = root.candidates[actions[i].astype(np.float32).tobytes()]
        # the floor: the same evaluation of the same pruned model on the same images, nothing else
        t0 = time.perf_counter()
        evaluate(cand.model, env.task.reward_data, device=device, batch_size=env.eval_batch_size, amp=env.amp,
                 channels_last=env.channels_last)
        sync(device)
        plain = time.perf_counter() - t0
        # a plain pass over a model with shapes never seen before: the floor of a cold look-ahead
        fresh = env.pruner.apply(env.pruner.plan(keep=env.keep_for_action(actions[2 * repeats + i])))
        sync(device)
        t0 = time.perf_counter()
        evaluate(fresh, env.task.reward_data, device=device, batch_size=env.eval_batch_size, amp=env.amp,
                 channels_last=env.channels_last)
        sync(device)
        plain_cold = time.perf_counter() - t0
        rows.append(dict(cold=cold, total=total, prune=info["time_prune"], eval=info["time_eval"], plain=plain,
                         ratio=total / plain, plain_cold=plain_cold))
    for i in range(repeats):
        env.restore(root)
        root.candidates.clear()
        t0 = time.perf_counter()
        _, _, terminated, _, info = env.step(actions[repeats + i])
        sync(device)
        step.append(dict(total=time.perf_counter() - t0, prune=info["time_prune"],
                         importance=info["time_importance"], eval=info["time_eval"], terminated=terminated))
    med = lambda rs, k: float(np.median([r[k] for r in rs]))  # noqa: E731
    return {
        "lookahead_cold_s": med(rows, "cold"), "plain_eval_cold_s": med(rows, "plain_cold"),
        "lookahead_cold_over_plain_cold": med(rows, "cold") / med(rows, "plain_cold"),
        "lookahead_s": med(rows, "total"),
        "lookahead_prune_s": med(rows, "prune"), "lookahead_eval_s": med(rows, "eval"),
        "plain_eval_s": med(rows, "plain"), "lookahead_over_plain": med(rows, "ratio"),
        "step_s": med(step, "total"), "step_prune_s": med(step, "prune"),
        "step_importance_s": med(step, "importance"), "step_eval_s": med(step, "eval"),
        "step_final": bool(step[-1]["terminated"]),
        "flops_reduction_last": float(info["flops_reduction"]), "accuracy_last": float(info["accuracy"]),
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.merge:
        return merge(Path(args.out), args.merge)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dataset = f"npz:{args.data}"
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint_path(args.model, dataset,
                                                                                      args.width)
    results, t_start = [], time.time()
    for n in args.reward_samples:
        for name, kw in CONFIGS.items():
            t0 = time.perf_counter()
            env = PruneEnv(model=args.model, dataset=dataset, width=args.width, checkpoint=checkpoint,
                           auto_pretrain_epochs=args.pretrain_epochs, val_size=args.val_size, reward_samples=n,
                           target=0.5, target_metric="flops", n_steps=2, device=str(device), seed=0,
                           record_timings=True, **kw)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            env.reset(seed=0)
            sync(device)
            first_reset = time.perf_counter() - t0
            row = dict(config=name, reward_samples=len(env.task.reward_data[1]), n_groups=env.n_groups, env_build_s=build,
                       first_reset_s=first_reset, original_accuracy=env.original_accuracy,
                       **bench_config(env, args.repeats))
            results.append(row)
            print(f"{name:28s} n={row['reward_samples']:5d}  look-ahead {row['lookahead_s'] * 1e3:8.1f} ms "
                  f"(cold {row['lookahead_cold_s'] * 1e3:8.1f} vs plain {row['plain_eval_cold_s'] * 1e3:8.1f}) "
                  f"(prune {row['lookahead_prune_s'] * 1e3:6.1f}, eval {row['lookahead_eval_s'] * 1e3:7.1f}) | plain "
                  f"{row['plain_eval_s'] * 1e3:7.1f} ms | ratio {row['lookahead_over_plain']:.3f} | step "
                  f"{row['step_s'] * 1e3:8.1f} ms (importance {row['step_importance_s'] * 1e3:6.1f})", flush=True)
            env.close()
    meta = dict(model=args.model, width=args.width, dataset=dataset, checkpoint=str(checkpoint),
                device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                torch=torch.__version__, threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(), repeats=args.repeats, amp=False, channels_last=False,
                wall_s=time.time() - t_start,
                command="python benchmarks/bench_env.py " + " ".join(argv or sys.argv[1:]))
    out = Path(args.out)
    stem = "bench_env" + (f"_{args.tag}" if args.tag else "")
    atomic_write_text(json.dumps({"meta": meta, "results": results}, indent=2), out / f"{stem}.json")
    atomic_write_text(render_markdown(meta, results), out / f"{stem}.md")
    print(f"wrote {out / stem}.md and .json", flush=True)
    return 0


def merge(out: Path, tags: List[str]) -> int:
    """Combine tagged runs (e.g. cpu and gpu) into bench_env.md|json with a verdict on the 1.15x target."""
    runs = {}
    for tag in tags:
        path = out / f"bench_env_{tag}.json"
        if not path.is_file():
            print(f"error: {path} not found; run the benchmark with --tag {tag} first", file=sys.stderr)
            return 2
        runs[tag] = json.loads(path.read_text())
    lines = ["# PruneEnv step / look-ahead timing", "",
             "Target: a look-ahead costs at most 1.15x a plain evaluation pass of the same pruned model on the same "
             "images.", "",
             "| run | device | reward images | look-ahead / plain (warm) | cold look-ahead / cold plain "
             "| meets 1.15x |",
             "|---|---|---|---|---|---|"]
    for tag, run in runs.items():
        device = run["meta"]["gpu"] or f"CPU, {run['meta']['threads']} threads"
        for r in run["results"]:
            ok = "yes" if r["lookahead_over_plain"] <= 1.15 else (
                "cold only" if r["lookahead_cold_over_plain_cold"] <= 1.15 else "no")
            lines.append(f"| {tag}: {r['config']} | {device} | {r['reward_samples']} | "
                         f"{r['lookahead_over_plain']:.3f} | {r['lookahead_cold_over_plain_cold']:.3f} | {ok} |")
    lines += ["", "Full tables: " + ", ".join(f"[bench_env_{t}.md](bench_env_{t}.md)" for t in runs), ""]
    for tag, run in runs.items():
        lines += [render_markdown(run["meta"], run["results"]).replace("# PruneEnv", f"## {tag}: PruneEnv", 1), ""]
    atomic_write_text("\n".join(lines), out / "bench_env.md")
    atomic_write_text(json.dumps(runs, indent=2), out / "bench_env.json")
    print(f"wrote {out / 'bench_env.md'} and .json")
    return 0


def render_markdown(meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    lines = [
        f"# PruneEnv step / look-ahead timing ({meta['device']})", "",
        f"{meta['model']} width {meta['width']} pretrained on `{meta['dataset']}` (checkpoint "
        f"`{meta['checkpoint']}`), device {meta['device']}{' (' + meta['gpu'] + ')' if meta['gpu'] else ''}, "
        f"torch {meta['torch']}, {meta['threads']} CPU threads, AMP + channels-last: {meta['amp']}; "
        f"target 50% FLOPs in 2 steps; median of {meta['repeats']} runs, each from the reset state.", "",
        "| config | reward images | look-ahead ms | = prune ms | + eval ms | plain eval ms | look-ahead / plain "
        "| cold look-ahead ms | cold plain ms | cold ratio | step ms | step prune ms | step importance ms "
        "| step eval ms | final step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['config']} | {r['reward_samples']} | {ms(r['lookahead_s'])} | {ms(r['lookahead_prune_s'])} "
                     f"| {ms(r['lookahead_eval_s'])} | {ms(r['plain_eval_s'])} | {r['lookahead_over_plain']:.3f} "
                     f"| {ms(r['lookahead_cold_s'])} | {ms(r['plain_eval_cold_s'])} "
                     f"| {r['lookahead_cold_over_plain_cold']:.3f} | {ms(r['step_s'])} | {ms(r['step_prune_s'])} "
                     f"| {ms(r['step_importance_s'])} | {ms(r['step_eval_s'])} "
                     f"| {'yes' if r['step_final'] else 'no'} |")
    lines += [
        "",
        "Look-ahead = `env.evaluate_action(a)` wall time (plan with the cached importance, budget search, surgery, "
        "reward evaluation, info), timed a second time for the same action with the candidate cache cleared; "
        "cold look-ahead = its first run, when the backend meets these layer shapes for the first time (what an "
        "agent sampling new actions pays), compared with a plain pass over another freshly pruned model (cold "
        "plain). Plain eval "
        "= `pruning_env.training.evaluate` of the very model that look-ahead built, on the same preloaded "
        "validation tensors with the same settings: the floor any reward must pay. Look-ahead / plain is the "
        "median of the per-action ratios. Step = `env.step(a)` from the reset state without a preceding "
        "look-ahead, for fresh actions; a non-final step also derives the next state's groups (`Pruner.child`, "
        "no re-trace) and computes its Taylor "
        "importance (100 calibration images) for the next state, a final one (free sparsity mode overshooting "
        "the target in one step) skips that. "
        f"Target: look-ahead / plain <= 1.15. Benchmark wall time {meta['wall_s']:.0f} s.",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
