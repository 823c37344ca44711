"""The dependency graph: which channels of a model must be removed together, found by tracing.

Read one file at a time, bottom up:

- :mod:`.layouts`: channel layouts (``Segment``, ``Layout``) and ``UnsupportedModelError``;
- :mod:`.ops`: the tables: layer types recorded, functional ops by what they do to channels, opaque modules;
- :mod:`.unionfind`: tying channel sources;
- :mod:`.tracer`: the forward pass under a ``TorchFunctionMode``, dispatching to :mod:`.functional` (functional
  ops), :mod:`.partitions` (split / chunk / channel slices, with :mod:`.constants`: the module attributes their
  sizes and bounds come from, rewritten by surgery) and :mod:`.layers` (layer, attention and opaque calls);
- :mod:`.graph`: ``DependencyGraph`` (groups, slicing specs, layer calls) and its result types.
"""
from pruning_env.pruning.graph.graph import DependencyGraph, Group, LayerCall, ModuleSpec, ParamSpec
from pruning_env.pruning.graph.layouts import (FIXED, ExampleInput, Layout, Segment, UnsupportedModelError,
                                               layout_features)
from pruning_env.pruning.graph.ops import CONV_TYPES, LEAF_TYPES, NORM_TYPES, OPAQUE_TYPES, is_opaque

__all__ = [
    "Segment",
    "Layout",
    "layout_features",
    "FIXED",
    "Group",
    "ModuleSpec",
    "ParamSpec",
    "LayerCall",
    "DependencyGraph",
    "UnsupportedModelError",
    "ExampleInput",
    "OPAQUE_TYPES",
    "is_opaque",
    "CONV_TYPES",
    "NORM_TYPES",
    "LEAF_TYPES",
]
