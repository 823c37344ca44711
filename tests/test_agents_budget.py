"""Equal evaluation budgets (``PruneMonitor(max_evaluations=...)``) and RL-Pruner's improved collapse guard
(``collapse_reference="reset_candidate"``), on the scripted env of test_agents and on the tiny net.
"""
import numpy as np
import pytest
from tiny import ScriptedEnv, tiny_env

from agents.common.monitor import EvaluationBudgetExhausted, PruneMonitor
from agents.heuristics import RandomSearch
from agents.rl_pruner import RLPrunerAgent, initial_distribution

WIDTH_PD = initial_distribution([4, 8, 8], [1, 1, 2])


def is_reset_point(action) -> bool:
    return np.allclose(np.asarray(action, dtype=np.float64), WIDTH_PD, atol=1e-6)


def test_monitor_refuses_new_lookaheads_past_the_budget_but_not_cache_hits():
    env = PruneMonitor(ScriptedEnv(lambda step, call, a: 0.5), max_evaluations=2)
    env.reset()
    env.evaluate_action([0.2, 0.3, 0.5])
    env.evaluate_action([0.3, 0.3, 0.4])
    assert env.evaluations_left == 0
    with pytest.raises(EvaluationBudgetExhausted, match="evaluation budget of 2"):
        env.evaluate_action([0.4, 0.3, 0.3])


def test_monitor_rejects_a_bad_budget():
    with pytest.raises(ValueError, match="max_evaluations must be None or an integer >= 1"):
        PruneMonitor(ScriptedEnv(lambda step, call, a: 0.5), max_evaluations=0)


@pytest.mark.parametrize("reference", ["previous", "reset_candidate"])
def test_rl_pruner_stops_at_the_budget_and_still_finishes_the_episode(reference):
    # every candidate collapses (0.5 after 1.0): the authors' guard would resample every step
    env = PruneMonitor(ScriptedEnv(lambda step, call, a: 0.5, n_steps=3), max_evaluations=7)
    agent = RLPrunerAgent(env, sample_num=2, lr_epoch=2, greedy_epsilon=0.0, seed=0, collapse_reference=reference)
    agent.learn()
    assert len(agent.history) == 3 and agent.episodes == 1
    assert agent.n_evaluations <= 7
    assert any(row["budget_stopped"] for row in agent.history)


def test_improved_guard_ignores_a_drop_every_candidate_has():
    """Each step costs 20 % of the accuracy whatever the PD (large steps without recovery): the authors' guard
    fires at every step, the improved one (reference = the width-proportional reset point) never does."""
    script = lambda step, call, a: 0.8 ** (step + 1)  # noqa: E731
    faithful = RLPrunerAgent(ScriptedEnv(script), sample_num=2, lr_epoch=1, greedy_epsilon=0.0, seed=0)
    faithful.learn()
    assert [row["collapse_reset"] for row in faithful.history] == [1, 1]
    improved = RLPrunerAgent(ScriptedEnv(script), sample_num=2, lr_epoch=1, greedy_epsilon=0.0, seed=0,
                             collapse_reference="reset_candidate")
    improved.learn()
    assert [row["collapse_reset"] for row in improved.history] == [0, 0]
    assert improved.n_evaluations == 2 * (2 + 1)  # the reset point costs one evaluation per step


def test_improved_guard_resets_to_the_reset_point_when_the_pick_is_far_worse():
    # the exploring pick (epsilon 1) is a 0.5 sample; the reset point scores 0.9: reset and take it
    script = lambda step, call, a: 0.9 if is_reset_point(a) else 0.5  # noqa: E731
    agent = RLPrunerAgent(ScriptedEnv(script, n_steps=1), sample_num=2, lr_epoch=1, greedy_epsilon=1.0, seed=0,
                          collapse_reference="reset_candidate")
    agent.learn()
    row = agent.history[0]
    assert row["collapse_reset"] == 1 and row["accuracy"] == pytest.approx(0.9)
    np.testing.assert_allclose(agent.pd, WIDTH_PD)
    assert agent.n_evaluations == 3


def test_faithful_guard_needs_the_authors_reference():
    with pytest.raises(ValueError, match="collapse_reference='previous'"):
        RLPrunerAgent(ScriptedEnv(lambda s, c, a: 0.5), faithful_collapse_guard=True,
                      collapse_reference="reset_candidate")
    with pytest.raises(ValueError, match="collapse_reference must be one of"):
        RLPrunerAgent(ScriptedEnv(lambda s, c, a: 0.5), collapse_reference="teacher")


@pytest.mark.parametrize("make_agent", [
    lambda env: RLPrunerAgent(env, sample_num=4, lr_epoch=3, seed=0),
    lambda env: RLPrunerAgent(env, sample_num=4, lr_epoch=3, seed=0, collapse_reference="reset_candidate"),
    lambda env: RandomSearch(env, n_candidates=5, seed=0),
])
def test_agents_on_the_tiny_net_never_exceed_the_budget(splits, make_agent):
    env = tiny_env(splits, action_mode="distribution", budget="flops", target=0.5, n_steps=2,
                   reward_estimator="adaptive_bn", reward_train_images=32)
    agent = make_agent(PruneMonitor(env, max_evaluations=10))
    agent.learn()
    assert agent.episodes == 1 and agent.n_evaluations <= 10
    assert agent.history[-1]["flops_reduction"] == pytest.approx(0.5, abs=0.05)
    assert agent.best["info"]["budget_goal"] == 0.5 and agent.best["info"]["budget_missed"] is False


def test_min_keep_fraction_keeps_every_group_above_its_floor(splits):
    env = tiny_env(splits, action_mode="distribution", budget="flops", target=0.6, n_steps=2)
    agent = RLPrunerAgent(env, sample_num=4, lr_epoch=2, seed=0, noise_var=0.5, min_keep_fraction=0.3)
    agent.learn()
    floor = np.ceil(0.3 * env.original_channels)
    for row in agent.history:
        assert np.all(np.asarray(row["kept_channels"]) >= floor)
    with pytest.raises(ValueError, match="min_keep_fraction must be in"):
        RLPrunerAgent(env, min_keep_fraction=1.0)


def test_monitor_history_rows_carry_the_step_budget_goal(splits):
    env = PruneMonitor(tiny_env(splits, action_mode="sparsity", budget="flops", target=0.5, n_steps=2))
    env.reset(seed=0)
    env.step(np.full(3, 0.3, dtype=np.float32))
    env.step(np.full(3, 0.3, dtype=np.float32))
    first, last = env.record.history[-2:]
    assert (first["budget_goal"], last["budget_goal"]) == (0.25, 0.5)
    assert first["budget_missed"] is False and last["budget_missed"] is False
    assert "predicted_latency" not in last  # no latency model on this env
