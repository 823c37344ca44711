"""Latency budgets and the latency reward term in PruneEnv, on the tiny setup (a tiny grid; timings never asserted)."""
import numpy as np
import pytest
import torch

from tiny import tiny_env

GRID = (0.25, 0.5, 1.0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One latency table for the module (the tiny net's latency is mostly overhead: tables measured twice differ)."""
    return tmp_path_factory.mktemp("latency_cache")


@pytest.fixture(scope="module")
def reachable(splits, cache):
    """Half the predicted latency reduction of every group at its floor: a target the tiny net can reach."""
    env = _env(splits, cache, target_metric="flops", budget="flops", target=0.3, gamma=1.0)
    floor = np.minimum(env._probe.keep_counts(np.ones(env.n_groups)), env.original_channels)
    most = env.meter.latency_reduction(floor)
    assert most > 0, "the tiny net's predicted latency does not fall when every group is at its floor"
    return 0.5 * most


def _env(splits, cache, **kw):
    return tiny_env(splits, **{**dict(action_mode="sparsity", target_metric="latency", budget="latency", target=0.12,
                                      n_steps=1, latency_grid=GRID, latency_cache=str(cache)), **kw})


def test_latency_budget_is_met_in_predicted_latency(splits, cache, reachable):
    env = _env(splits, cache, target=reachable)
    _, info0 = env.reset(seed=0)
    model = env.latency_model
    assert info0["predicted_latency"] == pytest.approx(model.original)
    assert info0["latency_reduction"] == pytest.approx(0.0)
    _, _, terminated, _, info = env.step(np.array([0.9, 0.2, 0.5], dtype=np.float32))
    kept = info["kept_channels"]
    predicted = float(model.predict(kept))
    assert info["predicted_latency"] == pytest.approx(predicted)
    assert info["latency_reduction"] == pytest.approx(1.0 - predicted / model.original)
    # the episode's progress is the predicted latency reduction, not FLOPs
    assert info["target_progress"] == pytest.approx(info["latency_reduction"])
    assert info["budget_goal"] == pytest.approx(reachable)
    assert terminated
    # the budget search picks the closest reachable kept vector: nothing is pruned further than needed by much
    assert abs(info["latency_reduction"] - reachable) < 0.5 * reachable
    assert env.meter.value("latency", kept, None) == pytest.approx(info["latency_reduction"])


def test_device_setting_is_recorded_in_the_config(splits, tmp_path):
    env = _env(splits, tmp_path, target_metric="flops", budget="flops", gamma=1.0, latency_batch_size=4)
    s = env.config.latency_setting()
    assert (s.device, s.threads, s.batch_size, s.dtype, s.channels_last) == ("cpu", 1, 4, "float32", False)
    assert env.latency_model.setting == s


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_latency_without_a_gpu_is_a_clear_error(splits, tmp_path):
    with pytest.raises(ValueError, match="latency_device='cuda'.*CUDA is not available"):
        _env(splits, tmp_path, latency_device="cuda")


def test_no_latency_model_unless_asked(splits):
    env = tiny_env(splits, action_mode="sparsity", budget="flops", target=0.3, n_steps=1)
    assert env.latency_model is None
    _, info = env.reset(seed=0)
    assert "predicted_latency" not in info


def test_gamma_adds_the_latency_reduction_to_the_reward(splits, cache):
    action = np.array([0.6, 0.3, 0.4], dtype=np.float32)
    out = {}
    for gamma in (0.0, 2.0):
        env = _env(splits, cache, target_metric="flops", budget="flops", target=0.3, gamma=gamma)
        env.reset(seed=0)
        _, reward, _, _, info = env.step(action)
        out[gamma] = (reward, info)
    (r0, i0), (r2, i2) = out[0.0], out[2.0]
    np.testing.assert_array_equal(i0["kept_channels"], i2["kept_channels"])
    assert i2["latency_reduction"] != 0  # the sign is whatever the table predicts: the tiny net is mostly overhead
    assert r2 - r0 == pytest.approx(2.0 * i2["latency_reduction"])
    assert r0 == pytest.approx(i0["accuracy"] + 0.25 * i0["flops_reduction"] + 0.25 * i0["params_reduction"])


def test_budget_target_follows_target_metric(splits, cache, reachable):
    env = _env(splits, cache, budget="target", target=reachable)
    assert env.budget == "latency"


def test_checkers_pass_on_a_latency_budget(splits, cache, reachable):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    check_env(_env(splits, cache, target=reachable))
    sb3_check_env(_env(splits, cache, target=reachable), warn=False)


def test_knapsack_agent_meets_the_latency_budget_and_counts_its_evaluations(splits, cache, reachable):
    """The knapsack agent on a two-step latency budget: every step meets its goal in predicted latency, the final
    model is at the target, and the only models scored are the steps' own (its cost queries build no model)."""
    from agents.common.monitor import PruneMonitor
    from agents.knapsack import LatencyKnapsackPruner, knapsack_keep
    from pruning_env.envs.budget import cumulative_goal

    env = _env(splits, cache, target=reachable, n_steps=2)
    agent = LatencyKnapsackPruner(PruneMonitor(env, max_evaluations=10), seed=0)
    agent.learn()
    assert agent.episodes == 1 and len(agent.history) == 2
    best = agent.best["info"]
    model = env.latency_model
    kept = np.asarray(best["kept_channels"])
    assert best["predicted_latency"] == pytest.approx(float(model.predict(kept)))
    # the env's budget mapping then picks the reachable kept vector closest to the goal (the tiny net's steps are
    # coarse), as for every agent
    assert abs(best["latency_reduction"] - reachable) < 0.5 * reachable
    for step, row in enumerate(agent.history, start=1):
        assert row["knapsack_met"] and row["n_evaluations"] == step
    # the knapsack's own plan meets each step's goal in predicted latency (replayed on a fresh episode)
    env.reset(seed=0)
    for step in (1, 2):
        goal = cumulative_goal(reachable, step, 2)
        result = knapsack_keep(env.pruner, lambda k: np.array([float(model.predict(r)) / model.original
                                                               for r in np.atleast_2d(k)]), 1.0 - goal)
        assert result.met and 1.0 - float(model.predict(result.keep)) / model.original >= goal - 1e-9
        env.step(agent.predict()[0])
    assert np.all(kept <= env.original_channels) and np.all(kept >= 1)
    # one scored model per step: agent, monitor and env count the same two evaluations
    assert agent.n_evaluations == env.n_evaluations == 2


def test_batched_reductions_agree_exactly_with_per_row_ones(splits, cache, reachable):
    """``env.reduction`` of a matrix (the knapsack's candidates, one latency-model call) is, row for row, exactly
    the reduction of each row alone, in every metric; the original's latency is predicted once."""
    env = _env(splits, cache, target=reachable)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    rows = np.vstack([env.original_channels, rng.integers(1, env.original_channels + 1, size=(20, env.n_groups))])
    for metric in ("latency", "flops", "params", "channels"):
        batched = env.reduction(rows, metric=metric)
        assert batched.shape == (len(rows),)
        np.testing.assert_array_equal(batched, [env.reduction(r, metric=metric) for r in rows])
    model = env.latency_model
    assert env.meter.original_latency == model.original
    expected = [1.0 - float(model.predict(r)) / float(model.predict(env.original_channels)) for r in rows]
    np.testing.assert_array_equal(env.meter.latency_reduction(rows), expected)
    with pytest.raises(ValueError, match="one column per group"):
        env.reduction(rows[:, :-1])


def test_knapsack_plan_is_the_per_row_plan(splits, cache, reachable):
    """The knapsack agent's batched candidate costs choose exactly what the per-row cost (one reduction per
    candidate, the original's latency predicted each time) chose, at every step of a latency and a MACs budget."""
    from agents.heuristics import _to_action
    from agents.knapsack import LatencyKnapsackPruner, knapsack_keep
    from pruning_env.envs.budget import cumulative_goal

    for metric, target in (("latency", reachable), ("flops", 0.4)):
        env = _env(splits, cache, target=target, n_steps=2, target_metric=metric, budget=metric, gamma=1.0)
        model = env.latency_model
        agent = LatencyKnapsackPruner(env, seed=0)
        env.reset(seed=0)
        for step in (1, 2):
            goal = cumulative_goal(target, step, 2)

            def per_row(keep):
                if metric == "flops":
                    return np.array([1.0 - env.reduction(k, metric=metric) for k in np.atleast_2d(keep)])
                return np.array([float(model.predict(k)) / float(model.predict(env.original_channels))
                                 for k in np.atleast_2d(keep)])

            old = knapsack_keep(env.pruner, per_row, 1.0 - goal)
            expected = _to_action(env, 1.0 - old.keep / np.maximum(env.current_channels, 1.0))
            action, _ = agent.predict()
            np.testing.assert_array_equal(action, expected)
            assert len(old.steps) > 0
            env.step(action)


def test_quickstart_with_a_latency_target_runs_and_passes_both_checkers(tmp_path):
    import gymnasium as gym
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    import pruning_env  # noqa: F401  (registers the ids)

    env = gym.make("RLPrune-quickstart", target_metric="latency", target=0.5, checkpoint=str(tmp_path / "q.pt"),
                   auto_pretrain_epochs=1, device="cpu", reward_samples=100, calibration_size=16,
                   latency_cache=str(tmp_path / "latency"), latency_grid=GRID)
    assert env.unwrapped.budget == "latency" and env.unwrapped.latency_model is not None
    env.reset(seed=0)
    env.action_space.seed(0)
    _, _, terminated, _, info = env.step(env.action_space.sample())
    assert terminated
    assert info["latency_reduction"] == pytest.approx(0.5, abs=env.unwrapped.target_tolerance + 0.02)
    assert info["target_progress"] == pytest.approx(info["latency_reduction"])
    check_env(env.unwrapped, skip_render_check=True)
    with pytest.warns(UserWarning):  # SB3 recommends a symmetric [-1, 1] action Box; agents rescale
        sb3_check_env(env.unwrapped, warn=True)
