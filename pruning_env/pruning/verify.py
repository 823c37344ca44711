"""The reference a pruned model must match: the source model with the removed channels zeroed.

Pruning removes channels whose every output is then zero; zeroing them in place (producer filters and biases,
BatchNorm gamma and beta, depthwise filters, the q/k/v rows of removed attention heads, parameters added to the
channels) must therefore give the same logits as the pruned model. A LayerNorm whose channels were pruned
(``prune_normalized``) normalises over the kept ones only, so in the reference it does too.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pruning_env.pruning.attention import attention_handler
from pruning_env.pruning.graph import Layout
from pruning_env.pruning.graph.norms import norm_width
from pruning_env.pruning.pruner import Pruner, PrunePlan

__all__ = ["zeroed_copy", "KeptStatisticsReference"]


def _removed_features(layout: Optional[Layout], removed: List[np.ndarray]) -> np.ndarray:
    """Indices (along the layout's features) of the channels a plan removes."""
    parts, offset = [], 0
    for seg in layout or ():
        gone = removed[seg.source] if seg.source is not None else ()
        if len(gone):
            parts.append(offset + (gone[:, None] * seg.block + np.arange(seg.block)).reshape(-1))
        offset += seg.features
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _layer_norm_args(input: torch.Tensor, normalized_shape: Any, weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> tuple:
    return input, weight, bias, eps


def _kept_group_norm(mask: torch.Tensor, input: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``group_norm`` with each group's statistics over its kept channels (``mask`` over dim 1); removed ones 0."""
    n, c = input.shape[:2]
    x = input.reshape(n, num_groups, c // num_groups, -1)
    keep = mask.to(x.dtype).reshape(1, num_groups, c // num_groups, 1)
    count = (keep.sum(dim=(2, 3), keepdim=True) * x.shape[-1]).clamp(min=1)
    mean = (x * keep).sum(dim=(2, 3), keepdim=True) / count
    var = (((x - mean) ** 2) * keep).sum(dim=(2, 3), keepdim=True) / count
    y = ((x - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    shape = (1, c) + (1,) * (input.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return torch.where(mask.reshape(shape), y, 0.0)


class _KeptLayerNorm(TorchFunctionMode):
    """Runs ``layer_norm`` over the kept features of the innermost hooked LayerNorm being called; 0 elsewhere."""

    def __init__(self, active: List[torch.Tensor]) -> None:
        super().__init__()
        self.active = active

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.group_norm and self.active:
            return _kept_group_norm(self.active[-1], *args, **kwargs)
        if func is not F.layer_norm or not self.active:
            return func(*args, **kwargs)
        x, weight, bias, eps = _layer_norm_args(*args, **kwargs)
        mask = self.active[-1]
        kept = x[..., mask]
        y = (x - kept.mean(-1, keepdim=True)) * torch.rsqrt(kept.var(-1, unbiased=False, keepdim=True) + eps)
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        return torch.where(mask, y, 0.0)


class KeptStatisticsReference(nn.Module):
    """A zeroed copy whose listed LayerNorms normalise over their kept features only (removed features give 0).

    :param model: the zeroed copy (owned by this wrapper).
    :param masks: per LayerNorm name, a bool mask of its kept features.
    """

    def __init__(self, model: nn.Module, masks: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._active: List[torch.Tensor] = []
        modules = dict(model.named_modules())
        for name, mask in masks.items():
            modules[name].register_forward_pre_hook(self._enter(mask))
            modules[name].register_forward_hook(self._leave)

    def _enter(self, mask: torch.Tensor):
        def hook(module: nn.Module, args: Any) -> None:
            self._active.append(mask)
        return hook

    def _leave(self, module: nn.Module, args: Any, out: Any) -> None:
        self._active.pop()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _KeptLayerNorm(self._active):
            return self.model(*args, **kwargs)


@torch.no_grad()
def zeroed_copy(model: nn.Module, pruner: Pruner, plan: PrunePlan) -> nn.Module:
    """A deep copy of ``model`` with the channels ``plan`` removes zeroed at every layer that produces them.

    Where the plan removes channels a LayerNorm normalises (``Pruner(prune_normalized=True)``), the copy is wrapped
    in a :class:`KeptStatisticsReference`: those LayerNorms take their statistics over the kept channels, as the
    pruned ones do.

    :param model: the model ``pruner`` was built on.
    :param pruner: its pruner.
    :param plan: a plan of ``pruner``; ``pruner.apply(plan)`` must compute the same function as the result.
    """
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    removed = [np.setdiff1d(np.arange(g.num_channels), kept) for g, kept in zip(pruner.groups, plan.kept)]
    masks: Dict[str, torch.Tensor] = {}
    for name, spec in pruner.graph.specs.items():
        gone = _removed_features(spec.out_layout, removed)
        if not len(gone):
            continue
        idx = torch.as_tensor(gone)
        module = modules[name]
        if spec.role == "attention":  # the q/k/v rows (and per-head entries) of the removed heads
            handler = attention_handler(module)
            for pname, _, _ in handler.head_tensors(module):
                param = getattr(module, pname)
                if param is not None:
                    axis, rows = handler.head_index(module, pname, idx)
                    param.index_fill_(axis, rows, 0)
        if spec.role == "layernorm":
            masks[name] = torch.ones(norm_width(module), dtype=torch.bool).index_fill_(0, idx, False)
        # the output-channel dim of each tensor (a transposed conv's weight holds its outputs in dim 1)
        dims = {"weight": 1, "bias": 0} if spec.role == "convt" else {"weight": 0, "bias": 0}
        for pname, dim in dims.items():
            param = getattr(module, pname, None)
            if isinstance(param, torch.Tensor):
                param.index_fill_(dim, idx, 0)
    for name, spec in pruner.graph.params.items():
        gone = _removed_features(spec.layout, removed)
        if len(gone):
            ref.get_parameter(name).index_fill_(spec.dim, torch.as_tensor(gone), 0)
    return KeptStatisticsReference(ref, masks) if masks else ref
