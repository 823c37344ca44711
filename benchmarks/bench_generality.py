"""Engine generality sweep over the model libraries users prune: torchvision classifiers, timm (the smallest model
of every family that fits) and Ultralytics YOLO (built from their yaml files, no weights), random init, uniform 50 %
channel sparsity, ours beside Torch-Pruning with the same settings.

    python benchmarks/bench_generality.py                 # all torchvision classifiers, CPU, 1 thread, resumable
    python benchmarks/bench_generality.py --library timm         # timm: one model per family (bench_generality_timm.*)
    python benchmarks/bench_generality.py --library ultralytics  # YOLO classify / detect / segment / pose / obb
    python benchmarks/bench_generality.py --retry         # also redo the models where a tool was not ok
    python benchmarks/bench_generality.py --models vit_b_16 swin_t convnext_tiny --prune-normalized --no-torch-pruning
Needs the optional extras ``pip install -e .[bench]`` (timm, ultralytics, torch-pruning). Writes
benchmarks/results/bench_generality[_LIBRARY].md|json after every model, and each model's row atomically to
logs/bench_generality/LIBRARY/MODEL.json (a rerun with the same settings reuses it; ``--models`` and ``--retry``
recompute). Without ``--models``, models already in the json are skipped (``--retry`` redoes those where a tool was
not ok, ``--prune-normalized`` those without its column). A rerun keeps the columns it does not recompute. Per
model and tool: ok / refused (the message) / wrong / crash, MACs kept (our hook counter and ``FlopCounterMode``),
the max |pruned - zeroed| output difference (detection models: per head output) and the seconds. Models above
``--max-params`` are skipped (the forward passes and the copies the check needs outgrow this shared machine).
timm and Ultralytics models get every constant-initialised tensor randomised (zero biases and class tokens, unit
norm gains, 1e-5 layer scales, BN running statistics), so that the pruned-vs-zeroed check sees every layer; the
torchvision rows randomise only all-zero parameters (as when they were first run).
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import resource
import signal
import subprocess
import sys
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from pruning_env.costs import count_costs
from pruning_env.pruning import Pruner, UnsupportedModelError, zeroed_copy
from pruning_env.runtime import atomic_write_text, machine_info

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 1000
TOOLS = ("ours", "torch_pruning", "ours_normalized")
STATUSES = ("ok", "differs", "refused", "wrong", "error")
LABEL = {"error": "crash"}  # the json keeps "error" (the torchvision rows were written so); tables say crash


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--library", choices=sorted(LIBRARIES), default="torchvision", help="the model library swept")
    p.add_argument("--models", nargs="*", default=None, help="model names, recomputed even if the json has them "
                                                             "(default: every model of the library not yet in it)")
    p.add_argument("--size", type=int, default=None, help="input side in pixels (default: the library's; a timm "
                                                          "model that cannot run at it runs at its default size)")
    p.add_argument("--sparsity", type=float, default=0.5, help="uniform fraction of channels removed per group")
    p.add_argument("--max-params", type=float, default=150e6, help="skip larger models (memory and time)")
    p.add_argument("--max-memory-gb", type=float, default=14.0,
                   help="address-space cap of this process (torch's own mappings take ~3.6 GB); a tool that needs "
                        "more fails with an out-of-memory error in its cell instead of starving the machine")
    p.add_argument("--timeout", type=int, default=600, help="seconds per tool and model before it counts as error")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="models run at once (one worker process each)")
    p.add_argument("--retry", action="store_true", help="also redo models already in the json that are not ok")
    p.add_argument("--no-torch-pruning", action="store_true", help="skip the Torch-Pruning column")
    p.add_argument("--from-cache", action="store_true", help="only rewrite the tables from the per-model files "
                                                           "(models without one are left out; nothing is run)")
    p.add_argument("--prune-normalized", action="store_true",
                   help="add a column: ours with Pruner(prune_normalized=True) (the LayerNorm-ed embedding width "
                        "pruned too), checked against the zeroed source with LayerNorm statistics over kept channels "
                        "(timm and Ultralytics: always on for models with a LayerNorm or GroupNorm)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--cache", default=str(ROOT / "logs" / "bench_generality"), help="per-model result files")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one model in a fresh process: its row
    return p


# --------------------------------------------------------------------------------------------------------------
# Libraries: which models, how each is built, which layers stay (classifier, detection heads), what is compared
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Built:
    """One model ready for the sweep: the module (eval), the input, the layers whose outputs stay whole (ours:
    ``ignore=``; Torch-Pruning: ``ignored_layers``) and the modules whose outputs are compared (empty: the model's
    first output tensor, the logits)."""
    model: nn.Module
    x: torch.Tensor
    keep: List[str] = field(default_factory=list)
    heads: List[str] = field(default_factory=list)
    note: str = ""


def randomize_constants(model: nn.Module, seed: int = 1) -> None:
    """Give every constant-initialised floating tensor random values: all-zero ones (biases, class tokens, position
    embeddings, zero-init gains) 0.02 N(0, 1) (1-d: U(-0.2, 0.2)), other constant ones (unit norm gains, 1e-5 layer
    scales, WS-conv gains, BN running variances) U(0.5, 1.5); BN running means U(-0.5, 0.5). Otherwise a layer
    scale of 1e-5 hides its branch from the pruned-vs-zeroed check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or t.numel() < 2:
                continue
            flat = t.reshape(-1)
            if not bool((flat == flat[0]).all()):
                continue
            if name.endswith("running_mean") or not flat[0]:
                lo = 0.5 if name.endswith("running_mean") else 0.2
                if t.dim() == 1:
                    t.copy_((torch.rand(t.shape, generator=g) * 2 - 1) * lo)
                else:
                    t.copy_(0.02 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.5 + torch.rand(t.shape, generator=g))


class Library:
    """A model library: names, parameter count without building, build."""
    name = ""
    stem = ""
    size = 224
    title = ""

    def names(self, args: argparse.Namespace) -> List[str]:
        raise NotImplementedError

    def family(self, name: str) -> str:
        return ""

    def params(self, name: str) -> Optional[int]:
        return None

    def build(self, name: str, size: int) -> Built:
        raise NotImplementedError


class Torchvision(Library):
    name, stem, size = "torchvision", "bench_generality", 224
    title = "torchvision classifiers"

    def names(self, args: argparse.Namespace) -> List[str]:
        return torchvision.models.list_models(module=torchvision.models)

    def params(self, name: str) -> Optional[int]:
        try:
            with torch.device("meta"):  # count the parameters without allocating them
                return sum(p.numel() for p in torchvision.models.get_model(name, weights=None).parameters())
        except (NotImplementedError, RuntimeError):  # a constructor that computes with tensors (RegNet)
            return None

    def build(self, name: str, size: int) -> Built:
        """A randomly initialised classifier; all-zero initial tensors (ViT heads, zero-init gammas) are
        randomised so that the pruned-vs-zeroed check sees every layer."""
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        return Built(model.eval(), _input(size))


def _input(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))


#: One model per timm family (module of ``timm.models``), its smallest variant that builds on this machine: 85 of
#: timm 1.0's 98 families (left out: the 0.4-1 B-parameter VLM encoders deepseek_vit / gemma4_vit / qwen3_vit /
#: naflexvit / mobilenetv5, and the 40-130 M ones nasnet, pnasnet, inception_v4, inception_resnet_v2, vgg, sam);
#: GroupNorm (resnetv2 BiT, efficientnet_gn), GroupNorm1 (poolformer) and weight-standardised convs (nfnet,
#: resnetv2) among them. Ordered so that the constructs #22 names come first.
TIMM_MODELS = """vit_tiny_patch16_224 deit_tiny_patch16_224 convnext_atto resnetv2_50x1_bit poolformer_s12 nf_regnet_b0
resnet18 efficientnet_b0 mixnet_s mobilenetv3_small_050 ghostnet_050 cs3darknet_focus_s dpn48b rexnet_100
res2net50_14w_8s skresnet18 regnety_002 densenet121 dla46x_c hrnet_w18_small mobilevit_xxs mobilevitv2_050
levit_128s xcit_nano_12_p16_224 cait_xxs24_224 pit_ti_224 pvt_v2_b0 swin_tiny_patch4_window7_224
swinv2_tiny_window8_256 swinv2_cr_tiny_ns_224 maxvit_nano_rw_256 coatnet_nano_rw_224 coat_tiny convit_tiny
crossvit_tiny_240 edgenext_xx_small efficientformer_l1 efficientformerv2_s0 efficientvit_b0 efficientvit_m0
eva02_tiny_patch14_224 fastvit_t8 fasternet_t0 focalnet_tiny_srf gcvit_xxtiny hgnetv2_b0 hiera_tiny_224
inception_next_atto inception_v3 mambaout_femto mixer_s16_224 gmlp_ti16_224 nest_tiny repghostnet_050 repvit_m0_9
resnest14d selecsls42b legacy_seresnet18 shvit_s1 starnet_s050 swiftformer_xs tiny_vit_5m_224 tnt_s_patch16_224
twins_svt_small visformer_tiny vit_tiny_r_s16_p8_224 vit_relpos_small_patch16_224 volo_d1_224
ese_vovnet19b_slim_dw xception41 legacy_xception cspnext_tiny mobileone_s0 halonet_h1 convmixer_768_32 davit_tiny
mvitv2_tiny nextvit_small rdnet_tiny sequencer2d_s tresnet_m lcnet_050 hardcorenas_a mobilenetv2_050 cpubone_nano
csatv2 efficientvim_m1 lowformer_b0 vitamin_small_224 test_efficientnet_gn test_efficientnet_ln lcnetv2_small
iformer_t beit_base_patch16_224""".split()


class Timm(Library):
    """timm: one model per family (:data:`TIMM_MODELS`), built with ``pretrained=False``."""
    name, stem, size = "timm", "bench_generality_timm", 96
    title = "timm, one model per family"

    def names(self, args: argparse.Namespace) -> List[str]:
        return list(TIMM_MODELS)

    def family(self, name: str) -> str:
        from timm.models import _registry
        return _registry._model_to_module.get(name, "")  # noqa: SLF001 - the family is timm's module name

    def params(self, name: str) -> Optional[int]:
        import timm
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                return sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        except Exception:  # noqa: BLE001 - a constructor that computes with tensors: counted when built
            return None

    def build(self, name: str, size: int) -> Built:
        """At ``size`` where the model accepts it (``img_size=`` for the models that take one), else at its default
        input size; constants randomised."""
        import timm

        default = tuple(timm.models.get_pretrained_cfg(name).to_dict().get("input_size", (3, 224, 224)))
        tries: List[Tuple[int, Dict[str, Any]]] = [(size, {"img_size": size}), (size, {})]
        if default[-1] != size:
            tries.append((default[-1], {}))
        errors = []
        for side, kwargs in tries:
            torch.manual_seed(0)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval()
                    x = _input(side)
                    with torch.no_grad():
                        model(x)
            except Exception as err:  # noqa: BLE001 - try the next size
                errors.append(f"{side}px{' img_size' if kwargs else ''}: {type(err).__name__}: {err}"[:160])
                continue
            randomize_constants(model)
            note = "" if side == size else f"runs at its default {side}px"
            return Built(model, x, note=note)
        raise RuntimeError("the model does not run: " + " / ".join(errors))


ULTRALYTICS_MODELS = ["yolov8n-cls", "yolo11n-cls", "yolo12n-cls", "yolo26n-cls", "yolov3-tiny", "yolov5n",
                      "yolov6n", "yolov8n", "yolov8n-ghost", "yolov8n-p2", "yolov9t", "yolov10n", "yolo11n",
                      "yolo12n", "yolo26n", "yolov8n-seg", "yolo11n-seg", "yolov8n-pose", "yolo11n-pose",
                      "yolov8n-obb", "yolo11n-obb"]


class Ultralytics(Library):
    """Ultralytics YOLO built from its yaml (the scale ``n`` / ``t`` read from the name, random init, no weights).
    Kept whole: the last layer of every head branch (box, class, mask-coefficient, keypoint, angle convs of each
    level; the classifier's linear), the DFL and the mask prototypes' output conv; compared: those layers' outputs,
    head by head."""
    name, stem, size = "ultralytics", "bench_generality_ultralytics", 224
    title = "Ultralytics YOLO from yaml"

    def names(self, args: argparse.Namespace) -> List[str]:
        return list(ULTRALYTICS_MODELS)

    def family(self, name: str) -> str:
        from ultralytics.nn.tasks import guess_model_task
        return guess_model_task(name + ".yaml")

    def build(self, name: str, size: int) -> Built:
        from ultralytics.nn import tasks

        task = self.family(name)
        cls = {"classify": tasks.ClassificationModel, "detect": tasks.DetectionModel,
               "segment": tasks.SegmentationModel, "pose": tasks.PoseModel, "obb": tasks.OBBModel}[task]
        torch.manual_seed(0)
        model = cls(name + ".yaml", verbose=False).eval()
        randomize_constants(model)
        head_index = len(model.model) - 1
        head = model.model[-1]
        prefix = f"model.{head_index}."
        if task == "classify":
            keep = [prefix + "linear"]
            return Built(model, _input(size), keep=keep, heads=keep)
        heads = [f"{prefix}{n}.{len(s) - 1}" for n, s in head.named_modules()
                 if isinstance(s, nn.Sequential) and len(s) and type(s[-1]) is nn.Conv2d]
        keep = heads + [prefix + "dfl.conv"] if isinstance(getattr(getattr(head, "dfl", None), "conv", None),
                                                           nn.Conv2d) else list(heads)  # yolo26: dfl is Identity
        if hasattr(head, "proto"):
            keep.append(prefix + "proto.cv3.conv")
            heads = heads + [prefix + "proto"]
        return Built(model, _input(size), keep=keep, heads=heads)


LIBRARIES: Dict[str, Library] = {lib.name: lib for lib in (Torchvision(), Timm(), Ultralytics())}


# --------------------------------------------------------------------------------------------------------------
# One model, one tool
# --------------------------------------------------------------------------------------------------------------
def outputs(model: nn.Module, x: torch.Tensor, heads: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The compared outputs: the modules ``heads`` (hooks), else the first tensor of the model's output."""
    got: Dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o))
             for n in heads]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    if heads:
        return got
    while isinstance(out, (tuple, list)):
        out = out[0]
    return {"logits": out}


def compare(out: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """max |out - ref| and max |ref| over the compared outputs (and per head where there are several)."""
    for n in ref:
        if n not in out or out[n].shape != ref[n].shape:
            got = tuple(out[n].shape) if n in out else None
            return {"shape_error": f"{n}: output {got} instead of {tuple(ref[n].shape)}"}
    diffs = {n: float((out[n] - ref[n]).abs().max()) for n in ref}
    result: Dict[str, Any] = {"max_diff": max(diffs.values()),
                              "logit_scale": max(float(r.abs().max()) for r in ref.values())}
    if len(ref) > 1:
        result["head_diffs"] = diffs
    return result


def flop_macs(model: nn.Module, x: torch.Tensor) -> int:
    """``FlopCounterMode`` / 2, with autograd on (under ``no_grad`` ``nn.MultiheadAttention`` takes a fused fast
    path the counter does not see) and the math attention kernel (the counter sees no fused CPU kernel)."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]):
        model(x)
    return counter.get_total_flops() // 2


def tolerance(scale: float) -> float:
    """Max |pruned - zeroed| accepted: float32 reordering noise on deep nets stays far below it."""
    return 1e-4 * (1.0 + scale)


def run_ours(built: Built, sparsity: float, base: Dict[str, int], prune_normalized: bool = False) -> Dict[str, Any]:
    model, x = built.model, built.x
    t0 = time.perf_counter()
    try:
        pruner = Pruner(model, x, ignore=built.keep, prune_normalized=prune_normalized)
    except UnsupportedModelError as err:
        return {"status": "refused", "message": str(err), "seconds": time.perf_counter() - t0}
    pruner.compute_importance(criterion="l1")
    plan = pruner.plan(sparsity=sparsity)
    pruned = pruner.apply(plan)
    seconds = time.perf_counter() - t0
    ref = outputs(zeroed_copy(model, pruner, plan), x, built.heads)
    result = compare(outputs(pruned, x, built.heads), ref)
    if "shape_error" in result:
        return {"status": "wrong", "message": result["shape_error"], "seconds": seconds}
    macs = count_costs(pruned, tuple(x.shape[1:])).macs
    result.update({"status": "ok" if result["max_diff"] <= tolerance(result["logit_scale"]) else "wrong",
                   "seconds": seconds, "groups": pruner.n_groups,
                   "grouped_groups": int((pruner.granularity > 1).sum()),
                   "macs_kept": macs / base["macs"], "flop_counter_kept": flop_macs(pruned, x) / base["flop_macs"],
                   "analytic_equals_count": pruner.plan_cost(plan).macs == macs})
    return result


def _tp_zeroed(model: nn.Module, groups: List[List[tuple]], params: Dict[int, Tuple[str, int]]) -> nn.Module:
    """The source with every output channel Torch-Pruning removed zeroed: filters and biases of the layers whose
    outputs it cut, the affine parameters of norm layers and depthwise convs whose channels follow, and the
    unwrapped parameters (class tokens, position embeddings, layer scales) it cut along their pruning dim."""
    follows = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    ref = copy.deepcopy(model)
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(ref.named_modules())
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for items in groups:
            for module, handler, idxs in items:
                if not idxs:
                    continue
                if id(module) in params:  # an unwrapped parameter
                    pname, dim = params[id(module)]
                    ref_params[pname].index_fill_(dim, torch.as_tensor(idxs), 0)
                    continue
                if id(module) not in names:
                    continue
                depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
                kind = getattr(handler, "__name__", "")
                if kind != "prune_out_channels" and not (kind == "prune_in_channels"
                                                         and (isinstance(module, follows) or depthwise)):
                    continue
                for pname in ("weight", "bias"):
                    param = getattr(modules[names[id(module)]], pname, None)
                    if isinstance(param, torch.Tensor) and param.dim() >= 1:
                        param[torch.as_tensor(idxs)] = 0
    return ref


def _tp_pruner(model: nn.Module, built: Built, sparsity: float):
    import torch_pruning as tp

    kept = {id(model.get_submodule(n)) for n in built.keep}
    ignored = [m for m in model.modules() if id(m) in kept or (isinstance(m, (nn.Linear, nn.Conv2d)) and (
        getattr(m, "out_features", None) == NUM_CLASSES or getattr(m, "out_channels", None) == NUM_CLASSES))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pruner.MagnitudePruner(model, built.x, importance=tp.importance.MagnitudeImportance(p=1),
                                         pruning_ratio=sparsity, ignored_layers=ignored)


def run_torch_pruning(built: Built, sparsity: float, base: Dict[str, int]) -> Dict[str, Any]:
    model, x = built.model, built.x
    theirs = copy.deepcopy(model)
    t0 = time.perf_counter()
    try:
        _tp_pruner(theirs, dataclass_replace(built, theirs), sparsity).step()
        seconds = time.perf_counter() - t0
        out = outputs(theirs, x, built.heads)
        # the same groups in the source's numbering: walk them once more on an unpruned copy, cutting nothing
        # (pruning one group changes the numbering of layers another group shares, e.g. a DenseNet concat)
        probe = copy.deepcopy(model)
        names = {id(m): n for n, m in probe.named_modules()}
        probe_params = {id(p): n for n, p in probe.named_parameters()}
        source = dict(model.named_modules())
        source_params = dict(model.named_parameters())
        pruner = _tp_pruner(probe, dataclass_replace(built, probe), sparsity)
        unwrapped = {id(source_params[probe_params[id(p)]]): (probe_params[id(p)], dim)
                     for p, dim in getattr(pruner.DG, "unwrapped_parameters", []) if id(p) in probe_params}
        groups = []
        for group in pruner.step(interactive=True):
            items = []
            for dep, idxs in group:
                target = dep.target.module
                idxs = [int(getattr(i, "idx", i)) for i in idxs]
                if id(target) in names:
                    items.append((source[names[id(target)]], dep.handler, idxs))
                elif id(target) in probe_params:
                    items.append((source_params[probe_params[id(target)]], dep.handler, idxs))
            groups.append(items)
    except Exception as err:  # noqa: BLE001 - any failure of the other tool is a result to report
        return {"status": "error", "message": f"{type(err).__name__}: {err}"[:300],
                "seconds": time.perf_counter() - t0}
    ref = outputs(_tp_zeroed(model, groups, unwrapped), x, built.heads)
    result = compare(out, ref)
    if "shape_error" in result:
        return {"status": "wrong", "message": result["shape_error"], "seconds": seconds}
    # channels normalised by a LayerNorm / GroupNorm cannot equal their zeroed version (the statistics change)
    normed = any(isinstance(m, (nn.LayerNorm, nn.GroupNorm)) for items in groups for m, _, idxs in items if idxs)
    ok = result["max_diff"] <= tolerance(result["logit_scale"])
    result.update({"status": "ok" if ok else ("differs" if normed else "wrong"), "seconds": seconds,
                   "layer_norm_pruned": normed,
                   "macs_kept": count_costs(theirs, tuple(x.shape[1:])).macs / base["macs"],
                   "flop_counter_kept": flop_macs(theirs, x) / base["flop_macs"]})
    return result


def dataclass_replace(built: Built, model: nn.Module) -> Built:
    return Built(model, built.x, built.keep, built.heads, built.note)


def _timed_out(signum: int, frame: Any) -> None:
    raise TimeoutError("ran past --timeout")


def has_norm(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.LayerNorm, nn.GroupNorm)) for m in model.modules())


def bench_model(lib: Library, name: str, args: argparse.Namespace) -> Dict[str, Any]:
    params = lib.params(name)
    row: Dict[str, Any] = {"model": name, "params": params or 0}
    family = lib.family(name)
    if family:
        row["family"] = family
    if params is not None and params > args.max_params:
        row["skipped"] = f"{params / 1e6:.0f} M params > --max-params {args.max_params / 1e6:.0f} M"
        return row
    try:
        built = lib.build(name, args.size)
    except (MemoryError, RuntimeError) as err:
        row["skipped"] = f"building it failed: {type(err).__name__}: {err}"[:300]
        return row
    params = sum(p.numel() for p in built.model.parameters())
    row["params"] = params
    if params > args.max_params:
        row["skipped"] = f"{params / 1e6:.0f} M params > --max-params {args.max_params / 1e6:.0f} M"
        return row
    row["size"] = built.x.shape[-1]
    if built.note:
        row["note"] = built.note
    base = {"macs": count_costs(built.model, tuple(built.x.shape[1:])).macs, "flop_macs": flop_macs(built.model,
                                                                                                      built.x)}
    row.update(base)
    tools: Dict[str, Callable[..., Dict[str, Any]]] = {"ours": run_ours}
    if not args.no_torch_pruning:
        tools["torch_pruning"] = run_torch_pruning
    if args.prune_normalized or (lib.name != "torchvision" and has_norm(built.model)):
        tools["ours_normalized"] = lambda *a: run_ours(*a, prune_normalized=True)
    for key, fn in tools.items():
        signal.alarm(args.timeout)
        try:
            row[key] = fn(built, args.sparsity, base)
        except Exception as err:  # noqa: BLE001 - a crash is a result too (and a bug of ours to fix)
            row[key] = {"status": "error", "message": f"{type(err).__name__}: {err}"[:300],
                        "trace": traceback.format_exc()[-1500:]}
        finally:
            signal.alarm(0)
    return row


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------
def _cell(r: Optional[Dict[str, Any]]) -> str:
    if r is None:
        return "-"
    status = LABEL.get(r["status"], r["status"])
    if r["status"] in ("refused", "error") or "macs_kept" not in r:
        message = r.get("message", "").replace("|", "/").replace("\n", " ")
        return f"{status}: {message[:70] or 'see the json'}"
    return (f"{status} {r['macs_kept']:.2f} / {r['flop_counter_kept']:.2f}, {r['max_diff']:.0e}, "
            f"{r['seconds']:.1f}s")


def counts(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
    """tool -> status -> models (over the rows not skipped; a tool not run on a model is not counted)."""
    done = [r for r in rows if "skipped" not in r]
    return {tool: {LABEL.get(s, s): sum(1 for r in done if r.get(tool, {}).get("status") == s) for s in STATUSES}
            for tool in TOOLS}


def to_markdown(rows: List[Dict[str, Any]], meta: Dict[str, Any], lib: Library) -> str:
    done = [r for r in rows if "skipped" not in r]
    count = counts(rows)
    normalized = [r for r in done if "ours_normalized" in r]
    with_tp = [r for r in done if "torch_pruning" in r]
    size = (f"{meta['size']}x{meta['size']}" if lib.name != "timm" else
            f"{meta['size']}x{meta['size']} (`img_size={meta['size']}` where the model takes one; a model that "
            "cannot run at it runs at its default size, see the size column)")
    what = {"torchvision": "the final classifier kept",
            "timm": "the final classifier kept; constant-initialised tensors randomised (see the script)",
            "ultralytics": "the last layer of every head branch kept and compared head by head (detection: box and "
                           "class convs of every level, plus mask coefficients and prototypes, keypoints, angles); "
                           "constant-initialised tensors randomised"}[lib.name]
    lines = [f"# Engine generality: {lib.title} at {meta['sparsity']:.0%} channel sparsity", "",
             f"Random init, {size}, batch 1, uniform sparsity {meta['sparsity']} per group (L1 importance), {what}; "
             f"Torch-Pruning {meta['torch_pruning']} `MagnitudePruner(pruning_ratio={meta['sparsity']})` with the "
             "same layers in `ignored_layers` beside it. A cell reads "
             "`status MACs kept (hook counter) / MACs kept (FlopCounterMode), max |pruned - zeroed| output "
             "difference, seconds to trace + score + build`. ok: the pruned model equals the source with the removed "
             "channels zeroed (tolerance 1e-4 x (1 + max |output|)); wrong: it does not (or its outputs have other "
             "shapes); differs: it does not, and the tool pruned channels that a LayerNorm / GroupNorm normalises "
             "(their statistics change when one goes, so no zeroed reference exists; we keep those channels); "
             "refused: `UnsupportedModelError` (message in the json); crash: an exception (message in the json). "
             "Torch-Pruning's zeroed reference uses the groups it prunes, collected on an unpruned copy. Ours prunes "
             "attention heads as groups and keeps the normalised embedding width whole; both MACs columns include "
             "the attention products. The column `ours, prune_normalized` "
             f"({'run for the models with LayerNorm-ed channels' if lib.name == 'torchvision' else 'run for every model with a LayerNorm or GroupNorm'}) "
             "is `Pruner(prune_normalized=True)`: the normalised width is one more group, and ok means equal to the "
             "zeroed source whose norms take their statistics over the kept channels (`zeroed_copy`).", "",
             f"**Counts over {len(done)} models:** ours " + ", ".join(f"{v} {k}" for k, v in count["ours"].items())
             + f"; Torch-Pruning (over {len(with_tp)}) "
             + ", ".join(f"{v} {k}" for k, v in count["torch_pruning"].items())
             + f"; ours with prune_normalized (over {len(normalized)} models) "
             + ", ".join(f"{v} {k}" for k, v in count["ours_normalized"].items()) + ".", ""]
    if meta.get("timeout"):
        lines += [f"A tool that runs past `--timeout` ({meta['timeout']} s of wall clock per tool and model) counts as a "
                  "crash (`TimeoutError` in its cell); on a shared, loaded machine that is not the tool's fault alone.",
                  ""]
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        lines += [f"Skipped: {len(skipped)} (listed in the table).", ""]
    fam = lib.name != "torchvision"
    lines += [f"| model |{' family |' if fam else ''} params (M) |{' size |' if fam else ''} ours | Torch-Pruning | "
              "ours, prune_normalized |",
              f"|---|{'---|' if fam else ''}---:|{'---:|' if fam else ''}---|---|---|"]
    for r in rows:
        extra = f" {r.get('family', '')} |" if fam else ""
        side = f" {r.get('size', '')} |" if fam else ""
        if "skipped" in r:
            reason = r["skipped"].replace("|", "/").replace("\n", " ")[:120]
            lines.append(f"| {r['model']} |{extra} {r['params'] / 1e6:.1f} |{side} skipped: {reason} | | |")
        else:
            lines.append(f"| {r['model']} |{extra} {r['params'] / 1e6:.1f} |{side} {_cell(r.get('ours'))} | "
                         f"{_cell(r.get('torch_pruning'))} | {_cell(r.get('ours_normalized'))} |")
    for tool, title in (("ours", "Refusals (ours)"), ("ours_normalized", "Refusals (ours, prune_normalized)")):
        refused = [r for r in done if r.get(tool, {}).get("status") == "refused"]
        if refused and not (tool == "ours_normalized" and lib.name == "torchvision"):
            lines += ["", f"{title}:", ""]
            lines += [f"- {r['model']}: {r[tool]['message'][:240]}" for r in refused]
    lines += ["", f"Command (the last invocation; the run is resumable, so rows may come from several): "
                  f"`{meta['command']}`", f"Machine: {meta['machine']}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Driver: one worker process per model, results cached per model, tables rewritten after each
# --------------------------------------------------------------------------------------------------------------
def settings(args: argparse.Namespace) -> Dict[str, Any]:
    """What a cached row must have been computed with to be reused."""
    return {"size": args.size, "sparsity": args.sparsity, "no_torch_pruning": args.no_torch_pruning,
            "prune_normalized": args.prune_normalized}


def run_worker(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """One model in a fresh process (memory capped, nothing left over from the previous model)."""
    cmd = [sys.executable, __file__, "--worker", name, "--library", args.library, "--size", str(args.size),
           "--sparsity", str(args.sparsity), "--max-params", str(args.max_params),
           "--max-memory-gb", str(args.max_memory_gb), "--timeout", str(args.timeout), "--threads",
           str(args.threads), "--cache", args.cache]
    if args.no_torch_pruning:
        cmd.append("--no-torch-pruning")
    if args.prune_normalized:
        cmd.append("--prune-normalized")
    limit = 3 * args.timeout + 180
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"model": name, "params": 0, "skipped": f"the worker ran past {limit} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"model": name, "params": 0,
                "skipped": f"the worker died (exit {done.returncode}): {done.stderr.strip()[-400:]}"}
    return json.loads(lines[-1])


def _versions() -> Dict[str, str]:
    found = {"torchvision": torchvision.__version__}
    for mod in ("torch_pruning", "timm", "ultralytics"):
        try:
            found[mod] = __import__(mod).__version__
        except ImportError:
            found[mod] = "not installed"
    return found


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    args = build_parser().parse_args(argv)
    lib = LIBRARIES[args.library]
    args.size = args.size or lib.size
    torch.set_num_threads(args.threads)
    if args.worker:
        cap = int(args.max_memory_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        signal.signal(signal.SIGALRM, _timed_out)
        print(json.dumps(bench_model(lib, args.worker, args)))
        return []
    versions = _versions()
    if lib.name != "torchvision" and versions[lib.name] == "not installed":
        raise SystemExit(f"--library {lib.name} needs `pip install {lib.name}` (or `pip install -e .[bench]`)")
    if versions["torch_pruning"] == "not installed":
        args.no_torch_pruning = True
    out = Path(args.out)
    path = out / f"{lib.stem}.json"
    cache = Path(args.cache) / lib.name
    rows: List[Dict[str, Any]] = json.loads(path.read_text())["rows"] if path.is_file() else []
    names = args.models or lib.names(args)
    by_name = {r["model"]: r for r in rows}

    def redo(row: Dict[str, Any]) -> bool:
        if row.get("skipped", "").startswith("the worker"):
            return True
        if args.prune_normalized and "skipped" not in row and "ours_normalized" not in row:
            return True
        return args.retry and "skipped" not in row and any(
            row.get(tool, {}).get("status") not in ("ok", None) for tool in TOOLS)

    todo = [n for n in names if args.models or n not in by_name or redo(by_name[n])]
    meta = {"library": lib.name, "size": args.size, "sparsity": args.sparsity, "timeout": args.timeout,
            "torch_pruning": versions["torch_pruning"], **{k: v for k, v in versions.items() if k != "torch_pruning"},
            "machine": machine_info(args.threads),
            "command": "python benchmarks/bench_generality.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write: Callable[[], None] = lambda: (  # noqa: E731 - written after every model, so a run can be resumed
        atomic_write_text(json.dumps({"meta": meta, "rows": rows}, indent=2), path),
        atomic_write_text(to_markdown(rows, meta, lib), out / f"{lib.stem}.md"))
    fresh = bool(args.models) or args.retry

    def unit(name: str) -> Dict[str, Any]:
        path_ = cache / f"{name}.json"
        cached = json.loads(path_.read_text()) if path_.is_file() and not fresh else None
        if cached is not None and cached.get("settings") == settings(args):
            return cached["row"]
        row_ = run_worker(name, args)
        if not row_.get("skipped", "").startswith("the worker"):  # a dead or stuck worker is retried next time
            atomic_write_text(json.dumps({"settings": settings(args), "row": row_}, indent=1), path_)
        return row_

    if args.from_cache:  # the tables are exactly the per-model files
        todo = [n for n in names if (cache / f"{n}.json").is_file()]
        fresh, by_name = False, {}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for name, row in tqdm(zip(todo, pool.map(unit, todo)), total=len(todo), desc=f"{lib.name} models"):
            if "skipped" not in row and "skipped" not in by_name.get(name, {"skipped": ""}):
                row = {**by_name[name], **row}  # keep the columns this run did not recompute
            by_name[name] = row
            rows = sorted(by_name.values(), key=lambda r: r["model"])
            write()
            tqdm.write(f"{name}: ours {row.get('ours', {}).get('status', row.get('skipped'))}, "
                       f"torch-pruning {row.get('torch_pruning', {}).get('status', '-')}, "
                       f"ours with prune_normalized {row.get('ours_normalized', {}).get('status', '-')}")
    write()
    return rows


if __name__ == "__main__":
    main()
