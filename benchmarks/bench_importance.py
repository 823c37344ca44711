"""Agreement of our group-wide Taylor score with the RL-Pruner authors' filter-only one (spec §4.3) on a
conv-BN-conv net, at random init and after a short training run on real CIFAR-10 images.

    python benchmarks/bench_importance.py          # ../shared/data/cifar10_5k.npz, CPU, 1 thread, ~1 min
Writes benchmarks/results/bench_importance.md|json: per layer, the overlap of the two bottom halves (the channels
a 50 % step would remove) and Spearman's rank correlation, over several calibration batches of 100 images.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: benchmarks.common is imported from the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.common import spearman  # noqa: E402
from pruning_env.pruning import Pruner  # noqa: E402
from pruning_env.runtime import atomic_write_text, machine_info, seed_everything  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10_5k.npz"),
                   help="npz with x (N,32,32,3 uint8) and y; random images if the file is missing")
    p.add_argument("--width", type=int, default=16, help="channels of the two convs")
    p.add_argument("--epochs", type=int, default=3, help="training epochs before the trained measurement")
    p.add_argument("--batches", type=int, default=10, help="calibration batches (one measurement each)")
    p.add_argument("--calibration", type=int, default=100, help="images per calibration batch (authors: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p


def conv_bn_conv(width: int) -> nn.Module:
    """conv -> BN -> ReLU -> pool -> conv -> BN -> ReLU -> global pool -> linear (10 classes)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def load_images(path: str, seed: int) -> tuple:
    """(x, y) normalised CIFAR-10 images from the npz, or 2,000 random images with random labels."""
    if Path(path).is_file():
        data = np.load(path)
        x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float().div(255)
        return (x - 0.5) / 0.25, torch.from_numpy(data["y"]).long()
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2000, 3, 32, 32, generator=g), torch.randint(0, 10, (2000,), generator=g)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> float:
    """A few epochs of SGD; returns the training accuracy of the last epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    correct = 0
    for _ in tqdm(range(epochs), desc="train", leave=False):
        correct = 0
        for idx in torch.randperm(len(x), generator=g).split(64):
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == y[idx]).sum())
    model.eval()
    return correct / len(x)


def agreement(model: nn.Module, batches: List[tuple]) -> List[Dict[str, Any]]:
    """Per group: bottom-half overlap and rank correlation of ``taylor`` vs ``taylor_filter``, per batch."""
    pruner = Pruner(model, batches[0][0][:1])
    rows: List[Dict[str, Any]] = [{"group": g.name, "channels": g.num_channels, "overlap": [], "spearman": []}
                                  for g in pruner.groups]
    for batch in batches:
        ours = pruner.compute_importance(batch, criterion="taylor")
        theirs = pruner.compute_importance(batch, criterion="taylor_filter")
        for row, a, b in zip(rows, ours, theirs):
            half = len(a) // 2
            low_a = set(np.argsort(a, kind="stable")[:half].tolist())
            low_b = set(np.argsort(b, kind="stable")[:half].tolist())
            row["overlap"].append(len(low_a & low_b))
            row["spearman"].append(spearman(a, b))
    return rows


def to_markdown(results: Dict[str, Any]) -> str:
    lines = ["# Our Taylor score vs the authors' filter-only Taylor score", "",
             f"conv({results['width']})-BN-conv({results['width']})-BN net, {results['batches']} calibration "
             f"batches of {results['calibration']} images ({results['data']}), eval-mode gradients. `taylor` sums "
             "|w dL/dw| over the filter, its bias, the BatchNorm γ/β and the consumer's input columns; "
             "`taylor_filter` (the authors') uses the filter weights only. Overlap: channels both put in the "
             "bottom half (what a 50 % step removes), as mean (min-max) over the batches.", "",
             "| model state | conv (Sequential index) | bottom-half overlap | Spearman ρ (mean) |", "|---|---|---|---:|"]
    for state in ("random init", "trained"):
        for row in results[state]:
            half = row["channels"] // 2
            ov = row["overlap"]
            lines.append(f"| {state} | {row['group']} | {np.mean(ov):.1f}/{half} ({min(ov)}-{max(ov)}) | "
                         f"{np.mean(row['spearman']):.2f} |")
    lines += ["", f"Training accuracy after {results['epochs']} epochs: {results['train_accuracy']:.3f}.",
              f"Command: `{results['command']}`", f"Machine: {results['machine']}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    x, y = load_images(args.data, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    calib = [(x[i], y[i]) for i in torch.randperm(len(x), generator=g)[:args.batches * args.calibration]
             .split(args.calibration)]
    model = conv_bn_conv(args.width)
    results: Dict[str, Any] = {"width": args.width, "batches": args.batches, "calibration": args.calibration,
                               "epochs": args.epochs, "data": Path(args.data).name if Path(args.data).is_file()
                               else "random images",
                               "command": "python benchmarks/bench_importance.py " + " ".join(
                                   argv if argv is not None else sys.argv[1:]),
                               "machine": machine_info(args.threads)}
    results["random init"] = agreement(model.eval(), calib)
    results["train_accuracy"] = train(model, x, y, args.epochs, args.seed)
    results["trained"] = agreement(model, calib)
    out = Path(args.out)
    atomic_write_text(json.dumps(results, indent=2, default=str), out / "bench_importance.json")
    md = to_markdown(results)
    atomic_write_text(md, out / "bench_importance.md")
    print(md)
    return results


if __name__ == "__main__":
    main()
