"""Machinery shared by the pruning agents: the Stable-Baselines-like base class and callbacks, the one recorder
(:class:`PruneMonitor`) and agent files in the one versioned save format (:mod:`agents.common.save_util` on
:mod:`pruning_env.persistence`).
"""
from agents.common.base import BasePruningAgent, make_callback, unwrap_env
from agents.common.monitor import PruneMonitor, PruneRecord
from agents.common.save_util import load_parts, save_parts

__all__ = ["BasePruningAgent", "make_callback", "unwrap_env", "PruneMonitor", "PruneRecord", "save_parts",
           "load_parts"]
