"""One-shot against the authors' iterative schedule at equal training (issue 24 item 2), from the reports
``benchmarks/compare_agents.py`` wrote for each schedule: per target and agent, test top-1 after the fine-tune under
each schedule (mean ± std over search seeds), the difference in pooled seed std and its verdict, and the best agent
of each schedule against the other's. ``--vary set`` compares config variants of one schedule the same way (reports
that differ in their ``--set`` overrides only, e.g. a per-group bound against none).

    python benchmarks/compare_agents.py --targets 0.875 --tag base2 --agents uniform rl_pruner_improved ...
    python benchmarks/compare_agents.py --targets 0.875 --tag base2 --schedule iterative --agents uniform ...
    python benchmarks/compare_schedules.py benchmarks/results/compare_curves_vgg19w025_oneshot_base2.json \\
        benchmarks/results/compare_curves_vgg19w025_iterative3_r2_base2.json

Reads the reports only (no unit is run). Two reports are compared only when they are of one comparison in all but the
schedule: the same model, base checkpoint (weights hash), total training epochs after pruning, reward estimator,
search and fine-tune seeds; a pair that differs in any of these is refused, naming it. Their budgets may differ by
the few evaluations that make every agent spend its budget exactly for a given number of steps (151 for one step,
153 for three): both are printed.

    python benchmarks/compare_schedules.py --vary set benchmarks/results/compare_curves_vgg19w025_oneshot_base2.json \
        benchmarks/results/compare_curves_vgg19w025_oneshot_base2-floor20.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: benchmarks.common is imported from the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.common import fmt, markdown_table, num, provenance, repo_relative, verdict  # noqa: E402
from benchmarks.compare_agents import schedule_text  # noqa: E402
from pruning_env.runtime import atomic_write_text  # noqa: E402

SCRIPT = "benchmarks/compare_schedules.py"
#: what two reports must share to be compared (the schedule aside): meta key -> words for the refusal
SAME = {"model": "model", "base_weights": "base checkpoint (weights hash)", "finetune_epochs":
        "training epochs after pruning (recovery plus final fine-tune)", "reward_estimator": "reward estimator",
        "search_seeds": "search seeds", "ft_seeds": "fine-tune seeds", "set": "--set overrides"}
#: what config variants (``--vary set``) must share instead: all of :data:`SAME` but the overrides, and the schedule
SAME_SET = {**{k: v for k, v in SAME.items() if k != "set"}, "schedule_kind": "schedule", "n_steps": "pruning steps",
            "recovery_epochs": "recovery epochs between steps"}
#: what each ``--vary`` compares, in words: the varied meta key, the key set reports must share, the title
VARY = {"schedule": ("schedule", SAME, "One-shot against the iterative schedule at equal training"),
        "set": ("set", SAME_SET, "Config variants at equal training")}


def load_report(path: Path) -> Dict[str, Any]:
    """A ``compare_curves_*.json`` report; a clear error when it is missing or is not one."""
    if not path.is_file():
        raise SystemExit(f"error: no report at {path} (benchmarks/compare_agents.py writes it)")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise SystemExit(f"error: {path} is not JSON: {err}") from err
    if not isinstance(data, dict) or "meta" not in data or "targets" not in data:
        raise SystemExit(f"error: {path} is not a compare_agents report (no meta / targets)")
    return data


def mismatch(reports: Sequence[Dict[str, Any]], paths: Sequence[Path], vary: str = "schedule") -> Optional[str]:
    """Why the reports are not one comparison in all but the schedule (``vary="set"``: the ``--set`` overrides),
    or None."""
    key_varied, same, _ = VARY[vary]
    schedules = [r["meta"].get("schedule") for r in reports]
    if len(set(schedules)) != len(schedules):
        return f"two reports of one schedule ({', '.join(map(str, schedules))}): give one report per {vary}"
    varied = [json.dumps(r["meta"].get(key_varied)) for r in reports]
    if len(set(varied)) != len(varied):
        return f"two reports of one {vary} ({', '.join(varied)}): give one report per {vary}"
    first = reports[0]["meta"]
    for key, words in same.items():
        for r, p in zip(reports[1:], paths[1:]):
            if r["meta"].get(key) != first.get(key):
                return (f"{paths[0].name} and {p.name} differ in {words}: {first.get(key)!r} vs "
                        f"{r['meta'].get(key)!r}; only the {vary} may differ")
    return None


def seed_means(summary: Mapping[str, Any]) -> List[float]:
    """One agent's per-search-seed means over its fine-tunes (what its ``test`` statistic is made of)."""
    return [sum(v) / len(v) for _, v in sorted(summary["per_model"].items(), key=lambda kv: int(kv[0])) if v]


def compare(reports: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Per target common to every report: each agent's statistic under every schedule, the verdict of each later
    schedule against the first, and each schedule's best agent against the first schedule's best."""
    names = [r["meta"]["schedule"] for r in reports]
    targets = [t for t in reports[0]["targets"] if all(t in r["targets"] for r in reports[1:])]
    out: Dict[str, Any] = {}
    for t in targets:
        blocks = [r["targets"][t]["summary"] for r in reports]
        agents = [a for a in blocks[0] if any(a in b for b in blocks[1:])]
        rows = {}
        for agent in agents:
            per = {n: b[agent] for n, b in zip(names, blocks) if agent in b}
            rows[agent] = {
                "rl": bool(next(iter(per.values()))["rl"]),
                "schedules": {n: {"test": s["test"], "seed_means": seed_means(s), "macs_kept": s["macs_kept"],
                                  "n_evaluations": s["n_evaluations"]["mean"]} for n, s in per.items()},
                "vs_first": {n: verdict(per[n]["test"], per[names[0]]["test"])
                             for n in names[1:] if n in per and names[0] in per}}
        best = {n: max(b, key=lambda a: b[a]["test"]["mean"]) for n, b in zip(names, blocks) if b}
        best_vs = {n: {"agent": best[n], "first_agent": best[names[0]],
                       **verdict(blocks[i][best[n]]["test"], blocks[0][best[names[0]]]["test"])}
                   for i, n in enumerate(names) if i > 0 and n in best and names[0] in best}
        out[t] = {"agents": rows, "best": best, "best_vs_first": best_vs,
                  "only_in": {n: sorted(set(b) - set(agents)) for n, b in zip(names, blocks) if set(b) - set(agents)}}
    return out


def sentence(first: str, second: str, v: Mapping[str, Any]) -> str:
    """``iterative vs one-shot: +0.012 (+0.4 pooled std): level``."""
    return (f"{second} {v['diff']:+.3f} against {first} ({num(v['diff_over_std'], '+.2f')} pooled std of "
            f"{num(v['pooled_std'], '.3f')}): **{v['verdict']}**")


def render(meta: Dict[str, Any], result: Dict[str, Any]) -> str:
    names = meta["schedules"]
    first = names[0]
    vary = meta.get("vary", "schedule")
    lines = [f"# {VARY[vary][2]}: {meta['model']}", "",
             f"Reports: {', '.join(f'`{p}`' for p in meta['reports'])}. Every agent trains "
             f"{meta['finetune_epochs']} epochs after pruning under every "
             + ("schedule (the iterative schedule's KD recoveries between steps are taken from the final fine-tune)"
                if vary == "schedule" else "variant, under one schedule")
             + "; the same base "
             f"({', '.join(f'`{b}` weights sha256 `{h[:12]}`' for b, h in (meta['base_weights'] or {}).items())}), "
             f"reward estimator `{meta['reward_estimator']}`, {meta['search_seeds']} search seeds x "
             f"{meta['ft_seeds']} fine-tunes; budgets {', '.join(f'{n} {b}' for n, b in meta['budgets'].items())} "
             f"evaluations (each spent exactly). Test top-1 after the fine-tune: mean ± std over search seeds of each "
             f"searched model's mean over its fine-tunes; more than one pooled std apart is a difference.", ""]
    for n, words in meta["schedule_words"].items():
        overrides = meta.get("sets", {}).get(n)
        lines.append(f"- `{n}`: {words}" + ("" if vary == "schedule" else
                                           f"; `--set` {' '.join(f'`{o}`' for o in overrides) or 'none'}"))
    lines.append("")
    for t, block in result.items():
        lines += [f"## FLOPs reduction {t}", ""]
        for n, v in block["best_vs_first"].items():
            lines.append(f"Best agent: `{v['agent']}` under {n}, `{v['first_agent']}` under {first}: "
                         + sentence(first, n, v) + ".")
        lines.append("")
        rows = []
        for agent, r in sorted(block["agents"].items(),
                               key=lambda kv: -max(s["test"]["mean"] for s in kv[1]["schedules"].values())):
            cells = [f"`{agent}`" + (" (RL)" if r["rl"] else "")]
            cells += [fmt(r["schedules"][n]["test"]) if n in r["schedules"] else "" for n in names]
            for n in names[1:]:
                v = r["vs_first"].get(n)
                cells += ["" if v is None else f"{v['diff']:+.4f}", "" if v is None else num(v["diff_over_std"], "+.2f"),
                          "" if v is None else v["verdict"].split(" (")[0]]
            rows.append(cells)
        headers = ["agent", *[f"{n} (test top-1)" for n in names]]
        for n in names[1:]:
            headers += [f"{n} - {first}", "in pooled std", "verdict"]
        lines += markdown_table(headers, rows)
        for n, missing in block["only_in"].items():
            lines.append(f"\nOnly under {n} (no peer): {', '.join(f'`{a}`' for a in missing)}.")
        lines.append("")
    lines += [f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def plot(meta: Dict[str, Any], result: Dict[str, Any], path: Path) -> None:
    """Per target, each agent's mean ± std under every schedule side by side, every search seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = meta["schedules"]
    fig, axes = plt.subplots(1, len(result), figsize=(1.2 + 4.2 * len(result), 4.5), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (t, block) in zip(axes[0], result.items()):
        agents = list(block["agents"])
        width = 0.8 / len(names)
        for j, n in enumerate(names):
            for i, agent in enumerate(agents):
                s = block["agents"][agent]["schedules"].get(n)
                if s is None:
                    continue
                x = i + (j - (len(names) - 1) / 2) * width
                std = s["test"]["std"]
                ax.errorbar(x, s["test"]["mean"], yerr=0.0 if math.isnan(std) else std, fmt="o", color=colors(j),
                            capsize=3, label=n if i == 0 else None)
                ax.scatter([x] * len(s["seed_means"]), s["seed_means"], color=colors(j), s=10, alpha=0.4)
        ax.set_xticks(range(len(agents)))
        ax.set_xticklabels(agents, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"FLOPs reduction {t}", fontsize=10)
        ax.set_ylabel("test top-1 after fine-tune (search seeds: dots)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    what = "schedules" if meta.get("vary", "schedule") == "schedule" else "config variants"
    fig.suptitle(f"{meta['model']}: {what} at {meta['finetune_epochs']} training epochs after pruning", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_stem(reports: Sequence[Dict[str, Any]], vary: str = "schedule") -> str:
    """``compare_schedules_<model>`` plus the reports' common ``--tag`` (the shared end of their schedule names,
    e.g. ``_base2`` of ``oneshot_base2`` and ``iterative3_r2_base2``); ``--vary set``: ``compare_variants_<model>``
    and the later reports' schedule names (``_oneshot_base2-floor20``)."""
    names = [str(r["meta"]["schedule"]) for r in reports]
    if vary == "set":
        return f"compare_variants_{reports[0]['meta']['model']}_" + "_".join(names[1:])
    tail = names[0]
    while tail and not all(n.endswith(tail) and n != tail for n in names):
        tail = tail[1:]
    tag = tail[tail.index("_"):] if "_" in tail else ""
    return f"compare_schedules_{reports[0]['meta']['model']}{tag}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", type=Path,
                   help="compare_curves_*.json reports, one per schedule; the first is the reference (one-shot)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="where the report goes")
    p.add_argument("--stem", default=None, help="file stem (default compare_schedules_<model>[_<tag>]; --vary set: "
                                                "compare_variants_<model>_<later schedules>)")
    p.add_argument("--vary", choices=tuple(VARY), default="schedule",
                   help="what the reports differ in: the schedule (default) or the --set overrides (config variants "
                        "of one schedule)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.reports) < 2:
        raise SystemExit("error: give at least two reports (one per schedule)")
    reports = [load_report(p) for p in args.reports]
    problem = mismatch(reports, args.reports, args.vary)
    if problem:
        raise SystemExit(f"error: {problem}")
    result = compare(reports)
    if not result:
        raise SystemExit("error: the reports share no target")
    m0 = reports[0]["meta"]
    meta = {"model": m0["model"], "schedules": [r["meta"]["schedule"] for r in reports],
            "schedule_words": {r["meta"]["schedule"]: schedule_text(r["meta"]) for r in reports},
            "reports": [repo_relative(p) for p in args.reports],
            "budgets": {r["meta"]["schedule"]: r["meta"]["budget"] for r in reports},
            "vary": args.vary, "sets": {r["meta"]["schedule"]: list(r["meta"].get("set") or []) for r in reports},
            **{k: m0.get(k) for k in VARY[args.vary][1]},
            **provenance(SCRIPT, argv if argv is not None else sys.argv[1:])}
    stem = args.stem or default_stem(reports, args.vary)
    payload = {"meta": meta, "targets": result}
    atomic_write_text(json.dumps(payload, indent=2, default=float), args.results / f"{stem}.json")
    plot(meta, result, args.results / f"{stem}.png")
    atomic_write_text(render(meta, result), args.results / f"{stem}.md")
    print(args.results / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
