"""The Pruner: groups of a model, cached importance, plans from sparsity vectors, analytic costs and surgery.

One Pruner serves every candidate pruned from the same model state: trace and importance happen once, each
candidate then costs one ``plan`` (argsort) and one ``apply`` (index_select) or one ``plan_cost`` (a dot product).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from pruning_env.costs import Cost
from pruning_env.costs.analytic import CostTerms
from pruning_env.pruning.graph import CONV_TYPES, DependencyGraph, ExampleInput, Group, Layout, UnsupportedModelError
from pruning_env.pruning.importance import (Batches, Importance, accumulate_gradients, group_importance,
                                            make_criterion)
from pruning_env.pruning.surgery import HANDLERS, build_pruned_model, unhandled_channel_tensors

__all__ = ["Pruner", "PrunePlan", "PerGroup"]

#: A value for every group: a scalar (same for all) or a sequence / array of shape ``(n_groups,)``.
PerGroup = Union[float, Sequence[float], np.ndarray]


@dataclass(frozen=True, eq=False)  # arrays inside: compare plans with np.array_equal on .kept
class PrunePlan:
    """Kept channel indices (sorted, in the current model's numbering) for every group, in group order."""

    kept: Tuple[np.ndarray, ...]

    @property
    def num_kept(self) -> np.ndarray:
        """Kept channels per group."""
        return np.array([len(k) for k in self.kept], dtype=np.int64)

    @classmethod
    def from_indices(cls, kept: Sequence[Iterable[int]]) -> "PrunePlan":
        """A plan from explicit kept indices per group (sorted and de-duplicated here)."""
        return cls(tuple(np.unique(np.asarray(list(k), dtype=np.int64)) for k in kept))


#: Conv subclasses with their own ``forward`` that stay correct when their input channels are cut (their forward
#: only pads, say). Any other such subclass (a weight-standardised conv normalises each filter over its input
#: channels: cutting them changes the function) is refused when a group would cut its inputs. Extension point.
INPUT_CUT_SAFE_CONVS = {"Conv2dSame", "Conv1dSame", "Conv3dSame"}


def _cut(layout) -> bool:
    return layout is not None and any(seg.source is not None for seg in layout)


def _refuse_unhandled_tensors(graph: DependencyGraph) -> None:
    """Refuse, before any surgery, a prunable layer surgery would get wrong: one that holds a tensor of its channel
    width which its handler does not slice (a conv subclass with an extra per-channel parameter), or a conv
    subclass with its own ``forward`` whose input channels would be cut (see :data:`INPUT_CUT_SAFE_CONVS`)."""
    for name, spec in graph.specs.items():
        if not (_cut(spec.out_layout) or _cut(spec.in_layout)):
            continue  # never cut
        module = spec.module
        base = next((c for c in type(module).__mro__ if c in HANDLERS), None)
        if spec.role == "attention" or base is None or not base.__module__.startswith("torch.nn"):
            continue  # attention and other layers with their own handlers know their tensors
        own_forward = type(module).forward is not base.forward
        what = f"layer {name!r} ({type(module).__name__}, a {base.__name__} subclass" + (
            " with its own forward)" if own_forward else ")")
        layouts = [lay for lay in (spec.out_layout, spec.in_layout) if lay is not None]
        widths = tuple(sum(seg.features for seg in lay) for lay in layouts)
        bad = unhandled_channel_tensors(module, widths)
        if bad:
            tensors = ", ".join(f"{n!r} of shape {list(shape)}" for n, shape in bad)
            raise UnsupportedModelError(
                f"{what} holds {tensors}, sized like its channels (widths {sorted(set(widths))}) but unknown to "
                f"the pruning handler; register it in pruning_env.pruning.surgery (CONV_OUT_EXTRAS or HANDLERS) "
                f"or pass the layer in ignore=")
        if (own_forward and isinstance(module, CONV_TYPES) and _cut(spec.in_layout) and spec.role == "conv"
                and type(module).__name__ not in INPUT_CUT_SAFE_CONVS):
            raise UnsupportedModelError(
                f"{what} would lose input channels, and its forward may use the whole filter (a weight-"
                f"standardised conv normalises each filter over its inputs: cutting them changes the function); "
                f"keep the producing layer in ignore=, or add the class to "
                f"pruning_env.pruning.pruner.INPUT_CUT_SAFE_CONVS when its forward allows it")


class Pruner:
    """Structured channel pruning of one model state.

    :param model: the model to prune; never modified (only its eval/train flag is toggled and restored).
    :param example_input: one input batch for tracing, e.g. ``torch.randn(1, 3, 32, 32)``.
    :param ignore: layer names (or modules) whose output channels are never removed.
    :param min_channels: floor on kept channels per group (at least 1).
    :param round_to: round kept channels of sparsity plans to a multiple of this (8 suits GPUs); 1 = off.
    :param prune_normalized: also prune the channels an ``nn.LayerNorm`` normalises (the embedding width of a ViT,
        Swin or ConvNeXt stage becomes one group, with its LayerNorms, class token, position embedding and layer
        scales); the pruned model then equals the source with those channels zeroed and each LayerNorm's statistics
        taken over the kept channels (:func:`pruning_env.pruning.zeroed_copy`). Off by default: they are kept.
    :param graph: a prebuilt :class:`DependencyGraph` of ``model`` (skips the trace).
    :param costs: prebuilt cost terms of ``graph`` (they depend on its structure only, not on the widths).
    """

    def __init__(self, model: nn.Module, example_input: ExampleInput, ignore: Iterable[Union[str, nn.Module]] = (),
                 min_channels: int = 1, round_to: int = 1, prune_normalized: bool = False,
                 graph: Optional[DependencyGraph] = None, costs: Optional[CostTerms] = None) -> None:
        if int(min_channels) < 1:
            raise ValueError(f"min_channels must be >= 1 (a layer cannot lose every channel), got {min_channels}")
        if int(round_to) < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        self.model = model
        self.example_input = example_input
        self.ignore = tuple(ignore)
        self.min_channels = int(min_channels)
        self.round_to = int(round_to)
        self.prune_normalized = bool(prune_normalized)
        self.graph = graph if graph is not None else DependencyGraph.build(model, example_input, self.ignore,
                                                                           self.prune_normalized)
        _refuse_unhandled_tensors(self.graph)
        self._membership: Optional[np.ndarray] = None
        self._granularity = self.graph.granularity  # constant per graph; read on every plan and cost query
        if costs is None:  # internal consistency: the analytic model must reproduce the layer-by-layer count
            costs = CostTerms.from_graph(self.graph)
            macs, reference = costs.evaluate(self.num_channels)[0], CostTerms.layer_by_layer_macs(self.graph)
            if macs != reference:
                raise UnsupportedModelError(f"analytic MACs {macs} differ from the layer-by-layer count {reference}; "
                                            f"the model uses a layer configuration the cost terms do not cover")
        self.costs = costs
        self.importance: Optional[List[np.ndarray]] = None
        self.importance_criterion: Optional[str] = None
        self._arange_cache: Dict[int, torch.Tensor] = {}
        self._key_cache: Dict[int, Tuple[str, ...]] = {}
        self.origin: Tuple[np.ndarray, ...] = tuple(np.arange(int(n), dtype=np.int64) for n in self.num_channels)
        """kept channel indices per group in the numbering of the first Pruner of a :meth:`child` chain (the
        unpruned model): ``root.apply(PrunePlan(origin))`` rebuilds this Pruner's model from the unpruned one"""

    def __getstate__(self) -> Dict[str, object]:
        # the surgery cache is keyed by id() of this object's modules: a copy (deepcopy, or a pickle sent to a
        # Ray worker) has other modules, so it starts with an empty one
        state = self.__dict__.copy()
        state["_key_cache"] = {}
        return state

    # ---- groups --------------------------------------------------------------------------------------------
    @property
    def groups(self) -> List[Group]:
        """Prunable groups in execution order of their first producer."""
        return self.graph.groups

    @property
    def group_names(self) -> List[str]:
        """Readable, unique group names."""
        return [g.name for g in self.graph.groups]

    @property
    def num_channels(self) -> np.ndarray:
        """Current widths of the groups, shape ``(n_groups,)``."""
        return self.graph.num_channels

    @property
    def layer_counts(self) -> np.ndarray:
        """Prunable conv/linear layers per group (the authors' cluster size), shape ``(n_groups,)``."""
        return self.graph.layer_counts

    @property
    def granularity(self) -> np.ndarray:
        """Channels each group removes together, in aligned blocks (a grouped conv's channels per conv group;
        1 for plain channels); kept counts are multiples of it. Shape ``(n_groups,)``."""
        return self._granularity.copy()

    @property
    def n_groups(self) -> int:
        """Number of groups (the length of every per-group vector)."""
        return len(self.graph.groups)

    # ---- importance ----------------------------------------------------------------------------------------
    def compute_importance(self, batches: Optional[Batches] = None, criterion: Union[str, Importance] = "taylor",
                           train_mode: bool = False, max_batches: Optional[int] = None, seed: Optional[int] = None,
                           progress: bool = False) -> List[np.ndarray]:
        """Score every channel of every group and cache the result for all later plans.

        :param batches: calibration ``(x, y)`` batches from the training split (needed for ``"taylor"``).
        :param criterion: ``"taylor"`` (sum of ``|w * dL/dw|`` over the whole group, BatchNorm included),
            ``"taylor_filter"`` (the authors': ``|w * dL/dw|`` of each member's filter weights, averaged over the
            members), ``"l1"``, ``"l2"``, ``"variance"`` (the authors': variance of each member filter),
            ``"random"`` or an :class:`Importance` instance.
        :param train_mode: compute gradients in train mode, as the authors did; this moves the model's
            BatchNorm running statistics (one momentum step per batch), so it is off by default.
        :param max_batches: use at most this many batches.
        :param seed: seed of the ``"random"`` criterion.
        :param progress: show a progress bar over the batches.
        :return: one score array per group (higher = more important).
        """
        crit = make_criterion(criterion, seed)
        grads = None
        if crit.needs_grad:
            if batches is None:
                raise ValueError(f"criterion {criterion!r} needs calibration batches of (x, y); pass `batches`")
            grads = accumulate_gradients(self.model, self.graph, batches, train_mode, max_batches, progress,
                                         scope=crit.scope)
        self.importance = group_importance(self.graph, crit, grads)
        self.importance_criterion = criterion if isinstance(criterion, str) else type(criterion).__name__
        return self.importance

    def group_importance(self) -> np.ndarray:
        """Mean ``|score|`` of each group's channels from the cached importance (non-finite scores skipped).

        :return: shape ``(n_groups,)``, float64; zeros before :meth:`compute_importance`.
        """
        means = np.zeros(self.n_groups, dtype=np.float64)
        if self.importance is None:
            return means
        for i, scores in enumerate(self.importance):
            v = np.abs(scores[np.isfinite(scores)])
            means[i] = float(v.mean()) if v.size else 0.0
        return means

    # ---- plans ---------------------------------------------------------------------------------------------
    def _vector(self, values: PerGroup, what: str) -> np.ndarray:
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim == 0:
            arr = np.full(self.n_groups, float(arr))
        if arr.shape != (self.n_groups,):
            raise ValueError(f"{what} must be a scalar or have one entry per group ({self.n_groups}), "
                             f"got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what} must be finite, got {arr}")
        return arr

    def keep_counts(self, sparsity: PerGroup) -> np.ndarray:
        """Kept channels per group for a per-group sparsity vector (fraction of channels removed).

        Removed = round(sparsity * width), counted in whole blocks of the group's :attr:`granularity`; then the
        kept count is rounded to a multiple of ``round_to`` (and of the granularity) and clipped to
        ``[min_channels, width]``.

        :param sparsity: scalar or array of shape ``(n_groups,)`` with values in ``[0, 1]``.
        """
        s = self._vector(sparsity, "sparsity")
        if np.any(s < 0) or np.any(s > 1):
            raise ValueError(f"sparsity values must lie in [0, 1], got min {s.min():.3g}, max {s.max():.3g}")
        n, gran = self.num_channels, self._granularity
        kept = n - gran * np.floor(s * (n // gran) + 0.5).astype(np.int64)
        if self.round_to > 1:
            step = np.lcm(gran, self.round_to)
            kept = np.maximum(np.round(kept / step).astype(np.int64) * step, step)
        return self._floor(kept)

    def _floor(self, kept: np.ndarray) -> np.ndarray:
        """Clip kept counts to ``[min_channels, width]``, the floor rounded up to whole blocks."""
        n, gran = self.num_channels, self._granularity
        floor = -(-self.min_channels // gran) * gran
        return np.clip(np.maximum(kept, floor), 1, n).astype(np.int64)

    def plan(self, sparsity: Optional[PerGroup] = None, keep: Optional[PerGroup] = None) -> PrunePlan:
        """Kept indices per group: the least important channels go first.

        :param sparsity: per-group fraction of channels to remove (see :meth:`keep_counts`).
        :param keep: alternatively, kept channels per group (clipped to ``[min_channels, width]``; rounded only to
            whole blocks of the group's :attr:`granularity`).
        """
        counts = self._counts(sparsity, keep)
        if self.importance is None:
            if np.array_equal(counts, self.num_channels):
                return PrunePlan(tuple(np.arange(n, dtype=np.int64) for n in counts))
            raise RuntimeError("no importance yet: call compute_importance(batches, criterion='taylor') "
                               "(or criterion='l1' without data) before planning")
        kept = []
        for imp, k, gran in zip(self.importance, counts, self._granularity):
            if gran == 1:
                order = np.argsort(-imp, kind="stable")  # ties keep the lower index
                kept.append(np.sort(order[:k]))
                continue
            blocks = np.argsort(-imp.reshape(-1, gran).sum(1), kind="stable")[:k // gran]
            kept.append((np.sort(blocks)[:, None] * gran + np.arange(gran)).reshape(-1))
        return PrunePlan(tuple(kept))

    def _counts(self, sparsity: Optional[PerGroup], keep: Optional[PerGroup]) -> np.ndarray:
        if (sparsity is None) == (keep is None):
            raise ValueError("pass exactly one of `sparsity` (fraction removed per group) or `keep` (channels kept)")
        if sparsity is not None:
            return self.keep_counts(sparsity)
        k = self._vector(keep, "keep")
        if np.any(k != np.round(k)):
            raise ValueError(f"keep must hold whole channel counts, got {k}")
        gran = self._granularity
        k = k.astype(np.int64)
        k = np.floor(k / gran + 0.5).astype(np.int64) * gran
        return self._floor(k)

    def _check(self, plan: PrunePlan) -> None:
        if not isinstance(plan, PrunePlan):
            raise TypeError(f"expected a PrunePlan (from Pruner.plan), got {type(plan).__name__}")
        if len(plan.kept) != self.n_groups:
            raise ValueError(f"plan has {len(plan.kept)} groups, the model has {self.n_groups}")
        for g, (k, n, gran) in enumerate(zip(plan.kept, self.num_channels, self._granularity)):
            if len(k) == 0 or k[0] < 0 or k[-1] >= n or np.any(np.diff(k) <= 0):
                raise ValueError(f"plan for group {g} ({self.groups[g].name!r}) must be sorted, unique, non-empty "
                                 f"indices in [0, {n}), got {k}")
            if gran > 1 and (len(k) % gran or np.any(k.reshape(-1, gran) % gran != np.arange(gran))
                             or np.any(np.diff(k.reshape(-1, gran), axis=1) != 1)):
                raise ValueError(f"plan for group {g} ({self.groups[g].name!r}) must keep whole aligned blocks of "
                                 f"{gran} channels (a grouped convolution follows it), got {k}")

    # ---- costs ---------------------------------------------------------------------------------------------
    def plan_cost(self, plan: Optional[PrunePlan] = None, *, sparsity: Optional[PerGroup] = None,
                  keep: Optional[PerGroup] = None) -> Cost:
        """MACs per image and params of the model a plan (or sparsity / keep vector) would build.

        Analytic (no model is built), equal to ``count_costs(self.apply(plan), input_size)``.

        :param plan: a plan from :meth:`plan`.
        :param sparsity: alternatively, per-group fraction of channels to remove (see :meth:`keep_counts`).
        :param keep: alternatively, kept channels per group.
        """
        if plan is not None:
            if sparsity is not None or keep is not None:
                raise ValueError("pass a plan or a sparsity / keep vector, not both")
            counts = plan.num_kept
        else:
            counts = self._counts(sparsity, keep)
        macs, params = self.costs.evaluate(counts)
        return Cost(macs=int(macs), params=int(params))

    def group_costs(self) -> Tuple[np.ndarray, np.ndarray]:
        """MACs per image and params of each group's layers (members and followers) at the current widths.

        Analytic (no forward pass); a layer equals its ``count_costs`` share, and a layer that follows several
        groups (a BatchNorm after a concatenation) counts fully in each.

        :return: ``(macs, params)``, float64 arrays of shape ``(n_groups,)``.
        """
        if self._membership is None:
            self._membership = self.costs.membership(self.groups)
        return self.costs.group_costs(self._membership, self.num_channels)

    # ---- surgery -------------------------------------------------------------------------------------------
    def _arange(self, n: int) -> torch.Tensor:
        t = self._arange_cache.get(n)
        if t is None:
            t = self._arange_cache[n] = torch.arange(n, dtype=torch.long)
        return t

    def _layout_index(self, layout: Optional[Layout], kept: List[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        if layout is None or all(s.source is None or kept[s.source] is None for s in layout):
            return None
        parts = []
        offset = 0
        for seg in layout:
            idx = None if seg.source is None else kept[seg.source]
            if idx is None:
                parts.append(self._arange(seg.features) + offset)
            elif seg.block == 1:
                parts.append(idx + offset)
            else:
                parts.append((idx[:, None] * seg.block + self._arange(seg.block)).reshape(-1) + offset)
            offset += seg.features
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def apply(self, plan: PrunePlan) -> nn.Module:
        """Build the pruned model: a new, smaller, dense ``nn.Module`` (the source model is left untouched).

        The result keeps the module classes (picklable with ``torch.save``, scriptable where the source is),
        shares no tensor with the source and has the source's train/eval flag.
        """
        self._check(plan)
        n = self.num_channels
        kept: List[Optional[torch.Tensor]] = [
            None if len(k) == c else torch.from_numpy(np.ascontiguousarray(k, dtype=np.int64))
            for k, c in zip(plan.kept, n)
        ]
        slices = {}
        for name, spec in self.graph.specs.items():
            out_idx = self._layout_index(spec.out_layout, kept)
            in_idx = None if spec.role in ("norm", "layernorm", "depthwise") else self._layout_index(spec.in_layout,
                                                                                                   kept)
            if out_idx is not None or in_idx is not None:
                slices[name] = (out_idx, in_idx)
        params = {}
        for name, spec in self.graph.params.items():
            idx = self._layout_index(spec.layout, kept)
            if idx is not None:
                params[name] = (spec.dim, idx)
        counts = plan.num_kept
        attributes: Dict[str, Dict[str, object]] = {}
        for r in self.graph.rewrites:  # split sizes / slice bounds held by module attributes
            attributes.setdefault(r.module, {})[r.attr] = self.graph.rewrite_value(r, counts)
        return build_pruned_model(self.model, slices, self._key_cache, params, attributes)

    def child(self, model: nn.Module, plan: PrunePlan) -> "Pruner":
        """A Pruner for ``model = self.apply(plan)`` without re-tracing, for iterative pruning.

        Same settings and the same groups (names, order, members) with the plan's widths; importance is not
        carried over (it must be recomputed on the new model state).

        :param model: the model :meth:`apply` built from ``plan``.
        :param plan: the plan it was built from.
        """
        self._check(plan)
        graph = self.graph.derive(model, plan.num_kept)
        child = Pruner(model, self.example_input, ignore=self.ignore, min_channels=self.min_channels,
                       round_to=self.round_to, prune_normalized=self.prune_normalized, graph=graph, costs=self.costs)
        child._membership = self._membership  # same groups, same layers
        child.origin = tuple(o[k] for o, k in zip(self.origin, plan.kept))
        return child
