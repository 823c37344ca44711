"""How layers are recorded: conv / linear / norm leaves, LayerNorm over the channels, attention modules traced by
heads, opaque modules and the layers inside them.

Methods of :class:`~.tracer.Tracer` (a mixin), and the raw call records the graph turns into
:class:`~.graph.LayerCall` s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Set, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from pruning_env.costs.counting import attention_geometry, layer_positions
from pruning_env.pruning.attention import AttentionHandler
from pruning_env.pruning.graph.layouts import FIXED, Layout, Segment, UnsupportedModelError, layout_features
from pruning_env.pruning.graph.ops import CONV_TYPES, CONVT_TYPES, NORM_TYPES

__all__ = ["TracedCall", "AttentionFrame", "LayerOps"]


@dataclass
class TracedCall:
    """One call of a leaf layer during the trace (raw layouts use source ids): its geometry, never its cost."""

    name: str
    module: nn.Module
    role: str
    in_layout: Optional[Layout]
    out_layout: Optional[Layout]
    factor: int  # output positions per channel (spatial size; rows for linear)
    context: int = 0  # attention calls: keys per query
    geometry: Optional[Tuple[int, int, int]] = None  # opaque attention calls: costs.counting.attention_geometry


@dataclass
class AttentionFrame:
    """An attention call whose heads are traced as a group (from its pre-hook to its post-hook)."""

    handler: AttentionHandler
    module: nn.Module
    name: str
    x: torch.Tensor  # the input the projections read
    in_layout: Optional[Layout]
    heads: Layout  # (Segment(source, num_heads, head_dim),): the q (= k = v) features
    per_head_linears: Set[str]
    projections: Set[str]  # its q/k/v and output projections, recorded when it returns even if called as modules



class LayerOps:
    """The tracer's handlers of layer calls (see the hooks of :class:`Tracer`)."""

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
        self.calls.append(TracedCall(name, module, "layernorm", layout, layout, x.numel() // x.shape[0] // x.shape[-1]))
        self.set_layout(outs[0], layout, outs[0].dim() - 1)
        return True

    def on_leaf(self, module: nn.Module, name: str, pending: Tuple[Optional[Layout], int], inp: torch.Tensor,
                out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModelError(f"layer {name!r} ({type(module).__name__}) returned {type(out).__name__}, "
                                        f"expected a tensor")
        in_layout, in_cdim = pending
        batch = out.shape[0] if out.dim() > 1 else 1
        per_item = out.numel() // max(batch, 1)
        out_layout: Optional[Layout] = None
        out_cdim = 1
        channel_last = isinstance(module, nn.Linear) and inp is not None and inp.dim() > 2
        if in_layout is not None and in_cdim != (inp.dim() - 1 if channel_last else 1):
            if self.is_fixed(in_layout):
                in_layout = None  # nothing of it is ever removed: the layer sees its full input
            else:
                raise self.unsupported_leaf(module, name, in_layout, f" with its channels in dim {in_cdim}")
        if isinstance(module, CONVT_TYPES):
            if module.groups > 1 or (in_layout is not None and layout_features(in_layout) != module.in_channels):
                self.fix_layout(in_layout)  # grouped (or mismatched): its inputs and outputs stay whole
                self.calls.append(TracedCall(name, module, "other", None, None, layer_positions(module, out)))
                return
            # a transposed conv (YOLOv6's upsampling): inputs are weight dim 0, outputs weight dim 1
            if name not in self.ignore:
                out_layout = (Segment(self.new_source(module, name, module.out_channels), module.out_channels),)
            self.calls.append(TracedCall(name, module, "convt", in_layout, out_layout, layer_positions(module, out)))
            self.set_layout(out, out_layout, 1)
            return
        if isinstance(module, CONV_TYPES):
            if in_layout is not None and layout_features(in_layout) != module.in_channels:
                raise UnsupportedModelError(f"layer {name!r} expects {module.in_channels} input channels but "
                                            f"the traced input has {layout_features(in_layout)}")
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
            self.calls.append(TracedCall(name, module, role, in_layout, out_layout, factor))
        elif isinstance(module, nn.Linear):
            # a linear layer on a >2-d input acts on every position's last dim (tokens, channel-last maps)
            if in_layout is not None and layout_features(in_layout) != module.in_features:
                raise UnsupportedModelError(f"layer {name!r} expects {module.in_features} input features but "
                                            f"the traced input has {layout_features(in_layout)}")
            if name not in self.ignore:
                sid = self.new_source(module, name, module.out_features)
                out_layout = (Segment(sid, module.out_features),)
                out_cdim = out.dim() - 1
            self.calls.append(TracedCall(name, module, "linear", in_layout, out_layout,
                                         per_item // module.out_features))
        elif isinstance(module, NORM_TYPES):
            out_layout = in_layout
            self.calls.append(TracedCall(name, module, "norm", in_layout, out_layout,
                                         per_item // module.num_features))
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
        self.frames.append(AttentionFrame(handler, module, name, x, layout, (Segment(sid, heads, head_dim),),
                                           {f"{name}.{n}" for n in handler.per_head_linears(module)},
                                           {f"{name}.{n}" for n in handler.projections(module) if n is not None}))

    def leave_attention(self, out: Any) -> None:
        frame = self.frames.pop()
        module, name, x, heads = frame.module, frame.name, frame.x, frame.heads
        tokens, context = frame.handler.tokens(module, x)
        qkv_name, out_name = frame.handler.projections(module)
        if qkv_name is None:  # the module's own weights project q, k and v (the call covers them and the matmuls)
            self.calls.append(TracedCall(name, module, "attention", frame.in_layout, heads, tokens, context))
        else:
            self.calls.append(TracedCall(f"{name}.{qkv_name}", module.get_submodule(qkv_name), "linear",
                                         frame.in_layout, heads * 3, tokens))
            # its input layout makes a narrower embedding swap in the head-pruned forward (read from the weights)
            self.calls.append(TracedCall(name, module, "attention", frame.in_layout, heads, tokens, context))
        proj, proj_name = module.get_submodule(out_name), f"{name}.{out_name}"
        out_layout: Optional[Layout] = None
        if proj_name not in self.ignore:
            out_layout = (Segment(self.new_source(proj, proj_name, proj.out_features), proj.out_features),)
        self.calls.append(TracedCall(proj_name, proj, "linear", heads, out_layout, tokens))
        result = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        self.leave_opaque(out)
        self.set_layout(result[0], out_layout, result[0].dim() - 1)

    # ---- opaque modules (attention) ------------------------------------------------------------------------
    def enter_opaque(self, module: nn.Module, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        """An opaque module keeps every channel it reads; nothing inside it is traced (the products of an
        attention module the cost model knows are recorded by their geometry, its layers as inner calls)."""
        for t in tree_flatten((args, kwargs))[0]:
            self.fix_layout(self.layout(t))
        geometry = attention_geometry(module, args, kwargs)
        if geometry is not None:
            self.calls.append(TracedCall(name, module, "fixed", None, None, 1, geometry=geometry))

    def leave_opaque(self, out: Any) -> None:
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                self.set_layout(o, None)

    def on_inner_leaf(self, module: nn.Module, name: str, out: torch.Tensor) -> None:
        """A layer inside an opaque or attention module: it is recorded (its cost counts) and its channels are
        kept, except the output rows of a per-head layer of a traced attention (one row per head) and its
        projections (recorded with their layouts when the attention returns)."""
        frame = self.frames[-1] if self.frames and self.opaque_depth == 1 else None
        if frame is not None and name in frame.projections:
            return
        if frame is not None and name in frame.per_head_linears:
            heads = frame.heads[0]
            self.calls.append(TracedCall(name, module, "linear", None, (Segment(heads.source, heads.channels),),
                                         out.numel() // out.shape[-1]))
        else:
            self.calls.append(TracedCall(name, module, "fixed", None, None, layer_positions(module, out)))
