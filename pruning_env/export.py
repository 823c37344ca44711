"""Export a (pruned) model to TorchScript or ONNX for deployment, and check that the file on disk computes the
same outputs as the module: used by ``train_agent.py`` (pruned_model.ts) and ``evaluate.py --export``.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from pruning_env.runtime import PathLike, atomic_path
from pruning_env.training import model_logits

#: default tolerance of the output checks (float32 kernels of different runtimes differ by ~1e-6)
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
EXPORT_HINT = 'pip install -e ".[export]"'


@contextmanager
def quiet_jit() -> Iterator[None]:
    """Silence the FutureWarning that torch 2.9+ gives on every ``torch.jit.*`` call, inside this block only:
    TorchScript is still the one deployment format that needs nothing but torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`?torch\.jit\.", category=FutureWarning)
        yield


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().eval()


def _as_tensor(output: object) -> torch.Tensor:
    out = model_logits(output)
    return (out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))).float()


@torch.no_grad()
def _diff_and_scale(module: nn.Module, exported: Callable[[torch.Tensor], object],
                    example: torch.Tensor) -> Tuple[float, float]:
    """(max abs logit difference, max abs reference logit) of ``exported`` vs ``module`` (eval, CPU)."""
    ref = _as_tensor(module(example))
    out = _as_tensor(exported(example))
    if out.shape != ref.shape:
        raise RuntimeError(f"the exported model returns shape {tuple(out.shape)}, the module {tuple(ref.shape)}")
    return float((ref - out).abs().max().item()), float(ref.abs().max().item())


def max_abs_diff(model: nn.Module, exported: Callable[[torch.Tensor], object], example: torch.Tensor) -> float:
    """Largest absolute difference between the logits of ``model`` and of ``exported`` on ``example`` (CPU).

    :param model: the reference module (run in eval mode on a CPU copy).
    :param exported: anything callable on a tensor (a TorchScript module, :func:`onnx_session`).
    :param example: an input batch.
    """
    return _diff_and_scale(_cpu_eval_copy(model), exported, example.detach().cpu())[0]


def _check(module: nn.Module, exported: Callable[[torch.Tensor], object], example: torch.Tensor, atol: float,
           rtol: float, what: str) -> float:
    """Max abs logit difference; raises unless it is within ``atol + rtol * max|logit|`` (allclose-like)."""
    diff, scale = _diff_and_scale(module, exported, example)
    if not diff <= atol + rtol * scale:  # also catches NaN
        raise RuntimeError(f"{what} outputs differ from the module's by {diff:.3g} (> atol {atol:g} + rtol {rtol:g}"
                           f" x max|logit| {scale:.3g}); the export is not faithful, so it was not kept")
    return diff


def export_torchscript(model: nn.Module, example: torch.Tensor, path: PathLike, atol: float = DEFAULT_ATOL,
                       rtol: float = DEFAULT_RTOL) -> str:
    """Script (or, failing that, trace) ``model``, save it atomically and check the saved file's outputs.

    :param model: the module to export (a CPU copy is exported; the module itself is not touched).
    :param example: an input batch, used for tracing and for the output check.
    :param path: destination ``.ts`` file (loadable with ``torch.jit.load``, no project code needed).
    :param atol: accepted absolute difference of the logits ...
    :param rtol: ... plus this fraction of the largest absolute logit (as ``torch.allclose``).
    :return: ``"script"`` or ``"trace"``, the method that worked.
    """
    module = _cpu_eval_copy(model)
    example = example.detach().cpu()
    with quiet_jit():
        try:
            scripted, method = torch.jit.script(module), "script"
        except Exception:  # data-dependent Python in forward: tracing is exact for these static CNNs
            scripted, method = torch.jit.trace(module, example), "trace"
        with atomic_path(path, ".ts") as tmp:
            torch.jit.save(scripted, str(tmp))
            # check the bytes on disk, not the in-memory object: that is what a user deploys
            reloaded = torch.jit.load(str(tmp), map_location="cpu")
            _check(module, reloaded, example, atol, rtol, f"TorchScript ({method})")
    return method


def _require_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)} (not installed); install the optional "
                          f"dependencies with: {EXPORT_HINT}")


def onnx_session(path: PathLike) -> Callable[[torch.Tensor], np.ndarray]:
    """An onnxruntime CPU session on ``path`` as a callable ``batch -> logits`` (numpy)."""
    _require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ort warns about unused initializers of optimised graphs
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {input_name: x.detach().cpu().numpy().astype(np.float32)})[0]

    return run


@dataclass(frozen=True)
class OnnxExport:
    """Outcome of :func:`export_onnx`."""

    max_abs_diff: float  #: largest absolute logit difference, onnxruntime vs the module
    exporter: str  #: ``"dynamo"`` (torch.export + onnxscript) or ``"legacy"`` (TorchScript-based)


def export_onnx(model: nn.Module, example: torch.Tensor, path: PathLike, atol: float = DEFAULT_ATOL,
                rtol: float = DEFAULT_RTOL, opset: Optional[int] = None) -> OnnxExport:
    """Export ``model`` to ONNX with a dynamic batch dimension and check it with onnxruntime.

    Uses torch's dynamo-based exporter (onnxscript) and falls back to the legacy TorchScript-based one when
    that fails. The check runs the saved file on ``example`` and on its first item (a different batch size).

    :param model: the module to export (a CPU copy is exported).
    :param example: an input batch of at least 2 items (a batch of 1 would be specialised by torch.export).
    :param path: destination ``.onnx`` file, input ``input`` (N, C, H, W), output ``logits``.
    :param atol: accepted absolute difference of the logits ...
    :param rtol: ... plus this fraction of the largest absolute logit (as ``torch.allclose``).
    :param opset: ONNX opset (None: the exporter's default).
    :return: the largest absolute logit difference and the exporter that was used.
    """
    _require_onnx()
    module = _cpu_eval_copy(model)
    example = example.detach().cpu()
    if example.shape[0] < 2:
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    names = dict(input_names=["input"], output_names=["logits"])
    with atomic_path(path, ".onnx") as tmp:
        try:
            # one self-contained file (weights inline, fine below ONNX's 2 GB limit): a side-car .data file
            # would keep the temporary name after the atomic rename
            torch.onnx.export(module, (example,), str(tmp), dynamo=True, verbose=False, opset_version=opset,
                              external_data=False, dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
            used = "dynamo"
        except Exception as err:  # constructs torch.export cannot capture; the legacy exporter traces them
            with warnings.catch_warnings(), quiet_jit():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                try:
                    torch.onnx.export(module, (example,), str(tmp), dynamo=False, opset_version=opset,
                                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **names)
                except Exception as legacy_err:
                    raise RuntimeError(f"ONNX export failed with the dynamo exporter ({err}) and with the "
                                       f"legacy one ({legacy_err})") from legacy_err
            used = "legacy"
        run = onnx_session(tmp)
        what = f"ONNX ({used} exporter, onnxruntime)"
        diff = max(_check(module, run, example, atol, rtol, what), _check(module, run, example[:1], atol, rtol, what))
    return OnnxExport(max_abs_diff=diff, exporter=used)


__all__ = ["export_torchscript", "export_onnx", "OnnxExport", "onnx_session", "max_abs_diff", "quiet_jit",
           "DEFAULT_ATOL", "DEFAULT_RTOL", "EXPORT_HINT"]
