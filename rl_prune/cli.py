"""The three command lines (``train_agent.py`` / ``rl-prune-train``, ``evaluate.py`` / ``rl-prune-evaluate``,
``train_vit_agent.py`` / ``rl-prune-vit``): argument parsing, and one-line errors with exit code 2 instead of tracebacks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from agents.registry import AGENTS
from rl_prune.config import CONFIG_DIR, VIT_POLICIES, ConfigError, ViTRunConfig, load_config, parse_overrides

#: the offline quickstart a bare ``train_agent.py`` runs
DEFAULT_CONFIG = CONFIG_DIR / "quickstart.yaml"

TRAIN_DESCRIPTION = """\
Prune a pretrained CNN with an agent on PruneEnv, fine-tune the result with knowledge distillation and write a run
folder: python train_agent.py --config configs/X.yaml [--agent NAME] [--resume | --overwrite] [key=value ...]

With no arguments it runs the offline quickstart (configs/quickstart.yaml): a few minutes on 2 CPU cores.
Run folder runs/{name}/: pruned_model.pt (torch.save of the module), pruned_model.ts (TorchScript, needs only
torch), original_model.pt, metrics.json, steps.csv, tb/, checkpoint.pt, distribution.png, config.yaml, and
run.lock while the run writes it. A name in use gets the next free folder (runs/{name}_2, ...): no run is
overwritten unless --overwrite says so.
"""

EVALUATE_DESCRIPTION = """\
Compare an original and a pruned model: test accuracy, MACs and params, file size, measured latency and
throughput (CPU, and CUDA when available), with optional TorchScript / ONNX export checked against the module.

    python evaluate.py runs/quickstart                       # a run folder written by train_agent.py
    python evaluate.py runs/quickstart --export torchscript onnx --max-test 1000
    python evaluate.py --original A.pt --pruned B.pt --dataset cifar100 --data-root data
    python evaluate.py runs/NAME --latency-model build       # predicted beside measured latency for any run

Writes evaluation.md and evaluation.json into the run folder (or --out) and prints the markdown table.
"""

VIT_DESCRIPTION = """\
Train a ViT jointly with an AgentViT patch-selection agent (spec 2.6), or as a baseline with all patches or random
masks, then report test accuracy (all / agent / random patches), training time, GFLOPs and images/s.

    python train_vit_agent.py                                   # offline quickstart (digits, tiny ViT)
    python train_vit_agent.py --config configs/agentvit/cifar10_faithful.yaml device=cuda
    python train_vit_agent.py policy=full env.dataset=npz:../shared/data/cifar10_5k.npz env.epochs=5

Settings are the config's keys (docs/agentvit.md), set as key=value; the flags are shorthands for them.
"""

#: train_vit_agent.py flags and the config key each one sets
VIT_FLAGS = {"policy": "policy", "dataset": "env.dataset", "data_root": "env.data_root", "epochs": "env.epochs",
             "batch_size": "env.batch_size", "width": "env.width", "depth": "env.depth", "n_keep": "env.n_keep",
             "reward_every": "env.reward_every", "seed": "seed", "device": "device", "out": "out"}


def _overrides_argument(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"config overrides, dotted for nested keys: {example}")


# ------------------------------------------------------------------------------------------------------ train

def train_parser() -> argparse.ArgumentParser:
    """The ``train_agent.py`` arguments."""
    p = argparse.ArgumentParser(description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: the offline quickstart)")
    p.add_argument("--agent", default=None, choices=sorted(AGENTS), help="agent to run (default: the config's)")
    p.add_argument("--name", default=None, help="run folder name under run.out_dir (default: config name[_agent]); "
                                                "a name in use gets the next number: NAME_2, NAME_3, ...")
    reuse = p.add_mutually_exclusive_group()
    reuse.add_argument("--resume", action="store_true",
                       help="continue a killed run from its checkpoint.pt: runs/NAME with --name, else the latest run "
                            "of the config's name (runs/NAME or its highest NAME_k)")
    reuse.add_argument("--overwrite", action="store_true",
                       help="replace what runs/NAME holds (a finished or killed run) instead of writing NAME_2")
    _overrides_argument(p, "env.target=0.3 agents.rl_pruner.lr_epoch=2")
    return p


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``train_agent.py``: load the config, run the pipeline, print the summary; a bad setting exits 2.

    :param argv: the arguments (default ``sys.argv[1:]``).
    """
    # intermixed: overrides may come before and after the options (``a=1 --resume b=2``)
    args = train_parser().parse_intermixed_args(argv)
    from rl_prune.pipeline import run  # torch and the agents load only once the arguments parse
    try:
        overrides = parse_overrides(args.overrides)
        if args.agent is not None:
            overrides["agent"] = args.agent
        cfg = load_config(args.config, overrides)
        cfg.name = args.name or (cfg.name if args.agent is None else f"{cfg.name}_{args.agent}")
        folder, lock = choose_run_folder(Path(cfg.run.out_dir), cfg.name, args.resume, args.overwrite,
                                         exact=args.name is not None)
        cfg.name = folder.name
        try:
            metrics = run(cfg, cfg.agent, folder.path, resume=args.resume, overwrite=args.overwrite)
        finally:
            if lock is not None:
                lock.release()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n" + summary_text(metrics, folder.path))
    return 0


def choose_run_folder(out_dir: Path, name: str, resume: bool, overwrite: bool,
                      exact: bool = False) -> Tuple[Any, Any]:
    """The folder a ``train_agent.py`` run writes, and its lock when claimed here (None: ``run`` takes it).

    ``--overwrite``: ``out_dir/name``; ``--resume``: ``out_dir/name`` when the name was given (``--name``), else
    the latest folder of the config's name (``name`` or its highest ``name_k``); otherwise a new, empty folder,
    numbered when ``name`` is in use, so no earlier run is touched.

    :param out_dir: ``run.out_dir``.
    :param name: the run name.
    :param resume: the ``--resume`` flag.
    :param overwrite: the ``--overwrite`` flag.
    :param exact: the name was given explicitly (``--name``).
    """
    from rl_prune.run_folder import RunFolder, claim_new_run_folder, latest_run_folder

    if overwrite or (resume and exact):
        return RunFolder(out_dir / name), None
    if resume:
        return latest_run_folder(out_dir, name) or RunFolder(out_dir / name), None
    folder, lock = claim_new_run_folder(out_dir, name)
    if folder.name != name:
        print(f"note: {out_dir / name} holds an earlier run ({RunFolder(out_dir / name).status}); this run writes "
              f"{folder.path} (--resume continues the latest run of the name, --overwrite replaces "
              f"{out_dir / name})", file=sys.stderr)
    return folder, lock


def summary_text(metrics: Dict[str, Any], run_dir: Path) -> str:
    """The end-of-run summary: costs, then each accuracy of the story named (the original, the pruned model as
    cut, after BatchNorm re-estimation when the reward used it, after the fine-tune) with what the search scored,
    then the run folder.

    :param metrics: the run's ``metrics.json``.
    :param run_dir: its folder.
    """
    estimator = metrics.get("reward_estimator") or "vanilla"
    scored = f"the search scored {metrics['reward_accuracy']:.4f} on its validation reward images"
    ft = metrics.get("finetune") or {}
    ft_cfg = ft.get("config") or {}
    epochs = ft_cfg.get("epochs")
    kind = "KD fine-tune" if ft_cfg.get("teacher", "original") == "original" else "fine-tune"
    rows = [("original model", metrics["original"], None),
            ("pruned, as cut", metrics["pruned_before_finetune"],
             "BatchNorm statistics still the unpruned model's, no training"
             + (f"; {scored} (vanilla reward)" if estimator == "vanilla" else ""))]
    if metrics.get("pruned_bn_reestimated") is not None:
        rows.append(("pruned, BatchNorm re-estimated", metrics["pruned_bn_reestimated"],
                     f"what the adaptive_bn reward measures: {scored}"))
    elif estimator != "vanilla":
        rows[-1] = rows[-1][:2] + (rows[-1][2] + f"; {scored} ({estimator} reward)",)
    rows.append((f"pruned, after the {kind} ({epochs} epoch{'s' if epochs != 1 else ''})" if epochs else "pruned, no fine-tune (epochs 0)",
                 metrics["pruned"], None))
    lines = [f"{metrics['agent']} on {metrics['dataset']}: FLOPs -{metrics['flops_reduction']:.1%}, params "
             f"-{metrics['params_reduction']:.1%}, {metrics['n_evaluations']} evaluations, "
             f"{metrics['seconds']['total']:.0f} s",
             f"{'top-1 accuracy of the':<46}{'test':>8}{'val':>8}"]
    for label, report, note in rows:
        lines.append(f"  {label:<44}{report['test_top1']:>8.4f}{report['val_top1']:>8.4f}")
        if note:
            lines.append(f"    ({note})")
    budget = metrics.get("budget")
    lines.append(f"evaluations used {metrics['n_evaluations']} of budget "
                 f"{budget if budget is not None else 'none (no cap)'}")
    if metrics.get("budget_schedule"):
        lines.append(f"  (schedule: {metrics['budget_schedule']})")
    lines.append(f"run folder: {run_dir}  (evaluate with: python evaluate.py {run_dir})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- evaluate

def evaluate_parser() -> argparse.ArgumentParser:
    """The ``evaluate.py`` arguments (the fields of :class:`rl_prune.evaluation.EvaluationOptions`)."""
    from pruning_env.export import EXPORT_HINT
    from rl_prune.evaluation import EXPORT_FORMATS

    p = argparse.ArgumentParser(description=EVALUATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="run folder written by train_agent.py (runs/NAME)")
    p.add_argument("--original", help="original model file (default RUN_DIR/original_model.pt); zoo checkpoints, "
                                      "pickled modules and TorchScript files are accepted")
    p.add_argument("--pruned", help="pruned model file (default RUN_DIR/pruned_model.pt)")
    p.add_argument("--dataset", help="dataset (default: the run's): cifar10, cifar100, npz:PATH, imagefolder:PATH, "
                                     "digits, synthetic")
    p.add_argument("--data-root", dest="data_root", help="folder with the CIFAR files (default: the run's, or data)")
    p.add_argument("--val-size", dest="val_size", type=int, help="validation images held out (default: the run's)")
    p.add_argument("--split-seed", dest="split_seed", type=int, help="seed of the data split (default: the run's)")
    p.add_argument("--max-test", dest="max_test", type=int, help="evaluate a seeded subset of N test images")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="accuracy device; timings on CPU and CUDA (auto, when available), or only this one")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=256,
                   help="batch size for accuracy and throughput (default 256)")
    p.add_argument("--repeats", type=int, default=30,
                   help="interleaved timing rounds (original and pruned, a block of >= 20 ms of passes each) per "
                        "measurement; median and p90 over them (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed passes of each model before each measurement "
                                                         "(default 5)")
    p.add_argument("--threads", type=int, help="torch CPU threads for the measurements (default: torch's)")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip latency / throughput")
    p.add_argument("--latency-model", dest="latency_model", default="auto", choices=("auto", "build", "off"),
                   help="predicted beside measured latency in the run's latency setting (threads, batch, dtype, "
                        "channels_last, from metrics.json): auto when the run's env built a latency model, build "
                        "also for other runs (measures the table first), off (default auto)")
    p.add_argument("--latency-rounds", dest="latency_rounds", type=int, default=10,
                   help="interleaved timing rounds in the run's latency setting (default 10)")
    p.add_argument("--export", nargs="+", choices=EXPORT_FORMATS, default=[],
                   help=f"also export the pruned model and check its outputs (ONNX needs {EXPORT_HINT})")
    p.add_argument("--seed", type=int, help="seed of the test subset and timing inputs (default: the run's, or 0)")
    p.add_argument("--out", help="folder for evaluation.md/json and exports (default: RUN_DIR, or the pruned "
                                 "model's folder)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return p


def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    """``evaluate.py``: user errors exit with a one-line message naming the bad input and the fix.

    :param argv: the arguments (default ``sys.argv[1:]``).
    """
    args = evaluate_parser().parse_args(argv)
    from rl_prune.evaluation import EvaluationError, EvaluationOptions, evaluate_models, format_markdown
    try:
        result = evaluate_models(EvaluationOptions(**vars(args)))
    except EvaluationError as err:
        raise SystemExit(f"error: {err}") from None
    out = Path(result["out_dir"])
    print(format_markdown(result))
    print(f"wrote {out / 'evaluation.md'} and {out / 'evaluation.json'}")
    return 0


# -------------------------------------------------------------------------------------------------------- ViT

def vit_parser() -> argparse.ArgumentParser:
    """The ``train_vit_agent.py`` arguments: ``--config``, ``key=value`` overrides and their flag shorthands."""
    p = argparse.ArgumentParser(description=VIT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (configs/agentvit/*.yaml; default: the offline quickstart)")
    p.add_argument("--policy", choices=VIT_POLICIES, help="patch policy: agent mode or baseline [policy]")
    p.add_argument("--dataset", help="cifar10, npz:PATH, digits (offline), synthetic [env.dataset]")
    p.add_argument("--data-root", help="folder with torchvision's CIFAR files [env.data_root]")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 [env.download]")
    p.add_argument("--epochs", type=int, help="training epochs [env.epochs]")
    p.add_argument("--batch-size", type=int, help="ViT training batch [env.batch_size]")
    p.add_argument("--width", type=float, help="ViT width multiplier [env.width]")
    p.add_argument("--depth", type=int, help="ViT depth [env.depth]")
    p.add_argument("--n-keep", type=int, help="target kept patches k* [env.n_keep]")
    p.add_argument("--reward-every", type=int, help="reward / agent-update period in batches [env.reward_every]")
    p.add_argument("--seed", type=int, help="[seed]")
    p.add_argument("--device", help="auto, cpu or cuda [device]")
    p.add_argument("--out", help="output folder (results.json, summary.md, vit.pt, agent.pt) [out]")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars [progress=false]")
    _overrides_argument(p, "env.epochs=5 agent.exploration_decay=100 eval.throughput=false")
    return p


def vit_main(argv: Optional[Sequence[str]] = None) -> int:
    """``train_vit_agent.py``: load the config, train, print the summary; a bad setting exits 2.

    :param argv: the arguments (default ``sys.argv[1:]``).
    """
    args = vit_parser().parse_intermixed_args(argv)
    from rl_prune.vit_run import run_training, summary_markdown
    try:
        overrides: Dict[str, Any] = parse_overrides(args.overrides)
        overrides.update({key: getattr(args, flag) for flag, key in VIT_FLAGS.items()
                          if getattr(args, flag) is not None})
        if args.download:
            overrides["env.download"] = True
        if args.no_progress:
            overrides["progress"] = False
        cfg = load_config(args.config, overrides, schema=ViTRunConfig, data=None if args.config else {})
        results = run_training(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(summary_markdown(results))
    return 0


__all__ = ["train_main", "evaluate_main", "vit_main", "train_parser", "evaluate_parser", "vit_parser",
           "choose_run_folder", "summary_text", "DEFAULT_CONFIG", "VIT_FLAGS"]
