"""Channel partitions for the tracer: ``split`` / ``chunk`` along the channel dim and channel slices ``x[:, a:b]``.

A partition cuts a channel source (a layer's output channels) into parts, each a new source of its own; the layer's
layouts are rewritten to the concatenation of its parts (:func:`expand`), so each part can join a different group.
The split sizes and slice bounds are constants of the model's forward code, so only what stays correct after
pruning is left prunable:

- ``chunk(k, dim)`` into equal parts: the parts are tied channel by channel (the same indices go from each), so
  they stay equal and the ``chunk`` of the pruned model cuts where the traced one did (Ultralytics C2f / C3k2,
  CSP stages);
- ``split`` / ``tensor_split`` with explicit sizes and unequal ``chunk`` parts: every part is kept whole;
- a slice ``x[:, a:b]`` (step 1): the channels before ``b`` are kept (so the bounds still select the same
  channels), those after it stay prunable (e.g. GhostNet's ``cat([x1, x2], 1)[:, :oup]``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Sequence, Tuple

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
    equal = name in ("chunk", "unsafe_chunk") and len(set(sizes)) == 1
    for i, (o, p) in enumerate(zip(outs, parts)):
        if equal and i > 0:
            tracer.tie(parts[0], p, "partition", f"the op {name!r}")
        elif not equal:
            tracer.fix_layout(p)  # constant sizes in the forward code: the parts keep their widths
        tracer.set_layout(o, p, c)


def channel_slice(tracer: "Tracer", item: slice, size: int, layout: Layout) -> Layout:
    """The layout of ``x[..., a:b]`` along the channels (step 1); the channels before ``b`` are kept."""
    start, stop, step = item.indices(size)
    if step != 1 or stop <= start:
        raise tracer.unsupported(f"the op '__getitem__' slicing the channel dimension ({item})", layout)
    head, _ = cut(tracer, layout, stop)
    _, mid = cut(tracer, head, start)
    tracer.fix_layout(expand(tracer, head))
    return expand(tracer, mid)
