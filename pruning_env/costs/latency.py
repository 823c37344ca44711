"""Latency cost model: the measured latency of a pruned model on one device setting, predicted from its kept counts.

Every op of the model's forward (conv, linear, norm, activation, pooling, add, ...) gets a table of its latency on a
grid of the channel widths it depends on, measured in place inside replayed forward passes on the target device and
interpolated; ``LatencyModel.predict(keep)`` sums the tables (no model is built). Tables are cached on disk per
device, torch version, architecture and setting (see ``docs/latency.md``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import timeit
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils.benchmark import Timer
from tqdm.auto import tqdm

from pruning_env.runtime import atomic_write_text, machine_info

if TYPE_CHECKING:  # the engine imports the cost package; importing it back at run time would be a cycle
    from pruning_env.pruning.pruner import Pruner, PrunePlan

__all__ = ["LatencySetting", "LatencyModel", "measure_latency", "measure_latency_rounds", "default_cache_dir", "interpolate_table",
           "DEFAULT_GRID", "CLOCKS"]

#: Fractions of a width at which each op is measured (the narrowest width, one channel or block, is always added:
#: 11 points, a prime, so that one round of passes covers every pair of points of two groups once).
DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: Clocks a measurement may read: ``"thread"`` is the CPU time of the calling thread (immune to the time other
#: processes take on a shared machine; equal to the wall time of single-threaded CPU work), ``"wall"`` the wall time
#: (CUDA work is synchronised), ``"auto"`` picks ``"thread"`` for one CPU thread and ``"wall"`` otherwise.
CLOCKS = ("auto", "thread", "wall")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FORMAT = 1  # version of the cached table layout; a new layout is a different cache key


# --------------------------------------------------------------------------------------------------------------
# The device setting
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencySetting:
    """Where and how a model is timed: a different setting is a different latency table.

    :param device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``.
    :param threads: torch intra-op threads on CPU (at least 1, at most the machine's cores); on CUDA the host
        threads the timing runs with.
    :param batch_size: images per forward pass.
    :param dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (weights and activations).
    :param channels_last: run 4-D tensors in ``torch.channels_last`` memory format.
    """

    device: str = "cpu"
    threads: int = 1
    batch_size: int = 1
    dtype: str = "float32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        dev = str(self.device)
        try:
            parsed = torch.device(dev)
        except RuntimeError as e:
            raise ValueError(f"latency setting device={dev!r} is not a device; use 'cpu' or 'cuda[:N]'") from e
        if parsed.type not in ("cpu", "cuda"):
            raise ValueError(f"latency setting device={dev!r}: only 'cpu' and 'cuda[:N]' can be measured")
        object.__setattr__(self, "device", dev)
        for name in ("threads", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
                raise ValueError(f"latency setting {name} must be an integer >= 1, got {value!r}")
            object.__setattr__(self, name, int(value))
        cores = os.cpu_count() or 1
        if parsed.type == "cpu" and self.threads > cores:
            raise ValueError(f"latency setting threads={self.threads} exceeds the {cores} CPU cores of this machine "
                             f"(timings would measure oversubscription); use threads <= {cores}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"latency setting dtype={self.dtype!r} is not supported; choose from {list(_DTYPES)}")
        if not isinstance(self.channels_last, (bool, np.bool_)):
            raise ValueError(f"latency setting channels_last must be true or false, got {self.channels_last!r}")
        object.__setattr__(self, "channels_last", bool(self.channels_last))

    @property
    def torch_device(self) -> torch.device:
        """The device, checked to be present (an unavailable CUDA request is an error)."""
        dev = torch.device(self.device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"latency setting device={self.device!r} cannot be measured: CUDA is not available "
                                   f"on this machine; use device='cpu'")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise RuntimeError(f"latency setting device={self.device!r} cannot be measured: this machine has "
                                   f"{torch.cuda.device_count()} CUDA device(s)")
        return dev

    @property
    def torch_dtype(self) -> torch.dtype:
        """The floating-point dtype of weights and activations."""
        return _DTYPES[self.dtype]

    @property
    def memory_format(self) -> torch.memory_format:
        """``torch.channels_last`` or ``torch.contiguous_format``."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def tag(self) -> str:
        """Short readable name, e.g. ``cpu-t1-b64-float32`` (``-cl`` for channels_last)."""
        dev = self.device.replace(":", "")
        threads = f"-t{self.threads}" if dev == "cpu" else ""
        return f"{dev}{threads}-b{self.batch_size}-{self.dtype}" + ("-cl" if self.channels_last else "")

    def resolve_clock(self, clock: str = "auto") -> str:
        """The clock a measurement in this setting reads (see :data:`CLOCKS`).

        :param clock: ``"auto"``, ``"thread"`` or ``"wall"``.
        """
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
        single_cpu = torch.device(self.device).type == "cpu" and self.threads == 1
        if clock == "auto":
            return "thread" if single_cpu else "wall"
        if clock == "thread" and not single_cpu:
            raise ValueError(f"clock='thread' reads the CPU time of one thread, which is the latency only on CPU with "
                             f"threads=1 (setting {self.tag}); use clock='wall'")
        return clock

    def device_name(self) -> str:
        """The hardware a table was measured on (CPU model, or CUDA device name and capability)."""
        dev = self.torch_device
        if dev.type == "cuda":
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
        info = machine_info(self.threads)
        return f"{info['cpu']} ({info['cpu_count']} cores)"


def default_cache_dir() -> Path:
    """Where latency tables are cached: ``$XDG_CACHE_HOME/rl-prune/latency`` (``~/.cache/rl-prune/latency``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rl-prune" / "latency"


# --------------------------------------------------------------------------------------------------------------
# Measuring built models (Timer, interleaved rounds, medians)
# --------------------------------------------------------------------------------------------------------------
class _ThreadState:
    """Sets torch's intra-op threads for a block and restores them."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.threads)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.saved)


def _prepare(model: nn.Module, setting: LatencySetting) -> nn.Module:
    """``model`` in eval mode on the setting's device, dtype and memory format (a copy when anything changes)."""
    first = next(iter(model.parameters()), None)
    same = (first is None or (first.device == setting.torch_device and first.dtype == setting.torch_dtype)) \
        and not setting.channels_last
    runner = model if same else copy.deepcopy(model).to(device=setting.torch_device, dtype=setting.torch_dtype,
                                                         memory_format=setting.memory_format)
    return runner


class _ModelTimers:
    """One ``torch.utils.benchmark.Timer`` per model (eval mode, on the setting's device, dtype and memory format);
    :meth:`round` times each model once, in a random order."""

    def __init__(self, models: Sequence[nn.Module], input_size: Sequence[int], setting: LatencySetting, clock: str,
                 min_block_s: float, seed: int, warmup: int = 0) -> None:
        device = setting.torch_device
        timer_fn = time.thread_time if clock == "thread" else (_cuda_wall if device.type == "cuda"
                                                                else timeit.default_timer)
        self.rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(setting.batch_size, *input_size, generator=gen).to(device=device, dtype=setting.torch_dtype,
                                                                           memory_format=setting.memory_format)
        self.models = list(models)
        self.flags = [m.training for m in self.models]
        runners = [_prepare(m, setting).eval() for m in self.models]
        self.timers = [Timer("m(x)", globals={"m": m, "x": x}, num_threads=setting.threads, timer=timer_fn)
                       for m in runners]
        with torch.inference_mode():  # block sizes, from a warmed-up single call (after `warmup` untimed calls)
            for t in self.timers:
                if warmup > 0:
                    t.timeit(int(warmup))
            singles = [t.timeit(1).mean for t in self.timers]
        self.numbers = [max(1, int(math.ceil(min_block_s / max(t, 1e-9)))) for t in singles]

    @torch.inference_mode()
    def round(self, bar: Optional[Any] = None) -> np.ndarray:
        out = np.zeros(len(self.timers))
        for i in self.rng.permutation(len(self.timers)):
            out[i] = self.timers[i].timeit(self.numbers[i]).mean
            if bar is not None:
                bar.update()
        return out

    def close(self) -> None:
        for m, flag in zip(self.models, self.flags):
            m.train(flag)
        self.timers = []


def measure_latency(models: Sequence[nn.Module], input_size: Sequence[int], setting: LatencySetting,
                    rounds: int = 10, clock: str = "auto", min_block_s: float = 0.02, seed: int = 0,
                    progress: bool = True, desc: str = "latency", warmup: int = 0) -> np.ndarray:
    """Median seconds per forward pass of each model in one setting, measured with ``torch.utils.benchmark.Timer``.

    Rounds are interleaved: every round times each model once (a warmed-up block of calls), in a fresh random order,
    so a burst of load on a shared machine lands on all models alike instead of biasing one; the median over rounds
    is reported. Models run in eval mode under ``torch.inference_mode`` (a copy moves to the setting's device, dtype
    and memory format when they differ; the originals are not changed).

    :param models: the models to time.
    :param input_size: ``(C, H, W)`` of one input.
    :param setting: device, threads, batch size, dtype, memory format.
    :param rounds: timed blocks per model (the median is taken).
    :param clock: ``"auto"``, ``"thread"`` or ``"wall"`` (see :data:`CLOCKS`).
    :param min_block_s: shortest timed block; fast models repeat their forward pass within a block.
    :param seed: seeds the round orders and the random input.
    :param progress: show a progress bar.
    :param desc: label of the progress bar.
    :param warmup: untimed forward passes of each model before the first round (``Timer`` also warms up every
        block with a few calls of its own).
    :return: median seconds per forward pass, shape ``(len(models),)``.
    """
    return np.median(measure_latency_rounds(models, input_size, setting, rounds, clock, min_block_s, seed, progress,
                                            desc, warmup), axis=0)


def measure_latency_rounds(models: Sequence[nn.Module], input_size: Sequence[int], setting: LatencySetting,
                           rounds: int = 10, clock: str = "auto", min_block_s: float = 0.02, seed: int = 0,
                           progress: bool = True, desc: str = "latency", warmup: int = 0) -> np.ndarray:
    """Seconds per forward pass of each model in every interleaved round of :func:`measure_latency` (its median
    over rounds is :func:`measure_latency`; other statistics, such as a p90, come from these samples).

    The parameters are :func:`measure_latency`'s.

    :return: shape ``(rounds, len(models))``: row r is round r's block mean of each model.
    """
    if int(rounds) < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if int(warmup) < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    timers = _ModelTimers(models, input_size, setting, setting.resolve_clock(clock), min_block_s, seed, int(warmup))
    try:
        with tqdm(total=int(rounds) * len(models), desc=desc, disable=not progress, leave=False,
                  dynamic_ncols=True) as bar:
            return np.stack([timers.round(bar) for _ in range(int(rounds))])
    finally:
        timers.close()


def _cuda_wall() -> float:
    torch.cuda.synchronize()
    return timeit.default_timer()


# --------------------------------------------------------------------------------------------------------------
# Recording the ops of a forward pass
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TensorLeaf:
    """A tensor argument of a recorded op: its dims are int slots ``first .. first + ndim``."""

    first: int
    ndim: int
    kind: str  # "float", "int", "bool"
    channels_last: bool
    param: bool  # a parameter or buffer of the model (persists across calls), not an activation


class _Op:
    """One recorded call: the function, its argument skeleton, and the ints (sizes, int args) it was called with."""

    def __init__(self, func: Callable, skeleton: Any, ints: List[int], tensors: List[_TensorLeaf],
                 first_arg_slots: int) -> None:
        self.func = func
        self.skeleton = skeleton
        self.ints = ints
        self.tensors = tensors
        self.first_arg_slots = first_arg_slots  # slots [0, first_arg_slots) belong to the first argument

    @property
    def name(self) -> str:
        return _func_name(self.func)


def _func_name(func: Callable) -> str:
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None) or ""
    return f"{module}.{qual}".lstrip(".")


class _Flattener:
    """Splits call arguments into a hashable skeleton plus a list of ints (every int argument and tensor dim)."""

    def __init__(self, param_ids: set) -> None:
        self.param_ids = param_ids
        self.ints: List[int] = []
        self.tensors: List[_TensorLeaf] = []

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            first = len(self.ints)
            self.ints.extend(int(s) for s in obj.shape)
            if obj.is_floating_point():
                kind = "float"
            elif obj.dtype == torch.bool:
                kind = "bool"
            else:
                kind = "int"
            cl = obj.dim() == 4 and not obj.is_contiguous() and obj.is_contiguous(memory_format=torch.channels_last)
            self.tensors.append(_TensorLeaf(first, obj.dim(), kind, bool(cl), id(obj) in self.param_ids))
            return ("T", len(self.tensors) - 1)
        if isinstance(obj, bool) or obj is None or isinstance(obj, (str, torch.dtype, torch.memory_format)):
            return ("C", obj)
        if isinstance(obj, (int, np.integer)):
            self.ints.append(int(obj))
            return ("I", len(self.ints) - 1)
        if isinstance(obj, float):
            return ("F", obj)  # a float never decides a cost here (dropout p, eps, momentum)
        if isinstance(obj, torch.device):
            return ("V",)  # replaced by the measured device
        if isinstance(obj, slice):
            return ("S", self(obj.start), self(obj.stop), self(obj.step))
        if isinstance(obj, (list, tuple)):
            kind = "L" if isinstance(obj, list) else "U"
            return (kind, tuple(self(o) for o in obj))
        if isinstance(obj, dict):
            return ("D", tuple(obj.keys()), tuple(self(v) for v in obj.values()))
        if obj is Ellipsis:
            return ("E",)
        raise TypeError(f"cannot replay an argument of type {type(obj).__name__}")


def _same_skeleton(a: Any, b: Any) -> bool:
    """Equal skeletons, ignoring float constants (they never decide a cost)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        if len(a) != len(b) or (a and b and a[0] != b[0]):
            return False
        if a and a[0] == "F":
            return True
        return all(_same_skeleton(x, y) for x, y in zip(a, b))
    return a == b


#: Functions whose output has their first argument's shape and layout (recorded without running them on meta).
_SHAPE_PRESERVING = {torch.nn.functional.batch_norm}


class _OpRecorder(TorchFunctionMode):
    """Records every torch function call of a forward pass (nested calls run with the mode disabled)."""

    def __init__(self, param_ids: set) -> None:
        super().__init__()
        self.param_ids = param_ids
        self.ops: List[_Op] = []
        self.failure: Optional[str] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = _Flattener(self.param_ids)
        try:
            first = flat(args[0]) if args else None
            n_first = len(flat.ints)
            skeleton = (first, tuple(flat(a) for a in args[1:]), tuple(kwargs.keys()),
                        tuple(flat(v) for v in kwargs.values()))
            self.ops.append(_Op(func, skeleton, flat.ints, flat.tensors, n_first))
        except TypeError as e:
            self.failure = self.failure or f"{_func_name(func)}: {e}"
        if func in _SHAPE_PRESERVING and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return torch.empty_like(args[0])  # meta batch_norm runs a slow Python decomposition for a known shape
        return func(*args, **kwargs)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (no tensor data is copied)."""
    memo: Dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _record(meta_model: nn.Module, input_shape: Sequence[int], memory_format: torch.memory_format) -> List[_Op]:
    """The ops of one eval-mode forward pass of ``meta_model`` (on the meta device: shapes only, no compute) on an
    input of ``input_shape``."""
    model = meta_model.eval()
    if memory_format == torch.channels_last:
        model = model.to(memory_format=torch.channels_last)
    param_ids = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    x = torch.empty(*input_shape, device="meta")
    if memory_format == torch.channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    recorder = _OpRecorder(param_ids)
    try:
        with torch.inference_mode(), recorder:
            model(x)
    except Exception as e:  # data-dependent ops (.item(), nonzero) cannot run on meta tensors
        raise _unsupported(f"the latency model records the forward pass on shapes only (meta tensors) and "
                           f"{type(meta_model).__name__}'s forward failed there: {e}") from e
    if recorder.failure:
        raise _unsupported(f"the latency model cannot replay the op {recorder.failure}")
    return recorder.ops


def _unsupported(message: str) -> Exception:
    from pruning_env.pruning.graph import UnsupportedModelError

    return UnsupportedModelError(message)


# --------------------------------------------------------------------------------------------------------------
# Ops as functions of the group widths
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _OpModel:
    """One op with its ints as affine functions ``c + V @ k`` of the group widths and its table axes.

    An axis is a set of groups scaled together, with a weight per group: axis ``A`` holds the groups of the op's first
    argument (its input), axis ``B`` the other groups (a conv's output channels); an op's table is measured at the
    axis coordinates ``u = w . k`` of its grid points.
    """

    op: _Op
    const: np.ndarray  # (n_slots,)
    coef: np.ndarray  # (n_slots, n_groups)
    axes: Tuple[Dict[int, float], ...]  # up to two {group: weight}

    def ints_at(self, k: np.ndarray) -> List[int]:
        return [int(v) for v in np.rint(self.const + self.coef @ k)]


def _fit_ops(pruner: "Pruner", input_shape: Sequence[int], memory_format: torch.memory_format, seed: int = 0
             ) -> List[_OpModel]:
    """Record the ops of the model and of pruned copies (each group narrowed in turn) and read off how every int of
    every op (tensor sizes, int arguments) depends on the group widths; a random pruned copy checks the fit
    exactly. Everything runs on the meta device (shapes only)."""
    from pruning_env.pruning.pruner import PrunePlan

    full = pruner.num_channels.astype(np.int64)
    gran = pruner.granularity.astype(np.int64)
    n = len(full)

    # the pruned copies are built from a meta copy of the model: shapes only, no weight is sliced or copied
    meta = _meta_copy(pruner.model)
    meta_pruner = type(pruner)(meta, pruner.example_input, ignore=pruner.ignore, min_channels=pruner.min_channels,
                               prune_normalized=pruner.prune_normalized, graph=pruner.graph.derive(meta, full),
                               costs=pruner.costs)

    def build(counts: np.ndarray) -> nn.Module:
        return meta_pruner.apply(PrunePlan.from_indices([range(int(c)) for c in counts]))

    base = _record(meta, input_shape, memory_format)
    base_ints = [np.asarray(op.ints, dtype=np.float64) for op in base]
    coefs = [np.zeros((len(op.ints), n)) for op in base]

    def record_like_base(counts: np.ndarray, what: str) -> List[_Op]:
        ops = _record(build(counts), input_shape, memory_format)
        if len(ops) != len(base) or any(
                o.func != b.func or len(o.ints) != len(b.ints) or o.first_arg_slots != b.first_arg_slots
                or [(t.first, t.ndim, t.kind, t.param) for t in o.tensors]
                != [(t.first, t.ndim, t.kind, t.param) for t in b.tensors]
                or not _same_skeleton(o.skeleton, b.skeleton)
                for o, b in zip(ops, base)):
            raise _unsupported(f"the forward pass of {type(pruner.model).__name__} runs different ops once {what} is "
                               f"narrowed; the latency model needs the same ops at every width")
        return ops

    for g in range(n):
        if full[g] <= gran[g]:
            continue  # cannot be narrowed: its width never changes
        counts = full.copy()
        blocks = full[g] // gran[g]
        counts[g] = (blocks - max(1, blocks // 2)) * gran[g]
        for i, op in enumerate(record_like_base(counts, f"group {pruner.groups[g].name!r}")):
            coefs[i][:, g] = (np.asarray(op.ints, dtype=np.float64) - base_ints[i]) / float(counts[g] - full[g])
    # check: a random narrowing of every group at once must give exactly the predicted ints
    rng = np.random.default_rng(seed)
    check = np.maximum(gran, (np.floor(rng.uniform(0.2, 1.0, n) * full / gran)).astype(np.int64) * gran)
    models = []
    for i, op in enumerate(record_like_base(check, "every group")):
        const = base_ints[i] - coefs[i] @ full
        if np.any(np.abs(const + coefs[i] @ check - np.asarray(op.ints)) > 1e-6):
            raise _unsupported(f"op #{i} ({op.name}) has a size that is not an affine function of the group widths; "
                               f"the latency model cannot interpolate it")
        models.append(_OpModel(base[i], const, coefs[i], _axes(base[i], coefs[i])))
    return models


def _axes(op: _Op, coef: np.ndarray) -> Tuple[Dict[int, float], ...]:
    """Axis A: groups of the op's first argument (weight = summed |coefficient| over its slots); axis B: the rest."""
    first = np.abs(coef[:op.first_arg_slots]).sum(0)
    rest = np.abs(coef[op.first_arg_slots:]).sum(0)
    a = {int(g): float(first[g]) for g in np.flatnonzero(first)}
    b = {int(g): float(rest[g]) for g in np.flatnonzero(rest) if g not in a}
    return tuple(ax for ax in (a, b) if ax)


# --------------------------------------------------------------------------------------------------------------
# Tables: grids, interpolation
# --------------------------------------------------------------------------------------------------------------
def _axis_points(axis: Dict[int, float], full: np.ndarray, gran: np.ndarray, grid: Sequence[float]
                 ) -> Tuple[np.ndarray, List[Dict[int, int]]]:
    """Grid of one axis: realised coordinates (sorted, unique) and the group widths of each point."""
    points: Dict[float, Dict[int, int]] = {}
    for f in (0.0, *grid, 1.0):  # 0.0: the narrowest point (one block per group); 1.0: the full width
        widths = {g: int(max(gran[g], min(full[g], round(f * full[g] / gran[g]) * gran[g]))) for g in axis}
        u = float(sum(w * widths[g] for g, w in axis.items()))
        points.setdefault(u, widths)
    coords = np.array(sorted(points))
    return coords, [points[u] for u in coords]


def interpolate_table(grid_a: np.ndarray, grid_b: np.ndarray, table: np.ndarray, u_a: np.ndarray, u_b: np.ndarray
                      ) -> np.ndarray:
    """Bilinear interpolation of ``table[i, j]`` (measured at ``grid_a[i], grid_b[j]``) at coordinates ``(u_a, u_b)``.

    Exact at grid points, linear between neighbours (so between two grid values), clamped outside the grid; an axis
    with one point is constant.

    :param grid_a: increasing coordinates of the first axis, shape ``(na,)``.
    :param grid_b: increasing coordinates of the second axis, shape ``(nb,)``.
    :param table: values, shape ``(na, nb)``.
    :param u_a: query coordinates of the first axis (any shape).
    :param u_b: query coordinates of the second axis (same shape).
    """
    def locate(grid: np.ndarray, u: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if len(grid) == 1:
            return np.zeros(u.shape, dtype=np.int64), np.zeros(u.shape)
        i = np.clip(np.searchsorted(grid, u, side="right") - 1, 0, len(grid) - 2)
        t = np.clip((u - grid[i]) / (grid[i + 1] - grid[i]), 0.0, 1.0)
        return i, t

    u_a, u_b = np.asarray(u_a, dtype=np.float64), np.asarray(u_b, dtype=np.float64)
    ia, ta = locate(np.asarray(grid_a, dtype=np.float64), u_a)
    ib, tb = locate(np.asarray(grid_b, dtype=np.float64), u_b)
    table = np.asarray(table, dtype=np.float64)
    ja = np.minimum(ia + 1, table.shape[0] - 1)
    jb = np.minimum(ib + 1, table.shape[1] - 1)
    return ((1 - ta) * (1 - tb) * table[ia, ib] + ta * (1 - tb) * table[ja, ib]
            + (1 - ta) * tb * table[ia, jb] + ta * tb * table[ja, jb])


# --------------------------------------------------------------------------------------------------------------
# Measuring the tables: replayed forward passes, every op timed in place
# --------------------------------------------------------------------------------------------------------------
class _Replay:
    """Materialises one op's arguments at given ints and calls it."""

    def __init__(self, model: _OpModel, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype

    def tensor(self, leaf: _TensorLeaf, ints: List[int]) -> torch.Tensor:
        shape = ints[leaf.first:leaf.first + leaf.ndim]
        if leaf.kind == "float":  # ones: finite through any op chain replayed in place (no denormals, no NaN)
            t = torch.ones(shape, device=self.device, dtype=self.dtype)
        elif leaf.kind == "bool":
            t = torch.ones(shape, device=self.device, dtype=torch.bool)
        else:
            t = torch.zeros(shape, device=self.device, dtype=torch.long)
        return t.to(memory_format=torch.channels_last) if leaf.channels_last else t

    def build(self, skel: Any, ints: List[int], tensors: Dict[int, torch.Tensor]) -> Any:
        tag = skel[0]
        if tag == "T":
            return tensors[skel[1]]
        if tag == "I":
            return ints[skel[1]]
        if tag in ("C", "F"):
            return skel[1]
        if tag == "V":
            return self.device
        if tag == "S":
            return slice(*(self.build(s, ints, tensors) for s in skel[1:]))
        if tag == "L":
            return [self.build(s, ints, tensors) for s in skel[1]]
        if tag == "U":
            return tuple(self.build(s, ints, tensors) for s in skel[1])
        if tag == "D":
            return dict(zip(skel[1], (self.build(s, ints, tensors) for s in skel[2])))
        if tag == "E":
            return Ellipsis
        raise AssertionError(f"unknown skeleton tag {tag!r}")

    def arguments(self, ints: List[int], tensors: Dict[int, torch.Tensor]) -> Tuple[tuple, dict]:
        first, rest, keys, values = self.model.op.skeleton
        args = (() if first is None else (self.build(first, ints, tensors),)) + tuple(
            self.build(s, ints, tensors) for s in rest)
        return args, dict(zip(keys, (self.build(v, ints, tensors) for v in values)))


def _clock_ns(clock: str) -> Callable[[], int]:
    return time.thread_time_ns if clock == "thread" else time.perf_counter_ns


def _clock_overhead_ns(clock_ns: Callable[[], int]) -> float:
    samples = []
    for _ in range(2000):
        t0 = clock_ns()
        t1 = clock_ns()
        samples.append(t1 - t0)
    return float(np.median(samples))


@dataclass
class _OpTable:
    """The latency table of one op (seconds), as stored."""

    name: str
    axes: Tuple[Dict[int, float], ...]
    grid_a: np.ndarray
    grid_b: np.ndarray
    table: np.ndarray

    def to_json(self) -> Dict[str, Any]:
        return {"op": self.name, "axes": [{str(g): w for g, w in ax.items()} for ax in self.axes],
                "grid_a": self.grid_a.tolist(), "grid_b": self.grid_b.tolist(), "table": self.table.tolist()}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "_OpTable":
        return cls(d["op"], tuple({int(g): float(w) for g, w in ax.items()} for ax in d["axes"]),
                   np.asarray(d["grid_a"], dtype=np.float64), np.asarray(d["grid_b"], dtype=np.float64),
                   np.asarray(d["table"], dtype=np.float64))


def _smallest_prime(n: int) -> int:
    m = max(2, n)
    while any(m % d == 0 for d in range(2, int(m ** 0.5) + 1)):
        m += 1
    return m


def _pass_design(ops: List[_OpModel], n_groups: int, m: int, rng: np.random.Generator
                 ) -> Tuple[np.ndarray, np.ndarray, List[bool]]:
    """Per group a direction ``(a, b)`` over GF(m) and an offset, so that pass ``(q, r)`` sets group ``g`` to residue
    ``a q + b r + o (mod m)``: any two groups with different directions then meet at every pair of residues exactly
    once in ``m**2`` passes. Groups that share a two-axis op get different directions (greedy colouring of the
    projective line's ``m + 1`` directions); an op whose two groups could not be told apart is marked to follow a
    schedule of its own.
    """
    pairs: Dict[int, set] = {g: set() for g in range(n_groups)}
    for op in ops:
        if len(op.axes) == 2 and len(op.axes[0]) == 1 and len(op.axes[1]) == 1:
            (ga,), (gb,) = op.axes[0], op.axes[1]
            pairs[ga].add(gb)
            pairs[gb].add(ga)
    colour = np.full(n_groups, -1, dtype=np.int64)
    for g in range(n_groups):
        used = {int(colour[h]) for h in pairs[g] if colour[h] >= 0}
        free = [c for c in range(m + 1) if c not in used]
        colour[g] = free[0] if free else 0
    directions = np.array([(1, c) if c < m else (0, 1) for c in colour], dtype=np.int64)
    own = []
    for op in ops:
        consistent = all(len(ax) == 1 for ax in op.axes)
        if consistent and len(op.axes) == 2:
            (ga,), (gb,) = op.axes[0], op.axes[1]
            consistent = colour[ga] != colour[gb]
        own.append(not consistent)
    return directions, rng.integers(m, size=n_groups), own


def _measure_tables(ops: List[_OpModel], full: np.ndarray, gran: np.ndarray, setting: LatencySetting, clock: str,
                    grid: Sequence[float], rounds: int, seed: int, progress: bool,
                    after_round: Optional[Callable[[], None]] = None) -> List[_OpTable]:
    """Time every op at every point of its grid inside replayed forward passes.

    Each pass replays the whole op sequence once as one consistently pruned model (every group at one point of its
    grid, see :func:`_pass_design`) and times each op alone with the clock: an op then runs with the caches as a
    forward pass of that model leaves them. (An op repeated in a loop of its own runs with hot caches and is up to
    twice as fast; one timed among ops of other widths than its neighbours' is up to a quarter faster than in the
    model.) Activations are written just before their op, as their producer would; weights at the start of the pass.
    A round is ``m**2`` passes (``m`` the smallest prime >= the largest grid) in random order, so every pair of
    grid points of every two-group op is measured once per round; the median over rounds is kept.
    ``after_round`` runs after each round (the calibration models are timed there, under the same conditions).
    """
    device, dtype = setting.torch_device, setting.torch_dtype
    rng = np.random.default_rng(seed)
    n = len(full)
    group_points = [_axis_points({g: 1.0}, full, gran, grid)[0].astype(np.int64) for g in range(n)]
    m = _smallest_prime(max(len(p) for p in group_points))
    directions, offsets, own = _pass_design(ops, n, m, rng)
    layouts = []  # per op: (grid_a coords, widths per point a, grid_b coords, widths per point b)
    for op in ops:
        axes = list(op.axes) + [{}] * (2 - len(op.axes))
        ga, wa = _axis_points(axes[0], full, gran, grid) if axes[0] else (np.zeros(1), [{}])
        gb, wb = _axis_points(axes[1], full, gran, grid) if axes[1] else (np.zeros(1), [{}])
        layouts.append((ga, wa, gb, wb))
    n_points = [len(ga) * len(gb) for ga, _, gb, _ in layouts]
    passes = max(m * m, max(n_points))
    own_offsets = rng.integers(passes, size=len(ops))
    replays = [_Replay(op, device, dtype) for op in ops]

    def pass_points(p: int) -> List[int]:
        q, r = divmod(p % (m * m), m)
        residue = (directions[:, 0] * q + directions[:, 1] * r + offsets) % m
        point_of = [int(x) * len(pts) // m for x, pts in zip(residue, group_points)]  # m residues onto its points
        k = np.array([pts[i] for pts, i in zip(group_points, point_of)], dtype=np.float64)
        points = []
        for i, op in enumerate(ops):
            ga, wa, gb, wb = layouts[i]
            if own[i]:
                points.append(int((p + own_offsets[i]) % n_points[i]))
                continue
            ia = point_of[next(iter(op.axes[0]))] if op.axes else 0
            ib = point_of[next(iter(op.axes[1]))] if len(op.axes) == 2 else 0
            points.append(ia * len(gb) + ib)
        return points, k

    def ints_of(i: int, point: int, k_pass: np.ndarray) -> List[int]:
        ga, wa, gb, wb = layouts[i]
        k = k_pass.copy()
        for g, w in {**wa[point // len(gb)], **wb[point % len(gb)]}.items():
            k[g] = w
        return ops[i].ints_at(k)

    samples: List[List[List[float]]] = [[[] for _ in range(p)] for p in n_points]
    clock_ns = _clock_ns(clock)
    cuda = device.type == "cuda"
    overhead = _clock_overhead_ns(clock_ns)

    def run_pass(p: int, record: bool) -> None:
        points, k_pass = pass_points(p)
        ints = [ints_of(i, points[i], k_pass) for i in range(len(ops))]
        params = [{j: r.tensor(leaf, ints[i]) for j, leaf in enumerate(r.model.op.tensors) if leaf.param}
                  for i, r in enumerate(replays)]
        events = []
        for i, r in enumerate(replays):
            tensors = dict(params[i])
            for j, leaf in enumerate(r.model.op.tensors):
                if not leaf.param:
                    tensors[j] = r.tensor(leaf, ints[i])
            args, kwargs = r.arguments(ints[i], tensors)
            if cuda:
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = clock_ns()
            r.model.op.func(*args, **kwargs)
            t1 = clock_ns()
            if cuda:
                end.record()
                events.append((start, end))
            if record:
                samples[i][points[i]].append(max(0.0, (t1 - t0 - overhead) * 1e-9))
            del args, kwargs, tensors
        if cuda:
            torch.cuda.synchronize(device)
            if record:  # an op costs its launch or its kernels, whichever is longer
                for i, (start, end) in enumerate(events):
                    samples[i][points[i]][-1] = max(samples[i][points[i]][-1], start.elapsed_time(end) * 1e-3)

    with torch.inference_mode(), _ThreadState(setting.threads):
        for p in range(min(2, passes)):  # warm-up: allocator, kernels, thread pool
            try:
                run_pass(p, record=False)
            except Exception as e:
                raise ValueError(f"latency setting {setting.tag} cannot be measured: {e}") from e
        bar = tqdm(total=rounds * passes, desc=f"latency table {setting.tag}", disable=not progress,
                   dynamic_ncols=True)
        for _ in range(rounds):
            for p in rng.permutation(passes):
                run_pass(int(p), record=True)
                bar.update()
            if after_round is not None:
                after_round()
        bar.close()
    tables = []
    for i, op in enumerate(ops):
        ga, _, gb, _ = layouts[i]
        values = np.array([np.median(s) for s in samples[i]]).reshape(len(ga), len(gb))
        tables.append(_OpTable(op.op.name, op.axes, ga, gb, values))
    return tables


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------
class LatencyModel:
    """Predicted latency (seconds per forward pass) of a pruned model in one setting, from kept channels per group.

    Build it once per model and setting with :meth:`build` (measured, or loaded from the on-disk cache); it serves
    the pruner it was built from and every pruned descendant (``Pruner.child``): kept counts are absolute.

    :ivar setting: the :class:`LatencySetting` it was measured in.
    :ivar full_widths: width of every group of the model it was built from.
    :ivar scale: factor on the sum of the op tables and ``offset`` the seconds added to it, fitted on built models:
        the Python work between ops (module calls, forward code) that no op carries, and the difference between an
        op timed alone inside a replayed pass and inside the model's own forward pass.
    :ivar meta: how, where and when it was measured (machine, torch version, build seconds, calibration residuals).
    :ivar from_cache: whether :meth:`build` loaded it from the cache instead of measuring.
    """

    def __init__(self, setting: LatencySetting, full_widths: np.ndarray, tables: List[_OpTable], scale: float,
                 offset: float, meta: Dict[str, Any]) -> None:
        self.setting = setting
        self.full_widths = np.asarray(full_widths, dtype=np.int64)
        self.tables = tables
        self.scale = float(scale)
        self.offset = float(offset)
        self.meta = meta
        self.from_cache = False
        self._index()

    def _index(self) -> None:
        """All tables padded into arrays, so that every op is interpolated at once."""
        n, n_ops = len(self.full_widths), len(self.tables)
        self._w = np.zeros((2, n_ops, n))
        na = max((len(t.grid_a) for t in self.tables), default=1)
        nb = max((len(t.grid_b) for t in self.tables), default=1)
        self._n = np.array([[len(t.grid_a), len(t.grid_b)] for t in self.tables], dtype=np.int64).reshape(-1, 2)
        self._ga, self._gb = np.zeros((n_ops, na)), np.zeros((n_ops, nb))
        self._table = np.zeros((n_ops, na, nb))
        for i, t in enumerate(self.tables):
            for a, ax in enumerate(t.axes):
                for g, w in ax.items():
                    self._w[a, i, g] = w
            # pad by repeating the last point: a padded cell is never reached (the index is clipped to the real grid)
            self._ga[i] = np.pad(t.grid_a, (0, na - len(t.grid_a)), mode="edge")
            self._gb[i] = np.pad(t.grid_b, (0, nb - len(t.grid_b)), mode="edge")
            self._table[i] = np.pad(t.table, ((0, na - t.table.shape[0]), (0, nb - t.table.shape[1])), mode="edge")

    @staticmethod
    def _locate(grid: np.ndarray, count: np.ndarray, u: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per op and query: lower grid index, upper index and weight of the upper point (see interpolate_table)."""
        last = np.maximum(count - 1, 0)
        i = np.clip((grid[None] <= u[..., None]).sum(-1) - 1, 0, np.maximum(count - 2, 0))
        j = np.minimum(i + 1, last)
        op = np.arange(grid.shape[0])[None]
        lo, hi = grid[op, i], grid[op, j]
        span = hi - lo
        t = np.where(span > 0, np.clip((u - lo) / np.where(span > 0, span, 1.0), 0.0, 1.0), 0.0)
        return i, j, t

    # ---- prediction ------------------------------------------------------------------------------------------
    def _keep(self, keep: Any) -> np.ndarray:
        k = np.asarray(keep, dtype=np.float64)
        n = len(self.full_widths)
        if k.ndim not in (1, 2) or k.shape[-1] != n:
            raise ValueError(f"keep must have one entry per group ({n}), or be a matrix of such rows; got shape "
                             f"{k.shape}")
        if not np.all(np.isfinite(k)) or np.any(k != np.round(k)):
            raise ValueError(f"keep must hold whole channel counts, got {keep}")
        if np.any(k < 1) or np.any(k > self.full_widths):
            raise ValueError(f"keep must lie in [1, width] per group (widths {self.full_widths.tolist()}), got "
                             f"{k.astype(np.int64).tolist()}")
        return k

    def op_latencies(self, keep: Any) -> np.ndarray:
        """Seconds of every recorded op at kept channels ``keep`` (interpolated in its table).

        :param keep: kept channels per group, shape ``(n_groups,)`` or ``(m, n_groups)``.
        :return: shape ``(n_ops,)`` or ``(m, n_ops)``.
        """
        k = self._keep(keep)
        single = k.ndim == 1
        k2 = np.atleast_2d(k)
        u_a, u_b = k2 @ self._w[0].T, k2 @ self._w[1].T  # (m, n_ops)
        ia, ja, ta = self._locate(self._ga, self._n[:, 0], u_a)
        ib, jb, tb = self._locate(self._gb, self._n[:, 1], u_b)
        op = np.arange(len(self.tables))[None]
        tab = self._table
        out = ((1 - ta) * (1 - tb) * tab[op, ia, ib] + ta * (1 - tb) * tab[op, ja, ib]
               + (1 - ta) * tb * tab[op, ia, jb] + ta * tb * tab[op, ja, jb])
        return out[0] if single else out

    def predict(self, keep: Any) -> Union[float, np.ndarray]:
        """Predicted seconds per forward pass of the model pruned to ``keep`` (no model is built).

        :param keep: kept channels per group (``PrunePlan.num_kept``, ``Pruner.keep_counts(...)``), shape
            ``(n_groups,)``, or a matrix ``(m, n_groups)`` of candidates.
        :return: a float, or an array ``(m,)`` for a matrix.
        """
        total = self.scale * self.op_latencies(keep).sum(-1) + self.offset
        return float(total) if np.ndim(total) == 0 else total

    def predict_plan(self, plan: "PrunePlan") -> float:
        """Predicted seconds per forward pass of the model a plan builds.

        :param plan: a plan from ``Pruner.plan``.
        """
        return float(self.predict(plan.num_kept))

    @property
    def original(self) -> float:
        """Predicted seconds per forward pass of the unpruned model."""
        return float(self.predict(self.full_widths))

    # ---- building and the cache ------------------------------------------------------------------------------
    @classmethod
    def build(cls, pruner: "Pruner", setting: LatencySetting, cache: Union[bool, str, os.PathLike] = True,
              grid: Sequence[float] = DEFAULT_GRID, rounds: int = 5, clock: str = "auto",
              calibration: Sequence[float] = (1.0, 0.6, 0.3), calibration_random: int = 3,
              calibration_rounds: int = 10, seed: int = 0, progress: bool = True, force: bool = False
              ) -> "LatencyModel":
        """The latency model of ``pruner``'s model in ``setting``: from the cache, or measured (and cached).

        Measuring records the forward pass on shapes only, finds how every op's sizes follow the group widths (from
        pruned copies), times every op on its grid (:func:`_measure_tables`) and fits :attr:`scale` and
        :attr:`offset` on built models, timed with ``Timer`` between the rounds of table passes (so both see the same
        machine): the model at the ``calibration`` fractions of every width and ``calibration_random`` models with
        random per-group fractions.

        :param pruner: the pruner of the model (its current widths are the full widths).
        :param setting: device, threads, batch size, dtype, memory format.
        :param cache: ``True`` (the :func:`default_cache_dir`), a folder, or ``False`` (neither read nor write).
        :param grid: fractions of each width measured (the narrowest width is always added).
        :param rounds: interleaved rounds of table passes (the median is kept).
        :param clock: ``"auto"``, ``"thread"`` or ``"wall"`` (see :data:`CLOCKS`).
        :param calibration: width fractions of the uniformly narrowed models the calibration is fitted on.
        :param calibration_random: further calibration models, each group at a random fraction in [0.2, 1].
        :param calibration_rounds: timed blocks per calibration model (the median is kept), spread over the rounds.
        :param seed: seeds the pass orders and the exactness check.
        :param progress: show progress bars.
        :param force: measure even when the cache holds the table (and replace it).
        :raises RuntimeError: CUDA asked without one. :raises ValueError: a setting that cannot be measured.
        """
        if not isinstance(setting, LatencySetting):
            raise TypeError(f"setting must be a LatencySetting, got {type(setting).__name__}")
        setting.torch_device  # noqa: B018  (fails early and clearly for a CUDA request without CUDA)
        clock = setting.resolve_clock(clock)
        grid = tuple(float(f) for f in grid)
        if not grid or any(not 0.0 < f <= 1.0 for f in grid):
            raise ValueError(f"grid fractions must lie in (0, 1], got {grid}")
        if int(rounds) < 1 or int(calibration_rounds) < 1:
            raise ValueError(f"rounds and calibration_rounds must be >= 1, got {rounds}, {calibration_rounds}")
        if any(not 0.0 < f <= 1.0 for f in calibration) or int(calibration_random) < 0:
            raise ValueError(f"calibration fractions must lie in (0, 1] and calibration_random be >= 0, got "
                             f"{tuple(calibration)}, {calibration_random}")
        if len(calibration) + int(calibration_random) < 2:
            raise ValueError("the calibration needs at least two built models (calibration fractions plus "
                             "calibration_random)")
        example = pruner.example_input
        if not isinstance(example, torch.Tensor):
            raise TypeError("the latency model needs a pruner traced on one input tensor (N, C, H, W)")
        input_size = tuple(int(s) for s in example.shape[1:])
        key = cls.cache_key(pruner, setting, clock=clock, grid=grid, rounds=rounds,
                            calibration=(*calibration, int(calibration_random)))
        path = None
        if cache is not False:
            folder = default_cache_dir() if cache is True else Path(cache)
            path = folder / f"{_model_label(pruner.model)}_{setting.tag}_{key['digest'][:16]}.json"
            if path.exists() and not force:
                model = cls.load(path)
                if model.meta.get("key", {}).get("digest") == key["digest"]:
                    model.from_cache = True
                    return model
        started = time.perf_counter()
        full, gran = pruner.num_channels.astype(np.int64), pruner.granularity.astype(np.int64)
        ops = _fit_ops(pruner, (setting.batch_size, *input_size), setting.memory_format, seed)
        from pruning_env.pruning.pruner import PrunePlan

        counts = _calibration_counts(full, gran, calibration, calibration_random, seed)
        built = [pruner.apply(PrunePlan.from_indices([range(int(c)) for c in k])) for k in counts]
        try:
            timers = _ModelTimers(built, input_size, setting, clock, 0.02, seed)
        except (RuntimeError, TypeError, NotImplementedError) as e:
            raise ValueError(f"latency setting {setting.tag} cannot be measured: {e}") from e
        del built
        per_round = int(math.ceil(int(calibration_rounds) / int(rounds)))
        samples: List[np.ndarray] = []
        try:
            tables = _measure_tables(ops, full, gran, setting, clock, grid, int(rounds), seed, progress,
                                     after_round=lambda: samples.extend(timers.round() for _ in range(per_round)))
        finally:
            timers.close()
        measured = np.median(np.stack(samples), axis=0)
        model = cls(setting, full, tables, 1.0, 0.0, {})
        summed = np.array([float(model.op_latencies(k).sum()) for k in counts])
        model.scale, model.offset = _fit_calibration(summed, measured)
        info = machine_info(setting.threads)
        model.meta = {
            "key": key, "format": _FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - started, 3), "machine": info,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "model": _model_label(pruner.model), "input_size": list(input_size), "n_ops": len(tables),
            "calibration": [{"keep": k.tolist(), "measured_s": float(m), "ops_sum_s": float(s),
                             "predicted_s": float(model.scale * s + model.offset)}
                            for k, m, s in zip(counts, measured, summed)],
        }
        if path is not None:
            model.save(path)
        return model

    @staticmethod
    def cache_key(pruner: "Pruner", setting: LatencySetting, clock: str = "auto",
                  grid: Sequence[float] = DEFAULT_GRID, rounds: int = 5,
                  calibration: Sequence[float] = (1.0, 0.6, 0.3, 3)) -> Dict[str, Any]:
        """What a cached table is keyed by: device, torch version, architecture signature, setting and how it was
        measured; ``digest`` hashes them all.

        :param pruner: the pruner of the model.
        :param setting: the device setting.
        :param clock: the clock (resolved for the setting).
        :param grid: the grid fractions.
        :param rounds: table rounds.
        :param calibration: calibration fractions, then the number of random calibration models.
        """
        example = pruner.example_input
        shape = list(example.shape[1:]) if isinstance(example, torch.Tensor) else None
        arch = hashlib.sha256(json.dumps({
            "repr": repr(pruner.model), "input_size": shape,
            "groups": [[g.name, int(g.num_channels), int(g.granularity)] for g in pruner.groups],
        }, sort_keys=True).encode()).hexdigest()
        key = {"format": _FORMAT, "device": setting.device_name(), "torch": torch.__version__,
               "architecture": arch, "setting": asdict(setting), "clock": setting.resolve_clock(clock),
               "grid": [float(f) for f in grid], "rounds": int(rounds), "calibration": [float(f) for f in calibration]}
        key["digest"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return key

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the model as JSON (atomically).

        :param path: destination file.
        """
        data = {"format": _FORMAT, "setting": asdict(self.setting), "full_widths": self.full_widths.tolist(),
                "scale": self.scale, "offset": self.offset, "meta": self.meta,
                "ops": [t.to_json() for t in self.tables]}
        return atomic_write_text(json.dumps(data, indent=1), path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "LatencyModel":
        """Read a model written by :meth:`save`.

        :param path: a JSON file from :meth:`save` (the cache holds them).
        """
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable latency table: {e}") from e
        if data.get("format") != _FORMAT:
            raise ValueError(f"{path} holds a latency table of format {data.get('format')!r}; this version reads "
                             f"format {_FORMAT} (delete the file to measure it again)")
        return cls(LatencySetting(**data["setting"]), np.asarray(data["full_widths"]),
                   [_OpTable.from_json(d) for d in data["ops"]], data["scale"], data["offset"], data["meta"])

    def __repr__(self) -> str:
        return (f"LatencyModel({self.setting.tag}, {len(self.tables)} ops, original {self.original * 1e3:.3f} ms, "
                f"scale {self.scale:.3f}, offset {self.offset * 1e3:.3f} ms)")


def _calibration_counts(full: np.ndarray, gran: np.ndarray, fractions: Sequence[float], n_random: int, seed: int
                        ) -> List[np.ndarray]:
    """Widths of the calibration models: uniform ``fractions``, then random per-group fractions in [0.2, 1]."""
    rng = np.random.default_rng(seed + 1)
    fracs = [np.full(len(full), float(f)) for f in fractions] + [rng.uniform(0.2, 1.0, len(full))
                                                                 for _ in range(int(n_random))]
    return [np.clip(np.round(f * full / gran).astype(np.int64) * gran, gran, full) for f in fracs]


def _fit_calibration(summed: np.ndarray, measured: np.ndarray) -> Tuple[float, float]:
    """``(scale, offset)`` with ``measured ~ scale * summed + offset`` in relative error (weighted least squares);
    an offset alone when the models are too alike to tell a scale from it (or the fit gives no positive scale)."""
    w = 1.0 / measured
    a = np.stack([summed * w, w], axis=1)
    if len(summed) >= 2 and np.ptp(summed) > 0.05 * np.max(summed):
        (scale, offset), *_ = np.linalg.lstsq(a, measured * w, rcond=None)
        if scale > 0:
            return float(scale), float(offset)
    return 1.0, float(np.median(measured - summed))


def _model_label(model: nn.Module) -> str:
    cfg = getattr(model, "zoo_config", None)
    if isinstance(cfg, dict) and "name" in cfg:
        width = float(cfg.get("width", 1.0))
        return cfg["name"] + ("" if width == 1.0 else f"-w{width:g}")
    return type(model).__name__.lower()
