"""GroupNorm: channels removed by whole groups (the channels per group stay, ``num_groups`` shrinks, every kept
group's statistics are the source's, so pruned == zeroed exactly); one group is a normalised width, pruned only with
``prune_normalized`` (statistics over the kept channels); a GroupNorm the engine cannot prune keeps its channels
(never a refusal or a crash)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_env.costs import count_costs
from pruning_env.pruning import Pruner, zeroed_copy
from tiny import random_plan


class GroupNormAct(nn.GroupNorm):
    """As timm's: ``GroupNorm`` subclass whose forward calls ``F.group_norm`` then an activation."""

    def forward(self, x):
        return F.silu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class GNNet(nn.Module):
    """conv -> GN(4 groups of 4) -> conv -> GroupNormAct(2 groups of 4) + residual -> GN(12 groups of 1) -> head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 16)
        self.conv = nn.Conv2d(16, 8, 3, padding=1)
        self.gn2 = GroupNormAct(2, 8)
        self.res = nn.Conv2d(8, 8, 3, padding=1)
        self.gn3 = nn.GroupNorm(2, 8)
        self.wide = nn.Conv2d(8, 12, 1)
        self.gn4 = nn.GroupNorm(12, 12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.gn1(self.stem(x)))
        x = self.gn2(self.conv(x))
        x = F.relu(x + self.gn3(self.res(x)))
        x = F.relu(self.gn4(self.wide(x)))
        return self.fc(x.mean((2, 3)))


class OneGroupNet(nn.Module):
    """A GroupNorm with one group (a LayerNorm over C, H, W, e.g. timm's GroupNorm1 in PoolFormer)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(1, 8)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.conv(F.relu(self.norm(self.stem(x))))
        return self.fc(F.relu(x).mean((2, 3)))


def _net(cls):
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():  # non-trivial affine parameters, so a misplaced channel shows
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def _check(model, pruner, x, plan, atol=1e-5):
    new = pruner.apply(plan)
    with torch.no_grad():
        got, expected = new(x), zeroed_copy(model, pruner, plan)(x)
    assert torch.allclose(got, expected, atol=atol, rtol=1e-4), (got - expected).abs().max()
    assert count_costs(new, tuple(x.shape[1:])) == pruner.plan_cost(plan)
    return new


def test_groupnorm_removes_whole_groups_and_equals_zeroed():
    model = _net(GNNet)
    x = torch.randn(2, 3, 8, 8)
    pruner = Pruner(model, x[:1])
    pruner.compute_importance(criterion="l1")
    granularity = dict(zip(pruner.group_names, pruner.granularity))
    assert granularity["stem"] == 4 and granularity["wide"] == 1
    assert any(name.startswith("conv") or "conv" in name for name in pruner.group_names)
    residual = next(n for n in pruner.group_names if "res" in n)
    assert granularity[residual] == 4  # the two 2-group norms of the residual, 4 channels per group
    seen_groups = set()
    for seed in range(4):
        plan = random_plan(pruner, seed, 0.9)
        new = _check(model, pruner, x, plan)
        stem_kept = plan.kept[pruner.group_names.index("stem")]
        assert len(stem_kept) % 4 == 0
        assert new.gn1.num_channels == len(stem_kept) and new.gn1.num_groups == len(stem_kept) // 4
        # whole groups: the kept channels are complete groups of the source
        assert set(np.unique(stem_kept // 4)) == set(stem_kept // 4) and len(stem_kept) == 4 * len(set(stem_kept // 4))
        assert new.gn2.num_groups * 4 == new.gn2.num_channels == new.gn3.num_channels
        assert type(new.gn2) is GroupNormAct
        seen_groups.add(new.gn1.num_groups)
    assert len(seen_groups) > 1


def test_groupnorm_plan_at_uniform_sparsity_halves_the_groups():
    model = _net(GNNet)
    x = torch.randn(1, 3, 8, 8)
    pruner = Pruner(model, x)
    pruner.compute_importance(criterion="l1")
    new = _check(model, pruner, x, pruner.plan(sparsity=0.5))
    assert (new.gn1.num_groups, new.gn1.num_channels) == (2, 8)
    assert new.gn4.num_channels == 6


def test_one_group_is_kept_unless_prune_normalized():
    model = _net(OneGroupNet)
    x = torch.randn(2, 3, 8, 8)
    assert Pruner(model, x[:1]).group_names == ["conv"]  # the normalised width stays whole
    pruner = Pruner(model, x[:1], prune_normalized=True)
    assert sorted(pruner.group_names) == ["conv", "stem"]
    pruner.compute_importance(criterion="l1")
    for seed in range(3):
        plan = random_plan(pruner, seed, 0.8)
        new = _check(model, pruner, x, plan)
        kept = len(plan.kept[pruner.group_names.index("stem")])
        assert (new.norm.num_groups, new.norm.num_channels) == (1, kept)
        # statistics over the kept channels: not the zeroed source's plain GroupNorm
        if kept < 8:
            ref = zeroed_copy(model, pruner, plan)
            with torch.no_grad():
                assert not torch.allclose(new(x), ref.model(x), atol=1e-4)


def test_groups_straddling_a_concat_and_functional_group_norm_keep_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3, padding=1)
            self.b = nn.Conv2d(3, 6, 3, padding=1)
            self.norm = nn.GroupNorm(3, 12)  # groups of 4 over 6 + 6 channels: group 2 straddles a and b
            self.c = nn.Conv2d(3, 8, 3, padding=1)
            self.d = nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(20, 4)

        def forward(self, x):
            y = F.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1)))
            z = F.relu(F.group_norm(self.d(F.relu(self.c(x))), 2))  # no module: channels kept
            return self.fc(torch.cat([y, z], 1).mean((2, 3)))

    model = _net(Net)
    x = torch.randn(2, 3, 8, 8)
    pruner = Pruner(model, x[:1])
    assert pruner.group_names == ["c"]
    pruner.compute_importance(criterion="l1")
    _check(model, pruner, x, pruner.plan(sparsity=0.5))
