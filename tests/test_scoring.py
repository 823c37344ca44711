"""The candidate scorer and the pieces around it: a copy of the scorer (what a Ray actor holds) scores exactly as the
env's, the teacher's logits are computed once per teacher, the candidate cache resolves a batch as a loop would, and
the reduction meter is the one source of an info's cost keys.
"""
import pickle

import numpy as np
import pytest
import torch

from pruning_env.costs import Cost, reductions
from pruning_env.envs.budget import METRICS, ReductionMeter, channel_sparsity
from pruning_env.envs.parallel import SerialBackend
from pruning_env.envs.reward import REWARD_ESTIMATORS
from pruning_env.envs.scoring import CandidateCache
from tiny import tiny_env


@pytest.mark.parametrize("estimator", list(REWARD_ESTIMATORS))
def test_a_copy_of_the_scorer_scores_like_the_envs_own(splits, estimator):
    env = tiny_env(splits, reward_estimator=estimator, reward_train_images=32, reward_kd_batches=2,
                   budget="flops", target=0.4)
    env.reset(seed=0)
    pruner, teacher = env.pruner, env.snapshot().teacher
    plans = [pruner.plan(keep=env.keep_for_action(np.full(env.n_groups, s))) for s in (0.2, 0.5)]
    shipped = pickle.loads(pickle.dumps(env.scorer))  # what the Ray backend puts in the object store
    remote = SerialBackend(shipped.to(torch.device("cpu")))
    ours = SerialBackend(env.scorer).evaluate(pruner, plans, teacher)
    theirs = remote.evaluate(pickle.loads(pickle.dumps(pruner)), plans, pickle.loads(pickle.dumps(teacher)))
    assert [s.accuracy for s in ours] == [s.accuracy for s in theirs]
    rewards = env.evaluate_actions([np.full(env.n_groups, s) for s in (0.2, 0.5)])[0]
    assert rewards == [env.scorer.reward(s.accuracy, env.scorer.reductions(pruner.plan_cost(p)))
                       for s, p in zip(ours, plans)]


def test_the_teachers_logits_are_computed_once(splits):
    env = tiny_env(splits, reward_estimator="teacher_agreement", budget="flops", target=0.4)
    env.reset(seed=0)  # scores the original model: the teacher's logits are computed here
    passes = []
    handle = env.original_model.register_forward_hook(lambda *args: passes.append(1))
    try:
        env.evaluate_actions([np.full(env.n_groups, s) for s in (0.1, 0.2, 0.3, 0.4)])
        env.evaluate_action(np.full(env.n_groups, 0.5))
    finally:
        handle.remove()
    assert passes == [] and env.n_evaluations == 5


def test_the_candidate_cache_resolves_a_batch_as_a_loop_of_lookups():
    keys = [b"a", b"b", b"c", b"a", b"d", b"e", b"b", b"a"]
    loop, batch = CandidateCache(), CandidateCache()
    loop.put(b"e", "old e", 3)
    batch.put(b"e", "old e", 3)
    looped = []
    for key in keys:  # the single look-ahead: look up, build on a miss and cache it
        hit = loop.get(key)
        if hit is None:
            hit = f"new {key.decode()}"
            loop.put(key, hit, 3)
            looped.append((hit, False))
        else:
            looped.append((hit, True))
    calls = []

    def build(positions):
        calls.append(positions)
        return [f"new {keys[i].decode()}" for i in positions]

    assert batch.resolve(keys, 3, build) == looped
    assert len(calls) == 1 and list(batch) == list(loop)
    assert CandidateCache().resolve(keys[:2], 0, build)[1] == ("new b", False)  # capacity 0 caches nothing


def test_the_reduction_meter_reads_every_metric_from_one_cost():
    original = Cost(macs=1000, params=200)
    meter = ReductionMeter(original, np.array([8, 4]), np.array([1, 2]), latency=lambda k: float(np.sum(k)))
    keep, cost = np.array([4, 4]), Cost(macs=600, params=150)
    r = reductions(cost, original)
    assert meter.value("flops", keep, r) == pytest.approx(0.4) and meter.value("params", keep, r) == 0.25
    assert meter.value("channels", keep, None) == channel_sparsity(keep, [8, 4], [1, 2]) == pytest.approx(0.25)
    assert meter.value("latency", keep, None) == pytest.approx(1 - 8 / 12)  # from the latency function, not the cost
    for metric in METRICS:
        assert meter.function(metric, lambda k: cost)(keep) == meter.value(metric, keep, r)
    info = meter.report(keep, cost, r, "flops")
    assert info["macs_ratio"] == pytest.approx(0.6) and info["target_progress"] == pytest.approx(0.4)
    assert info["kept_channels"].tolist() == [4, 4] and info["group_sparsity"].tolist() == [0.5, 0.0]
