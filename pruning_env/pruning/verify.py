"""The reference a pruned model must match: the source model with the removed channels zeroed.

Pruning removes channels whose every output is then zero; zeroing them in place (producer filters and biases,
BatchNorm gamma and beta, depthwise filters, the q/k/v rows of removed attention heads) must therefore give the
same logits as the pruned model.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from pruning_env.pruning.attention import attention_handler
from pruning_env.pruning.pruner import Pruner, PrunePlan

__all__ = ["zeroed_copy"]


@torch.no_grad()
def zeroed_copy(model: nn.Module, pruner: Pruner, plan: PrunePlan) -> nn.Module:
    """A deep copy of ``model`` with the channels ``plan`` removes zeroed at every layer that produces them.

    :param model: the model ``pruner`` was built on.
    :param pruner: its pruner.
    :param plan: a plan of ``pruner``; ``pruner.apply(plan)`` must compute the same function as the result.
    """
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    removed = [np.setdiff1d(np.arange(g.num_channels), kept) for g, kept in zip(pruner.groups, plan.kept)]
    for name, spec in pruner.graph.specs.items():
        offset = 0
        for seg in spec.out_layout or ():
            gone = removed[seg.source] if seg.source is not None else ()
            if len(gone):
                idx = torch.as_tensor(offset + (gone[:, None] * seg.block + np.arange(seg.block)).reshape(-1))
                if spec.role == "attention":  # the q/k/v rows (and per-head entries) of the removed heads
                    handler = attention_handler(modules[name])
                    for pname, _, _ in handler.head_tensors(modules[name]):
                        param = getattr(modules[name], pname)
                        if param is not None:
                            axis, rows = handler.head_index(modules[name], pname, idx)
                            param.index_fill_(axis, rows, 0)
                for pname in ("weight", "bias"):
                    param = getattr(modules[name], pname, None)
                    if isinstance(param, torch.Tensor):
                        param[idx] = 0
            offset += seg.features
    return ref
