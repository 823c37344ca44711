"""Dependency groups of a network, found by tracing one eager forward pass on an example input.

A group is a set of layers whose output channels must be removed with the same indices, plus every layer whose
input channels (or BatchNorm / depthwise channels) follow; see ``docs/pruning.md`` for the rules.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from pruning_env.costs.counting import attention_macs, layer_macs
from pruning_env.pruning.attention import AttentionHandler, attention_handler
from pruning_env.pruning import partitions

__all__ = [
    "Segment",
    "Group",
    "ModuleSpec",
    "ParamSpec",
    "LayerCall",
    "DependencyGraph",
    "UnsupportedModelError",
    "ExampleInput",
    "OPAQUE_TYPES",
    "is_opaque",
    "CONV_TYPES",
    "NORM_TYPES",
]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Layer types the tracer treats as opaque leaves (their inner functional calls are not recorded).
LEAF_TYPES = CONV_TYPES + NORM_TYPES + _CONVT_TYPES + (nn.Linear,)
#: One input batch for tracing: a tensor, a tuple of positional tensors or a dict of keyword tensors.
ExampleInput = Union[torch.Tensor, Tuple[torch.Tensor, ...], Dict[str, torch.Tensor]]
FIXED = -1  # source id of channels that may never be removed (inputs, constants, outputs, ignored layers)


class UnsupportedModelError(RuntimeError):
    """The tracer met a construct whose channel dependencies it cannot prove; pruning would be unsafe."""


# --------------------------------------------------------------------------------------------------------------
# Channel layouts: what each feature of dim 1 of a traced tensor is made of
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """A run of ``channels * block`` features of dim 1 that all come from one channel source.

    ``source`` is a source id during tracing and a group index (or ``None``: never pruned) once resolved;
    ``block`` > 1 after flattening a conv output (each channel becomes ``block`` consecutive features).
    """

    source: Optional[int]
    channels: int
    block: int = 1

    @property
    def features(self) -> int:
        return self.channels * self.block


Layout = Tuple[Segment, ...]


def _layout_features(layout: Layout) -> int:
    return sum(s.features for s in layout)


# --------------------------------------------------------------------------------------------------------------
# Public result types
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Group:
    """One unit of pruning: channels removed together, with the same indices, from every member.

    :ivar name: readable, unique name (the member's name, or e.g. ``"layer2 residual (a+b+c+...)"``).
    :ivar members: conv/linear layers whose output channels the group removes (execution order).
    :ivar num_channels: current number of channels of the group.
    :ivar followers: BatchNorm, LayerNorm and depthwise layers whose channels follow the group, and parameters used
        outside any layer (qualified names, see :class:`ParamSpec`).
    :ivar consumers: conv/linear layers whose input channels (or flattened features) follow the group.
    :ivar kind: ``"layer"`` (one producer), ``"residual"`` (merged by addition) or ``"se"`` (by a multiply).
    :ivar granularity: channels are removed in aligned blocks of this many (the per-group width of a grouped
        convolution that follows the group: its conv groups are removed whole); 1 for plain channels.
    """

    name: str
    members: Tuple[str, ...]
    num_channels: int
    followers: Tuple[str, ...] = ()
    consumers: Tuple[str, ...] = ()
    kind: str = "layer"
    granularity: int = 1

    @property
    def layer_count(self) -> int:
        """Number of prunable conv/linear layers whose outputs this group removes (authors' cluster size)."""
        return len(self.members)


@dataclass
class ModuleSpec:
    """How one traced layer is sliced: layouts of its output (dim 0 of its parameters) and input channels."""

    name: str
    module: nn.Module
    role: str  # "conv", "linear", "norm", "layernorm", "depthwise", "attention" (out_layout: q features of heads)
    out_layout: Optional[Layout] = None  # resolved: Segment.source is a group index or None
    in_layout: Optional[Layout] = None


@dataclass
class ParamSpec:
    """A parameter the forward pass uses outside any layer (added, multiplied or concatenated to channels), whose
    dim ``dim`` follows a group: ViT's class token and position embedding, ConvNeXt's layer scale. Traced only with
    ``prune_normalized``.

    :ivar name: qualified parameter name (``"encoder.pos_embedding"``).
    :ivar dim: the parameter's dim that holds the channels.
    :ivar layout: the channels of that dim (resolved: ``Segment.source`` is a group index or ``None``).
    """

    name: str
    dim: int
    layout: Layout


@dataclass(frozen=True)
class LayerCall:
    """One call of a conv/linear/norm layer during the trace, as the analytic cost model needs it.

    :ivar role: ``"conv"``, ``"linear"``, ``"norm"``, ``"layernorm"``, ``"depthwise"``, ``"attention"`` (widths
        follow the groups; the layer's layouts are its :class:`ModuleSpec`'s), ``"fixed"`` (a layer whose channels never
        change, e.g. a grouped conv that changes the width, or a layer inside an opaque module) or ``"other"``
        (no group touches it).
    :ivar positions: output positions per channel (spatial size; rows or tokens for linear layers).
    :ivar fixed_macs: MACs of a ``"fixed"`` / ``"other"`` call (constant under pruning), else 0.
    :ivar context: for ``"attention"`` calls, the keys each query attends to (the QK^T and AV matmuls cost
        ``2 * positions * context`` MACs per q feature); else 0.
    """

    name: str
    role: str
    positions: int
    fixed_macs: int = 0
    context: int = 0


# --------------------------------------------------------------------------------------------------------------
# The tracer
# --------------------------------------------------------------------------------------------------------------
# Functional ops that keep dim 0 and dim 1 (channels) of their first tensor argument: the output has its layout.
_PRESERVE = {
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
_ADD_OPS = {"add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__",
            "__rsub__", "rsub", "maximum", "minimum"}
_MUL_OPS = {"mul", "mul_", "__mul__", "__imul__", "__rmul__", "div", "div_", "__truediv__",
            "__itruediv__", "__rtruediv__", "true_divide", "divide"}
_CAT_OPS = {"cat", "concat", "concatenate"}
# Ops creating a fresh tensor that takes only dtype / device from their channel-carrying argument.
_NEW_OPS = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"}
_RESHAPE_OPS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
# Ops that move the channel dim (channel-last blocks: ConvNeXt, Swin, ViT tokens).
_PERMUTE_OPS = {"permute", "transpose", "transpose_", "swapaxes", "swapdims"}
# Channel-dim markers of a tensor whose channels a view split into (groups, per group), before / after the
# transpose of a channel shuffle.
_SPLIT, _SHUFFLED = -1, -2
# Ops that normalise over the channels: removing one would change every other one, so their inputs are kept
# (``layer_norm`` of an ``nn.LayerNorm`` over the channel dim is pruned instead with ``prune_normalized``).
_FREEZE_OPS = {"layer_norm", "rms_norm"}
# Ops that repeat a parameter along its size-1 dims: the channels of the result are the parameter's.
_EXPAND_OPS = {"expand", "expand_as"}

#: Module types traced as opaque (extension point): every channel they read is kept and their insides are not
#: traced; their conv/linear layers and attention products still count in the costs. Any module whose class name
#: ends in "Attention" or "AttentionV2" (timm-style ``Attention``; not a block that merely contains one, such as
#: MaxViT's ``PartitionAttentionLayer``) is opaque too, so its heads are kept whole while the MLP hidden width
#: around it is pruned. Attention modules with a handler (:mod:`pruning_env.pruning.attention`:
#: ``nn.MultiheadAttention`` self-attention, Swin window attention, MaxViT's relative attention) are traced with
#: their heads as a group instead, unless ignored or called in a way the handler does not support.
OPAQUE_TYPES: Set[type] = {nn.MultiheadAttention}


def is_opaque(module: nn.Module) -> bool:
    """Whether the tracer treats ``module`` as opaque (see :data:`OPAQUE_TYPES`)."""
    return isinstance(module, tuple(OPAQUE_TYPES)) or re.search(r"Attention(V\d+)?$", type(module).__name__) is not None


class _Recorder(TorchFunctionMode):
    """Forwards every torch function call to the tracer (the mode is disabled while the handler runs)."""

    def __init__(self, tracer: "_Tracer") -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tracer = self.tracer
        if tracer.leaf_depth == 0 and not tracer.busy:
            tracer.busy = True
            try:
                tracer.on_function(func, args, kwargs, out)
            finally:
                tracer.busy = False
        return out


class _UnionFind:
    def __init__(self) -> None:
        self.parent: List[int] = []
        self.fixed: List[bool] = []
        self.kinds: List[set] = []
        self.granularity: List[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        self.fixed.append(False)
        self.kinds.append(set())
        self.granularity.append(1)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: Optional[int], b: Optional[int], kind: str) -> None:
        """Tie two sources; ``None``/FIXED on either side makes the other one unprunable."""
        if a is None or a == FIXED or b is None or b == FIXED:
            for s in (a, b):
                if s is not None and s != FIXED:
                    self.fixed[self.find(s)] = True
            return
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            self.kinds[ra].add(kind)
            return
        # the earlier source stays the root so that group order follows execution order
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        self.kinds[ra] |= self.kinds[rb] | {kind}
        self.granularity[ra] = math.lcm(self.granularity[ra], self.granularity[rb])

    def require_blocks(self, a: int, block: int) -> None:
        """Channels of ``a`` may only be removed in aligned blocks of ``block``."""
        if a != FIXED:
            r = self.find(a)
            self.granularity[r] = math.lcm(self.granularity[r], block)

    def fix(self, a: int) -> None:
        if a != FIXED:
            self.fixed[self.find(a)] = True


@dataclass
class _Call:
    """One call of a leaf layer during the trace (raw layouts use source ids)."""

    name: str
    module: nn.Module
    role: str
    in_layout: Optional[Layout]
    out_layout: Optional[Layout]
    factor: int  # output positions per channel (spatial size; rows for linear)
    const_macs: int  # MACs of this call as the cost model counts them in the traced model
    context: int = 0  # attention calls: keys per query


@dataclass
class _AttentionFrame:
    """An attention call whose heads are traced as a group (from its pre-hook to its post-hook)."""

    handler: AttentionHandler
    module: nn.Module
    name: str
    x: torch.Tensor  # the input the projections read
    in_layout: Optional[Layout]
    heads: Layout  # (Segment(source, num_heads, head_dim),): the q (= k = v) features
    per_head_linears: Set[str]
    projections: Set[str]  # its q/k/v and output projections, recorded when it returns even if called as modules


class _Tracer:
    def __init__(self, model: nn.Module, ignore: Sequence[str], prune_normalized: bool = False) -> None:
        self.model = model
        self.ignore = set(ignore)
        self.prune_normalized = prune_normalized
        # with prune_normalized: id(tensor) -> (tensor, parameter, qualified name) for the model's parameters and
        # their expanded views; the parameters met beside channels become sources: name -> (source id, dim)
        self.params: Dict[int, Tuple[torch.Tensor, nn.Parameter, str]] = {
            id(p): (p, p, n) for n, p in model.named_parameters()} if prune_normalized else {}
        self.param_sources: Dict[str, Tuple[int, int]] = {}
        # id(tensor) -> (tensor, layout of its channel dim, which dim holds the channels)
        self.layouts: Dict[int, Tuple[torch.Tensor, Layout, int]] = {}
        self.uf = _UnionFind()
        self.source_of_module: Dict[int, int] = {}
        self.source_names: List[str] = []
        self.source_channels: List[int] = []
        self.calls: List[_Call] = []
        self.stack: List[str] = []
        self.leaf_depth = 0
        self.opaque_depth = 0
        self.busy = False
        self.pending: List[Tuple[Optional[Layout], int]] = []
        self.modes: List[str] = []  # per module call on the stack: "attention", "opaque", "leaf" or ""
        self.frames: List[_AttentionFrame] = []  # attention calls being traced
        self.parts: Dict[int, List[Tuple[int, int]]] = {}  # partitioned source -> its (part source, channels)

    # ---- layouts -------------------------------------------------------------------------------------------
    def layout(self, t: Any) -> Optional[Layout]:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self.layouts.get(id(t))
        if entry is None or entry[0] is not t:
            return None
        return partitions.expand(self, entry[1]) if self.parts else entry[1]

    def cdim(self, t: torch.Tensor) -> int:
        """The dim that holds ``t``'s channels (1 unless a permute moved them, e.g. channel-last blocks)."""
        entry = self.layouts.get(id(t))
        return entry[2] if entry is not None and entry[0] is t else 1

    def set_layout(self, t: torch.Tensor, layout: Optional[Layout], cdim: int = 1) -> None:
        if layout is None:
            self.layouts.pop(id(t), None)
        else:
            self.layouts[id(t)] = (t, layout, cdim)

    def where(self) -> str:
        if not self.stack:
            return "the model's top-level forward"
        name = self.stack[-1] or "<root>"
        mod = self.model.get_submodule(self.stack[-1]) if self.stack[-1] else self.model
        return f"module {name!r} ({type(mod).__name__})"

    def producers(self, layout: Layout) -> List[str]:
        return sorted({self.source_names[s.source] for s in layout if s.source not in (None, FIXED)})

    def unsupported(self, what: str, layout: Layout) -> UnsupportedModelError:
        prods = self.producers(layout)
        return UnsupportedModelError(
            f"cannot trace channel dependencies through {what} in {self.where()}: it reshapes or mixes the "
            f"channels produced by {prods}. Pruning them could give a silently wrong model; pass these layer "
            f"names in `ignore` to keep their channels, or restructure the forward pass."
        )

    def tie(self, a: Layout, b: Layout, kind: str, what: str) -> None:
        """Tie two layouts channel by channel (elementwise ops); segment boundaries must line up."""
        if len(a) == len(b) and all(x.channels == y.channels and x.block == y.block for x, y in zip(a, b)):
            for x, y in zip(a, b):
                self.uf.union(x.source, y.source, kind)
            return
        if _layout_features(a) == _layout_features(b):
            # identical features but segmented differently: only safe when nothing on either side is prunable
            self.fix_layout(a)
            self.fix_layout(b)
            return
        raise self.unsupported(f"{what} between tensors of different channel layouts", a + b)

    def fix_layout(self, layout: Optional[Layout]) -> None:
        for s in layout or ():
            if s.source not in (None, FIXED):
                self.uf.fix(s.source)

    def is_fixed(self, layout: Optional[Layout]) -> bool:
        """Whether no channel of ``layout`` can ever be removed (fixing is final, so this stays true)."""
        return all(s.source in (None, FIXED) or self.uf.fixed[self.uf.find(s.source)] for s in layout or ())

    # ---- functional ops ------------------------------------------------------------------------------------
    def on_function(self, func, args, kwargs, out) -> None:
        flat_in, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat_in if isinstance(t, torch.Tensor)]
        sourced = [(t, self.layout(t)) for t in tensors]
        sourced = [(t, lay) for t, lay in sourced if lay is not None]
        name = getattr(func, "__name__", str(func))
        if not sourced:
            if name in _EXPAND_OPS and args and self.param_of(args[0]) is not None and isinstance(out, torch.Tensor):
                _, param, pname = self.param_of(args[0])
                self.params[id(out)] = (out, param, pname)  # e.g. ViT's class token expanded to the batch
            return
        if name.startswith("_") and not name.startswith("__"):
            name = name[1:]  # boolean-dispatch helpers such as _max_pool2d
        if name == "type_as" and self.layout(args[0]) is None or name in _NEW_OPS:
            return  # the channel tensor only gives a dtype / device (e.g. YOLO's anchors: arange(w).type_as(feats))
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not outs:
            if name == "__setitem__" and not all(self.is_fixed(lay) for _, lay in sourced):
                raise self.unsupported("an in-place item assignment", sourced[0][1])
            return  # shape queries, python scalars: channels are not affected
        if name == "layer_norm" and self.prune_normalized and self.on_layer_norm(args, kwargs, sourced, outs):
            return
        if name in _FREEZE_OPS:
            # normalised over the channels (statistics would change if one went): keep them all
            for _, lay in sourced:
                self.fix_layout(lay)
            for o in outs:
                self.set_layout(o, None)
            return
        try:
            if any(self.cdim(t) < 0 for t, _ in sourced):
                self.on_split(name, args, kwargs, sourced, outs)
            elif name in partitions.PARTITION_OPS:
                partitions.on_partition(self, name, args, kwargs, sourced, outs)
            elif name in _CAT_OPS:
                self.on_cat(args, kwargs, out)
            elif name in _ADD_OPS or name in _MUL_OPS:
                self.on_binary(name, args, out, "residual" if name in _ADD_OPS else "se")
            elif name in _PERMUTE_OPS:
                self.on_permute(name, args, kwargs, sourced, outs)
            elif name in _PRESERVE:
                self.on_preserve(name, args, kwargs, sourced, outs)
            else:
                raise self.unsupported(f"the op {name!r}", sourced[0][1])
        except UnsupportedModelError:
            if not all(self.is_fixed(lay) for _, lay in sourced):
                raise
            # every channel involved is kept anyway: whatever the op does, the pruned model computes the same
            for o in outs:
                self.set_layout(o, None)

    def param_of(self, t: Any) -> Optional[Tuple[torch.Tensor, nn.Parameter, str]]:
        """``(tensor, parameter, name)`` if ``t`` is a parameter of the model or an expanded view of one."""
        entry = self.params.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry if entry is not None and entry[0] is t else None

    def param_layout(self, t: torch.Tensor, dim: int) -> Optional[Layout]:
        """The layout of dim ``dim`` of ``t`` if ``t`` is a parameter (or an expanded view) whose own dim there
        holds one value per channel: the parameter becomes a source, sliced along that dim by the surgery."""
        entry = self.param_of(t)
        if entry is None:
            return None
        _, param, pname = entry
        pdim = dim - (t.dim() - param.dim())  # expanded views and broadcasting align the trailing dims
        if pdim < 0 or param.shape[pdim] != t.shape[dim] or t.shape[dim] == 1:
            return None
        sid, known = self.param_sources.get(pname, (None, pdim))
        if known != pdim:
            raise UnsupportedModelError(f"parameter {pname!r} meets channels along its dims {known} and {pdim} in "
                                        f"{self.where()}; it cannot follow one channel group. Pass the layers "
                                        f"producing them in `ignore` or use prune_normalized=False.")
        if sid is None:
            sid = self.uf.add()
            self.source_names.append(pname)
            self.source_channels.append(int(param.shape[pdim]))
            self.param_sources[pname] = (sid, pdim)
        return (Segment(sid, int(param.shape[pdim])),)

    def on_layer_norm(self, args, kwargs, sourced, outs) -> bool:
        """An ``nn.LayerNorm`` over the channel dim alone (incl. torchvision's ``LayerNorm2d`` between permutes):
        its weight and bias follow the channels, its statistics are over the kept ones. Returns False (the caller
        freezes the channels) for any other use of ``layer_norm``."""
        x = args[0] if args else kwargs.get("input")
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        module = self.model.get_submodule(self.stack[-1]) if self.stack else self.model
        layout = self.layout(x)
        if (len(sourced) != 1 or sourced[0][0] is not x or not isinstance(module, nn.LayerNorm)
                or len(tuple(shape)) != 1 or self.cdim(x) != x.dim() - 1 or len(outs) != 1):
            return False
        name = self.stack[-1]
        self.calls.append(_Call(name, module, "layernorm", layout, layout, x.numel() // x.shape[0] // x.shape[-1],
                                0))
        self.set_layout(outs[0], layout, outs[0].dim() - 1)
        return True

    def on_split(self, name: str, args, kwargs, sourced, outs) -> None:
        """A channel shuffle: ``view`` splitting the channels into (groups, per group), ``transpose(1, 2)``,
        ``view`` back. Channel i of each group ends up beside channel i of the others, an order no group of
        same-index channels can express, so the shuffled channels are kept (the layers around them are pruned)."""
        src, layout = self.single_source(name, args, sourced)
        state, ish = self.cdim(src), tuple(src.shape)
        for o in outs:
            osh = tuple(o.shape)
            swap = name in _PERMUTE_OPS and self.permuted_dims(name, args, kwargs, src.dim())[:3] == [0, 2, 1]
            if swap:
                self.set_layout(o, layout, _SHUFFLED if state == _SPLIT else _SPLIT)
            elif name in ("contiguous", "clone", "detach", "to"):
                self.set_layout(o, layout, state)
            elif name in _RESHAPE_OPS and osh == (ish[0], ish[1] * ish[2], *ish[3:]):
                if state == _SPLIT:  # split and merged back unchanged
                    self.set_layout(o, layout, 1)
                else:
                    self.fix_layout(layout)
                    self.set_layout(o, None)
            else:
                raise self.unsupported(f"the op {name!r} on channels a view split into groups (only a channel "
                                       f"shuffle, view -> transpose(1, 2) -> view back, is supported)", layout)

    @staticmethod
    def permuted_dims(name: str, args, kwargs, nd: int) -> List[int]:
        """The permutation a permute / transpose applies, as a list of source dims."""
        rest = list(args[1:])
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            return [d % nd for d in kwargs.get("dims", dims)]
        d0 = (rest[0] if rest else kwargs.get("dim0")) % nd
        d1 = (rest[1] if len(rest) > 1 else kwargs.get("dim1")) % nd
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm

    def single_source(self, name: str, args, sourced) -> Tuple[torch.Tensor, Layout]:
        first = args[0] if args else None
        src = first if isinstance(first, torch.Tensor) and self.layout(first) is not None else sourced[0][0]
        layout = self.layout(src)
        if len(sourced) > 1 and any(t is not src for t, _ in sourced):
            raise self.unsupported(f"the op {name!r} with several channel-carrying inputs", layout)
        return src, layout

    def on_permute(self, name: str, args, kwargs, sourced, outs) -> None:
        src, layout = self.single_source(name, args, sourced)
        new = self.permuted_dims(name, args, kwargs, src.dim()).index(self.cdim(src))
        if new == 0:
            raise self.unsupported(f"the op {name!r} moving channels to the batch dimension", layout)
        for o in outs:
            self.set_layout(o, layout, new)

    def on_preserve(self, name: str, args, kwargs, sourced, outs) -> None:
        src, layout = self.single_source(name, args, sourced)
        c = self.cdim(src)
        for o in outs:
            if name == "__getitem__":
                new, sliced = self.index_cdim(args[1] if len(args) > 1 else None, src, c, layout)
                self.set_layout(o, sliced, new)
            elif c == 1 and name in _RESHAPE_OPS and o.dim() == src.dim() + 1 and o.shape[0] == src.shape[0] \
                    and o.shape[1] * o.shape[2] == src.shape[1] and o.shape[3:] == src.shape[2:] and o.shape[1] > 1:
                self.set_layout(o, layout, _SPLIT)  # (N, C, ...) -> (N, groups, C / groups, ...): a shuffle?
            elif c == 1:
                self.set_layout(o, self.reshape_layout(name, src, layout, o), 1)
            else:
                self.set_layout(o, layout, self.channel_last_cdim(name, args, kwargs, src, c, layout, o))

    def index_cdim(self, index: Any, src: torch.Tensor, c: int, layout: Layout) -> Tuple[int, Layout]:
        """Where the channels go under basic indexing, and their layout (a channel slice is a partition, see
        :func:`partitions.channel_slice`); advanced indexing is refused."""
        items = list(index) if isinstance(index, tuple) else [index]
        if any(not (it is None or it is Ellipsis or isinstance(it, (int, slice))) for it in items):
            raise self.unsupported("the op '__getitem__' with an index tensor or list", layout)
        consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
        expanded: List[Any] = []
        for it in items:
            expanded.extend([slice(None)] * (src.dim() - consuming) if it is Ellipsis else [it])
        if Ellipsis not in items:
            expanded.extend([slice(None)] * (src.dim() - consuming))
        out_pos = in_pos = 0
        new = -1
        for it in expanded:
            if it is None:
                out_pos += 1
                continue
            if in_pos == c:
                full = isinstance(it, slice) and it.step in (None, 1) and it.start in (None, 0) and (
                    it.stop is None or it.stop >= src.shape[c])
                if isinstance(it, int):
                    raise self.unsupported(f"the op '__getitem__' indexing the channel dimension ({it})", layout)
                if not full:
                    layout = partitions.channel_slice(self, it, int(src.shape[c]), layout)
                new = out_pos
            in_pos += 1
            if not isinstance(it, int):
                out_pos += 1
        if new <= 0:
            raise self.unsupported("the op '__getitem__' indexing the batch dimension of a channel tensor", layout)
        return new, layout

    def channel_last_cdim(self, name: str, args, kwargs, src: torch.Tensor, c: int, layout: Layout,
                          o: torch.Tensor) -> int:
        """The channel dim of ``o`` for ops on tensors whose channels are not in dim 1 (after a permute)."""
        ish, osh = tuple(src.shape), tuple(o.shape)
        if osh == ish:
            return c  # pointwise (activations, dropout, copies)
        if name in ("mean", "sum", "amax", "amin"):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            dims = {d % len(ish) for d in ((dim,) if isinstance(dim, int) else (dim or ()))}
            if dims and c not in dims:
                return c if keep else c - sum(1 for d in dims if d < c)
        if name in ("view", "reshape", "flatten", "unsqueeze", "squeeze") and c == len(ish) - 1 \
                and len(osh) >= 2 and osh[-1] == ish[-1] and osh[0] == ish[0]:
            return len(osh) - 1  # the last dim stays whole: every position keeps its channel vector
        raise self.unsupported(f"the op {name!r} (shape {list(ish)} -> {list(osh)}, channels in dim {c})", layout)

    def reshape_layout(self, name: str, src: torch.Tensor, layout: Layout, o: torch.Tensor) -> Layout:
        ish, osh = tuple(src.shape), tuple(o.shape)
        if name.endswith("like"):
            return layout
        if len(osh) >= 2 and len(ish) >= 2 and osh[:2] == ish[:2]:
            return layout  # batch and channels untouched (pointwise, pooling, spatial reshapes)
        if name in _RESHAPE_OPS and len(ish) >= 2 and len(osh) == 2 and osh[0] == ish[0]:
            spatial = int(np.prod(ish[2:])) if len(ish) > 2 else 1
            if osh[1] == ish[1] * spatial:  # flatten(1): every channel becomes `spatial` consecutive features
                return tuple(Segment(s.source, s.channels, s.block * spatial) for s in layout)
        if name in _RESHAPE_OPS and len(ish) == 2 and len(osh) > 2 and osh[0] == ish[0]:
            spatial = int(np.prod(osh[2:]))
            if osh[1] * spatial == ish[1] and all(s.block % spatial == 0 for s in layout):
                return tuple(Segment(s.source, s.channels, s.block // spatial) for s in layout)
        raise self.unsupported(f"the op {name!r} (shape {list(ish)} -> {list(osh)})", layout)

    def on_binary(self, name: str, args, out, kind: str) -> None:
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        o = outs[0]
        operands = [a for a in args[:2]]
        result: Optional[Layout] = None
        out_c: Optional[int] = None
        for a in operands:
            if isinstance(a, torch.Tensor) and self.layout(a) is not None:
                ac = self.cdim(a) + o.dim() - a.dim()
                if out_c is not None and ac != out_c:
                    raise self.unsupported(f"the op {name!r} on tensors with channels in different dims",
                                           self.layout(a))
                out_c = ac
        pending_fixed = False
        for a in operands:
            if not isinstance(a, torch.Tensor):
                continue
            lay = self.layout(a)
            aligned = a.dim() == o.dim()
            idx = out_c - (o.dim() - a.dim())  # the operand's dim that broadcasting aligns with channels
            channels = a.shape[idx] if 0 <= idx < a.dim() else 1
            if lay is None and out_c is not None and channels > 1:
                lay = self.param_layout(a, idx)  # a learned per-channel tensor (layer scale, position embedding)
                aligned = aligned or lay is not None
            if lay is not None and not aligned:
                raise self.unsupported(f"the op {name!r} broadcasting a {a.dim()}-d tensor to {o.dim()}-d", lay)
            if lay is not None and a.shape[idx] == 1 and o.shape[out_c] > 1:
                self.fix_layout(lay)  # broadcast along channels: its single channel must stay
                continue
            if lay is None:
                if a.numel() > 1 and channels > 1:
                    # a constant with real channels (e.g. a learned per-channel scale outside any layer)
                    pending_fixed = True
                continue
            if result is None:
                result = lay
            else:
                self.tie(result, lay, kind, f"the op {name!r}")
        if result is None:
            return
        if pending_fixed:
            self.fix_layout(result)
        self.set_layout(o, result, out_c)

    def on_cat(self, args, kwargs, out) -> None:
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        tensors = list(tensors)
        nd = tensors[0].dim()
        dim = dim + nd if dim < 0 else dim
        cdims = {self.cdim(t) for t in tensors if self.layout(t) is not None}
        if len(cdims) != 1:
            raise self.unsupported("torch.cat of tensors with channels in different dims",
                                   tuple(s for t in tensors for s in (self.layout(t) or ())))
        c = cdims.pop()
        if dim == c:
            layout: List[Segment] = []
            for t in tensors:
                lay = self.layout(t) or self.param_layout(t, c)
                layout.extend(lay if lay is not None else (Segment(FIXED, int(t.shape[c])),))
            self.set_layout(out, tuple(layout), c)
            return
        lays = [self.layout(t) or self.param_layout(t, c) for t in tensors]
        base = next(lay for lay in lays if lay is not None)
        for t, lay in zip(tensors, lays):
            self.tie(base, lay if lay is not None else (Segment(FIXED, int(t.shape[c])),), "residual",
                     "torch.cat along a non-channel dimension")
        self.set_layout(out, base, c)

    # ---- leaf layers ---------------------------------------------------------------------------------------
    def new_source(self, module: nn.Module, name: str, channels: int) -> int:
        sid = self.source_of_module.get(id(module))
        if sid is None:
            sid = self.uf.add()
            self.source_of_module[id(module)] = sid
            self.source_names.append(name)
            self.source_channels.append(channels)
        return sid

    def on_leaf(self, module: nn.Module, name: str, pending: Tuple[Optional[Layout], int], inp: torch.Tensor,
                out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModelError(f"layer {name!r} ({type(module).__name__}) returned {type(out).__name__}, "
                                        f"expected a tensor")
        in_layout, in_cdim = pending
        batch = out.shape[0] if out.dim() > 1 else 1
        per_item = out.numel() // max(batch, 1)
        macs = layer_macs(module, out)
        out_layout: Optional[Layout] = None
        out_cdim = 1
        channel_last = isinstance(module, nn.Linear) and inp is not None and inp.dim() > 2
        if in_layout is not None and in_cdim != (inp.dim() - 1 if channel_last else 1):
            if self.is_fixed(in_layout):
                in_layout = None  # nothing of it is ever removed: the layer sees its full input
            else:
                raise self.unsupported_leaf(module, name, in_layout, f" with its channels in dim {in_cdim}")
        if isinstance(module, _CONVT_TYPES):
            if in_layout is not None:
                raise self.unsupported_leaf(module, name, in_layout)
            self.calls.append(_Call(name, module, "other", None, None, 1, macs))
            return
        if isinstance(module, CONV_TYPES):
            if in_layout is not None and _layout_features(in_layout) != module.in_channels:
                raise UnsupportedModelError(f"layer {name!r} expects {module.in_channels} input channels but "
                                            f"the traced input has {_layout_features(in_layout)}")
            factor = per_item // module.out_channels
            if module.groups > 1 and module.in_channels == module.out_channels and self.blocks_align(
                    in_layout, module.in_channels // module.groups):
                # depthwise or grouped with equal widths: output channel j belongs to the conv group of input
                # channel j, so the output follows the input and whole conv groups are removed together
                role, out_layout = "depthwise", in_layout
                for seg in in_layout or ():
                    if seg.source not in (None, FIXED):
                        self.uf.require_blocks(seg.source, module.in_channels // module.groups)
            elif module.groups > 1:
                # a grouped conv that changes the width (or straddles segments): keep its inputs and outputs
                self.fix_layout(in_layout)
                role = "fixed"
            else:
                role = "conv"
                if name not in self.ignore:
                    sid = self.new_source(module, name, module.out_channels)
                    out_layout = (Segment(sid, module.out_channels),)
            self.calls.append(_Call(name, module, role, in_layout, out_layout, factor, macs))
        elif isinstance(module, nn.Linear):
            # a linear layer on a >2-d input acts on every position's last dim (tokens, channel-last maps)
            if in_layout is not None and _layout_features(in_layout) != module.in_features:
                raise UnsupportedModelError(f"layer {name!r} expects {module.in_features} input features but "
                                            f"the traced input has {_layout_features(in_layout)}")
            if name not in self.ignore:
                sid = self.new_source(module, name, module.out_features)
                out_layout = (Segment(sid, module.out_features),)
                out_cdim = out.dim() - 1
            self.calls.append(_Call(name, module, "linear", in_layout, out_layout, per_item // module.out_features,
                                    macs))
        elif isinstance(module, NORM_TYPES):
            out_layout = in_layout
            self.calls.append(_Call(name, module, "norm", in_layout, out_layout, per_item // module.num_features,
                                    macs))
        self.set_layout(out, out_layout, out_cdim)

    @staticmethod
    def blocks_align(layout: Optional[Layout], block: int) -> bool:
        """Whether every segment of ``layout`` starts and ends on a multiple of ``block`` channels."""
        if block == 1 or layout is None:
            return True
        offset = 0
        for seg in layout:
            if seg.block != 1 or offset % block or seg.channels % block:
                return False
            offset += seg.features
        return True

    def unsupported_leaf(self, module: nn.Module, name: str, layout: Layout, extra: str = "") -> Exception:
        return UnsupportedModelError(
            f"layer {name!r} ({type(module).__name__}){extra} consumes channels produced by "
            f"{self.producers(layout)}, and the pruning engine has no handler for it; pass those producers "
            f"in `ignore` to keep their channels."
        )

    # ---- attention modules with a head handler ------------------------------------------------------------
    def enter_attention(self, handler: AttentionHandler, module: nn.Module, name: str, args: Tuple[Any, ...],
                        kwargs: Dict[str, Any]) -> None:
        """Heads become one source (channels = heads, ``head_dim`` features each); the input is read as by a
        linear layer on the last dim."""
        x = handler.inputs(args, kwargs)[0]
        layout = self.layout(x)
        if layout is not None and self.cdim(x) != x.dim() - 1:
            if not self.is_fixed(layout):
                raise self.unsupported_leaf(module, name, layout, f" with its channels in dim {self.cdim(x)}")
            layout = None
        heads, head_dim = handler.heads(module)
        sid = self.new_source(module, name, heads)
        self.frames.append(_AttentionFrame(handler, module, name, x, layout, (Segment(sid, heads, head_dim),),
                                           {f"{name}.{n}" for n in handler.per_head_linears(module)},
                                           {f"{name}.{n}" for n in handler.projections(module) if n is not None}))

    def leave_attention(self, out: Any) -> None:
        frame = self.frames.pop()
        module, name, x, heads = frame.module, frame.name, frame.x, frame.heads
        tokens, context = frame.handler.tokens(module, x)
        inner = _layout_features(heads)
        qkv_name, out_name = frame.handler.projections(module)
        qkv_macs, matmul_macs = tokens * x.shape[-1] * 3 * inner, 2 * tokens * context * inner
        if qkv_name is None:  # the module's own weights project q, k and v
            self.calls.append(_Call(name, module, "attention", frame.in_layout, heads, tokens,
                                    qkv_macs + matmul_macs, context))
        else:
            self.calls.append(_Call(f"{name}.{qkv_name}", module.get_submodule(qkv_name), "linear",
                                    frame.in_layout, heads * 3, tokens, qkv_macs))
            # its input layout makes a narrower embedding swap in the head-pruned forward (read from the weights)
            self.calls.append(_Call(name, module, "attention", frame.in_layout, heads, tokens, matmul_macs,
                                    context))
        proj, proj_name = module.get_submodule(out_name), f"{name}.{out_name}"
        out_layout: Optional[Layout] = None
        if proj_name not in self.ignore:
            out_layout = (Segment(self.new_source(proj, proj_name, proj.out_features), proj.out_features),)
        self.calls.append(_Call(proj_name, proj, "linear", heads, out_layout, tokens,
                                tokens * inner * proj.out_features))
        result = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        self.leave_opaque(out)
        self.set_layout(result[0], out_layout, result[0].dim() - 1)

    # ---- opaque modules (attention) ------------------------------------------------------------------------
    def enter_opaque(self, module: nn.Module, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        """An opaque module keeps every channel it reads; nothing inside it is traced (its products count)."""
        for t in tree_flatten((args, kwargs))[0]:
            self.fix_layout(self.layout(t))
        macs = attention_macs(module, args, kwargs)
        if macs:
            self.calls.append(_Call(name, module, "fixed", None, None, 1, macs))

    def leave_opaque(self, out: Any) -> None:
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                self.set_layout(o, None)

    # ---- driving the trace ---------------------------------------------------------------------------------
    def run(self, example_input: ExampleInput) -> Any:
        handles = []
        for name, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(self._pre_hook(name, module), with_kwargs=True))
            handles.append(module.register_forward_hook(self._post_hook(name, module)))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), _Recorder(self):
                if isinstance(example_input, (tuple, list)):
                    out = self.model(*example_input)
                elif isinstance(example_input, dict):
                    out = self.model(**example_input)
                else:
                    out = self.model(example_input)
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        # the classifier and every other model output keep all their channels
        for o in tree_flatten(out)[0]:
            self.fix_layout(self.layout(o))
        return out

    def _pre_hook(self, name: str, module: nn.Module):
        is_leaf = isinstance(module, LEAF_TYPES)
        opaque = is_opaque(module)
        handler = None if name in self.ignore else attention_handler(module)

        def hook(mod, args, kwargs):
            self.stack.append(name)
            mode = "opaque" if opaque or handler is not None else ("leaf" if is_leaf else "")
            if mode == "opaque" and self.leaf_depth == 0:
                self.busy = True
                try:
                    if handler is not None and handler.supports(mod, args, kwargs):
                        mode = "attention"
                        self.enter_attention(handler, mod, name, args, kwargs)
                    else:
                        self.enter_opaque(mod, name, args, kwargs)
                finally:
                    self.busy = False
            elif mode == "leaf" and self.leaf_depth == 0:
                self.busy = True
                inp = args[0] if args else None
                self.pending.append((self.layout(inp), self.cdim(inp) if inp is not None else 1))
                self.busy = False
            if mode:
                self.leaf_depth += 1
            if mode in ("opaque", "attention"):
                self.opaque_depth += 1
            self.modes.append(mode)
            return None

        return hook

    def _post_hook(self, name: str, module: nn.Module):
        def hook(mod, args, out):
            mode = self.modes.pop()
            if mode in ("opaque", "attention"):
                self.leaf_depth -= 1
                self.opaque_depth -= 1
                if self.leaf_depth == 0:
                    self.busy = True
                    try:
                        self.leave_attention(out) if mode == "attention" else self.leave_opaque(out)
                    finally:
                        self.busy = False
            elif mode == "leaf":
                self.leaf_depth -= 1
                if self.leaf_depth == 0:
                    self.busy = True
                    try:
                        self.on_leaf(mod, name, self.pending.pop(), args[0] if args else None, out)
                    finally:
                        self.busy = False
                elif self.opaque_depth > 0 and self.leaf_depth == self.opaque_depth and isinstance(out, torch.Tensor):
                    self.on_inner_leaf(mod, name, out)
            self.stack.pop()

        return hook

    def on_inner_leaf(self, module: nn.Module, name: str, out: torch.Tensor) -> None:
        """A layer inside an opaque or attention module: its cost counts and its channels are kept, except the
        output rows of a per-head layer of a traced attention (one row per head) and its projections (recorded
        with their layouts when the attention returns)."""
        macs = layer_macs(module, out)
        frame = self.frames[-1] if self.frames and self.opaque_depth == 1 else None
        if frame is not None and name in frame.projections:
            return
        if frame is not None and name in frame.per_head_linears:
            heads = frame.heads[0]
            self.calls.append(_Call(name, module, "linear", None, (Segment(heads.source, heads.channels),),
                                    out.numel() // out.shape[-1], macs))
        else:
            self.calls.append(_Call(name, module, "fixed", None, None, 1, macs))


# --------------------------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------------------------
def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix: List[str] = []
    for tokens in zip(*parts):
        if all(t == tokens[0] for t in tokens):
            prefix.append(tokens[0])
        else:
            break
    return ".".join(prefix)


def _resolve_ignore(model: nn.Module, ignore: Iterable[Union[str, nn.Module]]) -> List[str]:
    names = {id(m): n for n, m in model.named_modules()}
    known = set(names.values())
    out = []
    for item in ignore:
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise ValueError(f"ignored module {type(item).__name__} is not part of the model")
            out.append(names[id(item)])
        elif isinstance(item, str):
            if item not in known:
                raise ValueError(f"ignored layer {item!r} is not a module name of the model; "
                                 f"names look like {sorted(known - {''})[:5]}")
            # ignoring a container ignores every layer inside it
            out.extend(n for n in known if n == item or n.startswith(item + "."))
        else:
            raise TypeError(f"ignore entries must be module names or modules, got {type(item).__name__}")
    return out


class DependencyGraph:
    """Prunable groups of a model, the per-layer slicing specs and the traced layer calls: structure only.

    Build it with :meth:`build`; it is read-only afterwards and holds no gradients, importance or costs (the
    cost model, :class:`pruning_env.costs.analytic.CostTerms`, is built from :attr:`calls`).

    :ivar calls: every conv/linear/norm call of the trace in execution order (a layer called twice appears twice).
    :ivar params: parameters used outside any layer whose channels follow a group, by qualified name (only with
        ``prune_normalized``).
    :ivar traced_macs: MACs per image the trace counted (``None`` for a derived graph, which was not traced).
    """

    def __init__(self, model: nn.Module, groups: List[Group], specs: Dict[str, ModuleSpec],
                 calls: Tuple[LayerCall, ...], input_size: Tuple[int, ...], traced_macs: Optional[int] = None,
                 params: Optional[Dict[str, ParamSpec]] = None) -> None:
        self.model = model
        self.groups = groups
        self.specs = specs
        self.calls = calls
        self.input_size = input_size
        self.traced_macs = traced_macs
        self.params = params or {}

    @property
    def num_channels(self) -> np.ndarray:
        """Current widths of the groups, shape ``(n_groups,)``."""
        return np.array([g.num_channels for g in self.groups], dtype=np.int64)

    @property
    def layer_counts(self) -> np.ndarray:
        """Prunable conv/linear layers per group, shape ``(n_groups,)``."""
        return np.array([g.layer_count for g in self.groups], dtype=np.int64)

    @property
    def granularity(self) -> np.ndarray:
        """Channels removed together per group (aligned blocks), shape ``(n_groups,)``."""
        return np.array([g.granularity for g in self.groups], dtype=np.int64)

    @classmethod
    def build(cls, model: nn.Module, example_input: ExampleInput, ignore: Iterable[Union[str, nn.Module]] = (),
              prune_normalized: bool = False) -> "DependencyGraph":
        """Trace ``model`` on ``example_input`` and find its prunable groups.

        :param model: any ``nn.Module`` built from standard layers and functional glue; it is not modified.
        :param example_input: one input batch (tensor, tuple of positional tensors or dict of keyword tensors).
        :param ignore: layer names or modules whose output channels must never be removed.
        :param prune_normalized: also prune the channels an ``nn.LayerNorm`` normalises (a transformer's or
            ConvNeXt's embedding width), with the parameters added to them; off, they are kept whole.
        :raises UnsupportedModelError: when a construct would make pruning unsafe (names the module).
        """
        ignored = _resolve_ignore(model, ignore)
        if isinstance(example_input, torch.Tensor) and example_input.dim() >= 2 and example_input.shape[0] == 1:
            # a batch of one makes batch and channel dims ambiguous for squeeze/view: trace on two copies
            example_input = torch.cat([example_input, example_input], 0)
        tracer = _Tracer(model, ignored, prune_normalized)
        tracer.run(example_input)
        input_size = tuple(example_input.shape[1:]) if isinstance(example_input, torch.Tensor) else ()
        graph = cls._finalize(model, tracer, input_size)
        if not graph.groups:
            raise UnsupportedModelError(f"found no prunable channel group in {type(model).__name__}: every channel "
                                        f"is ignored, normalised jointly (LayerNorm; see prune_normalized), read "
                                        f"by an opaque module (attention) or an output")
        return graph

    def derive(self, model: nn.Module, num_channels: Sequence[int]) -> "DependencyGraph":
        """The graph of ``model``, a pruned copy of this graph's model with ``num_channels`` per group.

        No trace: the groups, names, layouts and layer calls carry over (only the widths change), so the
        structure stays the same even where a pruned model is ambiguous (a depthwise conv left with one
        channel looks like a plain conv).

        :param model: the model built by ``Pruner.apply`` from this graph's model.
        :param num_channels: its width per group (``plan.num_kept``).
        """
        counts = [int(c) for c in num_channels]
        if len(counts) != len(self.groups):
            raise ValueError(f"num_channels has {len(counts)} entries, the graph has {len(self.groups)} groups")
        modules = dict(model.named_modules())

        def update(layout: Optional[Layout]) -> Optional[Layout]:
            if layout is None:
                return None
            return tuple(s if s.source is None else Segment(s.source, counts[s.source], s.block) for s in layout)

        specs: Dict[str, ModuleSpec] = {}
        for name, spec in self.specs.items():
            module = modules.get(name)
            # a head-pruned attention is a subclass of its source's class (and a second pruning keeps it)
            if module is None or not isinstance(module, type(spec.module)) and not isinstance(spec.module,
                                                                                           type(module)):
                raise ValueError(f"model has no {type(spec.module).__name__} named {name!r}: it was not built from "
                                 f"this graph's model")
            new = ModuleSpec(name, module, spec.role, update(spec.out_layout), update(spec.in_layout))
            self._check_shapes(new)
            specs[name] = new
        params = {name: ParamSpec(name, spec.dim, update(spec.layout)) for name, spec in self.params.items()}
        for spec in params.values():
            size = model.get_parameter(spec.name).shape[spec.dim]
            if size != _layout_features(spec.layout):
                raise ValueError(f"parameter {spec.name!r} has {size} channels in dim {spec.dim} but the plan gives "
                                 f"{_layout_features(spec.layout)}: the model does not match these widths")
        for g, c in zip(self.groups, counts):
            if c % g.granularity:
                raise ValueError(f"group {g.name!r} removes channels in blocks of {g.granularity}, so its width "
                                 f"must be a multiple of {g.granularity}, got {c}")
        groups = [Group(g.name, g.members, c, g.followers, g.consumers, g.kind, g.granularity)
                  for g, c in zip(self.groups, counts)]
        return DependencyGraph(model, groups, specs, self.calls, self.input_size, params=params)

    @staticmethod
    def _check_shapes(spec: ModuleSpec) -> None:
        m = spec.module
        if isinstance(m, nn.Linear):
            out_n, in_n = m.out_features, m.in_features
        elif isinstance(m, CONV_TYPES):
            out_n, in_n = m.out_channels, m.in_channels
        elif spec.role == "attention":
            heads, head_dim = attention_handler(m).heads(m)
            out_n, in_n = heads * head_dim, None
        elif spec.role == "layernorm":
            out_n, in_n = m.normalized_shape[0], None
        else:
            out_n, in_n = m.num_features, None
        for layout, n, what in ((spec.out_layout, out_n, "outputs"), (spec.in_layout, in_n, "inputs")):
            if layout is not None and n is not None and _layout_features(layout) != n:
                raise ValueError(f"layer {spec.name!r} has {n} {what} but the plan gives "
                                 f"{_layout_features(layout)}: the model does not match these widths")

    @classmethod
    def _finalize(cls, model: nn.Module, tracer: _Tracer, input_size: Tuple[int, ...]) -> "DependencyGraph":
        uf = tracer.uf
        for call in tracer.calls:  # layouts recorded before a partition cut their sources
            call.in_layout = partitions.expand(tracer, call.in_layout)
            call.out_layout = partitions.expand(tracer, call.out_layout)
        roots: Dict[int, List[int]] = {}
        for sid in range(len(uf.parent)):
            root = uf.find(sid)
            if not uf.fixed[root]:
                roots.setdefault(root, []).append(sid)
        group_of_source: Dict[int, int] = {}
        groups: List[Group] = []
        param_ids = {sid for sid, _ in tracer.param_sources.values()}
        for root in sorted(roots):  # root = earliest source in execution order
            sources = sorted(roots[root])
            if all(s in param_ids for s in sources):
                continue  # parameters tied to no layer: nothing produces these channels, they stay
            channels = {tracer.source_channels[s] for s in sources}
            if len(channels) != 1:
                raise UnsupportedModelError(
                    f"layers {[tracer.source_names[s] for s in sources]} are tied elementwise but have "
                    f"different widths {sorted(channels)}")
            for s in sources:
                group_of_source[s] = len(groups)
            # the parts of a partitioned layer's output are named after it (tied chunks: one member)
            members = tuple(dict.fromkeys(tracer.source_names[s] for s in sources if s not in param_ids))
            kinds = uf.kinds[root] - {"partition"}
            kind = "layer" if len(members) == 1 and not kinds else ("residual" if "residual" in kinds else "se")
            groups.append(Group(name="", members=members, num_channels=channels.pop(), kind=kind,
                                granularity=uf.granularity[root]))

        def resolve(layout: Optional[Layout]) -> Optional[Layout]:
            if layout is None:
                return None
            return tuple(Segment(group_of_source.get(s.source) if s.source not in (None, FIXED) else None,
                                 s.channels, s.block) for s in layout)

        specs: Dict[str, ModuleSpec] = {}
        followers: Dict[int, List[str]] = {i: [] for i in range(len(groups))}
        consumers: Dict[int, List[str]] = {i: [] for i in range(len(groups))}
        for call in tracer.calls:
            if call.role in ("fixed", "other"):
                continue
            in_l, out_l = resolve(call.in_layout), resolve(call.out_layout)
            if call.role in ("norm", "layernorm", "depthwise"):
                spec = ModuleSpec(call.name, call.module, call.role, out_layout=out_l, in_layout=out_l)
            else:
                spec = ModuleSpec(call.name, call.module, call.role, out_layout=out_l, in_layout=in_l)
            prev = specs.get(call.name)
            if prev is not None and (prev.in_layout != spec.in_layout or prev.out_layout != spec.out_layout):
                raise UnsupportedModelError(f"layer {call.name!r} is called several times on inputs with "
                                            f"different channel structure; it cannot be pruned consistently")
            specs[call.name] = spec
            if prev is None:
                touched = {s.source for s in (in_l or ()) if s.source is not None}
                for g in touched:
                    follows = call.role in ("norm", "layernorm", "depthwise")
                    (followers if follows else consumers)[g].append(call.name)
                # rows that follow a group they do not produce (q/k/v of heads, per-head layers) follow it too
                for g in {s.source for s in (out_l or ()) if s.source is not None} - touched:
                    if call.name not in groups[g].members:
                        followers[g].append(call.name)
        params: Dict[str, ParamSpec] = {}
        for pname, (sid, dim) in tracer.param_sources.items():
            layout = resolve((Segment(sid, tracer.source_channels[sid]),))
            if layout[0].source is not None:
                params[pname] = ParamSpec(pname, dim, layout)
                followers[layout[0].source].append(pname)
        for gi, g in enumerate(groups):
            g.followers = tuple(followers[gi])
            g.consumers = tuple(consumers[gi])
        cls._name_groups(groups)
        calls = tuple(LayerCall(c.name, c.role, c.factor, c.const_macs if c.role in ("fixed", "other") else 0,
                                c.context) for c in tracer.calls)
        return cls(model, groups, specs, calls, input_size, traced_macs=sum(c.const_macs for c in tracer.calls),
                   params=params)

    @staticmethod
    def _name_groups(groups: List[Group]) -> None:
        seen: Dict[str, int] = {}
        for i, g in enumerate(groups):
            if len(g.members) == 1:
                name = g.members[0]
            else:
                prefix = _common_prefix(g.members) or g.members[0].split(".")[0]
                shown = "+".join(g.members[:3]) + ("+..." if len(g.members) > 3 else "")
                name = f"{prefix} {g.kind} ({shown})"
            if name in seen:
                seen[name] += 1
                name = f"{name} #{seen[name]}"
            else:
                seen[name] = 1
            g.name = name
