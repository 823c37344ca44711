"""Reward fidelity on the models the searches chose: every reward estimator of ``reward_fidelity.py`` measured on
the searched models of an agent comparison (``compare_agents.py``'s committed units file), against their
fine-tuned test top-1 from that comparison (each searched model fine-tuned with two seeds: the truth's
test-retest ceiling), with bootstrap spread, cost per estimate and the pick regret of choosing one searched model
per search seed by the estimate.

    python benchmarks/reward_fidelity_searched.py --units benchmarks/results/compare_curves_vgg19w025_units.json \\
        --targets 0.875 0.75

Random candidates (``reward_fidelity.py``) say whether an estimator ranks the search space; the agents leave that
distribution (single layers cut to a few channels, late layers kept wide), and an estimator that ranks random
candidates may not rank what a search selects. The searched models are rebuilt from the carried kept-channel masks
and checked against their weights hashes (the base checkpoint must be the comparison's); no fine-tune is run here.
Every estimate is one atomic JSON file under ``--cache`` (resume). Writes
benchmarks/results/reward_fidelity_searched{_TAG}.md|json|png.
"""
from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: benchmarks.* is imported from the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, machine_line, markdown_table, provenance, repo_relative  # noqa: E402
from benchmarks.reward_fidelity import (BN_TRAIN_IMAGES, CEILING_KEYS, ESTIMATORS, Units, _spec,  # noqa: E402
                                        bootstrap_fidelity, estimation_context, run_estimates, write_plot)
from pruning_env.runtime import atomic_write_text  # noqa: E402
from rl_prune.run_folder import mask_to_indices, rebuild_pruned, weights_hash  # noqa: E402

#: the pseudo-estimator of the reward each search recorded for its own choice (the env's estimator, its data)
SEARCH_REWARD = "search_reward"
#: the env's reward estimator (the units file's ``reward_estimator`` at the env's default options) -> the label of
#: the same estimator here: re-measured on other images and batches, it shows how much each search's choice owes to
#: the particular images it was scored on (the optimism of a maximum over noisy scores)
SAME_ESTIMATOR = {"kd_refined": "kd_refined10", "adaptive_bn": "adaptive_bn", "vanilla": "vanilla",
                  "bn_kd_loss": "bn_kd_loss", "short_kd": "short_kd"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--units", default=str(ROOT / "benchmarks" / "results" / "compare_curves_vgg19w025_units.json"),
                   help="a compare_agents units file (compare_curves_<model>_units.json): searched models, rewards "
                        "and fine-tune records")
    p.add_argument("--checkpoint", default="checkpoints/vgg19_w0.25_cifar10_5k.pt",
                   help="the comparison's base checkpoint (checked by weights hash against the carried models)")
    p.add_argument("--targets", type=float, nargs="+", default=None,
                   help="FLOPs reductions of the units file to measure (default: every one); the summary covers every "
                        "target whose estimates are all done")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    p.add_argument("--min-models", type=int, default=8,
                   help="fewest searched models with two fine-tunes for a target to be summarized")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="draws the estimators' images, as in reward_fidelity.py")
    p.add_argument("--cache", default="logs/reward_fidelity_searched",
                   help="folder of finished estimates (resume): settings.json, then TARGET/UNIT/est_LABEL.json")
    p.add_argument("--summary-only", action="store_true", help="summarize cached estimates, compute none")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p


def searched_models(units_file: Dict[str, Any], target: str) -> List[Dict[str, Any]]:
    """The searched models of one target with at least two fine-tunes: name, agent, search seed, the carried model,
    the recorded reward and the first two fine-tunes' test top-1 (by fine-tune seed)."""
    carry = units_file["targets"][target]["carry"]
    fts: Dict[str, List[Dict[str, Any]]] = {}
    for rec in carry.get("finetunes", []):
        fts.setdefault(f"{rec['agent']}_s{rec['search_seed']}", []).append(rec)
    out = []
    for name, data in carry["searches"].items():
        recs = sorted(fts.get(name, []), key=lambda r: r["ft_seed"])
        if data.get("searched_model") is None or len(recs) < 2:
            continue
        m = data["metrics"]
        out.append({"name": name, "agent": m["agent"], "search_seed": int(m["seed"]), "carried": data["searched_model"],
                    "search_reward": float(m["reward_accuracy"]), "n_evaluations": int(m.get("n_evaluations", 0)),
                    "truth": [float(r["finetune"]["report"]["test_top1"]) for r in recs[:2]],
                    "ft_seeds": [int(r["ft_seed"]) for r in recs[:2]]})
    return out


def rebuild(carried: Dict[str, Any], source: torch.nn.Module, name: str) -> torch.nn.Module:
    """The searched model cut from ``source`` to the carried masks; refused unless the source and the rebuild match
    the carried hashes."""
    if weights_hash(source) != carried["source_hash"]:
        raise SystemExit(f"error: {name} was searched from another base model (weights sha256 "
                         f"{carried['source_hash'][:12]}, the checkpoint's is {weights_hash(source)[:12]}); pass "
                         f"the comparison's --checkpoint")
    model, _ = rebuild_pruned(source, [mask_to_indices(m) for m in carried["kept_masks"]], carried["input_size"],
                              carried["pruner"])
    if weights_hash(model) != carried["weights_hash"]:
        raise SystemExit(f"error: the model rebuilt for {name} is not the searched model (weights hash differs): the "
                         f"pruning engine changed since the search")
    return model.eval()


def pick_regret_by_seed(values: np.ndarray, truth: np.ndarray, seeds: np.ndarray) -> Dict[str, float]:
    """Choosing one searched model per search seed by the estimate: the truth of the seed's best model minus that of
    the chosen one, in top-1 points, averaged over seeds; ``random``: the same for a uniformly random choice."""
    regret, rand = [], []
    for s in np.unique(seeds):
        sel = seeds == s
        v, t = values[sel], truth[sel]
        regret.append(t.max() - t[int(np.argmax(v))])
        rand.append(t.max() - t.mean())
    return {"regret": float(np.mean(regret)) * 100, "random_regret": float(np.mean(rand)) * 100}


def optimism_by_agent(rows: List[Dict[str, Any]], label: str) -> Dict[str, Dict[str, float]]:
    """Per agent, the mean over its searched models of the reward its search recorded, of the same estimator
    (``label``) re-measured here, of their difference (the optimism: positive when a search's choice scored higher on
    its own images than on fresh ones) and of the truth."""
    out: Dict[str, Any] = {}
    for agent in dict.fromkeys(r["agent"] for r in rows):
        mine = [r for r in rows if r["agent"] == agent]
        rec = np.array([r["search_reward"] for r in mine])
        fresh = np.array([r["est"][label]["value"] for r in mine])
        out[agent] = {"n": len(mine), "search_reward": float(rec.mean()), "remeasured": float(fresh.mean()),
                      "optimism": float((rec - fresh).mean()),
                      "truth": float(np.mean([np.mean(r["truth"]) for r in mine]))}
    # the offset between the two measurements (other images, other training images for BN and KD) is what a model
    # chosen without a maximum shows: the mean difference over the searches that evaluated one model
    single = [r for r in rows if r.get("n_evaluations") == 1]
    offset = float(np.mean([r["search_reward"] - r["est"][label]["value"] for r in single])) if single else 0.0
    for o in out.values():
        o["beyond_offset"] = o["optimism"] - offset
    return {"agents": out, "offset": offset, "offset_models": len(single)}


def summarize_target(rows: List[Dict[str, Any]], labels: Sequence[str], n_boot: int, seed: int,
                     same: Optional[str] = None) -> Dict[str, Any]:
    """Fidelity against the ceiling for every estimator with a value on every model (and the searches' own reward);
    with ``same`` (the label of the searches' own estimator), each agent's optimism (:func:`optimism_by_agent`)."""
    a = np.array([r["truth"][0] for r in rows])
    b = np.array([r["truth"][1] for r in rows])
    truth = (a + b) / 2
    seeds = np.array([r["search_seed"] for r in rows])
    vanilla_s = float(np.median([r["est"]["vanilla"]["seconds"] for r in rows])) if "vanilla" in labels else None
    s: Dict[str, Any] = {"n": len(rows), "test_top1_mean": float(truth.mean()), "test_top1_std": float(truth.std()),
                         "seed_gap_mean": float(np.abs(a - b).mean()), "vanilla_seconds_median": vanilla_s,
                         "models": [{k: r[k] for k in ("name", "agent", "search_seed", "truth", "search_reward")}
                                    | {"est": {k: r["est"][k]["value"] for k in labels}} for r in rows],
                         "estimators": {}}
    values = {SEARCH_REWARD: np.array([r["search_reward"] for r in rows])}
    values.update({k: np.array([r["est"][k]["value"] for r in rows]) for k in labels})
    for k, v in values.items():
        stats = bootstrap_fidelity(v, a, b, n_boot, seed)
        stats.update(pick_regret_by_seed(v, truth, seeds))
        if k != SEARCH_REWARD and vanilla_s:
            stats["cost_ratio"] = float(np.median([r["est"][k]["seconds"] for r in rows])) / vanilla_s
            stats["sgd_batches"] = rows[0]["est"][k]["sgd_batches"]
        s["estimators"][k] = stats
    if same is not None and same in labels:
        s["same_estimator"] = same
        s["optimism"] = optimism_by_agent(rows, same)
    s.update({k: s["estimators"][SEARCH_REWARD][k] for k in CEILING_KEYS})
    return s


def write_markdown(path: Path, summary: Dict[str, Any], meta: Dict[str, Any], command: str,
                   machine: Dict[str, Any]) -> None:
    lines = ["# Reward fidelity on the searched models: does an estimate rank what the agents chose?", "",
             f"Command: `{command}`", "",
             f"Models: the searched models of `{meta['units']}` ({meta['model']}, {meta['schedule']}, reward "
             f"`{meta['reward_estimator']}` in the search, budget {meta['budget']}), rebuilt from their kept-channel "
             f"masks and hash-checked against base weights sha256 `{meta['base_weights'][:12]}`. Truth: each model's "
             f"test top-1 after the comparison's {meta['finetune_epochs']}-epoch KD fine-tune, mean of its first two "
             "fine-tune seeds (no fine-tune is run here). **retest**: Spearman rho between the two seeds; "
             "**ceiling**: sqrt of the Spearman-Brown reliability of their mean; **rho / ceiling**: an estimator's "
             f"rho against the mean truth as a share of it; spread over {meta['bootstrap']} bootstrap resamples of "
             f"the models. `{SEARCH_REWARD}`: the reward each search recorded for its own choice (the env's "
             "estimator on the env's images); the other rows are `reward_fidelity.py`'s estimators on its images "
             "(training images for BN statistics and KD batches, validation images for the score). **Pick regret**: "
             "choosing one model per search seed among the agents' models by the estimate, the truth of the seed's "
             "best minus that of the choice, in top-1 points (random choice: beside it). **Cost**: median wall "
             "seconds of one estimate / median of one vanilla evaluation, one CPU thread.", ""]
    for key, s in summary.items():
        lines += [f"## FLOPs reduction {float(key):.1%} ({s['n']} searched models)", "",
                  f"Truth: test top-1 {s['test_top1_mean']:.3f} ± {s['test_top1_std']:.3f} across models; the two "
                  f"fine-tune seeds differ by {100 * s['seed_gap_mean']:.1f} points on average. **Test-retest rho "
                  f"{s['retest']:.3f} ± {s['retest_std']:.3f}; ceiling {s['ceiling']:.3f} ± {s['ceiling_std']:.3f}.** "
                  f"A random choice per seed loses "
                  f"{s['estimators'][SEARCH_REWARD]['random_regret']:.1f} points.", ""]
        rows = []
        for label, e in sorted(s["estimators"].items(), key=lambda kv: -np.nan_to_num(kv[1]["share"], nan=-9)):
            rows.append([label, f"{e['rho']:.3f}", f"{e['rho_std']:.3f}",
                         f"[{e['rho_ci95'][0]:.3f}, {e['rho_ci95'][1]:.3f}]",
                         f"**{e['share']:.2f}**" if np.isfinite(e["share"]) else "–",
                         f"{e['share_std']:.2f}" if np.isfinite(e["share_std"]) else "–",
                         f"{e['regret']:.1f}", f"{e['cost_ratio']:.1f}" if "cost_ratio" in e else "(in the search)",
                         e.get("sgd_batches", "–")])
        lines += markdown_table(["estimator", "rho (mean truth)", "± std", "95 % interval", "rho / ceiling", "± std",
                                 "pick regret (pts)", "cost (× vanilla)", "SGD batches"], rows) + [""]
        if "optimism" in s:
            lines += [f"**Optimism of each search's choice**: the reward the search recorded against `{s['same_estimator']}`, "
                      "the same estimator, re-measured here on other validation images and KD batches (means over "
                      "the agent's searched models). An agent that evaluates one model (uniform, global Taylor) or "
                      "allocates from a grid of single-layer probes (sensitivity) picks no maximum; a search that "
                      "picks the best of many noisy scores is optimistic by about the noise it selected.", ""]
            opt = s["optimism"]
            lines[-2] += (f" The offset between the two measurements is what the {opt['offset_models']} searches "
                          f"that evaluated one model show ({100 * opt['offset']:+.1f} points); the last column is "
                          "each agent's optimism beyond it.")
            lines += markdown_table(["agent", "models", "search's reward", "re-measured", "difference (pts)",
                                     "beyond the offset (pts)", "test top-1 after FT"],
                                    [[f"`{a}`", o["n"], f"{o['search_reward']:.3f}", f"{o['remeasured']:.3f}",
                                      f"{100 * o['optimism']:+.1f}", f"{100 * o['beyond_offset']:+.1f}",
                                      f"{o['truth']:.3f}"]
                                     for a, o in opt["agents"].items()]) + [""]
    lines += [machine_line(machine), ""]
    atomic_write_text("\n".join(lines), path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    path = Path(args.units)
    if not path.is_file():
        raise SystemExit(f"error: --units {path}: no such file (compare_agents.py writes it beside its report)")
    units_file = json.loads(path.read_text())
    available = [t for t in units_file.get("targets", {}) if units_file["targets"][t].get("carry")]
    targets = available if args.targets is None else [f"{t:g}" for t in args.targets]
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise SystemExit(f"error: {path} carries no units at targets {unknown} (it has {available})")
    torch.set_num_threads(args.threads)
    ctx = estimation_context(args.checkpoint, args.seed)
    base_weights = weights_hash(ctx.teacher)
    settings = {"checkpoint": args.checkpoint, "checkpoint_weights": base_weights, "seed": args.seed,
                "bn_train_images": BN_TRAIN_IMAGES, "units_model": units_file["meta"]["model"],
                "units_schedule": units_file["meta"]["schedule"]}
    cache = Units(Path(args.cache), settings)
    # --targets limits what is computed; the summary covers every target of the units file whose estimates are done,
    # so a run for one target does not drop another's table
    models = {t: searched_models(units_file, t) for t in available}
    todo = [(t, m) for t in targets for m in models[t] if not args.summary_only]
    for t, m in tqdm(todo, desc="searched models", dynamic_ncols=True):
        missing = [k for k in args.estimators if cache.read(float(t), m["name"], f"est_{k}", _spec(k)) is None]
        if not missing:
            continue
        student = rebuild(m["carried"], ctx.teacher, f"{t}/{m['name']}")
        seed = zlib.crc32(f"{t}/{m['name']}".encode()) % (2 ** 31)
        run_estimates(student, ctx.teacher, missing, ctx.rewards, ctx.teacher_logits, ctx.bn_train, seed, cache,
                      float(t), m["name"])
    summary = {}
    for t in available:
        rows = []
        for m in models[t]:
            est = {k: cache.read(float(t), m["name"], f"est_{k}", _spec(k)) for k in args.estimators}
            if all(v is not None for v in est.values()):
                rows.append({**m, "est": est})
        if len(rows) >= args.min_models:
            summary[t] = summarize_target(rows, args.estimators, args.bootstrap, args.seed,
                                          SAME_ESTIMATOR.get(units_file["meta"].get("reward_estimator")))
        elif t in targets:
            print(f"note: {t}: {len(rows)} searched models with every estimate and two fine-tunes (fewer than "
                  f"--min-models {args.min_models}); not summarized", file=sys.stderr)
    m = units_file["meta"]
    meta = {"units": repo_relative(path),
            "model": m["model"], "schedule": m["schedule"], "reward_estimator": m.get("reward_estimator"),
            "budget": m["budget"], "finetune_epochs": m["finetune_epochs"], "base_weights": base_weights,
            "bootstrap": args.bootstrap, "estimators": {k: ESTIMATORS[k] for k in args.estimators}}
    command = command_line("benchmarks/reward_fidelity_searched.py", sys.argv[1:] if argv is None else argv,
                           drop=("--summary-only",))
    prov = provenance("benchmarks/reward_fidelity_searched.py", argv, threads=args.threads)
    out = Path(args.out)
    stem = "reward_fidelity_searched" + (f"_{args.tag}" if args.tag else "")
    atomic_write_text(json.dumps({"command": command, "meta": meta, "settings": settings, "summary": summary,
                                  "provenance": prov}, indent=1), out / f"{stem}.json")
    write_markdown(out / f"{stem}.md", summary, meta, command, prov["machine"])
    write_plot(out / f"{stem}.png", summary)
    print((out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
