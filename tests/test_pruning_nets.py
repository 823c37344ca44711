"""Small hand-written networks and shared checks for the pruning-engine tests (no tests of its own).

The nets cover every construct the tracer must handle and stay tiny (16x16 inputs, <= 24 channels).
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_env.costs import count_costs
from pruning_env.pruning import Pruner
from pruning_env.pruning.attention import attention_handler


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(avgpool(x)))))."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class MixedNet(nn.Module):
    """Residual (projection and identity), inverted residual with depthwise + SE, concat, flatten 4x4 -> FC."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.block1_a = ConvBN(8, 12, stride=2)
        self.block1_b = ConvBN(12, 12, act=False)
        self.block1_short = ConvBN(8, 12, k=1, stride=2, act=False)
        self.block2_a = ConvBN(12, 12)
        self.block2_b = ConvBN(12, 12, act=False)
        self.expand = ConvBN(12, 16, k=1)
        self.dw = ConvBN(16, 16, groups=16)
        self.se = SqueezeExcite(16, 4)
        self.project = ConvBN(16, 12, k=1, act=False)
        self.branch1 = nn.Conv2d(12, 6, 1)
        self.branch2 = nn.Conv2d(12, 5, 3, padding=1)
        self.cat_bn = nn.BatchNorm2d(23)
        self.pool = nn.MaxPool2d(2)
        self.head_conv = ConvBN(23, 10)
        self.fc1 = nn.Linear(10 * 4 * 4, 20)
        self.fc_act = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(20, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.block1_b(self.block1_a(x)) + self.block1_short(x))
        y = self.block2_b(self.block2_a(x))
        y += x
        x = F.relu(y)
        x = x + self.project(self.se(self.dw(self.expand(x))))
        x = torch.cat([self.branch1(x), self.branch2(x), x], dim=1)
        x = self.pool(F.relu(self.cat_bn(x)))
        x = self.head_conv(x)
        x = torch.flatten(x, 1)  # 10 x 4 x 4: spatial size > 1 before the linear layer
        return self.fc2(self.drop(self.fc_act(self.fc1(x))))


class ChannelShuffleNet(nn.Module):
    """Channel shuffle (view + transpose of the channel dim): the shuffled channels are kept, never mis-pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv1(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(self.conv2(x).mean((2, 3)))


class ChannelGroupSumNet(nn.Module):
    """Splits a conv's channels into two groups with a view and adds the groups: must be refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv1(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).sum(1)
        return self.fc(self.conv2(x).mean((2, 3)))


class ChannelSliceNet(nn.Module):
    """Takes a slice of a conv's channels: also refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv1(x)[:, :4]
        return self.fc(self.conv2(x).mean((2, 3)))


def mixed_net(num_classes: int = 10, seed: int = 0) -> MixedNet:
    """A MixedNet in eval mode with non-trivial BatchNorm statistics (so BN slicing errors show)."""
    torch.manual_seed(seed)
    net = MixedNet(num_classes)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def random_plan(pruner, seed, max_sparsity):
    """A plan from per-group sparsities drawn uniformly in [0, max_sparsity)."""
    rng = np.random.default_rng(seed)
    return pruner.plan(sparsity=rng.uniform(0.0, max_sparsity, pruner.n_groups))


def check_built(model, pruner, x, plan):
    """Build ``plan`` and check shapes, widths, costs (analytic == count_costs) and the re-traced groups."""
    new = pruner.apply(plan)
    size = tuple(x.shape[1:])
    with torch.no_grad():
        y = new(x)
    assert y.shape == model(x).shape
    assert count_costs(new, size) == pruner.plan_cost(plan)
    modules = dict(new.named_modules())
    for g, kept in zip(pruner.groups, plan.kept):
        for member in g.members:
            m = modules[member]
            if attention_handler(m) is not None:  # a head group: its width is the number of heads
                width = attention_handler(m).heads(m)[0]
            else:
                width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            assert width == len(kept), member
    # iterative pruning: the child pruner has the same groups with the planned widths and costs ...
    child = pruner.child(new, plan)
    assert child.group_names == pruner.group_names
    assert np.array_equal(child.num_channels, plan.num_kept)
    assert child.plan_cost(keep=child.num_channels) == pruner.plan_cost(plan)
    # ... and so does a fresh trace, unless a depthwise conv is down to one channel or a grouped conv to one
    # conv group (then it looks like a plain conv, which is why child() derives the groups instead of re-tracing)
    if np.all(plan.num_kept > pruner.granularity):
        fresh = Pruner(new, x[:1], prune_normalized=pruner.prune_normalized)
        assert fresh.group_names == pruner.group_names
        assert np.array_equal(fresh.num_channels, plan.num_kept)
    return new


