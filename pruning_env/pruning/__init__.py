"""Structured pruning engine: dependency groups -> importance -> plan -> physical removal.

``Pruner(model, example_input)`` is the entry point; see ``docs/pruning.md``.
"""
from pruning_env.pruning.graph import DependencyGraph, Group, UnsupportedModelError
from pruning_env.pruning.importance import (CRITERIA, Importance, MagnitudeImportance, RandomImportance,
                                            TaylorImportance)
from pruning_env.pruning.pruner import Pruner, PrunePlan
from pruning_env.pruning.surgery import HANDLERS, LayerHandler, handler_for

__all__ = [
    "DependencyGraph",
    "Group",
    "UnsupportedModelError",
    "Pruner",
    "PrunePlan",
    "Importance",
    "TaylorImportance",
    "MagnitudeImportance",
    "RandomImportance",
    "CRITERIA",
    "HANDLERS",
    "LayerHandler",
    "handler_for",
]
