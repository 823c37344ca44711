"""Attention heads as prunable channels: which attention modules the engine understands, their head layout,
their surgery handlers and the forward passes of head-pruned copies.

A head group's channels are heads; each head owns ``head_dim`` rows of q, k and v and ``head_dim`` input columns of
the output projection, so heads are removed whole and the head dim stays. Supported: ``nn.MultiheadAttention``
(self-attention, packed q/k/v, no ``add_bias_kv``), torchvision's Swin ``ShiftedWindowAttention`` /
``ShiftedWindowAttentionV2``, MaxViT's ``RelativePositionalMultiHeadAttention`` and fused-qkv attention (timm's
``Attention``: one linear layer producing q, k and v, reshaped into heads); any other attention module stays opaque
(see ``graph.is_opaque``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from pruning_env.costs.counting import is_fused_qkv_attention
from pruning_env.pruning.surgery import HANDLERS, Index, LayerHandler

__all__ = ["AttentionHandler", "MultiheadAttentionHandler", "WindowAttentionHandler",
           "RelativePositionalAttentionHandler", "FusedQkvAttentionHandler", "attention_handler", "HeadPrunedMultiheadAttention",
           "HeadPrunedShiftedWindowAttention", "HeadPrunedShiftedWindowAttentionV2",
           "HeadPrunedRelativePositionalMultiHeadAttention"]


# --------------------------------------------------------------------------------------------------------------
# Forward passes with an explicit head dim (the stock ones derive it from the embedding width)
# --------------------------------------------------------------------------------------------------------------
class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose heads were pruned: ``num_heads * head_dim`` may differ from ``embed_dim``.

    Same arguments and results as the stock module (``attn_mask`` 2-d or ``(N * num_heads, L, S)``,
    ``key_padding_mask``, ``need_weights``, ``average_attn_weights``, ``is_causal``).
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n_q, batch, _ = query.shape
        n_k = key.shape[0]
        heads, dim = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)

        def split(t: torch.Tensor, n: int) -> torch.Tensor:  # (n, N, H * d) -> (N, H, n, d)
            return t.reshape(n, batch, heads, dim).permute(1, 2, 0, 3)

        q = split(F.linear(query, w_q, b_q), n_q)
        k = split(F.linear(key, w_k, b_k), n_k)
        v = split(F.linear(value, w_v, b_v), n_k)
        mask = None
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal needs attn_mask, as in nn.MultiheadAttention")
        if attn_mask is not None:
            mask = attn_mask if attn_mask.is_floating_point() else torch.zeros_like(
                attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
            mask = mask.view(batch, heads, n_q, n_k) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            pad = key_padding_mask if key_padding_mask.is_floating_point() else torch.zeros_like(
                key_padding_mask, dtype=q.dtype).masked_fill(key_padding_mask, float("-inf"))
            pad = pad.view(batch, 1, 1, n_k)
            mask = pad if mask is None else mask + pad
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * dim ** -0.5) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, p, self.training) @ v
            weights = weights.mean(1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = F.linear(out.permute(2, 0, 1, 3).reshape(n_q, batch, heads * dim), self.out_proj.weight,
                       self.out_proj.bias)
        if not batched:
            return out.squeeze(1), weights
        return (out.transpose(0, 1) if self.batch_first else out), weights


def _window_attention(module: ShiftedWindowAttention, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` with the head dim read from the q/k/v rows, not the input width."""
    window, shift = module.window_size, list(module.shift_size)
    heads = module.num_heads
    dim = module.qkv.out_features // 3 // heads
    n, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, (window[1] - w % window[1]) % window[1], 0, (window[0] - h % window[0]) % window[0]))
    _, ph, pw, _ = x.shape
    shift = [0 if window[i] >= size else s for i, (s, size) in enumerate(zip(shift, (ph, pw)))]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = (ph // window[0]) * (pw // window[1])
    tokens = window[0] * window[1]
    x = x.view(n, ph // window[0], window[0], pw // window[1], window[1], c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(n * windows, tokens, c)
    qkv_bias = module.qkv.bias
    logit_scale = getattr(module, "logit_scale", None)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        qkv_bias[qkv_bias.numel() // 3:2 * qkv_bias.numel() // 3] = 0
    q, k, v = F.linear(x, module.qkv.weight, qkv_bias).reshape(x.size(0), tokens, 3, heads, dim).permute(2, 0, 3, 1, 4)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * dim ** -0.5) @ k.transpose(-2, -1)
    attn = attn + bias
    if sum(shift) > 0:
        mask = x.new_zeros((ph, pw))
        count = 0
        for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
            for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
                mask[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        mask = mask.view(ph // window[0], window[0], pw // window[1], window[1]).permute(0, 2, 1, 3)
        mask = mask.reshape(windows, tokens)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(n, windows, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=module.attention_dropout, training=module.training)
    x = (attn @ v).transpose(1, 2).reshape(x.size(0), tokens, heads * dim)
    x = F.dropout(F.linear(x, module.proj.weight, module.proj.bias), p=module.dropout, training=module.training)
    c_out = x.shape[-1]
    x = x.view(n, ph // window[0], pw // window[1], window[0], window[1], c_out).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, ph, pw, c_out)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class HeadPrunedShiftedWindowAttention(ShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` whose heads (or embedding width) were pruned."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _window_attention(self, x, self.get_relative_position_bias())


class HeadPrunedShiftedWindowAttentionV2(ShiftedWindowAttentionV2):
    """torchvision's ``ShiftedWindowAttentionV2`` whose heads (or embedding width) were pruned."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _window_attention(self, x, self.get_relative_position_bias())


class HeadPrunedRelativePositionalMultiHeadAttention(RelativePositionalMultiHeadAttention):
    """torchvision MaxViT's ``RelativePositionalMultiHeadAttention`` whose heads (or embedding width) were pruned:
    the attention output has ``n_heads * head_dim`` features, read from the q/k/v rows; ``scale_factor`` keeps the
    source's value (torchvision scales by the source's embedding width, not the head dim)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, _ = x.shape
        heads = self.n_heads
        dim = self.to_qkv.out_features // 3 // heads
        q, k, v = self.to_qkv(x).reshape(b, g, p, 3, heads, dim).permute(3, 0, 1, 4, 2, 5)
        attn = F.softmax(q @ (k * self.scale_factor).transpose(-2, -1) + self.get_relative_positional_bias(), dim=-1)
        return self.merge((attn @ v).permute(0, 1, 3, 2, 4).reshape(b, g, p, heads * dim))


# --------------------------------------------------------------------------------------------------------------
# Handlers: what the tracer, the surgery, the importance and the costs need to know per attention type
# --------------------------------------------------------------------------------------------------------------
class AttentionHandler(LayerHandler):
    """An attention module whose heads form one group. Its spec's ``out_layout`` is the q (= k = v) features,
    ``(Segment(group, num_heads, head_dim),)``; ``out_idx`` holds the kept head features, ``in_idx`` the kept
    input features of its own projection weights (if any)."""

    def pruned_class(self, module: nn.Module) -> type:
        """The head-pruned subclass a sliced copy of ``module`` becomes."""
        raise NotImplementedError

    def supports(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
        """Whether this call of ``module`` can have its heads pruned (else it is traced as opaque)."""
        raise NotImplementedError

    def heads(self, module: nn.Module) -> Tuple[int, int]:
        """``(num_heads, head_dim)`` of ``module``."""
        raise NotImplementedError

    def inputs(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[torch.Tensor]:
        """The tensors whose features the module reads (query, key, value; or the feature map)."""
        return [args[0] if args else kwargs["x"]]

    def tokens(self, module: nn.Module, x: torch.Tensor) -> Tuple[int, int]:
        """``(queries, keys per query)`` per image of a call on input ``x``."""
        raise NotImplementedError

    def head_tensors(self, module: nn.Module) -> List[Tuple[str, int, int]]:
        """``(name, dim, repeats)`` of the module's own tensors whose ``dim`` holds ``repeats`` blocks of
        ``num_heads`` runs of equal length (one run per head: ``head_dim`` rows of q, one bias column...)."""
        raise NotImplementedError

    def per_head_linears(self, module: nn.Module) -> Tuple[str, ...]:
        """Child linear layers (called as modules) whose output features are one per head."""
        return ()

    def projections(self, module: nn.Module) -> Tuple[Optional[str], str]:
        """Child linear layers computing q/k/v (``None``: the module's own ``head_tensors`` do) and the output."""
        raise NotImplementedError

    def out_tensors(self, module: nn.Module) -> List[Tuple[str, int]]:
        return [(name, dim) for name, dim, _ in self.head_tensors(module)]

    def head_index(self, module: nn.Module, name: str, features: torch.Tensor) -> Tuple[int, torch.Tensor]:
        """``(dim, indices)`` along which head tensor ``name`` holds the q features ``features`` (sorted indices
        into ``num_heads * head_dim``; whole heads)."""
        heads, dim = self.heads(module)
        axis, repeats = next((a, r) for n, a, r in self.head_tensors(module) if n == name)
        run = getattr(module, name).shape[axis] // (repeats * heads)
        idx = features
        if run != dim:  # not head_dim entries per head (e.g. one bias column per head): map the heads
            idx = ((idx[::dim] // dim)[:, None] * run + torch.arange(run, device=idx.device)).reshape(-1)
        return axis, torch.cat([idx + r * heads * run for r in range(repeats)])

    def slice(self, module: nn.Module, out_idx: Index, in_idx: Index) -> Dict[str, torch.Tensor]:
        result: Dict[str, torch.Tensor] = {}
        for name, _, _ in self.head_tensors(module):
            t = getattr(module, name)
            if t is not None and out_idx is not None:
                axis, idx = self.head_index(module, name, out_idx.to(t.device))
                result[name] = t.detach().index_select(axis, idx)
        if in_idx is not None:
            for name, axis in self.in_tensors(module):
                t = result.get(name, getattr(module, name).detach())
                result[name] = t.index_select(axis, in_idx.to(t.device))
        return result

    def set_shape(self, module: nn.Module, n_out: Optional[int], n_in: Optional[int]) -> None:
        heads, dim = self.heads(module)
        if n_out is not None:
            self.set_heads(module, n_out // dim)
        module.__class__ = self.pruned_class(module)

    def set_heads(self, module: nn.Module, heads: int) -> None:
        module.__dict__["num_heads"] = heads


class MultiheadAttentionHandler(AttentionHandler):
    """``nn.MultiheadAttention``: packed ``in_proj_weight`` (q, k, v rows, input columns), ``in_proj_bias``, the
    child ``out_proj``; self-attention only (query, key and value the same tensor)."""

    def pruned_class(self, module: nn.Module) -> type:
        return HeadPrunedMultiheadAttention

    def supports(self, module: nn.MultiheadAttention, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
        qkv = self.inputs(args, kwargs)
        return (module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn
                and all(t is qkv[0] for t in qkv) and qkv[0].dim() == 3)

    def heads(self, module: nn.MultiheadAttention) -> Tuple[int, int]:
        return module.num_heads, module.head_dim

    def inputs(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[torch.Tensor]:
        names = ("query", "key", "value")
        return [args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names)]

    def tokens(self, module: nn.MultiheadAttention, x: torch.Tensor) -> Tuple[int, int]:
        n = x.shape[1 if module.batch_first else 0]
        return n, n

    def head_tensors(self, module: nn.MultiheadAttention) -> List[Tuple[str, int, int]]:
        return [("in_proj_weight", 0, 3), ("in_proj_bias", 0, 3)]

    def in_tensors(self, module: nn.MultiheadAttention) -> List[Tuple[str, int]]:
        return [("in_proj_weight", 1)]

    def projections(self, module: nn.MultiheadAttention) -> Tuple[Optional[str], str]:
        return None, "out_proj"

    def set_shape(self, module: nn.MultiheadAttention, n_out: Optional[int], n_in: Optional[int]) -> None:
        super().set_shape(module, n_out, n_in)
        if n_in is not None:
            module.__dict__.update(embed_dim=n_in, kdim=n_in, vdim=n_in)


class WindowAttentionHandler(AttentionHandler):
    """torchvision's Swin window attention: child ``qkv`` and ``proj`` linears, a relative position bias table
    with a column per head; V2 adds ``logit_scale`` (one per head) and ``cpb_mlp`` (its last layer: a row per
    head)."""

    def supports(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
        return self.inputs(args, kwargs)[0].dim() == 4

    def heads(self, module: ShiftedWindowAttention) -> Tuple[int, int]:
        return module.num_heads, module.qkv.out_features // 3 // module.num_heads

    def tokens(self, module: ShiftedWindowAttention, x: torch.Tensor) -> Tuple[int, int]:
        window = module.window_size
        padded = (-(-x.shape[1] // window[0]) * window[0]) * (-(-x.shape[2] // window[1]) * window[1])
        return padded, window[0] * window[1]

    def head_tensors(self, module: ShiftedWindowAttention) -> List[Tuple[str, int, int]]:
        if isinstance(module, ShiftedWindowAttentionV2):
            return [("logit_scale", 0, 1)]
        return [("relative_position_bias_table", 1, 1)]

    def per_head_linears(self, module: ShiftedWindowAttention) -> Tuple[str, ...]:
        return ("cpb_mlp.2",) if isinstance(module, ShiftedWindowAttentionV2) else ()

    def projections(self, module: ShiftedWindowAttention) -> Tuple[Optional[str], str]:
        return "qkv", "proj"

    def pruned_class(self, module: nn.Module) -> type:
        if isinstance(module, ShiftedWindowAttentionV2):
            return HeadPrunedShiftedWindowAttentionV2
        return HeadPrunedShiftedWindowAttention


class RelativePositionalAttentionHandler(AttentionHandler):
    """torchvision MaxViT's relative attention on ``[B, windows, tokens, C]`` inputs: child ``to_qkv`` and
    ``merge`` linears (called as modules) and a relative position bias table with a column per head."""

    def pruned_class(self, module: nn.Module) -> type:
        return HeadPrunedRelativePositionalMultiHeadAttention

    def supports(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
        return self.inputs(args, kwargs)[0].dim() == 4

    def heads(self, module: RelativePositionalMultiHeadAttention) -> Tuple[int, int]:
        return module.n_heads, module.to_qkv.out_features // 3 // module.n_heads

    def tokens(self, module: RelativePositionalMultiHeadAttention, x: torch.Tensor) -> Tuple[int, int]:
        return x.shape[1] * x.shape[2], x.shape[2]

    def head_tensors(self, module: RelativePositionalMultiHeadAttention) -> List[Tuple[str, int, int]]:
        return [("relative_position_bias_table", 1, 1)]

    def projections(self, module: RelativePositionalMultiHeadAttention) -> Tuple[Optional[str], str]:
        return "to_qkv", "merge"

    def set_heads(self, module: nn.Module, heads: int) -> None:
        module.__dict__["n_heads"] = heads


class FusedQkvAttentionHandler(AttentionHandler):
    """Fused-qkv attention (:data:`pruning_env.costs.counting.FUSED_QKV_ATTENTION`: timm's ``Attention``, used by its
    ViT, DeiT and every model built from its ``Block``): a child ``qkv`` linear layer whose ``3 * num_heads *
    head_dim`` rows are reshaped into q, k and v heads, ``q_norm`` / ``k_norm`` over the head dim, a child ``proj``.
    Its forward reads ``num_heads`` / ``head_dim`` / ``attn_dim`` from the module, so a head-pruned copy keeps its
    class with those attributes updated. Heads are traced only without the options that mix them: a ``norm`` over
    all heads (``scale_norm``) or a ``gate`` linear layer; otherwise the module stays opaque."""

    def pruned_class(self, module: nn.Module) -> type:
        return type(module)

    def supports(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
        x = self.inputs(args, kwargs)[0]
        qkv = getattr(module, "qkv", None)
        return (x.dim() == 3 and isinstance(qkv, nn.Linear) and isinstance(getattr(module, "proj", None), nn.Linear)
                and qkv.out_features == 3 * module.num_heads * module.head_dim
                and getattr(module, "gate", None) is None
                and isinstance(getattr(module, "norm", nn.Identity()), nn.Identity))

    def heads(self, module: nn.Module) -> Tuple[int, int]:
        return module.num_heads, module.head_dim

    def tokens(self, module: nn.Module, x: torch.Tensor) -> Tuple[int, int]:
        return x.shape[1], x.shape[1]

    def head_tensors(self, module: nn.Module) -> List[Tuple[str, int, int]]:
        return []

    def projections(self, module: nn.Module) -> Tuple[Optional[str], str]:
        return "qkv", "proj"

    def set_heads(self, module: nn.Module, heads: int) -> None:
        module.__dict__["num_heads"] = heads
        if "attn_dim" in module.__dict__:
            module.__dict__["attn_dim"] = heads * module.head_dim


_MHA = MultiheadAttentionHandler()
_WINDOW = WindowAttentionHandler()
_FUSED_QKV = FusedQkvAttentionHandler()
HANDLERS.update({nn.MultiheadAttention: _MHA, ShiftedWindowAttention: _WINDOW,
                 RelativePositionalMultiHeadAttention: RelativePositionalAttentionHandler()})


def attention_handler(module: nn.Module) -> Optional[AttentionHandler]:
    """The head handler of ``module``'s type, or ``None`` if its heads cannot be pruned (then it is opaque). A
    class listed by name in :data:`~pruning_env.costs.counting.FUSED_QKV_ATTENTION` gets the fused-qkv handler
    (registered in ``HANDLERS`` under its class on first sight, so the surgery finds it too)."""
    for cls in type(module).__mro__:
        h = HANDLERS.get(cls)
        if h is not None:
            return h if isinstance(h, AttentionHandler) else None
    if is_fused_qkv_attention(module):
        HANDLERS[type(module)] = _FUSED_QKV
        return _FUSED_QKV
    return None
