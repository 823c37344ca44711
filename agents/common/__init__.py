"""Machinery shared by the pruning agents: the Stable-Baselines-like base class, callbacks and the
per-step run logging (CSV / TensorBoard) used by train_agent.py.
"""
from agents.common.base import BasePruningAgent, make_callback, unwrap_env

__all__ = ["BasePruningAgent", "make_callback", "unwrap_env"]
