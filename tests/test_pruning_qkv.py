"""Fused-qkv attention (timm's ``Attention``: one linear layer producing q, k and v, reshaped into heads) is pruned
by whole heads, as ``nn.MultiheadAttention``: pruned == zeroed, the hook counter == the analytic plan cost ==
FlopCounterMode, the head dim kept. Variants that mix heads (a gate, a norm over all heads) stay opaque. timm's
``Attention`` is copied in tests/tiny.py, registered through the extension point (``FUSED_QKV_ATTENTION``); the
blocks around it are built here; the last test runs timm's own ViT and is skipped without timm."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_env.costs import count_costs
from pruning_env.pruning import Pruner, attention_handler, zeroed_copy
from tiny import Attention, check_built, flop_counter_macs, head_groups, n_heads, random_plan


class Block(nn.Module):
    def __init__(self, dim, **kw):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, **kw)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, dim=24, depth=2, **kw):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(*[Block(dim, **kw) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


def _net(**kw):
    torch.manual_seed(0)
    model = TinyViT(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # no unit gains / zero biases, so a misplaced row shows
    return model


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"head_dim": 5, "qkv_bias": False}],
                         ids=["plain", "qk_norm", "head_dim_not_dim_over_heads"])
def test_fused_qkv_heads_prune_to_the_zeroed_original(kw):
    model = _net(**kw)
    x = torch.randn(3, 3, 16, 16)
    pruner = Pruner(model, x[:1])
    heads = head_groups(pruner)
    assert [g.members[0] for g in heads] == ["blocks.0.attn", "blocks.1.attn"]
    assert [g.num_channels for g in heads] == [4, 4]
    pruner.compute_importance(criterion="l1")
    head_dim = model.blocks[0].attn.head_dim
    for seed in range(3):
        plan = pruner.plan(sparsity=0.5) if seed == 0 else random_plan(pruner, seed, 0.9)
        new = check_built(model, pruner, x, plan)  # shapes, analytic == counted costs, child and re-trace
        with torch.no_grad():
            ref = zeroed_copy(model, pruner, plan)(x)
            assert torch.allclose(new(x), ref, atol=1e-5, rtol=1e-4), (new(x) - ref).abs().max()
        for g in heads:
            kept = len(plan.kept[pruner.groups.index(g)])
            attn = new.get_submodule(g.members[0])
            assert type(attn) is Attention and n_heads(attn) == kept and attn.head_dim == head_dim
            assert attn.attn_dim == kept * head_dim and attn.qkv.out_features == 3 * kept * head_dim
            assert attn.proj.in_features == kept * head_dim
        size = tuple(x.shape[1:])
        assert count_costs(new, size).macs == pruner.plan_cost(plan).macs
        assert count_costs(new, size, include_norm=False).macs == flop_counter_macs(new, x[:1])
    assert any(len(plan.kept[pruner.groups.index(g)]) < g.num_channels for g in heads)


def test_the_counter_sees_the_fused_qkv_products():
    model = _net()
    x = torch.randn(1, 3, 16, 16)
    assert count_costs(model, (3, 16, 16), include_norm=False).macs == flop_counter_macs(model, x)


@pytest.mark.parametrize("kw", [{"gated": True}, {"scale_norm": True}], ids=["gated", "scale_norm"])
def test_variants_that_mix_heads_stay_opaque(kw):
    model = _net(**kw)
    x = torch.randn(2, 3, 16, 16)
    pruner = Pruner(model, x[:1])
    assert not head_groups(pruner)
    assert attention_handler(model.blocks[0].attn) is not None  # known type, this call not supported
    pruner.compute_importance(criterion="l1")
    plan = pruner.plan(sparsity=0.5)
    new = check_built(model, pruner, x, plan)
    with torch.no_grad():
        assert torch.allclose(new(x), zeroed_copy(model, pruner, plan)(x), atol=1e-5, rtol=1e-4)
    assert count_costs(new, (3, 16, 16)).macs == pruner.plan_cost(plan).macs


def test_timm_vit_heads_prune_to_the_zeroed_original():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4,
                                          num_classes=7).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    for prune_normalized in (False, True):
        pruner = Pruner(model, x[:1], prune_normalized=prune_normalized)
        heads = head_groups(pruner)
        assert len(heads) == 2 and all(g.num_channels == 4 for g in heads)
        pruner.compute_importance(criterion="l1")
        plan = pruner.plan(sparsity=0.5)
        new = pruner.apply(plan)
        with torch.no_grad():
            ref = zeroed_copy(model, pruner, plan)(x)
            np.testing.assert_allclose(new(x).numpy(), ref.numpy(), atol=1e-5, rtol=1e-4)
        assert count_costs(new, (3, 32, 32)).macs == pruner.plan_cost(plan).macs
        assert count_costs(new, (3, 32, 32), include_norm=False).macs == flop_counter_macs(new, x[:1])


@pytest.mark.parametrize("cls_name", ["Attention2d", "AttentionCl", "ClassAttn"])
def test_timm_attention_variants_by_name_are_opaque(cls_name):
    """timm's ``Attention2d`` (CoAtNet), ``AttentionCl`` (MaxViT-rw) and CaiT's ``ClassAttn`` reshape q/k/v heads out
    of the channels in ways no group follows: kept whole (opaque) instead of refusing the model; a block named
    ``PartitionAttentionCl`` that merely contains one is still traced (its MLP width pruned)."""

    def forward(self, x):  # [B, C, H, W]: heads carved out of the channels by a view
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, 3, 2, c // 2, h * w).unbind(1)
        attn = (q.transpose(-2, -1) @ k).softmax(-1)
        return self.proj((v @ attn.transpose(-2, -1)).reshape(b, c, h, w))

    def init(self, dim):
        nn.Module.__init__(self)
        self.qkv, self.proj = nn.Conv2d(dim, 3 * dim, 1), nn.Conv2d(dim, dim, 1)

    attn_cls = type(cls_name, (nn.Module,), {"__init__": init, "forward": forward})

    class PartitionAttentionCl(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.attn = attn_cls(dim)
            self.fc1, self.fc2 = nn.Conv2d(dim, 2 * dim, 1), nn.Conv2d(2 * dim, dim, 1)

        def forward(self, x):
            x = x + self.attn(x)
            return x + self.fc2(F.gelu(self.fc1(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.block = PartitionAttentionCl(8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.block(self.stem(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    pruner = Pruner(model, x[:1])
    assert pruner.group_names == ["block.fc1"]
    pruner.compute_importance(criterion="l1")
    plan = pruner.plan(sparsity=0.5)
    new = pruner.apply(plan)
    with torch.no_grad():
        assert torch.allclose(new(x), zeroed_copy(model, pruner, plan)(x), atol=1e-5)
    assert count_costs(new, (3, 6, 6)) == pruner.plan_cost(plan)
