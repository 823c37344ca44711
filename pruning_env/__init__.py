"""RL-driven model compression as Gymnasium environments: RL-Pruner channel pruning (``RLPrune-*`` ids) and
AgentViT patch selection (``RLPatch-*``), over a timm-style model zoo (``create_model``, ``list_models``).

Importing the package registers the env ids, so ``gym.make("RLPrune-vgg19-cifar100")`` works after
``import pruning_env`` (or as ``gym.make("pruning_env:RLPrune-vgg19-cifar100")``).
"""
from __future__ import annotations

from typing import Any

from pruning_env.envs.registration import register_envs
from pruning_env.models import create_model, list_models

__version__ = "0.1.0"

register_envs()


def __getattr__(name: str) -> Any:
    # env classes pull in the data and training stack; load them only when asked for
    if name in ("PruneEnv", "PatchSelectEnv"):
        from pruning_env import envs

        return getattr(envs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["create_model", "list_models", "PruneEnv", "PatchSelectEnv", "register_envs", "__version__"]
