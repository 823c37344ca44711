"""Dependency-group discovery: structure of the groups, names and order, ignored layers, refused constructs.

Offline, on hand-written tiny nets and torchvision models built without weights.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from pruning_env.pruning import DependencyGraph, Pruner, PrunePlan, UnsupportedModelError
from tiny import ChannelGroupSumNet, ChannelShuffleNet, mixed_net


def _by_member(pruner):
    return {m: g for g in pruner.groups for m in g.members}


def test_mixed_net_groups_cover_every_construct():
    p = Pruner(mixed_net(), torch.randn(1, 3, 16, 16))
    groups = _by_member(p)
    # residual: projection shortcut, identity add (in place), and the inverted-residual projection share indices
    res = groups["block1_b.0"]
    assert set(res.members) == {"block1_b.0", "block1_short.0", "block2_b.0", "project.0"}
    assert res.kind == "residual" and res.layer_count == 4
    assert res.name.startswith("block1_b residual (block1_b.0+block1_short.0+block2_b.0+...")
    # squeeze-excitation: the expand conv and the SE excitation conv are tied; the depthwise conv follows them
    se = groups["expand.0"]
    assert set(se.members) == {"expand.0", "se.fc2"} and se.kind == "se"
    assert {"expand.1", "dw.0", "dw.1"} <= set(se.followers)
    assert {"se.fc1", "project.0"} <= set(se.consumers)
    # concat: each branch is its own group; the BN after the concat follows all three inputs
    assert groups["branch1"].members == ("branch1",) and "cat_bn" in groups["branch1"].followers
    assert "cat_bn" in res.followers and "head_conv.0" in res.consumers
    # conv -> flatten (4x4) -> linear, and a hidden linear layer
    assert groups["head_conv.0"].consumers == ("fc1",)
    assert groups["fc1"].consumers == ("fc2",)
    # the classifier is never a member; the depthwise conv is never a member
    assert "fc2" not in groups and "dw.0" not in groups
    assert list(p.layer_counts) == [g.layer_count for g in p.groups]
    assert list(p.num_channels) == [g.num_channels for g in p.groups]
    assert len(set(p.group_names)) == p.n_groups


def test_group_order_follows_execution_and_is_stable():
    net = mixed_net()
    x = torch.randn(2, 3, 16, 16)
    a, b = Pruner(net, x), Pruner(net, x)
    assert a.group_names == b.group_names
    assert a.group_names[0] == "stem.0"  # first producer in execution order
    assert a.group_names[-1] == "fc1"


def test_trace_leaves_model_untouched():
    net = mixed_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    Pruner(net, torch.randn(1, 3, 16, 16))
    assert net.training  # the train/eval flag is restored
    for m in net.modules():
        assert m.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not net._forward_hooks and all(not m._forward_pre_hooks for m in net.modules())


def test_ignored_layers_keep_their_outputs():
    net = mixed_net()
    p = Pruner(net, torch.randn(1, 3, 16, 16), ignore=["stem", "fc1"])
    members = {m for g in p.groups for m in g.members}
    assert "stem.0" not in members and "fc1" not in members
    with pytest.raises(ValueError, match="not a module name"):
        Pruner(net, torch.randn(1, 3, 16, 16), ignore=["no_such_layer"])


def test_ignoring_one_residual_member_freezes_the_whole_residual_group():
    p = Pruner(mixed_net(), torch.randn(1, 3, 16, 16), ignore=["block1_short.0"])
    members = {m for g in p.groups for m in g.members}
    assert not members & {"block1_b.0", "block1_short.0", "block2_b.0", "project.0"}


# a channel slice (ChannelSliceNet) is a partition since issue 22: tests/test_pruning_partitions.py
@pytest.mark.parametrize("cls, op", [(ChannelGroupSumNet, "sum.*split into groups")])
def test_unsupported_constructs_raise_naming_the_producer(cls, op):
    with pytest.raises(UnsupportedModelError, match=op) as err:
        Pruner(cls(), torch.randn(1, 3, 8, 8))
    assert "conv1" in str(err.value)
    # the escape hatch named in the message works
    Pruner(cls(), torch.randn(1, 3, 8, 8), ignore=["conv1"])


def test_channel_shuffle_keeps_the_shuffled_channels():
    """Issue 15: a channel shuffle (view, transpose(1, 2), view back) is traced, not refused: the shuffled
    channels are kept (no same-index group can follow them), every other group is pruned."""
    p = Pruner(ChannelShuffleNet(), torch.randn(1, 3, 8, 8))
    assert p.group_names == ["conv2"]


def test_unsupported_layer_on_pruned_channels_is_refused():
    class CumSum(nn.Module):  # mixes channels in an order no group can follow (GroupNorm is pruned now)
        def forward(self, x):
            return torch.cumsum(x, dim=1)

    net = nn.Sequential(nn.Conv2d(3, 8, 3), CumSum(), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(UnsupportedModelError, match="cumsum"):
        Pruner(net, torch.randn(1, 3, 8, 8))


def test_grouped_conv_that_changes_width_keeps_its_channels():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 12, 3, groups=2), nn.ReLU(),
                        nn.Conv2d(12, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    p = Pruner(net, torch.randn(1, 3, 12, 12))
    assert [g.members for g in p.groups] == [("4",)]


def test_grouped_conv_with_equal_widths_is_pruned_by_whole_conv_groups():
    """Issue 15: a grouped conv (in == out) follows its producer; whole conv groups go (4 channels each)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                        nn.Conv2d(8, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    p = Pruner(net, torch.randn(1, 3, 12, 12))
    assert [(g.members, g.followers, g.granularity) for g in p.groups] == [(("0",), ("2",), 4), (("4",), (), 1)]
    p.compute_importance(criterion="l1")
    assert p.keep_counts([0.3, 0.5]).tolist() == [4, 3]  # removes round(0.3 * 2) = 1 of the 2 conv groups
    plan = p.plan(sparsity=[0.5, 0.0])
    assert plan.kept[0].tolist() in ([0, 1, 2, 3], [4, 5, 6, 7])
    small = p.apply(plan)
    assert (small[2].in_channels, small[2].out_channels, small[2].groups) == (4, 4, 1)
    with pytest.raises(ValueError, match="whole aligned blocks of 4"):
        p.apply(PrunePlan.from_indices([[0, 1, 4, 5], range(6)]))


@pytest.mark.parametrize("name, n_groups, example", [
    ("resnet18", 12, ("conv1", ["conv1", "layer1.0.conv2", "layer1.1.conv2"])),
    ("mobilenet_v3_small", 27, ("features.0.0", ["features.0.0", "features.1.block.1.fc2"])),
])
def test_torchvision_groups(name, n_groups, example):
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    p = Pruner(model, torch.randn(1, 3, 32, 32))
    assert p.n_groups == n_groups
    assert list(_by_member(p)[example[0]].members) == example[1]
    classifier = "fc" if name == "resnet18" else "classifier.3"
    assert classifier not in _by_member(p)


def test_densenet_concat_followers_and_googlenet_branches():
    dn = torchvision.models.densenet121(num_classes=10).eval()
    g = _by_member(Pruner(dn, torch.randn(1, 3, 32, 32)))
    conv2 = g["features.denseblock1.denselayer1.conv2"]
    # a dense layer's output is normalised by every later layer of its block and by the transition
    assert "features.denseblock1.denselayer6.norm1" in conv2.followers
    assert "features.transition1.norm" in conv2.followers
    gn = torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=False).eval()
    g = _by_member(Pruner(gn, torch.randn(1, 3, 32, 32)))
    assert g["inception3a.branch4.1.conv"].consumers[:1] == ("inception3b.branch1.conv",)


def test_graph_build_is_reusable_by_pruner():
    net = mixed_net()
    graph = DependencyGraph.build(net, torch.randn(1, 3, 16, 16))
    p = Pruner(net, torch.randn(1, 3, 16, 16), graph=graph)
    assert p.graph is graph and np.array_equal(p.num_channels, graph.num_channels)


def test_the_trace_records_geometry_and_the_pruner_checks_the_analytic_costs_against_it(monkeypatch):
    from pruning_env.costs import count_costs
    from pruning_env.costs.analytic import CostTerms
    net, x = mixed_net(), torch.randn(1, 3, 16, 16)
    graph = DependencyGraph.build(net, x)
    # the layer calls' formulas at the layers' own widths are the hook counter's count of the same model
    assert CostTerms.layer_by_layer_macs(graph) == count_costs(net, (3, 16, 16)).macs
    monkeypatch.setattr(CostTerms, "layer_by_layer_macs", staticmethod(lambda g: -1))
    with pytest.raises(UnsupportedModelError, match="differ from the layer-by-layer count -1"):
        Pruner(net, x, graph=graph)
