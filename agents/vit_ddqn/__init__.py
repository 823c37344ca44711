"""AgentViT patch-selection agents: the DDQN agent (faithful and double-DQN modes) and the all-patches /
random-mask baselines, all with the Stable-Baselines-like surface, plus mask-aware evaluation helpers.
"""
from agents.vit_ddqn.base import PatchAgent
from agents.vit_ddqn.baselines import AllPatches, RandomPatches
from agents.vit_ddqn.buffers import ReplayBuffer, Transition
from agents.vit_ddqn.ddqn import MODES, ViTDDQN, epsilon_at, polyak_update
from agents.vit_ddqn.policies import QNetwork

__all__ = ["PatchAgent", "ViTDDQN", "AllPatches", "RandomPatches", "ReplayBuffer", "Transition", "QNetwork",
           "epsilon_at", "polyak_update", "MODES"]
