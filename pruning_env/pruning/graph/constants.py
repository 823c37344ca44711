"""Where a partition's constants come from: module attributes watched during the trace.

A ``split``'s sizes and a channel slice's bounds are constants of the forward code; after pruning they must be
the pruned widths, which only surgery can arrange, by rewriting the attribute the forward reads them from (timm's
``MixedConv2d.splits``, GhostNet's ``GhostModule.out_chs``). To tie a constant to an attribute without guessing,
the tracer swaps, for the trace only, every plain ``int`` and list-of-``int`` attribute of the model's container
modules for a watched copy (an ``int`` / ``list`` subclass with the same value: the forward computes exactly the
same). A watched value that reaches a partition as a size or bound *is* that attribute (no arithmetic made it, or
the result would be a plain ``int``). The attribute is rewritable when that is its only use in the whole trace:
any other use (arithmetic, comparison, iteration, an argument of another torch op, a second partition needing
another value) is recorded,
and the partitions that took it keep their channels as if it were a literal (:meth:`Watch.resolve`). Uses that
Python makes at C level without a method call (``range(n)``, indexing a list with it) cannot be seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch.nn as nn

from pruning_env.pruning.graph.layouts import Layout

if TYPE_CHECKING:  # pragma: no cover
    from pruning_env.pruning.graph.tracer import Tracer

__all__ = ["Rewrite", "Watch"]

Owner = Tuple[str, str]  # (qualified module name, attribute name)


@dataclass
class Rewrite:
    """An attribute surgery sets to pruned widths: ``module.attr`` becomes the width of ``layouts[0]`` (an int
    attribute) or the list of the widths of ``layouts`` (a list attribute, e.g. ``MixedConv2d.splits``).

    :ivar layouts: while tracing, source ids (the fallback fixes them); in the graph, resolved to group indices.
    """

    module: str
    attr: str
    layouts: Tuple[Layout, ...]
    as_list: bool = False


def _noted(base_type: type, name: str):
    base = getattr(base_type, name)

    def method(self, *args, **kwargs):
        self._watch.used(self._owner)
        return base(self, *args, **kwargs)

    method.__name__ = name
    return method


_INT_USES = ("__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __floordiv__ __rfloordiv__ __truediv__ "
             "__rtruediv__ __mod__ __rmod__ __divmod__ __rdivmod__ __pow__ __rpow__ __neg__ __pos__ __abs__ "
             "__invert__ __lshift__ __rshift__ __and__ __rand__ __or__ __ror__ __xor__ __rxor__ __eq__ __ne__ "
             "__lt__ __le__ __gt__ __ge__ __bool__ __hash__ __float__ __int__ __index__ __round__ __trunc__ "
             "__floor__ __ceil__").split()
_LIST_USES = ("__iter__ __reversed__ __len__ __getitem__ __contains__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ "
              "__add__ __mul__ __rmul__ __iadd__ __imul__ __setitem__ __delitem__ append extend insert "
              "pop remove clear sort reverse index count copy").split()


class WatchedInt(int):
    """An ``int`` attribute's value during the trace; every Python-level use is noted."""

    def __new__(cls, value: int, watch: "Watch", owner: Owner) -> "WatchedInt":
        obj = super().__new__(cls, value)
        obj._watch, obj._owner = watch, owner
        return obj

    def __reduce__(self):  # a copy made during the forward is a plain int
        self._watch.used(self._owner)
        return int, (int.__int__(self),)


class WatchedList(list):
    """A list-of-``int`` attribute's value during the trace; every Python-level use is noted."""

    def __init__(self, values: Iterable[int], watch: "Watch", owner: Owner) -> None:
        super().__init__(values)
        self._watch, self._owner = watch, owner

    def __reduce__(self):
        self._watch.used(self._owner)
        return list, (list(list.__iter__(self)),)


for _name in _INT_USES:
    setattr(WatchedInt, _name, _noted(int, _name))
for _name in _LIST_USES:
    setattr(WatchedList, _name, _noted(list, _name))
WATCHED = (WatchedInt, WatchedList)


class Watch:
    """The watched attributes of one trace: installed by :meth:`install`, put back by :meth:`restore`.

    Uses inside torch functions and the tracer's own handlers are not noted (``quiet``): there a watched value is
    an argument, which :meth:`scan` notes unless the partition handler :meth:`take` s it.
    """

    def __init__(self, tracer: "Tracer") -> None:
        self.tracer = tracer
        self.quiet = 0
        self.originals: List[Tuple[nn.Module, str, object, object]] = []  # module, attr, original, watched
        self.others: Set[Owner] = set()  # attributes used otherwise than as a partition constant
        self.rewrites: List[Rewrite] = []
        self.pending: List[object] = []  # watched arguments of the op being handled

    def used(self, owner: Owner) -> None:
        if not self.quiet:
            self.others.add(owner)

    def install(self, modules: Iterable[Tuple[str, nn.Module]]) -> None:
        for name, module in modules:
            for attr, value in list(module.__dict__.items()):
                if attr.startswith("_"):
                    continue
                if type(value) is int:
                    watched = WatchedInt(value, self, (name, attr))
                elif type(value) is list and value and all(type(v) is int for v in value):
                    watched = WatchedList(value, self, (name, attr))
                else:
                    continue
                module.__dict__[attr] = watched
                self.originals.append((module, attr, value, watched))

    def restore(self) -> None:
        for module, attr, value, watched in reversed(self.originals):
            if module.__dict__.get(attr) is watched:  # the forward may have assigned it meanwhile
                module.__dict__[attr] = value
        self.originals.clear()

    # ---- per op --------------------------------------------------------------------------------------------
    def scan(self, flat: Iterable[object]) -> None:
        """Note the watched values among an op's (flattened) arguments, slice bounds included."""
        found = []
        for a in flat:
            if isinstance(a, WATCHED):
                found.append(a)
            elif isinstance(a, slice):
                found.extend(v for v in (a.start, a.stop, a.step) if isinstance(v, WATCHED))
        self.pending = found

    def done(self) -> None:
        """End of an op: the watched arguments its handler did not take are other uses."""
        for v in self.pending:
            self.others.add(v._owner)
        self.pending = []

    def take(self, value: object, layouts: Tuple[Layout, ...]) -> bool:
        """Record a rewrite if ``value`` is a watched attribute (``layouts``: its new widths' channels)."""
        at = next((i for i, v in enumerate(self.pending) if v is value), None) if isinstance(value, WATCHED) else None
        if at is None:
            return False
        del self.pending[at]  # one occurrence: the same value twice in one op is two takes
        module, attr = value._owner
        self.rewrites.append(Rewrite(module, attr, layouts, isinstance(value, WatchedList)))
        return True

    def resolve(self, expand: Callable[[Layout], Layout],
                signature: Callable[[Layout], object]) -> Tuple[List[Rewrite], List[Rewrite]]:
        """(accepted, rejected) rewrites at the end of the trace, one accepted per attribute. An attribute used
        otherwise, or taken by several partitions whose widths could differ after pruning, is rejected (the tracer
        then keeps the channels of its layouts, as for a literal); several takes whose layouts have the same
        ``signature`` (the same pruned width for every plan: DPN's ``x[:, :self.num_1x1_c]`` and
        ``x[:, self.num_1x1_c:]``, on two tensors tied by a residual add) are one rewrite."""
        by_owner: Dict[Owner, List[Rewrite]] = {}
        for r in self.rewrites:
            by_owner.setdefault((r.module, r.attr), []).append(
                Rewrite(r.module, r.attr, tuple(expand(lay) for lay in r.layouts), r.as_list))
        ok, bad = [], []
        for owner, takes in by_owner.items():
            first = [signature(lay) for lay in takes[0].layouts]
            if owner in self.others or any([signature(lay) for lay in t.layouts] != first for t in takes[1:]):
                bad.extend(takes)
            else:
                ok.append(takes[0])
        return ok, bad


def plain(value: Optional[object]) -> Optional[int]:
    """The plain ``int`` of a (maybe watched) bound, read without noting a use."""
    return None if value is None else int.__int__(value)
