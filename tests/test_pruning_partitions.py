"""Channel partitions (issue 22 item 1): chunk / split along the channels and channel slices are graph nodes.

Each tiny module prunes to the zeroed original with plan cost == counter (``check_built``); equal ``chunk`` parts
are pruned with the same indices, explicit split sizes and the channels before a slice's end are kept.
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
          "chunk_after_add": ChunkAfterAdd}


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
    ghost = Pruner(random_batchnorm(Ghost()), torch.randn(1, 3, 16, 16))
    assert "primary.0" not in ghost.group_names and "stem.0" in ghost.group_names
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
