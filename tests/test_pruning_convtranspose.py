"""Transposed convolutions (YOLOv6's upsampling, decoder-style nets): their input channels (weight dim 0) and output
channels (weight dim 1) are pruned; pruned == zeroed and analytic costs == counted. A grouped one keeps its
channels (no refusal)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_env.costs import count_costs
from pruning_env.pruning import Pruner, zeroed_copy
from tiny import random_plan


class UpNet(nn.Module):
    """conv -> BN -> ConvTranspose (x2) -> BN -> concat with a skip -> conv -> head, as a YOLOv6 neck."""

    def __init__(self, groups=1):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=groups, bias=True)
        self.bn2 = nn.BatchNorm2d(6)
        self.skip = nn.Conv2d(3, 4, 3, padding=1)
        self.fuse = nn.Conv2d(10, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        u = F.relu(self.bn2(self.up(F.relu(self.bn1(self.down(x))))))
        y = F.relu(self.fuse(torch.cat([u, F.relu(self.skip(x))], 1)))
        return self.fc(y.mean((2, 3)))


def _net(**kw):
    torch.manual_seed(0)
    model = UpNet(**kw).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.3, 0.3)
    return model


def test_conv_transpose_inputs_and_outputs_prune_to_the_zeroed_original():
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    pruner = Pruner(model, x[:1])
    assert {"down", "up"} <= set(pruner.group_names)
    pruner.compute_importance(criterion="l1")
    for seed in range(4):
        plan = pruner.plan(sparsity=0.5) if seed == 0 else random_plan(pruner, seed, 0.9)
        new = pruner.apply(plan)
        kept_down = len(plan.kept[pruner.group_names.index("down")])
        kept_up = len(plan.kept[pruner.group_names.index("up")])
        assert new.up.weight.shape[:2] == (kept_down, kept_up) and new.up.bias.shape == (kept_up,)
        assert (new.up.in_channels, new.up.out_channels) == (kept_down, kept_up)
        with torch.no_grad():
            got, ref = new(x), zeroed_copy(model, pruner, plan)(x)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (got - ref).abs().max()
        assert count_costs(new, (3, 8, 8)) == pruner.plan_cost(plan)


def test_grouped_conv_transpose_keeps_its_channels():
    model = _net(groups=2)
    x = torch.randn(2, 3, 8, 8)
    pruner = Pruner(model, x[:1])
    assert "down" not in pruner.group_names and "up" not in pruner.group_names
    pruner.compute_importance(criterion="l1")
    plan = pruner.plan(sparsity=0.5)
    new = pruner.apply(plan)
    with torch.no_grad():
        assert torch.allclose(new(x), zeroed_copy(model, pruner, plan)(x), atol=1e-5)
    assert count_costs(new, (3, 8, 8)) == pruner.plan_cost(plan)
