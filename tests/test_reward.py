"""Reward estimators on the tiny net: each is pure (source and teacher unchanged) and adaptive BN only ever
runs training images through the network in train mode.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

from pruning_env.data import preload
from pruning_env.envs.reward import (REWARD_ESTIMATORS, adaptive_bn, bn_kd_loss, kd_refined, make_estimator,
                                     recalibrate_bn, short_kd, teacher_agreement, vanilla)
from pruning_env.pruning import Pruner
from pruning_env.training import evaluate, kd_loss
from tiny import TinyNet


@pytest.fixture(scope="module")
def task(splits):
    """A teacher with non-trivial BN statistics, a 50 % pruned student, and train / val / test tensors."""
    torch.manual_seed(0)
    teacher = TinyNet()
    train = preload(splits.train, n=96, seed=0)
    teacher.train()
    with torch.no_grad():
        for i in range(0, 96, 32):  # move the BN running statistics away from their initial values
            teacher(train[0][i:i + 32] * 2.0 + 0.5)
    teacher.eval()
    pruner = Pruner(teacher, torch.randn(1, 3, 16, 16))
    pruner.compute_importance(criterion="l1")
    student = pruner.apply(pruner.plan(sparsity=0.5))
    val = preload(splits.val, seed=0)
    test = preload(splits.test, seed=0)
    return teacher, student, train, val, test


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", sorted(REWARD_ESTIMATORS))
def test_estimators_leave_student_and_teacher_unchanged(task, name):
    teacher, student, train, val, _ = task
    before_s, before_t = _state(student), _state(teacher)
    student.train()
    value = make_estimator(name)(student, teacher, val, train)
    assert isinstance(value, float) and np.isfinite(value)
    assert _same(before_s, _state(student)) and _same(before_t, _state(teacher))
    assert student.training and not teacher.training


def test_vanilla_is_top1_right_after_pruning(task):
    teacher, student, train, val, _ = task
    assert vanilla(student, teacher, val) == evaluate(student, val)["top1"]


def test_teacher_agrees_with_itself(task):
    teacher, student, _, val, _ = task
    assert teacher_agreement(teacher, teacher, val) == 1.0
    assert teacher_agreement(teacher, teacher, val, metric="kl") == pytest.approx(0.0, abs=1e-6)
    assert teacher_agreement(student, teacher, val, metric="kl") < 0.0
    logits = teacher(val[0]).detach()
    assert teacher_agreement(student, None, val, teacher_logits=logits) == teacher_agreement(student, teacher, val)


def test_recalibrated_bn_statistics_are_the_exact_training_image_average(task):
    teacher, student, train, _, _ = task
    net = recalibrate_bn(student, train, n_images=64, batch_size=32)
    with torch.no_grad():
        h = net.conv1(train[0][:64])
    assert torch.allclose(net.bn1.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not net.training and net.bn1.momentum == student.bn1.momentum
    assert not torch.allclose(net.bn1.running_mean, student.bn1.running_mean)


def test_adaptive_bn_sees_only_training_images_in_train_mode(task):
    """BN re-estimation never touches validation or test images; validation images only ever meet eval mode."""
    teacher, student, train, val, test = task
    calls = []

    def record(module, args):
        if isinstance(module, TinyNet):
            calls.append((module.bn1.training, args[0].detach().clone()))

    handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        adaptive_bn(student, teacher, val, train, n_images=64, bn_batch_size=32)
    finally:
        handle.remove()

    def rows_in(x, pool):
        return all(any(torch.equal(r, p) for p in pool) for r in x)

    train_mode = [x for training, x in calls if training]
    eval_mode = [x for training, x in calls if not training]
    assert sum(len(x) for x in train_mode) == 64 and eval_mode
    assert all(rows_in(x, train[0]) for x in train_mode)
    assert all(rows_in(x, val[0]) for x in eval_mode)
    seen = torch.cat([x for _, x in calls])
    assert not any(torch.equal(r, p) for r in seen for p in test[0])


def test_short_kd_is_deterministic_and_trains_a_copy(task):
    teacher, student, train, val, _ = task
    a = short_kd(student, teacher, val, train, n_batches=3, train_batch_size=16)
    b = short_kd(student, teacher, val, train, n_batches=3, train_batch_size=16)
    assert a == b


def test_bad_names_and_missing_inputs_are_named(task):
    teacher, student, _, val, _ = task
    with pytest.raises(ValueError, match="unknown reward estimator 'nope'"):
        make_estimator("nope")
    with pytest.raises(ValueError, match="no option"):
        make_estimator("adaptive_bn", n_batches=3)
    with pytest.raises(ValueError, match="training images"):
        adaptive_bn(student, teacher, val, None)
    with pytest.raises(ValueError, match="metric"):
        teacher_agreement(student, teacher, val, metric="top5")
    with pytest.raises(ValueError, match="base must score one candidate on its own"):
        kd_refined(student, teacher, val, val, base="multi_fidelity")


def test_bn_kd_loss_is_minus_the_kd_loss_of_the_recalibrated_copy(task):
    teacher, student, train, val, _ = task
    value = bn_kd_loss(student, teacher, val, train, n_images=64, bn_batch_size=32, T=4.0, soft_weight=1.0)
    with torch.no_grad():
        kl = kd_loss(recalibrate_bn(student, train, n_images=64, batch_size=32)(val[0]), teacher(val[0]), val[1],
                     T=4.0, soft_weight=1.0).item()
    assert kl > 0 and value == pytest.approx(-kl, rel=1e-5)
