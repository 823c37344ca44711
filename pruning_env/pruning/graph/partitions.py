"""Channel partitions for the tracer: ``split`` / ``chunk`` along the channel dim and channel slices ``x[:, a:b]``.

A partition cuts a channel source (a layer's output channels) into parts, each a new source of its own; the layer's
layouts are rewritten to the concatenation of its parts (:func:`expand`), so each part can join a different group.
The split sizes and slice bounds are constants of the model's forward code; a part may lose channels only where
the pruned model's forward still cuts at the right place:

- ``chunk(k, dim)`` into equal parts: the parts are tied channel by channel (the same indices go from each), so
  they stay equal and the ``chunk`` of the pruned model cuts where the traced one did (Ultralytics C2f / C3k2,
  CSP stages); so are the equal parts of ``split(x, self.width, 1)`` with an int attribute, which surgery sets to
  the kept width of one part (Res2Net);
- ``split`` with explicit sizes read from a module attribute (a list attribute, timm's ``MixedConv2d.splits``, or
  one int attribute per size, ``split(x, [self.a, self.b], 1)``): the parts are pruned independently and surgery
  rewrites the attribute to the kept widths (:mod:`.constants` ties a constant to its attribute, and rejects
  one used in any other way);
- a slice ``x[:, a:b]`` (step 1) whose bound is a module attribute (GhostNet's ``cat([x1, x2], 1)[:, :self.out_chs]``):
  everything stays prunable and surgery sets the attribute to the kept width before the bound;
- any other constant (a literal, a size computed in the forward, ``chunk`` into unequal parts, ``tensor_split``,
  an attribute used elsewhere too): a split's parts are kept whole; a slice keeps the channels before a bound
  counted from the start, or after one counted from the end (``x[:, :-k]``), so it still selects the same channels.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Sequence, Tuple

from pruning_env.pruning.graph.constants import WatchedInt, WatchedList, plain
from pruning_env.pruning.graph.layouts import FIXED, Layout, Segment

if TYPE_CHECKING:  # pragma: no cover
    from pruning_env.pruning.graph.tracer import Tracer

#: Functional ops that partition a tensor along one dim.
PARTITION_OPS = {"split", "chunk", "split_with_sizes", "unsafe_split", "unsafe_chunk", "tensor_split"}


def expand(tracer: "Tracer", layout: Layout) -> Layout:
    """``layout`` with every partitioned source replaced by its parts (recursively)."""
    parts = tracer.parts
    if not parts or layout is None:
        return layout
    out: List[Segment] = []
    for s in layout:
        if s.source in parts:
            out.extend(expand(tracer, tuple(Segment(p, c, s.block) for p, c in parts[s.source])))
        else:
            out.append(s)
    return tuple(out)


def _partition(tracer: "Tracer", sid: int, sizes: Sequence[int]) -> List[int]:
    """Cut source ``sid`` into new sources of ``sizes`` channels; ``sid`` itself appears in no layout after."""
    uf = tracer.uf
    root = uf.find(sid)
    # a source already tied to others (or owning a parameter, or removed in conv-group blocks) cannot be cut alone:
    # its partners' channels keep the whole width's indices, so the parts are kept
    shared = (uf.fixed[root] or uf.granularity[root] > 1 or sid in {s for s, _ in tracer.param_sources.values()}
              or any(uf.find(i) == root for i in range(len(uf.parent)) if i != sid))
    ids = []
    for c in sizes:
        p = uf.add()
        tracer.source_names.append(tracer.source_names[sid])
        tracer.source_channels.append(int(c))
        ids.append(p)
        if shared:
            uf.fix(p)
    tracer.parts[sid] = list(zip(ids, sizes))
    uf.fix(sid)  # no layout shows it any more; fixing it keeps it (and anything tied to it) out of the groups
    return ids


def cut(tracer: "Tracer", layout: Layout, at: int) -> Tuple[Layout, Layout]:
    """Split ``layout`` at feature ``at`` into (before, after), cutting a source in two where ``at`` falls inside."""
    left: List[Segment] = []
    right: List[Segment] = []
    off = 0
    for s in layout:
        if off + s.features <= at:
            left.append(s)
        elif off >= at:
            right.append(s)
        else:
            k = at - off
            if k % s.block:
                raise tracer.unsupported("a partition cutting inside a flattened channel", layout)
            k //= s.block
            if s.source is None or s.source == FIXED:
                a, b = s.source, s.source
            else:
                a, b = _partition(tracer, s.source, (k, s.channels - k))
            left.append(Segment(a, k, s.block))
            right.append(Segment(b, s.channels - k, s.block))
        off += s.features
    return expand(tracer, tuple(left)), expand(tracer, tuple(right))


def _edges(layout: Layout) -> set:
    edges, off = set(), 0
    for s in layout:
        off += s.features
        edges.add(off)
    return edges


def align(tracer: "Tracer", a: Layout, b: Layout, rounds: int = 4) -> Tuple[Layout, Layout]:
    """``a`` and ``b`` (as many features) cut at each other's segment boundaries, so that they can be tied segment
    by segment: GhostNet's ``cat([x1, cheap(x1)], 1)`` (one source twice) added to a conv shortcut's output cuts
    the shortcut conv in two. Cutting a source changes every layout showing it, so this repeats (``rounds``)."""
    for _ in range(rounds):
        a, b = expand(tracer, a), expand(tracer, b)
        edges = sorted(_edges(a) | _edges(b))
        if _edges(a) == _edges(b):
            return a, b
        for at in edges[:-1]:
            a = _cut_at(tracer, a, at)
            b = _cut_at(tracer, b, at)
    a, b = expand(tracer, a), expand(tracer, b)
    if _edges(a) != _edges(b):
        raise tracer.unsupported("an elementwise op between tensors of different channel layouts", a + b)
    return a, b


def _cut_at(tracer: "Tracer", layout: Layout, at: int) -> Layout:
    left, right = cut(tracer, layout, at)
    return expand(tracer, left + right)


def on_partition(tracer: "Tracer", name: str, args, kwargs, sourced, outs) -> None:
    """``split`` / ``chunk`` (and variants) of a channel tensor."""
    src, layout = tracer.single_source(name, args, sourced)
    c = tracer.cdim(src)
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    dim = dim % src.dim()
    if dim != c:  # along the batch or a spatial dim: every part keeps all channels
        for o in outs:
            tracer.set_layout(o, layout, c)
        return
    sizes = [int(o.shape[c]) for o in outs]
    parts: List[Layout] = []
    rest = layout
    for size in sizes[:-1]:
        left, rest = cut(tracer, rest, size)
        parts.append(left)
    parts.append(rest)
    parts = [expand(tracer, p) for p in parts]  # a later cut may have partitioned a source of an earlier part
    spec = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
    equal = len(set(sizes)) == 1 and (name in ("chunk", "unsafe_chunk") or (
        name == "split" and isinstance(spec, WatchedInt) and tracer.watch.take(spec, (parts[0],))))
    if equal:
        for p in parts[1:]:
            tracer.tie(parts[0], p, "partition", f"the op {name!r}")
    else:
        _sized_parts(tracer, name, spec, parts)
    for o, p in zip(outs, parts):
        tracer.set_layout(o, p, c)


def _sized_parts(tracer: "Tracer", name: str, spec, parts: List[Layout]) -> None:
    """Unequal parts: prunable where their sizes are module attributes surgery rewrites, else kept whole."""
    watch = tracer.watch
    if name in ("split", "split_with_sizes"):
        if isinstance(spec, WatchedList) and watch.take(spec, tuple(parts)):
            return
        if type(spec) in (list, tuple) and len(spec) == len(parts):
            for size, part in zip(spec, parts):
                if not watch.take(size, (part,)):
                    tracer.fix_layout(part)
            return
    for part in parts:
        tracer.fix_layout(part)  # constant sizes in the forward code: the parts keep their widths


def channel_slice(tracer: "Tracer", item: slice, size: int, layout: Layout) -> Layout:
    """The layout of ``x[..., a:b]`` along the channels (step 1); see the module docstring for the bounds."""
    start, stop, step = item.indices(size)
    if step != 1 or stop <= start:
        raise tracer.unsupported(f"the op '__getitem__' slicing the channel dimension ({item})", layout)
    before, rest = cut(tracer, layout, start)
    mid, after = cut(tracer, rest, stop - start)
    before, mid, after = (expand(tracer, lay) for lay in (before, mid, after))  # a later cut may cut an earlier one
    _bound(tracer, item.start, start, size, before, mid + after)
    _bound(tracer, item.stop, stop, size, before + mid, after)
    return expand(tracer, mid)


def _bound(tracer: "Tracer", value, at: int, size: int, head: Layout, tail: Layout) -> None:
    """Keep a slice bound at feature ``at`` right after pruning: rewrite its attribute to ``head``'s kept width,
    or keep ``head`` (a bound from the start) or ``tail`` (from the end, negative) whole."""
    if value is None or at in (0, size):  # the start or the end of the channels, also after pruning
        return
    if plain(value) < 0:
        tracer.fix_layout(expand(tracer, tail))
    elif not tracer.watch.take(value, (head,)):
        tracer.fix_layout(expand(tracer, head))
