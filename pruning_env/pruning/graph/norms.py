"""GroupNorm in the trace: its channels are pruned by whole groups (the statistics of every kept group stay those of
the source); with a single group it normalises over every channel, like a LayerNorm over the width, and is pruned
only with ``prune_normalized`` (its statistics then over the kept channels).

Methods of :class:`~.tracer.Tracer` (a mixin). A ``group_norm`` this does not handle (a functional call outside an
``nn.GroupNorm``, channels not in dim 1, groups straddling the boundary of two concatenated layers, one group
without ``prune_normalized``) keeps every channel it reads (``ops.FREEZE_OPS``).
"""
from __future__ import annotations

import torch.nn as nn

from pruning_env.pruning.graph.layers import TracedCall
from pruning_env.pruning.graph.layouts import FIXED

__all__ = ["NormOps", "norm_width"]


def norm_width(module: nn.Module) -> int:
    """The channels a ``"layernorm"``-role layer normalises (an ``nn.LayerNorm``'s width or an ``nn.GroupNorm``'s
    channels)."""
    return module.num_channels if isinstance(module, nn.GroupNorm) else module.normalized_shape[0]


class NormOps:
    """The tracer's handler of ``group_norm`` (see :meth:`Tracer.on_function`)."""

    def on_group_norm(self, args, kwargs, sourced, outs) -> bool:
        """An ``nn.GroupNorm`` (or subclass, e.g. timm's ``GroupNormAct``) on channels in dim 1: recorded with the
        ``"layernorm"`` role (weight and bias follow the channels, no MACs), its input's sources removed in whole
        groups of ``num_channels // num_groups``. Returns False (the caller keeps the channels) otherwise."""
        x = args[0] if args else kwargs.get("input")
        groups = args[1] if len(args) > 1 else kwargs.get("num_groups")
        module = self.model.get_submodule(self.stack[-1]) if self.stack else self.model
        if (len(sourced) != 1 or sourced[0][0] is not x or not isinstance(module, nn.GroupNorm)
                or groups != module.num_groups or x.dim() < 2 or x.shape[1] != module.num_channels
                or self.cdim(x) != 1 or len(outs) != 1):
            return False
        layout = self.layout(x)
        per_group = module.num_channels // module.num_groups
        if module.num_groups == 1:
            if not self.prune_normalized:
                return False
        elif not self.blocks_align(layout, per_group):
            return False
        else:
            for seg in layout:
                if seg.source not in (None, FIXED):
                    self.uf.require_blocks(seg.source, per_group)
        positions = x.numel() // x.shape[0] // x.shape[1]
        self.calls.append(TracedCall(self.stack[-1], module, "layernorm", layout, layout, positions))
        self.set_layout(outs[0], layout, 1)
        return True
