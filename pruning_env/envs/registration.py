"""Gymnasium ids of the pruning envs: ``RLPrune-{model}-{dataset}`` for every zoo CNN on CIFAR-10/100 and
the embedded digits set, plus the offline ``RLPrune-quickstart``; registered when ``pruning_env`` is imported.

Ids are unversioned, as the design card writes them (Gymnasium then refuses a ``-v0`` twin).
"""
from __future__ import annotations

from typing import Dict, List

import gymnasium as gym

PRUNE_ENTRY_POINT = "pruning_env.envs.prune_env:PruneEnv"
CIFAR_DATASETS = ("cifar10", "cifar100")

#: digits has 1,437 training images: hold out 300 for validation (the reward) instead of CIFAR's 5,000
DIGITS_KWARGS = dict(dataset="digits", val_size=300, reward_samples=300, calibration_size=64)

#: The offline quickstart: a width-0.25 VGG-11 on the embedded digits, pretrained on first use (about a
#: minute on a laptop CPU), one-shot pruning to exactly 50% fewer FLOPs (sparsity action, FLOPs budget).
QUICKSTART_KWARGS = dict(model="vgg11", width=0.25, pretrained=True, auto_pretrain_epochs=10, target=0.5,
                         target_metric="flops", budget="flops", n_steps=1, **DIGITS_KWARGS)


#: per-model defaults: a depthwise conv pruned to a single channel (groups=1) re-traces as a plain conv, which
#: changes the groups between steps, so MobileNetV3 groups keep at least two channels
MODEL_KWARGS = {"mobilenetv3_small": dict(min_channels=2), "mobilenetv3_large": dict(min_channels=2)}


def prunable_models() -> List[str]:
    """Zoo models the pruning env is registered for (the CNNs; ViTs belong to the patch-selection env)."""
    from pruning_env.models import list_models

    return [name for name in list_models() if "vit" not in name]


def prune_env_ids() -> Dict[str, dict]:
    """Every pruning env id with the default kwargs it is registered with."""
    ids: Dict[str, dict] = {}
    for model in prunable_models():
        extra = dict(MODEL_KWARGS.get(model, {}))
        for dataset in CIFAR_DATASETS:
            ids[f"RLPrune-{model}-{dataset}"] = dict(model=model, dataset=dataset, **extra)
        ids[f"RLPrune-{model}-digits"] = dict(model=model, **DIGITS_KWARGS, **extra)
    ids["RLPrune-quickstart"] = dict(QUICKSTART_KWARGS)
    return ids


def register_envs() -> List[str]:
    """Register the pruning env ids (and the patch-selection ids) with Gymnasium; idempotent.

    :return: the pruning env ids.
    """
    ids = prune_env_ids()
    for env_id, kwargs in ids.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=PRUNE_ENTRY_POINT, kwargs=kwargs)
    try:
        from pruning_env.envs.patch_env import register_patch_envs
    except ImportError:  # the patch env is optional for the pruning ids
        pass
    else:
        register_patch_envs()
    return list(ids)


__all__ = ["register_envs", "prune_env_ids", "prunable_models", "QUICKSTART_KWARGS", "DIGITS_KWARGS", "MODEL_KWARGS",
           "CIFAR_DATASETS", "PRUNE_ENTRY_POINT"]
