"""The latency benchmarks' own logic (benchmarks/compare_latency.py, benchmarks/ablate_reward.py) on the tiny net:
the uniform ratio bisected on measured latency (a deterministic stand-in clock: latency proportional to MACs), the
verdict against the pooled seed std, the accuracy fronts. The real timings are the benchmarks' business.
"""
import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from tiny import tiny_env, tiny_splits

from pruning_env.costs import count_costs

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cl = _load("compare_latency")
ab = _load("ablate_reward")


@pytest.fixture(scope="module")
def env():
    return tiny_env(tiny_splits(), action_mode="sparsity", budget="flops", target=0.3, n_steps=1)


@pytest.fixture
def macs_clock(monkeypatch, env):
    """measure_latency replaced by a clock that reads MACs (1 ns each) and counts its calls."""
    calls = []

    def fake(models, input_size, setting, **kw):
        calls.append(len(models))
        return np.array([1e-9 * count_costs(m, tuple(input_size)).macs for m in models])

    monkeypatch.setattr(cl, "measure_latency", fake)
    return calls


def _args(steps=10):
    return argparse.Namespace(bisect_rounds=1, bisect_steps=steps)


def test_uniform_ratio_is_the_smallest_that_reaches_the_speedup(env, macs_clock):
    from pruning_env.costs import LatencySetting

    result = cl.bisect_uniform(_args(), 1.5, LatencySetting(), env)
    assert result["measured_speedup"] >= 1.5
    pruner = cl._pruner(env)
    original = count_costs(env.original_model, env.input_size).macs

    def speedup(r):
        keep = pruner.keep_counts(np.full(env.n_groups, r))
        return original / pruner.plan_cost(keep=keep).macs

    # the smallest ratio on a fine grid that reaches the speed-up is within one bisection interval of the result
    fine = np.linspace(0.0, 0.98, 2001)
    smallest = fine[np.argmax([speedup(r) >= 1.5 for r in fine])]
    assert smallest - 0.98 / 2000 <= result["ratio"] <= smallest + 0.98 / 2 ** 10
    assert result["kept"] == pruner.keep_counts(np.full(env.n_groups, result["ratio"])).tolist()
    assert 0.0 < result["channel_sparsity"] < 1.0
    assert result["predicted_s"] is None  # this env built no latency model
    assert len(result["history"]) == len(macs_clock)  # each distinct kept vector measured once


def test_an_unreachable_speedup_is_named(env, macs_clock):
    from pruning_env.costs import LatencySetting

    with pytest.raises(RuntimeError, match="speed-up of 1000x is out of reach with uniform pruning"):
        cl.bisect_uniform(_args(), 1000.0, LatencySetting(), env)


def _stat(mean, std, n=3):
    return {"mean": mean, "std": std, "n": n}


def test_verdict_needs_more_than_one_pooled_std_over_both_rules():
    summary = {"uniform": {"test_top1": _stat(0.60, 0.01)}, "latency_knapsack": {"test_top1": _stat(0.62, 0.01)},
               "ppo": {"test_top1": _stat(0.59, 0.02)}, "rl_pruner_improved": {"test_top1": _stat(0.64, 0.01)}}
    v = cl.verdict(summary)
    assert v["best_learned"] == "rl_pruner_improved"
    words = {p["other"]: p["verdict"] for p in v["pairs"]}
    assert words == {"uniform": cl.HIGHER, "latency_knapsack": cl.HIGHER}
    assert v["beats_all"] and "beats uniform and the knapsack" in v["text"]
    summary["rl_pruner_improved"]["test_top1"] = _stat(0.625, 0.01)
    v = cl.verdict(summary)
    assert not v["beats_all"] and "does not beat latency_knapsack" in v["text"]
    assert {p["other"]: p["verdict"] for p in v["pairs"]}["latency_knapsack"].startswith("level")
    summary["uniform"]["test_top1"] = _stat(0.60, float("nan"), n=1)
    assert cl.verdict(summary)["beats_all"] is None  # one seed: no spread, no verdict


def test_front_keeps_only_undominated_points():
    points = [(0.1, 0.9), (0.3, 0.8), (0.2, 0.7), (0.5, 0.5), (0.4, 0.4)]
    assert ab.pareto(points) == [0, 1, 3]


def test_free_mode_has_no_cost_budget_and_one_step_episodes():
    args = ab.build_parser().parse_args(["--alphas", "0.5", "--betas", "0", "--gammas", "1"])
    over = ab.unit_overrides(args, 0.5, 0.0, 1.0)
    assert over["env.budget"] is None and over["env.max_steps"] == 1 and over["env.action_mode"] == "sparsity"
    assert (over["env.alpha"], over["env.beta"], over["env.gamma"]) == (0.5, 0.0, 1.0)
    assert ab.main(["--mode", "free", "--agent", "rl_pruner", "--report-only"]) == 2  # needs a budget


def test_equal_measured_latency_is_checked_around_the_median():
    summary = {"uniform": {"speedup_b1": _stat(2.05, 0.02)}, "ppo": {"speedup_b1": _stat(1.7, 0.1)},
               "latency_knapsack": {"speedup_b1": _stat(1.95, 0.05)}}
    match = cl.latency_match(summary, 2.0)
    assert match["median"] == pytest.approx(1.95)
    assert match["ok"] is False and set(match["off"]) == {"ppo"} and "ppo 1.70x" in match["text"]
    del summary["ppo"]
    assert cl.latency_match(summary, 2.0)["ok"] is True


def test_ranking_check_compares_the_two_fine_tunes():
    summary = {"uniform": {"test_top1": _stat(0.60, 0.01), "test_top1_long": _stat(0.66, 0.01)},
               "ppo": {"test_top1": _stat(0.62, 0.01), "test_top1_long": _stat(0.65, 0.01)}}
    check = cl.ranking_check(summary, 5)
    assert check["short"] == ["ppo", "uniform"] and check["long"] == ["uniform", "ppo"] and not check["stable"]
    summary["ppo"]["test_top1_long"] = _stat(0.67, 0.01)
    assert cl.ranking_check(summary, 5)["stable"]
    assert cl.ranking_check(summary, 0) is None


def test_the_headline_verdict_is_on_the_longer_fine_tune_when_every_agent_has_one():
    summary = {"uniform": {"test_top1": _stat(0.60, 0.01), "test_top1_long": _stat(0.66, 0.01)},
               "latency_knapsack": {"test_top1": _stat(0.58, 0.01), "test_top1_long": _stat(0.62, 0.01)},
               "ppo": {"test_top1": _stat(0.64, 0.01), "test_top1_long": _stat(0.63, 0.01)}}
    block = {"summary": summary, "verdict": cl.verdict(summary),
             "verdict_long": cl.verdict(summary, "test_top1_long")}
    assert block["verdict"]["beats_all"] is True          # after the short fine-tune ppo leads both
    head = cl.headline(block)
    assert head["key"] == "test_top1_long" and head["beats_all"] is False
    assert {p["other"]: p["verdict"] for p in head["pairs"]}["uniform"].startswith("lower")
    summary["ppo"]["test_top1_long"] = None                 # one agent without the longer fine-tune
    block["verdict_long"] = cl.verdict(summary, "test_top1_long")
    assert cl.headline(block) is block["verdict"]


def test_a_learned_agent_spending_less_than_the_budget_is_named():
    rows = {"uniform": [{"n_evaluations": 1}], "ppo": [{"n_evaluations": 90}, {"n_evaluations": 90}],
            "rl_pruner_improved": [{"n_evaluations": 63}, {"n_evaluations": 63}]}
    text = cl._spending({"2": {"rows": rows}}, 90)
    assert "rl_pruner_improved 63" in text and "ppo" not in text and "uniform 1" not in text
    rows["rl_pruner_improved"] = [{"n_evaluations": 90}]
    assert cl._spending({"2": {"rows": rows}}, 90) == ""


def test_the_matched_control_waits_for_measured_units(tmp_path):
    args = cl.build_parser().parse_args(["--matched", "--out-dir", str(tmp_path), "--seeds", "2"])
    assert args.matched and cl.matched_ratio_unit(args, 2.0, 90) is None  # nothing finished or measured yet
    assert "uniform_matched" in cl.RULES and "uniform_matched" not in cl.LEARNED


def test_the_matched_bisection_times_candidates_against_the_reference_models(env, macs_clock):
    from pruning_env.costs import LatencySetting

    pruner = cl._pruner(env)
    keep = pruner.keep_counts(np.full(env.n_groups, 0.5))
    reference = [pruner.apply(cl.PrunePlan.from_indices([range(int(k)) for k in keep])).eval()]
    result = cl.bisect_uniform(_args(12), 1.0, LatencySetting(), env, reference=reference)
    assert set(macs_clock) == {2}  # each candidate timed with the one reference model
    ref = count_costs(reference[0], env.input_size).macs
    found = pruner.apply(cl.PrunePlan.from_indices([range(int(k)) for k in result["kept"]]))
    assert count_costs(found, env.input_size).macs <= ref  # at least as fast as the reference
    assert result["ratio"] <= 0.5 + 0.98 / 2 ** 12  # and the smallest such ratio: not past the reference's own
