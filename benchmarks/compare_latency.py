"""Latency-aware pruning compared at equal *measured* latency (issue 25 item 5): uniform channel pruning at the
channel ratio that reaches the measured speed-up, global Taylor, the latency knapsack, RL-Pruner (improved mode) and
PPO with the latency budget, each after the same KD fine-tune; the table of MACs reduction vs measured speed-up at
batch 1 and 64 per agent; a verdict with the pooled seed std. Markdown + JSON + PNG in ``benchmarks/results``.

    python benchmarks/compare_latency.py                                  # 2x and 3x at batch 1, 3 seeds
    python benchmarks/compare_latency.py --speedups 2 --seeds 1 --budget 36 --finetune-epochs 0 --tag smoke
    python benchmarks/compare_latency.py --report-only                    # tables from the finished units

Units, each resumable and skipped once finished (rerun the same command to continue a killed benchmark):

1. ``{out-dir}/x{S}/uniform_ratio.json``: the uniform channel ratio whose built model measures S times faster
   than the original (batch 1, the latency setting's threads: bisected on measured latency, both models timed
   together in interleaved rounds), and the predicted latency of that model.
2. ``{out-dir}/x{S}/{agent}_s{seed}/``: one ``rl_prune.pipeline.run`` (``rl_prune.sweep.run_unit``) of the task
   config: uniform with a channel budget at that ratio (sparsity mode, one step), every other agent with a
   predicted-latency budget (``budget: latency``) at the predicted latency of the measured-matched uniform model
   (``--latency-target calibrated``, the default: the table's bias on the day is taken out) or at ``1 - 1/S``
   (``nominal``). The same evaluation budget caps every agent (``PruneMonitor`` / SB3's stop), the same KD
   fine-tune follows.
3. ``{out-dir}/x{S}/latency_measured.json``: the original and every finished unit's pruned model of the speed-up
   timed together, in one interleaved call per batch size (1 and 64; ``pruning_env.costs.measure_latency``), so all
   see the same machine (measured again when the set of finished units changes).

Measured latency needs a quiet machine: on a shared one, the thread clock (one thread) keeps most of the load out,
but not all (docs/latency.md).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agents.registry import AGENTS  # noqa: E402
from pruning_env.costs import LatencySetting, measure_latency  # noqa: E402
from pruning_env.pruning import Pruner  # noqa: E402
from pruning_env.pruning.pruner import PrunePlan  # noqa: E402
from pruning_env.runtime import atomic_write_text, machine_info  # noqa: E402
from rl_prune.config import ConfigError, load_config, parse_overrides  # noqa: E402
from rl_prune.pipeline import build_env, finetune_searched  # noqa: E402
from rl_prune.run_folder import RunFolder  # noqa: E402
from benchmarks.common import HIGHER, UNDECIDED, command_line, failures_section, fmt, mean_std, num  # noqa: E402
from benchmarks.common import repo_relative  # noqa: E402
from benchmarks.common import verdict as seed_verdict  # noqa: E402
from rl_prune.sweep import BENCH_CONFIG, exact_budget, load_unit, run_unit, unit_config, unit_failure  # noqa: E402

#: the agents of the issue's comparison
DEFAULT_AGENTS = ("uniform", "global_taylor", "latency_knapsack", "rl_pruner_improved", "ppo")
#: learned allocations (the verdict asks whether one beats the rules)
LEARNED = ("rl_pruner", "rl_pruner_improved", "rl_pruner_bounded", "ppo", "a2c", "sac", "td3", "ddpg", "trpo")
#: the rules a learned allocation is compared with (``uniform_matched``: the ``--matched`` control)
RULES = ("uniform", "latency_knapsack", "uniform_matched")
#: pseudo-agent of the ``--matched`` control: uniform pruning at the best learned agent's measured latency
MATCHED = "uniform_matched"
#: per-speed-up file of the matched control's uniform ratio
MATCHED_RATIO_FILE = "uniform_matched_ratio.json"
#: per-speed-up file of the measured latencies (every finished unit's pruned model and the original, together)
MEASURED_FILE = "latency_measured.json"
#: the uniform ratio unit of one speed-up
RATIO_FILE = "uniform_ratio.json"
#: batch sizes of the measured table
BATCHES = (1, 64)


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(BENCH_CONFIG), help="train_agent.py YAML config of the task")
    p.add_argument("--agents", nargs="+", default=list(DEFAULT_AGENTS), choices=sorted(AGENTS), metavar="AGENT",
                   help=f"agents to compare (default: {' '.join(DEFAULT_AGENTS)})")
    p.add_argument("--speedups", nargs="+", type=float, default=[2.0, 3.0],
                   help="measured speed-ups over the original at batch 1 (default 2 3)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--budget", type=int, default=None,
                   help="evaluations per agent (default: the smallest budget >= the config's that every agent spends "
                        "exactly, rl_prune.sweep.exact_budget; 93 for the benchmark task: 3 steps, config budget 90)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="KD fine-tune epochs of every unit (default 5)")
    p.add_argument("--latency-target", choices=("calibrated", "nominal"), default="calibrated",
                   help="predicted-latency budget of the latency agents: the predicted latency of the uniform model "
                        "that measures S x faster (calibrated, default) or 1 - 1/S (nominal)")
    p.add_argument("--bisect-rounds", type=int, default=10, help="timing rounds per bisection point (default 10)")
    p.add_argument("--bisect-steps", type=int, default=9, help="bisection steps on the channel ratio (default 9)")
    p.add_argument("--measure-rounds", type=int, default=30,
                   help="timing rounds of the measured table per speed-up and batch size (default 30)")
    p.add_argument("--ft-check-epochs", type=int, default=0,
                   help="also fine-tune every unit's searched model for this many epochs (same recipe and seed) and "
                        "report whether the agents' ranking is the same after it (0: no check, the default)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="further config overrides of every unit (e.g. env.reward_samples=100)")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "compare_latency"), help="unit folders")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where the report goes")
    p.add_argument("--tag", default="", help="suffix of the result files (compare_latency_TAG.*)")
    p.add_argument("--matched", action="store_true",
                   help="also run the control 'uniform_matched' per speed-up: uniform pruning at the mean measured "
                        "batch-1 speed-up of the best learned agent (after the longer fine-tune when there is one), "
                        "so a learned allocation that ends a little slower than uniform is also compared at its own "
                        "latency; needs the speed-up's units finished and measured")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished units")
    return p


def speedup_dir(out_dir: Path, speedup: float) -> Path:
    """Units of one speed-up: ``{out_dir}/x2`` for 2.0, ``x2.5`` for 2.5."""
    return Path(out_dir) / f"x{speedup:g}"


def base_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """Overrides of every unit: ``--set`` and the fine-tune length; rewards are accuracy alone (the budget fixes
    the cost)."""
    over: Dict[str, Any] = {"env.alpha": 0.0, "env.beta": 0.0, "env.gamma": 0.0}
    over.update(parse_overrides(args.set))
    over["finetune.epochs"] = int(args.finetune_epochs)
    return over


def uniform_overrides(args: argparse.Namespace, ratio: Dict[str, Any]) -> Dict[str, Any]:
    """The uniform unit: one step, per-group sparsity mode, a channel budget at the bisected ratio."""
    return {**base_overrides(args), "env.action_mode": "sparsity", "env.budget": "channels",
            "env.target_metric": "channels", "env.target": float(ratio["channel_sparsity"]), "env.n_steps": 1}


def latency_overrides(args: argparse.Namespace, target: float) -> Dict[str, Any]:
    """A latency agent's unit: the predicted-latency budget (the env's default latency setting: CPU, batch 1, the
    config's threads)."""
    return {**base_overrides(args), "env.budget": "latency", "env.target_metric": "latency",
            "env.target": float(target)}


# ---------------------------------------------------------------------------------------- the uniform ratio unit
def _pruner(env: Any) -> Pruner:
    cfg = env.config
    return Pruner(copy.deepcopy(env.original_model).cpu().eval(), torch.zeros(1, *env.input_size),
                  ignore=cfg.ignore_layers, min_channels=cfg.min_channels, round_to=cfg.round_to,
                  prune_normalized=cfg.prune_normalized)


def channel_sparsity(keep: np.ndarray, full: np.ndarray, layers: np.ndarray) -> float:
    """The env's ``channels`` metric: removed layer-channels over all (each group counted once per member layer)."""
    return 1.0 - float((layers * keep).sum()) / float((layers * full).sum())


def bisect_uniform(args: argparse.Namespace, speedup: float, setting: LatencySetting, env: Any,
                   reference: Optional[Sequence[torch.nn.Module]] = None) -> Dict[str, Any]:
    """The smallest uniform per-group sparsity whose built model measures ``speedup`` times faster than the
    original (both timed together, interleaved), bisected on the measured speed-up; and what the latency model
    predicts for it.

    :param args: the command line (bisection steps and rounds).
    :param speedup: the measured speed-up to reach.
    :param setting: the latency setting (batch 1).
    :param env: a latency-budget env of the task (its original model, groups and latency model).
    :param reference: models to time against instead of the original (the ``--matched`` control: the best learned
        agent's pruned models, their mean latency over the candidate's, ``speedup`` 1.0 = as fast as they are),
        timed together with each candidate so the machine's drift between moments cancels.
    :raises RuntimeError: the speed-up is out of reach even at every group's floor.
    """
    pruner = _pruner(env)
    full = pruner.num_channels.astype(np.int64)
    layers = np.asarray(pruner.layer_counts, dtype=np.int64)
    original = pruner.model
    against = [original] if reference is None else list(reference)
    cache: Dict[Tuple[int, ...], float] = {}
    history: List[Dict[str, Any]] = []

    def measured(r: float) -> Tuple[float, np.ndarray]:
        keep = pruner.keep_counts(np.full(len(full), r))
        key = tuple(int(k) for k in keep)
        if key not in cache:
            # which channels go does not change the latency: the first k of each group, as the latency table
            model = pruner.apply(PrunePlan.from_indices([range(int(k)) for k in keep])).eval()
            t = measure_latency(against + [model], env.input_size, setting, rounds=args.bisect_rounds,
                                seed=len(history), progress=False)
            cache[key] = float(np.mean(t[:-1]) / t[-1])
            history.append({"ratio": float(r), "kept": list(key), "measured_speedup": cache[key],
                            "original_s": float(np.mean(t[:-1])), "pruned_s": float(t[-1])})
            print(f"  x{speedup:g}: ratio {r:.4f} -> measured {cache[key]:.3f}x", file=sys.stderr, flush=True)
        return cache[key], keep

    lo, hi = 0.0, 0.98
    if measured(hi)[0] < speedup:
        raise RuntimeError(f"a measured speed-up of {speedup:g}x is out of reach with uniform pruning: every group at "
                           f"its floor (min_channels {env.config.min_channels}) measures {measured(hi)[0]:.2f}x")
    for _ in range(int(args.bisect_steps)):
        mid = 0.5 * (lo + hi)
        if measured(mid)[0] >= speedup:
            hi = mid
        else:
            lo = mid
    value, keep = measured(hi)
    model = env.latency_model
    predicted = float(model.predict(keep)) if model is not None else None
    return {"speedup": float(speedup), "ratio": float(hi), "kept": [int(k) for k in keep],
            "measured_speedup": value, "channel_sparsity": channel_sparsity(keep, full, layers),
            "predicted_s": predicted, "predicted_original_s": None if model is None else float(model.original),
            "predicted_reduction": None if model is None else 1.0 - predicted / float(model.original),
            "setting": setting.tag, "clock": setting.resolve_clock(), "rounds": int(args.bisect_rounds),
            "history": history, "machine": machine_info(setting.threads), "load_average": _load()}


def ratio_unit(args: argparse.Namespace, speedup: float, budget: int) -> Dict[str, Any]:
    """The uniform ratio of one speed-up, from its file or bisected now (and written atomically)."""
    path = speedup_dir(Path(args.out_dir), speedup) / RATIO_FILE
    if path.is_file():
        return json.loads(path.read_text())
    print(f"bisecting the uniform ratio for x{speedup:g} (measured)", file=sys.stderr)
    result = bisect_on_task(args, speedup, budget)
    atomic_write_text(json.dumps(result, indent=2), path)
    return result


def bisect_on_task(args: argparse.Namespace, speedup: float, budget: int,
                   reference: Optional[Sequence[torch.nn.Module]] = None) -> Dict[str, Any]:
    """:func:`bisect_uniform` on the task's latency-budget env (its groups and latency table, built once, then
    cached), closed afterwards."""
    cfg = unit_config(args.config, "latency_knapsack", 0, budget, latency_overrides(args, 0.5))
    env = build_env(cfg, "latency_knapsack")
    try:
        return bisect_uniform(args, speedup, env.latency_model.setting, env, reference=reference)
    finally:
        env.close()


def matched_ratio_unit(args: argparse.Namespace, speedup: float, budget: int) -> Optional[Dict[str, Any]]:
    """The ``--matched`` control's uniform ratio of one speed-up (from its file, or bisected now): the uniform model
    that measures as fast as the best learned agent's models (the smallest uniform ratio at least as fast as their
    mean latency, each candidate timed together with them, so the machine's drift between moments cancels).
    None when the speed-up's units are not all finished and measured yet.
    """
    folder = speedup_dir(Path(args.out_dir), speedup)
    path = folder / MATCHED_RATIO_FILE
    if path.is_file():
        return json.loads(path.read_text())
    measured_path, ratio_path = folder / MEASURED_FILE, folder / RATIO_FILE
    if not (measured_path.is_file() and ratio_path.is_file()):
        return None
    measured = json.loads(measured_path.read_text())["batches"].get("1", {}).get("speedup", {})
    units = {a: [measured.get(f"{a}_s{seed}") for seed in range(args.seeds)] for a in args.agents}
    if "uniform" not in units or any(v is None for runs in units.values() for v in runs):
        return None
    score = {}
    for agent in args.agents:
        if agent not in LEARNED:
            continue
        tops = []
        for seed in range(args.seeds):
            run = folder / f"{agent}_s{seed}"
            check = run / f"ft_check_e{args.ft_check_epochs}.json"
            m = load_unit(run)
            tops.append(json.loads(check.read_text())["test_top1"] if args.ft_check_epochs > 0 and check.is_file()
                        else (m or {}).get("pruned", {}).get("test_top1", float("nan")))
        score[agent] = float(np.mean(tops))
    if not score:
        return None
    best = max(score, key=score.get)
    s_best = float(np.mean(units[best]))
    s_uniform = float(np.mean(units["uniform"]))
    reference = [torch.load(RunFolder(folder / f"{best}_s{seed}").file(RunFolder.PRUNED_MODEL), map_location="cpu",
                            weights_only=False).eval() for seed in range(args.seeds)]
    print(f"bisecting the matched uniform ratio for x{speedup:g}: {best} measured {s_best:.3f}x together "
          f"(uniform {s_uniform:.3f}x); each candidate timed with {best}'s models", file=sys.stderr)
    result = bisect_on_task(args, 1.0, budget, reference=reference)
    result.update(matched_agent=best, matched_speedup=s_best, uniform_joint_speedup=s_uniform,
                  measured_against=f"{best}'s pruned models (mean latency), not the original")
    atomic_write_text(json.dumps(result, indent=2), path)
    return result


def latency_target(args: argparse.Namespace, ratio: Dict[str, Any]) -> float:
    """The predicted-latency reduction the latency agents are budgeted at."""
    if args.latency_target == "nominal" or ratio.get("predicted_reduction") is None:
        return 1.0 - 1.0 / float(ratio["speedup"])
    return float(ratio["predicted_reduction"])


# ------------------------------------------------------------------------------------------ measuring the units
def measure_target(folder: Path, run_dirs: Sequence[Path], rounds: int, threads: int) -> Dict[str, Any]:
    """``{folder}/latency_measured.json``: the original and every finished unit's pruned model of one speed-up,
    timed together in one interleaved call per batch size of :data:`BATCHES` (so all see the same machine); read
    back while the set of units is the same, measured again (and written atomically) when it changed.

    :param folder: the speed-up's folder.
    :param run_dirs: its finished units.
    :param rounds: timing rounds.
    :param threads: torch threads of the setting.
    :return: ``{"units": [names], "batches": {b: {"original_s", "pruned_s": {name: s}, "speedup": {name: x}}}}``.
    """
    path = Path(folder) / MEASURED_FILE
    names = sorted(Path(d).name for d in run_dirs)
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("units") == names and old.get("rounds") == int(rounds) and old.get("threads") == int(threads):
            return old
    out: Dict[str, Any] = {"units": names, "rounds": int(rounds), "threads": int(threads), "batches": {}}
    if not names:
        return out
    first = RunFolder(Path(folder) / names[0])
    load = lambda f, n: torch.load(f.file(n), map_location="cpu", weights_only=False).eval()  # noqa: E731
    models = [load(first, RunFolder.ORIGINAL_MODEL)] + [load(RunFolder(Path(folder) / n), RunFolder.PRUNED_MODEL)
                                                        for n in names]
    input_size = first.read_metrics()["input_size"]
    for batch in BATCHES:
        setting = LatencySetting(threads=threads, batch_size=batch)
        t = measure_latency(models, input_size, setting, rounds=rounds, desc=f"{Path(folder).name} b{batch}")
        out["batches"][str(batch)] = {"setting": setting.tag, "clock": setting.resolve_clock(),
                                      "original_s": float(t[0]),
                                      "pruned_s": {n: float(v) for n, v in zip(names, t[1:])},
                                      "speedup": {n: float(t[0] / v) for n, v in zip(names, t[1:])}}
    out.update(machine=machine_info(threads), load_average=_load())
    atomic_write_text(json.dumps(out, indent=2), path)
    return out


def _load() -> Optional[List[float]]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# -------------------------------------------------------------------------------------- the fine-tune-length check
def ft_check_unit(args: argparse.Namespace, run_dir: Path, agent: str, seed: int, over: Dict[str, Any],
                  budget: int) -> Optional[Dict[str, Any]]:
    """``ft_check_e{E}.json`` of a finished unit: its searched model fine-tuned for ``--ft-check-epochs`` epochs
    with the unit's recipe and seed (``rl_prune.pipeline.finetune_searched``); read back when it exists."""
    epochs = int(args.ft_check_epochs)
    path = Path(run_dir) / f"ft_check_e{epochs}.json"
    if path.is_file():
        return json.loads(path.read_text())
    folder = RunFolder(run_dir)
    if epochs < 1 or not folder.is_finished:
        return None
    cfg = unit_config(args.config, agent, seed, budget, {**over, "finetune.epochs": epochs})
    try:
        result = finetune_searched(cfg, folder, seed=seed)
    except FileNotFoundError as err:  # a unit written before runs kept their searched model
        print(f"{run_dir}: no fine-tune-length check: {err}", file=sys.stderr)
        return None
    record = {"epochs": epochs, "test_top1": result["report"]["test_top1"], "result": result}
    atomic_write_text(json.dumps(record, indent=2, default=float), path)
    return record


def ranking_check(summary: Dict[str, Any], epochs: int) -> Optional[Dict[str, Any]]:
    """Whether the agents rank the same by test top-1 after the units' fine-tune and after the ``epochs`` one."""
    key = "test_top1_long"
    agents = [a for a, row in summary.items() if row.get(key)]
    if epochs < 1 or len(agents) < 2:
        return None
    short = sorted(agents, key=lambda a: -summary[a]["test_top1"]["mean"])
    long = sorted(agents, key=lambda a: -summary[a][key]["mean"])
    same = short == long
    outcome = "the same" if same else "it changes: the units' fine-tune is too short for a stable ranking"
    text = (f"ranking after the units' fine-tune: {' > '.join(short)}; after {epochs} epochs: {' > '.join(long)}"
            f" ({outcome})")
    return {"short": short, "long": long, "stable": same, "text": text}


# ------------------------------------------------------------------------------------------------- the report
def versus(summary: Dict[str, Any], agent: str, other: str, key: str = "test_top1") -> Dict[str, Any]:
    """``agent`` minus ``other`` on ``key`` against the pooled seed std (``benchmarks.common.verdict``)."""
    return {"agent": agent, "other": other, **seed_verdict(summary[agent][key], summary[other][key])}


def unit_row(m: Dict[str, Any], name: str, measured: Dict[str, Any], ratio: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers of one finished unit (a uniform unit's predicted latency is its ratio unit's, when it kept the
    same channels)."""
    row = {"seed": m["seed"], "test_top1": m["pruned"]["test_top1"],
           "test_before_ft": m["pruned_before_finetune"]["test_top1"], "macs_reduction": m["flops_reduction"],
           "params_reduction": m["params_reduction"], "n_evaluations": m["n_evaluations"],
           "search_s": m["seconds"]["search"], "kept_channels": m["kept_channels"]}
    predicted = (m.get("latency") or {}).get("predicted")
    row["predicted_speedup"] = None if predicted is None else predicted["speedup"]
    if predicted is None and ratio.get("predicted_s") and list(m["kept_channels"]) == list(ratio["kept"]):
        row["predicted_speedup"] = float(ratio["predicted_original_s"]) / float(ratio["predicted_s"])
    for batch in BATCHES:
        b = measured.get("batches", {}).get(str(batch)) or {}
        row[f"speedup_b{batch}"] = b.get("speedup", {}).get(name)
    row["test_top1_long"] = None
    return row


def summarise(rows: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    """Mean ± std per agent of every numeric column."""
    keys = ("test_top1", "test_top1_long", "test_before_ft", "macs_reduction", "params_reduction", "n_evaluations",
            "search_s",
            "predicted_speedup", *(f"speedup_b{b}" for b in BATCHES))
    out: Dict[str, Any] = {}
    for agent, runs in rows.items():
        if runs:
            out[agent] = {"seeds": [r["seed"] for r in runs]}
            for key in keys:
                values = [r[key] for r in runs if r[key] is not None]
                out[agent][key] = mean_std(values) if values else None
    return out


def verdict(summary: Dict[str, Any], key: str = "test_top1") -> Dict[str, Any]:
    """Best learned allocation vs uniform and vs the knapsack on test top-1 after the fine-tune (``key``:
    ``"test_top1"``, the units' fine-tune, or ``"test_top1_long"``, the longer one of ``--ft-check-epochs``)."""
    learned = [a for a in summary if a in LEARNED and summary[a].get(key)]
    rules = [a for a in RULES if a in summary and summary[a].get(key)]
    if not learned or not rules:
        return {"text": "not enough agents finished for a verdict", "pairs": [], "key": key}
    best = max(learned, key=lambda a: summary[a][key]["mean"])
    pairs = [versus(summary, best, rule, key) for rule in rules]
    if any(p["verdict"] == UNDECIDED for p in pairs):
        text = (f"no verdict: fewer than two seeds give no pooled std (the best learned allocation, {best}, differs by "
                + ", ".join(f"{100 * p['diff']:+.2f} pp from {p['other']}" for p in pairs) + ")")
        return {"best_learned": best, "pairs": pairs, "beats_all": None, "text": text, "key": key}
    beats_all = all(p["verdict"] == HIGHER for p in pairs)
    text = (f"the best learned allocation, {best}, against " + "; against ".join(
        f"{p['other']}: {p['verdict']} ({100 * p['diff']:+.2f} pp, pooled std {100 * p['pooled_std']:.2f} pp)"
        for p in pairs)
            + (". A learned latency-aware allocation beats uniform and the knapsack by more than one pooled std."
               if beats_all else ". It does not beat " + " and ".join(p["other"] for p in pairs
                                                                     if p["verdict"] != HIGHER)
               + " by more than one pooled std."))
    return {"best_learned": best, "pairs": pairs, "beats_all": beats_all, "text": text, "key": key}


def headline(block: Dict[str, Any]) -> Dict[str, Any]:
    """The verdict a speed-up's block states first: on the longer fine-tune when every agent has one (the ranking
    check's length: the shorter one may not give a stable ranking), else on the units' fine-tune."""
    long = block.get("verdict_long")
    return long if long and long.get("pairs") and all(
        block["summary"][a].get("test_top1_long") for a in block["summary"]) else block["verdict"]


def latency_match(summary: Dict[str, Any], speedup: float, tolerance: float = 0.1) -> Dict[str, Any]:
    """Whether the agents' mean measured speed-ups at batch 1, timed together, lie within ``tolerance`` (relative)
    of their median: the comparison is at equal measured latency only then (the latency agents are budgeted in
    predicted latency, uniform on the bisection's measurement, taken at another moment). How far the median is from
    the target ``speedup`` is reported too.

    :param summary: from :func:`summarise`.
    :param speedup: the target speed-up.
    :param tolerance: relative spread allowed around the median.
    """
    measured = {a: row["speedup_b1"]["mean"] for a, row in summary.items() if row.get("speedup_b1")}
    if not measured:
        return {"ok": None, "off": {}, "median": None, "text": "no unit measured yet"}
    median = float(np.median(list(measured.values())))
    off = {a: v for a, v in measured.items() if abs(v / median - 1.0) > tolerance}
    text = (f"measured together, the agents' speed-ups at batch 1 range from {min(measured.values()):.2f}x to "
            f"{max(measured.values()):.2f}x (median {median:.2f}x, target {speedup:g}x); ")
    text += (f"all within {tolerance:.0%} of the median: equal measured latency holds." if not off else
             f"outside {tolerance:.0%} of the median: " + ", ".join(f"{a} {v:.2f}x" for a, v in off.items())
             + ", so these are not at equal measured latency with the rest (their accuracy is not comparable as "
               "such).")
    return {"ok": not off, "off": off, "median": median, "text": text}


def _headline_top1(row: Dict[str, Any]) -> float:
    """A unit's test top-1 after the longer fine-tune when it has one (the headline verdict's), else the units'."""
    return row["test_top1_long"] if row.get("test_top1_long") is not None else row["test_top1"]


def plot(blocks: Dict[str, Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = sorted({a for b in blocks.values() for a in b["rows"]})
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(agents)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for s, block in blocks.items():
        for agent, runs in block["rows"].items():
            pts = [r for r in runs if r["speedup_b1"] is not None]
            if not pts:
                continue
            axes[0].scatter([r["speedup_b1"] for r in pts], [100 * _headline_top1(r) for r in pts], color=colors[agent],
                            marker="o" if s == min(blocks) else "s", s=28,
                            label=f"{agent}" if s == min(blocks) else None)
            for batch, marker in ((1, "o"), (64, "^")):
                q = [r for r in pts if r[f"speedup_b{batch}"] is not None]
                axes[1].scatter([100 * r["macs_reduction"] for r in q], [r[f"speedup_b{batch}"] for r in q],
                                color=colors[agent], marker=marker, s=28,
                                label=f"{agent} b{batch}" if s == min(blocks) else None)
        axes[0].axvline(float(s), color="#999999", lw=0.8, ls="--")
    axes[0].set_xlabel("measured speed-up, batch 1")
    longer = any(r.get("test_top1_long") is not None for b in blocks.values() for runs in b["rows"].values()
                 for r in runs)
    axes[0].set_ylabel("test top-1 after the longer KD fine-tune (%)" if longer else "test top-1 after KD fine-tune (%)")
    axes[0].set_title("accuracy at equal measured latency (dashed: the targets)")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("MACs reduction (%)")
    axes[1].set_ylabel("measured speed-up (o batch 1, ^ batch 64)")
    axes[1].set_title("MACs reduction vs measured speed-up")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_text(load: Optional[Sequence[float]]) -> str:
    return "n/a" if not load else "/".join(f"{v:.2f}" for v in load)


def _times(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _cell(stat: Optional[Dict[str, float]], digits: int = 3, pct: bool = False, suffix: str = "") -> str:
    return "n/a" if stat is None else fmt(stat, digits, pct) + suffix


def _spending(blocks: Dict[str, Dict[str, Any]], budget: int) -> str:
    """A sentence naming the searching agents that used fewer evaluations than the budget (the budget is a cap:
    RL-Pruner's schedule is the largest ``n_steps * (lr_epoch * sample_num + 1)`` that fits, the rules evaluate once
    per step), so an unequal spend is stated, not hidden in the table."""
    used: Dict[str, List[int]] = {}
    for block in blocks.values():
        for agent, runs in block["rows"].items():
            used.setdefault(agent, []).extend(int(r["n_evaluations"]) for r in runs)
    short = {a: sorted(set(v)) for a, v in used.items() if v and a in LEARNED and max(v) < budget}
    if not short:
        return ""
    return ("Evaluations used of the budget of " + str(budget) + ": " + ", ".join(
        f"{a} {'/'.join(map(str, v))}" for a, v in short.items())
        + " (fewer than the others' learned search: its budget-derived schedule is the largest that fits in the cap; "
          "the rules use one per step by design).")


def _verdict_lines(block: Dict[str, Any], s: str, meta: Dict[str, Any]) -> List[str]:
    head = headline(block)
    if head is block["verdict"]:
        return [f"**Verdict ({s}x, the units' fine-tune):** {head['text']}"]
    return [f"**Verdict ({s}x, the longer fine-tune of {meta.get('ft_check_epochs')} epochs):** {head['text']}", "",
            f"After the units' fine-tune: {block['verdict']['text']}"]


def render(meta: Dict[str, Any], blocks: Dict[str, Dict[str, Any]], failures: Dict[str, str],
           missing: List[str]) -> str:
    lines = [f"# Latency-aware pruning at equal measured latency ({meta['task']})", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']['cpu']}, {meta['machine']['cpu_count']} cores, torch {meta['machine']['torch']}"
             f"; latency measured with one torch thread ({meta['clock']} clock); load average (1, 5, 15 min) when "
             f"each speed-up's units were timed together: "
             + ", ".join(f"{s}x {_load_text(b.get('measured_load_average'))}" for s, b in blocks.items()) + ".", ""]
    if meta.get("smoke"):
        lines += ["**Smoke run** (tiny budget and fine-tune, noisy machine): it shows the harness end to end; its "
                  "numbers are not results.", ""]
    lines += [f"Task: `{meta['config']}`; {meta['seeds']} seed(s); evaluation budget {meta['budget']} per agent "
              f"(enforced: the largest number used is {meta['max_evaluations']}); KD fine-tune: {meta['finetune']}. "
              f"Uniform: the channel ratio bisected on measured latency (batch 1); the other agents: a "
              f"predicted-latency budget ({meta['latency_target']}: "
              + ("the predicted latency of the measured-matched uniform model" if meta["latency_target"] ==
                 "calibrated" else "1 - 1/S") + "), reward = accuracy.", ""]
    spent = _spending(blocks, int(meta["budget"]))
    if spent:
        lines += [spent, ""]
    for s, block in blocks.items():
        ratio, summary = block["ratio"], block["summary"]
        lines += [f"## {s}x faster at batch 1", "",
                  f"Uniform ratio {ratio['ratio']:.4f} per group (channel sparsity {ratio['channel_sparsity']:.3f}) "
                  f"measured {ratio['measured_speedup']:.3f}x in the bisection; its predicted latency reduction "
                  f"{num(ratio.get('predicted_reduction'), '.3f')} is the latency agents' budget "
                  f"{block['latency_target']:.3f}.", "",
                  "| agent | seeds | test top-1 after FT | after the longer FT | before FT | MACs reduction | "
                  "measured speed-up b1 | measured speed-up b64 | predicted speed-up | evaluations |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for agent, row in summary.items():
            lines.append(f"| {agent} | {len(row['seeds'])} | {_cell(row['test_top1'], 2, True)} | "
                         f"{_cell(row['test_top1_long'], 2, True)} | "
                         f"{_cell(row['test_before_ft'], 2, True)} | {_cell(row['macs_reduction'], 1, True, ' %')} | "
                         f"{_cell(row['speedup_b1'], 2, suffix='x')} | {_cell(row['speedup_b64'], 2, suffix='x')} | "
                         f"{_cell(row['predicted_speedup'], 2, suffix='x')} | {_cell(row['n_evaluations'], 0)} |")
        if block.get("ranking"):
            lines += ["", f"Fine-tune length check: {block['ranking']['text']}."]
        lines += ["", f"Equal measured latency: {block['match']['text']}", "",
                  *_verdict_lines(block, s, meta), ""]
    lines += ["## MACs reduction vs measured speed-up (every unit)", "",
              "| speed-up target | agent | seed | MACs reduction | measured b1 | measured b64 | predicted b1 |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for s, block in blocks.items():
        for agent, runs in block["rows"].items():
            for r in runs:
                lines.append(f"| {s}x | {agent} | {r['seed']} | {100 * r['macs_reduction']:.1f} % | "
                             f"{_times(r['speedup_b1'])} | {_times(r['speedup_b64'])} | "
                             f"{_times(r['predicted_speedup'])} |")
    lines.append("")
    lines += failures_section(failures, missing, "the units' error.txt")
    return "\n".join(lines) + "\n"


def write_report(args: argparse.Namespace, seeds: List[int], budget: int, smoke: bool) -> Optional[Path]:
    """Gather the finished units (measuring those not measured yet) and write compare_latency[_TAG].md|json|png."""
    threads = int(load_config(args.config).env_kwargs("latency_knapsack").get("latency_threads", 1))
    blocks: Dict[str, Dict[str, Any]] = {}
    failures: Dict[str, str] = {}
    missing: List[str] = []
    done: List[Dict[str, Any]] = []
    for s in args.speedups:
        folder = speedup_dir(Path(args.out_dir), s)
        if not (folder / RATIO_FILE).is_file():
            missing.append(f"{folder.name}/{RATIO_FILE}")
            continue
        ratio = json.loads((folder / RATIO_FILE).read_text())
        agents = list(args.agents) + ([MATCHED] if (folder / MATCHED_RATIO_FILE).is_file() else [])
        rows: Dict[str, List[Dict[str, Any]]] = {a: [] for a in agents}
        finished: List[Tuple[str, Path, Dict[str, Any]]] = []
        for agent in agents:
            for seed in seeds:
                run_dir = folder / f"{agent}_s{seed}"
                m = load_unit(run_dir)
                if m is None:
                    tb = unit_failure(run_dir)
                    if tb is not None:
                        failures[f"{folder.name}/{run_dir.name}"] = tb
                    else:
                        missing.append(f"{folder.name}/{run_dir.name}")
                    continue
                done.append(m)
                finished.append((agent, run_dir, m))
        measured = measure_target(folder, [d for _, d, _ in finished], args.measure_rounds, threads)
        for agent, run_dir, m in finished:
            row = unit_row(m, run_dir.name, measured, ratio)
            check = Path(run_dir) / f"ft_check_e{args.ft_check_epochs}.json"
            if args.ft_check_epochs > 0 and check.is_file():
                row["test_top1_long"] = json.loads(check.read_text())["test_top1"]
            rows[agent].append(row)
        summary = summarise(rows)
        blocks[f"{s:g}"] = {"ratio": {k: v for k, v in ratio.items() if k != "history"}, "rows": rows,
                            "summary": summary, "verdict": verdict(summary),
                            "verdict_long": verdict(summary, "test_top1_long") if args.ft_check_epochs > 0 else None,
                            "match": latency_match(summary, s),
                            "ranking": ranking_check(summary, args.ft_check_epochs),
                            "latency_target": latency_target(args, ratio),
                            "measured_load_average": measured.get("load_average")}
    if not done:
        print("no finished units yet: nothing to report", file=sys.stderr)
        return None
    cfg = load_config(args.config, base_overrides(args))
    env = cfg.env_kwargs(args.agents[0])
    from dataclasses import asdict

    meta = {"task": f"{env.get('model')} w{env.get('width')} on {done[0]['dataset']}",
            "config": repo_relative(args.config),
            "seeds": len(seeds), "budget": budget, "max_evaluations": max(int(m["n_evaluations"]) for m in done),
            "finetune": ", ".join(f"{k} {v}" for k, v in asdict(cfg.finetune).items()),
            "latency_target": args.latency_target, "clock": LatencySetting(threads=threads).resolve_clock(),
            "machine": machine_info(threads), "load_average": _load(), "smoke": smoke,
            "original_test_top1": done[0]["original"]["test_top1"], "ft_check_epochs": args.ft_check_epochs,
            "command": command_line("benchmarks/compare_latency.py", sys.argv[1:])}
    if meta["max_evaluations"] > budget:
        raise RuntimeError(f"a unit used {meta['max_evaluations']} evaluations, more than the budget {budget}")
    results = Path(args.results)
    stem = "compare_latency" + (f"_{args.tag}" if args.tag else "")
    results.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "failures": failures, "missing": missing, "speedups": blocks}
    atomic_write_text(json.dumps(payload, indent=2, default=float), results / f"{stem}.json")
    plot(blocks, results / f"{stem}.png")
    atomic_write_text(render(meta, blocks, failures, missing), results / f"{stem}.md")
    return results / f"{stem}.md"


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    bad = [s for s in args.speedups if not s > 1.0]
    if bad:
        print(f"error: --speedups must be measured speed-ups above 1, got {bad}", file=sys.stderr)
        return 2
    if args.ft_check_epochs < 0:
        print(f"error: --ft-check-epochs must be >= 0, got {args.ft_check_epochs}", file=sys.stderr)
        return 2
    for key in ("bisect_rounds", "bisect_steps", "measure_rounds"):
        if getattr(args, key) < 1:
            print(f"error: --{key.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
        budget = int(args.budget or exact_budget(int(cfg.env.get("n_steps", 1) or 1), int(cfg.budget or 90)))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    smoke = bool(args.tag and "smoke" in args.tag)
    if not args.report_only:
        from tqdm.auto import tqdm

        ratios = {s: ratio_unit(args, s, budget) for s in args.speedups}
        units = [(seed, s, a) for seed in seeds for s in args.speedups for a in args.agents]
        bar = tqdm(units, desc="compare_latency", unit="run", dynamic_ncols=True)
        for seed, s, agent in bar:
            run_dir = speedup_dir(Path(args.out_dir), s) / f"{agent}_s{seed}"
            bar.set_postfix(unit=f"{run_dir.parent.name}/{run_dir.name}")
            over = uniform_overrides(args, ratios[s]) if agent == "uniform" else \
                latency_overrides(args, latency_target(args, ratios[s]))
            cfg = unit_config(args.config, agent, seed, budget, over)
            started = time.perf_counter()
            status = run_unit(cfg, agent, run_dir)
            if status["status"] == "done":
                print(f"{run_dir}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            if args.ft_check_epochs > 0:
                ft_check_unit(args, run_dir, agent, seed, over, budget)
        if args.matched:
            write_report(args, seeds, budget, smoke)  # measures the finished units together (the control's target)
            for s in args.speedups:
                matched = matched_ratio_unit(args, s, budget)
                if matched is None:
                    print(f"x{s:g}: no matched control yet (the speed-up's units are not all finished and measured)",
                          file=sys.stderr)
                    continue
                over = uniform_overrides(args, matched)
                for seed in seeds:
                    run_dir = speedup_dir(Path(args.out_dir), s) / f"{MATCHED}_s{seed}"
                    run_unit(unit_config(args.config, "uniform", seed, budget, over), "uniform", run_dir)
                    if args.ft_check_epochs > 0:
                        ft_check_unit(args, run_dir, "uniform", seed, over, budget)
    path = write_report(args, seeds, budget, smoke)
    if path is not None:
        print(f"wrote {path} (.json, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
