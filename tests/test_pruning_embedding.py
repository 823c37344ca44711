"""The embedding width as one group (``prune_normalized=True``): tiny torchvision ViT, Swin (V1, V2), ConvNeXt and
MaxViT.

The channels LayerNorms normalise join their residual stream's group; the pruned model equals the zeroed source whose
LayerNorms take their statistics over the kept channels, the counter equals the analytic plan cost, and without the
option those channels stay whole.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from pruning_env.costs import count_costs
from pruning_env.envs import PruneEnvConfig
from pruning_env.pruning import Pruner, UnsupportedModelError, zeroed_copy
from tiny import check_built, hooked_group_costs, random_plan, randomise, tiny_maxvit, tiny_swin, tiny_vit


def tiny_convnext() -> nn.Module:
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=3)


MODELS = {"vit": tiny_vit, "swin": tiny_swin, "swin_v2": lambda: tiny_swin(v2=True), "convnext": tiny_convnext,
          "maxvit": tiny_maxvit}
# per model: the embedding group's first member, and the LayerNorms that must follow it
EMBEDDING = {
    "vit": ("conv_proj", {"encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_1.ln_2",
                          "encoder.ln", "class_token", "encoder.pos_embedding"}),
    "swin": ("features.0.0", {"features.0.2", "features.1.0.norm1", "features.1.0.norm2", "features.2.norm"}),
    "swin_v2": ("features.0.0", {"features.0.2", "features.1.0.norm1", "features.1.0.norm2"}),  # post-norm
    "convnext": ("features.0.0", {"features.0.1", "features.1.0.block.2", "features.2.0", "features.1.0.layer_scale"}),
    # MaxViT: the stage's stream (MBConv shortcut and output, attention merge, MLP output) through both partitions
    "maxvit": ("blocks.0.layers.0.layers.MBconv.proj.1", {f"blocks.0.layers.0.layers.{p}_attention.{n}_layer.0"
                                                          for p in ("window", "grid") for n in ("attn", "mlp")}),
}


def layer_norms(pruner):
    return {name for name, spec in pruner.graph.specs.items() if spec.role == "layernorm"}


def embedding_group(pruner, name):
    first, _ = EMBEDDING[name]
    return next(i for i, g in enumerate(pruner.groups) if g.members[0] == first)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_embedding_width_prunes_to_the_kept_statistics_reference(name):
    torch.manual_seed(0)
    model = randomise(MODELS[name]())
    x = torch.randn(3, 3, 32, 32)
    pruner = Pruner(model, x[:1], prune_normalized=True)
    gi = embedding_group(pruner, name)
    group = pruner.groups[gi]
    assert EMBEDDING[name][1] <= set(group.followers), group.followers
    assert group.kind == "residual" and len(group.members) > 1
    pruner.compute_importance(criterion="l1")
    for seed in range(3):
        plan = pruner.plan(sparsity=0.5) if seed == 0 else random_plan(pruner, seed, 0.9)
        kept = len(plan.kept[gi])
        assert kept < group.num_channels
        new = check_built(model, pruner, x, plan)  # shapes, analytic == counted costs, child and re-trace
        reference = zeroed_copy(model, pruner, plan)
        with torch.no_grad():
            out, ref = new(x), reference(x)
            assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), (out - ref).abs().max()
            # the statistics matter: the zeroed copy with full-width LayerNorms is another function
            assert not torch.allclose(out, reference.model(x), atol=1e-3)
            assert new(x[:2]).shape == (2, *ref.shape[1:])  # another batch size
        new_modules = dict(new.named_modules())
        for ln in layer_norms(pruner) & set(group.followers):  # Swin's patch merging norms 4 copies of it
            width = sum(len(plan.kept[s.source]) if s.source is not None else s.channels
                        for s in pruner.graph.specs[ln].out_layout)
            assert new_modules[ln].normalized_shape == (width,) and new_modules[ln].weight.shape == (width,)
        for pname in pruner.graph.params:
            spec = pruner.graph.params[pname]
            assert new.get_parameter(pname).shape[spec.dim] == len(plan.kept[spec.layout[0].source])
        assert count_costs(new, (3, 32, 32)).macs == pruner.plan_cost(plan).macs
    np.testing.assert_array_equal(np.stack(pruner.group_costs()),
                                  np.stack(hooked_group_costs(model, pruner, (3, 32, 32))))
    # at 50 % uniform sparsity the embedding width roughly halves the MACs left by the hidden widths alone
    off = Pruner(model, x[:1])
    off.compute_importance(criterion="l1")
    assert pruner.plan_cost(sparsity=0.5).macs < 0.7 * off.plan_cost(sparsity=0.5).macs
    assert count_costs(model, (3, 32, 32)).macs == pruner.plan_cost(keep=pruner.num_channels).macs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_without_the_option_normalised_channels_stay(name):
    torch.manual_seed(0)
    model = randomise(MODELS[name]())
    pruner = Pruner(model, torch.randn(1, 3, 32, 32))
    assert not layer_norms(pruner) and not pruner.graph.params
    assert all(g.members[0] != EMBEDDING[name][0] for g in pruner.groups)
    with_option = Pruner(model, torch.randn(1, 3, 32, 32), prune_normalized=True)
    assert set(pruner.group_names) < set(with_option.group_names)


def test_vit_embedding_parameters_and_width_attribute_shrink():
    torch.manual_seed(0)
    model = randomise(tiny_vit())
    pruner = Pruner(model, torch.randn(1, 3, 32, 32), prune_normalized=True)
    assert set(pruner.graph.params) == {"class_token", "encoder.pos_embedding"}
    pruner.compute_importance(criterion="l1")
    new = pruner.apply(pruner.plan(sparsity=0.5))
    assert new.hidden_dim == 16 and model.hidden_dim == 32
    assert new.class_token.shape == (1, 1, 16) and new.encoder.pos_embedding.shape == (1, 17, 16)
    assert new.encoder.layers[0].self_attention.embed_dim == 16 and new.heads.head.in_features == 16


class FunctionalNorm(nn.Module):
    """A residual stream normalised by ``F.layer_norm`` outside an ``nn.LayerNorm`` and by a LayerNorm over two
    dims: both keep their channels (the pruned call would still pass the full shape)."""

    def __init__(self, two_dims: bool) -> None:
        super().__init__()
        self.two_dims = two_dims
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm([64, 8])
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)  # (N, 64 tokens, 8 channels)
        t = self.norm(t) if self.two_dims else F.layer_norm(t, (8,))
        t = t + self.fc2(torch.relu(self.fc1(t)))
        return self.head(t.mean(1))


@pytest.mark.parametrize("two_dims", [False, True])
def test_other_layer_norms_keep_their_channels(two_dims):
    pruner = Pruner(FunctionalNorm(two_dims).eval(), torch.randn(1, 3, 32, 32), prune_normalized=True)
    assert pruner.group_names == ["fc1"]


class TwoWayScale(nn.Module):
    """One learned tensor added to the channels along two different dims: it cannot follow one group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.scale = nn.Parameter(torch.ones(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.stem(x).flatten(2)[:, :, :8]  # (N, 8 channels, 8 tokens)
        a = t + self.scale  # channels along the scale's dim 0
        b = t.transpose(1, 2) + self.scale  # and along its dim 1
        return self.head(a.mean(2) + b.mean(1))


def test_a_parameter_on_channels_along_two_dims_is_refused():
    model = TwoWayScale().eval()
    with pytest.raises(UnsupportedModelError, match="no prunable"):  # without the option it freezes them
        Pruner(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(UnsupportedModelError, match="'scale'"):
        Pruner(model, torch.randn(1, 3, 32, 32), prune_normalized=True)


def test_env_config_validates_the_option():
    assert PruneEnvConfig(prune_normalized=True).prune_normalized
    with pytest.raises(TypeError, match="prune_normalized"):
        PruneEnvConfig(prune_normalized="yes")


def test_maxvit_attention_reads_the_pruned_stream_and_loses_heads():
    torch.manual_seed(0)
    model = randomise(tiny_maxvit())
    pruner = Pruner(model, torch.randn(1, 3, 32, 32), prune_normalized=True)
    stream = pruner.groups[embedding_group(pruner, "maxvit")]
    attn_name = "blocks.0.layers.0.layers.window_attention.attn_layer.1"
    assert f"{attn_name}.merge" in stream.members and attn_name in pruner.group_names
    pruner.compute_importance(criterion="l1")
    new = pruner.apply(pruner.plan(sparsity=0.5))
    attn, source = new.get_submodule(attn_name), model.get_submodule(attn_name)
    assert type(attn).__name__ == "HeadPrunedRelativePositionalMultiHeadAttention"
    assert (attn.n_heads, attn.head_dim) == (1, 8) and source.n_heads == 2
    assert attn.to_qkv.in_features == attn.merge.out_features == 8
    assert attn.relative_position_bias_table.shape == (9, 1)
    assert attn.scale_factor == source.scale_factor  # torchvision scales by the source width, kept
