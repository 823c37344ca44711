"""Engine generality sweep: every torchvision classifier (random init, 224x224, uniform 50 % channel sparsity),
ours beside Torch-Pruning with the same settings.

    python benchmarks/bench_generality.py                 # all classifiers, CPU, 1 thread, resumable
    python benchmarks/bench_generality.py --retry         # also redo the models where a tool was not ok
    python benchmarks/bench_generality.py --models vit_b_16 swin_t convnext_tiny --prune-normalized --no-torch-pruning
Writes benchmarks/results/bench_generality.md|json after every model. Without ``--models``, models already in the
json are skipped (``--retry`` redoes those where a tool was not ok, ``--prune-normalized`` those without its
column); the models named in ``--models`` are recomputed. A rerun keeps the columns it does not recompute. Per
model and tool:
ok / refused (the message) / wrong / error, MACs kept (our hook counter and ``FlopCounterMode``), the max
|pruned - zeroed| logit difference and the seconds. Models above ``--max-params`` are skipped (the forward
passes and the copies the check needs outgrow this shared machine).
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=None, help="torchvision names, recomputed even if the json has them (default: every classifier "
                        "not yet in the json)")
    p.add_argument("--size", type=int, default=224, help="input side in pixels")
    p.add_argument("--sparsity", type=float, default=0.5, help="uniform fraction of channels removed per group")
    p.add_argument("--max-params", type=float, default=150e6, help="skip larger models (memory and time)")
    p.add_argument("--max-memory-gb", type=float, default=14.0,
                   help="address-space cap of this process (torch's own mappings take ~3.6 GB); a tool that needs "
                        "more fails with an out-of-memory error in its cell instead of starving the machine")
    p.add_argument("--timeout", type=int, default=600, help="seconds per tool and model before it counts as error")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--retry", action="store_true", help="also redo models already in the json that are not ok")
    p.add_argument("--no-torch-pruning", action="store_true", help="skip the Torch-Pruning column")
    p.add_argument("--prune-normalized", action="store_true",
                   help="add a column: ours with Pruner(prune_normalized=True) (the LayerNorm-ed embedding width "
                        "pruned too), checked against the zeroed source with LayerNorm statistics over kept channels")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one model in a fresh process: its row
    return p


def build(name: str) -> nn.Module:
    """A randomly initialised classifier; all-zero initial tensors (ViT heads, zero-init gammas) are randomised
    so that the pruned-vs-zeroed check sees every layer."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


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


def run_ours(model: nn.Module, x: torch.Tensor, sparsity: float, base: Dict[str, int],
             prune_normalized: bool = False) -> Dict[str, Any]:
    t0 = time.perf_counter()
    try:
        pruner = Pruner(model, x, prune_normalized=prune_normalized)
    except UnsupportedModelError as err:
        return {"status": "refused", "message": str(err), "seconds": time.perf_counter() - t0}
    pruner.compute_importance(criterion="l1")
    plan = pruner.plan(sparsity=sparsity)
    pruned = pruner.apply(plan)
    seconds = time.perf_counter() - t0
    ref = logits(zeroed_copy(model, pruner, plan), x)
    out = logits(pruned, x)
    diff = float((out - ref).abs().max())
    scale = float(ref.abs().max())
    size = tuple(x.shape[1:])
    macs = count_costs(pruned, size).macs
    return {"status": "ok" if diff <= tolerance(scale) else "wrong", "seconds": seconds, "groups": pruner.n_groups,
            "grouped_groups": int((pruner.granularity > 1).sum()), "max_diff": diff, "logit_scale": scale,
            "macs_kept": macs / base["macs"], "flop_counter_kept": flop_macs(pruned, x) / base["flop_macs"],
            "analytic_equals_count": pruner.plan_cost(plan).macs == macs}


def _tp_zeroed(model: nn.Module, groups: List[List[tuple]]) -> nn.Module:
    """The source with every output channel Torch-Pruning removed zeroed: filters and biases of the layers whose
    outputs it cut, and the affine parameters of norm layers and depthwise convs whose channels follow."""
    follows = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    ref = copy.deepcopy(model)
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for items in groups:
            for module, handler, idxs in items:
                if id(module) not in names or not idxs:
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


def _tp_pruner(model: nn.Module, x: torch.Tensor, sparsity: float):
    import torch_pruning as tp

    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and
               (getattr(m, "out_features", None) == NUM_CLASSES or getattr(m, "out_channels", None) == NUM_CLASSES)]
    return tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                     pruning_ratio=sparsity, ignored_layers=ignored)


def run_torch_pruning(model: nn.Module, x: torch.Tensor, sparsity: float, base: Dict[str, int]) -> Dict[str, Any]:
    theirs = copy.deepcopy(model)
    t0 = time.perf_counter()
    try:
        _tp_pruner(theirs, x, sparsity).step()
        seconds = time.perf_counter() - t0
        out = logits(theirs, x)
        # the same groups in the source's numbering: walk them once more on an unpruned copy, cutting nothing
        # (pruning one group changes the numbering of layers another group shares, e.g. a DenseNet concat)
        probe = copy.deepcopy(model)
        names = {id(m): n for n, m in probe.named_modules()}
        source = dict(model.named_modules())
        groups = [[(source[names[id(dep.target.module)]], dep.handler, [int(getattr(i, "idx", i)) for i in idxs])
                   for dep, idxs in group if id(dep.target.module) in names]
                  for group in _tp_pruner(probe, x, sparsity).step(interactive=True)]
    except Exception as err:  # noqa: BLE001 - any failure of the other tool is a result to report
        return {"status": "error", "message": f"{type(err).__name__}: {err}"[:300],
                "seconds": time.perf_counter() - t0}
    ref = logits(_tp_zeroed(model, groups), x)
    if out.shape != ref.shape:
        return {"status": "wrong", "message": f"logits {tuple(out.shape)} instead of {tuple(ref.shape)}",
                "seconds": seconds}
    diff = float((out - ref).abs().max())
    scale = float(ref.abs().max())
    # channels normalised by a LayerNorm cannot equal their zeroed version (the statistics change)
    layer_norm = any(isinstance(m, nn.LayerNorm) for items in groups for m, _, idxs in items if idxs)
    status = "ok" if diff <= tolerance(scale) else ("differs" if layer_norm else "wrong")
    return {"status": status, "seconds": seconds, "max_diff": diff, "logit_scale": scale,
            "layer_norm_pruned": layer_norm, "macs_kept": count_costs(theirs, tuple(x.shape[1:])).macs / base["macs"],
            "flop_counter_kept": flop_macs(theirs, x) / base["flop_macs"]}


def _timed_out(signum: int, frame: Any) -> None:
    raise TimeoutError("ran past --timeout")


def bench_model(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    try:
        with torch.device("meta"):  # count the parameters without allocating them
            params = sum(p.numel() for p in torchvision.models.get_model(name, weights=None).parameters())
    except (NotImplementedError, RuntimeError):  # a constructor that computes with tensors (RegNet)
        params = None
    model = None
    if params is None:
        try:
            model = build(name)
        except (MemoryError, RuntimeError) as err:
            return {"model": name, "params": 0, "skipped": f"building it needs more than --max-memory-gb "
                                                           f"{args.max_memory_gb:g} ({type(err).__name__})"}
        params = sum(p.numel() for p in model.parameters())
    row: Dict[str, Any] = {"model": name, "params": params}
    if params > args.max_params:
        row["skipped"] = f"{params / 1e6:.0f} M params > --max-params {args.max_params / 1e6:.0f} M"
        return row
    model = model if model is not None else build(name)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(2))
    base = {"macs": count_costs(model, tuple(x.shape[1:])).macs, "flop_macs": flop_macs(model, x)}
    row.update(base)
    tools: Dict[str, Callable[..., Dict[str, Any]]] = {"ours": run_ours, "torch_pruning": run_torch_pruning}
    if args.prune_normalized:
        tools["ours_normalized"] = lambda *a: run_ours(*a, prune_normalized=True)
    for key, fn in tools.items():
        if key == "torch_pruning" and args.no_torch_pruning:
            continue
        signal.alarm(args.timeout)
        try:
            row[key] = fn(model, x, args.sparsity, base)
        except Exception as err:  # noqa: BLE001 - a crash is a result too (and a bug of ours to fix)
            row[key] = {"status": "error", "message": f"{type(err).__name__}: {err}"[:300],
                        "trace": traceback.format_exc()[-1500:]}
        finally:
            signal.alarm(0)
    return row


def _cell(r: Optional[Dict[str, Any]]) -> str:
    if r is None:
        return "-"
    if r["status"] in ("refused", "error") or "macs_kept" not in r:
        message = r.get("message", "").replace("|", "/").replace("\n", " ")
        return f"{r['status']}: {message[:70] or 'see the json'}"
    return (f"{r['status']} {r['macs_kept']:.2f} / {r['flop_counter_kept']:.2f}, {r['max_diff']:.0e}, "
            f"{r['seconds']:.1f}s")


def to_markdown(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    done = [r for r in rows if "skipped" not in r]
    tools = ("ours", "torch_pruning", "ours_normalized")
    count = {tool: {s: sum(1 for r in done if r.get(tool, {}).get("status") == s)
                    for s in ("ok", "differs", "refused", "wrong", "error")} for tool in tools}
    normalized = [r for r in done if "ours_normalized" in r]
    lines = ["# Engine generality: torchvision classifiers at 50 % channel sparsity", "",
             f"Random init, {meta['size']}x{meta['size']}, batch 1, uniform sparsity {meta['sparsity']} per group (L1 "
             "importance), the final classifier kept; Torch-Pruning "
             f"{meta['torch_pruning']} `MagnitudePruner(pruning_ratio={meta['sparsity']})` beside it. A cell reads "
             "`status MACs kept (hook counter) / MACs kept (FlopCounterMode), max |pruned - zeroed| logit "
             "difference, seconds to trace + score + build`. ok: the pruned model equals the source with the removed "
             "channels zeroed (tolerance 1e-4 x (1 + max |logit|)); wrong: it does not; differs: it does not, and "
             "the tool pruned channels that a LayerNorm normalises (their statistics change when one goes, so no "
             "zeroed reference exists; we keep those channels); refused: `UnsupportedModelError` (message in the "
             "json); error: an exception (message in the json). Torch-Pruning's zeroed reference uses the groups "
             "it prunes, collected on an unpruned copy. Ours prunes attention heads as groups (ViT, Swin, MaxViT) and "
             "keeps the LayerNorm-ed embedding width whole; both MACs columns include the "
             "attention products. The column `ours, prune_normalized` (run for the models with LayerNorm-ed channels) "
             "is `Pruner(prune_normalized=True)`: the embedding width is one more group, and ok means equal to the "
             "zeroed source whose LayerNorms take their statistics over the kept channels (`zeroed_copy`).", "",
             f"**Counts over {len(done)} models:** ours " + ", ".join(f"{v} {k}" for k, v in count["ours"].items())
             + "; Torch-Pruning " + ", ".join(f"{v} {k}" for k, v in count["torch_pruning"].items())
             + f"; ours with prune_normalized (over {len(normalized)} models) "
             + ", ".join(f"{v} {k}" for k, v in count["ours_normalized"].items()) + ".", "",
             "| model | params (M) | ours | Torch-Pruning | ours, prune_normalized |", "|---|---:|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | skipped: {r['skipped']} | | |")
        else:
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | {_cell(r.get('ours'))} | "
                         f"{_cell(r.get('torch_pruning'))} | {_cell(r.get('ours_normalized'))} |")
    refused = [r for r in done if r.get("ours", {}).get("status") == "refused"]
    if refused:
        lines += ["", "Refusals (ours):", ""]
        lines += [f"- {r['model']}: {r['ours']['message'][:240]}" for r in refused]
    lines += ["", f"Command (the last invocation; the run is resumable, so rows may come from several): "
                  f"`{meta['command']}`", f"Machine: {meta['machine']}"]
    return "\n".join(lines) + "\n"


def run_worker(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """One model in a fresh process (memory capped, nothing left over from the previous model)."""
    cmd = [sys.executable, __file__, "--worker", name, "--size", str(args.size), "--sparsity", str(args.sparsity),
           "--max-params", str(args.max_params), "--max-memory-gb", str(args.max_memory_gb),
           "--timeout", str(args.timeout), "--threads", str(args.threads)]
    if args.no_torch_pruning:
        cmd.append("--no-torch-pruning")
    if args.prune_normalized:
        cmd.append("--prune-normalized")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3 * args.timeout + 120)
    except subprocess.TimeoutExpired:
        return {"model": name, "params": 0, "skipped": f"the worker ran past {3 * args.timeout + 120} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"model": name, "params": 0,
                "skipped": f"the worker died (exit {done.returncode}): {done.stderr.strip()[-200:]}"}
    return json.loads(lines[-1])


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        cap = int(args.max_memory_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        signal.signal(signal.SIGALRM, _timed_out)
        print(json.dumps(bench_model(args.worker, args)))
        return []
    out = Path(args.out)
    path = out / "bench_generality.json"
    rows: List[Dict[str, Any]] = json.loads(path.read_text())["rows"] if path.is_file() else []
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    by_name = {r["model"]: r for r in rows}

    def redo(row: Dict[str, Any]) -> bool:
        if args.prune_normalized and "skipped" not in row and "ours_normalized" not in row:
            return True
        return args.retry and "skipped" not in row and any(
            row.get(tool, {}).get("status") not in ("ok", None)
            for tool in ("ours", "torch_pruning", "ours_normalized"))

    todo = [n for n in names if args.models or n not in by_name or redo(by_name[n])]
    try:
        import torch_pruning
        tp_version = torch_pruning.__version__
    except ImportError:
        tp_version, args.no_torch_pruning = "not installed", True
    meta = {"size": args.size, "sparsity": args.sparsity, "torch_pruning": tp_version,
            "torchvision": torchvision.__version__, "machine": machine_info(args.threads),
            "command": "python benchmarks/bench_generality.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write: Callable[[], None] = lambda: (  # noqa: E731 - written after every model, so a run can be resumed
        atomic_write_text(json.dumps({"meta": meta, "rows": rows}, indent=2), path),
        atomic_write_text(to_markdown(rows, meta), out / "bench_generality.md"))
    for name in tqdm(todo, desc="models"):
        row = run_worker(name, args)
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
