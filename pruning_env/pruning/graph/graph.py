"""Dependency groups of a network, found by tracing one eager forward pass on an example input.

A group is a set of layers whose output channels must be removed with the same indices, plus every layer whose
input channels (or BatchNorm / depthwise channels) follow; see ``docs/pruning.md`` for the rules. This module holds
the result types and :class:`DependencyGraph`, which resolves a :class:`~.tracer.Tracer`'s raw record into groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from pruning_env.pruning.attention import attention_handler
from pruning_env.pruning.graph import partitions
from pruning_env.pruning.graph.constants import Rewrite
from pruning_env.pruning.graph.layouts import (FIXED, ExampleInput, Layout, Segment, UnsupportedModelError,
                                               layout_features)
from pruning_env.pruning.graph.norms import norm_width
from pruning_env.pruning.graph.ops import CONV_TYPES, CONVT_TYPES
from pruning_env.pruning.graph.tracer import Tracer

__all__ = ["Group", "ModuleSpec", "ParamSpec", "LayerCall", "DependencyGraph", "Rewrite"]


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
    """One call of a conv/linear/norm layer during the trace, as the analytic cost model needs it: geometry only
    (the MACs formulas are the cost model's, :mod:`pruning_env.costs.counting`).

    :ivar role: ``"conv"``, ``"convt"`` (transposed), ``"linear"``, ``"norm"``, ``"layernorm"``, ``"depthwise"``,
        ``"attention"`` (widths follow the groups; the layer's layouts are its :class:`ModuleSpec`'s), ``"fixed"`` (a layer whose channels never
        change, e.g. a grouped conv that changes the width, or a layer inside an opaque module) or ``"other"``
        (no group touches it).
    :ivar name: the layer's qualified module name.
    :ivar positions: output positions per channel (spatial size; rows or tokens for linear layers; queries of an
        ``"attention"`` call).
    :ivar context: for ``"attention"`` calls, the keys each query attends to; else 0.
    :ivar geometry: for a ``"fixed"`` call of an opaque attention module the cost model counts, its
        ``(queries, keys, context)`` (:func:`pruning_env.costs.counting.attention_geometry`); else ``None``.
    """

    name: str
    role: str
    positions: int
    context: int = 0
    geometry: Optional[Tuple[int, int, int]] = None


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
    :ivar rewrites: module attributes holding a partition's split sizes or slice bounds, which surgery sets to
        the pruned widths (layouts resolved to group indices; see :mod:`.constants`).
    """

    def __init__(self, model: nn.Module, groups: List[Group], specs: Dict[str, ModuleSpec],
                 calls: Tuple[LayerCall, ...], input_size: Tuple[int, ...],
                 params: Optional[Dict[str, ParamSpec]] = None, rewrites: Tuple[Rewrite, ...] = ()) -> None:
        self.model = model
        self.groups = groups
        self.specs = specs
        self.calls = calls
        self.input_size = input_size
        self.params = params or {}
        self.rewrites = tuple(rewrites)

    @staticmethod
    def rewrite_value(rewrite: Rewrite, counts: Sequence[int]):
        """The value of ``rewrite``'s attribute at ``counts`` channels per group (an int or a list of ints)."""
        widths = [sum(s.features if s.source is None else int(counts[s.source]) * s.block for s in lay)
                  for lay in rewrite.layouts]
        return widths if rewrite.as_list else widths[0]

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
        tracer = Tracer(model, ignored, prune_normalized)
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
            if size != layout_features(spec.layout):
                raise ValueError(f"parameter {spec.name!r} has {size} channels in dim {spec.dim} but the plan gives "
                                 f"{layout_features(spec.layout)}: the model does not match these widths")
        for g, c in zip(self.groups, counts):
            if c % g.granularity:
                raise ValueError(f"group {g.name!r} removes channels in blocks of {g.granularity}, so its width "
                                 f"must be a multiple of {g.granularity}, got {c}")
        rewrites = tuple(Rewrite(r.module, r.attr, tuple(update(lay) for lay in r.layouts), r.as_list)
                         for r in self.rewrites)
        for r in rewrites:
            have, want = getattr(modules[r.module], r.attr, None), self.rewrite_value(r, counts)
            if have != want:
                raise ValueError(f"attribute {r.attr!r} of module {r.module!r} is {have!r} but the plan gives "
                                 f"{want!r}: the model does not match these widths")
        groups = [Group(g.name, g.members, c, g.followers, g.consumers, g.kind, g.granularity)
                  for g, c in zip(self.groups, counts)]
        return DependencyGraph(model, groups, specs, self.calls, self.input_size, params=params, rewrites=rewrites)

    @staticmethod
    def _check_shapes(spec: ModuleSpec) -> None:
        m = spec.module
        if isinstance(m, nn.Linear):
            out_n, in_n = m.out_features, m.in_features
        elif isinstance(m, CONV_TYPES + CONVT_TYPES):
            out_n, in_n = m.out_channels, m.in_channels
        elif spec.role == "attention":
            heads, head_dim = attention_handler(m).heads(m)
            out_n, in_n = heads * head_dim, None
        elif spec.role == "layernorm":
            out_n, in_n = norm_width(m), None
        else:
            out_n, in_n = m.num_features, None
        for layout, n, what in ((spec.out_layout, out_n, "outputs"), (spec.in_layout, in_n, "inputs")):
            if layout is not None and n is not None and layout_features(layout) != n:
                raise ValueError(f"layer {spec.name!r} has {n} {what} but the plan gives "
                                 f"{layout_features(layout)}: the model does not match these widths")

    @classmethod
    def _finalize(cls, model: nn.Module, tracer: Tracer, input_size: Tuple[int, ...]) -> "DependencyGraph":
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
        calls = tuple(LayerCall(c.name, c.role, c.factor, c.context, c.geometry) for c in tracer.calls)
        rewrites = tuple(Rewrite(r.module, r.attr, tuple(resolve(partitions.expand(tracer, lay)) for lay in r.layouts),
                                 r.as_list) for r in tracer.rewrites)
        rewrites = tuple(r for r in rewrites if any(s.source is not None for lay in r.layouts for s in lay))
        return cls(model, groups, specs, calls, input_size, params=params, rewrites=rewrites)

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
