"""Gymnasium ids of the envs: ``RLPrune-{model}-{dataset}`` for every zoo CNN on CIFAR-10/100 and the embedded
digits set, the offline ``RLPrune-quickstart``, and AgentViT's ``RLPatch-*``; registered on ``import pruning_env``.

Ids are unversioned, as the design card writes them (Gymnasium then refuses a ``-v0`` twin). Entry points are
strings, so registering imports neither env module (nor torchvision): they load on the first ``gym.make``.
"""
from __future__ import annotations

from typing import Dict, List

import gymnasium as gym

PRUNE_ENTRY_POINT = "pruning_env.envs.prune_env:PruneEnv"
PATCH_ENTRY_POINT = "pruning_env.envs.patch_env:PatchSelectEnv"
LAYERWISE_ENTRY_POINT = "pruning_env.envs.layerwise_env:LayerwisePruneEnv"
CIFAR_DATASETS = ("cifar10", "cifar100")

#: digits has 1,437 training images: hold out 300 for validation (the reward) instead of CIFAR's 5,000
DIGITS_KWARGS = dict(dataset="digits", val_size=300, reward_samples=300, calibration_size=64)

#: The offline quickstart: a width-0.25 VGG-11 on the embedded digits, pretrained on first use (about a
#: minute on a laptop CPU), one-shot pruning to exactly 50% fewer FLOPs (sparsity action; the budget follows
#: ``target_metric``, so ``target_metric="latency"`` budgets predicted latency).
QUICKSTART_KWARGS = dict(model="vgg11", width=0.25, pretrained=True, auto_pretrain_epochs=10, target=0.5,
                         target_metric="flops", budget="target", n_steps=1, **DIGITS_KWARGS)

#: The offline patch-selection quickstart: embedded digits, a CPU-sized ViT, reward every batch, two epochs.
#: Registered ids keep wall-clock seconds out of ``info`` (``time_info=False``: infos repeat exactly, as
#: Gymnasium's checker demands); the running totals ``env.train_time`` / ``env.state_time`` are kept either way.
PATCH_QUICKSTART_KWARGS = dict(dataset="digits", width=0.25, depth=2, batch_size=64, epochs=2, reward_every=1,
                               n_keep=30, time_info=False)

#: AgentViT ids and their PatchSelectEnv kwargs
PATCH_ENV_IDS = {
    # the notebook's CIFAR-10 configuration (needs CIFAR-10 under data_root, or download=True)
    "RLPatch-vit-cifar10": dict(dataset="cifar10", width=1.0, depth=6, batch_size=128, epochs=100,
                                reward_every=50, n_keep=30, time_info=False),
    "RLPatch-quickstart": PATCH_QUICKSTART_KWARGS,
}


def prunable_models() -> List[str]:
    """Zoo models the pruning env is registered for (the CNNs; ViTs belong to the patch-selection env)."""
    from pruning_env.models import list_models

    return [name for name in list_models() if "vit" not in name]


def prune_env_ids() -> Dict[str, dict]:
    """Every pruning env id with the default kwargs it is registered with."""
    ids: Dict[str, dict] = {}
    for model in prunable_models():
        for dataset in CIFAR_DATASETS:
            ids[f"RLPrune-{model}-{dataset}"] = dict(model=model, dataset=dataset)
        ids[f"RLPrune-{model}-digits"] = dict(model=model, **DIGITS_KWARGS)
    ids["RLPrune-quickstart"] = dict(QUICKSTART_KWARGS)
    return ids


def register_patch_envs() -> List[str]:
    """Register the patch-selection env ids with Gymnasium (idempotent).

    :return: the patch-selection env ids.
    """
    for env_id, kwargs in PATCH_ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=PATCH_ENTRY_POINT, kwargs=dict(kwargs))
    return list(PATCH_ENV_IDS)


def register_envs() -> List[str]:
    """Register the pruning env ids and the patch-selection ids with Gymnasium; idempotent.

    :return: the pruning env ids.
    """
    ids = prune_env_ids()
    for env_id, kwargs in ids.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=PRUNE_ENTRY_POINT, kwargs=kwargs)
        # AMC's layer-by-layer twin of every id (a one-step FLOPs-budget inner env; see docs/amc.md)
        lw_id, lw_kwargs = env_id.replace("RLPrune-", "RLPruneLW-", 1), {**kwargs, "record_timings": False}
        if lw_id not in gym.registry:
            gym.register(id=lw_id, entry_point=LAYERWISE_ENTRY_POINT, kwargs=lw_kwargs)
    register_patch_envs()
    return list(ids)


__all__ = ["register_envs", "register_patch_envs", "prune_env_ids", "prunable_models", "QUICKSTART_KWARGS",
           "DIGITS_KWARGS", "PATCH_QUICKSTART_KWARGS", "PATCH_ENV_IDS", "CIFAR_DATASETS", "PRUNE_ENTRY_POINT",
           "PATCH_ENTRY_POINT", "LAYERWISE_ENTRY_POINT"]
