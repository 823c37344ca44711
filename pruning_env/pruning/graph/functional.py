"""How functional ops move channels: shuffles, permutes, reshapes and indexing, elementwise ops, concatenation.

Methods of :class:`~.tracer.Tracer` (a mixin; the layout state and the error helpers live there).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from pruning_env.pruning.graph import partitions
from pruning_env.pruning.graph.layouts import FIXED, Layout, Segment
from pruning_env.pruning.graph.ops import PERMUTE_OPS, RESHAPE_OPS, SHUFFLED, SPLIT

__all__ = ["FunctionalOps"]


class FunctionalOps:
    """The tracer's handlers of functional ops that carry channels (see :meth:`Tracer.on_function`)."""

    def on_split(self, name: str, args, kwargs, sourced, outs) -> None:
        """A channel shuffle: ``view`` splitting the channels into (groups, per group), ``transpose(1, 2)``,
        ``view`` back. Channel i of each group ends up beside channel i of the others, an order no group of
        same-index channels can express, so the shuffled channels are kept (the layers around them are pruned)."""
        src, layout = self.single_source(name, args, sourced)
        state, ish = self.cdim(src), tuple(src.shape)
        for o in outs:
            osh = tuple(o.shape)
            swap = name in PERMUTE_OPS and self.permuted_dims(name, args, kwargs, src.dim())[:3] == [0, 2, 1]
            if swap:
                self.set_layout(o, layout, SHUFFLED if state == SPLIT else SPLIT)
            elif name in ("contiguous", "clone", "detach", "to"):
                self.set_layout(o, layout, state)
            elif name in RESHAPE_OPS and osh == (ish[0], ish[1] * ish[2], *ish[3:]):
                if state == SPLIT:  # split and merged back unchanged
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
            elif c == 1 and name in RESHAPE_OPS and o.dim() == src.dim() + 1 and o.shape[0] == src.shape[0] \
                    and o.shape[1] * o.shape[2] == src.shape[1] and o.shape[3:] == src.shape[2:] and o.shape[1] > 1:
                self.set_layout(o, layout, SPLIT)  # (N, C, ...) -> (N, groups, C / groups, ...): a shuffle?
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
        if name == "pad" and c == len(ish) - 1:
            pad = args[1] if len(args) > 1 else kwargs.get("pad")
            if len(pad) >= 2 and pad[0] == pad[1] == 0 and len(osh) == len(ish):
                return c  # only other dims padded (timm Swin's padding to whole windows)
        if name in ("view", "reshape", "flatten", "unsqueeze", "squeeze") and c == len(ish) - 1 \
                and len(osh) >= 2 and osh[-1] == ish[-1]:
            # the last dim stays whole: every position keeps its channel vector, even where leading dims merge
            # into the batch dim (timm Swin's window partition: [B, h, w, wh, ww, C] -> [B * h * w, wh, ww, C])
            return len(osh) - 1
        raise self.unsupported(f"the op {name!r} (shape {list(ish)} -> {list(osh)}, channels in dim {c})", layout)

    def reshape_layout(self, name: str, src: torch.Tensor, layout: Layout, o: torch.Tensor) -> Layout:
        ish, osh = tuple(src.shape), tuple(o.shape)
        if name.endswith("like"):
            return layout
        if len(osh) >= 2 and len(ish) >= 2 and osh[:2] == ish[:2]:
            return layout  # batch and channels untouched (pointwise, pooling, spatial reshapes)
        if name in RESHAPE_OPS and len(ish) >= 2 and len(osh) == 2 and osh[0] == ish[0]:
            spatial = int(np.prod(ish[2:])) if len(ish) > 2 else 1
            if osh[1] == ish[1] * spatial:  # flatten(1): every channel becomes `spatial` consecutive features
                return tuple(Segment(s.source, s.channels, s.block * spatial) for s in layout)
        if name in RESHAPE_OPS and len(ish) == 2 and len(osh) > 2 and osh[0] == ish[0]:
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
