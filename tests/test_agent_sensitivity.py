"""The sensitivity-analysis agent (Li et al. 2017, ``agents/sensitivity.py``) and the env's budget-free probe it
scores with (``PruneEnv.evaluate_keep``): exact budget accounting, the allocation meeting the target, determinism.
"""
import warnings

import numpy as np
import pytest

from agents.common.monitor import EvaluationBudgetExhausted, PruneMonitor
from agents.sensitivity import SensitivityPruner, derived_grid, thin_grid
from rl_prune.pipeline import build_agent, build_env
from tiny import tiny_env, tiny_run_config

N_STEPS = 2
TARGET = 0.5


def budget_env(splits, **kwargs):
    return tiny_env(splits, budget="flops", n_steps=N_STEPS, target=TARGET, alpha=0.0, beta=0.0, **kwargs)


def probes(analysis):
    """Distinct kept vectors the analysis had to score: (group, kept) pairs below the group's width."""
    keep, current = analysis["keep"], analysis["current"]
    return len({(g, int(k)) for g in range(keep.shape[0]) for k in keep[g] if k < current[g]})


# ------------------------------------------------------------------------------------------- the env's probe

def test_evaluate_keep_scores_the_kept_vector_through_the_scorer_and_counts_one_evaluation(splits):
    env = tiny_env(splits, action_mode="sparsity")  # budget-free: an action's kept vector is not rescaled
    env.reset(seed=0)
    action = np.array([0.0, 0.5, 0.0])
    keep = env.keep_for_action(action)
    assert keep[0] == env.original_channels[0] and keep[1] < env.original_channels[1]
    reward, info = env.evaluate_keep(keep)
    assert env.n_evaluations == 1
    np.testing.assert_array_equal(info["kept_channels"], keep)
    assert info["lookahead"] and not info["cached"]
    # the same candidate as the look-ahead of the action that keeps it: the one scoring path
    reward_a, info_a = env.evaluate_action(action)
    assert env.n_evaluations == 2
    assert reward == reward_a and info["accuracy"] == info_a["accuracy"]
    assert info["flops_reduction"] == info_a["flops_reduction"]
    env.evaluate_keep(keep)  # not cached: a second probe is a second evaluation
    assert env.n_evaluations == 3


@pytest.mark.parametrize("keep, match", [([12, 16], "shape"), ([12, 17, 20], r"\[1, current width\]"),
                                         ([12, 8.5, 20], "whole channel counts"), ([0, 16, 20], "whole channel"),
                                         ([12, float("nan"), 20], "NaN")])
def test_evaluate_keep_refuses_bad_kept_vectors(splits, keep, match):
    env = tiny_env(splits)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.evaluate_keep(keep)
    assert env.n_evaluations == 0


def test_evaluate_keep_refuses_a_vector_the_floor_would_change(splits):
    env = tiny_env(splits, min_channels=4)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="cannot be built as it is.*min_channels=4"):
        env.evaluate_keep([2, 16, 20])


def test_the_monitor_stops_probes_at_the_budget(splits):
    monitor = PruneMonitor(budget_env(splits), max_evaluations=1)
    monitor.reset(seed=0)
    monitor.evaluate_keep([6, 16, 20])
    assert monitor.evaluations_left == 0
    with pytest.raises(EvaluationBudgetExhausted, match="budget of 1"):
        monitor.evaluate_keep([12, 8, 20])


# ------------------------------------------------------------------------------------------- the grid

def test_grids():
    np.testing.assert_allclose(derived_grid(9, 0.9), np.arange(1, 10) / 10)
    np.testing.assert_allclose(thin_grid(np.arange(1, 10) / 10, 3), [0.3, 0.6, 0.9])
    np.testing.assert_allclose(thin_grid(np.arange(1, 10) / 10, 1), [0.9])
    np.testing.assert_allclose(thin_grid(np.array([0.2, 0.4]), 5), [0.2, 0.4])


# ------------------------------------------------------------------------------------------- budget accounting

def built(splits, budget, **agent):
    cfg = tiny_run_config(splits, "sensitivity", budget, agent, n_steps=N_STEPS, target=TARGET)
    env = build_env(cfg, "sensitivity")
    return build_agent(cfg, "sensitivity", env)[0]


def test_a_budget_of_groups_x_ratios_plus_steps_is_spent_exactly(splits):
    agent = built(splits, 3 * 7 + N_STEPS)  # 3 groups x 7 ratios + the episode's 2 steps
    assert agent.budget_schedule.startswith("3 groups x 7 ratios")
    agent.learn()
    a = agent.analysis
    assert len(a["ratios"]) == 7
    assert probes(a) == 21  # every probe of the tiny net keeps a distinct count
    assert agent.n_evaluations == 23 == agent.env.max_evaluations
    assert [row["n_evaluations"] for row in agent.history] == [22, 23]  # the probes, then one per step


def test_a_budget_off_the_grid_uses_the_whole_ratios_it_pays_for(splits):
    agent = built(splits, 3 * 5 + N_STEPS + 2)  # 19: 5 ratios per group, 2 evaluations left over
    agent.learn()
    assert len(agent.analysis["ratios"]) == 5
    assert agent.n_evaluations == probes(agent.analysis) + N_STEPS == 17


def test_an_explicit_grid_longer_than_the_budget_is_thinned_and_says_so(splits):
    with pytest.warns(UserWarning, match="grid reduced from 9 to 4 ratios to fit budget 14"):
        agent = built(splits, 3 * 4 + N_STEPS, ratios=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert "grid reduced from 9 to 4" in agent.budget_schedule
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the analysis thins silently: the warning was given once
        agent.learn()
    np.testing.assert_allclose(agent.analysis["ratios"], [0.2, 0.4, 0.7, 0.9])
    assert agent.n_evaluations == probes(agent.analysis) + N_STEPS <= 14


def test_a_budget_that_cannot_pay_one_ratio_per_group_is_refused(splits):
    with pytest.raises(ValueError, match=r"budget: 4 evaluations cannot pay.*3 groups.*2 steps needs 5"):
        built(splits, 4)


def test_a_second_episode_reuses_the_analysis(splits):
    agent = SensitivityPruner(budget_env(splits), seed=0)  # no budget: Li et al.'s 9 ratios
    agent.learn()
    first = agent.n_evaluations
    assert len(agent.analysis["ratios"]) == 9 and first == probes(agent.analysis) + N_STEPS
    agent.learn()
    assert agent.n_evaluations == first + N_STEPS and agent.episodes == 2


# ------------------------------------------------------------------------------------------- the allocation

def test_the_allocation_meets_the_target_and_the_episode_its_budget(splits):
    agent = built(splits, 24)
    agent.learn()
    a = agent.analysis
    assert a["met"] and a["reduction"] >= TARGET and a["goal"] == TARGET
    last = agent.best["info"]
    assert not last["budget_missed"] and last["budget_goal"] == TARGET
    env = agent.penv
    assert abs(last["flops_reduction"] - TARGET) <= 0.05  # the env's closest plan to the goal
    kept = np.asarray(last["kept_channels"])
    assert np.all(kept <= env.original_channels)


def test_the_least_sensitive_group_is_pruned_most(splits):
    agent = SensitivityPruner(budget_env(splits), ratios=[0.25, 0.5, 0.75], seed=0)
    env = agent.penv
    env.reset(seed=0)
    current = env.original_channels.copy()
    keep = np.array([[env.pruner.keep_counts(np.eye(3)[g] * r)[g] for r in (0.25, 0.5, 0.75)] for g in range(3)])
    base = 0.8
    accuracy = np.array([[0.8, 0.8, 0.79],   # group 0 (conv1): insensitive (a noisy dip is smoothed by the envelope)
                         [0.5, 0.3, 0.1],    # group 1 (conv2 + conv3, most of the MACs): very sensitive
                         [0.78, 0.7, 0.6]])  # group 2 (fc1): in between, but saves almost no MACs
    out = agent._allocate(keep, accuracy, base, current)
    assert out["met"] and out["reduction"] >= TARGET
    s = out["sparsity"]
    assert s[0] == pytest.approx(0.75) and s[0] > s[1] > 0  # conv1 alone cannot carry 50 %: conv2+3 gives the rest
    assert out["levels"][1] == 0 and out["levels"][2] == -1  # as little of the sensitive group as the target needs
    # the same curves with the sensitivities swapped swap the allocation
    swapped = agent._allocate(keep, accuracy[[1, 0, 2]], base, current)
    assert swapped["sparsity"][1] > out["sparsity"][1] and swapped["sparsity"][0] < out["sparsity"][0]


def test_the_threshold_rule_prunes_every_group_within_one_drop(splits):
    agent = SensitivityPruner(budget_env(splits), ratios=[0.25, 0.5, 0.75], allocation="threshold", seed=0)
    env = agent.penv
    env.reset(seed=0)
    current = env.original_channels.copy()
    keep = np.array([[env.pruner.keep_counts(np.eye(3)[g] * r)[g] for r in (0.25, 0.5, 0.75)] for g in range(3)])
    accuracy = np.array([[0.8, 0.8, 0.79], [0.5, 0.3, 0.1], [0.78, 0.7, 0.6]])
    out = agent._allocate(keep, accuracy, 0.8, current)
    assert out["met"] and out["reduction"] >= TARGET
    tau = out["threshold"]
    drop = np.maximum.accumulate(np.maximum(0.0, 0.8 - accuracy), axis=1)
    # each group at its largest ratio within tau (-1: not even the smallest), and no smaller drop would do
    np.testing.assert_array_equal(out["levels"], (drop <= tau + 1e-12).sum(axis=1) - 1)
    assert tau == pytest.approx(0.3)  # conv2+3 must give 25 % (a drop of 0.3): conv1 and fc1 go as far as that
    np.testing.assert_array_equal(out["levels"], [2, 0, 2])
    with pytest.raises(ValueError, match="allocation must be one of"):
        SensitivityPruner(env, allocation="knapsack")


def test_the_analysis_is_deterministic(splits):
    runs = []
    for _ in range(2):
        agent = built(splits, 24)
        agent.learn()
        runs.append(agent)
    a, b = runs[0].analysis, runs[1].analysis
    for key in ("ratios", "keep", "accuracy", "levels", "sparsity"):
        np.testing.assert_array_equal(a[key], b[key])
    assert runs[0].best["info"]["kept_channels"] == runs[1].best["info"]["kept_channels"]
    assert [r["reward"] for r in runs[0].history] == [r["reward"] for r in runs[1].history]


def test_predict_before_the_analysis_says_what_to_do(splits):
    agent = SensitivityPruner(budget_env(splits), seed=0)
    with pytest.raises(RuntimeError, match="call learn"):
        agent.predict()


def test_a_budget_free_env_is_refused(splits):
    agent = SensitivityPruner(tiny_env(splits, action_mode="sparsity"), seed=0)
    with pytest.raises(ValueError, match="needs an env with a budget"):
        agent.learn()


def test_train_agent_runs_it_and_reports_the_evaluations_of_the_budget(tmp_path, capsys):
    import json

    import yaml

    from rl_prune.cli import train_main

    cfg = {"name": "tiny", "seed": 0, "device": "cpu", "agent": "sensitivity",
           "env": {"model": "vgg11", "dataset": "synthetic", "width": 0.0625, "pretrained": False, "val_size": 32,
                   "reward_samples": 16, "calibration_size": 16, "n_steps": 2, "target": 0.4, "budget": "flops",
                   "record_timings": False},
           "finetune": {"epochs": 1, "max_batches": 1, "batch_size": 16},
           "run": {"progress": False, "export_torchscript": False, "out_dir": str(tmp_path / "runs")}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(path), "--name", "s", "budget=22"]) == 0
    out = capsys.readouterr()
    metrics = json.loads((tmp_path / "runs" / "s" / "metrics.json").read_text())
    groups, n = len(metrics["group_names"]), metrics["n_evaluations"]
    ratios = (22 - 2) // groups
    assert metrics["budget"] == 22 and n <= groups * ratios + 2
    assert f"evaluations used {n} of budget 22" in out.out
    assert metrics["budget_schedule"].startswith(f"{groups} groups x {ratios} ratios")
    assert "sensitivity schedule:" in out.err and "does not apply" not in out.err
