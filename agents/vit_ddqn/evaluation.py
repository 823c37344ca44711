"""Evaluation of a ViT under patch masks (all patches, agent-selected, random at a given count), its
analytic GFLOPs at the kept-token count and measured images per second.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_env.training import iter_batches
from pruning_env.envs.patch_env import mean_threshold_mask, random_topk_mask
from pruning_env.costs import vit_macs

#: ``mask_fn(model, x) -> bool mask (N,) or None``: which patches a test batch keeps.
MaskFn = Callable[[nn.Module, torch.Tensor], Optional[torch.Tensor]]


@torch.no_grad()
def evaluate_patches(model: nn.Module, data, mask_fn: Optional[MaskFn] = None,
                     device: Union[str, torch.device] = "cpu", batch_size: int = 128) -> Dict[str, float]:
    """Top-1 accuracy and loss of ``model`` when every batch keeps the patches ``mask_fn`` picks.

    Masks are per batch (shared by its images, as in training), so agent results depend on the batch size.

    :param model: a SimpleViT.
    :param data: DataLoader, Dataset or (x, y) tensors (e.g. ``splits.test``).
    :param mask_fn: ``mask_fn(model, x)``; None keeps all patches.
    :param device: where to run.
    :param batch_size: evaluation batch (the notebook: 128).
    :return: ``{"top1", "loss", "n", "mean_kept"}``.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = n = 0
    loss_sum = kept_sum = 0.0
    try:
        for x, y in iter_batches(data, batch_size):
            x, y = x.to(device), y.to(device)
            keep = mask_fn(model, x) if mask_fn is not None else None
            kept = model.num_patches if keep is None else int(keep.sum())
            logits = model(x, keep=None if kept == model.num_patches else keep)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            kept_sum += kept * len(y)
            n += len(y)
    finally:
        model.train(was_training)
    return {"top1": correct / max(n, 1), "loss": loss_sum / max(n, 1), "n": n, "mean_kept": kept_sum / max(n, 1)}


def agent_mask_fn(agent) -> MaskFn:
    """Greedy agent masks: the batch's per-patch state, then ``agent.mask_for_states`` (epsilon = 0)."""
    return lambda model, x: agent.mask_for_states(model.patch_state(x), deterministic=True)


def random_mask_fn(n_keep: Optional[int] = None, seed: int = 0, rule: str = "topk") -> MaskFn:
    """Random masks: ``n_keep`` random patches per batch (``rule="topk"``) or the notebook's mean-thresholded
    uniform noise (``rule="mean"``, about half the patches)."""
    generator = torch.Generator().manual_seed(seed)

    def fn(model, x):
        n = model.num_patches
        if rule == "mean":
            return mean_threshold_mask(torch.rand(n, generator=generator)).to(x.device)
        return random_topk_mask(n, int(n_keep), generator, x.device)

    return fn


def mean_gflops(model: nn.Module, kept_counts: Iterable[int]) -> float:
    """Mean forward GFLOPs per image over batches that kept ``kept_counts`` tokens (analytic, 2 x MACs)."""
    counts = np.asarray(list(kept_counts), dtype=np.int64)
    if counts.size == 0:
        raise ValueError("kept_counts is empty")
    macs = {int(k): vit_macs(model, int(k)) for k in np.unique(counts)}
    return float(np.mean([macs[int(k)] for k in counts])) * 2 / 1e9


@torch.no_grad()
def images_per_second(model: nn.Module, n_tokens: Optional[int] = None, batch_size: int = 128,
                      device: Union[str, torch.device] = "cpu", repeats: int = 5, warmup: int = 2,
                      seed: int = 0) -> float:
    """Measured inference throughput of ``model`` keeping ``n_tokens`` tokens (synchronised on CUDA).

    :param model: a SimpleViT.
    :param n_tokens: kept tokens (None: all).
    :param batch_size: images per forward.
    :param repeats: timed forwards (after ``warmup`` untimed ones).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, model.channels, model.image_size, model.image_size, generator=g).to(device)
    keep = None if n_tokens is None or n_tokens >= model.num_patches else \
        random_topk_mask(model.num_patches, int(n_tokens), g, device)
    try:
        for _ in range(warmup):
            model(x, keep=keep)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x, keep=keep)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    finally:
        model.train(was_training)
    return batch_size * repeats / elapsed


def time_train_steps(model: nn.Module, settings: Dict[str, Tuple[int, int]], batch_size: int = 128,
                     device: Union[str, torch.device] = "cpu", repeats: int = 10, warmup: int = 2,
                     seed: int = 0) -> Dict[str, float]:
    """Median seconds of one ViT training step per setting, timed interleaved (robust to a busy machine).

    Each setting is ``(kept tokens, state passes)``: the step is ``state passes`` no-grad state computations
    plus forward, backward and an Adam update on ``kept tokens`` tokens. The model is copied, not trained.

    :param model: a SimpleViT.
    :param settings: name -> (kept tokens, state passes), e.g. ``{"full": (64, 0), "agent": (30, 1)}``.
    :param batch_size: images per step.
    :param repeats: timed rounds; every round times each setting once, in turn.
    :param warmup: untimed rounds first.
    """
    import copy

    device = torch.device(device)
    net = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, net.channels, net.image_size, net.image_size, generator=g).to(device)
    y = torch.randint(0, net.num_classes, (batch_size,), generator=g).to(device)
    masks = {name: None if k >= net.num_patches else random_topk_mask(net.num_patches, k, g, device)
             for name, (k, _) in settings.items()}
    times: Dict[str, list] = {name: [] for name in settings}
    for r in range(warmup + repeats):
        for name, (_, passes) in settings.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(passes):
                net.patch_state(x)
            loss = F.cross_entropy(net(x, keep=masks[name]), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v)) for name, v in times.items()}


__all__ = ["evaluate_patches", "agent_mask_fn", "random_mask_fn", "mean_gflops", "images_per_second",
           "time_train_steps"]
