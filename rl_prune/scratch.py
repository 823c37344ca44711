"""Scratch-E (Liu et al. 2019, "Rethinking the Value of Network Pruning"): the architecture a pruning run found,
freshly initialised and trained from scratch, to tell whether an allocation is a better architecture or only a
better starting point.

* :func:`scratch_model` / :func:`scratch_from_widths`: the same architecture (layer shapes, MACs, params) as a pruned
  model, or as a model cut to given per-group widths, every parameter re-drawn with its layer's own initialiser
  (seeded; BatchNorm statistics reset).
* :func:`scratch_epochs`: the epoch rule, pretraining epochs (the base checkpoint's recipe) plus the run's
  fine-tune epochs: the total training the pruned model received.
* :func:`train_scratch` and ``python -m rl_prune.scratch RUN_DIR``: a run folder's pruned architecture trained with
  the base model's pretraining recipe (:func:`pruning_env.pretrain.train_recipe`, the one training loop) for that
  many epochs, on the run's data split; resumable per epoch, a finished unit is not retrained.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from pruning_env.runtime import TorchRNG, model_device

#: parameters of these modules are re-drawn by their ``_reset_parameters`` (``nn.MultiheadAttention`` and its
#: head-pruned subclasses); every other module with parameters of its own needs ``reset_parameters``
_RESET_METHODS = ("reset_parameters", "_reset_parameters")


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter of ``model`` in place with its layer's own initialiser (``reset_parameters``, in
    module order, on a private RNG stream seeded with ``seed``); BatchNorm running statistics are reset too.

    :param model: the model (changed in place and returned).
    :param seed: the initialisation's seed.
    :raises ValueError: a module holds parameters but has no initialiser, naming it (nothing is changed then).
    """
    owners = []
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            if isinstance(module, nn.modules.batchnorm._NormBase):
                owners.append(module)  # affine=False: its running statistics still reset
            continue
        reset = next((getattr(module, m) for m in _RESET_METHODS if callable(getattr(module, m, None))), None)
        if reset is None:
            raise ValueError(f"cannot re-initialise {name or 'the model'} ({type(module).__name__}): it holds "
                             f"parameters but has no reset_parameters(); Scratch-E needs every layer's initialiser")
        owners.append(module)
    with TorchRNG(seed, model_device(model)):
        for module in owners:
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.reset_parameters() if module.affine else module.reset_running_stats()
            else:
                next(getattr(module, m) for m in _RESET_METHODS if callable(getattr(module, m, None)))()
    return model


def scratch_model(pruned: nn.Module, seed: int) -> nn.Module:
    """The architecture of ``pruned``, freshly initialised: a copy with the same layer shapes (so the same MACs and
    params), every weight re-drawn (:func:`reinitialize`); ``pruned`` is left unchanged.

    :param pruned: a pruned model (``Pruner.apply``'s output, a run's ``pruned_model.pt``) or any model.
    :param seed: the initialisation's seed.
    """
    model = copy.deepcopy(pruned)
    reinitialize(model, seed)
    model.scratch_of = {"seed": int(seed), "pruned_from": getattr(pruned, "pruned_from", None)}
    return model.train()


def scratch_from_widths(model: nn.Module, keep: Sequence[int], example_input: torch.Tensor, seed: int,
                        ignore: Sequence[str] = ()) -> nn.Module:
    """``model`` cut to ``keep`` channels per prunable group (the engine's groups of ``model``, as a ``PruneEnv``
    with the same ``ignore_layers`` sees them) and freshly initialised: the architecture of an allocation, without
    its pruned weights. Which channels are cut does not matter (all are re-drawn): the first ``keep[g]`` are kept.

    :param model: the unpruned model (left unchanged).
    :param keep: kept channels per group, e.g. a run's ``kept_channels``.
    :param example_input: an input batch for tracing the groups, e.g. ``torch.zeros(1, 3, 32, 32)``.
    :param seed: the initialisation's seed.
    :param ignore: layer names the env ignores (``ignore_layers``).
    :raises ValueError: ``keep`` does not give a whole, buildable count for every group.
    """
    from pruning_env.pruning import Pruner, PrunePlan

    pruner = Pruner(copy.deepcopy(model).eval(), example_input, ignore=tuple(ignore))
    k = np.asarray(keep)
    widths, gran = pruner.num_channels, pruner.granularity
    if k.shape != (pruner.n_groups,) or np.any(k != np.round(k)) or np.any(k < 1) or np.any(k > widths) \
            or np.any(k.astype(np.int64) % gran):
        raise ValueError(f"keep must give 1..width channels (whole blocks of the granularity {gran.tolist()}) for "
                         f"each of the {pruner.n_groups} groups (widths {widths.tolist()}), got {list(keep)}")
    plan = PrunePlan(tuple(np.arange(int(n), dtype=np.int64) for n in k))
    return scratch_model(pruner.apply(plan), seed)


def scratch_epochs(pretrain_epochs: int, finetune_epochs: int) -> int:
    """The Scratch-E epoch rule of this project: as many epochs as the pruned model was trained in total, its base
    model's pretraining plus the run's fine-tune (Liu et al.'s Scratch-E counts the pretraining epochs only).

    :param pretrain_epochs: epochs of the base model's recipe (``read_meta(checkpoint)["recipe"]["epochs"]``).
    :param finetune_epochs: the run's ``finetune.epochs``.
    """
    for name, v in (("pretrain_epochs", pretrain_epochs), ("finetune_epochs", finetune_epochs)):
        if isinstance(v, bool) or int(v) != v or v < 0:
            raise ValueError(f"{name} must be a whole number >= 0, got {v!r}")
    total = int(pretrain_epochs) + int(finetune_epochs)
    if total < 1:
        raise ValueError("pretraining plus fine-tune give 0 epochs: nothing to train from scratch")
    return total


# ------------------------------------------------------------------------------------------------ a run's unit

def run_setting(run_dir: Union[str, Path]) -> Dict[str, Any]:
    """What training a run's architecture from scratch needs: the pruned model, the data split, the base checkpoint
    with its recipe and the epochs (:func:`scratch_epochs`).

    :param run_dir: a finished ``train_agent.py`` run folder.
    :raises FileNotFoundError: the run did not finish, or its base checkpoint is missing.
    :raises ValueError: the base checkpoint records no pretraining recipe.
    """
    from pruning_env.checkpoint import load_model, read_meta
    from pruning_env.envs.config import PruneEnvConfig
    from pruning_env.envs.task import checkpoint_path
    from pruning_env.schema import merged
    from rl_prune.config import load_config
    from rl_prune.run_folder import RunFolder

    folder = RunFolder(run_dir)
    metrics = folder.read_metrics()  # FileNotFoundError names the file when the run did not finish
    cfg = load_config(folder.file(RunFolder.CONFIG))
    base = checkpoint_path(merged(PruneEnvConfig, None, cfg.env_kwargs(metrics["agent"])))
    if base is None or not base.is_file():
        raise FileNotFoundError(f"{run_dir}: the base model's checkpoint {base} is not there; its recipe gives the "
                                f"pretraining epochs and hyper-parameters")
    recipe = read_meta(base).get("recipe")
    if not recipe:
        raise ValueError(f"{base} records no pretraining recipe (meta['recipe']); retrain it with "
                         f"python -m pruning_env.pretrain, or pass the epochs and recipe yourself")
    data = folder.data_settings()
    return {"folder": folder, "metrics": metrics, "pruned": load_model(folder.file(RunFolder.PRUNED_MODEL)),
            "base": base, "recipe": dict(recipe), "finetune_epochs": int(cfg.finetune.epochs), "data": data,
            "epochs": scratch_epochs(int(recipe["epochs"]), int(cfg.finetune.epochs))}


def train_scratch(run_dir: Union[str, Path], seed: int = 0, epochs: Optional[int] = None,
                  out: Union[str, Path, None] = None, device: Optional[str] = None, progress: bool = True,
                  overwrite: bool = False) -> Dict[str, Any]:
    """Scratch-E of one run and seed: its pruned architecture (:func:`scratch_model`) trained with the base model's
    pretraining recipe for :func:`scratch_epochs` epochs on the run's split (the one training loop,
    :func:`pruning_env.pretrain.train_recipe`); the checkpoint (best validation epoch) and a ``.json`` summary go
    to ``out``. A finished unit (its summary there) is returned as it is; a killed one resumes from its last epoch.

    :param run_dir: a finished run folder.
    :param seed: initialisation and training seed (the split is the run's).
    :param epochs: override the epoch rule (e.g. a short check); None: :func:`scratch_epochs`.
    :param out: checkpoint path (default ``RUN_DIR/scratch_e_seed{seed}.pt``).
    :param device: training device (default: CUDA when available).
    :param progress: a bar and a line per epoch.
    :param overwrite: retrain a finished unit.
    :return: the summary: the recipe's, with ``scratch`` (run, seed, epochs and rule, kept channels, MACs and params
        checked equal to the pruned model's, and the run's fine-tuned test top-1 beside it).
    """
    from pruning_env.costs import count_costs
    from pruning_env.data import make_datasets
    from pruning_env.pretrain import _without_rotation, get_recipe, train_recipe
    from pruning_env.runtime import resolve_device, seed_everything

    setting = run_setting(run_dir)
    folder, metrics, recipe = setting["folder"], setting["metrics"], setting["recipe"]
    out = Path(out) if out is not None else folder.file(f"scratch_e_seed{int(seed)}.pt")
    summary_path = out.with_suffix(".json")  # train_recipe writes it when the unit finishes
    if summary_path.is_file() and out.is_file() and not overwrite:
        done = json.loads(summary_path.read_text())
        if progress:
            print(f"{out}: already trained (test top-1 {done['test_top1']:.4f}); --overwrite retrains it",
                  file=sys.stderr)
        return done
    rule = setting["epochs"]
    n_epochs = rule if epochs is None else int(epochs)
    fields = {f.name for f in dataclasses.fields(get_recipe(recipe["name"]))}
    rc = get_recipe(recipe["name"], **{k: v for k, v in recipe.items() if k in fields})
    rc = dataclasses.replace(rc, epochs=n_epochs)
    dev = resolve_device(device)
    data = setting["data"]
    split_seed = int(data.get("split_seed", data.get("seed", 0)))
    seed_everything(int(seed))
    splits = make_datasets(data["dataset"], root=data.get("data_root", "data"), val_size=data.get("val_size"),
                           seed=split_seed)
    if not rc.rotation:
        _without_rotation(splits.train)
    net = scratch_model(setting["pruned"], int(seed)).to(dev)
    input_size = tuple(data.get("input_size") or splits.input_size)
    macs = count_costs(net, input_size, device=dev)
    pruned_macs = count_costs(setting["pruned"].to(dev), input_size, device=dev)
    if (macs.macs, macs.params) != (pruned_macs.macs, pruned_macs.params):
        raise RuntimeError(f"the scratch model costs {macs} but the pruned model {pruned_macs}: not the same "
                           f"architecture")
    scratch = {"run": str(folder.path), "agent": metrics["agent"], "seed": int(seed), "epochs": n_epochs,
               "epoch_rule": f"pretraining {recipe['epochs']} ({setting['base']}) + fine-tune "
                             f"{setting['finetune_epochs']} = {rule}" + ("" if epochs is None else
                                                                        f"; overridden: {n_epochs}"),
               "kept_channels": metrics["kept_channels"], "macs": int(macs.macs), "params": int(macs.params),
               "flops_reduction": metrics["flops_reduction"], "run_finetune_epochs": int(setting["finetune_epochs"]),
               "pruned_finetuned_test_top1": metrics["pruned"]["test_top1"]}
    summary = train_recipe(net, splits, rc, recipe["name"], out, dev, int(seed), amp=dev.type == "cuda",
                           resume=not overwrite, progress=progress,
                           meta={"dataset": data["dataset"], "seed": split_seed,
                                 "scratch": scratch},
                           summary={"model": "scratch_e", "dataset": data["dataset"], "scratch": scratch})
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m rl_prune.scratch RUN_DIR [--seed N] [--epochs N] [--out PATH] [--device D]``."""
    p = argparse.ArgumentParser(prog="python -m rl_prune.scratch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished train_agent.py run folder (runs/NAME)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and training seed (the split is the run's)")
    p.add_argument("--epochs", type=int, default=None,
                   help="override the rule: pretraining epochs of the base recipe + the run's fine-tune epochs")
    p.add_argument("--out", default=None, help="checkpoint path (default RUN_DIR/scratch_e_seed{SEED}.pt)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="retrain a finished unit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    try:
        s = train_scratch(args.run_dir, seed=args.seed, epochs=args.epochs, out=args.out, device=args.device,
                          progress=not args.no_progress, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sc = s["scratch"]
    # a run without a fine-tune (a comparison's search unit) reports the model as cut: say which it is
    which = "as cut (the run had no fine-tune)" if sc.get("run_finetune_epochs") == 0 else "after its fine-tune"
    print(f"Scratch-E of {sc['run']} ({sc['agent']}), seed {sc['seed']}, {sc['epochs']} epochs "
          f"({sc['epoch_rule']}): test top-1 {s['test_top1']:.4f} (val {s['best_val_top1']:.4f}); the pruned model "
          f"{which}: {sc['pruned_finetuned_test_top1']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["reinitialize", "scratch_model", "scratch_from_widths", "scratch_epochs", "run_setting", "train_scratch",
           "main"]
