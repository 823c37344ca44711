"""Compare an original and a pruned model (``evaluate.py``'s logic): test accuracy, MACs and params, file size,
measured latency and throughput (CPU, and CUDA when available), optional exports checked against the module.

:func:`evaluate_models` takes :class:`EvaluationOptions` and writes evaluation.md / evaluation.json.
"""
from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pruning_env.checkpoint import load_model
from pruning_env.costs import count_costs
from pruning_env.costs.latency import LatencySetting, measure_latency_rounds
from pruning_env.data import DatasetSplits, make_datasets, preload
from pruning_env.export import export_onnx, export_torchscript, max_abs_diff, quiet_jit
from pruning_env.runtime import atomic_write_text, machine_info, resolve_device, seed_everything
from pruning_env.training import evaluate, model_logits
from rl_prune.run_folder import RunFolder, describe_owner

FORMAT = "rl-prune-evaluation/1"
EXPORT_FORMATS = ("torchscript", "onnx")
TRAIN_HINT = ("python train_agent.py  (offline quickstart, writes runs/quickstart) or "
              "python train_agent.py --config configs/X.yaml --name NAME  (writes runs/NAME)")
#: ``--latency-model`` values (:attr:`EvaluationOptions.latency_model`)
LATENCY_MODEL_CHOICES = ("auto", "build", "off")
#: images evaluated per progress-bar update (several batches, so the bar costs nothing measurable)
_ACCURACY_CHUNK = 1024


class EvaluationError(Exception):
    """A user-facing problem (missing file, wrong dataset); ``rl_prune.cli.evaluate_main`` turns it into a one-line exit message."""


@dataclass
class EvaluationOptions:
    """What to evaluate and how (the ``evaluate.py`` flags); checked on creation."""

    run_dir: Optional[str] = None
    """run folder written by train_agent.py (runs/NAME)"""
    original: Optional[str] = None
    """original model file (default RUN_DIR/original_model.pt): zoo checkpoint, pickled module or TorchScript"""
    pruned: Optional[str] = None
    """pruned model file (default RUN_DIR/pruned_model.pt)"""
    dataset: Optional[str] = None
    """dataset (default: the run's): cifar10, cifar100, npz:PATH, imagefolder:PATH, digits, synthetic"""
    data_root: Optional[str] = None
    """folder with the CIFAR files (default: the run's, or data)"""
    val_size: Optional[int] = None
    """validation images held out (default: the run's)"""
    split_seed: Optional[int] = None
    """seed of the data split (default: the run's)"""
    max_test: Optional[int] = None
    """evaluate a seeded subset of N test images (None: the whole test split)"""
    device: str = "auto"
    """accuracy device; timings on CPU and CUDA (auto, when available), or only this one"""
    batch_size: int = 256
    """batch size for accuracy and throughput"""
    repeats: int = 30
    """interleaved timing rounds per measurement (``measure_latency_rounds``: original and pruned, a block of passes
    each; median and p90 over the rounds)"""
    warmup: int = 5
    """untimed passes of each model before each measurement"""
    threads: Optional[int] = None
    """torch CPU threads for the measurements (None: torch's)"""
    latency: bool = True
    """measure latency and throughput"""
    latency_model: str = "auto"
    """predicted beside measured latency in the run's latency setting (metrics.json's ``latency``): ``auto``
    predicts when the run's env built a latency model (its table is read from the cache) and measures either way,
    ``build`` also predicts for a run without one (measuring its table first), ``off`` skips both"""
    latency_rounds: int = 10
    """interleaved timing rounds of the latency in the run's setting (the median is reported)"""
    export: List[str] = field(default_factory=list)
    """formats to export the pruned model to and check (torchscript, onnx)"""
    seed: Optional[int] = None
    """seed of the test subset and timing inputs (None: the run's, or 0)"""
    out: Optional[str] = None
    """folder for evaluation.md/json and exports (None: RUN_DIR, or the pruned model's folder)"""
    progress: bool = True
    """show progress bars"""

    def __post_init__(self) -> None:
        for key in ("batch_size", "repeats", "threads", "max_test", "latency_rounds"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise EvaluationError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
        if self.warmup < 0:
            raise EvaluationError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.latency_model not in LATENCY_MODEL_CHOICES:
            raise EvaluationError(f"--latency-model must be one of {', '.join(LATENCY_MODEL_CHOICES)}, got "
                                  f"{self.latency_model!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise EvaluationError(f"--device must be auto, cpu or cuda, got {self.device!r}")


# ----------------------------------------------------------------------------------------------------------- inputs

def resolve_inputs(options: EvaluationOptions) -> Tuple[Path, Path, Dict[str, Any], Optional[Path], Path]:
    """(original path, pruned path, data settings, run folder or None, output folder) from the options.

    :param options: the options.
    """
    run_dir = Path(options.run_dir) if options.run_dir else None
    if run_dir is not None:
        if not run_dir.is_dir():
            raise EvaluationError(f"run folder not found: {run_dir}. Create it with: {TRAIN_HINT}")
        folder = RunFolder(run_dir)
        owner = folder.lock_owner()
        if owner is not None:
            raise EvaluationError(f"{run_dir} is being written by a run ({describe_owner(owner)}); evaluate it once "
                                  f"that run has finished (its metrics.json is its last file)")
        settings = folder.data_settings()
        original = Path(options.original) if options.original else folder.file(RunFolder.ORIGINAL_MODEL)
        pruned = Path(options.pruned) if options.pruned else folder.file(RunFolder.PRUNED_MODEL)
        resume = (f"python train_agent.py --config {folder.file(RunFolder.CONFIG)} --name {folder.name} "
                  f"--resume")
        for path, role in ((original, "original"), (pruned, "pruned")):
            if not path.is_file():
                raise EvaluationError(f"{role} model not found: {path}. The run did not finish; complete it with: "
                                      f"{resume}  (or start a new one with: {TRAIN_HINT})")
        if not folder.is_finished and not (options.original and options.pruned):
            raise EvaluationError(f"{run_dir} holds no {RunFolder.METRICS}: the run did not finish, its models may "
                                  f"be from another moment; complete it with: {resume}  (or pass --original and "
                                  f"--pruned to evaluate these files anyway)")
    else:
        if not (options.original and options.pruned):
            raise EvaluationError("give a run folder (python evaluate.py runs/NAME) or both --original A.pt and "
                                  "--pruned B.pt (with --dataset NAME)")
        settings = {}
        original, pruned = Path(options.original), Path(options.pruned)
        for path, flag in ((original, "--original"), (pruned, "--pruned")):
            if not path.is_file():
                raise EvaluationError(f"{flag} model not found: {path}. Pretrained models come from "
                                      f"python -m pruning_env.pretrain, pruned ones from: {TRAIN_HINT}")
    for key in ("dataset", "data_root", "val_size", "split_seed", "seed"):
        if getattr(options, key) is not None:
            settings[key] = getattr(options, key)
    if not settings.get("dataset"):
        raise EvaluationError("no dataset known: pass --dataset NAME (cifar10, cifar100, npz:PATH, "
                              "imagefolder:PATH, digits, synthetic)")
    out = Path(options.out) if options.out else (run_dir if run_dir is not None else pruned.parent)
    return original, pruned, settings, run_dir, out


def load_splits(settings: Dict[str, Any]) -> DatasetSplits:
    """The dataset of a run with its split settings (the test split is what we report on).

    :param settings: ``dataset`` and optionally ``data_root``, ``val_size``, ``split_seed``.
    """
    name = settings["dataset"]
    try:
        return make_datasets(name, root=settings.get("data_root", "data"), download=False,
                             val_size=settings.get("val_size"), seed=int(settings.get("split_seed", 0)),
                             augment=False)
    except (FileNotFoundError, ValueError) as err:
        raise EvaluationError(f"cannot load dataset {name!r} (data_root {settings.get('data_root', 'data')!r}): "
                              f"{err}. Pass --dataset / --data-root to point at the data the run used.") from err


def load_models(original: Path, pruned: Path) -> Tuple[nn.Module, nn.Module]:
    """Both models on CPU in eval mode (zoo checkpoints, pickled modules or TorchScript files)."""
    models = []
    for path in (original, pruned):
        with warnings.catch_warnings(), quiet_jit():
            # load_model lets torch.load dispatch TorchScript archives to torch.jit.load, which is intended here
            warnings.filterwarnings("ignore", message=".*TorchScript archive", category=UserWarning)
            try:
                model = load_model(path, map_location="cpu")
            except (FileNotFoundError, ValueError) as err:
                raise EvaluationError(str(err)) from err
            except Exception as err:  # unpickling errors of files that are not models at all
                raise EvaluationError(f"cannot load {path} as a model ({type(err).__name__}: {err}); expected "
                                      f"a .pt written by train_agent.py / pruning_env.pretrain or a TorchScript "
                                      f"file") from err
        models.append(model.cpu().eval())
    return models[0], models[1]


# ----------------------------------------------------------------------------------------------------- measurements

def model_costs(model: nn.Module, input_size: Sequence[int]) -> Dict[str, Optional[int]]:
    """MACs per image and params via :func:`pruning_env.costs.count_costs` (MACs need an eager module: a
    TorchScript model reports ``None``, since hooks cannot see inside it)."""
    if isinstance(model, torch.jit.ScriptModule):
        return {"macs": None, "params": sum(p.numel() for p in model.parameters())}
    cost = count_costs(model, tuple(input_size), device="cpu")
    return {"macs": int(cost.macs), "params": int(cost.params)}


def accuracy_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int,
                desc: str = "accuracy", progress: bool = True) -> Dict[str, float]:
    """Top-1 / top-5 / loss of ``model`` on preloaded test tensors via :func:`pruning_env.training.evaluate`,
    in chunks so that a progress bar can follow (the chunk results are exact, weighted by their size)."""
    totals = {"top1": 0.0, "top5": 0.0, "loss": 0.0}
    n = 0
    with tqdm(total=len(x), desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for start in range(0, len(x), _ACCURACY_CHUNK):
            part = evaluate(model, (x[start:start + _ACCURACY_CHUNK], y[start:start + _ACCURACY_CHUNK]), device,
                            batch_size=batch_size)
            for key in totals:
                totals[key] += part[key] * part["n"]
            n += part["n"]
            bar.update(part["n"])
    return {**{k: v / n for k, v in totals.items()}, "n": n}



#: shortest timed block of a round (fast models repeat their forward pass within a block): ``measure_latency``'s
MIN_BLOCK_S = 0.02


def measure_speed(models: Sequence[nn.Module], input_size: Sequence[int], device: torch.device,
                  batch_size: int = 256, repeats: int = 30, warmup: int = 5, seed: int = 0,
                  threads: Optional[int] = None, desc: str = "", progress: bool = True) -> List[Dict[str, Any]]:
    """Batch-1 latency (median, p90 and mean, ms) and throughput (images/s at ``batch_size``, from the median batch
    time) of each model on ``device``, on seeded random inputs (speed does not depend on the values).

    The models are timed together with :func:`pruning_env.costs.latency.measure_latency_rounds` (the project's one
    timing mechanism: ``torch.utils.benchmark.Timer``, warm-up, ``repeats`` interleaved rounds in a fresh random
    order each, so a burst of load on a shared machine lands on every model alike; the thread clock for one CPU
    thread, the synchronised wall clock otherwise); a round times a block of at least :data:`MIN_BLOCK_S` of passes
    and the statistics are over the rounds' per-pass times.

    :param models: the models (copies move to ``device``; the originals stay where they are).
    :param input_size: ``(C, H, W)``.
    :param repeats: interleaved timing rounds for each of the two measurements (batch 1, ``batch_size``).
    :param warmup: untimed passes of each model before each measurement (allocator, cuDNN autotuning, thread pools).
    :param threads: torch CPU threads (default: torch's current number).
    :raises EvaluationError: a setting that cannot be measured (more threads than cores, CUDA without a GPU).
    :return: one dict per model.
    """
    threads = int(threads or torch.get_num_threads())
    samples, clock = {}, None
    for bs in (1, int(batch_size)):
        try:
            setting = LatencySetting(device=str(device), threads=threads, batch_size=bs)
            clock = setting.resolve_clock()
            samples[bs] = measure_latency_rounds(models, input_size, setting, rounds=repeats, seed=seed,
                                                 min_block_s=MIN_BLOCK_S, warmup=warmup, progress=progress,
                                                 desc=f"{desc} {device.type} batch {bs}".strip())
        except (ValueError, RuntimeError) as err:
            raise EvaluationError(f"cannot time the models on {device}: {err}") from err
    out = []
    for i in range(len(models)):
        lat, thr = samples[1][:, i] * 1e3, samples[int(batch_size)][:, i]
        out.append({"latency_ms_median": float(np.median(lat)), "latency_ms_p90": float(np.percentile(lat, 90)),
                    "latency_ms_mean": float(lat.mean()), "batch_size": int(batch_size),
                    "batch_ms_median": float(np.median(thr) * 1e3),
                    "throughput_ips": float(batch_size / np.median(thr)), "repeats": int(repeats),
                    "warmup": int(warmup), "clock": clock, "threads": threads})
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else float(a) / float(b)


def compare(original: nn.Module, pruned: nn.Module, x: torch.Tensor, y: torch.Tensor, input_size: Sequence[int],
            device: torch.device, speed_devices: Sequence[torch.device] = (), batch_size: int = 256,
            repeats: int = 30, warmup: int = 5, seed: int = 0, progress: bool = True,
            threads: Optional[int] = None) -> Dict[str, Any]:
    """Measure both models and their ratios (pruned / original); the two are timed together (:func:`measure_speed`).

    :param original: the unpruned model (CPU, eval).
    :param pruned: the pruned model (CPU, eval).
    :param x: test images (already normalised), ``y`` their labels.
    :param input_size: ``(C, H, W)`` for the cost model and the timing inputs.
    :param device: where accuracy is measured.
    :param speed_devices: where latency / throughput are measured (empty: skip timing).
    :param threads: torch CPU threads of the timings (default: torch's current number).
    :return: ``{"original": {...}, "pruned": {...}, "ratios": {...}}``.
    """
    report: Dict[str, Any] = {}
    for role, model in (("original", original), ("pruned", pruned)):
        entry: Dict[str, Any] = dict(model_costs(model, input_size))
        runner = model if device.type == "cpu" else copy.deepcopy(model).to(device)
        acc = accuracy_on(runner, x, y, device, batch_size, f"{role} test accuracy", progress)
        del runner
        entry.update(top1=acc["top1"], top5=acc["top5"], loss=acc["loss"], n_test=acc["n"])
        entry["speed"] = {}
        report[role] = entry
    for dev in speed_devices:  # both models timed together, in interleaved rounds
        speeds = measure_speed([original, pruned], input_size, dev, batch_size, repeats, warmup, seed, threads,
                               "original/pruned", progress)
        for role, speed in zip(("original", "pruned"), speeds):
            report[role]["speed"][dev.type] = speed
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    o, p = report["original"], report["pruned"]
    ratios: Dict[str, Any] = {
        "macs": _ratio(p["macs"], o["macs"]), "params": _ratio(p["params"], o["params"]),
        "top1_delta": p["top1"] - o["top1"], "top5_delta": p["top5"] - o["top5"],
        "speedup_theoretical": _ratio(o["macs"], p["macs"]), "speedup": {},
    }
    for dev in o["speed"]:
        so, sp = o["speed"][dev], p["speed"][dev]
        ratios["speedup"][dev] = {"latency": _ratio(so["latency_ms_median"], sp["latency_ms_median"]),
                                  "throughput": _ratio(sp["throughput_ips"], so["throughput_ips"])}
    report["ratios"] = ratios
    return report


def run_exports(pruned: nn.Module, example: torch.Tensor, formats: Sequence[str], out_dir: Path,
                stem: str) -> Dict[str, Dict[str, Any]]:
    """Export ``pruned`` to each format as ``out_dir/{stem}.ts|.onnx``; every file is checked against the module.

    :param example: a batch of real test images for tracing and for the output check.
    """
    results: Dict[str, Dict[str, Any]] = {}
    for fmt in formats:
        if fmt == "torchscript":
            path = out_dir / f"{stem}.ts"
            method = export_torchscript(pruned, example, path)
            with quiet_jit():
                diff = max_abs_diff(pruned, torch.jit.load(str(path), map_location="cpu"), example)
            results[fmt] = {"path": str(path), "method": method, "max_abs_diff": diff, "checked_with": "torch.jit"}
        elif fmt == "onnx":
            path = out_dir / f"{stem}.onnx"
            outcome = export_onnx(pruned, example, path)
            results[fmt] = {"path": str(path), "method": f"{outcome.exporter} exporter",
                            "max_abs_diff": outcome.max_abs_diff, "checked_with": "onnxruntime"}
        else:
            raise EvaluationError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
        results[fmt]["file_mb"] = path.stat().st_size / 1e6
        results[fmt]["examples"] = int(example.shape[0])
    return results


def run_setting_latency(original: nn.Module, pruned: nn.Module, record: Dict[str, Any], input_size: Sequence[int],
                        mode: str = "auto", rounds: int = 10, seed: int = 0,
                        progress: bool = True) -> Dict[str, Any]:
    """Measured and predicted latency of both models in the run's latency setting (threads, batch size, dtype,
    memory format, device: the setting the env's budget or reward predicted): measured with
    :func:`pruning_env.costs.measure_latency` (``Timer``, interleaved rounds, the setting's clock), predicted with
    the :class:`~pruning_env.costs.LatencyModel` of the run's original model (its cached table, the run's grid and
    pruner options) at the run's kept channels.

    :param original: the unpruned model (eager, CPU).
    :param pruned: the pruned model.
    :param record: the run folder's latency record (:meth:`RunFolder.latency_info`).
    :param input_size: ``(C, H, W)``.
    :param mode: ``auto`` (predict when the run predicted), ``build`` (always predict).
    :param rounds: timing rounds.
    :param seed: seeds the timing order and inputs.
    :raises EvaluationError: a setting this machine cannot measure, or a model that is not the run's.
    """
    from pruning_env.costs import LatencyModel, LatencySetting, measure_latency
    from pruning_env.pruning import Pruner

    try:
        setting = LatencySetting(**record["setting"])
        setting.torch_device  # noqa: B018  (CUDA asked on a machine without one fails here)
        clock = setting.resolve_clock()
    except (TypeError, ValueError, RuntimeError) as err:
        raise EvaluationError(f"the run's latency setting {record['setting']} cannot be measured here: {err}. "
                              f"Evaluate on the device the run was made for, or pass --latency-model off") from err
    entry: Dict[str, Any] = {"setting": dict(record["setting"]), "tag": setting.tag, "clock": clock,
                             "rounds": int(rounds), "predicted_s": None, "table": None, "note": None}
    try:
        measured = measure_latency([original, pruned], input_size, setting, rounds=rounds, seed=seed,
                                   progress=progress, desc=f"latency {setting.tag}")
    except (RuntimeError, TypeError, NotImplementedError) as err:
        raise EvaluationError(f"latency setting {setting.tag} cannot be measured on these models: {err}") from err
    entry["measured_s"] = {"original": float(measured[0]), "pruned": float(measured[1])}
    entry["measured_speedup"] = float(measured[0] / measured[1])
    predicted_in_run = record.get("predicted")
    if mode == "auto" and predicted_in_run is None:
        entry["note"] = ("the run's env built no latency model (no latency budget, gamma 0); --latency-model build "
                         "measures its table and predicts")
        return entry
    if isinstance(original, torch.jit.ScriptModule):
        entry["note"] = "a TorchScript original has no channel groups to predict from; evaluate the eager .pt file"
        return entry
    kept, names = record.get("kept_channels"), record.get("group_names")
    if kept is None or names is None:
        entry["note"] = "the run folder records no kept channels (metrics.json kept_channels) to predict from"
        return entry
    options = record.get("pruner") or {}
    example = torch.zeros((1, *input_size))
    pruner = Pruner(copy.deepcopy(original).eval(), example, ignore=tuple(options.get("ignore_layers", ())),
                    min_channels=int(options.get("min_channels", 1)), round_to=int(options.get("round_to", 1)),
                    prune_normalized=bool(options.get("prune_normalized", False)))
    if list(pruner.group_names) != list(names) or (record.get("original_channels") is not None and
                                                   pruner.num_channels.tolist() != list(record["original_channels"])):
        raise EvaluationError(f"the original model's channel groups {list(pruner.group_names)} "
                              f"({pruner.num_channels.tolist()} channels) are not the run's {list(names)}; pass the "
                              f"run's original model (--original)")
    cache = True if record.get("cache") is None else record["cache"]
    grid = record.get("grid") or None
    model = LatencyModel.build(pruner, setting, cache=cache, progress=progress,
                               **({"grid": tuple(grid)} if grid else {}))
    keep = np.asarray(kept, dtype=np.int64)
    predicted = {"original": float(model.original), "pruned": float(model.predict(keep))}
    entry["predicted_s"] = predicted
    entry["predicted_speedup"] = predicted["original"] / predicted["pruned"]
    entry["error"] = {role: predicted[role] / entry["measured_s"][role] - 1.0 for role in predicted}
    entry["table"] = {"from_cache": bool(getattr(model, "from_cache", False)),
                      "created": model.meta.get("created"), "machine": (model.meta.get("machine") or {}).get("cpu")}
    return entry


# ----------------------------------------------------------------------------------------------------------- report

def _num(v: Optional[float], unit: str = "") -> str:
    if v is None:
        return "n/a"
    for div, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}{unit}".rstrip()
    return f"{v:.3g} {unit}".rstrip()


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def _x(v: Optional[float], word: str = "") -> str:
    return "n/a" if v is None else f"{v:.2f}x{(' ' + word) if word else ''}"


def format_markdown(result: Dict[str, Any]) -> str:
    """The evaluation as a markdown page: settings, the comparison table, the speedup line, the exports."""
    o, p, r = result["original"], result["pruned"], result["ratios"]
    data, machine = result["data"], result["machine"]
    lines = [f"# Evaluation: {result['run_dir'] or result['pruned']['path']}", ""]
    lines.append(f"- original: `{o['path']}`; pruned: `{p['path']}`")
    subset = f" (a seeded subset of {data['max_test']})" if data.get("max_test") else ""
    lines.append(f"- dataset: `{data['dataset']}`, test split, {o['n_test']} images{subset}; input "
                 f"{'x'.join(map(str, result['input_size']))}; accuracy measured on {result['settings']['device']}")
    gpu = f", GPU {machine['cuda']}" if machine.get("cuda") else ""
    lines.append(f"- machine: {machine['cpu']}, {machine['cpu_count']} logical cores, torch threads: "
                 f"{machine['torch_threads']}{gpu}; torch {machine['torch']}")
    lines += ["", "| | original | pruned | pruned / original |", "|---|---:|---:|---:|"]
    lines.append(f"| test top-1 | {_pct(o['top1'])} | {_pct(p['top1'])} | {100 * r['top1_delta']:+.2f} pp |")
    lines.append(f"| test top-5 | {_pct(o['top5'])} | {_pct(p['top5'])} | {100 * r['top5_delta']:+.2f} pp |")
    macs_note = "" if r["macs"] is None else f"{r['macs']:.3f} ({_x(r['speedup_theoretical'], 'fewer')})"
    lines.append(f"| MACs / image | {_num(o['macs'])} | {_num(p['macs'])} | {macs_note or 'n/a'} |")
    lines.append(f"| params | {_num(o['params'])} | {_num(p['params'])} | {r['params']:.3f} |")
    lines.append(f"| file size | {o['file_mb']:.2f} MB | {p['file_mb']:.2f} MB | {r['file_size']:.3f} |")
    for dev in o["speed"]:
        so, sp, su = o["speed"][dev], p["speed"][dev], r["speedup"][dev]
        name = dev.upper()
        lines.append(f"| {name} latency, batch 1, median | {so['latency_ms_median']:.3f} ms | "
                     f"{sp['latency_ms_median']:.3f} ms | {_x(su['latency'], 'faster')} |")
        lines.append(f"| {name} latency, batch 1, p90 | {so['latency_ms_p90']:.3f} ms | {sp['latency_ms_p90']:.3f} ms"
                     f" | {_x(_ratio(so['latency_ms_p90'], sp['latency_ms_p90']), 'faster')} |")
        lines.append(f"| {name} throughput, batch {so['batch_size']} | {so['throughput_ips']:,.0f} img/s | "
                     f"{sp['throughput_ips']:,.0f} img/s | {_x(su['throughput'])} |")
    lines.append("")
    if o["macs"] is None or p["macs"] is None:
        lines += ["MACs n/a: a TorchScript model hides its layers from the cost model (count_costs); evaluate the "
                  "eager .pt file for MACs.", ""]
    if o["speed"]:
        measured = "; ".join(f"{dev.upper()} {_x(s['latency'])} at batch 1, {_x(s['throughput'])} at batch "
                             f"{o['speed'][dev]['batch_size']}" for dev, s in r["speedup"].items())
        clocks = "/".join(sorted({str(s.get("clock", "wall")) for s in o["speed"].values()}))
        lines.append(f"Measured speedup: {measured}; theoretical (MACs ratio): {_x(r['speedup_theoretical'])}. "
                     f"Timings: `torch.utils.benchmark.Timer` ({clocks} clock), original and pruned interleaved in "
                     f"{result['settings']['repeats']} rounds (each a block of at least {1e3 * MIN_BLOCK_S:g} ms of "
                     f"passes) after {result['settings']['warmup']} warm-up passes; median and p90 over the rounds.")
    else:
        lines.append(f"Theoretical speedup (MACs ratio): {_x(r['speedup_theoretical'])}; latency not measured "
                     f"(--no-latency).")
    lat = result.get("run_setting_latency")
    if lat is not None:
        lines += ["", f"Latency in the run's setting `{lat['tag']}` (threads {lat['setting']['threads']}, batch "
                      f"{lat['setting']['batch_size']}, {lat['setting']['dtype']}, channels_last "
                      f"{lat['setting']['channels_last']}; {lat['clock']} clock, median of {lat['rounds']} "
                      f"interleaved rounds):", "",
                  "| | original | pruned | speed-up |", "|---|---:|---:|---:|",
                  f"| measured | {1e3 * lat['measured_s']['original']:.3f} ms | {1e3 * lat['measured_s']['pruned']:.3f} "
                  f"ms | {_x(lat['measured_speedup'])} |"]
        pred = lat.get("predicted_s")
        if pred is not None:
            lines.append(f"| predicted (latency model) | {1e3 * pred['original']:.3f} ms | "
                         f"{1e3 * pred['pruned']:.3f} ms | {_x(lat['predicted_speedup'])} |")
            lines.append(f"| prediction error | {100 * lat['error']['original']:+.1f}% | "
                         f"{100 * lat['error']['pruned']:+.1f}% | |")
        if lat.get("note"):
            lines += ["", f"Predicted latency n/a: {lat['note']}."]
    if result["exports"]:
        lines += ["", "| export of the pruned model | file | size | max abs diff vs module |", "|---|---|---:|---:|"]
        for fmt, e in result["exports"].items():
            label = "TorchScript" if fmt == "torchscript" else "ONNX"
            lines.append(f"| {label} ({e['method']}) | `{Path(e['path']).name}` | {e['file_mb']:.2f} MB | "
                         f"{e['max_abs_diff']:.2e} ({e['checked_with']}, {e['examples']} test images) |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- run

def evaluate_models(options: EvaluationOptions) -> Dict[str, Any]:
    """Evaluate as the options say, write evaluation.md / evaluation.json, return the result.

    :param options: what to evaluate and how.
    :raises EvaluationError: a missing file, a wrong dataset, a failed export, with a one-line message.
    """
    t_start = time.perf_counter()
    original_path, pruned_path, settings, run_dir, out_dir = resolve_inputs(options)
    try:
        device = resolve_device(None if options.device == "auto" else options.device)
    except RuntimeError as err:
        raise EvaluationError(f"{err} (--device {options.device})") from err
    seed = int(settings.get("seed", 0))
    seed_everything(seed)
    splits = load_splits(settings)
    input_size = tuple(settings.get("input_size") or splits.input_size)
    if tuple(splits.input_size) != input_size:
        raise EvaluationError(f"the run used inputs {input_size} but dataset {settings['dataset']!r} gives "
                              f"{tuple(splits.input_size)}; pass the run's --dataset")
    original, pruned = load_models(original_path, pruned_path)
    x, y = preload(splits.test, n=options.max_test, seed=seed)
    for path, model in ((original_path, original), (pruned_path, pruned)):
        with torch.inference_mode():
            classes = model_logits(model(x[:2])).shape[1]
        if classes != splits.num_classes:
            raise EvaluationError(f"{path} predicts {classes} classes but dataset {settings['dataset']!r} has "
                                  f"{splits.num_classes}; pass the dataset the model was trained on (--dataset)")

    speed_devices: List[torch.device] = []
    if options.latency:
        if options.device in ("auto", "cpu"):
            speed_devices.append(torch.device("cpu"))
        if options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available()):
            speed_devices.append(torch.device("cuda"))
    threads_before = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        result = compare(original, pruned, x, y, input_size, device, speed_devices, options.batch_size, options.repeats,
                         options.warmup, seed, options.progress)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    for role, path in (("original", original_path), ("pruned", pruned_path)):
        result[role] = {"path": str(path), "file_mb": path.stat().st_size / 1e6, **result[role]}
    result["ratios"]["file_size"] = _ratio(result["pruned"]["file_mb"], result["original"]["file_mb"])
    try:
        exports = run_exports(pruned, x[:8], options.export, out_dir, pruned_path.stem) if options.export else {}
    except (ImportError, RuntimeError) as err:  # missing optional dependency, or an unfaithful export
        raise EvaluationError(str(err)) from err
    record = RunFolder(run_dir).latency_info() if run_dir is not None else None
    setting_latency = None
    if record is not None and options.latency and options.latency_model != "off":
        setting_latency = run_setting_latency(original, pruned, record, input_size, options.latency_model,
                                              options.latency_rounds, seed, options.progress)
    result = {
        "format": FORMAT, "run_dir": None if run_dir is None else str(run_dir), "out_dir": str(out_dir),
        "data": {"dataset": settings["dataset"], "data_root": settings.get("data_root", "data"),
                 "val_size": settings.get("val_size"), "split_seed": int(settings.get("split_seed", 0)),
                 "n_test": int(len(x)), "max_test": options.max_test},
        "input_size": list(input_size),
        "settings": {"device": str(device), "speed_devices": [d.type for d in speed_devices],
                     "batch_size": options.batch_size, "repeats": options.repeats, "warmup": options.warmup,
                     "threads": threads, "seed": seed},
        "machine": machine_info(threads),
        **result, "run_setting_latency": setting_latency, "exports": exports,
    }
    result["seconds"] = time.perf_counter() - t_start
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(format_markdown(result), out_dir / "evaluation.md")
    atomic_write_text(json.dumps(result, indent=2), out_dir / "evaluation.json")
    return result


__all__ = ["EvaluationOptions", "EvaluationError", "evaluate_models", "compare", "measure_speed", "MIN_BLOCK_S",
           "run_setting_latency", "LATENCY_MODEL_CHOICES",
           "accuracy_on", "model_costs", "run_exports", "format_markdown", "resolve_inputs", "load_splits",
           "load_models", "EXPORT_FORMATS", "FORMAT", "TRAIN_HINT"]
