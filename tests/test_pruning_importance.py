"""Importance criteria: Taylor sums |w * dL/dw| over the whole group (BatchNorm included), eval mode leaves the
model untouched, train mode reproduces the authors' BatchNorm side effect, magnitude and random criteria, and the
authors' filter-only Taylor and variance scores.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_env.pruning import MagnitudeImportance, Pruner
from tiny import mixed_net


def _chain():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    net[1].running_mean.uniform_(-0.3, 0.3)
    net[1].weight.data.uniform_(0.5, 1.5)
    net[1].bias.data.uniform_(-0.3, 0.3)
    return net.eval()


def _batches(n=2, size=8, classes=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, classes, (4,), generator=g))
            for _ in range(n)]


def test_taylor_sums_over_conv_bias_batchnorm_and_flattened_consumer():
    net = _chain()
    batches = _batches()
    p = Pruner(net, batches[0][0][:1])
    (scores,) = p.compute_importance(batches, criterion="taylor")
    ref = copy.deepcopy(net)
    loss = sum(F.cross_entropy(ref(x), y) for x, y in batches)
    loss.backward()
    conv, bn, fc = ref[0], ref[1], ref[5]
    expected = ((conv.weight * conv.weight.grad).abs().sum((1, 2, 3)) + (conv.bias * conv.bias.grad).abs()
                + (bn.weight * bn.weight.grad).abs() + (bn.bias * bn.bias.grad).abs()
                + (fc.weight * fc.weight.grad).abs().view(5, 6, 16).sum((0, 2)))
    np.testing.assert_allclose(scores, expected.detach().double().numpy(), rtol=1e-5, atol=1e-9)
    # BatchNorm really contributes (the Torch-Pruning Taylor criterion leaves it out)
    assert (bn.weight * bn.weight.grad).abs().sum() > 0


def test_eval_mode_importance_leaves_the_model_untouched():
    net = mixed_net().train()
    for prm in net.fc1.parameters():
        prm.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    p = Pruner(net, torch.randn(1, 3, 16, 16))
    scores = p.compute_importance(_batches(size=16, classes=10), criterion="taylor")
    assert all(np.isfinite(s).all() and (s > 0).any() for s in scores)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net.training and all(m.training for m in net.modules())
    assert all(prm.grad is None for prm in net.parameters())
    assert not any(prm.requires_grad for prm in net.fc1.parameters())


def test_train_mode_moves_batchnorm_statistics_like_the_authors():
    net = mixed_net()
    before = net.stem[1].running_mean.clone()
    p = Pruner(net, torch.randn(1, 3, 16, 16))
    p.compute_importance(_batches(size=16, classes=10), criterion="taylor", train_mode=True)
    assert not torch.equal(net.stem[1].running_mean, before)
    assert not net.training  # the caller's eval flag comes back


def test_tuple_outputs_use_the_main_logits():
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _chain()

        def forward(self, x):
            out = self.body(x)
            return out, out.detach() * 0

    net = WithAux().eval()
    p = Pruner(net, torch.randn(1, 3, 8, 8))
    (aux_scores,) = p.compute_importance(_batches(), criterion="taylor")
    (plain,) = Pruner(net.body, torch.randn(1, 3, 8, 8)).compute_importance(_batches(), criterion="taylor")
    np.testing.assert_allclose(aux_scores, plain)


def test_magnitude_and_random_criteria():
    net = _chain()
    p = Pruner(net, torch.randn(1, 3, 8, 8))
    (l1,) = p.compute_importance(criterion="l1")
    conv, bn, fc = net[0], net[1], net[5]
    expected = (conv.weight.abs().sum((1, 2, 3)) + conv.bias.abs() + bn.weight.abs() + bn.bias.abs()
                + fc.weight.abs().view(5, 6, 16).sum((0, 2)))
    np.testing.assert_allclose(l1, expected.detach().double().numpy(), rtol=1e-6)
    (l2,) = p.compute_importance(criterion=MagnitudeImportance(2))
    assert np.all(l2 > 0) and not np.allclose(l1, l2)
    a = p.compute_importance(criterion="random", seed=3)[0]
    b = p.compute_importance(criterion="random", seed=3)[0]
    c = p.compute_importance(criterion="random", seed=4)[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_importance_is_cached_for_every_plan():
    p = Pruner(_chain(), torch.randn(1, 3, 8, 8))
    with torch.no_grad():  # works inside no_grad too (gradients are switched on locally)
        p.compute_importance(_batches(), criterion="taylor")
    cached = p.importance
    p.plan(sparsity=0.5)
    p.plan(sparsity=0.2)
    assert p.importance is cached and p.importance_criterion == "taylor"


def test_importance_errors_name_the_problem():
    p = Pruner(_chain(), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="calibration batches"):
        p.compute_importance(None, criterion="taylor")
    with pytest.raises(ValueError, match="unknown importance criterion"):
        p.compute_importance(_batches(), criterion="hessian")  # "variance" became a criterion (issue 12)
    with pytest.raises(ValueError, match="empty"):
        p.compute_importance([], criterion="taylor")


class _Residual(nn.Module):
    """conv1 -> BN; conv2(.) + conv3(.) tied by an add (one two-member group); pooled linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.conv3 = nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return self.fc((self.conv2(h) + self.conv3(h)).mean((2, 3)))


def test_authors_filter_taylor_and_variance_score_member_filters_only():
    """``taylor_filter`` and ``variance`` are the authors' criteria (spec §4.3): each member's own filter, no
    bias, BatchNorm or consumer, averaged over the members of a group."""
    torch.manual_seed(0)
    net = _Residual().eval()
    batches = _batches()
    p = Pruner(net, batches[0][0][:1])
    assert [g.members for g in p.groups] == [("conv1",), ("conv2", "conv3")]
    ref = copy.deepcopy(net)
    sum(F.cross_entropy(ref(x), y) for x, y in batches).backward()

    def taylor(m):
        return (m.weight * m.weight.grad).abs().sum((1, 2, 3)).detach().double().numpy()

    def var(m):
        return m.weight.detach().double().flatten(1).var(1).numpy()

    first, tied = p.compute_importance(batches, criterion="taylor_filter")
    np.testing.assert_allclose(first, taylor(ref.conv1), rtol=1e-6)
    np.testing.assert_allclose(tied, (taylor(ref.conv2) + taylor(ref.conv3)) / 2, rtol=1e-6)
    first, tied = p.compute_importance(criterion="variance")
    np.testing.assert_allclose(first, var(net.conv1), rtol=1e-12)
    np.testing.assert_allclose(tied, (var(net.conv2) + var(net.conv3)) / 2, rtol=1e-12)
    # our group-wide Taylor score differs: it adds the bias, BatchNorm and consumer terms
    ours = p.compute_importance(batches, criterion="taylor")[0]
    assert np.all(ours > taylor(ref.conv1))
