"""benchmarks/common.py: seed statistics, the verdict rule every comparison is judged by, table rendering and the
provenance of result files."""
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import (HIGHER, LEVEL, LOWER, UNDECIDED, best_vs_best, command_line, fmt, markdown_table,
                               mean_std, num, pooled_std, provenance, verdict)


def stat(mean, std, n):
    return {"mean": mean, "std": std, "n": n}


def test_mean_std_is_the_sample_std():
    s = mean_std([0.5, 0.6, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1) and s["n"] == 3
    one = mean_std([0.4])
    assert one["mean"] == 0.4 and math.isnan(one["std"]) and one["n"] == 1


@pytest.mark.parametrize("bad, match", [([], "at least one value"), ([0.1, float("nan")], "finite numbers")])
def test_mean_std_refuses_what_has_no_statistics(bad, match):
    with pytest.raises(ValueError, match=match):
        mean_std(bad)


def test_pooled_std_weights_each_group_by_its_degrees_of_freedom():
    a, b = [0.50, 0.52, 0.57], [0.60, 0.61, 0.59, 0.66, 0.64]
    expected = math.sqrt(((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1))
                         / (len(a) + len(b) - 2))
    assert pooled_std(mean_std(a), mean_std(b)) == pytest.approx(expected)
    # equal sizes: the root mean square of the two stds
    assert pooled_std(stat(0, 0.3, 4), stat(0, 0.4, 4)) == pytest.approx(math.sqrt((0.09 + 0.16) / 2))
    assert pooled_std(stat(0, 0.3, 3), stat(0, 0.4, 3), stat(0, 0.5, 3)) == pytest.approx(
        math.sqrt((0.09 + 0.16 + 0.25) / 3))


def test_pooled_std_of_a_one_seed_group_is_nan_and_one_group_is_refused():
    assert math.isnan(pooled_std(stat(0.5, float("nan"), 1), stat(0.6, 0.1, 3)))
    with pytest.raises(ValueError, match="at least two groups"):
        pooled_std(stat(0.5, 0.1, 3))


@pytest.mark.parametrize("mean_a, word", [(0.62, HIGHER), (0.58, LOWER), (0.605, LEVEL), (0.595, LEVEL)])
def test_the_verdict_rule_is_one_pooled_std(mean_a, word):
    v = verdict(stat(mean_a, 0.01, 3), stat(0.60, 0.01, 3))
    assert v["verdict"] == word
    assert v["pooled_std"] == pytest.approx(0.01)
    assert v["diff"] == pytest.approx(mean_a - 0.60)
    assert v["diff_over_std"] == pytest.approx((mean_a - 0.60) / 0.01)


def test_exactly_one_pooled_std_is_still_level():
    v = verdict(stat(0.75, 0.25, 2), stat(0.5, 0.25, 2))  # exact in binary floating point
    assert v["diff"] == v["pooled_std"] == 0.25 and v["verdict"] == LEVEL


def test_without_two_seeds_a_side_the_verdict_is_undecided_whatever_the_difference():
    v = verdict(stat(0.9, float("nan"), 1), stat(0.1, 0.01, 5))
    assert v["verdict"] == UNDECIDED and math.isnan(v["pooled_std"]) and math.isnan(v["diff_over_std"])


def test_best_vs_best_picks_the_best_of_each_side():
    stats = {"ppo": stat(0.60, 0.02, 3), "rl": stat(0.63, 0.02, 3), "uniform": stat(0.62, 0.01, 3),
             "taylor": stat(0.55, 0.01, 3)}
    v = best_vs_best(stats, ["ppo", "rl", "amc"], ["uniform", "taylor"])
    assert (v["first"], v["second"]) == ("rl", "uniform")
    assert v["first_mean"] == 0.63 and v["second_mean"] == 0.62
    assert v["verdict"] == LEVEL and v["pooled_std"] == pytest.approx(math.sqrt((0.0004 + 0.0001) / 2))
    assert best_vs_best(stats, ["amc"], ["uniform"]) is None


def test_markdown_table_renders_and_escapes():
    lines = markdown_table(["agent", "top-1"], [["uniform", fmt(stat(0.61234, 0.0123, 3))], ["a|b", None]])
    assert lines == ["| agent | top-1 |", "|---|---|", "| uniform | 0.6123 ± 0.0123 |", "| a\\|b | – |"]


def test_markdown_table_refuses_a_ragged_row():
    with pytest.raises(ValueError, match="table row 1 has 1 cells for 2 columns"):
        markdown_table(["a", "b"], [[1, 2], [3]])


def test_number_formatting():
    assert fmt(stat(0.5, float("nan"), 1), 2) == "0.50"
    assert fmt(stat(0.5, 0.01, 2), 1, pct=True) == "50.0 ± 1.0"
    assert num(float("nan"), ".2f") == "n/a" and num(None, ".2f") == "n/a" and num(1.234, ".2f") == "1.23"


def test_the_command_leaves_out_report_flags_and_prose():
    argv = ["--targets", "0.875", "--report-only", "--note", "some words", "--note=more", "--agents", "a b"]
    assert command_line("benchmarks/x.py", argv) == "python benchmarks/x.py --targets 0.875 --agents 'a b'"
    record = provenance("benchmarks/x.py", ["--seeds", "3"], threads=1)
    assert record["command"] == "python benchmarks/x.py --seeds 3"
    assert record["machine"]["torch_threads"] == 1 and record["machine"]["cpu_count"] >= 1


def test_repo_relative_names_no_machine_folder(tmp_path):
    from benchmarks.common import repo_relative

    root = Path(__file__).resolve().parents[1]
    assert repo_relative(root / "configs" / "x.yaml") == "configs/x.yaml"
    assert repo_relative(tmp_path / "y.yaml") == str(tmp_path / "y.yaml")
