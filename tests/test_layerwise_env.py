"""LayerwisePruneEnv (AMC's formulation) on the tiny net: spaces, budget every episode, seeding, the wall."""
import numpy as np
import pytest
import torch

from tiny import TinyNet
from pruning_env.envs.layerwise_env import LAYER_FEATURES, LayerwisePruneEnv


def make(splits, **kwargs):
    torch.manual_seed(0)
    defaults = dict(model=TinyNet(), dataset=splits, reward_samples=24, calibration_size=16, seed=0,
                    record_timings=False, target=0.5, target_metric="flops", budget="flops")
    defaults.update(kwargs)
    return LayerwisePruneEnv(**defaults)


def run_episode(env, actions):
    obs, _ = env.reset(seed=0)
    rewards, infos = [], []
    for a in actions:
        assert env.observation_space.contains(obs)
        obs, r, term, trunc, info = env.step(np.array([a], dtype=np.float32))
        rewards.append(r)
        infos.append(info)
        if term or trunc:
            break
    return rewards, infos, term, trunc


def test_spaces(splits):
    env = make(splits)
    assert env.action_space.shape == (1,) and env.action_space.high[0] == pytest.approx(0.8)
    assert env.observation_space.shape == (len(LAYER_FEATURES),)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)


def test_budget_met_every_episode(splits):
    env = make(splits)
    rng = np.random.default_rng(0)
    for _ in range(4):
        rewards, infos, term, trunc = run_episode(env, rng.uniform(0, 0.8, env.n_groups))
        assert len(infos) == env.n_groups and all(r == 0.0 for r in rewards[:-1])
        assert term and not trunc and infos[-1]["budget_missed"] is False
        assert infos[-1]["budget_goal"] == 0.5


def test_wall_clips_unreachable_action(splits):
    env = make(splits)
    _, infos, term, _ = run_episode(env, [0.0] * env.n_groups)
    assert any(i["wall_clipped"] for i in infos) and term and infos[-1]["budget_missed"] is False
    assert infos[-1]["wall_clips"] >= 1 and max(i["sparsity"] for i in infos) > 0.0


def test_seeding_repeatable(splits):
    a = run_episode(make(splits), [0.3, 0.6, 0.2])
    b = run_episode(make(splits), [0.3, 0.6, 0.2])
    assert a[0] == b[0] and a[1][-1]["flops_reduction"] == b[1][-1]["flops_reduction"]


def test_bad_action_refused(splits):
    env = make(splits)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="finite sparsity"):
        env.step(np.array([np.nan]))


def test_checkers(splits):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    check_env(make(splits), skip_render_check=True)
    sb3_check_env(make(splits), warn=True)


def test_registered_beside_every_prune_id():
    import gymnasium as gym
    import pruning_env  # noqa: F401  (registers the ids)
    from pruning_env.envs.registration import prune_env_ids

    for env_id in prune_env_ids():
        lw = gym.registry[env_id.replace("RLPrune-", "RLPruneLW-", 1)]
        assert lw.entry_point.endswith("LayerwisePruneEnv")
