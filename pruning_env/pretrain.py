"""Base-model training: ``python -m pruning_env.pretrain --model vgg19 --dataset cifar100``.

The authors' recipe is the default (spec 5.1): SGD 0.1, momentum 0.9, wd 5e-4, 10% linear warm-up then
cosine to 1e-6, crop + flip + rotation; the best epoch by *validation* top-1 is kept (not test, spec §9.1).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from pruning_env.checkpoint import default_checkpoint_path, save_checkpoint
from pruning_env.runtime import atomic_save, atomic_write_text, resolve_device, rng_state, seed_everything, set_rng_state
from pruning_env.data import make_datasets, make_loader
from pruning_env.models import create_model, list_models
from pruning_env.training import evaluate, make_sgd, train_epoch, warmup_cosine


def pretrain(model: str = "vgg19", dataset: str = "cifar100", width: float = 1.0, epochs: int = 250,
             lr: float = 0.1, batch_size: int = 256, warmup_ratio: float = 0.1, min_lr: float = 1e-6,
             weight_decay: float = 5e-4, data_root: Union[str, Path] = "data", download: bool = False,
             val_size: Union[int, float, None] = None, device: Optional[str] = None, seed: int = 1,
             out: Optional[Union[str, Path]] = None, workers: int = 0, amp: Optional[bool] = None,
             resume: bool = False, progress: bool = True) -> Path:
    """Train a zoo model from scratch and save the best-validation checkpoint.

    :param model: zoo name (see ``list_models()``).
    :param dataset: dataset name for :func:`pruning_env.data.make_datasets`.
    :param width: channel multiplier.
    :param epochs: training epochs (authors: 250).
    :param val_size: images held out from training for validation (count, fraction, or None for 10%); the
        checkpoint records the count (``meta["val_size"]``) with ``dataset`` and ``seed``, and ``PruneEnv``
        then measures its reward on exactly these held-out images.
    :param out: checkpoint path (default ``checkpoints/{model}[_wW]_{dataset}.pt``).
    :param amp: mixed precision; defaults to on for CUDA.
    :param resume: continue from ``{out}.state`` written after every epoch.
    :return: the checkpoint path.
    """
    dev = resolve_device(device)
    amp = (dev.type == "cuda") if amp is None else amp
    seed_everything(seed)
    splits = make_datasets(dataset, root=data_root, download=download, val_size=val_size, seed=seed)
    net = create_model(model, num_classes=splits.num_classes, width=width).to(dev)
    out = Path(out) if out is not None else default_checkpoint_path(model, dataset, width)
    state_path = out.with_name(out.name + ".state")
    loader = make_loader(splits.train, batch_size=batch_size, shuffle=True, seed=seed, num_workers=workers,
                         drop_last=len(splits.train) > batch_size, pin_memory=dev.type == "cuda")
    optimizer = make_sgd(net, lr, weight_decay=weight_decay)
    steps = epochs * len(loader)
    scheduler = warmup_cosine(optimizer, steps, int(round(steps * warmup_ratio)), min_lr)
    start, best_acc, best_state, log = 0, -1.0, None, []
    if resume and state_path.is_file():
        st = torch.load(state_path, map_location=dev, weights_only=False)
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
            save_checkpoint(net, out, dataset=dataset, epoch=epoch + 1, val_top1=best_acc, seed=seed,
                            val_size=len(splits.val), recipe={"lr": lr, "epochs": epochs, "batch_size": batch_size,
                                                              "warmup_ratio": warmup_ratio})
        atomic_save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best_acc": best_acc,
                     "best_state": best_state, "log": log, "loader_rng": loader.generator.get_state(),
                     "rng": rng_state()}, state_path)
    net.load_state_dict(best_state)
    test = evaluate(net, splits.test, dev, batch_size=512)
    summary = {"model": model, "width": width, "dataset": dataset, "num_classes": splits.num_classes,
               "val_size": len(splits.val), "seed": seed,
               "best_val_top1": best_acc, "test_top1": test["top1"], "test_top5": test["top5"],
               "epochs": epochs, "train_time_s": time.time() - t0, "device": str(dev), "log": log}
    atomic_write_text(json.dumps(summary, indent=2), out.with_suffix(".json"))
    if state_path.is_file():
        state_path.unlink()
    if progress:
        print(f"saved {out} (best val top-1 {best_acc:.4f}, test top-1 {test['top1']:.4f})", file=sys.stderr)
    return out


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
    p.add_argument("--epochs", type=int, default=250)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps with linear warm-up")
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--weight-decay", type=float, default=5e-4)
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
                 amp=False if args.no_amp else None, resume=args.resume)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
