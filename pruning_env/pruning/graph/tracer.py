"""The tracer: one eager forward pass under a ``TorchFunctionMode`` and module hooks, following channel layouts.

Every torch function call goes to :meth:`Tracer.on_function`, which dispatches on the op's kind (tables in
:mod:`.ops`) to the functional handlers (:mod:`.functional`) or the partitions (:mod:`.partitions`); module hooks
record leaf layers, attention modules with a head handler and opaque modules (:mod:`.layers`). The result is raw:
source ids tied in a union-find and the list of layer calls, which :class:`~.graph.DependencyGraph` resolves into
groups. The tracer computes no costs: a call records its geometry (output positions, attention context), and the
cost model (:mod:`pruning_env.costs`) owns the MACs formulas.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from pruning_env.pruning.attention import attention_handler
from pruning_env.pruning.graph import partitions
from pruning_env.pruning.graph.constants import Rewrite, Watch
from pruning_env.pruning.graph.functional import FunctionalOps
from pruning_env.pruning.graph.layers import AttentionFrame, LayerOps, TracedCall
from pruning_env.pruning.graph.layouts import (FIXED, ExampleInput, Layout, Segment, UnsupportedModelError,
                                               layout_features)
from pruning_env.pruning.graph.norms import NormOps
from pruning_env.pruning.graph.ops import (ADD_OPS, CAT_OPS, EXPAND_OPS, FREEZE_OPS, LEAF_TYPES, MUL_OPS, NEW_OPS,
                                          PERMUTE_OPS, PRESERVE_OPS, RESHAPE_OPS, is_opaque)
from pruning_env.pruning.graph.unionfind import UnionFind

__all__ = ["Tracer"]


class Recorder(TorchFunctionMode):
    """Forwards every torch function call to the tracer (the mode is disabled while the handler runs)."""

    def __init__(self, tracer: "Tracer") -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        tracer.watch.quiet += 1  # a watched attribute passed to a torch function is noted by scan, not its dunders
        try:
            out = func(*args, **kwargs)
            if tracer.busy:
                return out
            flat_in, _ = tree_flatten((args, kwargs))
            tracer.watch.scan(flat_in)
            try:
                if tracer.leaf_depth == 0:
                    tracer.busy = True
                    try:
                        tracer.on_function(func, flat_in, args, kwargs, out)
                    finally:
                        tracer.busy = False
            finally:
                tracer.watch.done()
        finally:
            tracer.watch.quiet -= 1
        return out


class Tracer(FunctionalOps, LayerOps, NormOps):
    """Records one eager forward pass: the layout of every channel tensor, the sources tied by the ops, and the
    calls of conv / linear / norm / attention layers. :meth:`run` drives it; the graph reads :attr:`calls`,
    :attr:`uf` and the sources afterwards."""

    def __init__(self, model: nn.Module, ignore: Sequence[str], prune_normalized: bool = False) -> None:
        self.model = model
        self.ignore = set(ignore)
        self.prune_normalized = prune_normalized
        # with prune_normalized: id(tensor) -> (tensor, parameter, qualified name) for the model's parameters and
        # their expanded views; the parameters met beside channels become sources: name -> (source id, dim)
        self.params: Dict[int, Tuple[torch.Tensor, nn.Parameter, str]] = {
            id(p): (p, p, n) for n, p in model.named_parameters()} if prune_normalized else {}
        self.param_sources: Dict[str, Tuple[int, int]] = {}
        # id(view) -> the dim of a reshaped (then maybe expanded) 1-d parameter's view that holds its values
        self.param_dims: Dict[int, int] = {}
        # id(tensor) -> (tensor, layout of its channel dim, which dim holds the channels)
        self.layouts: Dict[int, Tuple[torch.Tensor, Layout, int]] = {}
        self.uf = UnionFind()
        self.source_of_module: Dict[int, int] = {}
        self.source_names: List[str] = []
        self.source_channels: List[int] = []
        self.calls: List[TracedCall] = []
        self.stack: List[str] = []
        self.leaf_depth = 0
        self.opaque_depth = 0
        self.busy = False
        self.pending: List[Tuple[Optional[Layout], int]] = []
        self.modes: List[str] = []  # per module call on the stack: "attention", "opaque", "leaf" or ""
        self.frames: List[AttentionFrame] = []  # attention calls being traced
        self.parts: Dict[int, List[Tuple[int, int]]] = {}  # partitioned source -> its (part source, channels)
        self.watch = Watch(self)  # module attributes a partition's sizes / bounds may come from
        self.rewrites: List[Rewrite] = []  # the attributes surgery rewrites (layouts of source ids)

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
        if layout_features(a) == layout_features(b):
            # identical features but segmented differently: cut both at each other's boundaries, tie the pieces
            # (only safe where a cut source is not tied elsewhere, else partitions keep the parts: see _partition)
            try:
                a, b = partitions.align(self, a, b)
            except UnsupportedModelError:
                self.fix_layout(a)
                self.fix_layout(b)
                return
            for x, y in zip(a, b):
                if x.channels != y.channels or x.block != y.block:  # e.g. a flattened block against channels
                    self.fix_layout(a)
                    self.fix_layout(b)
                    return
            for x, y in zip(a, b):
                self.uf.union(x.source, y.source, kind)
            return
        raise self.unsupported(f"{what} between tensors of different channel layouts", a + b)

    def fix_layout(self, layout: Optional[Layout]) -> None:
        for s in partitions.expand(self, layout) or ():  # a partitioned source: its parts
            if s.source not in (None, FIXED):
                self.uf.fix(s.source)

    def is_fixed(self, layout: Optional[Layout]) -> bool:
        """Whether no channel of ``layout`` can ever be removed (fixing is final, so this stays true)."""
        return all(s.source in (None, FIXED) or self.uf.fixed[self.uf.find(s.source)] for s in layout or ())


    def width_signature(self, layout: Layout) -> Tuple[int, Tuple[Tuple[int, int], ...]]:
        """What the pruned width of ``layout`` depends on: (kept features, sorted (group root, features per
        channel)); two layouts with the same signature have the same width under every plan."""
        fixed, weights = 0, {}
        for s in layout:
            root = None if s.source in (None, FIXED) else self.uf.find(s.source)
            if root is None or self.uf.fixed[root]:
                fixed += s.features
            else:
                weights[root] = weights.get(root, 0) + s.block
        return fixed, tuple(sorted(weights.items()))

    # ---- functional ops ------------------------------------------------------------------------------------
    def on_function(self, func, flat_in, args, kwargs, out) -> None:
        tensors = [t for t in flat_in if isinstance(t, torch.Tensor)]
        sourced = [(t, self.layout(t)) for t in tensors]
        sourced = [(t, lay) for t, lay in sourced if lay is not None]
        name = getattr(func, "__name__", str(func))
        if not sourced:
            if name in EXPAND_OPS and args and self.param_of(args[0]) is not None and isinstance(out, torch.Tensor):
                src, param, pname = self.param_of(args[0])
                self.params[id(out)] = (out, param, pname)  # e.g. ViT's class token expanded to the batch
                if id(src) in self.param_dims:
                    self.param_dims[id(out)] = self.param_dims[id(src)] + out.dim() - src.dim()
            elif name in RESHAPE_OPS and args and self.param_of(args[0]) is not None and isinstance(out, torch.Tensor):
                _, param, pname = self.param_of(args[0])
                dims = [d for d, n in enumerate(out.shape) if n > 1]
                # e.g. a layer scale, gamma.reshape(1, -1, 1, 1); a width spelt out (view(self.shape), a stored
                # tuple) would not fit the pruned parameter, so that parameter's channels stay
                if param.dim() == 1 and len(dims) == 1 and self.sized_by_parameter(name, args, kwargs, dims[0]):
                    self.params[id(out)] = (out, param, pname)
                    self.param_dims[id(out)] = dims[0]
            return
        if name.startswith("_") and not name.startswith("__"):
            name = name[1:]  # boolean-dispatch helpers such as _max_pool2d
        if name == "type_as" and self.layout(args[0]) is None or name in NEW_OPS:
            return  # the channel tensor only gives a dtype / device (e.g. YOLO's anchors: arange(w).type_as(feats))
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not outs:
            if name == "__setitem__" and not all(self.is_fixed(lay) for _, lay in sourced):
                raise self.unsupported("an in-place item assignment", sourced[0][1])
            return  # shape queries, python scalars: channels are not affected
        if name == "layer_norm" and self.prune_normalized and self.on_layer_norm(args, kwargs, sourced, outs):
            return
        if name == "group_norm" and self.on_group_norm(args, kwargs, sourced, outs):
            return
        if name in FREEZE_OPS:
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
            elif name in CAT_OPS:
                self.on_cat(args, kwargs, out)
            elif name in ADD_OPS or name in MUL_OPS:
                self.on_binary(name, args, out, "residual" if name in ADD_OPS else "se")
            elif name in PERMUTE_OPS:
                self.on_permute(name, args, kwargs, sourced, outs)
            elif name in PRESERVE_OPS:
                self.on_preserve(name, args, kwargs, sourced, outs)
            else:
                raise self.unsupported(f"the op {name!r}", sourced[0][1])
        except UnsupportedModelError:
            if not all(self.is_fixed(lay) for _, lay in sourced):
                raise
            # every channel involved is kept anyway: whatever the op does, the pruned model computes the same
            for o in outs:
                self.set_layout(o, None)

    @staticmethod
    def sized_by_parameter(name: str, args, kwargs, dim: int) -> bool:
        """Whether a reshape of a parameter leaves the size of its dim ``dim`` to the parameter (``-1``, or an op
        such as ``unsqueeze`` / ``flatten`` that takes no sizes)."""
        if name not in ("view", "reshape"):
            return True
        shape = kwargs.get("shape", kwargs.get("size", args[1:]))
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = shape[0]
        return len(shape) > dim and shape[dim] == -1

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
        if id(t) in self.param_dims:  # a reshaped 1-d parameter: its values run along one dim of the view
            pdim = 0 if dim == self.param_dims[id(t)] else -1
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

    # ---- leaf layers ---------------------------------------------------------------------------------------
    def new_source(self, module: nn.Module, name: str, channels: int) -> int:
        sid = self.source_of_module.get(id(module))
        if sid is None:
            sid = self.uf.add()
            self.source_of_module[id(module)] = sid
            self.source_names.append(name)
            self.source_channels.append(channels)
        return sid

    # ---- driving the trace ---------------------------------------------------------------------------------
    def run(self, example_input: ExampleInput) -> Any:
        handles = []
        self.watch.install((n, m) for n, m in self.model.named_modules()
                           if not (isinstance(m, LEAF_TYPES) or is_opaque(m) or attention_handler(m) is not None))
        for name, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(self._pre_hook(name, module), with_kwargs=True))
            handles.append(module.register_forward_hook(self._post_hook(name, module)))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), Recorder(self):
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
            self.watch.restore()
        self.rewrites, rejected = self.watch.resolve(lambda lay: partitions.expand(self, lay), self.width_signature)
        for r in rejected:  # a constant also used otherwise: its parts keep their channels, as for a literal
            for lay in r.layouts:
                self.fix_layout(lay)
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
