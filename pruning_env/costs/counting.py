"""The project's one MACs counter: hooks on a built model count MACs per image and parameters.

MACs follow thop, which the RL-Pruner authors used for their reward: multiply-accumulates of convolutions
(incl. transposed) and linear layers for one input image, plus 2 per output element of BatchNorm (its
normalise + affine in eval mode), plus the products inside attention modules that no layer call shows
(functional q/k/v and output projections, the QK^T and AV matmuls); activations, pooling and other functional
glue count 0. ``include_norm=False`` gives the pure product count, which equals
``torch.utils.flop_counter.FlopCounterMode`` / 2.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn as nn
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import ShiftedWindowAttention

from pruning_env.costs.cost import Cost
from pruning_env.runtime import model_device

__all__ = ["NORM_MACS_PER_ELEMENT", "ATTENTION_TYPES", "count_params", "layer_macs", "attention_macs",
           "count_costs"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: MACs charged per output element of a BatchNorm layer (thop's eval-mode convention).
NORM_MACS_PER_ELEMENT = 2
#: Attention modules whose hidden products :func:`attention_macs` counts.
ATTENTION_TYPES = (nn.MultiheadAttention, ShiftedWindowAttention, RelativePositionalMultiHeadAttention)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def layer_macs(module: nn.Module, output: torch.Tensor, include_norm: bool = True) -> int:
    """MACs of one layer call that produced ``output``, for a batch of one (0 for uncounted layers).

    :param module: the layer.
    :param output: its output tensor; the leading (batch) dimension is divided out.
    :param include_norm: count BatchNorm as ``NORM_MACS_PER_ELEMENT`` per output element.
    """
    batch = output.shape[0] if output.dim() > 1 else 1
    out_per_item = output.numel() // max(batch, 1)
    if isinstance(module, _CONV_TYPES):
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        return out_per_item * (module.in_channels // module.groups) * kernel
    if isinstance(module, _CONVT_TYPES):
        # each input element is scattered through the kernel: count it on the input side
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        spatial_out = out_per_item // module.out_channels
        stride = 1
        for s in module.stride:
            stride *= s
        return (spatial_out // stride) * module.in_channels * (module.out_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return out_per_item * module.in_features
    if include_norm and isinstance(module, _NORM_TYPES):
        return NORM_MACS_PER_ELEMENT * out_per_item
    return 0


def attention_macs(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> int:
    """MACs per image of the products inside one attention call that no layer call shows (0 for other modules).

    ``nn.MultiheadAttention``: q/k/v and output projections (functional) and the QK^T and AV matmuls; Swin
    window attention: qkv and proj (functional, on the padded map) and the matmuls per window; MaxViT's
    relative attention: the matmuls (its projections are layer calls). Heads may have been pruned: the widths
    are read from the weights.

    :param module: the attention module.
    :param args: the positional arguments of the call.
    :param kwargs: its keyword arguments.
    """
    if isinstance(module, nn.MultiheadAttention):
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        seq = 1 if module.batch_first and query.dim() == 3 else 0
        n_q, n_k = query.shape[seq], key.shape[seq]
        inner = module.out_proj.in_features  # num_heads * head_dim
        n_att = n_k + (module.bias_k is not None) + module.add_zero_attn
        return (n_q * module.embed_dim * inner + n_k * (module.kdim + module.vdim) * inner
                + 2 * n_q * n_att * inner + n_q * inner * module.out_proj.out_features)
    if isinstance(module, ShiftedWindowAttention):
        x = args[0] if args else kwargs["x"]
        window = module.window_size
        padded = (-(-x.shape[1] // window[0]) * window[0]) * (-(-x.shape[2] // window[1]) * window[1])
        inner = module.qkv.out_features // 3
        return (padded * x.shape[3] * 3 * inner + 2 * padded * window[0] * window[1] * inner
                + padded * inner * module.proj.out_features)
    if isinstance(module, RelativePositionalMultiHeadAttention):
        x = args[0] if args else kwargs["x"]
        return 2 * x.shape[1] * x.shape[2] * x.shape[2] * module.n_heads * module.head_dim
    return 0


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

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, _CONV_TYPES + _CONVT_TYPES + _NORM_TYPES + (nn.Linear,))
    ]
    handles += [m.register_forward_pre_hook(attention_hook, with_kwargs=True)
                for m in model.modules() if isinstance(m, ATTENTION_TYPES)]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((1, *input_size), device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return Cost(macs=int(total[0]), params=count_params(model))
