"""What the benchmarks share that is not library: seed statistics (mean ± std, pooled std), the verdict rule (a
difference against one pooled seed std, in plain words), markdown tables and the provenance lines (command,
machine) every result file carries. Tested in ``tests/test_bench_common.py``.

    from benchmarks.common import mean_std, pooled_std, verdict, best_vs_best, markdown_table, provenance
"""
from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from pruning_env.runtime import machine_info

#: the words of :func:`verdict`, by outcome
HIGHER = "higher by more than one pooled std"
LOWER = "lower by more than one pooled std"
LEVEL = "level (within one pooled std)"
UNDECIDED = "undecided (fewer than two seeds on a side: no spread to judge by)"


# ---------------------------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean, sample standard deviation (ddof 1; NaN for one value) and count.

    :param values: one number per seed (at least one, all finite).
    :raises ValueError: no values, or a value that is not a finite number.
    """
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        raise ValueError("mean_std needs at least one value")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"mean_std needs finite numbers, got {a.tolist()}")
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else float("nan"), "n": int(a.size)}


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


def pooled_std(*stats: Mapping[str, float]) -> float:
    """Pooled standard deviation of groups summarised by :func:`mean_std`:
    ``sqrt(sum((n_i - 1) s_i^2) / sum(n_i - 1))``; NaN when a group has fewer than two values.

    :param stats: two or more :func:`mean_std` results.
    """
    if len(stats) < 2:
        raise ValueError(f"pooled_std needs at least two groups, got {len(stats)}")
    if any(int(s["n"]) < 2 for s in stats):
        return float("nan")
    dof = sum(int(s["n"]) - 1 for s in stats)
    return math.sqrt(sum((int(s["n"]) - 1) * float(s["std"]) ** 2 for s in stats) / dof)


def verdict(a: Mapping[str, float], b: Mapping[str, float]) -> Dict[str, Any]:
    """``a`` minus ``b`` against their pooled seed std: the rule every comparison is judged by. More than one pooled
    std above is :data:`HIGHER`, more than one below :data:`LOWER`, else :data:`LEVEL`; with fewer than two seeds on
    a side there is no spread, and the verdict is :data:`UNDECIDED` whatever the difference.

    :param a: :func:`mean_std` of the first (e.g. the best RL agent).
    :param b: :func:`mean_std` of the second (e.g. the best non-RL allocation).
    :return: ``diff``, ``pooled_std``, ``diff_over_std`` (NaN when undecided) and ``verdict`` (one of the words).
    """
    diff = float(a["mean"]) - float(b["mean"])
    pooled = pooled_std(a, b)
    if math.isnan(pooled):
        word = UNDECIDED
    elif diff > pooled:
        word = HIGHER
    elif diff < -pooled:
        word = LOWER
    else:
        word = LEVEL
    ratio = diff / pooled if not math.isnan(pooled) and pooled > 0 else float("nan")
    return {"diff": diff, "pooled_std": pooled, "diff_over_std": ratio, "verdict": word}


def best_vs_best(stats: Mapping[str, Mapping[str, float]], first: Iterable[str],
                 second: Iterable[str]) -> Optional[Dict[str, Any]]:
    """The best (highest mean) of ``first`` against the best of ``second``, judged by :func:`verdict`; None when a
    side has no entry in ``stats``.

    :param stats: :func:`mean_std` per name.
    :param first: names of one side (e.g. the RL agents).
    :param second: names of the other (e.g. the non-RL allocations).
    :return: :func:`verdict`'s keys plus ``first`` / ``second`` (the names picked) and their means.
    """
    a = [n for n in first if n in stats]
    b = [n for n in second if n in stats]
    if not a or not b:
        return None
    best_a = max(a, key=lambda n: stats[n]["mean"])
    best_b = max(b, key=lambda n: stats[n]["mean"])
    return {"first": best_a, "second": best_b, "first_mean": float(stats[best_a]["mean"]),
            "second_mean": float(stats[best_b]["mean"]), **verdict(stats[best_a], stats[best_b])}


# ---------------------------------------------------------------------------------------------- formatting
def num(value: Optional[float], spec: str) -> str:
    """``format(value, spec)``, or "n/a" for None or NaN (one seed has no std).

    :param value: the number.
    :param spec: a format spec such as ``".3f"``.
    """
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def fmt(stat: Mapping[str, float], digits: int = 4, pct: bool = False) -> str:
    """``mean ± std`` (just the mean for one seed).

    :param stat: a :func:`mean_std` result.
    :param digits: decimals.
    :param pct: scale by 100.
    """
    scale = 100.0 if pct else 1.0
    mean = stat["mean"] * scale
    if math.isnan(stat["std"]):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
    """A GitHub markdown table: header, rule and one line per row (cells as given, ``|`` escaped, None as –).

    :param headers: column titles.
    :param rows: one sequence of cells per row, as many as ``headers``.
    :raises ValueError: a row with another number of cells, naming it.
    """
    def cell(v: Any) -> str:
        return "–" if v is None else str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for i, row in enumerate(rows):
        row = list(row)
        if len(row) != len(headers):
            raise ValueError(f"table row {i} has {len(row)} cells for {len(headers)} columns: {row}")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return lines


def failures_section(failures: Mapping[str, str], missing: Sequence[str], where: str) -> List[str]:
    """Markdown lines listing failed units (last traceback line) and units not run yet; empty when none.

    :param failures: traceback by unit name.
    :param missing: units not run yet.
    :param where: where the full tracebacks are, for the reader.
    """
    if not failures and not missing:
        return []
    lines = ["## Missing or failed units", ""]
    for unit, tb in failures.items():
        last = tb.strip().splitlines()[-1] if tb.strip() else "?"
        lines.append(f"- `{unit}` failed: `{last}` (traceback in {where})")
    lines += [f"- `{unit}` not run (yet)" for unit in missing]
    return lines + [""]


# ---------------------------------------------------------------------------------------------- provenance
def repo_relative(path: Any) -> str:
    """``path`` relative to the repository root when it lies inside it (the committed reports name no machine's
    folders), else as given."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def command_line(script: str, argv: Sequence[str], drop: Sequence[str] = ("--report-only",),
                 drop_with_value: Sequence[str] = ("--note",)) -> str:
    """The command that reproduces a result: ``python SCRIPT ARGS`` without report-only flags (and flags whose value
    is prose), shell-quoted.

    :param script: e.g. ``benchmarks/compare_agents.py``.
    :param argv: ``sys.argv[1:]``.
    :param drop: flags left out.
    :param drop_with_value: flags left out with their value (``--note TEXT`` or ``--note=TEXT``).
    """
    out: List[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in drop_with_value:
            skip = True
        elif a in drop or any(a.startswith(f"{f}=") for f in drop_with_value):
            continue
        else:
            out.append(a)
    return " ".join(shlex.quote(p) for p in ["python", script, *out])


def provenance(script: str, argv: Optional[Sequence[str]] = None, threads: Optional[int] = None) -> Dict[str, Any]:
    """``{"command", "machine"}`` for a result file: the reproducing command (:func:`command_line`) and
    :func:`pruning_env.runtime.machine_info`.

    :param script: the benchmark's path relative to the repository root.
    :param argv: its arguments (default ``sys.argv[1:]``).
    :param threads: torch threads per process, when not the current setting.
    """
    return {"command": command_line(script, sys.argv[1:] if argv is None else argv),
            "machine": machine_info(threads)}


def machine_line(machine: Mapping[str, Any]) -> str:
    """One markdown line naming the machine of a :func:`provenance` record."""
    cuda = f", GPU {machine['cuda']}" if machine.get("cuda") else ""
    return (f"Machine: {machine.get('cpu')} ({machine.get('cpu_count')} logical CPUs, {machine.get('torch_threads')} "
            f"torch thread(s) per process{cuda}), torch {machine.get('torch')}, Python {machine.get('python')}.")


__all__ = ["HIGHER", "LOWER", "LEVEL", "UNDECIDED", "mean_std", "pooled_std", "verdict", "best_vs_best", "num", "fmt",
           "repo_relative", "markdown_table", "failures_section", "command_line", "provenance", "machine_line"]
