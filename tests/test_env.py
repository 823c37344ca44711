"""Tests of PruneEnv: Gymnasium and SB3 checkers, seeding, termination at the target, the reward formula,
look-ahead / snapshot semantics, bad inputs and the source model's safety.

A tiny conv net on generated data keeps each test to a fraction of a second; zoo models are in test_env_registration.py.
"""
import copy

import numpy as np
import pytest
import torch

from pruning_env.costs import count_costs
from pruning_env.data import preload
from pruning_env.envs.prune_env import GLOBAL_FEATURES, GROUP_FEATURES
from pruning_env.training import evaluate
from tiny import TinyNet, tiny_env


def make_env(splits, **kwargs):
    return tiny_env(splits, **{"recovery_batch_size": 16, **kwargs})


@pytest.fixture
def env(splits):
    return make_env(splits)


def test_spaces_and_groups(env):
    assert env.n_groups == len(env.group_names) == 3  # conv1, residual (conv2+conv3), fc1
    assert env.action_space.shape == (env.n_groups,)
    assert env.observation_space.shape == (len(GROUP_FEATURES) * env.n_groups + len(GLOBAL_FEATURES),)
    assert sorted(env.layer_counts.tolist()) == [1, 1, 2]
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert info["step"] == 0 and info["flops_reduction"] == 0.0 and info["channel_sparsity"] == 0.0
    assert env.step_filter_budget == int((env.layer_counts * env.original_channels).sum() * 0.5 / 1)


@pytest.mark.parametrize("kwargs", [dict(), dict(action_mode="distribution", budget="flops", n_steps=2)])
def test_gymnasium_check_env(splits, kwargs):
    from gymnasium.utils.env_checker import check_env

    check_env(make_env(splits, **kwargs), skip_render_check=True)


def test_sb3_check_env(splits):
    from stable_baselines3.common.env_checker import check_env

    with pytest.warns(UserWarning):  # SB3 recommends a symmetric [-1, 1] action Box; agents rescale
        check_env(make_env(splits, n_steps=2, budget="channels"), warn=True)


def rollout(env, seed, n_max=20):
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    trace = [obs]
    for _ in range(n_max):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        trace.append((obs, reward, terminated, truncated, info))
        if terminated or truncated:
            break
    return trace


def test_seeding_makes_runs_equal(splits):
    from gymnasium.utils.env_checker import data_equivalence

    kw = dict(n_steps=3, budget="flops", recovery="kd", recovery_batches=1)
    a = rollout(make_env(splits, **kw), seed=7)
    b = rollout(make_env(splits, **kw), seed=7)
    assert len(a) == len(b) == 4
    assert data_equivalence(a, b, exact=True)


@pytest.mark.parametrize("metric", ["flops", "channels", "params"])
def test_random_episode_terminates_at_target(splits, metric):
    env = make_env(splits, target=0.4, target_metric=metric, max_step_sparsity=0.3)
    trace = rollout(env, seed=3)
    *_, (obs, reward, terminated, truncated, info) = trace
    assert terminated and not truncated
    assert info["target_progress"] >= 0.4 - env.target_tolerance
    key = {"flops": "flops_reduction", "channels": "channel_sparsity", "params": "params_reduction"}[metric]
    assert info[key] == pytest.approx(info["target_progress"])
    with pytest.raises(RuntimeError, match="reset"):
        env.step(env.action_space.sample())


@pytest.mark.parametrize("mode", ["sparsity", "distribution"])
def test_budget_meets_cumulative_goal(splits, mode):
    env = make_env(splits, model=TinyNet(), action_mode=mode, budget="flops", n_steps=2, target=0.5)
    trace = rollout(env, seed=1)
    assert len(trace) == 3  # exactly n_steps
    first, last = trace[1][4], trace[2][4]
    assert not trace[1][2] and trace[2][2]
    # channel granularity of a 12-16-20 channel net: within a few percent of the cumulative goals
    assert abs(first["flops_reduction"] - 0.25) < 0.06
    assert abs(last["flops_reduction"] - 0.5) < 0.06
    # exactly: the cumulative goals the steps aimed at, both reachable
    assert (first["budget_goal"], last["budget_goal"]) == (0.25, 0.5)
    assert first["budget_missed"] is False and last["budget_missed"] is False


def test_budget_is_met_when_the_named_groups_cannot_carry_it(splits):
    # only one group named: even at max_step_sparsity it cannot remove half the FLOPs alone, so the env
    # raises the other groups to a common floor instead of silently missing the budget
    env = make_env(splits, model=TinyNet(), action_mode="sparsity", budget="flops", n_steps=1,
                   target=0.5)
    env.reset(seed=0)
    action = np.zeros(env.n_groups, dtype=np.float32)
    action[-1] = 1.0
    _, _, terminated, _, info = env.step(action)
    assert terminated
    assert abs(info["flops_reduction"] - 0.5) < 0.06
    assert info["budget_goal"] == 0.5 and info["budget_missed"] is False  # met, not silently missed
    # the named group is pruned hardest
    removed = 1.0 - info["kept_channels"] / env.original_channels
    assert removed[-1] == removed.max()


def test_distribution_bound_keeps_every_group_above_it(splits):
    # AMC's per-layer bound in distribution mode: a distribution that names one group only cannot cut it below
    # half its width; the other groups carry the rest of the budget
    env = make_env(splits, model=TinyNet(), action_mode="distribution", budget="flops", n_steps=1, target=0.5,
                   distribution_max_sparsity=0.5)
    env.reset(seed=0)
    action = np.zeros(env.n_groups, dtype=np.float32)
    action[-1] = 1.0
    _, _, terminated, _, info = env.step(action)
    assert terminated and info["budget_missed"] is False and abs(info["flops_reduction"] - 0.5) < 0.06
    assert np.all(info["group_sparsity"] <= 0.5 + 1e-9)
    free = make_env(splits, model=TinyNet(), action_mode="distribution", budget="flops", n_steps=1, target=0.5)
    free.reset(seed=0)
    assert free.step(action)[4]["group_sparsity"][-1] > 0.5  # without the bound the named group goes further
    # a one-step target that the bound cannot reach is refused at construction, naming the bound
    with pytest.raises(ValueError, match="distribution_max_sparsity=0.2"):
        make_env(splits, model=TinyNet(), action_mode="distribution", budget="flops", n_steps=1, target=0.5,
                 distribution_max_sparsity=0.2)


def test_distribution_channel_budget_is_authors_m(splits):
    env = make_env(splits, action_mode="distribution", target_metric="channels", n_steps=4, target=0.4)
    env.reset(seed=0)
    filter_num = int((env.layer_counts * env.original_channels).sum())
    m = int(filter_num * 0.4 / 4)
    assert env.step_filter_budget == m
    _, _, _, _, info = env.step(np.ones(env.n_groups, dtype=np.float32))
    removed = env.original_channels - info["kept_channels"]
    assert abs(int((env.layer_counts * removed).sum()) - m) <= int(env.layer_counts.max())


def test_reward_matches_formula_and_measurements(splits):
    env = make_env(splits, alpha=0.3, beta=0.7)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.full(env.n_groups, 0.5, dtype=np.float32))
    assert reward == pytest.approx(info["accuracy"] + 0.3 * info["flops_reduction"] + 0.7 * info["params_reduction"])
    cost0 = count_costs(env.original_model, input_size=env.input_size)
    cost = count_costs(env.model, input_size=env.input_size)
    assert (info["macs"], info["params"]) == (cost.macs, cost.params)
    assert info["flops_reduction"] == pytest.approx(1 - cost.macs / cost0.macs)
    assert info["params_reduction"] == pytest.approx(1 - cost.params / cost0.params)
    x, y = preload(splits.val, n=24, seed=0)
    assert info["accuracy"] == pytest.approx(evaluate(env.model, (x, y))["top1"])
    assert info["kept_channels"].tolist() == env.current_channels.tolist()
    np.testing.assert_allclose(info["group_sparsity"], 1 - env.current_channels / env.original_channels)
    expected = 1 - (env.layer_counts * env.current_channels).sum() / (env.layer_counts * env.original_channels).sum()
    assert info["channel_sparsity"] == pytest.approx(expected)


def test_lookahead_leaves_state_unchanged_and_step_reuses_it(env):
    obs0, _ = env.reset(seed=0)
    weights0 = copy.deepcopy(env.model.state_dict())
    action = np.array([0.5, 0.2, 0.7], dtype=np.float32)
    reward, info = env.evaluate_action(action)
    env.evaluate_action(np.zeros(env.n_groups, dtype=np.float32))
    np.testing.assert_array_equal(env.restore(env.snapshot()), obs0)
    assert env.step_index == 0 and env.current_channels.tolist() == env.original_channels.tolist()
    assert all(torch.equal(weights0[k], v) for k, v in env.model.state_dict().items())
    assert info["lookahead"] and not info["cached"] and env.n_evaluations == 2
    _, reward_step, _, _, info_step = env.step(action)
    assert info_step["cached"] and reward_step == reward and env.n_evaluations == 2
    assert info_step["kept_channels"].tolist() == info["kept_channels"].tolist()


def test_snapshot_restore_round_trip(splits):
    env = make_env(splits, n_steps=3, budget="channels")
    env.reset(seed=0)
    snap = env.snapshot()
    obs_a, r_a, *_ = env.step(np.full(env.n_groups, 0.3, dtype=np.float32))
    env.step(np.full(env.n_groups, 0.3, dtype=np.float32))
    env.restore(snap)
    assert env.step_index == 0 and env.current_channels.tolist() == env.original_channels.tolist()
    obs_b, r_b, *_ = env.step(np.full(env.n_groups, 0.3, dtype=np.float32))
    np.testing.assert_array_equal(obs_a, obs_b)
    assert r_a == r_b
    with pytest.raises(TypeError, match="snapshot"):
        env.restore("not a snapshot")


def test_model_is_traced_once_and_steps_derive_the_groups(splits, monkeypatch):
    from pruning_env.pruning.graph import DependencyGraph

    traces = []
    build = DependencyGraph.build.__func__

    def counted_build(cls, *args, **kwargs):
        traces.append(1)
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(DependencyGraph, "build", classmethod(counted_build))
    env = make_env(splits, n_steps=3, budget="flops")
    for episode in range(2):
        env.reset(seed=episode)
        snap = env.snapshot()
        env.step(np.full(env.n_groups, 0.3, dtype=np.float32))
        env.restore(snap)
        while not env.snapshot().terminated:
            env.step(np.array([0.5, 0.2, 0.4], dtype=np.float32))
    assert len(traces) == 1  # the original model, at construction; every pruned state derives its groups
    assert env.snapshot().step_index == 3


def test_bad_inputs(env):
    good = np.full(env.n_groups, 0.3, dtype=np.float32)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(good)
    with pytest.raises(RuntimeError, match="reset"):
        env.evaluate_action(good)
    env.reset(seed=0)
    for bad in (np.zeros(env.n_groups + 1), np.zeros((2, env.n_groups)), 0.5, []):
        with pytest.raises(ValueError, match="shape"):
            env.step(bad)
    for value in (np.nan, np.inf, -np.inf):
        a = good.copy()
        a[1] = value
        with pytest.raises(ValueError, match="NaN/inf"):
            env.evaluate_action(a)
    with pytest.raises(ValueError, match="numeric"):
        env.step(["a", "b", "c"])
    # values outside the space are clipped (documented): 5 acts as max_step_sparsity, -1 as 0
    _, info_hi = env.evaluate_action(np.array([5.0, -1.0, 0.3]))
    _, info_ok = env.evaluate_action(np.array([env.max_step_sparsity, 0.0, 0.3]))
    assert info_hi["kept_channels"].tolist() == info_ok["kept_channels"].tolist()
    assert env.step_index == 0  # nothing above advanced the episode
    env.step(np.full(env.n_groups, 0.9))
    assert env.snapshot().terminated
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step(good)
    with pytest.raises(RuntimeError, match="episode is over"):
        env.evaluate_action(good)


def test_constructor_rejects_bad_arguments(splits):
    for kwargs, match in [(dict(action_mode="nope"), "action_mode"), (dict(budget="energy"), "budget"),
                          (dict(target=1.5), "target"), (dict(n_steps=0), "n_steps"),
                          (dict(recovery="sgd"), "recovery"), (dict(target_metric="acc"), "target_metric")]:
        with pytest.raises(ValueError, match=match):
            make_env(splits, **kwargs)
    with pytest.raises(ValueError, match="7 outputs but dataset 'synthetic' has 10 classes"):
        make_env(splits, model=TinyNet(num_classes=7))


def test_source_model_is_never_modified(splits):
    torch.manual_seed(0)
    source = TinyNet()
    before = copy.deepcopy(source.state_dict())
    env = make_env(splits, model=source, n_steps=2, budget="flops", recovery="kd", recovery_batches=2)
    original_before = copy.deepcopy(env.original_model.state_dict())
    rollout(env, seed=0)
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
    assert all(torch.equal(original_before[k], v) for k, v in env.original_model.state_dict().items())
    env.reset(seed=0)
    assert env.model is not env.original_model
    assert all(torch.equal(original_before[k], v) for k, v in env.model.state_dict().items())


def test_train_mode_importance_nudges_bn_of_the_state_not_the_original(splits):
    # the authors' side effect (spec §9.2): BN running stats of the pruned-from model move once per state
    env = make_env(splits, importance_train_mode=True)
    original_before = copy.deepcopy(env.original_model.state_dict())
    env.reset(seed=0)
    assert not torch.equal(env.model.bn1.running_mean, env.original_model.bn1.running_mean)
    assert all(torch.equal(original_before[k], v) for k, v in env.original_model.state_dict().items())


def test_recovery_reports_accuracy_and_timings(splits):
    env = make_env(splits, n_steps=2, budget="flops", recovery="ce", recovery_batches=1,
                   record_timings=True)
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(np.full(env.n_groups, 0.5))
    assert not terminated and 0.0 <= info["accuracy_recovered"] <= 1.0
    assert info["time_prune"] > 0 and info["time_eval"] > 0 and info["time_importance"] > 0
    assert info["time_recovery"] > 0
    _, _, terminated, _, info = env.step(np.full(env.n_groups, 0.5))
    assert terminated and "accuracy_recovered" not in info  # no recovery after the final step


def test_budget_free_episode_is_truncated_by_max_steps(splits):
    env = make_env(splits, target=0.9, max_steps=2)
    env.reset(seed=0)
    _, _, terminated, truncated, _ = env.step(np.full(env.n_groups, 0.01))
    assert not terminated and not truncated
    _, _, terminated, truncated, _ = env.step(np.full(env.n_groups, 0.01))
    assert truncated and not terminated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(splits):
    runs = {}
    for device in ("cpu", "cuda"):
        env = make_env(splits, device=device, n_steps=2, budget="flops", amp=False)
        runs[device] = rollout(env, seed=0)[1:]
        assert next(env.model.parameters()).device.type == device
    for cpu, cuda in zip(runs["cpu"], runs["cuda"]):
        # channel counts follow from the action and the budget; which channels go may differ by float noise
        assert cpu[4]["flops_reduction"] == pytest.approx(cuda[4]["flops_reduction"], abs=0.02)
        assert cpu[1] == pytest.approx(cuda[1], abs=0.1)


def count_finetunes(monkeypatch):
    """Record every recovery fine-tune (its teacher and its snapshot data) while running the real one: recovery
    goes through ``pruning_env.training.recover``, which runs ``training.finetune``."""
    from pruning_env import training

    calls = []
    real = training.finetune

    def recorded(model, *args, **kwargs):
        calls.append(kwargs)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(training, "finetune", recorded)
    return calls


def test_lookahead_never_fine_tunes(splits, monkeypatch):
    calls = count_finetunes(monkeypatch)
    env = make_env(splits, n_steps=3, budget="flops", recovery="kd", recovery_batches=1)
    env.reset(seed=0)
    action = np.full(env.n_groups, 0.3, dtype=np.float32)
    env.evaluate_action(action)
    snap = env.snapshot()
    # a depth-2 tree search (spec §2.5): children of children, scored without any recovery
    _, _, _, _, info = env.lookahead_step(action)
    assert info["lookahead"] and "accuracy_recovered" not in info and env.step_index == 1
    env.evaluate_action(action)
    env.lookahead_step(action)
    env.restore(snap)
    assert calls == []
    _, _, _, _, info = env.step(action)
    assert len(calls) == 1 and "accuracy_recovered" in info and not info["lookahead"]


def test_recovery_period_recovers_every_nth_step(splits, monkeypatch):
    calls = count_finetunes(monkeypatch)
    env = make_env(splits, n_steps=5, budget="flops", recovery="ce", recovery_batches=1, recovery_period=2)
    env.reset(seed=0)
    recovered = ["accuracy_recovered" in env.step(np.full(env.n_groups, 0.3))[4] for _ in range(5)]
    assert recovered == [False, True, False, True, False] and len(calls) == 2  # never after the final step


def test_recovery_keeps_the_best_snapshot(splits, monkeypatch):
    calls = count_finetunes(monkeypatch)
    # a learning rate that wrecks the model: the best snapshot is the one before recovery
    env = make_env(splits, n_steps=2, budget="flops", recovery="ce", recovery_epochs=1, recovery_lr=50.0,
                   recovery_best_snapshot=True)
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.full(env.n_groups, 0.3))
    assert calls[0]["val_data"] is env.task.reward_data
    assert info["accuracy_recovered"] >= info["accuracy"]
    assert all(torch.isfinite(p).all() for p in env.model.parameters())


def test_teacher_switch_follows_the_better_student(splits, monkeypatch):
    calls = count_finetunes(monkeypatch)
    # an untrained original model (about 10% on 10 classes) is beaten by a few epochs of KD + CE recovery
    env = make_env(splits, n_steps=3, target=0.3, budget="flops", recovery="kd", recovery_epochs=3,
                   recovery_lr=0.05, kd_soft_weight=0.25, teacher_switch=True, recovery_best_snapshot=True)
    env.reset(seed=0)
    snap = env.snapshot()
    _, _, _, _, info = env.step(np.full(env.n_groups, 0.3))
    assert calls[0]["teacher"] is env.original_model
    assert info["accuracy_recovered"] > env.original_accuracy and info["teacher_switched"]
    env.step(np.full(env.n_groups, 0.3))
    teacher = calls[1]["teacher"]
    assert teacher is not env.original_model and teacher is not env.model  # a copy of step 1's student
    # the teacher belongs to the trajectory: a restored state distils from its own teacher again
    env.restore(snap)
    env.step(np.full(env.n_groups, 0.3))
    assert calls[2]["teacher"] is env.original_model


def test_public_planning_api_for_agents(splits):
    env = make_env(splits, n_steps=2, budget="flops")
    env.reset(seed=0)
    assert env.pruner is env.snapshot().pruner and env.pruner.n_groups == env.n_groups
    np.testing.assert_array_equal(env.group_importance, env.pruner.group_importance())
    assert env.group_importance.shape == (env.n_groups,) and np.all(env.group_importance > 0)
    action = np.array([0.5, 0.2, 0.7], dtype=np.float32)
    keep = env.keep_for_action(action)
    assert env.n_evaluations == 0  # no model built or evaluated
    _, info = env.evaluate_action(action)
    assert keep.tolist() == info["kept_channels"].tolist()
    env.step(action)
    env.step(action)
    assert env.pruner is None and np.all(env.group_importance == 0)
    with pytest.raises(RuntimeError, match="episode is over"):
        env.keep_for_action(action)


def test_env_prunes_a_torchvision_classifier_on_an_image_folder(tmp_path):
    """Issue 15 item 6: any traceable classifier (here torchvision's ResNet-18, random init) and an image-folder
    dataset drive the RL search; the step meets its FLOPs budget with a physically smaller model."""
    torchvision = pytest.importorskip("torchvision")
    from PIL import Image

    from pruning_env.costs import count_costs
    from pruning_env.envs import PruneEnv

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog", "fox"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    net = torchvision.models.resnet18(num_classes=3)
    env = PruneEnv(model=net, dataset=f"imagefolder:{tmp_path}", val_size=6, reward_samples=6, calibration_size=8,
                   target=0.5, budget="flops")
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(np.full(env.n_groups, 0.5, dtype=np.float32))
    assert terminated and np.isfinite(reward)
    assert info["flops_reduction"] == pytest.approx(0.5, abs=0.02)
    assert info["budget_goal"] == 0.5 and info["budget_missed"] is False
    before = count_costs(net, (3, 32, 32))
    after = count_costs(env.model, (3, 32, 32))
    assert after.params < 0.8 * before.params and after.macs < 0.55 * before.macs
