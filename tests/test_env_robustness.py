"""Robustness of the pruning env as users meet it, through ``gym.make``: bad settings refused before any work
with errors naming the setting, impossible budgets refused or reported, files that are not what they claim
named, both checkers on the registered offline ids, and a hypothesis fuzz of settings and actions.
"""
import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pruning_env  # noqa: F401  (registers the ids)
from pruning_env.envs.config import PruneEnvConfig
from tiny import TinyNet, tiny_env

#: a tiny zoo model on the embedded digits, untrained: builds in a fraction of a second
FAST = dict(pretrained=False, width=0.0625, val_size=64, reward_samples=32, calibration_size=8, device="cpu")


@pytest.fixture
def no_training(forbid):
    """Any pretraining or fine-tuning fails the test: errors must come before the work starts."""
    forbid("pruning_env.pretrain.pretrain", "pruning_env.training.train_epoch")


# ---- issue 13 item 1: settings validated at construction, whichever way they arrive
BAD_SETTINGS = [
    (dict(alpha=math.nan), "alpha"), (dict(alpha=math.inf), "alpha"), (dict(beta=-math.inf), "beta"),
    (dict(recovery="kd", kd_T=0), "kd_T"), (dict(recovery="kd", recovery_lr=math.nan), "recovery_lr"),
    (dict(target_tolerance=math.nan), "target_tolerance"), (dict(reward_samples=-5), "reward_samples"),
    (dict(reward_samples=0), "reward_samples"), (dict(n_steps=2.7), "n_steps"), (dict(n_steps=0), "n_steps"),
    (dict(eval_batch_size=0), "eval_batch_size"), (dict(target=math.nan), "target"), (dict(target=1.0), "target"),
    (dict(max_step_sparsity=1.0), "max_step_sparsity"), (dict(kd_soft_weight=1.5), "kd_soft_weight"),
    (dict(calibration_size=0), "calibration_size"), (dict(min_channels=0), "min_channels"),
    (dict(round_to=2.5), "round_to"), (dict(val_size=-3), "val_size"), (dict(val_size=1.5), "val_size"),
    (dict(width=0.0), "width"), (dict(recovery_batch_size=0), "recovery_batch_size"),
    (dict(recovery_period=0), "recovery_period"), (dict(importance="magic"), "importance"),
    (dict(seed=-1), "seed"), (dict(lookahead_cache=-1), "lookahead_cache"), (dict(amp="yes"), "amp"),
    (dict(recovery="kd"), "recovery_batches >= 1 or recovery_epochs >= 1"),
    (dict(action_mode="nope"), "action_mode"), (dict(budget="energy"), "budget"),
]


@pytest.mark.parametrize("kwargs,name", BAD_SETTINGS)
def test_bad_setting_is_refused_through_gym_make_before_any_work(kwargs, name, no_training, tmp_path):
    # the quickstart would pretrain a missing checkpoint: the error must come first, naming the setting
    with pytest.raises((ValueError, TypeError), match=name):
        gym.make("RLPrune-quickstart", checkpoint=str(tmp_path / "missing.pt"), **kwargs)
    # the same check whichever way the value arrives
    with pytest.raises((ValueError, TypeError), match=name):
        PruneEnvConfig(**kwargs)


def test_unknown_setting_lists_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown PruneEnv setting\(s\) \['alhpa'\].*alpha"):
        gym.make("RLPrune-vgg11-digits", alhpa=0.1, **FAST)


def test_config_object_and_keywords_build_the_same_env(splits):
    cfg = PruneEnvConfig(model=TinyNet(), dataset=splits, reward_samples=24, calibration_size=16, seed=0,
                         n_steps=2, budget="flops")
    from pruning_env.envs.prune_env import PruneEnv

    torch.manual_seed(0)
    a = PruneEnv(cfg)
    b = PruneEnv(cfg, alpha=0.5)
    assert a.config is cfg and b.config.alpha == 0.5 and b.config.n_steps == 2
    with pytest.raises(TypeError, match="PruneEnvConfig"):
        PruneEnv({"alpha": 0.5})


# ---- issue 13 item 2: an unreachable budget is never "terminated"
def test_impossible_budget_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"target=0.5 \(flops reduction\) is unreachable.*min_channels=1000000"):
        gym.make("RLPrune-vgg11-digits", min_channels=10**6, budget="flops", **FAST)


def test_budget_missed_by_the_last_step_ends_truncated_with_the_reason(splits):
    # one step of at most 10% per group cannot remove half the FLOPs: reported, never "terminated"
    env = tiny_env(splits, budget="flops", n_steps=1, target=0.5, max_step_sparsity=0.1)
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(np.ones(env.n_groups, dtype=np.float32))
    assert truncated and not terminated and math.isfinite(reward)
    assert info["budget_missed"] and info["flops_reduction"] < 0.5 - env.target_tolerance
    assert "budget could not be met" in info["truncated_reason"]


def test_budget_free_episode_at_the_floor_is_truncated_with_the_reason(splits):
    env = tiny_env(splits, target=0.99, min_channels=4)
    env.reset(seed=0)
    terminated = truncated = False
    while not (terminated or truncated):
        _, _, terminated, truncated, info = env.step(np.full(env.n_groups, 0.9, dtype=np.float32))
    assert truncated and not terminated and "channel floor" in info["truncated_reason"]


# ---- issue 13 item 3: files that are not what they claim are named, before any training
def _bad_checkpoints(tmp_path):
    from pruning_env.checkpoint import save_checkpoint
    from pruning_env.models import create_model

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    good = save_checkpoint(create_model("vgg11", num_classes=10, width=0.25), tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    return {garbage: "cannot be read", empty: "empty", truncated: "cannot be read", folder: "is a directory"}


def test_bad_checkpoint_files_are_named(tmp_path, no_training):
    from pruning_env.checkpoint import load_model, read_meta

    for path, what in _bad_checkpoints(tmp_path).items():
        for load in (load_model, read_meta):
            with pytest.raises(ValueError, match=what) as err:
                load(path)
            assert str(path) in str(err.value)
        # through gym.make: named before the quickstart's auto-pretraining or any data work
        with pytest.raises(ValueError, match=what) as err:
            gym.make("RLPrune-quickstart", checkpoint=str(path), device="cpu")
        assert str(path) in str(err.value)


def test_bad_npz_dataset_is_named(tmp_path):
    from pruning_env.data import make_datasets

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x93NUMPY not really" * 20)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((20, 8, 8, 3), dtype=np.uint8), y=np.arange(20) % 2)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:100])
    for path in (garbage, empty, truncated):
        with pytest.raises(ValueError, match="not a readable .npz") as err:
            make_datasets(f"npz:{path}")
        assert str(path) in str(err.value)
        with pytest.raises(ValueError, match="not a readable .npz"):
            gym.make("RLPrune-vgg11-cifar10", dataset=f"npz:{path}", pretrained=False)


# ---- issue 13 item 4: both checkers via gym.make on the registered offline ids
@pytest.fixture(scope="module")
def quickstart_checkpoint(tmp_path_factory):
    from pruning_env.envs.registration import QUICKSTART_KWARGS
    from pruning_env.pretrain import pretrain

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ckpt") / "quickstart.pt"
    return pretrain(QUICKSTART_KWARGS["model"], QUICKSTART_KWARGS["dataset"], width=QUICKSTART_KWARGS["width"],
                    epochs=1, batch_size=128, val_size=QUICKSTART_KWARGS["val_size"], seed=0, out=out, device="cpu",
                    progress=False)


def test_checkers_pass_on_the_quickstart_id(quickstart_checkpoint):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make("RLPrune-quickstart", checkpoint=str(quickstart_checkpoint))
    check_env(env.unwrapped, skip_render_check=True)
    with pytest.warns(UserWarning):  # SB3 recommends a symmetric [-1, 1] action Box; agents rescale
        sb3_check_env(env.unwrapped, warn=True)


@pytest.mark.parametrize("env_id", ["RLPrune-vgg11-digits", "RLPrune-resnet20-digits"])
def test_gymnasium_checker_passes_on_digits_ids(env_id):
    from gymnasium.utils.env_checker import check_env

    check_env(gym.make(env_id, pretrained=False, width=0.25, reward_samples=64, calibration_size=16).unwrapped,
              skip_render_check=True)


def test_checkers_pass_on_the_patch_quickstart_id():
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    check_env(gym.make("RLPatch-quickstart", epochs=1).unwrapped, skip_render_check=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # SB3 recommends a symmetric [-1, 1] Box; scores are any real
        sb3_check_env(gym.make("RLPatch-quickstart", epochs=1).unwrapped, warn=True)


# ---- issue 13 item 7: fuzz bad settings and actions through gym.make
def _bad_values():
    nan, inf = math.nan, math.inf
    return {
        "alpha": [nan, inf, "0.1"], "beta": [nan, -inf], "target": [nan, 0.0, 1.0, -0.2, 2],
        "n_steps": [0, -1, 2.7, "3"], "reward_samples": [0, -5, 3.5], "eval_batch_size": [0, -2],
        "kd_T": [0, -1.0, nan], "recovery_lr": [nan, 0.0, -1e-3], "target_tolerance": [nan, -0.1, 1.0],
        "max_step_sparsity": [0.0, 1.0, nan], "distribution_max_sparsity": [0.0, 1.0, nan, "0.5"],
        "calibration_size": [0, 1.5], "min_channels": [0, -3],
        "round_to": [0, 1.5], "val_size": [0, -1, 1.0, "x"], "recovery_batches": [-1, 0.5],
        "kd_soft_weight": [-0.1, 1.1, nan], "width": [0, -0.5, inf], "seed": [-1, 1.5], "max_steps": [0, 2.5],
        "action_mode": ["", "scores"], "budget": ["", "energy"], "target_metric": ["acc"],
        "recovery": ["sgd", True], "importance": ["magic"], "lookahead_cache": [-1],
        "recovery_period": [0], "ignore_layers": ["fc1"],
    }


GOOD = dict(action_mode=st.sampled_from(["sparsity", "distribution"]),
            budget=st.sampled_from([None, "flops", "channels", "params"]),
            target=st.floats(0.05, 0.7), n_steps=st.integers(1, 3),
            alpha=st.floats(-1, 1), beta=st.floats(-1, 1),
            recovery=st.sampled_from([None, "kd", "ce"]), recovery_batches=st.integers(0, 1),
            kd_T=st.floats(0.5, 8), recovery_lr=st.floats(1e-5, 1e-1),
            max_step_sparsity=st.floats(0.05, 0.95), min_channels=st.integers(1, 3))


@pytest.fixture(scope="module")
def digits():
    from pruning_env.data import make_datasets

    return make_datasets("digits", val_size=64, augment=True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_settings_and_actions_through_gym_make(data, digits):
    bad = _bad_values()
    kwargs = {name: data.draw(strategy, label=name) for name, strategy in GOOD.items()
              if data.draw(st.booleans(), label=f"set {name}")}
    broken = data.draw(st.one_of(st.none(), st.sampled_from(sorted(bad))), label="broken setting")
    if broken is not None:
        kwargs[broken] = data.draw(st.sampled_from(bad[broken]), label="bad value")
        with pytest.raises((ValueError, TypeError), match=broken):
            gym.make("RLPrune-vgg11-digits", **{**FAST, "dataset": digits, "recovery_batch_size": 16, **kwargs})
        return
    try:
        env = gym.make("RLPrune-vgg11-digits",
                       **{**FAST, "dataset": digits, "recovery_batch_size": 16, **kwargs}).unwrapped
    except ValueError as err:  # valid values that do not fit together: an unreachable budget, a recovery of length 0
        assert ("unreachable" in str(err) and "target=" in str(err)) or "needs a length" in str(err)
        return
    env.reset(seed=data.draw(st.integers(0, 2**16), label="seed"))
    for _ in range(4):
        action = data.draw(st.lists(st.floats(-2, 3), min_size=env.n_groups, max_size=env.n_groups), label="action")
        _, reward, terminated, truncated, info = env.step(np.asarray(action))
        assert math.isfinite(reward) and 0.0 <= info["accuracy"] <= 1.0
        assert all(torch.isfinite(p).all() for p in env.model.parameters())
        if terminated or truncated:
            break


def test_patch_env_first_unseeded_reset_follows_the_constructor_seed():
    a = gym.make("RLPatch-quickstart", epochs=1, seed=3).unwrapped
    b = gym.make("RLPatch-quickstart", epochs=1, seed=3).unwrapped
    np.testing.assert_array_equal(a.reset()[0], b.reset()[0])
