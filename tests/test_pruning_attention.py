"""Attention heads as prunable groups: nn.MultiheadAttention and torchvision's Swin (V1, V2), ViT and MaxViT, tiny.

Whole heads go (q/k/v rows and output-projection columns), the pruned model equals the source with the removed
heads zeroed, the counter equals the analytic plan cost and ``FlopCounterMode``, other batch sizes work.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

from pruning_env.costs import count_costs
from pruning_env.pruning import Pruner, UnsupportedModelError, attention_handler, zeroed_copy
from tiny import (check_built, flop_counter_macs, head_groups, hooked_group_costs, n_heads, random_plan, randomise,
                  tiny_maxvit, tiny_swin, tiny_vit)


class MHABlock(nn.Module):
    """Linear embedding, a self-attention residual block (batch first or sequence first) and a mean-pooled head."""

    def __init__(self, batch_first: bool, d: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, d, 4, stride=4)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        t = self.embed(x).flatten(2).permute(0, 2, 1)  # (N, L, d)
        if not self.batch_first:
            t = t.transpose(0, 1)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1 if self.batch_first else 0))


MODELS = {
    "mha_batch_first": (lambda: MHABlock(True), 16),
    "maxvit": (tiny_maxvit, 32),
    "mha_seq_first": (lambda: MHABlock(False), 16),
    "swin": (tiny_swin, 32),
    "swin_v2": (lambda: tiny_swin(v2=True), 32),
    "vit": (tiny_vit, 32),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_heads_prune_to_the_zeroed_original(name):
    build, size = MODELS[name]
    torch.manual_seed(0)
    model = randomise(build())
    x = torch.randn(3, 3, size, size)
    pruner = Pruner(model, x[:1])
    heads = head_groups(pruner)
    assert heads, pruner.group_names
    modules = dict(model.named_modules())
    assert [g.num_channels for g in heads] == [n_heads(modules[g.members[0]]) for g in heads]
    pruner.compute_importance(criterion="l1")
    for seed in range(3):
        plan = pruner.plan(sparsity=0.5) if seed == 0 else random_plan(pruner, seed, 0.9)
        new = check_built(model, pruner, x, plan)  # shapes, analytic == counted costs, child and re-trace
        new_modules = dict(new.named_modules())
        with torch.no_grad():
            ref = zeroed_copy(model, pruner, plan)(x)
            assert torch.allclose(new(x), ref, atol=1e-5, rtol=1e-4), (new(x) - ref).abs().max()
            assert new(x[:2]).shape == (2, *ref.shape[1:])  # another batch size
        for g in heads:
            kept = len(plan.kept[pruner.groups.index(g)])
            attn = new_modules[g.members[0]]
            assert n_heads(attn) == kept  # the number of heads shrinks; the head dim stays
            assert attention_handler(attn).heads(attn)[1] == attention_handler(modules[g.members[0]]).heads(
                modules[g.members[0]])[1]
        size_ = tuple(x.shape[1:])
        assert count_costs(new, size_).macs == pruner.plan_cost(plan).macs
        assert count_costs(new, size_, include_norm=False).macs == flop_counter_macs(new, x[:1])
    assert any(len(plan.kept[pruner.groups.index(g)]) < g.num_channels for g in heads)
    np.testing.assert_array_equal(np.stack(pruner.group_costs()),
                                  np.stack(hooked_group_costs(model, pruner, tuple(x.shape[1:]))))


@pytest.mark.parametrize("name", ["swin", "vit", "mha_seq_first", "maxvit"])
def test_the_counter_sees_the_attention_products(name):
    build, size = MODELS[name]
    model = build().eval()
    x = torch.randn(1, 3, size, size)
    assert count_costs(model, tuple(x.shape[1:]), include_norm=False).macs == flop_counter_macs(model, x)


def test_head_scores_sum_their_rows_and_filter_scope_works():
    torch.manual_seed(0)
    model = randomise(MHABlock(True))
    pruner = Pruner(model, torch.randn(1, 3, 16, 16))
    gi = pruner.group_names.index("attn")
    scores = pruner.compute_importance(criterion="l1")[gi]
    w = model.attn.in_proj_weight.detach().abs().view(3, 3, 4, -1).sum((0, 2, 3))
    b = model.attn.in_proj_bias.detach().abs().view(3, 3, 4).sum((0, 2))
    cols = model.attn.out_proj.weight.detach().abs().view(-1, 3, 4).sum((0, 2))
    np.testing.assert_allclose(scores, (w + b + cols).double().numpy(), rtol=1e-6)
    filt = pruner.compute_importance(criterion="variance")[gi]
    assert filt.shape == (3,) and np.all(filt > 0)


class CrossBlock(MHABlock):
    """Attention whose keys and values are another tensor than its queries, then an MLP on its output."""

    def __init__(self) -> None:
        super().__init__(True)
        self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 4)

    def forward(self, x):
        t = self.embed(x).flatten(2).permute(0, 2, 1)
        t = self.attn(t, 0.5 * t, 0.5 * t, need_weights=False)[0]
        return self.fc2(torch.relu(self.fc1(t))).mean(1)


def test_ignored_or_cross_attention_stays_opaque():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    assert Pruner(CrossBlock().eval(), x).group_names == ["fc1"]  # cross-attention: opaque (heads kept)
    model = randomise(CrossBlock())
    model.forward = lambda x: MHABlock.forward(model, x)  # self-attention: heads prunable unless ignored
    assert "attn" in Pruner(model, x).group_names
    with pytest.raises(UnsupportedModelError, match="no prunable channel group"):
        Pruner(model, x, ignore=["attn"])
    pruner = Pruner(CrossBlock().eval(), x)
    assert pruner.plan_cost(keep=pruner.num_channels).macs == count_costs(pruner.model, (3, 16, 16)).macs


def test_head_pruned_mha_matches_the_zeroed_module_with_masks_and_weights():
    torch.manual_seed(0)
    model = randomise(MHABlock(True))
    pruner = Pruner(model, torch.randn(1, 3, 16, 16))
    pruner.compute_importance(criterion="l1")
    keep = np.where(np.array(pruner.group_names) == "attn", 2, pruner.num_channels)
    plan = pruner.plan(keep=keep)
    heads = plan.kept[pruner.group_names.index("attn")]
    new, ref = pruner.apply(plan).attn, zeroed_copy(model, pruner, plan).attn
    assert type(new).__name__ == "HeadPrunedMultiheadAttention" and new.num_heads == 2
    q = torch.randn(2, 5, 12)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    with torch.no_grad():
        for kwargs in ({}, {"attn_mask": mask}, {"key_padding_mask": pad}, {"attn_mask": mask.float() * -1e4}):
            out, w = new(q, q, q, average_attn_weights=False, **kwargs)
            ref_out, ref_w = ref(q, q, q, average_attn_weights=False, **kwargs)
            assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(w, ref_w[:, heads], atol=1e-6)
            assert torch.allclose(new(q, q, q, need_weights=False, **kwargs)[0], ref_out, atol=1e-6)
        assert new(q[0], q[0], q[0])[0].shape == (5, 12)  # unbatched
