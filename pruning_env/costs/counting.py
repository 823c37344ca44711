"""The project's MACs formulas, one per layer kind, and the one MACs counter built on them.

**Convention** (every MACs figure of the project: the counter, the analytic plan costs, the ViT count): MACs per
input image are the multiply-accumulates of every product of two tensors, i.e. convolutions (incl. transposed),
linear layers (also the functional q/k/v and output projections inside attention modules) and the attention
matmuls QK^T and AV, plus ``NORM_MACS_PER_ELEMENT`` = 2 per output element of a BatchNorm layer (its
normalise + affine in eval mode, thop's convention, which the RL-Pruner authors used for their reward).
LayerNorm, GroupNorm, softmax, activations, pooling and other functional glue count 0. ``include_norm=False``
drops the BatchNorm term: the pure product count, equal to ``torch.utils.flop_counter.FlopCounterMode`` / 2 (for
the ViT, which has no BatchNorm, both are the same number).

**One formula per layer kind**: each kind's MACs is written once, as a :class:`MacsTerm` ``weight * a * b``
whose ``a`` (input width per output) and ``b`` (output width) are the widths pruning changes:

============================  ===========================================  ==========================
kind                          weight                                       a, b
============================  ===========================================  ==========================
conv (:func:`conv_term`)      output positions x kernel area               in / groups, out
transposed conv               (output positions / stride) x kernel area    in, out / groups
linear (:func:`linear_term`)  positions (rows, tokens)                     in, out
BatchNorm (:func:`norm_term`) 2 x positions                                1, channels
attention matmuls             2 x queries x keys each query attends        1, q/k/v width (heads x dim)
============================  ===========================================  ==========================

:func:`count_costs` (forward hooks on a built model) multiplies them out; the analytic plan costs
(:class:`pruning_env.costs.analytic.CostTerms`) substitute group widths for ``a`` and ``b``; the ViT count
(:mod:`pruning_env.costs.vit`) composes them by kept tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import ShiftedWindowAttention

from pruning_env.costs.cost import Cost
from pruning_env.runtime import model_device

__all__ = ["CONV_TYPES", "CONVT_TYPES", "NORM_TYPES", "LINEAR_TYPES", "COUNTED_TYPES", "NORM_MACS_PER_ELEMENT",
           "ATTENTION_TYPES", "MacsTerm", "conv_term", "conv_transpose_term", "linear_term", "norm_term",
           "matmul_term", "layer_term", "layer_positions", "count_params", "layer_macs", "attention_geometry",
           "FUSED_QKV_ATTENTION", "is_fused_qkv_attention", "is_attention",
           "attention_product_macs", "attention_macs", "count_costs"]

#: The layer types (the project's one table of them: the dependency graph's tracer records the same ones).
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LINEAR_TYPES = (nn.Linear,)
#: Layers whose calls :func:`layer_macs` counts.
COUNTED_TYPES = CONV_TYPES + CONVT_TYPES + NORM_TYPES + LINEAR_TYPES
#: MACs charged per output element of a BatchNorm layer (thop's eval-mode convention).
NORM_MACS_PER_ELEMENT = 2
#: Attention modules whose hidden products :func:`attention_macs` counts.
ATTENTION_TYPES = (nn.MultiheadAttention, ShiftedWindowAttention, RelativePositionalMultiHeadAttention)
#: Fused-qkv attention classes, by ``module.qualname`` (their library is never imported here): a child ``qkv``
#: linear layer whose output is reshaped into q, k, v of ``num_heads`` x ``head_dim`` on ``(B, N, C)`` tokens, all N
#: keys attended, then a child ``proj``; their projections are layer calls, :func:`attention_product_macs` adds
#: QK^T and AV. timm's ``Attention`` (ViT, DeiT and the other models built from its ``Block``). Extension point.
FUSED_QKV_ATTENTION = {"timm.layers.attention.Attention"}


def is_fused_qkv_attention(module: nn.Module) -> bool:
    """Whether ``module``'s class (or a base class) is listed in :data:`FUSED_QKV_ATTENTION`."""
    return any(f"{c.__module__}.{c.__qualname__}" in FUSED_QKV_ATTENTION for c in type(module).__mro__)


def is_attention(module: nn.Module) -> bool:
    """Whether :func:`attention_macs` counts products inside ``module`` (an :data:`ATTENTION_TYPES` or
    :data:`FUSED_QKV_ATTENTION` module)."""
    return isinstance(module, ATTENTION_TYPES) or is_fused_qkv_attention(module)


@dataclass(frozen=True)
class MacsTerm:
    """MACs of one product as ``weight * a * b``: ``a`` is the input width each output reads, ``b`` the output
    width; ``weight`` holds everything pruning leaves alone (positions, kernel area, the 2 of a matmul pair).

    :ivar weight: the constant factor.
    :ivar a: input width per output.
    :ivar b: output width.
    """

    weight: int
    a: int
    b: int

    @property
    def macs(self) -> int:
        return self.weight * self.a * self.b


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def conv_term(module: nn.Module, positions: int) -> MacsTerm:
    """A convolution (grouped and depthwise included) with ``positions`` output positions per channel."""
    return MacsTerm(positions * _prod(module.kernel_size), module.in_channels // module.groups, module.out_channels)


def conv_transpose_term(module: nn.Module, positions: int) -> MacsTerm:
    """A transposed convolution: each input element is scattered through the kernel, counted on the input side."""
    return MacsTerm((positions // _prod(module.stride)) * _prod(module.kernel_size), module.in_channels,
                    module.out_channels // module.groups)


def linear_term(positions: int, in_features: int, out_features: int) -> MacsTerm:
    """A linear map of ``in_features`` to ``out_features`` at ``positions`` rows (tokens, spatial positions)."""
    return MacsTerm(positions, in_features, out_features)


def norm_term(positions: int, channels: int) -> MacsTerm:
    """A BatchNorm of ``channels`` channels at ``positions`` positions each."""
    return MacsTerm(NORM_MACS_PER_ELEMENT * positions, 1, channels)


def matmul_term(queries: int, context: int, width: int) -> MacsTerm:
    """The attention matmuls QK^T and AV: ``queries`` queries, each attending ``context`` keys, q/k/v features
    ``width`` (heads x head dim)."""
    return MacsTerm(2 * queries * context, 1, width)


def layer_term(module: nn.Module, positions: int, include_norm: bool = True) -> Optional[MacsTerm]:
    """The MACs term of one call of ``module`` with ``positions`` output positions per channel; ``None`` for
    layers that count 0 (LayerNorm, activations, ..., BatchNorm with ``include_norm=False``)."""
    if isinstance(module, CONV_TYPES):
        return conv_term(module, positions)
    if isinstance(module, CONVT_TYPES):
        return conv_transpose_term(module, positions)
    if isinstance(module, LINEAR_TYPES):
        return linear_term(positions, module.in_features, module.out_features)
    if include_norm and isinstance(module, NORM_TYPES):
        return norm_term(positions, module.num_features)
    return None


def layer_positions(module: nn.Module, output: torch.Tensor) -> int:
    """Output positions per channel of one call of a :data:`COUNTED_TYPES` layer that produced ``output`` (its
    leading dim is the batch): spatial size for convs and norms, rows or tokens for linear layers."""
    batch = output.shape[0] if output.dim() > 1 else 1
    width = module.out_features if isinstance(module, LINEAR_TYPES) else (
        module.num_features if isinstance(module, NORM_TYPES) else module.out_channels)
    return output.numel() // max(batch, 1) // width


def count_params(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def layer_macs(module: nn.Module, output: torch.Tensor, include_norm: bool = True) -> int:
    """MACs of one layer call that produced ``output``, for a batch of one (0 for uncounted layers).

    :param module: the layer.
    :param output: its output tensor; the leading (batch) dimension is divided out.
    :param include_norm: count BatchNorm as ``NORM_MACS_PER_ELEMENT`` per output element.
    """
    if not isinstance(module, COUNTED_TYPES):
        return 0
    term = layer_term(module, layer_positions(module, output), include_norm)
    return 0 if term is None else term.macs


def attention_geometry(module: nn.Module, args: Tuple[Any, ...],
                       kwargs: Dict[str, Any]) -> Optional[Tuple[int, int, int]]:
    """``(queries, keys, context)`` per image of one call of an :data:`ATTENTION_TYPES` module (``None`` for other
    modules): query tokens, key / value tokens projected, keys each query attends.

    :param module: the attention module.
    :param args: the positional arguments of the call.
    :param kwargs: its keyword arguments.
    """
    if isinstance(module, nn.MultiheadAttention):
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        seq = 1 if module.batch_first and query.dim() == 3 else 0
        n_q, n_k = int(query.shape[seq]), int(key.shape[seq])
        return n_q, n_k, n_k + (module.bias_k is not None) + module.add_zero_attn
    if isinstance(module, ShiftedWindowAttention):
        x = args[0] if args else kwargs["x"]
        window = module.window_size
        padded = (-(-x.shape[1] // window[0]) * window[0]) * (-(-x.shape[2] // window[1]) * window[1])
        return padded, padded, window[0] * window[1]  # q/k/v of the padded map, attention within each window
    if isinstance(module, RelativePositionalMultiHeadAttention):
        x = args[0] if args else kwargs["x"]
        return int(x.shape[1] * x.shape[2]), int(x.shape[1] * x.shape[2]), int(x.shape[2])
    if is_fused_qkv_attention(module):
        x = args[0] if args else kwargs["x"]
        return int(x.shape[1]), int(x.shape[1]), int(x.shape[1])
    return None


def attention_product_macs(module: nn.Module, geometry: Optional[Tuple[int, int, int]]) -> int:
    """MACs per image of the products inside one attention call that no layer call shows (0 for other modules),
    from the call's :func:`attention_geometry`.

    ``nn.MultiheadAttention``: q/k/v and output projections (functional) and the QK^T and AV matmuls; Swin
    window attention: qkv and proj (functional, on the padded map) and the matmuls per window; MaxViT's
    relative attention: the matmuls (its projections are layer calls). Heads may have been pruned: the widths
    are read from the weights.

    :param module: the attention module.
    :param geometry: :func:`attention_geometry` of the call.
    """
    if geometry is None:
        return 0
    n_q, n_k, context = geometry
    if isinstance(module, nn.MultiheadAttention):
        inner = module.out_proj.in_features  # num_heads * head_dim
        terms = (linear_term(n_q, module.embed_dim, inner), linear_term(n_k, module.kdim, inner),
                 linear_term(n_k, module.vdim, inner), matmul_term(n_q, context, inner),
                 linear_term(n_q, inner, module.out_proj.out_features))
    elif isinstance(module, ShiftedWindowAttention):
        inner = module.qkv.out_features // 3
        terms = (linear_term(n_q, module.qkv.in_features, 3 * inner), matmul_term(n_q, context, inner),
                 linear_term(n_q, inner, module.proj.out_features))
    elif isinstance(module, RelativePositionalMultiHeadAttention):
        terms = (matmul_term(n_q, context, module.n_heads * module.head_dim),)
    elif is_fused_qkv_attention(module):
        terms = (matmul_term(n_q, context, module.num_heads * module.head_dim),)
    else:
        return 0
    return sum(t.macs for t in terms)


def attention_macs(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> int:
    """MACs per image of the products inside one call of ``module`` with ``args`` / ``kwargs`` that no layer call
    shows; see :func:`attention_product_macs` (0 for modules that are not :data:`ATTENTION_TYPES`)."""
    return attention_product_macs(module, attention_geometry(module, args, kwargs))


@torch.no_grad()
def count_costs(
    model: nn.Module,
    input_size: Sequence[int] = (3, 32, 32),
    device: torch.device | str | None = None,
    include_norm: bool = True,
) -> Cost:
    """MACs per image and parameters of ``model`` for inputs of ``input_size`` (without the batch dim).

    Runs one forward pass on a zero batch of one, in eval mode, with hooks on conv, linear, norm and attention
    layers;
    the model's training flag is restored afterwards and its weights are not changed.

    :param model: any ``nn.Module`` made of standard layers (functional glue is fine).
    :param input_size: ``(C, H, W)`` of one input.
    :param device: where to run; defaults to the device of the model's first parameter.
    :param include_norm: count BatchNorm layers (thop convention, the default).
    """
    if device is None:
        device = model_device(model)
    total = [0]

    def hook(module: nn.Module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += layer_macs(module, output, include_norm)

    def attention_hook(module: nn.Module, args, kwargs) -> None:
        total[0] += attention_macs(module, args, kwargs)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, COUNTED_TYPES)]
    handles += [m.register_forward_pre_hook(attention_hook, with_kwargs=True)
                for m in model.modules() if is_attention(m)]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((1, *input_size), device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return Cost(macs=int(total[0]), params=count_params(model))
