"""Dependency groups of a network, found by tracing one eager forward pass on an example input.

A group is a set of layers whose output channels must be removed with the same indices, plus every layer whose
input channels (or BatchNorm / depthwise channels) follow; see ``docs/pruning.md`` for the rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from pruning_env.costs import NORM_MACS_PER_ELEMENT, count_params, layer_macs

__all__ = [
    "Segment",
    "Group",
    "ModuleSpec",
    "CostTerms",
    "DependencyGraph",
    "UnsupportedModelError",
    "CONV_TYPES",
    "NORM_TYPES",
]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Layer types the tracer treats as opaque leaves (their inner functional calls are not recorded).
LEAF_TYPES = CONV_TYPES + NORM_TYPES + _CONVT_TYPES + (nn.Linear,)
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
    :ivar followers: BatchNorm and depthwise layers whose channels follow the group.
    :ivar consumers: conv/linear layers whose input channels (or flattened features) follow the group.
    :ivar kind: ``"layer"`` (one producer), ``"residual"`` (merged by addition) or ``"se"`` (by a multiply).
    """

    name: str
    members: Tuple[str, ...]
    num_channels: int
    followers: Tuple[str, ...] = ()
    consumers: Tuple[str, ...] = ()
    kind: str = "layer"

    @property
    def layer_count(self) -> int:
        """Number of prunable conv/linear layers whose outputs this group removes (authors' cluster size)."""
        return len(self.members)


@dataclass
class ModuleSpec:
    """How one traced layer is sliced: layouts of its output (dim 0 of its parameters) and input channels."""

    name: str
    module: nn.Module
    role: str  # "conv", "linear", "norm", "depthwise"
    out_layout: Optional[Layout] = None  # resolved: Segment.source is a group index or None
    in_layout: Optional[Layout] = None


@dataclass
class CostTerms:
    """Analytic MACs / params as sums of ``weight * (c1 + v1.k) * (c2 + v2.k)`` over group widths ``k``."""

    macs_const: int
    macs_w: np.ndarray
    macs_c1: np.ndarray
    macs_v1: np.ndarray
    macs_c2: np.ndarray
    macs_v2: np.ndarray
    params_const: int
    params_w: np.ndarray
    params_c1: np.ndarray
    params_v1: np.ndarray
    params_c2: np.ndarray
    params_v2: np.ndarray

    def evaluate(self, counts: np.ndarray) -> Tuple[int, int]:
        """(MACs, params) for group widths ``counts``."""
        k = np.asarray(counts, dtype=np.int64)
        macs = self.macs_const + int(
            np.sum(self.macs_w * (self.macs_c1 + self.macs_v1 @ k) * (self.macs_c2 + self.macs_v2 @ k))
        )
        params = self.params_const + int(
            np.sum(self.params_w * (self.params_c1 + self.params_v1 @ k) * (self.params_c2 + self.params_v2 @ k))
        )
        return macs, params


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
_RESHAPE_OPS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}


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

    def add(self) -> int:
        self.parent.append(len(self.parent))
        self.fixed.append(False)
        self.kinds.append(set())
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


class _Tracer:
    def __init__(self, model: nn.Module, ignore: Sequence[str]) -> None:
        self.model = model
        self.ignore = set(ignore)
        self.layouts: Dict[int, Tuple[torch.Tensor, Layout]] = {}
        self.uf = _UnionFind()
        self.source_of_module: Dict[int, int] = {}
        self.source_names: List[str] = []
        self.source_channels: List[int] = []
        self.calls: List[_Call] = []
        self.stack: List[str] = []
        self.leaf_depth = 0
        self.busy = False
        self.pending: List[Optional[Layout]] = []
        self.token_linears: List[str] = []  # linear layers on >2-d inputs, kept whole

    # ---- layouts -------------------------------------------------------------------------------------------
    def layout(self, t: Any) -> Optional[Layout]:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self.layouts.get(id(t))
        if entry is None or entry[0] is not t:
            return None
        return entry[1]

    def set_layout(self, t: torch.Tensor, layout: Optional[Layout]) -> None:
        if layout is None:
            self.layouts.pop(id(t), None)
        else:
            self.layouts[id(t)] = (t, layout)

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

    # ---- functional ops ------------------------------------------------------------------------------------
    def on_function(self, func, args, kwargs, out) -> None:
        flat_in, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat_in if isinstance(t, torch.Tensor)]
        sourced = [(t, self.layout(t)) for t in tensors]
        sourced = [(t, lay) for t, lay in sourced if lay is not None]
        if not sourced:
            return
        name = getattr(func, "__name__", str(func))
        if name.startswith("_") and not name.startswith("__"):
            name = name[1:]  # boolean-dispatch helpers such as _max_pool2d
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not outs:
            if name == "__setitem__":
                raise self.unsupported("an in-place item assignment", sourced[0][1])
            return  # shape queries, python scalars: channels are not affected
        if name in _CAT_OPS:
            self.on_cat(args, kwargs, out)
        elif name in _ADD_OPS or name in _MUL_OPS:
            self.on_binary(name, args, out, "residual" if name in _ADD_OPS else "se")
        elif name in _PRESERVE:
            self.on_preserve(name, args, sourced, outs)
        else:
            raise self.unsupported(f"the op {name!r}", sourced[0][1])

    def on_preserve(self, name: str, args, sourced, outs) -> None:
        first = args[0] if args else None
        src = first if isinstance(first, torch.Tensor) and self.layout(first) is not None else sourced[0][0]
        layout = self.layout(src)
        if len(sourced) > 1 and any(t is not src for t, _ in sourced):
            raise self.unsupported(f"the op {name!r} with several channel-carrying inputs", layout)
        for o in outs:
            new = self.reshape_layout(name, src, layout, o)
            self.set_layout(o, new)

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
        pending_fixed = False
        for a in operands:
            if not isinstance(a, torch.Tensor):
                continue
            lay = self.layout(a)
            aligned = a.dim() == o.dim()
            idx = 1 - (o.dim() - a.dim())  # the operand's dim that broadcasting aligns with channels
            channels = a.shape[idx] if 0 <= idx < a.dim() else 1
            if lay is not None and not aligned:
                raise self.unsupported(f"the op {name!r} broadcasting a {a.dim()}-d tensor to {o.dim()}-d", lay)
            if lay is not None and a.dim() >= 2 and a.shape[1] == 1 and o.shape[1] > 1:
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
        self.set_layout(o, result)

    def on_cat(self, args, kwargs, out) -> None:
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        tensors = list(tensors)
        nd = tensors[0].dim()
        dim = dim + nd if dim < 0 else dim
        if dim == 1:
            layout: List[Segment] = []
            for t in tensors:
                lay = self.layout(t)
                layout.extend(lay if lay is not None else (Segment(FIXED, int(t.shape[1])),))
            self.set_layout(out, tuple(layout))
            return
        if dim == 0 or dim >= 2:
            lays = [self.layout(t) for t in tensors]
            base = next(lay for lay in lays if lay is not None)
            for t, lay in zip(tensors, lays):
                self.tie(base, lay if lay is not None else (Segment(FIXED, int(t.shape[1])),), "residual",
                         "torch.cat along a non-channel dimension")
            self.set_layout(out, base)

    # ---- leaf layers ---------------------------------------------------------------------------------------
    def new_source(self, module: nn.Module, name: str, channels: int) -> int:
        sid = self.source_of_module.get(id(module))
        if sid is None:
            sid = self.uf.add()
            self.source_of_module[id(module)] = sid
            self.source_names.append(name)
            self.source_channels.append(channels)
        return sid

    def on_leaf(self, module: nn.Module, name: str, in_layout: Optional[Layout], inp: torch.Tensor,
                out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModelError(f"layer {name!r} ({type(module).__name__}) returned {type(out).__name__}, "
                                        f"expected a tensor")
        batch = out.shape[0] if out.dim() > 1 else 1
        per_item = out.numel() // max(batch, 1)
        macs = layer_macs(module, out)
        out_layout: Optional[Layout] = None
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
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            if depthwise:
                role, out_layout = "depthwise", in_layout
            elif module.groups > 1:
                # a general grouped conv needs equal channel counts per group: keep its inputs and outputs
                self.fix_layout(in_layout)
                role = "fixed"
            else:
                role = "conv"
                if name not in self.ignore:
                    sid = self.new_source(module, name, module.out_channels)
                    out_layout = (Segment(sid, module.out_channels),)
            self.calls.append(_Call(name, module, role, in_layout, out_layout, factor, macs))
        elif isinstance(module, nn.Linear):
            if inp.dim() != 2:
                # token-wise linear layers (transformers): channels are the last dim, not supported here
                if in_layout is not None:
                    raise self.unsupported_leaf(module, name, in_layout, f" on a {inp.dim()}-d input")
                self.token_linears.append(name)
                self.calls.append(_Call(name, module, "fixed", None, None, 1, macs))
                self.set_layout(out, None)
                return
            if in_layout is not None and _layout_features(in_layout) != module.in_features:
                raise UnsupportedModelError(f"layer {name!r} expects {module.in_features} input features but "
                                            f"the traced input has {_layout_features(in_layout)}")
            if name not in self.ignore:
                sid = self.new_source(module, name, module.out_features)
                out_layout = (Segment(sid, module.out_features),)
            self.calls.append(_Call(name, module, "linear", in_layout, out_layout, per_item // module.out_features,
                                    macs))
        elif isinstance(module, NORM_TYPES):
            out_layout = in_layout
            self.calls.append(_Call(name, module, "norm", in_layout, out_layout, per_item // module.num_features,
                                    macs))
        self.set_layout(out, out_layout)

    def unsupported_leaf(self, module: nn.Module, name: str, layout: Layout, extra: str = "") -> Exception:
        return UnsupportedModelError(
            f"layer {name!r} ({type(module).__name__}){extra} consumes channels produced by "
            f"{self.producers(layout)}, and the pruning engine has no handler for it; pass those producers "
            f"in `ignore` to keep their channels."
        )

    # ---- driving the trace ---------------------------------------------------------------------------------
    def run(self, example_input: Any) -> Any:
        handles = []
        for name, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(self._pre_hook(name, module)))
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

        def hook(mod, args):
            self.stack.append(name)
            if is_leaf:
                if self.leaf_depth == 0:
                    self.busy = True
                    inp = args[0] if args else None
                    self.pending.append(self.layout(inp))
                    self.busy = False
                self.leaf_depth += 1

        return hook

    def _post_hook(self, name: str, module: nn.Module):
        is_leaf = isinstance(module, LEAF_TYPES)

        def hook(mod, args, out):
            if is_leaf:
                self.leaf_depth -= 1
                if self.leaf_depth == 0:
                    self.busy = True
                    try:
                        self.on_leaf(mod, name, self.pending.pop(), args[0] if args else None, out)
                    finally:
                        self.busy = False
            self.stack.pop()

        return hook


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
    """Prunable groups of a model plus the per-layer slicing specs and the analytic cost terms.

    Build it with :meth:`build`; it is read-only afterwards and does not hold gradients or importance.
    """

    def __init__(self, model: nn.Module, groups: List[Group], specs: Dict[str, ModuleSpec], costs: CostTerms,
                 input_size: Tuple[int, ...]) -> None:
        self.model = model
        self.groups = groups
        self.specs = specs
        self.costs = costs
        self.input_size = input_size

    @property
    def num_channels(self) -> np.ndarray:
        """Current widths of the groups, shape ``(n_groups,)``."""
        return np.array([g.num_channels for g in self.groups], dtype=np.int64)

    @property
    def layer_counts(self) -> np.ndarray:
        """Prunable conv/linear layers per group, shape ``(n_groups,)``."""
        return np.array([g.layer_count for g in self.groups], dtype=np.int64)

    @classmethod
    def build(cls, model: nn.Module, example_input: Any, ignore: Iterable[Union[str, nn.Module]] = ()
              ) -> "DependencyGraph":
        """Trace ``model`` on ``example_input`` and find its prunable groups.

        :param model: any ``nn.Module`` built from standard layers and functional glue; it is not modified.
        :param example_input: one input batch (tensor, tuple of positional tensors or dict of keyword tensors).
        :param ignore: layer names or modules whose output channels must never be removed.
        :raises UnsupportedModelError: when a construct would make pruning unsafe (names the module).
        """
        ignored = _resolve_ignore(model, ignore)
        if isinstance(example_input, torch.Tensor) and example_input.dim() >= 2 and example_input.shape[0] == 1:
            # a batch of one makes batch and channel dims ambiguous for squeeze/view: trace on two copies
            example_input = torch.cat([example_input, example_input], 0)
        tracer = _Tracer(model, ignored)
        tracer.run(example_input)
        input_size = tuple(example_input.shape[1:]) if isinstance(example_input, torch.Tensor) else ()
        graph = cls._finalize(model, tracer, input_size)
        if not graph.groups:
            hint = (f"; token-wise linear layers on >2-d inputs (transformers) are not pruned: "
                    f"{tracer.token_linears[:3]}" if tracer.token_linears else "")
            raise UnsupportedModelError(f"found no prunable channel group in {type(model).__name__}{hint}")
        return graph

    def derive(self, model: nn.Module, num_channels: Sequence[int]) -> "DependencyGraph":
        """The graph of ``model``, a pruned copy of this graph's model with ``num_channels`` per group.

        No trace: the groups, names, layouts and cost terms carry over (only the widths change), so the
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
            if module is None or type(module) is not type(spec.module):
                raise ValueError(f"model has no {type(spec.module).__name__} named {name!r}: it was not built from "
                                 f"this graph's model")
            new = ModuleSpec(name, module, spec.role, update(spec.out_layout), update(spec.in_layout))
            self._check_shapes(new)
            specs[name] = new
        groups = [Group(g.name, g.members, c, g.followers, g.consumers, g.kind) for g, c in zip(self.groups, counts)]
        return DependencyGraph(model, groups, specs, self.costs, self.input_size)

    @staticmethod
    def _check_shapes(spec: ModuleSpec) -> None:
        m = spec.module
        if isinstance(m, nn.Linear):
            out_n, in_n = m.out_features, m.in_features
        elif isinstance(m, CONV_TYPES):
            out_n, in_n = m.out_channels, m.in_channels
        else:
            out_n, in_n = m.num_features, None
        for layout, n, what in ((spec.out_layout, out_n, "outputs"), (spec.in_layout, in_n, "inputs")):
            if layout is not None and n is not None and _layout_features(layout) != n:
                raise ValueError(f"layer {spec.name!r} has {n} {what} but the plan gives "
                                 f"{_layout_features(layout)}: the model does not match these widths")

    @classmethod
    def _finalize(cls, model: nn.Module, tracer: _Tracer, input_size: Tuple[int, ...]) -> "DependencyGraph":
        uf = tracer.uf
        roots: Dict[int, List[int]] = {}
        for sid in range(len(uf.parent)):
            root = uf.find(sid)
            if not uf.fixed[root]:
                roots.setdefault(root, []).append(sid)
        group_of_source: Dict[int, int] = {}
        groups: List[Group] = []
        for gi, root in enumerate(sorted(roots)):  # root = earliest source in execution order
            sources = sorted(roots[root])
            channels = {tracer.source_channels[s] for s in sources}
            if len(channels) != 1:
                raise UnsupportedModelError(
                    f"layers {[tracer.source_names[s] for s in sources]} are tied elementwise but have "
                    f"different widths {sorted(channels)}")
            for s in sources:
                group_of_source[s] = gi
            members = tuple(tracer.source_names[s] for s in sources)
            kinds = uf.kinds[root]
            kind = "layer" if len(members) == 1 and not kinds else ("residual" if "residual" in kinds else "se")
            groups.append(Group(name="", members=members, num_channels=channels.pop(), kind=kind))

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
            if call.role in ("norm", "depthwise"):
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
                    (followers if call.role in ("norm", "depthwise") else consumers)[g].append(call.name)
        for gi, g in enumerate(groups):
            g.followers = tuple(followers[gi])
            g.consumers = tuple(consumers[gi])
        cls._name_groups(groups)
        costs = cls._cost_terms(model, tracer, resolve, len(groups))
        graph = cls(model, groups, specs, costs, input_size)
        traced_macs = sum(c.const_macs for c in tracer.calls)
        macs, _ = costs.evaluate(graph.num_channels)
        if macs != traced_macs:  # internal consistency: the analytic model must reproduce the traced count
            raise UnsupportedModelError(f"analytic MACs {macs} differ from the traced count {traced_macs}; "
                                        f"the model uses a layer configuration the cost terms do not cover")
        return graph

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

    @staticmethod
    def _cost_terms(model: nn.Module, tracer: _Tracer, resolve, n_groups: int) -> CostTerms:
        macs_rows: List[Tuple[int, Tuple[int, np.ndarray], Tuple[int, np.ndarray]]] = []
        param_rows: List[Tuple[int, Tuple[int, np.ndarray], Tuple[int, np.ndarray]]] = []
        macs_const = 0
        one = (1, np.zeros(n_groups, dtype=np.int64))

        def expr(layout: Optional[Layout], full: int) -> Tuple[int, np.ndarray]:
            v = np.zeros(n_groups, dtype=np.int64)
            if layout is None:
                return full, v
            c = 0
            for s in layout:
                if s.source is None:
                    c += s.features
                else:
                    v[s.source] += s.block
            return c, v

        handled_params = 0
        seen_modules = set()
        for call in tracer.calls:
            m = call.module
            if call.role in ("fixed", "other"):
                macs_const += call.const_macs
                continue
            out_l, in_l = resolve(call.out_layout), resolve(call.in_layout)
            first = id(m) not in seen_modules
            seen_modules.add(id(m))
            if call.role == "conv" or call.role == "linear":
                k_area = int(np.prod(m.kernel_size)) if call.role == "conv" else 1
                n_out = m.out_channels if call.role == "conv" else m.out_features
                n_in = m.in_channels if call.role == "conv" else m.in_features
                e_in, e_out = expr(in_l, n_in), expr(out_l, n_out)
                macs_rows.append((call.factor * k_area, e_in, e_out))
                if first:
                    param_rows.append((k_area, e_in, e_out))
                    if m.bias is not None:
                        param_rows.append((1, one, e_out))
            elif call.role == "depthwise":
                k_area = int(np.prod(m.kernel_size))
                e = expr(out_l, m.out_channels)
                macs_rows.append((call.factor * k_area, one, e))
                if first:
                    param_rows.append((k_area, one, e))
                    if m.bias is not None:
                        param_rows.append((1, one, e))
            elif call.role == "norm":
                e = expr(out_l, m.num_features)
                macs_rows.append((NORM_MACS_PER_ELEMENT * call.factor, one, e))
                if first:
                    if m.weight is not None:
                        param_rows.append((1, one, e))
                    if m.bias is not None:
                        param_rows.append((1, one, e))
            if first:
                handled_params += sum(p.numel() for p in (getattr(m, "weight", None), getattr(m, "bias", None))
                                      if isinstance(p, torch.Tensor))

        def stack(rows):
            if not rows:
                z = np.zeros((0,), dtype=np.int64)
                zz = np.zeros((0, n_groups), dtype=np.int64)
                return z, z, zz, z, zz
            w = np.array([r[0] for r in rows], dtype=np.int64)
            c1 = np.array([r[1][0] for r in rows], dtype=np.int64)
            v1 = np.stack([r[1][1] for r in rows])
            c2 = np.array([r[2][0] for r in rows], dtype=np.int64)
            v2 = np.stack([r[2][1] for r in rows])
            return w, c1, v1, c2, v2

        mw, mc1, mv1, mc2, mv2 = stack(macs_rows)
        pw, pc1, pv1, pc2, pv2 = stack(param_rows)
        return CostTerms(macs_const, mw, mc1, mv1, mc2, mv2, count_params(model) - handled_params,
                         pw, pc1, pv1, pc2, pv2)
