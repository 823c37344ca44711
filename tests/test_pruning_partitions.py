"""Channel partitions (issue 22 item 1): chunk / split along the channels and channel slices are graph nodes.

Each tiny module prunes to the zeroed original with plan cost == counter (``check_built``); equal ``chunk`` parts
are pruned with the same indices; split sizes and slice bounds read from a module attribute are rewritten by
surgery (MixNet's split, GhostNet's slice), other constants keep their parts whole.
"""
import pytest
import torch
import torch.nn as nn
import numpy as np

from pruning_env.costs import count_costs
from pruning_env.pruning import Pruner, zeroed_copy
from tiny import check_prunes_like_zeroed, ChannelSliceNet, ConvBN, check_built, hooked_group_costs, random_batchnorm, random_plan


class C2f(nn.Module):
    """Ultralytics C2f: cv1 -> chunk(2, 1) -> bottlenecks on the last part -> cat of all parts -> cv2."""

    def __init__(self, c1: int = 3, c2: int = 8, c: int = 6, n: int = 2) -> None:
        super().__init__()
        self.cv1 = ConvBN(c1, 2 * c, 1)
        self.m = nn.ModuleList(nn.Sequential(ConvBN(c, c, 3), ConvBN(c, c, 3)) for _ in range(n))
        self.cv2 = ConvBN((2 + n) * c, c2, 1)
        self.head = nn.Linear(c2, 4)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) + y[-1] for m in self.m)  # shortcut bottlenecks, as C2f(shortcut=True)
        return self.head(self.cv2(torch.cat(y, 1)).mean((2, 3)))


class EqualSplit(nn.Module):
    """``torch.split`` with explicit (equal) sizes: the sizes are constants, so the split channels are kept."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1, self.a, self.b = ConvBN(3, 8, 1), ConvBN(4, 6, 3), ConvBN(4, 6, 3)
        self.out = ConvBN(12, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        p, q = torch.split(self.cv1(x), [4, 4], dim=1)
        return self.head(self.out(torch.cat([self.a(p), self.b(q)], 1)).mean((2, 3)))


class Ghost(nn.Module):
    """GhostNet's module: primary conv, cheap depthwise conv on it, ``cat([x1, x2], 1)[:, :oup]`` (oup odd)."""

    def __init__(self, oup: int = 7) -> None:
        super().__init__()
        init = (oup + 1) // 2
        self.stem = ConvBN(3, 8, 3)
        self.primary = ConvBN(8, init, 1)
        self.cheap = ConvBN(init, init, 3, groups=init)
        self.oup = oup
        self.head = nn.Linear(oup, 4)

    def forward(self, x):
        x1 = self.primary(self.stem(x))
        x2 = self.cheap(x1)
        return self.head(torch.cat([x1, x2], 1)[:, :self.oup].mean((2, 3)))


class GhostLiteral(Ghost):
    """The same with a literal bound ``[:, :7]``: the channels before it are kept."""

    def forward(self, x):
        x1 = self.primary(self.stem(x))
        return self.head(torch.cat([x1, self.cheap(x1)], 1)[:, :7].mean((2, 3)))


class GhostUsedTwice(Ghost):
    """The bound attribute is also used in arithmetic (a derived width): it cannot be rewritten alone, so kept."""

    def forward(self, x):
        x1 = self.primary(self.stem(x))
        y = torch.cat([x1, self.cheap(x1)], 1)[:, :self.oup]
        return self.head(y.mean((2, 3))) * (self.oup - 6)


class Mixed(nn.ModuleDict):
    """timm's ``MixedConv2d``: ``split(x, self.splits, 1)``, one depthwise conv per part (kernel 3, 5, ...), cat."""

    def __init__(self, channels: int, kernels=(3, 5, 7)) -> None:
        super().__init__()
        splits = [channels // len(kernels)] * len(kernels)
        splits[0] += channels - sum(splits)
        for i, (k, c) in enumerate(zip(kernels, splits)):
            self.add_module(str(i), nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False))
        self.splits = splits

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(parts[i]) for i, conv in enumerate(self.values())], 1)


class MixNetBlock(nn.Module):
    """MixNet's inverted residual: pointwise expansion, a mixed depthwise conv (unequal parts), projection."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 6, 3)
        self.pw = ConvBN(6, 14, 1)
        self.dw = Mixed(14)
        self.bn = nn.BatchNorm2d(14)
        self.pwl = ConvBN(14, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pwl(torch.relu(self.bn(self.dw(self.pw(x)))))
        return self.head(x.mean((2, 3)))


class SplitAttributes(nn.Module):
    """FasterNet's partial conv: ``split(x, [self.dim_conv, self.dim_untouched], 1)``, one int attribute per size;
    a literal second split ``split(y, [5, 7], 1)`` keeps its parts."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = ConvBN(3, 12, 1)
        self.dim_conv, self.dim_untouched = 4, 8
        self.partial = ConvBN(4, 4, 3)
        self.cv2 = ConvBN(12, 12, 1)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        a, b = torch.split(self.cv1(x), [self.dim_conv, self.dim_untouched], dim=1)
        y = self.cv2(torch.cat([self.partial(a), b], 1))
        p, q = torch.split(y, [5, 7], 1)
        return self.head(torch.cat([q, p], 1).mean((2, 3)))


class TailSlice(nn.Module):
    """``x[:, :-2]``: a bound counted from the end keeps the channels after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = ConvBN(3, 8, 3), ConvBN(6, 8, 3)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv2(self.conv1(x)[:, :-2]).mean((2, 3)))


class GhostShortcut(nn.Module):
    """GhostNet's bottleneck with a conv shortcut: ``cat([x1, cheap(x1)], 1)`` (one source twice, a full slice)
    added to the shortcut conv's output, which is cut in two halves tied to the primary conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 6, 3)
        self.primary, self.cheap = ConvBN(6, 4, 1), ConvBN(4, 4, 3, groups=4)
        self.shortcut = ConvBN(6, 8, 1)
        self.out_chs = 8
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x1 = self.primary(x)
        y = torch.cat([x1, self.cheap(x1)], 1)[:, :self.out_chs]
        return self.head((y + self.shortcut(x)).mean((2, 3)))


class Res2Block(nn.Module):
    """Res2Net: ``split(x, self.width, 1)`` into equal parts, hierarchical convs (``sp = sp + part``), cat."""

    def __init__(self, width: int = 3, scale: int = 3) -> None:
        super().__init__()
        self.stem = ConvBN(3, 6, 3)
        self.conv1 = ConvBN(6, width * scale, 1)
        self.convs = nn.ModuleList(ConvBN(width, width, 3) for _ in range(scale - 1))
        self.conv3 = ConvBN(width * scale, 6, 1)
        self.width = width
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.stem(x)
        spx = torch.split(self.conv1(x), self.width, 1)
        sp, out = spx[0], []
        for i, conv in enumerate(self.convs):
            sp = conv(sp if i == 0 else sp + spx[i])
            out.append(sp)
        out.append(spx[-1])
        return self.head((x + self.conv3(torch.cat(out, 1))).mean((2, 3)))


class CSP(nn.Module):
    """CSP stage: one conv's output chunked; one half through a residual block, the other a shortcut; cat; fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = ConvBN(3, 12, 3)
        self.block = nn.Sequential(ConvBN(6, 8, 1), ConvBN(8, 6, 3))
        self.fuse = ConvBN(12, 10, 1)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, dim=1)
        a = a + self.block(a)
        return self.head(self.fuse(torch.cat([a, b], 1)).mean((2, 3)))


class ChunkAfterAdd(nn.Module):
    """A chunk of a residual sum (its sources already tied) and an int ``Tensor.split``: both kept whole."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = ConvBN(3, 8, 3), ConvBN(3, 8, 1), ConvBN(3, 6, 1)
        self.d, self.e = ConvBN(4, 5, 3), ConvBN(3, 5, 3)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        p, q = (self.a(x) + self.b(x)).chunk(2, 1)
        r, s = self.c(x).split(3, 1)
        y = torch.cat([self.d(p * q), self.e(r + s)], 1)
        return self.head(y.mean((2, 3)))


def _check_built(model, pruner, x, plan):
    """``check_built`` where every member is whole; else the cost checks alone (a cut layer's width is the sum of
    its parts' groups, not one group's)."""
    members = [m for g in pruner.groups for m in g.members]
    if len(members) == len(set(members)) and all(
            dict(model.named_modules())[m].out_channels == g.num_channels for g in pruner.groups for m in g.members):
        return check_built(model, pruner, x, plan)
    new = pruner.apply(plan)
    assert count_costs(new, tuple(x.shape[1:])) == pruner.plan_cost(plan)
    child = pruner.child(new, plan)
    assert child.plan_cost(keep=child.num_channels) == pruner.plan_cost(plan)
    return new


MODELS = {"c2f": C2f, "split": EqualSplit, "ghost": Ghost, "csp": CSP, "slice": ChannelSliceNet,
          "chunk_after_add": ChunkAfterAdd, "ghost_literal": GhostLiteral, "ghost_used_twice": GhostUsedTwice,
          "mixnet": MixNetBlock, "split_attributes": SplitAttributes, "tail_slice": TailSlice,
          "ghost_shortcut": GhostShortcut, "res2net": Res2Block}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_partitions_prune_to_the_zeroed_original(name):
    torch.manual_seed(0)
    model = random_batchnorm(MODELS[name]())
    x = torch.randn(3, 3, 16, 16)
    pruner = Pruner(model, x[:1])
    pruner.compute_importance(criterion="l1")
    check_prunes_like_zeroed(model, pruner, x, build=_check_built)
    np.testing.assert_array_equal(np.stack(pruner.group_costs()),
                                  np.stack(hooked_group_costs(model, pruner, tuple(x.shape[1:]))))


def test_chunked_halves_lose_the_same_channels_and_stay_equal():
    """C2f: cv1's output is one group of 6 channels (the two halves tied), pruned in both halves."""
    model = random_batchnorm(C2f())
    x = torch.randn(2, 3, 16, 16)
    pruner = Pruner(model, x[:1])
    # both halves, and the bottlenecks' residual adds on the second one, are one group
    g = pruner.groups[0]
    assert g.num_channels == 6 and g.members == ("cv1.0", "m.0.1.0", "m.1.1.0") and g.kind == "residual"
    pruner.compute_importance(criterion="l1")
    plan = pruner.plan(sparsity=0.5)
    new = pruner.apply(plan)
    assert new.cv1[0].out_channels == 6 and new.cv2[0].in_channels == 12
    assert count_costs(new, (3, 16, 16)) == pruner.plan_cost(plan)
    assert pruner.plan_cost(plan).macs < 0.5 * pruner.plan_cost(keep=pruner.num_channels).macs
    child = pruner.child(new, plan)
    assert child.plan_cost(keep=child.num_channels) == pruner.plan_cost(plan)


def test_constant_split_sizes_and_slice_prefix_are_kept():
    split = Pruner(random_batchnorm(EqualSplit()), torch.randn(1, 3, 16, 16))
    assert "cv1.0" not in split.group_names and {"a.0", "b.0"} <= set(split.group_names)
    for kept in (GhostLiteral, GhostUsedTwice):
        ghost = Pruner(random_batchnorm(kept()), torch.randn(1, 3, 16, 16))
        assert ghost.group_names == ["stem.0"] and not ghost.graph.rewrites
    tied = Pruner(random_batchnorm(ChunkAfterAdd()), torch.randn(1, 3, 16, 16))
    assert tied.group_names == ["d.0", "e.0"]
    sliced = Pruner(ChannelSliceNet(), torch.randn(1, 3, 16, 16))
    assert sliced.num_channels.tolist() == [4, 8]  # conv1's tail after the slice [:, :4], conv2


def test_a_channel_tensor_giving_only_its_dtype_is_no_dependency():
    """YOLO's anchors: ``torch.arange(w).type_as(feats)`` and ``feats.new_zeros`` carry no channels."""

    class Anchors(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = ConvBN(3, 8, 3), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            f = self.conv(x)
            grid = torch.arange(f.shape[-1]).type_as(f) + f.new_zeros(f.shape[-1])
            return self.head(f) + grid

    model = random_batchnorm(Anchors())
    pruner = Pruner(model, torch.randn(1, 3, 8, 8))
    assert pruner.group_names == ["conv.0"]
    pruner.compute_importance(criterion="l1")
    x = torch.randn(2, 3, 8, 8)
    plan = pruner.plan(sparsity=0.5)
    with torch.no_grad():
        assert torch.allclose(check_built(model, pruner, x, plan)(x), zeroed_copy(model, pruner, plan)(x), atol=1e-5)


def _macs_at_half(model, x):
    pruner = Pruner(model, x[:1])
    pruner.compute_importance(criterion="l1")
    return pruner, pruner.plan_cost(sparsity=0.5).macs / pruner.plan_cost(keep=pruner.num_channels).macs


def test_slice_bound_attribute_is_rewritten_by_surgery():
    """GhostNet: ``cat([x1, x2], 1)[:, :self.oup]`` (oup 7 of 8): primary and cheap convs are pruned, ``oup``
    becomes the kept width, and the MACs drop below the literal bound's."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = random_batchnorm(Ghost())
    pruner, frac = _macs_at_half(model, x)
    (r,) = pruner.graph.rewrites
    assert (r.module, r.attr, r.as_list) == ("", "oup", False)
    assert set(pruner.group_names) == {"stem.0", "primary.0", "primary.0 #2"}  # the cut at 3 + 1 channels of 4
    plan = pruner.plan(sparsity=0.5)
    new = pruner.apply(plan)
    kept = dict(zip(pruner.group_names, plan.num_kept))
    assert new.oup == 2 * kept["primary.0"] + kept["primary.0 #2"] and model.oup == 7
    assert new.primary[0].out_channels == kept["primary.0"] + kept["primary.0 #2"]
    _, literal = _macs_at_half(random_batchnorm(GhostLiteral()), x)
    assert frac < 0.5 and literal > frac + 0.1  # 0.47 vs 0.58


def test_split_sizes_attribute_is_rewritten_by_surgery():
    """MixNet: ``split(x, self.splits, 1)`` into 6 + 4 + 4 channels: each part is a group of its own (the
    expansion conv cut in three), ``splits`` becomes the kept widths; the MACs halve like a plain block's."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = random_batchnorm(MixNetBlock())
    pruner, frac = _macs_at_half(model, x)
    (r,) = pruner.graph.rewrites
    assert (r.module, r.attr, r.as_list) == ("dw", "splits", True)
    assert [g.num_channels for g in pruner.groups if g.members == ("pw.0",)] == [6, 4, 4]
    plan = pruner.plan(sparsity=0.5)
    new = pruner.apply(plan)
    assert new.dw.splits == [3, 2, 2] and model.dw.splits == [6, 4, 4]
    assert [new.dw[str(i)].out_channels for i in range(3)] == [3, 2, 2] and new.pw[0].out_channels == 7
    assert frac < 0.5  # 0.44
    # the per-size int attributes of a FasterNet-style split: both parts pruned, the literal split kept
    split = Pruner(random_batchnorm(SplitAttributes()), x[:1])
    assert sorted((r.attr, r.as_list) for r in split.graph.rewrites) == [("dim_conv", False), ("dim_untouched", False)]
    assert "cv2.0" not in split.group_names and split.group_names.count("cv1.0") == 1
    split.compute_importance(criterion="l1")
    plan = split.plan(sparsity=0.5)
    new = split.apply(plan)
    assert (new.dim_conv, new.dim_untouched) == (2, 4)
    # an int attribute splitting into equal parts (Res2Net): the parts are tied, the attribute is one part's width
    res2 = Pruner(random_batchnorm(Res2Block()), x[:1])
    assert [(r.attr, r.as_list) for r in res2.graph.rewrites] == [("width", False)]
    res2.compute_importance(criterion="l1")
    new = res2.apply(res2.plan(sparsity=0.5))
    assert new.width == new.convs[0][0].out_channels < 3 and new.conv1[0].out_channels == 3 * new.width


def test_an_add_of_differently_cut_layouts_cuts_both():
    """GhostNet's conv shortcut: its 8 channels are cut in two halves, each tied to the primary conv's 4."""
    model = random_batchnorm(GhostShortcut())
    pruner, frac = _macs_at_half(model, torch.randn(2, 3, 16, 16))
    assert pruner.group_names == ["stem.0", "primary residual (primary.0+shortcut.0)"]
    assert pruner.num_channels.tolist() == [6, 4] and frac < 0.5  # 0.44
    new = pruner.apply(pruner.plan(sparsity=0.5))
    assert new.shortcut[0].out_channels == 4 and new.primary[0].out_channels == 2
