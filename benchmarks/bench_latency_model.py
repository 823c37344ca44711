"""Latency model against reality: predicted vs measured latency of random pruned models that meet MACs budgets.

For every (model, setting) unit: build (or load) the model's latency table, draw random per-group kept ratios scaled
to meet each MACs budget, build those pruned models and time them all (interleaved rounds, medians), then compare
with ``LatencyModel.predict(keep)`` (median and worst absolute % error, Spearman rho) and with the MACs-only
predictor's rho. Units are resumable: a finished (model, setting) is kept unless ``--force``.

    nice -n 10 python benchmarks/bench_latency_model.py            # 3 models x CPU 1 thread x batch 1, 64
    python benchmarks/bench_latency_model.py --threads 1 2 --tag threads
    python benchmarks/bench_latency_model.py --device cuda --batch 1 64 --tag cuda
    nice -n 10 python benchmarks/bench_latency_model.py --build-only --models vgg19:1 resnet56:1 ...   # build times
Writes benchmarks/results/bench_latency_model{_TAG}.md|json|png (``--build-only``: bench_latency_build{_TAG}.md|json,
the seconds a table takes to build, each measured fresh into a temporary cache).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from pruning_env.costs.latency import CLOCKS, LatencyModel, LatencySetting, measure_latency
from pruning_env.models import create_model
from pruning_env.pruning import Pruner, PrunePlan
from pruning_env.runtime import atomic_write_text, machine_info

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line  # noqa: E402

DEFAULT_MODELS = ["vgg19:0.25", "resnet56:0.5", "mobilenetv3_small:1.0"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="zoo name:width, CIFAR size (32x32, 10 classes)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", nargs="+", type=int, default=[1], help="torch CPU threads (one unit each)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 64], help="batch sizes (one unit each)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5, 0.7],
                   help="fractions of the original MACs the random models keep")
    p.add_argument("--per-budget", type=int, default=10, help="random models per budget")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds of the pruned models")
    p.add_argument("--table-rounds", type=int, default=5, help="rounds of table passes (LatencyModel.build)")
    p.add_argument("--clock", default="auto", choices=CLOCKS,
                   help="auto: CPU time of the thread for one CPU thread (robust on a shared machine), else wall")
    p.add_argument("--cache", default=None, help="latency table cache folder (default: the user cache)")
    p.add_argument("--rebuild", action="store_true", help="measure the tables even when cached")
    p.add_argument("--force", action="store_true", help="redo finished units")
    p.add_argument("--build-only", action="store_true",
                   help="only time building each table (fresh, into a temporary cache) and write bench_latency_build")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p


def budgeted_keeps(pruner: Pruner, budget: float, n: int, rng: np.random.Generator) -> List[np.ndarray]:
    """``n`` kept-count vectors with random per-group ratios (uniform in [0.1, 1]) scaled by one factor, bisected
    so that the analytic MACs are at most ``budget`` of the original's (and as close to it as the factor allows)."""
    full = pruner.num_channels
    gran = pruner.granularity
    full_macs = pruner.plan_cost(keep=full).macs
    out = []
    for _ in range(n):
        ratio = rng.uniform(0.1, 1.0, len(full))

        def keep_at(scale: float) -> np.ndarray:
            return np.clip(np.round(full * np.minimum(1.0, scale * ratio) / gran) * gran, gran, full).astype(np.int64)

        lo, hi = 0.0, 1.0 / ratio.min()
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if pruner.plan_cost(keep=keep_at(mid)).macs > budget * full_macs:
                hi = mid
            else:
                lo = mid
        out.append(keep_at(lo))
    return out


def unit_key(model: str, setting: LatencySetting) -> str:
    return f"{model}|{setting.tag}"


def run_unit(spec: str, setting: LatencySetting, args: argparse.Namespace) -> Dict[str, Any]:
    """Build the table, draw and time the pruned models, compare."""
    name, _, width = spec.partition(":")
    width_f = float(width or 1.0)
    torch.manual_seed(args.seed)
    model = create_model(name, num_classes=10, width=width_f).eval()
    pruner = Pruner(model, torch.randn(1, 3, 32, 32))
    load_before = list(os.getloadavg())
    cache = True if args.cache is None else Path(args.cache)
    started = time.perf_counter()
    latency = LatencyModel.build(pruner, setting, cache=cache, rounds=args.table_rounds, clock=args.clock,
                                 seed=args.seed, force=args.rebuild)
    build_wall = time.perf_counter() - started
    rng = np.random.default_rng(args.seed)
    keeps, budgets = [], []
    for b in args.budgets:
        keeps += budgeted_keeps(pruner, b, args.per_budget, rng)
        budgets += [b] * args.per_budget
    keeps.append(pruner.num_channels.copy())  # the original model too
    budgets.append(1.0)
    # the table's calibration models are timed again beside them: their ratio to the build-time timings shows how
    # much the machine drifted between building the table and this measurement
    calib = latency.meta.get("calibration", [])
    extra = [np.asarray(c["keep"]) for c in calib]
    built = [pruner.apply(PrunePlan.from_indices([range(int(c)) for c in k])) for k in keeps + extra]
    timed = measure_latency(built, (3, 32, 32), setting, rounds=args.rounds, clock=args.clock, seed=args.seed + 1,
                            desc=f"{spec} {setting.tag}")
    del built
    measured, again = timed[:len(keeps)], timed[len(keeps):]
    drift = [float(a / c["measured_s"]) for a, c in zip(again, calib)]
    predicted = np.asarray(latency.predict(np.stack(keeps)))
    macs = np.array([pruner.plan_cost(keep=k).macs for k in keeps], dtype=np.float64)
    return {"model": spec, "setting": setting.tag, "setting_fields": {
                "device": setting.device, "threads": setting.threads, "batch_size": setting.batch_size,
                "dtype": setting.dtype, "channels_last": setting.channels_last},
            "clock": setting.resolve_clock(args.clock), "n_groups": int(pruner.n_groups),
            "n_ops": len(latency.tables), "table_from_cache": bool(latency.from_cache),
            "table_build_s": float(latency.meta.get("build_seconds", float("nan"))),
            "table_built": latency.meta.get("created"), "table_call_s": round(build_wall, 2),
            "scale": latency.scale, "offset_ms": latency.offset * 1e3, "calibration_drift": drift,
            "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
            "budgets": budgets, "keeps": [k.tolist() for k in keeps], "macs": macs.tolist(),
            "measured_ms": (measured * 1e3).tolist(), "predicted_ms": (predicted * 1e3).tolist(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def metrics(unit: Dict[str, Any]) -> Dict[str, float]:
    """Errors and rank correlations of one unit (random models only for the within-budget spread)."""
    meas, pred, macs = (np.asarray(unit[k]) for k in ("measured_ms", "predicted_ms", "macs"))
    budgets = np.asarray(unit["budgets"])
    err = np.abs(pred - meas) / meas * 100
    drift = float(np.median(unit["calibration_drift"])) if unit.get("calibration_drift") else float("nan")
    corrected = np.abs(pred * drift - meas) / meas * 100
    spread = [float(meas[budgets == b].max() / meas[budgets == b].min()) for b in np.unique(budgets) if b < 1.0]
    within = [spearmanr(pred[budgets == b], meas[budgets == b])[0] for b in np.unique(budgets) if b < 1.0]
    return {"n": int(len(meas)), "median_err_pct": float(np.median(err)), "worst_err_pct": float(err.max()),
            "median_err_drift_corrected_pct": float(np.median(corrected)),
            "worst_err_drift_corrected_pct": float(np.max(corrected)),
            "mean_signed_err_pct": float(np.mean((pred - meas) / meas * 100)),
            "rho": float(spearmanr(pred, meas)[0]), "rho_macs": float(spearmanr(macs, meas)[0]),
            "rho_within_budget": float(np.nanmean(within)) if within else float("nan"),
            "spread_within_budget": float(np.mean(spread)) if spread else float("nan"),
            "speedup_range": [float(meas[-1] / meas[:-1].max()), float(meas[-1] / meas[:-1].min())],
            "calibration_drift": drift}


def to_markdown(units: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = ["# Latency model vs measured latency", "",
             f"Command: `{meta['command']}`.  ", f"Date: {meta['date']}.  ",
             f"Machine: {meta['machine']['cpu']} ({meta['machine']['cpu_count']} cores), "
             f"torch {meta['machine']['torch']}"
             f"{', CUDA ' + meta['machine']['cuda'] if meta['machine'].get('cuda') else ''}; load average at start "
             f"{meta['load_average_start']}.", "",
             "Per (model, setting): random per-group kept ratios scaled to keep 30 %, 50 % and 70 % of the MACs "
             f"({meta['per_budget']} models each) plus the original; every model built and timed with "
             "`measure_latency` (interleaved rounds, median); predicted = `LatencyModel.predict(keep)` (no model "
             "built). rho: Spearman rank correlation with the measured latency over all models; within budget: mean "
             "rho among models of one MACs budget, where a MACs predictor cannot rank at all (equal MACs); spread: "
             "mean slowest/fastest measured ratio at one MACs budget; drift: median ratio of the table's calibration "
             "models timed again here to their timings while the table was built (1.00: the machine ran as fast as "
             "then; a bias of the predictions of about 1/drift - 1 is the machine, not the model); drift-corrected: "
             "the errors of predictions multiplied by the drift (on a quiet machine the drift is 1 and both agree). "
             "speed-up: original / pruned, measured, fastest and slowest of the random models.", "",
             "| model | setting | clock | n | median abs err | worst | mean signed | rho (latency model) | "
             "rho (MACs) | rho within budget | spread within budget | speed-up range | drift | drift-corrected "
             "median / worst | table build | load before/after |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    verdicts = []
    for u in units:
        m = metrics(u)
        build = f"{u['table_build_s']:.0f} s" + (" (cached)" if u["table_from_cache"] else "")
        lines.append(f"| {u['model']} | {u['setting']} | {u['clock']} | {m['n']} | {m['median_err_pct']:.1f} % | "
                     f"{m['worst_err_pct']:.1f} % | {m['mean_signed_err_pct']:+.1f} % | {m['rho']:.3f} | "
                     f"{m['rho_macs']:.3f} | {m['rho_within_budget']:.2f} | {m['spread_within_budget']:.2f}x | "
                     f"{m['speedup_range'][0]:.2f}-{m['speedup_range'][1]:.2f}x | {m['calibration_drift']:.2f} | "
                     f"{m['median_err_drift_corrected_pct']:.1f} % / {m['worst_err_drift_corrected_pct']:.1f} % | "
                     f"{build} | {u['load_average_before'][0]:.1f} / "
                     f"{u['load_average_after'][0]:.1f} |")
        ok = m["median_err_pct"] <= 10 and m["rho"] >= 0.9
        verdicts.append(f"- {u['model']} {u['setting']}: {'meets' if ok else 'misses'} the aim (median error "
                        f"{m['median_err_pct']:.1f} % vs <= 10 %, rho {m['rho']:.3f} vs >= 0.9; drift-corrected "
                        f"median error {m['median_err_drift_corrected_pct']:.1f} %); MACs alone rank with rho "
                        f"{m['rho_macs']:.3f}.")
    lines += ["", "## Verdict", "", *verdicts, ""]
    if meta.get("notes"):
        lines += ["## Notes", "", *meta["notes"], ""]
    return "\n".join(lines)


def plot(units: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    colours = {}
    markers = {}
    for u in units:
        c = colours.setdefault(u["model"], f"C{len(colours)}")
        mk = markers.setdefault(u["setting"], "os^Dv<>p"[len(markers) % 8])
        ax.scatter(u["measured_ms"], u["predicted_ms"], s=16, color=c, marker=mk, alpha=0.75,
                   label=f"{u['model']} {u['setting']}")
    values = [v for u in units for v in u["measured_ms"] + u["predicted_ms"]]
    lo, hi = min(values) * 0.8, max(values) * 1.25
    line = np.geomspace(lo, hi, 50)
    ax.plot(line, line, "k-", lw=0.8)
    ax.fill_between(line, line * 0.9, line * 1.1, color="grey", alpha=0.15, label="±10 %")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured latency (ms)",
           ylabel="predicted latency (ms)", title="LatencyModel.predict vs measured")
    ax.legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def build_times(args: argparse.Namespace, settings: List[LatencySetting], meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Seconds to build each (model, setting) table from scratch (resumable per unit)."""
    import tempfile

    out = Path(args.out)
    suffix = f"_{args.tag}" if args.tag else ""
    json_path = out / f"bench_latency_build{suffix}.json"
    previous = json.loads(json_path.read_text()) if json_path.exists() else {"units": []}
    done = {u["unit"]: u for u in previous["units"]}
    ran = False
    for spec in args.models:
        for setting in settings:
            key = unit_key(spec, setting)
            if key in done and not args.force:
                continue
            name, _, width = spec.partition(":")
            torch.manual_seed(args.seed)
            pruner = Pruner(create_model(name, num_classes=10, width=float(width or 1.0)).eval(),
                            torch.randn(1, 3, 32, 32))
            load = list(os.getloadavg())
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                model = LatencyModel.build(pruner, setting, cache=tmp, rounds=args.table_rounds, clock=args.clock,
                                           seed=args.seed)
                total = time.perf_counter() - started
            done[key] = {"unit": key, "model": spec, "setting": setting.tag, "seconds": round(total, 1),
                         "n_groups": int(pruner.n_groups), "n_ops": len(model.tables),
                         "macs": int(pruner.plan_cost(keep=pruner.num_channels).macs),
                         "predicted_ms": model.original * 1e3, "load_average": [load[0], os.getloadavg()[0]]}
            ran = True
            atomic_write_text(json.dumps({"meta": meta, "units": list(done.values())}, indent=1), json_path)
    if not ran and "meta" in previous:  # nothing measured: re-render, keeping the command and date of the run
        meta = previous["meta"]
    units = list(done.values())
    lines = ["# Latency table build times", "", f"Command: `{meta['command']}`.  ", f"Date: {meta['date']}.  ",
             f"Machine: {meta['machine']['cpu']} ({meta['machine']['cpu_count']} cores), torch "
             f"{meta['machine']['torch']}; load average at start {meta['load_average_start']}.", "",
             f"`LatencyModel.build` from scratch with the defaults (11-point grid, {args.table_rounds} rounds, 6 "
             "calibration models): record and fit the ops, the table passes, the calibration.", "",
             "| model | setting | groups | ops | MMACs / image | predicted latency | build | load before / after |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for u in units:
        lines.append(f"| {u['model']} | {u['setting']} | {u['n_groups']} | {u['n_ops']} | {u['macs'] / 1e6:.1f} | "
                     f"{u['predicted_ms']:.2f} ms | {u['seconds']:.0f} s | {u['load_average'][0]:.1f} / "
                     f"{u['load_average'][1]:.1f} |")
    md = "\n".join(lines) + "\n"
    atomic_write_text(md, out / f"bench_latency_build{suffix}.md")
    print(md)
    return units


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    args = build_parser().parse_args(argv)
    settings = [LatencySetting(device=args.device, threads=t, batch_size=b, dtype=args.dtype,
                               channels_last=args.channels_last)
                for b in args.batch for t in (args.threads if args.device == "cpu" else [1])]
    for s in settings:
        s.torch_device  # noqa: B018  (a clear error for a device this machine does not have, before any work)
    out = Path(args.out)
    suffix = f"_{args.tag}" if args.tag else ""
    json_path = out / f"bench_latency_model{suffix}.json"
    previous = json.loads(json_path.read_text()) if json_path.exists() else {"units": []}
    done = {unit_key(u["model"], LatencySetting(**u["setting_fields"])): u for u in previous["units"]}
    command = command_line("benchmarks/bench_latency_model.py", argv if argv is not None else sys.argv[1:])
    meta = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(max(args.threads)), "load_average_start": [round(x, 2) for x in os.getloadavg()],
            "per_budget": args.per_budget, "notes": args.note or previous.get("meta", {}).get("notes", [])}
    if args.build_only:
        return build_times(args, settings, meta)
    units: List[Dict[str, Any]] = []
    todo = [(spec, s) for spec in args.models for s in settings]
    ran = False
    for spec, setting in tqdm(todo, desc="units", dynamic_ncols=True):
        key = unit_key(spec, setting)
        if key in done and not args.force:
            units.append(done[key])
            continue
        units.append(run_unit(spec, setting, args))
        ran = True
        done[key] = units[-1]
        atomic_write_text(json.dumps({"meta": meta, "units": list(done.values())}, indent=1), json_path)
    if not ran and "meta" in previous:  # nothing measured: re-render, keeping the command and date of the run
        meta = {**previous["meta"], "notes": args.note or previous["meta"].get("notes", [])}
    all_units = list(done.values())
    atomic_write_text(json.dumps({"meta": meta, "units": all_units}, indent=1), json_path)
    md = to_markdown(all_units, meta)
    atomic_write_text(md, out / f"bench_latency_model{suffix}.md")
    plot(all_units, out / f"bench_latency_model{suffix}.png")
    print(md)
    return all_units


if __name__ == "__main__":
    main()
