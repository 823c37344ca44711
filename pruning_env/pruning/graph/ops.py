"""The tracer's tables: layer types it records, functional ops by what they do to channels, opaque modules."""
from __future__ import annotations

import re
from typing import Set

import torch.nn as nn

# The layer types are the cost model's table: the tracer records exactly the layers the counter counts.
# LEAF_TYPES: layer types the tracer treats as leaves (their inner functional calls are not recorded).
from pruning_env.costs.counting import CONV_TYPES, CONVT_TYPES, NORM_TYPES
from pruning_env.costs.counting import COUNTED_TYPES as LEAF_TYPES

__all__ = ["CONV_TYPES", "CONVT_TYPES", "NORM_TYPES", "LEAF_TYPES", "PRESERVE_OPS", "ADD_OPS", "MUL_OPS",
           "CAT_OPS", "NEW_OPS", "RESHAPE_OPS", "PERMUTE_OPS", "SPLIT", "SHUFFLED", "FREEZE_OPS", "EXPAND_OPS",
           "OPAQUE_TYPES", "is_opaque"]

# Functional ops that keep dim 0 and dim 1 (channels) of their first tensor argument: the output has its layout.
PRESERVE_OPS = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish",
    "hardsigmoid", "silu", "gelu", "elu", "elu_", "leaky_relu", "leaky_relu_", "selu", "celu", "mish",
    "softplus", "softsign", "logsigmoid", "hardshrink", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices",
    "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices", "lp_pool2d", "interpolate",
    "upsample", "upsample_nearest", "upsample_bilinear", "pad", "contiguous", "clone", "detach", "to",
    "float", "double", "half", "type", "abs", "neg", "exp", "clamp", "clamp_", "clamp_min", "clamp_max",
    "sqrt", "square", "pow", "mean", "sum", "amax", "amin", "squeeze", "unsqueeze", "__getitem__",
    "flatten", "view", "reshape", "requires_grad_", "zeros_like", "ones_like", "empty_like", "full_like",
    "rand_like", "randn_like", "sign", "identity", "max", "min",
}
# Elementwise binary ops: operands with real channels are tied (same indices must be removed from both).
ADD_OPS = {"add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__",
            "__rsub__", "rsub", "maximum", "minimum"}
MUL_OPS = {"mul", "mul_", "__mul__", "__imul__", "__rmul__", "div", "div_", "__truediv__",
            "__itruediv__", "__rtruediv__", "true_divide", "divide"}
CAT_OPS = {"cat", "concat", "concatenate"}
# Ops creating a fresh tensor that takes only dtype / device from their channel-carrying argument.
NEW_OPS = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"}
RESHAPE_OPS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
# Ops that move the channel dim (channel-last blocks: ConvNeXt, Swin, ViT tokens).
PERMUTE_OPS = {"permute", "transpose", "transpose_", "swapaxes", "swapdims"}
# Channel-dim markers of a tensor whose channels a view split into (groups, per group), before / after the
# transpose of a channel shuffle.
SPLIT, SHUFFLED = -1, -2
# Ops that normalise over the channels: removing one would change every other one, so their inputs are kept
# (``layer_norm`` of an ``nn.LayerNorm`` over the channel dim is pruned instead with ``prune_normalized``;
# ``group_norm`` of an ``nn.GroupNorm`` by whole groups, see :mod:`.norms`).
FREEZE_OPS = {"layer_norm", "rms_norm", "group_norm"}
# Ops that repeat a parameter along its size-1 dims: the channels of the result are the parameter's.
EXPAND_OPS = {"expand", "expand_as"}

#: Module types traced as opaque (extension point): every channel they read is kept and their insides are not
#: traced; their conv/linear layers and attention products still count in the costs. Any module whose class name
#: ends in "Attention" or "Attn", optionally followed by "V2", "2d" or "Cl" (timm's ``Attention``, ``Attention2d``,
#: ``AttentionCl``, CaiT's ``ClassAttn``; not a block that merely contains one, such as
#: MaxViT's ``PartitionAttentionLayer`` or timm's ``PartitionAttentionCl``) is opaque too, so its heads are kept whole while the MLP hidden width
#: around it is pruned. Attention modules with a handler (:mod:`pruning_env.pruning.attention`:
#: ``nn.MultiheadAttention`` self-attention, Swin window attention, MaxViT's relative attention) are traced with
#: their heads as a group instead, unless ignored or called in a way the handler does not support.
OPAQUE_TYPES: Set[type] = {nn.MultiheadAttention}


def is_opaque(module: nn.Module) -> bool:
    """Whether the tracer treats ``module`` as opaque (see :data:`OPAQUE_TYPES`)."""
    return isinstance(module, tuple(OPAQUE_TYPES)) or re.search(r"(?<!Partition)(Attention|Attn)(V\d+|2d|Cl)?$",
                                                                 type(module).__name__) is not None
