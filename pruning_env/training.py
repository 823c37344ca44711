"""Training and evaluation loops shared by pretraining, recovery between pruning steps and the final
knowledge-distillation fine-tune (spec 5.1 / 5.2).
"""
from __future__ import annotations

import copy
import math
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pruning_env.data import make_loader
from pruning_env.runtime import TorchRNG, model_device

EvalData = Union[DataLoader, Dataset, Tuple[torch.Tensor, torch.Tensor]]


def model_logits(output) -> torch.Tensor:
    """The main logits of a model's output: models with auxiliary heads return tuples whose first item is
    the main logits (fixes spec §9.23), Hugging Face-style outputs carry ``.logits``.

    :param output: what ``model(x)`` returned.
    """
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "logits"):
        return output.logits
    return output


def iter_batches(data: EvalData, batch_size: int) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
    """Batches of a DataLoader, a Dataset (in order) or preloaded ``(x, y)`` tensors.

    :param data: what to iterate.
    :param batch_size: batch size for datasets and tensors (a DataLoader keeps its own).
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
    elif isinstance(data, DataLoader):
        yield from data
    elif isinstance(data, Dataset):
        yield from make_loader(data, batch_size=batch_size)
    else:
        raise TypeError(f"cannot evaluate on {type(data).__name__}; pass a DataLoader, a Dataset or (x, y) tensors")


@torch.no_grad()
def evaluate(model: nn.Module, data: EvalData, device: Union[str, torch.device, None] = None,
             batch_size: int = 256, amp: bool = False, channels_last: bool = False) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (fractions) and mean cross-entropy of ``model`` on ``data``, in eval mode.

    :param model: the classifier; its training flag is restored afterwards.
    :param data: a DataLoader, a Dataset, or preloaded ``(x, y)`` tensors (the fast reward path).
    :param device: where to run; defaults to the model's device.
    :param batch_size: batch size when ``data`` is tensors or a Dataset.
    :param amp: autocast to float16 on CUDA.
    :param channels_last: run with channels-last memory format (faster convs on GPUs).
    """
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    use_amp = amp and device.type == "cuda"
    try:
        for x, y in iter_batches(data, batch_size):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits = model_logits(model(x))
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hits = top.eq(y.unsqueeze(1))
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            n += y.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got no data")
    return {"top1": correct1 / n, "top5": correct5 / n, "loss": loss_sum / n, "n": n}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            T: float = 2.0, soft_weight: float = 0.75) -> torch.Tensor:
    """Knowledge-distillation loss of RL-Pruner (spec 5.2): ``w·T²·KL(p_t‖p_s) + (1−w)·CE``.

    :param student_logits: logits of the model being trained.
    :param teacher_logits: logits of the teacher (no gradient needed).
    :param targets: integer labels.
    :param T: softmax temperature.
    :param soft_weight: weight ``w`` of the distillation term (0.75 in the authors' newest code).
    """
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    p_t = F.softmax(teacher_logits.detach() / T, dim=1)
    soft = F.kl_div(log_p_s, p_t, reduction="batchmean") * (T * T)
    hard = F.cross_entropy(student_logits, targets)
    return soft_weight * soft + (1.0 - soft_weight) * hard


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_lr: float = 1e-6) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``min_lr``, stepped once per batch.

    At least one warm-up step is used whenever warm-up is asked for (the authors' int rounding could
    give 0 and freeze the lr at 0, spec §9.22).
    """
    base = optimizer.param_groups[0]["lr"]
    floor = min_lr / base if base > 0 else 0.0
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    """SGD with momentum and weight decay, the optimiser of every training phase in RL-Pruner."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                scheduler=None, device: Union[str, torch.device] = "cpu", teacher: Optional[nn.Module] = None,
                T: float = 2.0, soft_weight: float = 0.75, amp: bool = False,
                max_batches: Optional[int] = None, progress: Union[bool, str] = False,
                scaler: Optional["torch.amp.GradScaler"] = None) -> Dict[str, float]:
    """One pass of training (cross-entropy, or KD when ``teacher`` is given); scheduler stepped per batch.

    :param max_batches: stop after this many batches (for short recovery fine-tunes).
    :param progress: show a tqdm bar (a string is used as its description).
    :return: mean loss and training top-1 over the batches seen.
    """
    device = torch.device(device)
    model.train()
    if teacher is not None:
        teacher.eval()
    use_amp = amp and device.type == "cuda"
    if use_amp and scaler is None:
        scaler = torch.amp.GradScaler("cuda")
    total = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    bar = tqdm(loader, total=total, desc=progress if isinstance(progress, str) else "train",
               disable=not progress, leave=False, dynamic_ncols=True)
    loss_sum = correct = n = 0
    for i, (x, y) in enumerate(bar):
        if max_batches is not None and i >= max_batches:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            logits = model_logits(model(x))
            if teacher is not None:
                with torch.no_grad():
                    t_logits = model_logits(teacher(x))
                loss = kd_loss(logits.float(), t_logits.float(), y, T=T, soft_weight=soft_weight)
            else:
                loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.item() * y.numel()
        correct += (logits.argmax(1) == y).sum().item()
        n += y.numel()
        if progress and i % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}")
    bar.close()
    return {"loss": loss_sum / max(n, 1), "top1": correct / max(n, 1), "n": n}


def finetune(model: nn.Module, train_data: Union[DataLoader, Dataset], val_data: Optional[EvalData] = None,
             epochs: int = 1, max_batches: Optional[int] = None, lr: float = 1e-3, min_lr: float = 1e-6,
             warmup_ratio: float = 0.1, teacher: Optional[nn.Module] = None, T: float = 2.0,
             soft_weight: float = 0.75, batch_size: int = 128, device: Union[str, torch.device] = "cpu",
             amp: bool = False, seed: int = 0, progress: bool = True) -> Dict[str, float]:
    """Fine-tune ``model`` in place (KD from ``teacher`` when given, else cross-entropy).

    With ``val_data`` the best epoch by validation top-1 (including the starting point) is restored at the
    end, the authors' snapshot rule but on held-out data instead of the test set (spec §9.1).

    :param epochs: passes over ``train_data``.
    :param max_batches: if set, a single short pass of at most this many batches (recovery between steps).
    :param lr: peak learning rate (authors: 1e-3), warm-up over ``warmup_ratio`` of the steps then cosine.
    """
    device = torch.device(device)
    loader = train_data if isinstance(train_data, DataLoader) else make_loader(
        train_data, batch_size=batch_size, shuffle=True, seed=seed, drop_last=len(train_data) > batch_size)
    if max_batches is not None:
        epochs = 1
        steps = min(len(loader), max_batches)
    else:
        steps = epochs * len(loader)
    optimizer = make_sgd(model, lr)
    scheduler = warmup_cosine(optimizer, steps, int(math.ceil(steps * warmup_ratio)) if warmup_ratio > 0 else 0,
                              min_lr)
    best_acc = evaluate(model, val_data, device)["top1"] if val_data is not None else None
    start_acc = best_acc
    best_state = copy.deepcopy(model.state_dict()) if val_data is not None else None
    history = []
    for epoch in range(epochs):
        stats = train_epoch(model, loader, optimizer, scheduler, device, teacher, T, soft_weight, amp,
                            max_batches, progress=f"finetune {epoch + 1}/{epochs}" if progress else False)
        if val_data is not None:
            acc = evaluate(model, val_data, device)["top1"]
            stats["val_top1"] = acc
            if acc > best_acc:
                best_acc, best_state = acc, copy.deepcopy(model.state_dict())
        history.append(stats)
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"val_top1_before": start_acc, "val_top1": best_acc, "epochs": epochs,
            "train_loss": history[-1]["loss"] if history else None, "history": history}


def recover(model: nn.Module, train_data: Union[DataLoader, Dataset], seed: int, teacher: Optional[nn.Module] = None,
            val_data: Optional[EvalData] = None, epochs: int = 1, max_batches: Optional[int] = None,
            lr: float = 1e-3, batch_size: int = 128, T: float = 2.0, soft_weight: float = 0.75,
            device: Union[str, torch.device] = "cpu", amp: bool = False) -> nn.Module:
    """A short recovery fine-tune between pruning steps (spec §5.2): :func:`finetune` in place, without a progress
    bar, on a private RNG stream seeded with ``seed`` (augmentation, dropout, shuffling), so it repeats for a
    seed and leaves the caller's RNG alone.

    :param model: the pruned model, trained in place and returned in eval mode.
    :param train_data: the training split.
    :param seed: the stream's (and the shuffling's) seed.
    :param teacher: distil from this model; None: plain cross-entropy.
    :param val_data: keep the best epoch by top-1 on these images (the start included); None: the last.
    :param epochs: passes over ``train_data``, used when ``max_batches`` is None.
    :param max_batches: a single pass of at most this many batches.
    :param lr: peak learning rate.
    :param batch_size: training batch size.
    :param T: distillation temperature.
    :param soft_weight: weight of the distillation term.
    :param device: where to train.
    :param amp: float16 autocast on CUDA.
    """
    with TorchRNG(seed, device):
        finetune(model, train_data, val_data=val_data, epochs=epochs, max_batches=max_batches, lr=lr,
                 teacher=teacher, T=T, soft_weight=soft_weight, batch_size=batch_size, device=device, amp=amp,
                 seed=seed, progress=False)
    return model.eval()
