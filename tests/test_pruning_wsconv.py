"""Weight-standardised convs (timm's ScaledStdConv2d): the per-output-channel gain is pruned with the filters;
a conv subclass with an unknown channel-sized tensor, or one whose standardised filters would lose inputs, is
refused up front with a message naming it (never a crash at the pruned model's first forward)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_env.costs import count_costs
from pruning_env.pruning import Pruner, UnsupportedModelError, zeroed_copy
from tiny import random_plan


class ScaledStdConv2d(nn.Conv2d):
    """As timm's: each filter standardised over its fan-in, times a per-out-channel gain."""

    def __init__(self, cin, cout, k, padding=0, eps=1e-6):
        super().__init__(cin, cout, k, padding=padding)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Mystery(nn.Conv2d):
    """A conv subclass with an extra per-channel tensor the engine does not know."""

    def __init__(self, cin, cout, k):
        super().__init__(cin, cout, k, padding=1)
        self.shift = nn.Parameter(torch.randn(cout))

    def forward(self, x):
        return super().forward(x) + self.shift.view(1, -1, 1, 1)


class WSNet(nn.Module):
    """A WS stem whose outputs are pruned (inputs are the image), then plain layers."""

    def __init__(self):
        super().__init__()
        self.stem = ScaledStdConv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.conv(F.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def _net(cls):
    torch.manual_seed(0)
    return cls().eval()


def test_ws_conv_gain_pruned_with_out_channels_equals_zeroed():
    model = _net(WSNet)
    x = torch.randn(2, 3, 8, 8)
    pruner = Pruner(model, x[:1])
    pruner.compute_importance(criterion="l1")
    for seed in range(3):
        plan = random_plan(pruner, seed, 0.8)
        new = pruner.apply(plan)
        stem_kept = plan.kept[pruner.group_names.index("stem")]
        assert new.stem.gain.shape == (len(stem_kept), 1, 1, 1)
        assert torch.equal(new.stem.gain.detach(), model.stem.gain.detach()[torch.from_numpy(stem_kept)])
        with torch.no_grad():
            got, expected = new(x), zeroed_copy(model, pruner, plan)(x)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()
        assert count_costs(new, (3, 8, 8)) == pruner.plan_cost(plan)


def test_ws_conv_losing_inputs_is_refused_with_its_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = ScaledStdConv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.b(F.relu(self.a(x))).mean((2, 3))

    with pytest.raises(UnsupportedModelError, match=r"'b' \(ScaledStdConv2d, a Conv2d subclass with its own forward"):
        Pruner(_net(Net), torch.randn(1, 3, 8, 8))
    # keeping its producer whole removes the refusal (and the group)
    with pytest.raises(UnsupportedModelError, match="no prunable channel group"):
        Pruner(_net(Net), torch.randn(1, 3, 8, 8), ignore=["a", "b"])


def test_unknown_channel_sized_tensor_is_refused_naming_module_class_and_tensor():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = Mystery(3, 8, 3)
            self.mid = nn.Conv2d(8, 6, 1)
            self.head = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.head(F.relu(self.mid(F.relu(self.m(x))))).mean((2, 3))

    with pytest.raises(UnsupportedModelError, match=r"'m' \(Mystery.*'shift' of shape \[8\]"):
        Pruner(_net(Net), torch.randn(1, 3, 8, 8))
    pruner = Pruner(_net(Net), torch.randn(1, 3, 8, 8), ignore=["m"])  # ignored: nothing of it is cut
    assert pruner.group_names == ["mid"]
