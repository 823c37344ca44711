"""Issue 15 sweep: a tiny representative of every construct beyond plain CNNs prunes to the zeroed original.

Grouped convolutions (ResNeXt/RegNet, removed by whole conv groups), channel-last blocks (ConvNeXt: permute,
LayerNorm, per-position linear layers, a layer scale), transformer blocks (``nn.MultiheadAttention``, whose heads
are a group, and a hand-written window attention module, opaque, around a pruned MLP hidden width), ShuffleNetV2's
channel shuffle (the shuffled channels kept, the branches pruned).
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.shufflenetv2 import InvertedResidual

from pruning_env.pruning import Pruner, UnsupportedModelError, zeroed_copy
from tiny import check_prunes_like_zeroed, check_built, hooked_group_costs, random_plan, randomise


class GroupedBlock(nn.Module):
    """ResNeXt bottleneck with an SE gate (RegNet-Y): 1x1 -> grouped 3x3 (4 groups) -> SE -> 1x1, residual."""

    def __init__(self, c: int = 8, width: int = 16, groups: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(width)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, 4, 1), nn.ReLU(), nn.Conv2d(4, width, 1),
                                nn.Sigmoid())
        self.conv3, self.bn3 = nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = h * self.se(h)
        return self.fc(F.relu(x + self.bn3(self.conv3(h))).mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d: a LayerNorm over the channels of an NCHW map, through two permutes."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Stem conv + LayerNorm2d, then dwconv 7x7 -> permute -> LayerNorm -> Linear 4x -> GELU -> Linear ->
    layer scale -> permute back -> residual, as torchvision's CNBlock."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(3, c, 2, stride=2), LayerNorm2d(c)
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.layer_scale = nn.Parameter(torch.full((c, 1, 1), 0.5))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        h = self.pw2(F.gelu(self.pw1(self.norm(self.dwconv(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        x = x + self.layer_scale * h
        return self.head(x.mean((2, 3)))


class TinyViT(nn.Module):
    """Patch embedding, class token, positions, one pre-norm block with nn.MultiheadAttention and an MLP."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d))
        self.ln1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        h = self.ln1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.fc2(F.gelu(self.fc1(self.ln2(t))))
        return self.head(t[:, 0])


class WindowAttention(nn.Module):
    """Swin-style attention on an (N, H, W, C) map through functional calls (opaque by its name)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        n, h, w, c = x.shape
        q, k, v = F.linear(x.reshape(n, h * w, c), self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        out = torch.softmax(q @ k.transpose(-1, -2) / c ** 0.5, dim=-1) @ v
        return F.linear(out, self.proj.weight, self.proj.bias).view(n, h, w, c)


class SwinBlock(nn.Module):
    """Patch embedding to channel-last, LayerNorm, window attention, LayerNorm, MLP; NHWC throughout."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed, self.norm0 = nn.Conv2d(3, d, 4, stride=4), nn.LayerNorm(d)
        self.norm1, self.attn = nn.LayerNorm(d), WindowAttention(d)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 3 * d), nn.GELU(), nn.Linear(3 * d, d))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = self.norm0(self.embed(x).permute(0, 2, 3, 1))
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.permute(0, 3, 1, 2).mean((2, 3)))


def shufflenet_stage() -> nn.Module:
    """ShuffleNetV2's stride-2 block and a stride-1 block (chunk, branch, cat, channel shuffle) on a stem."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), InvertedResidual(8, 16, 2),
                         InvertedResidual(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


# name -> (builder, the group names the construct must yield, granularities > 1)
CONSTRUCTS = {
    "grouped_se": (GroupedBlock, {"stem residual (stem.0+conv3)", "conv1 se (conv1+se.3)", "se.1"},
                   {"conv1 se (conv1+se.3)": 4}),
    "convnext": (ConvNeXtBlock, {"pw1"}, {}),
    "vit_mha": (TinyViT, {"fc1", "attn"}, {}),
    "swin_window": (SwinBlock, {"mlp.0"}, {}),
    "shufflenet": (shufflenet_stage, {"0", "3.branch2.0", "4.branch2.0"}, {}),
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_construct_prunes_to_the_zeroed_original(name):
    build, expected, granularity = CONSTRUCTS[name]
    torch.manual_seed(0)
    model = randomise(build())
    x = torch.randn(3, 3, 16, 16)
    pruner = Pruner(model, x[:1])
    assert set(pruner.group_names) == expected
    assert {g.name: g.granularity for g in pruner.groups if g.granularity > 1} == granularity
    pruner.compute_importance(criterion="l1")
    check_prunes_like_zeroed(model, pruner, x)
    # per-group costs (the env's observation) equal hooks on the group's layers
    np.testing.assert_array_equal(np.stack(pruner.group_costs()),
                                  np.stack(hooked_group_costs(model, pruner, tuple(x.shape[1:]))))


def test_grouped_conv_halves_conv_groups_and_macs():
    """50 % of a grouped conv's channels removes half its conv groups: its MACs fall to a quarter."""
    model = randomise(GroupedBlock())
    pruner = Pruner(model, torch.randn(1, 3, 16, 16))
    pruner.compute_importance(criterion="l1")
    new = pruner.apply(pruner.plan(sparsity=0.5))
    assert (new.conv2.in_channels, new.conv2.out_channels, new.conv2.groups) == (8, 8, 2)
    assert new.conv2.weight.shape == (8, 4, 3, 3)


def test_shuffled_channels_are_kept_and_the_branches_pruned():
    """The shuffle keeps the block outputs whole; each branch's inner width (and the stem) is pruned."""
    pruner = Pruner(randomise(shufflenet_stage()), torch.randn(1, 3, 16, 16))
    groups = {g.name: g for g in pruner.groups}
    assert groups["3.branch2.0"].consumers == ("3.branch2.5",) and groups["3.branch2.0"].followers == (
        "3.branch2.1", "3.branch2.3", "3.branch2.4")


def test_unfixed_channels_in_the_wrong_dim_are_refused():
    """A linear layer over a dim that is not the channels of a prunable map must be refused, not mis-cut."""

    class MixSpatial(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.mix, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(8, 8), nn.Linear(6 * 8 * 8, 2)

        def forward(self, x):
            return self.head(self.mix(self.conv(x)).flatten(1))

    with pytest.raises(UnsupportedModelError, match="'mix' .*channels in dim 1.*conv"):
        Pruner(MixSpatial(), torch.randn(1, 3, 8, 8))
    # ignoring the conv leaves the linear's own outputs, which a flatten then interleaves: refused as well
    with pytest.raises(UnsupportedModelError, match="flatten.*mix"):
        Pruner(MixSpatial(), torch.randn(1, 3, 8, 8), ignore=["conv"])
