"""The ``multi_fidelity`` reward estimator on the tiny net: a batched look-ahead refines its best cheap candidates
with a short KD fine-tune and the choice falls on a refined one; single look-aheads and steps keep the cheap score;
every evaluation and fine-tune batch is counted exactly (the env's infos and counters, PruneMonitor's rows and budget).
"""
import copy

import numpy as np
import pytest
import torch

from agents.common.monitor import PruneMonitor
from pruning_env.envs.reward import kd_refined, make_estimator
from tiny import assert_stepped_model_is_the_candidate, random_actions, tiny_env

KD_BATCHES = 2


def _env(splits, **kwargs):
    # a continuous cheap score (the negated KD loss), so that refined and cheap rankings can differ
    defaults = dict(reward_estimator="multi_fidelity", reward_refine_base="bn_kd_loss", reward_refine_top=2,
                    reward_train_images=32, reward_kd_batches=KD_BATCHES, budget="flops", target=0.4, n_steps=2,
                    lookahead_cache=8)
    return tiny_env(splits, **{**defaults, **kwargs})


def test_a_batch_refines_its_best_cheap_candidates_and_the_choice_is_a_refined_one(splits):
    env, cheap_env = _env(splits), _env(splits)
    env.reset(seed=0)
    cheap_env.reset(seed=0)
    actions = random_actions(env.n_groups, 5)
    looped = [cheap_env.evaluate_action(a) for a in actions]  # a single look-ahead keeps the cheap score
    assert not any(info["refined"] for _, info in looped)
    cheap = [reward for reward, _ in looped]
    rewards, infos = env.evaluate_actions(actions)
    top = sorted(np.argsort(-np.asarray(cheap), kind="stable")[:2].tolist())
    assert [i for i, info in enumerate(infos) if info["refined"]] == top
    base = make_estimator("bn_kd_loss", n_images=32, bn_batch_size=64, T=2.0, soft_weight=0.75)
    teacher, (x, y), train = env.original_model, env.task.reward_data, env.task.estimator_data
    changed = False
    for i, (action, info) in enumerate(zip(actions, infos)):
        assert info["accuracy_cheap"] == pytest.approx(looped[i][1]["accuracy"], rel=1e-6)
        if i not in top:
            assert rewards[i] == pytest.approx(cheap[i], rel=1e-6) and info["accuracy"] == info["accuracy_cheap"]
            continue
        # the refined score, rebuilt here: the cheap estimate after the short KD fine-tune of a fresh candidate
        model = env.pruner.apply(env.pruner.plan(keep=env.keep_for_action(action)))
        refined = kd_refined(model, teacher, (x, y), train, base=base, n_batches=KD_BATCHES, lr=0.01)
        assert info["accuracy"] == pytest.approx(max(info["accuracy_cheap"], refined), rel=1e-5)
        changed |= refined > info["accuracy_cheap"]
    assert changed, "the fine-tune should improve some refined candidate's score"
    best = int(np.argmax(rewards))
    assert best in top and all(rewards[best] >= r for r in rewards)


def test_a_refinement_that_lowers_the_score_keeps_the_cheap_one_and_a_refined_candidate_still_wins(splits,
                                                                                                  monkeypatch):
    import pruning_env.envs.reward as reward

    def ruin(model, *args, **kwargs):  # a fine-tune that made the candidate worse
        net = copy.deepcopy(model)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(-3.0)
        return net.eval()

    monkeypatch.setattr(reward, "kd_finetune", ruin)
    env = _env(splits)
    env.reset(seed=0)
    actions = random_actions(env.n_groups, 5)
    rewards, infos = env.evaluate_actions(actions)
    refined = [i for i, info in enumerate(infos) if info["refined"]]
    assert len(refined) == 2 and env.n_evaluations == 7
    model = env.pruner.apply(env.pruner.plan(keep=env.keep_for_action(actions[refined[0]])))
    worse = reward.kd_refined(model, env.original_model, env.task.reward_data, env.task.estimator_data,
                              base=make_estimator("bn_kd_loss", n_images=32), n_batches=KD_BATCHES)
    assert worse < infos[refined[0]]["accuracy_cheap"]  # the refinement did lower it ...
    assert all(info["accuracy"] == info["accuracy_cheap"] for info in infos)  # ... and the cheap score stayed
    assert int(np.argmax(rewards)) in refined


def test_costs_are_counted_exactly_and_a_refined_candidate_is_stepped_as_is(splits):
    env = _env(splits)
    env.reset(seed=0)
    source = {k: v.clone() for k, v in env.original_model.state_dict().items()}
    actions = random_actions(env.n_groups, 5, seed=1)
    rewards, infos = env.evaluate_actions(actions)
    refined = [info["refined"] for info in infos]
    assert sum(refined) == 2
    # a refined candidate counts two evaluations and its fine-tune's batches, in the running counts of its infos
    counts = np.cumsum([2 if r else 1 for r in refined]).tolist()
    assert [info["n_evaluations"] for info in infos] == counts and env.n_evaluations == 7
    assert [info["train_batches"] for info in infos] == np.cumsum([KD_BATCHES * r for r in refined]).tolist()
    assert env.n_train_batches == 2 * KD_BATCHES
    chosen = actions[int(np.argmax(rewards))]
    # a cached candidate is free and not refined again; the batch's one new candidate is refined
    again, infos2 = env.evaluate_actions([chosen, random_actions(env.n_groups, 1, seed=2)[0]])
    assert again[0] == max(rewards) and infos2[0]["cached"] and infos2[1]["refined"]
    assert env.n_evaluations == 9 and env.n_train_batches == 3 * KD_BATCHES and env.total_evaluations == 9
    _, reward, _, _, info = env.step(chosen)
    assert reward == max(rewards) and info["cached"] and info["refined"] and env.n_evaluations == 9
    # the refinement trained a copy: the stepped model is the pruned candidate itself, the source is unchanged
    assert_stepped_model_is_the_candidate(env, _env(splits), chosen, source)
    env.reset(seed=0)
    assert env.n_evaluations == 0 and env.n_train_batches == 0 and env.total_evaluations == 9


def test_a_cheap_short_kd_base_counts_its_own_batches_too(splits):
    env = _env(splits, reward_refine_base="short_kd", reward_refine_top=1, reward_kd_batches=1)
    env.reset(seed=0)
    _, infos = env.evaluate_actions(random_actions(env.n_groups, 2))
    # two cheap short_kd estimates (1 batch each), one refinement: its fine-tune (1) and the cheap estimate again (1)
    assert env.n_evaluations == 3 and env.n_train_batches == 2 + 2
    assert sum(info["refined"] for info in infos) == 1


def test_the_monitor_counts_batches_and_refines_within_the_budget(splits):
    env = _env(splits)
    monitor = PruneMonitor(env, max_evaluations=7)
    monitor.reset(seed=0)
    actions = random_actions(env.n_groups, 6, seed=3)
    rewards, infos = monitor.evaluate_actions(actions)  # 6 cheap evaluations leave room for one refinement
    assert sum(info["refined"] for info in infos) == 1
    assert monitor.n_evaluations == 7 and monitor.evaluations_left == 0 and monitor.n_train_batches == KD_BATCHES
    monitor.step(actions[int(np.argmax(rewards))])  # cached: free
    row = monitor.history[-1]
    assert row["n_evaluations"] == 7 and row["train_batches"] == KD_BATCHES
    monitor.step(actions[0])  # the final step of the episode evaluates one model (cheap), past nothing refused
    monitor.reset(seed=0)
    assert monitor.n_train_batches == KD_BATCHES and monitor.record.train_batches_done == KD_BATCHES
    monitor.max_evaluations = 20
    # an agent keeping evaluations for later passes less than the budget leaves: no room for a refinement here
    _, infos = monitor.evaluate_actions(random_actions(env.n_groups, 3, seed=4), max_evaluations=3)
    assert not any(info["refined"] for info in infos) and monitor.n_evaluations == 11
    state = monitor.record.state_dict()
    del state["train_batches_done"]  # a record saved before the counter existed still loads
    monitor.record.load_state_dict(state)
    assert monitor.record.train_batches_done == 0


@pytest.mark.parametrize("agent_name", ["random_search", "rl_pruner_improved"])
def test_search_agents_stay_within_their_budget_when_refinements_cost_evaluations(splits, agent_name):
    """A refined candidate costs two evaluations more: the agents pass what they may spend to the batched
    look-ahead, so the env refines fewer to fit and the search ends within (and close to) its budget instead of
    running into EvaluationBudgetExhausted."""
    from agents.heuristics import RandomSearch
    from agents.rl_pruner import RLPrunerAgent

    budget = 14
    env = PruneMonitor(_env(splits, action_mode="distribution" if agent_name != "random_search" else "sparsity"),
                       max_evaluations=budget)
    if agent_name == "random_search":
        agent = RandomSearch(env, n_candidates=budget // 2, seed=0)
    else:
        agent = RLPrunerAgent(env, sample_num=4, lr_epoch=3, greedy_epsilon=0.0, seed=0,
                              collapse_reference="reset_candidate")
    agent.learn()
    assert agent.episodes == 1
    assert agent.n_evaluations <= budget
    assert env.unwrapped.n_train_batches > 0, "some candidates should have been refined"
    assert agent.n_evaluations >= budget - 3  # it spends the budget: at most one refinement's cost (2) + 1 unused
