"""Channel layouts: what each feature of a traced tensor's channel dim is made of, and the graph's error.

A layout is a tuple of :class:`Segment` s, each a run of channels from one channel *source* (a layer's output
channels, a part of a partitioned one, a parameter); elementwise ops tie sources, concatenations chain segments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

__all__ = ["Segment", "Layout", "layout_features", "FIXED", "ExampleInput", "UnsupportedModelError"]

#: One input batch for tracing: a tensor, a tuple of positional tensors or a dict of keyword tensors.
ExampleInput = Union[torch.Tensor, Tuple[torch.Tensor, ...], Dict[str, torch.Tensor]]
FIXED = -1  # source id of channels that may never be removed (inputs, constants, outputs, ignored layers)


class UnsupportedModelError(RuntimeError):
    """The tracer met a construct whose channel dependencies it cannot prove; pruning would be unsafe."""


@dataclass(frozen=True)
class Segment:
    """A run of ``channels * block`` features of dim 1 that all come from one channel source.

    ``source`` is a source id during tracing and a group index (or ``None``: never pruned) once resolved;
    ``block`` > 1 after flattening a conv output (each channel becomes ``block`` consecutive features).
    """

    source: Optional[int]
    channels: int
    block: int = 1

    @property
    def features(self) -> int:
        return self.channels * self.block


Layout = Tuple[Segment, ...]


def layout_features(layout: Layout) -> int:
    """Number of features of dim 1 that ``layout`` describes."""
    return sum(s.features for s in layout)
