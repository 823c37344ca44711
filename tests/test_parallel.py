"""The batched look-ahead and its backends: serial (plain, overlapped, with a reward estimator) and Ray give
exactly the rewards, infos, evaluation counts and candidate cache of ``evaluate_action`` in a loop; killed Ray
workers change nothing; asking for Ray without it installed says how to install it; SB3 collects from two
worker-process envs with every evaluation counted.

The Ray test starts one local 2-CPU cluster (a few seconds) and is skipped when Ray is absent.
"""
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from pruning_env.envs.config import PruneEnvConfig
from pruning_env.envs.parallel import ParallelConfig, RayNotInstalledError

from tiny import random_actions, tiny_env

TESTS = str(Path(__file__).resolve().parent)


def _env(splits, **kwargs):
    defaults = dict(action_mode="distribution", budget="flops", target=0.5, n_steps=2, lookahead_cache=5)
    return tiny_env(splits, **{**defaults, **kwargs})


def _same_info(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def _batch(n_groups: int):
    """Fresh actions, a repeat, an action cached before the batch, and one evicted by the batch and rebuilt
    (more candidates than the cache of 5 holds)."""
    a = random_actions(n_groups, 6)
    return [a[0], a[1], a[2], a[1], a[3], a[4], a[5], a[0]], a[4]


def _check_batch_equals_loop(loop_env, batch_env) -> None:
    """Both envs in the same state: a batch on one, the loop on the other, then a step with a cached candidate."""
    actions, prior = _batch(loop_env.n_groups)
    loop_env.evaluate_action(prior)
    batch_env.evaluate_action(prior)
    looped = [loop_env.evaluate_action(a) for a in actions]
    rewards, infos = batch_env.evaluate_actions(actions)
    assert rewards == [r for r, _ in looped]
    for (_, expected), got in zip(looped, infos):
        _same_info(expected, got)
    assert [i["cached"] for i in infos] == [False, False, False, True, False, True, False, False]
    assert batch_env.n_evaluations == loop_env.n_evaluations
    assert batch_env.total_evaluations == loop_env.total_evaluations
    assert list(batch_env.snapshot().candidates) == list(loop_env.snapshot().candidates)
    # stepping a batch-scored candidate reuses it (no evaluation) and reaches the loop's state
    obs_l, r_l, *_, info_l = loop_env.step(actions[-1])
    obs_b, r_b, *_, info_b = batch_env.step(actions[-1])
    np.testing.assert_array_equal(obs_l, obs_b)
    assert r_l == r_b and info_b["cached"] and batch_env.n_evaluations == loop_env.n_evaluations
    x = loop_env.task.reward_data[0][:4]
    np.testing.assert_array_equal(loop_env.model(x).detach().cpu().numpy(), batch_env.model(x).detach().cpu().numpy())


@pytest.mark.parametrize("overlap,estimator", [(False, "vanilla"), (True, "vanilla"), (True, "adaptive_bn")])
def test_serial_batch_equals_loop(splits, overlap, estimator):
    loop_env = _env(splits, reward_estimator=estimator)
    batch_env = _env(splits, reward_estimator=estimator, parallel={"overlap": overlap})
    loop_env.reset(seed=0)
    batch_env.reset(seed=0)
    assert batch_env.evaluation_backend.overlap is overlap
    _check_batch_equals_loop(loop_env, batch_env)
    # from the second state on too (new pruner, new importance)
    a = random_actions(loop_env.n_groups, 2, seed=1)
    assert batch_env.evaluate_actions(a)[0] == [loop_env.evaluate_action(x)[0] for x in a]


def test_batch_of_cache_hits_needs_no_backend(splits, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # starting the Ray backend would fail
    env = _env(splits, parallel={"backend": "ray"})
    env.reset(seed=0)
    a = random_actions(env.n_groups, 1)[0]
    env.evaluate_action(a)
    rewards, infos = env.evaluate_actions([a, a])
    assert infos[0]["cached"] and infos[1]["cached"] and env.n_evaluations == 1


def test_parallel_config_errors_name_the_key():
    with pytest.raises(ValueError, match="parallel.backend must be one of"):
        ParallelConfig(backend="dask")
    with pytest.raises(ValueError, match="parallel.num_workers must be an integer >= 1"):
        ParallelConfig(num_workers=0)
    with pytest.raises(ValueError, match=r"unknown parallel key\(s\) \['workers'\]"):
        ParallelConfig.from_dict({"backend": "ray", "workers": 2})
    with pytest.raises(TypeError, match="parallel must be a mapping"):
        PruneEnvConfig(parallel="ray")


def test_missing_ray_says_how_to_install(splits, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    env = _env(splits, parallel={"backend": "ray", "num_workers": 2})
    env.reset(seed=0)
    with pytest.raises(RayNotInstalledError, match=r'pip install "ray>=2.9"'):
        env.evaluate_actions(random_actions(env.n_groups, 2))


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # the actors unpickle the tests' TinyNet: give them the tests folder on their path
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}})
    yield ray
    ray.shutdown()


def test_ray_batch_equals_loop_through_worker_deaths(splits, ray_cluster):
    loop_env = _env(splits)
    batch_env = _env(splits, parallel={"backend": "ray", "num_workers": 2, "max_restarts": 1})
    loop_env.reset(seed=0)
    batch_env.reset(seed=0)
    _check_batch_equals_loop(loop_env, batch_env)  # also steps a candidate whose model stayed on an actor
    backend = batch_env.evaluation_backend
    pids = backend.worker_pids()
    assert len(set(pids)) == 2

    def same_as_loop(seed: int) -> None:
        a = random_actions(loop_env.n_groups, 6, seed=seed)
        assert batch_env.evaluate_actions(a)[0] == [loop_env.evaluate_action(x)[0] for x in a]
        assert batch_env.n_evaluations == loop_env.n_evaluations

    os.kill(pids[0], signal.SIGKILL)  # dies holding the state's pruner: Ray restarts it and retries its share
    same_as_loop(seed=2)
    restarted = backend.worker_pids()[0]
    assert restarted != pids[0]
    os.kill(restarted, signal.SIGKILL)  # out of restarts: its candidates run on the other actor
    same_as_loop(seed=3)
    batch_env.close()  # kills its actors, leaves the test's cluster running
    assert ray_cluster.is_initialized()


@pytest.mark.parametrize("estimator", ["adaptive_bn", "teacher_agreement"])
def test_ray_runs_the_reward_estimator_like_the_env(splits, ray_cluster, estimator):
    """The actors run the env's estimator (training images and, for agreement, the teacher shipped once)."""
    loop_env = _env(splits, reward_estimator=estimator)
    batch_env = _env(splits, reward_estimator=estimator, parallel={"backend": "ray", "num_workers": 2})
    loop_env.reset(seed=0)
    batch_env.reset(seed=0)
    _check_batch_equals_loop(loop_env, batch_env)
    a = random_actions(loop_env.n_groups, 4, seed=5)
    assert batch_env.evaluate_actions(a)[0] == [loop_env.evaluate_action(x)[0] for x in a]
    batch_env.close()


def test_ray_refines_like_the_serial_backend(splits, ray_cluster):
    """``multi_fidelity`` over ``bn_kd_loss`` (both new estimators at once): the actors give the serial backend's
    cheap scores and refinements (KD fine-tunes), so rewards, infos, counts and cache match."""
    kwargs = dict(reward_estimator="multi_fidelity", reward_refine_base="bn_kd_loss", reward_train_images=32,
                  reward_kd_batches=2)
    serial_env = _env(splits, **kwargs)
    ray_env = _env(splits, **kwargs, parallel={"backend": "ray", "num_workers": 2})
    actions, prior = _batch(serial_env.n_groups)
    for env in (serial_env, ray_env):
        env.reset(seed=0)
        env.evaluate_action(prior)
    rewards, infos = serial_env.evaluate_actions(actions)
    assert ray_env.evaluate_actions(actions)[0] == rewards
    assert sum(info["refined"] and not info["cached"] for info in infos) == 2
    assert ray_env.n_evaluations == serial_env.n_evaluations and ray_env.n_train_batches == serial_env.n_train_batches
    best = actions[int(np.argmax(rewards))]
    assert ray_env.step(best)[1] == serial_env.step(best)[1]
    a = random_actions(serial_env.n_groups, 3, seed=4)  # the next state: a new pruner and teacher logits on the actors
    assert ray_env.evaluate_actions(a)[0] == serial_env.evaluate_actions(a)[0]
    ray_env.close()


def test_sb3_with_two_worker_envs_counts_every_evaluation(splits):
    from agents.sb3_baselines import SB3Agent

    env = tiny_env(splits, reward_samples=16, action_mode="sparsity", budget="flops", n_steps=1, target=0.5,
                   alpha=0.0, beta=0.0)
    agent = SB3Agent(env, algo="ppo", seed=0, n_envs=2, n_steps=2, batch_size=4, n_epochs=1,
                     policy_kwargs={"net_arch": [16]})
    try:
        # a budget of 9: 4 vectorised steps of 2 worker envs (8 evaluations), then the final episode on env
        agent.learn(total_timesteps=9)
        assert agent.num_timesteps == 8
        assert agent.n_evaluations == 9 and len(agent.history) == 9 and agent.episodes == 9
        assert [row["n_evaluations"] for row in agent.history[8:]] == [9]
        assert sorted(row["env"] for row in agent.history[:8]) == [0, 0, 0, 0, 1, 1, 1, 1]
        assert agent.best["reward"] == max(row["reward"] for row in agent.history)
        assert env.total_evaluations == 1  # each worker built its own env from env.config
        with pytest.raises(ValueError, match="total_timesteps=1 is below n_envs=2"):
            agent.learn(total_timesteps=1)
    finally:
        agent.close()
    assert agent.model.get_env().closed  # the worker processes are gone; the agent's own env is the caller's
