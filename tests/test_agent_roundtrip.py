"""A save/load round trip over every agent of the registry (``agents.registry.AGENTS``), built the way a run
builds it (``rl_prune.pipeline.build_env`` / ``build_agent``): a tiny budget of search, ``save``, ``load`` through
the agent's class, then the loaded agent's parameters, learned state, record and deterministic action must equal
the original's. An agent added to the registry is covered here without a new test.

The tiny three-group net on generated 16x16 images (``tests/tiny.py``) keeps each case to about a second.
"""
import numpy as np
import pytest
import torch

from agents.common.base import BasePruningAgent, unwrap_env
from agents.registry import AGENTS, agent_class
from rl_prune.config import PruneRunConfig
from rl_prune.pipeline import build_agent, build_env
from tiny import SB3_SMALL, TinyNet

#: tiny settings of the RL-Pruner family (any agent with these constructor arguments)
RL_PRUNER_SMALL = dict(sample_num=3, lr_epoch=2)
BUDGET = 24


def run_config(name, splits):
    spec = AGENTS[name]
    torch.manual_seed(0)
    env = dict(model=TinyNet(), dataset=splits, reward_samples=16, calibration_size=16, record_timings=False,
               budget="flops", n_steps=2, target=0.5, alpha=0.0, beta=0.0)
    agent = {}
    if spec.sb3_algo is not None:
        agent = dict(SB3_SMALL.get(name, SB3_SMALL.get(spec.sb3_algo, {})), policy_kwargs={"net_arch": [16, 16]})
    elif agent_class(name).__name__ == "RLPrunerAgent":
        agent = dict(RL_PRUNER_SMALL)
    return PruneRunConfig(agent=name, seed=0, device="cpu", budget=BUDGET, env=env, agents={name: agent})


def assert_same(a, b, where="state"):
    """Deep equality of saved state: dicts, sequences, numpy arrays and tensors element by element."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN: a step with nothing evaluated


def deterministic_action(agent, env):
    """The agent's deterministic action in ``env``'s seeded first state."""
    obs, _ = env.reset(seed=0)
    return np.asarray(agent.predict(obs, deterministic=True)[0])


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_every_registered_agent_survives_save_and_load(name, splits, tmp_path):
    spec = AGENTS[name]
    cls = agent_class(name)
    if spec.sb3_algo is not None:
        from agents.sb3_baselines import sb3_algorithms

        if spec.sb3_algo not in sb3_algorithms():
            pytest.skip(f"{spec.sb3_algo}: its package (sb3-contrib) is not installed")
    cfg = run_config(name, splits)
    env = build_env(cfg, name)
    agent, learn = build_agent(cfg, name, env)
    agent.learn(**learn)
    assert agent.n_evaluations >= 1 and len(agent.history) >= 1
    assert agent.n_evaluations <= BUDGET  # every agent is held to the run budget (PruneMonitor or SB3 steps)

    path = agent.save(tmp_path / f"{name}.pt")
    fresh_env = build_env(run_config(name, splits), name)
    loaded = cls.load(path, env=fresh_env)
    assert type(loaded) is type(agent)
    assert_same(loaded.get_parameters(), agent.get_parameters(), "parameters")
    assert_same(loaded.history, agent.history, "history")
    assert loaded.n_evaluations == agent.n_evaluations and loaded.num_timesteps == agent.num_timesteps
    if isinstance(agent, BasePruningAgent):
        if cls.save is BasePruningAgent.save:  # the base's file format (SB3Agent keeps its own state)
            assert_same(loaded._agent_state(), agent._agent_state(), "agent state")
        # through the base class too: the file names its class, whose own loader reads it (SB3's zip included)
        via_base = BasePruningAgent.load(path, env=build_env(run_config(name, splits), name))
        assert type(via_base) is cls
        assert_same(via_base.history, agent.history, "history")
    # the same deterministic action in the same state (the original's env reset beside the loaded one's)
    action = deterministic_action(agent, unwrap_env(env))
    assert action.shape == unwrap_env(env).action_space.shape  # (n_groups,); AMC's layer-wise env: (1,)
    np.testing.assert_array_equal(deterministic_action(loaded, unwrap_env(fresh_env)), action)
