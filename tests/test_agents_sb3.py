"""Tests of the Stable-Baselines3 baselines on PruneEnv: every algorithm learns a few steps, finishes episodes,
counts one evaluation per timestep (plus the final deterministic episode), stops exactly at its budget and
survives a save/load round trip.

A three-group conv net on generated 16x16 images keeps each env step to a few milliseconds.
"""
import numpy as np
import pytest

from agents.common.base import BasePruningAgent
from agents.common.save_util import AGENT_KIND, AGENT_VERSION, load_parts
from agents.rl_pruner import RLPrunerAgent
from agents.sb3_baselines import SB3Agent, StopAtTimesteps, load_zoo_hyperparams, sb3_algorithms, to_sparsity
from rl_prune.config import PruneRunConfig
from rl_prune.pipeline import build_agent
from tiny import SB3_SMALL, tiny_env


def make_env(splits, **kwargs):
    return tiny_env(splits, **{**dict(reward_samples=16, action_mode="sparsity", budget="flops", n_steps=1,
                                      target=0.5, alpha=0.0, beta=0.0), **kwargs})


SMALL = SB3_SMALL
POLICY = dict(policy_kwargs={"net_arch": [16, 16]})


def make_agent(splits, algo, **kwargs):
    hp = dict(SMALL[algo], **POLICY)
    hp.update(kwargs)
    return SB3Agent(make_env(splits), algo=algo, seed=0, **hp)


@pytest.mark.parametrize("algo", sorted(SMALL))
def test_sb3_learns_and_counts_evaluations(splits, algo, tmp_path):
    if algo not in sb3_algorithms():
        pytest.skip("sb3-contrib is not installed")
    agent = make_agent(splits, algo)
    agent.learn(total_timesteps=24)
    # one-step episodes: every timestep is one evaluated model; the final deterministic episode adds one
    assert agent.num_timesteps == 24
    assert len(agent.history) == 25 and agent.episodes == 25
    assert agent.n_evaluations == 25
    assert [row["n_evaluations"] for row in agent.history] == list(range(1, 26))
    for row in agent.history:
        assert row["flops_reduction"] == pytest.approx(0.5, abs=0.05)
    assert agent.best is not None and agent.best["reward"] == max(r["reward"] for r in agent.history)
    assert agent.best["info"]["budget_goal"] == 0.5 and agent.best["info"]["budget_missed"] is False

    obs, _ = agent.wrapped.reset(seed=0)
    action, _ = agent.predict(obs, deterministic=True)
    assert action.shape == (3,) and np.all((action >= 0) & (action <= 1))
    path = agent.save(tmp_path / f"{algo}.pt")
    # one agent file, SB3's own zip inside it
    assert path == tmp_path / f"{algo}.pt" and path.is_file()
    assert SB3Agent.MODEL_PART in load_parts(path, AGENT_KIND, AGENT_VERSION).files
    loaded = SB3Agent.load(path, env=make_env(splits))
    np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], action, atol=1e-6)
    assert loaded.history == agent.history and loaded.algo == algo
    bare = SB3Agent.load(path)  # without an env: predict only
    np.testing.assert_allclose(bare.predict(obs, deterministic=True)[0], action, atol=1e-6)


@pytest.mark.parametrize("algo,total", [("ppo", 20), ("a2c", 10)])
def test_on_policy_stops_exactly_at_the_budget(splits, algo, total):
    agent = make_agent(splits, algo)  # n_steps 8 / 4 does not divide the budget
    agent.learn(total_timesteps=total, final_episode=False)
    assert agent.num_timesteps == total and agent.n_evaluations == total


def test_full_rollout_at_the_limit_is_still_trained_on(splits):
    agent = make_agent(splits, "ppo")
    seen = []

    class Spy(StopAtTimesteps):
        def _on_rollout_end(self) -> None:
            seen.append(self.num_timesteps)

    agent.model.learn(total_timesteps=16, callback=Spy(16))
    assert seen == [8, 16] and agent.model._n_updates == 2 * 2  # two rollouts x n_epochs=2


def test_learn_twice_continues(splits, tmp_path):
    agent = make_agent(splits, "sac")
    agent.learn(total_timesteps=10)
    agent.learn(total_timesteps=6, reset_num_timesteps=False)
    assert agent.num_timesteps == 16
    assert agent.n_evaluations == 16 + 2  # two final deterministic episodes
    # any suffix: one file, written where asked
    path = agent.save(tmp_path / "sac.zip")
    assert path == tmp_path / "sac.zip" and path.is_file()
    assert SB3Agent.load(tmp_path / "sac.zip").algo == "sac"


def test_an_sb3_file_loads_through_the_base_class_and_another_class_is_named(splits, tmp_path):
    agent = make_agent(splits, "a2c")
    agent.learn(total_timesteps=4)
    path = agent.save(tmp_path / "a2c.pt")
    loaded = BasePruningAgent.load(path, env=make_env(splits))  # dispatches to SB3Agent's loader (no KeyError)
    assert type(loaded) is SB3Agent and loaded.algo == "a2c" and loaded.history == agent.history
    obs, _ = agent.wrapped.reset(seed=0)
    np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], agent.predict(obs, deterministic=True)[0],
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"a2c\.pt holds a SB3Agent, not a RLPrunerAgent; load it with SB3Agent\.load"):
        RLPrunerAgent.load(path)


def test_action_map_keeps_every_group_positive(splits):
    np.testing.assert_allclose(to_sparsity([-3.0, -1.0, 0.0, 1.0, 2.0], 0.01), [0.01, 0.01, 0.505, 1.0, 1.0])
    np.testing.assert_allclose(to_sparsity([-1.0, 1.0], 0.0), [0.0, 1.0])
    # a policy saturated at -1 on two of three groups still meets the FLOPs budget
    env = make_env(splits)
    env.reset(seed=0)
    _, _, _, _, info = env.step(to_sparsity([-1.0, -1.0, 1.0]))  # every group stays in the scaled action
    assert info["flops_reduction"] == pytest.approx(0.5, abs=0.05)
    # exactly: the step aimed at the target and the env reports it reachable (not a budget miss)
    assert info["budget_goal"] == 0.5 and info["budget_missed"] is False


def test_sb3_rejects_bad_arguments(splits):
    with pytest.raises(ValueError, match="unknown SB3 algorithm"):
        SB3Agent(None, algo="dqn")
    with pytest.raises(ValueError, match="off-policy"):
        SB3Agent(None, algo="ppo", noise_type="normal")
    with pytest.raises(ValueError, match="action_mode='sparsity'"):
        SB3Agent(make_env(splits, action_mode="distribution"), algo="ppo")
    with pytest.raises(ValueError, match="total_timesteps"):
        make_agent(splits, "ppo").learn()


def test_registry_maps_budget_and_zoo_file(splits):
    hp = load_zoo_hyperparams("ppo", "configs/sb3/ppo.yaml")
    assert hp["n_steps"] == 16 and "n_timesteps" in hp
    cfg = PruneRunConfig(seed=0, budget=40, agents={"ppo": {"n_steps": 8, "batch_size": 8}})
    agent, learn = build_agent(cfg, "ppo", make_env(splits))
    assert learn == {"total_timesteps": 40 - 1}  # the final deterministic episode's evaluation is in the budget
    assert agent.model.n_steps == 8 and agent.model.learning_rate == hp["learning_rate"]
