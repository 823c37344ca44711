"""Inputs a user can get wrong, refused as such: an unknown model name (before any checkpoint look-up or
pretraining announcement, with the zoo's names and the closest one) and complex-valued actions (like NaN ones, in
every action mode of both envs).
"""
import gymnasium as gym
import numpy as np
import pytest
import torch

import pruning_env  # noqa: F401  (registers the ids)
from pruning_env.models import list_models
from tiny import tiny_env


@pytest.fixture
def no_lookup(forbid):
    """Any checkpoint look-up or pretraining fails the test: the name must be refused first."""
    forbid("pruning_env.envs.task.checkpoint_path", "pruning_env.pretrain.ensure_pretrained")


@pytest.mark.parametrize("auto_pretrain_epochs", [10, 0])
def test_unknown_model_name_is_refused_before_any_checkpoint_lookup(no_lookup, capsys, auto_pretrain_epochs):
    with pytest.raises(ValueError) as err:
        gym.make("RLPrune-quickstart", model="no_such_model", auto_pretrain_epochs=auto_pretrain_epochs)
    message = str(err.value)
    assert message.startswith("model must be a zoo name or an nn.Module, got 'no_such_model'")
    assert "did you mean" in message and all(name in message for name in list_models())
    assert "pretrain" not in message and "checkpoint" not in message
    out = capsys.readouterr()
    assert "training" not in out.out + out.err  # no auto-pretraining announcement


def test_unknown_model_name_suggests_the_closest_zoo_name(no_lookup):
    with pytest.raises(ValueError, match=r"did you mean 'resnet56'\?"):
        gym.make("RLPrune-quickstart", model="resnet65")
    with pytest.raises(ValueError, match=r"did you mean 'vit_tiny_patch4'\?"):
        gym.make("RLPatch-quickstart", model="vit_tiny_patch")


ENV_MODES = [dict(action_mode="sparsity"), dict(action_mode="sparsity", budget="flops"),
             dict(action_mode="distribution", budget="flops")]


@pytest.mark.parametrize("mode", ENV_MODES, ids=["sparsity", "sparsity-budget", "distribution"])
def test_complex_actions_are_refused_like_nan_in_every_action_mode(splits, mode):
    env = tiny_env(splits, target=0.4, **mode)
    env.reset(seed=0)
    good = np.full(env.n_groups, 0.3)
    for bad in (good + 0.1j, good.astype(np.complex64), torch.tensor(good + 0.2j), [0.3, 0.2 + 1e-9j, 0.1]):
        for call in (env.step, env.evaluate_action, env.keep_for_action, lambda a: env.evaluate_actions([good, a])):
            with pytest.raises(ValueError, match="action is complex"):
                call(bad)
    with pytest.raises(ValueError, match="non-zero imaginary parts at groups \\[1\\]"):
        env.step([0.3, 0.2 + 1e-9j, 0.1])
    assert env.n_evaluations == 0 and env.step_index == 0  # nothing was evaluated or stepped
    for bad in (good * np.nan, [np.inf] * env.n_groups):
        with pytest.raises(ValueError, match="NaN/inf"):
            env.step(bad)


@pytest.mark.parametrize("action_mode", ["scores", "mask"])
def test_patch_env_refuses_complex_and_nan_actions(action_mode):
    env = gym.make("RLPatch-quickstart", dataset="synthetic", epochs=1, action_mode=action_mode).unwrapped
    env.reset(seed=0)
    good = np.ones(env.n_patches)
    with pytest.raises(ValueError, match="action is complex"):
        env.step(good + 0.5j)
    with pytest.raises(ValueError, match="NaN/inf entries at patches \\[0\\]"):
        env.step(np.concatenate([[np.nan], good[1:]]))
    with pytest.raises(ValueError, match=f"shape \\({env.n_patches},\\)"):
        env.step(good[:3])
    assert env.global_step == 0
    env.step(good)  # a good action still trains
    assert env.global_step == 1
