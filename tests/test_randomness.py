"""Randomness as Gymnasium's envs keep it: the envs and the estimators draw from their own streams (``np_random``,
``pruning_env.runtime.TorchRNG``), never reseed or advance the global RNGs of the program that uses them, and
seeded runs repeat exactly on CPU, also when the program draws random numbers between the steps.
"""
import random

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn

import pruning_env  # noqa: F401  (registers the ids)
from pruning_env.runtime import TorchRNG, model_device
from tiny import tiny_env


def _global_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _same_global_states(a, b) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_torch_rng_stream_continues_across_blocks_and_restores_the_callers_state():
    torch.manual_seed(123)
    outside = torch.get_rng_state()
    stream = TorchRNG(5)
    with stream:
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside)
    torch.rand(7)  # the program's own draws do not move the stream
    with stream:
        second = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(first, torch.rand(3)) and torch.equal(second, torch.rand(3))


def test_model_device_reads_parameters_then_buffers():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.BatchNorm1d(2, affine=False)) == torch.device("cpu")  # buffers only
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no tensor at all


def _patch_env(**kwargs):
    return gym.make("RLPatch-quickstart", dataset="synthetic", epochs=2, **kwargs).unwrapped


def _patch_run(env, seed, meddle):
    obs, _ = env.reset(seed=seed)
    trace = [obs]
    for i in range(4):
        if meddle:  # the program uses the global RNGs between steps
            torch.rand(100), np.random.rand(10), random.random()
        obs, reward, *_ = env.step(np.linspace(-1.0, 1.0, env.n_patches) * (-1) ** i)
        trace += [obs, reward]
    return trace


def test_patch_env_never_touches_the_global_rngs_and_repeats_exactly():
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    before = _global_states()
    env = _patch_env(seed=3)
    quiet = _patch_run(env, seed=11, meddle=False)
    assert _same_global_states(before, _global_states()), "the patch env moved a global RNG"
    busy = _patch_run(_patch_env(seed=3), seed=11, meddle=True)
    for a, b in zip(quiet, busy):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("estimator", ["short_kd", "multi_fidelity"])
def test_prune_env_recovery_and_estimates_leave_the_global_rngs_alone(splits, estimator):
    env = tiny_env(splits, n_steps=2, budget="flops", target=0.4, recovery="kd", recovery_batches=2,
                   recovery_batch_size=16, reward_estimator=estimator, reward_train_images=32, reward_kd_batches=2)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    before = _global_states()
    env.reset(seed=0)
    env.evaluate_action(np.full(env.n_groups, 0.3))
    env.evaluate_actions([np.full(env.n_groups, 0.2), np.full(env.n_groups, 0.4)])  # multi_fidelity refines
    _, _, _, _, info = env.step(np.full(env.n_groups, 0.3))  # recovers (a KD fine-tune with augmentation)
    assert "accuracy_recovered" in info
    assert _same_global_states(before, _global_states()), "the pruning env moved a global RNG"


def test_patch_agent_construction_does_not_reseed_the_global_rng():
    from agents.vit_ddqn import ViTDDQN

    torch.manual_seed(42)
    expected = torch.rand(5)
    torch.manual_seed(42)
    a = ViTDDQN(n_patches=16, n_keep=8, hidden=(8,), seed=0)
    assert torch.equal(torch.rand(5), expected), "the agent reseeded the global torch RNG"
    b = ViTDDQN(n_patches=16, n_keep=8, hidden=(8,), seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.q_net.parameters(), b.q_net.parameters()))
