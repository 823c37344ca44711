"""Structured pruning engine: dependency groups -> importance -> plan -> physical removal.

``Pruner(model, example_input)`` is the entry point; see ``docs/pruning.md``.
"""
from pruning_env.pruning.attention import AttentionHandler, attention_handler
from pruning_env.pruning.graph import (OPAQUE_TYPES, DependencyGraph, ExampleInput, Group, LayerCall,
                                       UnsupportedModelError)
from pruning_env.pruning.importance import (CRITERIA, Batches, Importance, MagnitudeImportance, RandomImportance,
                                            TaylorImportance, VarianceImportance)
from pruning_env.pruning.pruner import PerGroup, Pruner, PrunePlan
from pruning_env.pruning.surgery import HANDLERS, LayerHandler, handler_for
from pruning_env.pruning.verify import KeptStatisticsReference, zeroed_copy

__all__ = [
    "DependencyGraph",
    "Group",
    "LayerCall",
    "ExampleInput",
    "UnsupportedModelError",
    "Pruner",
    "PrunePlan",
    "PerGroup",
    "Batches",
    "Importance",
    "TaylorImportance",
    "MagnitudeImportance",
    "RandomImportance",
    "VarianceImportance",
    "CRITERIA",
    "HANDLERS",
    "LayerHandler",
    "handler_for",
    "zeroed_copy",
    "KeptStatisticsReference",
    "OPAQUE_TYPES",
    "AttentionHandler",
    "attention_handler",
]
