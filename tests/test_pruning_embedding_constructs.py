"""``prune_normalized=True`` joins timm's embedding-width constructs to the normalised width group: ``LayerNorm2d``
(a LayerNorm subclass between permutes), a layer scale as ``gamma.reshape(1, -1, 1, 1)`` (ConvNeXt) and as a
``LayerScale`` module (``x * gamma``, ViT), the class token (``expand`` + ``cat``) and the position embedding. Pruned ==
the zeroed source with LayerNorm statistics over the kept channels; analytic costs == counted. Tiny modules built
here, written as timm writes them."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_env.costs import count_costs
from pruning_env.pruning import Pruner, zeroed_copy
from tiny import Attention, random_plan


class LayerNorm2d(nn.LayerNorm):
    """timm.layers.LayerNorm2d."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXtBlock with ``conv_mlp=True`` (LayerNorm2d, 1x1 convs) and a layer scale ``gamma``."""

    def __init__(self, dim):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.fc1, self.fc2 = nn.Conv2d(dim, 3 * dim, 1), nn.Conv2d(3 * dim, dim, 1)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(self.norm(self.conv_dw(x)))))
        return x + y.mul(self.gamma.reshape(1, -1, 1, 1))


class TinyConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), LayerNorm2d(8))
        self.stage1 = nn.Sequential(ConvNeXtBlock(8), ConvNeXtBlock(8))
        self.down = nn.Sequential(LayerNorm2d(8), nn.Conv2d(8, 12, 2, stride=2))
        self.stage2 = ConvNeXtBlock(12)
        self.head_norm = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(self.head_norm(x.mean((2, 3))))


class LayerScale(nn.Module):
    """timm.layers.LayerScale."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * self.gamma


class ViTBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=2)
        self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class TinyTimmViT(nn.Module):
    """timm's VisionTransformer layout: class token concatenated, position embedding added, LayerScale, final norm,
    class-token pooling."""

    def __init__(self, dim=16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim))
        self.blocks = nn.Sequential(ViTBlock(dim), ViTBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x + self.pos_embed)
        return self.head(self.norm(x)[:, 0])


def _net(cls):
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("cls, size, params", [
    (TinyConvNeXt, 16, {"stage1.0.gamma", "stage1.1.gamma", "stage2.gamma"}),
    (TinyTimmViT, 16, {"cls_token", "pos_embed", "blocks.0.ls1.gamma", "blocks.1.ls2.gamma"}),
], ids=["convnext", "vit"])
def test_embedding_width_joins_timm_constructs(cls, size, params):
    model = _net(cls)
    x = torch.randn(2, 3, size, size)
    plain = Pruner(model, x[:1])
    pruner = Pruner(model, x[:1], prune_normalized=True)
    assert pruner.n_groups > plain.n_groups
    assert params <= set(pruner.graph.params), sorted(pruner.graph.params)
    pruner.compute_importance(criterion="l1")
    full = count_costs(model, (3, size, size)).macs
    for seed in range(3):
        plan = pruner.plan(sparsity=0.5) if seed == 0 else random_plan(pruner, seed, 0.8)
        new = pruner.apply(plan)
        with torch.no_grad():
            got, ref = new(x), zeroed_copy(model, pruner, plan)(x)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (got - ref).abs().max()
        assert count_costs(new, (3, size, size)) == pruner.plan_cost(plan)
        for name in params:
            gi = pruner.graph.params[name].layout[0].source
            assert new.get_parameter(name).shape[pruner.graph.params[name].dim] == len(plan.kept[gi])
    plan = pruner.plan(sparsity=0.5)
    plain.compute_importance(criterion="l1")
    assert pruner.plan_cost(plan).macs < plain.plan_cost(plain.plan(sparsity=0.5)).macs < full


def test_layer_scale_viewed_to_a_stored_shape_keeps_its_channels():
    """timm metaformer's ``Scale``: ``x * self.scale.view(self.shape)`` with the width stored in ``self.shape`` would
    not fit a pruned ``scale``, so the channels it scales stay (no crash at the pruned model's forward)."""

    class Scale(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.shape = (dim, 1, 1)
            self.scale = nn.Parameter(torch.rand(dim) + 0.5)

        def forward(self, x):
            return x * self.scale.view(self.shape)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.GroupNorm(1, 8)
            self.ls = Scale(8)
            self.mid = nn.Conv2d(8, 6, 3, padding=1)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.ls(self.norm(x))
            return self.fc(F.relu(self.mid(x)).mean((2, 3)))

    model = _net(Net)
    x = torch.randn(2, 3, 8, 8)
    pruner = Pruner(model, x[:1], prune_normalized=True)
    assert pruner.group_names == ["mid"]
    pruner.compute_importance(criterion="l1")
    plan = pruner.plan(sparsity=0.5)
    new = pruner.apply(plan)
    with torch.no_grad():
        assert torch.allclose(new(x), zeroed_copy(model, pruner, plan)(x), atol=1e-5)


class WindowBlock(nn.Module):
    """timm Swin's block layout: channel-last map padded to whole windows, partitioned into the batch dim
    (``[B, h, w, wh, ww, C] -> [B * h * w, wh, ww, C]``), a per-window layer, windows merged back, cropped."""

    def __init__(self, dim, window=4):
        super().__init__()
        self.window = window
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):  # x: [B, H, W, C]
        b, h, w, c = x.shape
        s = self.window
        y = F.pad(self.norm(x), (0, 0, 0, (-w) % s, 0, (-h) % s))
        ph, pw = y.shape[1], y.shape[2]
        y = y.view(b, ph // s, s, pw // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
        y = self.mix(y)
        y = y.view(b, ph // s, pw // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
        x = x + y[:, :h, :w, :]
        return x + self.fc2(F.gelu(self.fc1(x)))


def test_window_partition_into_the_batch_dim_and_padding_are_traced():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 2, stride=2)
            self.block = WindowBlock(8)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            return self.head(self.block(self.embed(x).permute(0, 2, 3, 1)).mean((1, 2)))

    model = _net(Net)
    x = torch.randn(2, 3, 12, 12)  # 6x6 maps: padded to 8x8, four 4x4 windows
    for prune_normalized, groups in ((False, {"block.fc1"}), (True, {"block.fc1", "embed"})):
        pruner = Pruner(model, x[:1], prune_normalized=prune_normalized)
        assert groups <= {n.split(" ")[0] for n in pruner.group_names}, pruner.group_names
        pruner.compute_importance(criterion="l1")
        plan = pruner.plan(sparsity=0.5)
        new = pruner.apply(plan)
        with torch.no_grad():
            got, ref = new(x), zeroed_copy(model, pruner, plan)(x)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (got - ref).abs().max()
        assert count_costs(new, (3, 12, 12)) == pruner.plan_cost(plan)
