"""The faithful RL-Pruner agent (spec §2): a pruning distribution refined by look-ahead sampling, a top-K
buffer, a lambda step with a PPO-style ratio clip, epsilon-greedy selection and the collapse guard.
"""
from agents.rl_pruner.policies import (TopKBuffer, adjust_distribution, epsilon_at, initial_distribution,
                                       sample_action, update_distribution)
from agents.rl_pruner.rl_pruner import RLPrunerAgent

__all__ = ["RLPrunerAgent", "TopKBuffer", "adjust_distribution", "epsilon_at", "initial_distribution",
           "sample_action", "update_distribution"]
