"""AgentViT time-to-accuracy: how soon a ViT trained on agent-selected patches reaches the accuracy of the same
ViT trained on all patches, against random masks at the same kept count, in synchronised wall time.

    python benchmarks/agentvit_tta.py --data npz:data/cifar10_5k.npz --device cuda --budget-s 290
    python benchmarks/agentvit_tta.py --device cpu --epochs 1 --seeds 0 --limit-train 256 --sizes 0.25x2 \\
        --size-batches 16 --out /tmp/tta                                         # a smoke test (seconds)
    python benchmarks/agentvit_tta.py --render benchmarks/results/agentvit_tta.json   # md/png from a json

For every seed, the same ViT (same initial weights, same data split) is trained four ways with the recipe of
``--recipe`` (configs/agentvit/recipe_small_data.yaml): all patches, the faithful agent, the double-DQN agent
and random k*-subsets. Each run is one :func:`rl_prune.vit_run.run_training` of a :class:`ViTRunConfig`: the
recipe file's ``env`` section (a ViT run config; keys it omits take the run layer's defaults, and ``notebook``
names configs/agentvit/recipe_notebook.yaml), the flags over it, and the benchmark's policy settings. After every epoch the ViT is evaluated on the validation split with all patches, outside
the clock; the clock is the synchronised wall time of the joint loop (data loading, ViT steps, state passes,
agent updates). The report gives the wall time to reach 90 % and 95 % of the all-patch run's final validation
accuracy, the final test top-1 of each policy, and the paired agent − random difference on the same trained ViT.
``--sizes`` first times one training step at several model sizes and batches: where do fewer tokens cut the
step time? Writes OUT/agentvit_tta.md|json|png; finished runs are kept in the json, so rerunning the same
command resumes; ``--budget-s`` stops starting runs that would not finish in time and still writes the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from agents.vit_ddqn.evaluation import time_train_steps
from pruning_env.costs import state_macs, vit_gflops
from pruning_env.data import DatasetSplits, make_datasets
from pruning_env.models import create_model
from pruning_env.runtime import atomic_write_text, machine_info, resolve_device
from rl_prune.config import ViTRunConfig, load_config
from rl_prune.vit_run import run_training

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "configs" / "agentvit" / "recipe_small_data.yaml"
#: ``--recipe notebook``: the notebook's optimiser (the env's defaults) on the benchmark's ViT
NOTEBOOK_RECIPE = ROOT / "configs" / "agentvit" / "recipe_notebook.yaml"
DEFAULT_DATA = "npz:" + str(ROOT.parent / "shared" / "data" / "cifar10_5k.npz")
POLICIES = ("full", "faithful", "double_dqn", "random", "full_notebook")
#: the comparison proper; the others (the recipe check) run after it, so a short budget cuts them first
MAIN_POLICIES = ("full", "faithful", "double_dqn", "random")
LABELS = {"full": "all patches", "faithful": "faithful agent", "double_dqn": "double-DQN agent",
          "random": "random masks (k*)", "full_notebook": "all patches, notebook optimiser"}
COLORS = {"full": "black", "faithful": "tab:blue", "double_dqn": "tab:orange", "random": "tab:gray",
          "full_notebook": "tab:purple"}
#: env keys of the optimiser recipe; ``full_notebook`` leaves them at the env's defaults (the notebook's)
OPTIMISER_KEYS = ("lr", "optimizer", "weight_decay", "lr_schedule", "warmup_epochs", "min_lr", "label_smoothing")
#: the recipe keys the report lists
SHOWN_KEYS = OPTIMISER_KEYS + ("augment",)
#: env settings that flags override (flag name = key)
FLAG_KEYS = ("width", "depth", "batch_size", "epochs", "n_keep", "reward_every")
#: the keys of a curve record (a run's per-epoch ``history``, :func:`rl_prune.vit_run.run_training`)
CURVE_KEYS = ("epoch", "time_s", "val_top1", "val_loss", "train_loss", "kept", "lr")
THRESHOLDS = (0.90, 0.95)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="a pruning_env.data name: npz:PATH (a bare .npz path works), cifar10, digits, synthetic")
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE),
                   help="a ViT run config whose env: section holds the ViT training recipe; 'notebook' = "
                        "configs/agentvit/recipe_notebook.yaml (Adam 1e-3, constant)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the recipe's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--policies", nargs="+", default=list(MAIN_POLICIES), choices=POLICIES,
                   help="full, faithful, double_dqn, random; full_notebook = all patches with the notebook's "
                        "optimiser (Adam 1e-3, constant, no smoothing), to check the recipe")
    p.add_argument("--width", type=float, help="ViT width multiplier (1 = the notebook's dim 128)")
    p.add_argument("--depth", type=int, help="ViT blocks")
    p.add_argument("--batch-size", type=int, help="ViT training batch")
    p.add_argument("--n-keep", type=int, help="kept patches k* of 64 (agents' target, random masks' count)")
    p.add_argument("--reward-every", type=int, help="reward / agent-update period in batches")
    p.add_argument("--eps-fraction", type=float, default=1 / 3,
                   help="exploration time constant as a fraction of a run's steps (the notebook's 20,000 "
                        "batches would keep epsilon near 1 in a short run)")
    p.add_argument("--val-size", type=float, default=0.15, help="fraction of the training data held out for "
                   "the per-epoch validation curve")
    p.add_argument("--limit-train", type=int, help="use only this many training images (smoke tests)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers (default: 6 on CUDA, 0 on CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--sizes", nargs="*", default=["0.5x6", "1x6", "2x6"], metavar="WIDTHxDEPTH",
                   help="model sizes whose training-step time is measured at all / k* / k* + state tokens; "
                        "give none to skip")
    p.add_argument("--size-batches", type=int, nargs="+", default=[128, 256, 512], help="batches of --sizes")
    p.add_argument("--budget-s", type=float, help="wall-time budget of the whole benchmark: runs that would "
                   "not finish inside it are not started; the report is written from what finished")
    p.add_argument("--print-every", type=int, default=10, help="print the validation accuracy every N epochs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of agentvit_tta.*")
    p.add_argument("--fresh", action="store_true", help="ignore finished runs in an existing json")
    p.add_argument("--render", metavar="JSON", help="only rewrite the md/png from a finished json")
    return p


# ----------------------------------------------------------------------------------------------- settings
def resolve_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Everything that determines the runs' results: the recipe's env section (a :class:`ViTRunConfig` read by
    the run layer's loader, its data replaced by ``--data`` / ``--val-size``), the flags over it.

    :param args: the parsed command line.
    """
    data = f"npz:{args.data}" if args.data.endswith(".npz") and ":" not in args.data else args.data
    recipe_path = (NOTEBOOK_RECIPE if args.recipe == "notebook" else Path(args.recipe)).resolve()
    recipe = load_config(recipe_path, overrides={"env.dataset": data, "env.val_size": args.val_size},
                         schema=ViTRunConfig)
    env = {k: v for k, v in recipe.env.items() if k not in ("dataset", "val_size")}
    for key in FLAG_KEYS:
        if getattr(args, key) is not None:
            env[key] = getattr(args, key)
    device = str(resolve_device(args.device))
    recipe_name = str(recipe_path.relative_to(ROOT)) if recipe_path.is_relative_to(ROOT) else args.recipe
    return {"data": data, "recipe": recipe_name, "env": env, "device": device, "eps_fraction": args.eps_fraction,
            "val_size": args.val_size, "limit_train": args.limit_train}


def settings_key(settings: Dict[str, Any]) -> str:
    """A short hash of the settings: runs are only resumed from a json made with the same ones.

    :param settings: from :func:`resolve_settings`.
    """
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_splits(settings: Dict[str, Any]) -> DatasetSplits:
    """The dataset split once (seed 0) for every run, so that all policies and seeds see the same images.

    :param settings: from :func:`resolve_settings` (data, val_size, limit_train, env.augment).
    """
    splits = make_datasets(settings["data"], val_size=settings["val_size"], seed=0,
                           augment=bool(settings["env"].get("augment", True)))
    if settings["limit_train"]:
        n = min(int(settings["limit_train"]), len(splits.train))
        splits = dataclasses.replace(splits, train=torch.utils.data.Subset(splits.train, range(n)))
    return splits


# ----------------------------------------------------------------------------------------------- one run
def run_config(policy: str, seed: int, settings: Dict[str, Any], splits: DatasetSplits,
               num_workers: int) -> ViTRunConfig:
    """The checked ViT run config of one run: the recipe's env on the shared splits, score actions binarised at
    their mean (faithful) or top-k masks (double DQN), the agents' exploration decaying over ``eps_fraction`` of
    the run; nothing written. The ViT's initial weights depend only on the seed.

    :param policy: one of :data:`POLICIES` (``full_notebook`` is the ``full`` policy without the optimiser keys).
    :param seed: seeds the ViT's initial weights, the data order and the policy's draws.
    :param settings: from :func:`resolve_settings`.
    :param splits: the dataset, shared by all runs (its augmentation already set by :func:`load_splits`).
    :param num_workers: DataLoader workers of the training split.
    """
    dropped = ("augment",) + (OPTIMISER_KEYS if policy == "full_notebook" else ())
    env = {k: v for k, v in settings["env"].items() if k not in dropped}
    env.update(dataset=splits, num_workers=num_workers, binarize="mean",
               action_mode="mask" if policy == "double_dqn" else "scores")
    learner = policy in ("faithful", "double_dqn")
    agent = {"exploration_fraction": settings["eps_fraction"], "skip_first_epoch": False} if learner else {}
    return load_config(data={"policy": "full" if policy == "full_notebook" else policy, "seed": seed,
                             "device": settings["device"], "out": None, "progress": False, "env": env,
                             "agent": agent, "eval": {"batch_size": 128, "throughput": False}},
                       schema=ViTRunConfig)


def run_one(policy: str, seed: int, settings: Dict[str, Any], splits: DatasetSplits, num_workers: int,
            print_every: int) -> Dict[str, Any]:
    """Train one ViT with ``policy`` (:func:`rl_prune.vit_run.run_training`); the validation curve against
    synchronised training wall time, and the final test top-1 with all patches, agent masks (agents) and random
    masks at the same kept count.

    :param policy: one of :data:`POLICIES`.
    :param seed: the run's seed.
    :param settings: from :func:`resolve_settings`.
    :param splits: the dataset, shared by all runs.
    :param num_workers: DataLoader workers of the training split.
    :param print_every: print the validation accuracy every this many epochs (0: never).
    """
    cfg = run_config(policy, seed, settings, splits, num_workers)
    epochs = int(cfg.env["epochs"])

    def show(c: Dict[str, Any]) -> None:
        if print_every and (c["epoch"] % print_every == 0 or c["epoch"] == epochs):
            print(f"    epoch {c['epoch']:3d}  {c['time_s']:7.1f} s  val {c['val_top1']:.4f}  "
                  f"train loss {c['train_loss']:.3f}  kept {c['kept']:.1f}", flush=True)

    res = run_training(cfg, on_epoch=show)
    result = {"policy": policy, "seed": seed, "epochs": res["epochs"], "steps": res["total_steps"],
              "batches_per_epoch": res["batches_per_epoch"],
              "curve": [{k: c[k] for k in CURVE_KEYS} for c in res["history"]],
              "train_time_s": res["train_time_s"], "vit_step_time_s": res["vit_step_time_s"],
              "state_time_s": res["state_time_s"], "mean_kept": res["train_mean_kept"],
              "eval_kept": res["eval_kept"], "test": res["test"], "model": res["model"]}
    if "agent_updates" in res:
        result.update(agent_updates=res["agent_updates"], final_epsilon=res["final_epsilon"])
    return result


# ----------------------------------------------------------------------------------------------- step times
def parse_size(text: str) -> Tuple[float, int]:
    """``"1x6"`` -> (width 1.0, depth 6).

    :param text: ``WIDTHxDEPTH``.
    """
    try:
        width, depth = text.lower().split("x")
        return float(width), int(depth)
    except ValueError:
        raise ValueError(f"--sizes entries look like WIDTHxDEPTH (e.g. 1x6), got {text!r}") from None


def step_time_sweep(sizes: Sequence[str], batches: Sequence[int], n_keep: int, device: torch.device,
                    num_classes: int) -> List[Dict[str, Any]]:
    """Median training-step time at every size and batch with all tokens, k* tokens, and k* tokens plus the
    agent's state pass (interleaved rounds, :func:`~agents.vit_ddqn.evaluation.time_train_steps`).

    :param sizes: ``WIDTHxDEPTH`` strings.
    :param batches: training batches to time at every size.
    :param n_keep: kept tokens k*.
    :param device: where to time.
    :param num_classes: classifier outputs.
    """
    rows = []
    for size in sizes:
        width, depth = parse_size(size)
        model = create_model("vit_tiny_patch4", num_classes=num_classes, width=width, depth=depth)
        for batch in batches:
            settings = {"all": (model.num_patches, 0), "k": (n_keep, 0), "k+state": (n_keep, 1)}
            try:
                times = time_train_steps(model, settings, batch_size=batch, device=device, repeats=10, warmup=3)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"  size {size} batch {batch}: out of memory, skipped", flush=True)
                continue
            row = {"size": size, "width": width, "depth": depth, "batch": batch,
                   "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                   "gflops_all": vit_gflops(model), "gflops_k": vit_gflops(model, n_keep),
                   "gflops_state": 2 * state_macs(model) / 1e9,
                   "ms_all": 1000 * times["all"], "ms_k": 1000 * times["k"], "ms_k_state": 1000 * times["k+state"]}
            rows.append(row)
            print(f"  size {size:>6} batch {batch:4d}: step {row['ms_all']:7.1f} ms all, {row['ms_k']:7.1f} ms "
                  f"{n_keep} tokens, {row['ms_k_state']:7.1f} ms {n_keep} + state "
                  f"({100 * (1 - row['ms_k_state'] / row['ms_all']):+.0f} % saved)", flush=True)
        del model
    return rows


# ----------------------------------------------------------------------------------------------- analysis
def target_accuracy(runs: List[Dict[str, Any]]) -> Optional[float]:
    """Mean over seeds of the all-patch runs' final validation accuracy (None without such a run).

    :param runs: finished runs.
    """
    finals = [r["curve"][-1]["val_top1"] for r in runs if r["policy"] == "full" and r["curve"]]
    return float(np.mean(finals)) if finals else None


def time_to(curve: List[Dict[str, float]], level: float) -> Optional[float]:
    """Training wall time at the end of the first epoch whose validation accuracy is >= ``level`` (None: never).

    :param curve: a run's per-epoch records.
    :param level: validation top-1 to reach.
    """
    return next((c["time_s"] for c in curve if c["val_top1"] >= level), None)


def _ms(values: Sequence[float], digits: int = 1, scale: float = 1.0) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float) * scale
    if v.size == 0:
        return "–"
    return f"{v.mean():.{digits}f}" if v.size == 1 else f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def summarise(payload: Dict[str, Any]) -> Dict[str, Any]:
    """Per-policy aggregates over seeds: time to 90/95 % of the target, final accuracies, paired differences.

    :param payload: the benchmark's json payload.
    """
    runs, policies = payload["runs"], payload["policies"]
    target = target_accuracy(runs)
    out: Dict[str, Any] = {"target_val_top1": target, "policies": {}}
    full_time = [r["train_time_s"] for r in runs if r["policy"] == "full"]
    for p in policies:
        rs = [r for r in runs if r["policy"] == p]
        if not rs:
            continue
        s: Dict[str, Any] = {"seeds": [r["seed"] for r in rs],
                             "train_time_s": [r["train_time_s"] for r in rs],
                             "final_val_top1": [r["curve"][-1]["val_top1"] for r in rs],
                             "test_all": [r["test"]["all"]["top1"] for r in rs],
                             "test_random": [r["test"]["random"]["top1"] for r in rs],
                             "eval_kept": [r["eval_kept"] for r in rs], "mean_kept": [r["mean_kept"] for r in rs],
                             "ms_per_step": [1000 * r["train_time_s"] / r["steps"] for r in rs]}
        if full_time and p != "full":
            s["time_vs_full"] = float(np.mean(s["train_time_s"]) / np.mean(full_time) - 1)
        if target is not None:
            for q in THRESHOLDS:
                s[f"time_to_{int(q * 100)}"] = [time_to(r["curve"], q * target) for r in rs]
        if "agent" in rs[0]["test"]:
            s["test_agent"] = [r["test"]["agent"]["top1"] for r in rs]
            s["agent_minus_random"] = [r["test"]["agent"]["top1"] - r["test"]["random"]["top1"] for r in rs]
        out["policies"][p] = s
    return out


def make_markdown(payload: Dict[str, Any], summary: Dict[str, Any]) -> str:
    """The report: settings, machine, time-to-accuracy table, paired differences, step-time sweep, verdict.

    :param payload: the benchmark's json payload.
    :param summary: from :func:`summarise`.
    """
    st, env = payload["settings"], payload["settings"]["env"]
    target = summary["target_val_top1"]
    runs = payload["runs"]
    m = payload["machine"]
    lines = ["# AgentViT: time to accuracy", "",
             f"Dataset `{st['data']}` (validation {st['val_size']:.0%} of train, test held out), ViT width "
             f"{env['width']} depth {env['depth']}, batch {env['batch_size']}, {env['epochs']} epochs, k* = "
             f"{env['n_keep']} of 64, reward every {env['reward_every']} batches, recipe `{st['recipe']}` "
             f"({', '.join(f'{k}={v}' for k, v in env.items() if k in SHOWN_KEYS)}), seeds "
             f"{sorted({r['seed'] for r in runs})}, device {st['device']}.",
             f"Machine: {m.get('cuda') or m['cpu']} ({m['cpu_count']} CPU cores, torch {m['torch']}, "
             f"{m['torch_threads']} threads). Benchmark wall time {payload['wall_time_s'] / 60:.1f} min.", ""]
    if payload.get("skipped"):
        lines += [f"**Budget reached: {len(payload['skipped'])} run(s) not started** "
                  f"({', '.join(payload['skipped'])}).", ""]
    if target is not None:
        lines += [f"Target: the all-patch runs' final validation top-1, {target:.4f} (mean over seeds); "
                  f"90 % = {0.9 * target:.4f}, 95 % = {0.95 * target:.4f}.", ""]
    lines += ["| training policy | s to 90 % | s to 95 % | train s (vs all) | ms/step | kept | final val top-1 "
              "| test top-1, all patches | test, agent masks | test, random masks (same k) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p, s in summary["policies"].items():
        n = len(s["seeds"])
        cells = []
        for q in THRESHOLDS:
            times = s.get(f"time_to_{int(q * 100)}")
            if times is None:
                cells.append("–")
                continue
            reached = [t for t in times if t is not None]
            cells.append(_ms(reached) + ("" if len(reached) == n else f" ({len(reached)}/{n} reached)"))
        vs = f" ({100 * s['time_vs_full']:+.0f} %)" if "time_vs_full" in s else ""
        lines.append(f"| {LABELS[p]} | {cells[0]} | {cells[1]} | {_ms(s['train_time_s'])}{vs} | "
                     f"{_ms(s['ms_per_step'])} | {_ms(s['mean_kept'])} | {_ms(s['final_val_top1'], 4)} | "
                     f"{_ms(s['test_all'], 4)} | {_ms(s.get('test_agent', []), 4)} | "
                     f"{_ms(s['test_random'], 4)} (k = {_ms(s['eval_kept'], 0)}) |")
    lines += ["", "Mean ± sample std over seeds. Times are the synchronised wall time of the joint training loop "
              "(data loading, ViT steps, state passes, agent updates; per-epoch validation excluded) at the end "
              "of the first epoch whose validation top-1 (all patches) reaches the level; \"n/m reached\": the "
              "mean is over the seeds that reached it. Test top-1 on the held-out test split; agent masks are "
              "greedy, one per test batch of 128; random masks keep k random patches per batch, k = the agent's "
              "mean kept count at test time (k* for the baselines).", ""]
    paired = [(p, s) for p, s in summary["policies"].items() if "agent_minus_random" in s]
    if paired:
        lines += ["Paired test-time comparison on the same trained ViT and test batches (agent masks − random "
                  "masks at the same k):", ""]
        for p, s in paired:
            d = np.asarray(s["agent_minus_random"]) * 100
            spread = f" ± {d.std(ddof=1):.2f}" if d.size > 1 else ""
            lines.append(f"- {LABELS[p]}: {d.mean():+.2f}{spread} points (agent better in {int((d > 0).sum())} "
                         f"of {d.size} seeds)")
        lines.append("")
    lines += verdict(summary)
    if payload.get("step_times"):
        k = env["n_keep"]
        lines += ["", "Training-step time by model size (median of 10 interleaved rounds; one forward, backward "
                  "and Adam step on random images; \"+ state\" adds the agent's no-grad state pass):", "",
                  f"| width × depth | params (M) | batch | GFLOPs/img all / {k} / state | ms all | ms {k} tokens "
                  f"| ms {k} + state | saving, random masks | saving, agent |", "|---|---|---|---|---|---|---|---|---|"]
        for r in payload["step_times"]:
            lines.append(f"| {r['width']} × {r['depth']} | {r['params_m']:.2f} | {r['batch']} | "
                         f"{r['gflops_all']:.3f} / {r['gflops_k']:.3f} / {r['gflops_state']:.3f} | "
                         f"{r['ms_all']:.1f} | {r['ms_k']:.1f} | {r['ms_k_state']:.1f} | "
                         f"{100 * (1 - r['ms_k'] / r['ms_all']):.0f} % | "
                         f"{100 * (1 - r['ms_k_state'] / r['ms_all']):.0f} % |")
    lines += ["", f"Command: `{payload['command']}`"]
    return "\n".join(lines) + "\n"


def verdict(summary: Dict[str, Any]) -> List[str]:
    """Plain sentences: does each agent reach 90/95 % sooner than all patches and than random masks?

    :param summary: from :func:`summarise`.
    """
    pol = summary["policies"]
    if "full" not in pol or summary["target_val_top1"] is None:
        return ["Verdict: no all-patch run finished, so there is no target accuracy."]

    def mean_time(p: str, key: str) -> Tuple[Optional[float], int, int]:
        times = pol[p].get(key, [])
        reached = [t for t in times if t is not None]
        return (float(np.mean(reached)) if reached else None), len(reached), len(times)

    out = ["Verdict (from the numbers above):", ""]
    for p in ("faithful", "double_dqn"):
        if p not in pol:
            continue
        parts = []
        for q in THRESHOLDS:
            key = f"time_to_{int(q * 100)}"
            t, n_ok, n = mean_time(p, key)
            if t is None or n_ok < n:
                parts.append(f"reaches {int(q * 100)} % in {n_ok} of {n} seeds")
                continue
            comp = []
            for other in ("full", "random"):
                if other in pol:
                    to, no, nn = mean_time(other, key)
                    if to is None or no < nn:
                        comp.append(f"{LABELS[other]} reach it in {no} of {nn} seeds")
                        continue
                    mine = dict(zip(pol[p]["seeds"], pol[p][key]))
                    theirs = dict(zip(pol[other]["seeds"], pol[other][key]))
                    common = [s for s in mine if s in theirs]
                    sooner = sum(mine[s] < theirs[s] for s in common)
                    order = "sooner than" if t < to else "later than" if t > to else "as soon as"
                    comp.append(f"{order} {LABELS[other]} ({to:.1f} s; sooner in {sooner} of {len(common)} paired "
                                "seeds)")
            parts.append(f"reaches {int(q * 100)} % in {t:.1f} s, " + ", ".join(comp))
        loss = 100 * (np.mean(pol[p]["test_all"]) - np.mean(pol["full"]["test_all"]))
        out.append(f"- {LABELS[p]}: " + "; ".join(parts) + f"; final test top-1 {loss:+.1f} points vs all patches.")
    if "full_notebook" in pol:
        mine, nb = pol["full"], pol["full_notebook"]
        out.append(f"- Recipe check, all patches: final test top-1 {_ms(mine['test_all'], 4)} with the recipe, "
                   f"{_ms(nb['test_all'], 4)} with the notebook's optimiser (final validation "
                   f"{_ms(mine['final_val_top1'], 4)} vs {_ms(nb['final_val_top1'], 4)}).")
    return out


def make_plot(payload: Dict[str, Any], summary: Dict[str, Any], path: Path) -> None:
    """Validation top-1 against training wall time, one line per policy: mean over seeds per epoch, shaded
    ± std of the accuracy; dotted lines at 90 and 95 % of the all-patch target.

    :param payload: the benchmark's json payload.
    :param summary: from :func:`summarise`.
    :param path: the png to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in payload["policies"]:
        rs = [r for r in payload["runs"] if r["policy"] == p and r["curve"]]
        if not rs:
            continue
        n = min(len(r["curve"]) for r in rs)
        t = np.mean([[c["time_s"] for c in r["curve"][:n]] for r in rs], axis=0)
        acc = np.array([[c["val_top1"] for c in r["curve"][:n]] for r in rs])
        mean = acc.mean(axis=0)
        ax.plot(t, mean, color=COLORS[p], label=f"{LABELS[p]} ({len(rs)} seed{'s' if len(rs) > 1 else ''})", lw=1.6, marker="o", ms=2.5)
        if len(rs) > 1:
            sd = acc.std(axis=0, ddof=1)
            ax.fill_between(t, mean - sd, mean + sd, color=COLORS[p], alpha=0.15, lw=0)
    target = summary["target_val_top1"]
    if target is not None:
        for q in THRESHOLDS:
            ax.axhline(q * target, color="k", ls=":", lw=0.8)
            ax.text(ax.get_xlim()[1], q * target, f" {int(q * 100)} %", va="center", fontsize=8)
    env = payload["settings"]["env"]
    ax.set_title(f"ViT width {env['width']} depth {env['depth']}, batch {env['batch_size']}, k* = {env['n_keep']}"
                 f" ({payload['settings']['device']})", fontsize=10)
    ax.set_xlabel("training wall time (s, synchronised; validation excluded)")
    ax.set_ylabel("validation top-1 (all patches)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def render(payload: Dict[str, Any], out: Path) -> str:
    """Write agentvit_tta.md and agentvit_tta.png from a payload; return the markdown.

    :param payload: the benchmark's json payload (gets its ``summary``).
    :param out: the folder to write to.
    """
    summary = summarise(payload)
    payload["summary"] = summary
    md = make_markdown(payload, summary)
    atomic_write_text(md, out / "agentvit_tta.md")
    if payload["runs"]:
        make_plot(payload, summary, out / "agentvit_tta.png")
    return md


# ----------------------------------------------------------------------------------------------- main
def _save(payload: Dict[str, Any], out: Path) -> None:
    atomic_write_text(json.dumps(payload, indent=2, default=str), out / "agentvit_tta.json")


def main(argv: Optional[Sequence[str]] = None) -> int:
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    if args.render:
        path = Path(args.render)
        sys.stdout.write(render(json.loads(path.read_text()), path.parent))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = resolve_settings(args)
    device = torch.device(settings["device"])
    num_workers = args.num_workers if args.num_workers is not None else (6 if device.type == "cuda" else 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = settings_key(settings)
    json_path = out / "agentvit_tta.json"
    previous = json.loads(json_path.read_text()) if json_path.is_file() and not args.fresh else {}
    resumed = previous.get("settings_key") == key
    command = "python benchmarks/agentvit_tta.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload: Dict[str, Any] = {
        "settings": settings, "settings_key": key, "command": command.strip(), "machine": machine_info(),
        "policies": list(args.policies), "seeds": list(args.seeds),
        "runs": previous.get("runs", []) if resumed else [],
        "sizes": {"sizes": list(args.sizes), "batches": list(args.size_batches)},
        "step_times": previous.get("step_times", []) if resumed and previous.get("sizes") == {
            "sizes": list(args.sizes), "batches": list(args.size_batches)} else [], "skipped": [],
        "wall_time_s": previous.get("wall_time_s", 0.0) if resumed else 0.0}
    elapsed_before = payload["wall_time_s"]
    if resumed:
        print(f"[tta] resuming: {len(payload['runs'])} finished run(s) in {json_path}", flush=True)

    def elapsed() -> float:
        return time.perf_counter() - t_start

    def over_budget(estimate: float) -> bool:
        return args.budget_s is not None and elapsed() + estimate > args.budget_s

    splits = load_splits(settings)
    print(f"[tta] {splits!r} on {device}; {machine_info().get('cuda') or machine_info()['cpu']}", flush=True)
    if args.sizes and not payload["step_times"]:
        print("[tta] step time by model size:", flush=True)
        payload["step_times"] = step_time_sweep(args.sizes, args.size_batches, int(settings["env"]["n_keep"]),
                                                device, splits.num_classes)
        payload["wall_time_s"] = elapsed_before + elapsed()
        _save(payload, out)

    done = {(r["seed"], r["policy"]) for r in payload["runs"]}
    durations: Dict[str, float] = {}
    stopped = False
    main = [(seed, p) for seed in args.seeds for p in args.policies if p in MAIN_POLICIES]
    extra = [(seed, p) for seed in args.seeds for p in args.policies if p not in MAIN_POLICIES]
    for seed, policy in main + extra:
        if (seed, policy) in done:
            continue
        estimate = durations.get(policy, max(durations.values(), default=0.0))
        if stopped or over_budget(estimate):
            stopped = True
            payload["skipped"].append(f"{policy} seed {seed}")
            continue
        print(f"[tta] seed {seed} {LABELS[policy]} ({elapsed():.0f} s elapsed)", flush=True)
        t_run = time.perf_counter()
        result = run_one(policy, seed, settings, splits, num_workers, args.print_every)
        durations[policy] = time.perf_counter() - t_run
        payload["runs"].append(result)
        t = result["test"]
        print(f"[tta]   train {result['train_time_s']:.1f} s, kept {result['mean_kept']:.1f}, final val "
              f"{result['curve'][-1]['val_top1']:.4f}, test all {t['all']['top1']:.4f}"
              + (f" agent {t['agent']['top1']:.4f}" if "agent" in t else "")
              + f" random(k={result['eval_kept']}) {t['random']['top1']:.4f}", flush=True)
        payload["wall_time_s"] = elapsed_before + elapsed()
        _save(payload, out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    payload["wall_time_s"] = elapsed_before + elapsed()
    md = render(payload, out)
    _save(payload, out)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
