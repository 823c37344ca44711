"""Channel importance criteria (small callables) and their reduction onto dependency groups.

A group-scope criterion scores every element of a parameter, and a group's score for channel j sums the scores
of all elements channel j owns in every member, follower (BatchNorm gamma and beta included) and consumer of the
group. A filter-scope criterion (the RL-Pruner authors' way) scores each member's own filters only and averages
over the members.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from pruning_env.pruning.attention import attention_handler
from pruning_env.pruning.graph import DependencyGraph
from pruning_env.pruning.surgery import handler_for

#: Calibration data: one ``(x, y)`` batch or an iterable of them (a DataLoader works).
Batches = Union[Tuple[torch.Tensor, torch.Tensor], Iterable[Tuple[torch.Tensor, torch.Tensor]]]

__all__ = ["Batches", "Importance", "TaylorImportance", "MagnitudeImportance", "RandomImportance",
           "VarianceImportance", "CRITERIA", "make_criterion", "accumulate_gradients", "group_importance"]


class Importance:
    """Score of a parameter tensor's channels; ``needs_grad`` asks for accumulated gradients.

    ``scope`` says which tensors count: ``"group"`` (every slice a channel owns: member filters and biases,
    BatchNorm, depthwise filters, consumer columns; summed) or ``"filter"`` (each member's own weight only,
    averaged over the group's members: the RL-Pruner authors' scores, spec §4.3).
    """

    needs_grad: bool = False
    scope: str = "group"

    def __call__(self, weight: torch.Tensor, grad: Optional[torch.Tensor]) -> torch.Tensor:
        """Element-wise scores, same shape as ``weight``."""
        raise NotImplementedError

    def channel_scores(self, weight: torch.Tensor, grad: Optional[torch.Tensor], dim: int) -> torch.Tensor:
        """One score per index of ``dim`` (float64): the element-wise scores summed over the other dims.

        :param weight: the parameter.
        :param grad: its accumulated gradient (``None`` if the criterion needs none or none flowed).
        :param dim: the dimension that follows the channels.
        """
        elem = self(weight, grad).double()
        return elem.transpose(0, dim).reshape(elem.shape[dim], -1).sum(1)


class TaylorImportance(Importance):
    """First-order Taylor estimate of the loss change, ``|w * dL/dw|`` (Molchanov et al.; the authors' default).

    :param scope: ``"group"`` (ours: the whole group, BatchNorm included) or ``"filter"`` (the authors': each
        member's filter weights only, averaged over members; bias and BatchNorm unused).
    """

    needs_grad = True

    def __init__(self, scope: str = "group") -> None:
        if scope not in ("group", "filter"):
            raise ValueError(f"scope must be 'group' or 'filter', got {scope!r}")
        self.scope = scope

    def __call__(self, weight: torch.Tensor, grad: Optional[torch.Tensor]) -> torch.Tensor:
        if grad is None:
            return torch.zeros_like(weight)
        return (weight * grad).abs()


class MagnitudeImportance(Importance):
    """``|w|`` (p=1) or ``w**2`` (p=2, no square root, as the authors' l2)."""

    def __init__(self, p: int = 1) -> None:
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p}")
        self.p = p

    def __call__(self, weight: torch.Tensor, grad: Optional[torch.Tensor]) -> torch.Tensor:
        return weight.abs() if self.p == 1 else weight * weight


class RandomImportance(Importance):
    """Uniform random scores from a seeded generator (a sanity baseline)."""

    def __init__(self, seed: Optional[int] = None) -> None:
        self.generator = torch.Generator()
        self.generator.manual_seed(0 if seed is None else int(seed))

    def __call__(self, weight: torch.Tensor, grad: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.rand(weight.shape, generator=self.generator, dtype=torch.float64)


class VarianceImportance(Importance):
    """Variance of each member filter's weights (unbiased, as ``torch.var``), averaged over members: the
    authors' ``variance`` strategy (spec §4.3). Filter scope only: a variance does not add up over slices."""

    scope = "filter"

    def channel_scores(self, weight: torch.Tensor, grad: Optional[torch.Tensor], dim: int) -> torch.Tensor:
        w = weight.double().transpose(0, dim)
        return w.reshape(w.shape[0], -1).var(1)


#: Criterion names accepted by :meth:`Pruner.compute_importance`: ``taylor`` (group scope, ours),
#: ``taylor_filter`` (the authors' Taylor: member filters only), ``l1``, ``l2``, ``variance``, ``random``.
CRITERIA = ("taylor", "taylor_filter", "l1", "l2", "variance", "random")


def make_criterion(criterion: Union[str, Importance], seed: Optional[int] = None) -> Importance:
    """An :class:`Importance` from a name in :data:`CRITERIA` or an existing instance."""
    if isinstance(criterion, Importance):
        return criterion
    if criterion == "taylor":
        return TaylorImportance()
    if criterion == "taylor_filter":
        return TaylorImportance(scope="filter")
    if criterion == "variance":
        return VarianceImportance()
    if criterion == "l1":
        return MagnitudeImportance(1)
    if criterion == "l2":
        return MagnitudeImportance(2)
    if criterion == "random":
        return RandomImportance(seed)
    raise ValueError(f"unknown importance criterion {criterion!r}; expected one of {CRITERIA} or an Importance")


def _filter_tensor(graph: DependencyGraph, member: str) -> Tuple[str, str]:
    """(layer name, parameter name) of a member's filters: its weight, or the q/k/v rows of an attention's heads."""
    module = graph.specs[member].module
    handler = attention_handler(module)
    if handler is None or graph.specs[member].role != "attention":
        return member, "weight"
    qkv = handler.projections(module)[0]
    return (member, "in_proj_weight") if qkv is None else (f"{member}.{qkv}", "weight")


def _filter_tensors(graph: DependencyGraph) -> List[Tuple[str, str, int, str]]:
    """(layer, parameter, 0, "out") for every group member: the tensors a filter-scope criterion reads."""
    return [(*_filter_tensor(graph, name), 0, "out") for g in graph.groups for name in g.members]


def _scored_tensors(graph: DependencyGraph) -> List[Tuple[str, str, int, str]]:
    """(layer name, parameter name, dim, 'out'|'in'|'param') for every parameter slice a group owns ('param': a
    parameter used outside any layer, :attr:`DependencyGraph.params`)."""
    out = [(*name.rpartition(".")[::2], spec.dim, "param") for name, spec in graph.params.items()]
    for name, spec in graph.specs.items():
        handler = handler_for(spec.module)
        for side, layout, pairs in (("out", spec.out_layout, handler.out_tensors(spec.module)),
                                    ("in", spec.in_layout, handler.in_tensors(spec.module))):
            if layout is None or all(s.source is None for s in layout):
                continue
            for pname, dim in pairs:
                if isinstance(spec.module._parameters.get(pname), torch.Tensor):
                    out.append((name, pname, dim, side))
    return out


def _per_channel(per_feature: torch.Tensor, channels: int, block: int) -> torch.Tensor:
    """Scores of ``channels`` channels from features laid out as (repeats, channels, block) (q, k and v rows of
    heads, ``block = head_dim``) or (repeats, channels, run) (e.g. one entry per head)."""
    run = block if per_feature.numel() % (channels * block) == 0 else per_feature.numel() // channels
    return per_feature.view(-1, channels, run).sum((0, 2))


def _as_batches(batches: Batches) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
    if (isinstance(batches, (tuple, list)) and len(batches) == 2 and isinstance(batches[0], torch.Tensor)
            and isinstance(batches[1], torch.Tensor) and batches[1].dim() == 1 and batches[0].dim() > 1
            and batches[0].shape[0] == batches[1].shape[0]):
        return [tuple(batches)]  # a single (x, y) batch
    return batches


def accumulate_gradients(model: nn.Module, graph: DependencyGraph, batches: Batches, train_mode: bool = False,
                         max_batches: Optional[int] = None, progress: bool = False, scope: str = "group"
                         ) -> Dict[Tuple[str, str], torch.Tensor]:
    """Gradients of the summed cross-entropy over ``batches`` for every parameter the groups own.

    Uses ``torch.autograd.grad``: ``.grad`` fields and weights stay as they were. In eval mode (default) BatchNorm
    statistics are untouched; ``train_mode=True`` reproduces the authors' side effect (running statistics move by
    one momentum step per batch, dropout is active).

    :param model: the model the graph was built from.
    :param graph: its dependency graph.
    :param batches: iterable of ``(x, y)`` batches (a DataLoader works) or a single ``(x, y)`` pair.
    :param train_mode: run the forward passes in train mode (mutates BatchNorm statistics).
    :param max_batches: stop after this many batches.
    :param progress: show a progress bar.
    :param scope: ``"group"`` (gradients of every parameter a group owns) or ``"filter"`` (members' weights).
    """
    tensors = _filter_tensors(graph) if scope == "filter" else _scored_tensors(graph)
    keys = sorted({(n, p) for n, p, _, _ in tensors})
    modules = dict(model.named_modules())
    params = [modules[n]._parameters[p] for n, p in keys]
    flags = [p.requires_grad for p in params]
    device = params[0].device if params else torch.device("cpu")
    grads: List[Optional[torch.Tensor]] = [None] * len(params)
    was_training = model.training
    model.train(train_mode)
    n = 0
    grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # callers often sit inside torch.no_grad (e.g. an env step)
    try:
        for p in params:
            p.requires_grad_(True)
        iterator = _as_batches(batches)
        for x, y in tqdm(iterator, desc="importance", disable=not progress, leave=False):
            if max_batches is not None and n >= max_batches:
                break
            logits = model(x.to(device))
            if isinstance(logits, (tuple, list)):  # aux heads: the main logits come first
                logits = logits[0]
            loss = F.cross_entropy(logits, y.to(device))
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [g if acc is None else (acc if g is None else acc + g) for acc, g in zip(grads, gs)]
            n += 1
    finally:
        torch.set_grad_enabled(grad_mode)
        model.train(was_training)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if n == 0:
        raise ValueError("the calibration batches were empty; Taylor importance needs at least one (x, y) batch")
    return {k: g for k, g in zip(keys, grads) if g is not None}


@torch.no_grad()
def group_importance(graph: DependencyGraph, criterion: Importance,
                     grads: Optional[Dict[Tuple[str, str], torch.Tensor]] = None) -> List[np.ndarray]:
    """Per-group channel scores: the criterion summed over every parameter slice each channel owns (group
    scope), or averaged over the members' own filters (filter scope).

    :param graph: the dependency graph (its model supplies the weights).
    :param criterion: an :class:`Importance`.
    :param grads: accumulated gradients keyed by (layer name, parameter name), when the criterion needs them.
    """
    scores = [torch.zeros(g.num_channels, dtype=torch.float64) for g in graph.groups]
    modules = dict(graph.model.named_modules())
    if criterion.scope == "filter":
        for gi, g in enumerate(graph.groups):
            for member in g.members:
                name, pname = _filter_tensor(graph, member)
                weight = modules[name]._parameters[pname].detach()
                grad = None if grads is None else grads.get((name, pname))
                per_row = criterion.channel_scores(weight, grad, 0).cpu()
                scores[gi] += _per_channel(per_row, g.num_channels, graph.specs[member].out_layout[0].block)
            scores[gi] /= len(g.members)
        return [s.numpy() for s in scores]
    for name, pname, dim, side in _scored_tensors(graph):
        weight = modules[name]._parameters[pname].detach()
        grad = None if grads is None else grads.get((name, pname))
        per_feature = criterion.channel_scores(weight, grad, dim).cpu()
        if side == "param":
            layout = graph.params[f"{name}.{pname}" if name else pname].layout
        else:
            spec = graph.specs[name]
            layout = spec.out_layout if side == "out" else spec.in_layout
        if side == "out" and spec.role == "attention":  # (repeats, heads, run) entries along dim: sum per head
            heads = layout[0]
            scores[heads.source] += _per_channel(per_feature, heads.channels, heads.block)
            continue
        offset = 0
        for seg in layout:
            if seg.source is not None:
                chunk = per_feature[offset:offset + seg.features]
                scores[seg.source] += chunk.view(seg.channels, seg.block).sum(1)
            offset += seg.features
    return [s.numpy() for s in scores]
