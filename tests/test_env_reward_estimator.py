"""The env's ``reward_estimator`` on the tiny net: each estimator selectable (also through ``gym.make``), the source
model left unchanged, BatchNorm statistics and KD fine-tunes on training images only (never validation or test),
every validation image and more BN batches when asked for, and the negated KD loss after BN re-estimation.
"""
import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn

import pruning_env  # noqa: F401  (registers the env ids)
from pruning_env.data import preload
from pruning_env.envs.config import PruneEnvConfig
from pruning_env.envs.reward import REWARD_ESTIMATORS, recalibrate_bn
from pruning_env.training import evaluate, kd_loss
from tiny import TinyNet, same_state, state_copy, tiny_env

ACTION = np.array([0.3, 0.5, 0.2], dtype=np.float32)


def test_every_registry_option_is_an_estimator_keyword_read_from_an_env_setting():
    """The registry is the one list of estimators: each entry's options are keywords of its function and name
    settings of PruneEnvConfig, which the config offers as its choices."""
    import inspect

    assert PruneEnvConfig.__dataclass_fields__["reward_estimator"].metadata["limits"].choices == tuple(
        REWARD_ESTIMATORS)
    for name, spec in REWARD_ESTIMATORS.items():
        keywords = {p.name for p in inspect.signature(spec.fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
        assert set(spec.options) <= keywords, name
        assert set(spec.options.values()) <= set(PruneEnvConfig.field_names()), name


@pytest.mark.parametrize("field,value,match", [
    ("reward_estimator", "eagleeye", "reward_estimator must be one of"),
    ("reward_train_images", 1, "reward_train_images must be an integer >= 2"),
    ("reward_kd_batches", 0, "reward_kd_batches must be an integer >= 1"),
    ("reward_agreement", "l2", "reward_agreement must be one of"),
    ("reward_bn_batch_size", 1, "reward_bn_batch_size must be an integer >= 2"),
    ("reward_kd_lr", 0.0, "reward_kd_lr must be"),
    ("reward_refine_base", "multi_fidelity", "reward_refine_base must be one of"),
    ("reward_refine_base", "kd_refined", "reward_refine_base must be one of"),
    ("reward_refine_top", 0, "reward_refine_top must be an integer >= 1"),
])
def test_bad_estimator_settings_are_refused_by_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        PruneEnvConfig(**{field: value})


@pytest.mark.parametrize("name", list(REWARD_ESTIMATORS))
def test_each_estimator_scores_lookahead_and_step_and_leaves_the_source_model_unchanged(splits, name):
    torch.manual_seed(0)
    source = TinyNet()
    before = state_copy(source)
    env = tiny_env(splits, model=source, reward_estimator=name, reward_train_images=32, reward_kd_batches=2,
                   budget="flops", target=0.4, n_steps=2)
    original = state_copy(env.original_model)
    env.reset(seed=0)
    reward, info = env.evaluate_action(ACTION)
    again, _ = env.evaluate_action(ACTION + np.float32(0.01))  # uncached: built and estimated afresh
    batch, _ = env.evaluate_actions([ACTION + np.float32(0.02), ACTION + np.float32(0.03)])  # multi_fidelity refines
    assert np.isfinite(reward) and np.isfinite(again) and np.isfinite(batch).all()
    _, step_reward, _, _, step_info = env.step(ACTION)
    assert step_reward == pytest.approx(reward)  # the step reuses the look-ahead's estimate
    assert step_info["accuracy"] == pytest.approx(info["accuracy"])
    env.step(ACTION)
    assert same_state(before, state_copy(source)), "the caller's module changed"
    assert same_state(original, state_copy(env.original_model)), "the env's original model changed"
    if name == "teacher_agreement":
        assert env.original_accuracy == pytest.approx(1.0)  # the teacher agrees with itself
    env.close()


@pytest.mark.parametrize("name", ["short_kd", "bn_kd_loss", "multi_fidelity", "kd_refined"])
def test_estimators_are_repeatable(splits, name):
    values = []
    for _ in range(2):
        env = tiny_env(splits, reward_estimator=name, reward_train_images=32, reward_kd_batches=3,
                       budget="flops", target=0.4)
        env.reset(seed=0)
        values.append(env.evaluate_action(ACTION)[0])
        values.append(env.evaluate_actions([ACTION + np.float32(0.05), ACTION + np.float32(0.1)])[0])
    assert values[:2] == values[2:]


def test_vanilla_is_plain_top1_on_the_reward_images(splits):
    env = tiny_env(splits, reward_estimator="vanilla", budget="flops", target=0.4)
    env.reset(seed=0)
    _, info = env.evaluate_action(ACTION)
    env.step(ACTION)
    assert info["accuracy"] == pytest.approx(evaluate(env.model, env.task.reward_data)["top1"])
    assert env.task.estimator_data is None  # vanilla reads no training images


def test_adaptive_bn_is_top1_after_recalibration_on_training_images(splits):
    env = tiny_env(splits, reward_estimator="adaptive_bn", reward_train_images=40, budget="flops", target=0.4)
    env.reset(seed=0)
    _, info = env.evaluate_action(ACTION)
    env.step(ACTION)
    recalibrated = recalibrate_bn(env.model, env.task.estimator_data, n_images=40)
    assert info["accuracy"] == pytest.approx(evaluate(recalibrated, env.task.reward_data)["top1"])


@pytest.mark.parametrize("name,extra", [
    ("adaptive_bn", {}), ("short_kd", {}), ("bn_kd_loss", {}), ("multi_fidelity", {}),
    # variant (a), more images per estimate: every validation image, BN statistics from more training batches
    ("adaptive_bn", {"reward_samples": None, "reward_train_images": 64, "reward_bn_batch_size": 8}),
    ("bn_kd_loss", {"reward_samples": None, "reward_train_images": 64, "reward_bn_batch_size": 8}),
    ("multi_fidelity", {"reward_refine_base": "bn_kd_loss", "reward_samples": None}),
    ("kd_refined", {}),
])
def test_train_mode_passes_see_training_images_only(splits, name, extra):
    """Every forward pass with a BatchNorm layer in train mode (statistics or KD updates) gets training images:
    each image equals one of the training split's images (un-augmented) and none of validation or test."""
    def plain(dataset):
        return dataset.transform(dataset.images).flatten(1)

    train, val, test = plain(_unaugmented(splits)), plain(splits.val), plain(splits.test)
    seen = []

    def spy(module, inputs):
        if isinstance(module, TinyNet) and any(m.training for m in module.modules()
                                               if isinstance(m, nn.BatchNorm2d)):
            seen.append(inputs[0].detach().flatten(1).cpu().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(spy)
    try:
        env = tiny_env(splits, **{"reward_estimator": name, "reward_train_images": 32, "reward_kd_batches": 2,
                                  "budget": "flops", "target": 0.4, **extra})
        env.reset(seed=0)
        env.evaluate_action(ACTION)
        env.evaluate_actions([ACTION + np.float32(0.05), ACTION + np.float32(0.1)])  # multi_fidelity's fine-tunes
        env.step(ACTION)
    finally:
        handle.remove()
    images = torch.cat(seen)
    assert len(images) > 0

    def found_in(pool):
        return torch.cdist(images, pool, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values < 1e-4

    assert found_in(train).all(), "a train-mode pass saw an image that is not a training image"
    assert not found_in(val).any() and not found_in(test).any(), "validation or test images reached BatchNorm"


def test_every_validation_image_and_more_bn_batches(splits):
    """``reward_samples=None`` scores on the whole validation split; ``reward_bn_batch_size`` splits the
    ``reward_train_images`` into that many BN statistics batches (each a train-mode pass)."""
    env = tiny_env(splits, reward_estimator="adaptive_bn", reward_samples=None, reward_train_images=40,
                   reward_bn_batch_size=8, budget="flops", target=0.4)
    assert env.scorer.n_images == len(splits.val) and len(env.task.estimator_data[0]) == 40
    env.reset(seed=0)
    passes = []

    def count(module, inputs):
        if isinstance(module, TinyNet) and module.bn1.training:
            passes.append(len(inputs[0]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        _, info = env.evaluate_action(ACTION)
    finally:
        handle.remove()
    assert passes == [8] * 5
    env.step(ACTION)
    recalibrated = recalibrate_bn(env.model, env.task.estimator_data, n_images=40, batch_size=8)
    assert info["accuracy"] == pytest.approx(evaluate(recalibrated, preload(splits.val))["top1"])


def test_bn_kd_loss_is_the_negated_finetune_loss_after_bn_reestimation(splits):
    env = tiny_env(splits, reward_estimator="bn_kd_loss", reward_train_images=40, kd_T=3.0, kd_soft_weight=0.5,
                   budget="flops", target=0.4)
    env.reset(seed=0)
    _, info = env.evaluate_action(ACTION)
    env.step(ACTION)
    x, y = env.task.reward_data
    with torch.no_grad():
        student = recalibrate_bn(env.model, env.task.estimator_data, n_images=40)(x)
        teacher = env.original_model(x)
    loss = kd_loss(student, teacher, y, T=3.0, soft_weight=0.5).item()
    assert loss > 0 and info["accuracy"] == pytest.approx(-loss, rel=1e-5)
    assert info["reward"] == pytest.approx(-loss + 0.25 * info["flops_reduction"] + 0.25 * info["params_reduction"],
                                           rel=1e-5)


def _unaugmented(splits):
    from pruning_env.data import ArrayDataset

    return ArrayDataset(splits.train.images, splits.train.labels, splits.val.transform)


def test_estimator_is_selectable_through_gym_make(splits):
    env = gym.make("RLPrune-quickstart", model=TinyNet(), dataset=splits, pretrained=False, reward_samples=24,
                   calibration_size=16, seed=0, device="cpu", reward_estimator="adaptive_bn",
                   reward_train_images=32, action_mode="sparsity", budget="flops", target=0.4, n_steps=1)
    assert env.unwrapped.config.reward_estimator == "adaptive_bn"
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(ACTION)
    assert terminated and np.isfinite(reward)
    env.close()
