"""Base-model training: ``python -m pruning_env.pretrain --model vgg19 --dataset cifar100 [--recipe NAME]``.

Two named recipes (see docs/training.md): ``authors`` (the default, spec 5.1) and ``small_data`` for a few
thousand images; any flag overrides the recipe's value. The best epoch by *validation* top-1 is kept (spec §9.1).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from pruning_env.checkpoint import default_checkpoint_path, save_checkpoint
from pruning_env.persistence import LEGACY_VERSION, load_parts, save_parts
from pruning_env.runtime import atomic_write_text, resolve_device, rng_state, seed_everything, set_rng_state
from pruning_env.data import make_datasets, make_loader
from pruning_env.models import create_model, list_models
from pruning_env.training import evaluate, make_sgd, train_epoch, warmup_cosine


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one pretraining recipe (SGD, momentum 0.9, linear warm-up then cosine)."""

    epochs: int
    """passes over the training split"""
    lr: float
    """peak learning rate"""
    batch_size: int
    """images per SGD step"""
    warmup_ratio: float
    """fraction of the steps with linear warm-up"""
    min_lr: float
    """learning rate at the end of the cosine"""
    weight_decay: float
    """L2 weight decay"""
    rotation: bool
    """random rotation by up to 15 degrees on top of crop + flip"""
    head: Optional[str]
    """classifier head for zoo models that offer a ``head`` option (VGG: ``mlp`` or ``linear``); None keeps the
    model's own; models without the option keep theirs"""


#: named recipes; ``authors`` is RL-Pruner's (spec 5.1), ``small_data`` the one for a few thousand images
RECIPES: Dict[str, Recipe] = {
    "authors": Recipe(epochs=250, lr=0.1, batch_size=256, warmup_ratio=0.1, min_lr=1e-6, weight_decay=5e-4,
                      rotation=True, head=None),
    "small_data": Recipe(epochs=100, lr=0.05, batch_size=128, warmup_ratio=0.3, min_lr=0.0, weight_decay=5e-4,
                         rotation=False, head="linear"),
}


#: kind and version of the resume file ``{checkpoint}.state`` in :mod:`pruning_env.persistence`
RESUME_KIND = "pretrain-state"
RESUME_VERSION = 1


def read_resume_state(path: Path, device: Union[str, torch.device]) -> Dict[str, object]:
    """The training state in a resume file written after every epoch (this layout or the earlier plain
    ``torch.save`` dict); a file of another kind or version raises ``ValueError`` naming it.

    :param path: the ``.state`` file.
    :param device: where its tensors are loaded.
    """
    return load_parts(path, RESUME_KIND, (LEGACY_VERSION, RESUME_VERSION), map_location=device).data


def get_recipe(name: str, **overrides: object) -> Recipe:
    """The recipe called ``name`` with the fields in ``overrides`` that are not None replaced.

    :param name: a key of :data:`RECIPES`.
    :param overrides: field values, e.g. ``epochs=30``; None keeps the recipe's value.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"recipe has no field(s) {unknown}; its fields are {sorted(fields)}")
    return dataclasses.replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


def _without_rotation(dataset: Dataset) -> None:
    """Drop the random rotation from a training split's augmentation (crop + flip remain)."""
    transform = getattr(dataset, "transform", None)
    if not isinstance(transform, v2.Compose):
        raise ValueError(f"cannot remove the rotation from a {type(dataset).__name__} whose transform is "
                         f"{type(transform).__name__}; expected a split from pruning_env.data.make_datasets")
    dataset.transform = v2.Compose([t for t in transform.transforms if not isinstance(t, v2.RandomRotation)])


def _build_model(model: str, num_classes: int, width: float, head: Optional[str]) -> nn.Module:
    """A zoo model with the recipe's head where the model offers the option (it is recorded in zoo_config)."""
    if head is None:
        return create_model(model, num_classes=num_classes, width=width)
    try:
        return create_model(model, num_classes=num_classes, width=width, head=head)
    except TypeError as err:
        if "head" not in str(err):
            raise
        print(f"note: {model} has no head option; it keeps its own classifier", file=sys.stderr)
        return create_model(model, num_classes=num_classes, width=width)


def pretrain(model: str = "vgg19", dataset: str = "cifar100", width: float = 1.0, epochs: Optional[int] = None,
             lr: Optional[float] = None, batch_size: Optional[int] = None, warmup_ratio: Optional[float] = None,
             min_lr: Optional[float] = None, weight_decay: Optional[float] = None,
             data_root: Union[str, Path] = "data", download: bool = False,
             val_size: Union[int, float, None] = None, device: Optional[str] = None, seed: int = 1,
             out: Optional[Union[str, Path]] = None, workers: int = 0, amp: Optional[bool] = None,
             resume: bool = False, progress: bool = True, recipe: str = "authors",
             rotation: Optional[bool] = None, head: Optional[str] = None) -> Path:
    """Train a zoo model from scratch and save the best-validation checkpoint.

    Hyper-parameters left at None come from ``recipe`` (:data:`RECIPES`); the checkpoint's ``meta["recipe"]``
    records the recipe's name and every value used.

    :param model: zoo name (see ``list_models()``).
    :param dataset: dataset name for :func:`pruning_env.data.make_datasets`.
    :param width: channel multiplier.
    :param epochs: training epochs (authors: 250).
    :param lr: peak learning rate.
    :param batch_size: images per step.
    :param warmup_ratio: fraction of the steps with linear warm-up.
    :param min_lr: final learning rate of the cosine.
    :param weight_decay: SGD weight decay.
    :param val_size: images held out from training for validation (count, fraction, or None for 10%); the
        checkpoint records the count (``meta["val_size"]``) with ``dataset`` and ``seed``, and ``PruneEnv``
        then measures its reward on exactly these held-out images.
    :param out: checkpoint path (default ``checkpoints/{model}[_wW]_{dataset}.pt``).
    :param amp: mixed precision; defaults to on for CUDA.
    :param resume: continue from ``{out}.state`` written after every epoch.
    :param recipe: ``authors`` (default) or ``small_data``.
    :param rotation: random rotation in the training augmentation (None: the recipe's choice).
    :param head: classifier head of models that offer one, e.g. VGG's ``mlp`` or ``linear`` (None: the recipe's).
    :return: the checkpoint path.
    """
    rc = get_recipe(recipe, epochs=epochs, lr=lr, batch_size=batch_size, warmup_ratio=warmup_ratio, min_lr=min_lr,
                    weight_decay=weight_decay, rotation=rotation, head=head)
    dev = resolve_device(device)
    amp = (dev.type == "cuda") if amp is None else amp
    seed_everything(seed)
    splits = make_datasets(dataset, root=data_root, download=download, val_size=val_size, seed=seed)
    if not rc.rotation:
        _without_rotation(splits.train)
    net = _build_model(model, splits.num_classes, width, rc.head).to(dev)
    out = Path(out) if out is not None else default_checkpoint_path(model, dataset, width)
    train_recipe(net, splits, rc, recipe, out, dev, seed, amp=amp, workers=workers, resume=resume, progress=progress,
                 meta={"dataset": dataset, "seed": seed}, summary={"model": model, "width": width, "dataset": dataset})
    return out


def train_recipe(net: nn.Module, splits, rc: Recipe, recipe: str, out: Path, dev: torch.device, seed: int,
                 amp: bool = False, workers: int = 0, resume: bool = False, progress: bool = True,
                 meta: Optional[Dict[str, object]] = None, summary: Optional[Dict[str, object]] = None
                 ) -> Dict[str, object]:
    """The training loop of a recipe, from ``net``'s current weights: SGD with warm-up and cosine over
    ``rc.epochs``, the best epoch by validation top-1 saved to ``out`` (a zoo model as config + weights, any other
    module whole), a resume file ``{out}.state`` after every epoch, and a ``.json`` summary next to ``out``.
    :func:`pretrain` runs it on a new zoo model; ``rl_prune.scratch`` on a re-initialised pruned architecture.

    :param net: the model, on ``dev``; trained in place (left at its best epoch).
    :param splits: the ``DatasetSplits`` (its augmentation as the recipe wants it).
    :param rc: the recipe's values.
    :param recipe: the recipe's name (recorded).
    :param out: checkpoint path.
    :param dev: training device.
    :param seed: seeds the loader's shuffling (the caller seeds the rest).
    :param amp: mixed precision (CUDA).
    :param workers: DataLoader workers.
    :param resume: continue from ``{out}.state`` when it exists.
    :param progress: a bar per epoch and a line per epoch.
    :param meta: facts saved in the checkpoint beside ``epoch``, ``val_top1``, ``val_size`` and ``recipe``.
    :param summary: facts put first in the ``.json`` summary.
    :return: the summary (also written to ``out.with_suffix(".json")``).
    """
    epochs, batch_size = rc.epochs, rc.batch_size
    recipe_meta = {"name": recipe, **dataclasses.asdict(rc)}
    state_path = out.with_name(out.name + ".state")
    loader = make_loader(splits.train, batch_size=batch_size, shuffle=True, seed=seed, num_workers=workers,
                         drop_last=len(splits.train) > batch_size, pin_memory=dev.type == "cuda")
    optimizer = make_sgd(net, rc.lr, weight_decay=rc.weight_decay)
    steps = epochs * len(loader)
    scheduler = warmup_cosine(optimizer, steps, int(round(steps * rc.warmup_ratio)), rc.min_lr)
    start, best_acc, best_state, log = 0, -1.0, None, []
    if resume and state_path.is_file():
        st = read_resume_state(state_path, dev)
        net.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        start, best_acc, best_state, log = st["epoch"], st["best_acc"], st["best_state"], st["log"]
        loader.generator.set_state(st["loader_rng"])
        set_rng_state(st["rng"])
        print(f"resumed from {state_path} at epoch {start}", file=sys.stderr)
    t0 = time.time()
    for epoch in range(start, epochs):
        stats = train_epoch(net, loader, optimizer, scheduler, dev, amp=amp,
                            progress=f"epoch {epoch + 1}/{epochs}" if progress else False)
        val = evaluate(net, splits.val, dev, batch_size=512)
        log.append({"epoch": epoch + 1, "train_loss": stats["loss"], "train_top1": stats["top1"],
                    "val_top1": val["top1"], "val_loss": val["loss"], "lr": optimizer.param_groups[0]["lr"],
                    "time_s": time.time() - t0})
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: train loss {stats['loss']:.3f} acc {stats['top1']:.3f} | "
                  f"val acc {val['top1']:.4f}", file=sys.stderr)
        if val["top1"] > best_acc:
            best_acc, best_state = val["top1"], copy.deepcopy(net.state_dict())
            # dataset, split seed and held-out count pin down the validation split: PruneEnv rebuilds exactly it
            save_checkpoint(net, out, **(meta or {}), epoch=epoch + 1, val_top1=best_acc,
                            val_size=len(splits.val), recipe=recipe_meta)
        save_parts(state_path, RESUME_KIND, RESUME_VERSION,
                   {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best_acc": best_acc,
                    "best_state": best_state, "log": log, "loader_rng": loader.generator.get_state(),
                    "rng": rng_state()},
                   info={**(summary or {}), "epoch": epoch + 1, "epochs": epochs})
    net.load_state_dict(best_state)
    test = evaluate(net, splits.test, dev, batch_size=512)
    summary = {**(summary or {}), "num_classes": splits.num_classes, "val_size": len(splits.val), "seed": seed,
               "best_val_top1": best_acc, "test_top1": test["top1"], "test_top5": test["top5"],
               "epochs": epochs, "recipe": recipe_meta, "train_time_s": time.time() - t0, "device": str(dev),
               "log": log}
    atomic_write_text(json.dumps(summary, indent=2), out.with_suffix(".json"))
    if state_path.is_file():
        state_path.unlink()
    if progress:
        print(f"saved {out} (best val top-1 {best_acc:.4f}, test top-1 {test['top1']:.4f})", file=sys.stderr)
    return summary


def ensure_pretrained(model: str, dataset: str, width: float = 1.0, epochs: int = 10,
                      out: Optional[Union[str, Path]] = None, **kwargs) -> Path:
    """The checkpoint path for (model, dataset, width), training it first only when the file is missing."""
    out = Path(out) if out is not None else default_checkpoint_path(model, dataset, width)
    if out.is_file():
        return out
    print(f"no pretrained checkpoint at {out}: training {model} (width {width}) on {dataset} for {epochs} "
          f"epochs first", file=sys.stderr)
    return pretrain(model=model, dataset=dataset, width=width, epochs=epochs, out=out, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pruning_env.pretrain", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="zoo model name, e.g. vgg19, resnet56")
    p.add_argument("--dataset", default="cifar100",
                   help="cifar10 | cifar100 | npz:PATH | imagefolder:PATH | digits | synthetic")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier")
    p.add_argument("--recipe", default="authors", choices=sorted(RECIPES),
                   help="named hyper-parameters (docs/training.md): authors (RL-Pruner's, for CIFAR-100) or "
                        "small_data (a few thousand images); the flags below override single values")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (authors 250, small_data 100)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (authors 0.1, small_data 0.05)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (authors 256, small_data 128)")
    p.add_argument("--warmup-ratio", type=float, default=None,
                   help="fraction of steps with linear warm-up (authors 0.1, small_data 0.3)")
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate (authors 1e-6, small_data 0)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (both recipes 5e-4)")
    p.add_argument("--rotation", action=argparse.BooleanOptionalAction, default=None,
                   help="random rotation up to 15 degrees on top of crop + flip (authors on, small_data off)")
    p.add_argument("--head", default=None, choices=["mlp", "linear"],
                   help="classifier head of models that offer one (VGG): the authors' 3-layer dropout mlp or one "
                        "linear layer (authors: the model's own, small_data linear)")
    p.add_argument("--data-root", default="data", help="folder holding torchvision's CIFAR files")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR (needs network)")
    p.add_argument("--val-size", type=float, default=None,
                   help="validation images held out from train (count, or fraction < 1; default 10%%)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--out", default=None, help="checkpoint path (default checkpoints/{model}[_wW]_{dataset}.pt)")
    p.add_argument("--resume", action="store_true", help="continue from {out}.state")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model not in list_models():
        print(f"error: unknown model {args.model!r}; choose from {', '.join(list_models())}", file=sys.stderr)
        return 2
    val_size = args.val_size
    if val_size is not None and val_size >= 1:
        val_size = int(val_size)
    try:
        pretrain(model=args.model, dataset=args.dataset, width=args.width, epochs=args.epochs, lr=args.lr,
                 batch_size=args.batch_size, warmup_ratio=args.warmup_ratio, min_lr=args.min_lr,
                 weight_decay=args.weight_decay, data_root=args.data_root, download=args.download,
                 val_size=val_size, device=args.device, seed=args.seed, out=args.out, workers=args.workers,
                 amp=False if args.no_amp else None, resume=args.resume, recipe=args.recipe,
                 rotation=args.rotation, head=args.head)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
