"""Analytic MACs of the AgentViT SimpleViT at a given number of kept tokens (and of the agent's state pass).

The hook counter cannot see this model's attention matmuls (its ``Attention`` is a custom module whose QK^T and
AV are functional), so the ViT is counted analytically, composed from the counter's formulas
(:mod:`pruning_env.costs.counting`: one per layer kind, one convention); the tests check these counts against
``torch.utils.flop_counter.FlopCounterMode``. SimpleViT has LayerNorms only, which the convention counts 0, so
the count is the same with or without the BatchNorm term. Spec: agentvit.md §1.1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from pruning_env.costs.counting import linear_term, matmul_term

if TYPE_CHECKING:  # the zoo imports nothing from here; keep it that way at run time
    from pruning_env.models.vit import SimpleViT

__all__ = ["vit_macs", "state_macs", "vit_gflops"]


def _attention_macs(model: "SimpleViT", n: int) -> int:
    """One attention sub-layer on ``n`` tokens: the qkv projection, QK^T and AV, the output projection."""
    inner = model.heads * model.dim_head
    return (linear_term(n, model.dim, 3 * inner).macs + matmul_term(n, n, inner).macs
            + linear_term(n, inner, model.dim).macs)


def _block_macs(model: "SimpleViT", n: int) -> int:
    mlp = linear_term(n, model.dim, model.mlp_dim).macs + linear_term(n, model.mlp_dim, model.dim).macs
    return _attention_macs(model, n) + mlp


def vit_macs(model: "SimpleViT", n_tokens: Optional[int] = None) -> int:
    """Analytic multiply-accumulates of one image's forward pass when ``n_tokens`` tokens are kept.

    Counts every matmul (patch embedding on all patches, since selection follows it; q/k/v, QK^T, AV and
    output projections; MLP; head), as ``FlopCounterMode`` does (its FLOPs = 2 x these MACs); LayerNorm,
    softmax, GELU and pooling count 0 (the convention of :mod:`pruning_env.costs.counting`). At width 1,
    depth 6: 302.4 M MACs for 64 tokens (spec §1.1).

    :param model: a :class:`~pruning_env.models.vit.SimpleViT`.
    :param n_tokens: kept tokens, 1..num_patches (None: all).
    """
    n = model.num_patches if n_tokens is None else int(n_tokens)
    if not 1 <= n <= model.num_patches:
        raise ValueError(f"n_tokens must be in 1..{model.num_patches}, got {n_tokens}")
    embed = linear_term(model.num_patches, model.patch_dim, model.dim).macs
    head = linear_term(1, model.dim, model.num_classes).macs
    return embed + model.depth * _block_macs(model, n) + head


def state_macs(model: "SimpleViT") -> int:
    """Analytic MACs per image of the agent's state pass (embedding + block-1 attention on all patches).

    :param model: a :class:`~pruning_env.models.vit.SimpleViT`.
    """
    n = model.num_patches
    return linear_term(n, model.patch_dim, model.dim).macs + _attention_macs(model, n)


def vit_gflops(model: "SimpleViT", n_tokens: Optional[int] = None) -> float:
    """GFLOPs (2 x MACs / 1e9) per image at ``n_tokens`` kept tokens; see :func:`vit_macs`.

    :param model: a :class:`~pruning_env.models.vit.SimpleViT`.
    :param n_tokens: kept tokens, 1..num_patches (None: all).
    """
    return 2.0 * vit_macs(model, n_tokens) / 1e9
