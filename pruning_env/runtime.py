"""Runtime helpers shared by every command: device choice (and a model's device) and synchronisation, seeding, RNG
state and private RNG streams, machine facts for benchmark reports, and atomic file writes.
"""
from __future__ import annotations

import itertools
import os
import platform
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np
import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when available, else CPU; an unavailable CUDA request is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was requested but CUDA is not available; use device='cpu'")
    return dev


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` lives: the device of its first parameter (else its first buffer); CPU for a module that
    holds no tensor.

    :param model: any module.
    """
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so that CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    """All RNG states, for resumable checkpoints."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states captured by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TorchRNG:
    """A private stream of torch's global RNG, for work that cannot take a ``torch.Generator`` (dropout, torchvision
    augmentation, ``finetune``): inside ``with rng:`` torch draws from this stream (CPU, and ``device``'s CUDA
    generator), which moves on from block to block; the caller's RNG state is restored on leaving, so an env or an
    estimate never reseeds the program that uses it. A fresh ``TorchRNG(seed)`` is the one way to run a block
    seeded: ``with TorchRNG(seed): ...``.

    :param seed: the stream's seed.
    :param device: the CUDA device whose generator the block uses as well (None or a CPU device: CPU only).
    """

    def __init__(self, seed: int, device: Union[str, torch.device, None] = None) -> None:
        self.seed = int(seed)
        dev = torch.device("cpu" if device is None else device)
        self._cuda: List[torch.device] = [dev] if dev.type == "cuda" else []
        self._cpu_state = torch.Generator().manual_seed(self.seed).get_state()
        self._cuda_states: Optional[List[torch.Tensor]] = None  # seeded on first use (CUDA initialised by then)
        self._outside: List[Any] = []

    def __enter__(self) -> "TorchRNG":
        self._outside.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self._cuda]))
        torch.set_rng_state(self._cpu_state)
        if self._cuda_states is None:
            for d in self._cuda:
                with torch.cuda.device(d):
                    torch.cuda.manual_seed(self.seed)
        else:
            for d, state in zip(self._cuda, self._cuda_states):
                torch.cuda.set_rng_state(state, d)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cpu_state = torch.get_rng_state()
        self._cuda_states = [torch.cuda.get_rng_state(d) for d in self._cuda]
        cpu, cuda = self._outside.pop()
        torch.set_rng_state(cpu)
        for d, state in zip(self._cuda, cuda):
            torch.cuda.set_rng_state(state, d)


def sync(device: Union[str, torch.device, None]) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op on CPU): call before reading a wall clock."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(threads: Optional[int] = None) -> Dict[str, Any]:
    """What timings were measured on (they mean nothing without it): CPU model, cores, torch threads, versions,
    and the CUDA device when there is one.

    :param threads: torch intra-op threads used (default: ``torch.get_num_threads()``).
    """
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": int(threads if threads is not None else torch.get_num_threads()),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


@contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only when the block succeeds: a crash never leaves half
    a file. The file gets the mode a plain ``open`` would give (0666 minus the umask), not mkstemp's 0600.

    :param path: destination; parent folders are created.
    :param suffix: suffix of the temporary name (exporters that look at the extension need the real one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=str(path.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename (see :func:`atomic_path`).

    :param obj: anything ``torch.save`` accepts.
    :param path: destination; parent folders are created.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(text: str, path: PathLike) -> Path:
    """Write a text file atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return Path(path)
