"""Action checks shared by the envs: an action is real numbers of the space's shape, finite where the env says so.

NumPy casts a complex action to its real part with only a warning; the envs refuse it instead, like NaN.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np


def real_action(action: Any, size: int, expected: str, finite: bool = True,
                entries: Optional[str] = None) -> np.ndarray:
    """``action`` as a flat float64 array of ``size`` entries, or a ``ValueError`` saying what is wrong with it.

    :param action: what the agent passed (array, list, tensor, scalar).
    :param size: entries the space has.
    :param expected: the expected shape and meaning in words, e.g. ``"shape (3,): one value per prunable group"``.
    :param finite: refuse NaN / inf entries too.
    :param entries: what an entry is in messages (``"groups"``, ``"patches"``); default ``"entries"``.
    """
    entries = entries or "entries"
    raw = np.asarray(action.detach().cpu() if hasattr(action, "detach") else action)
    if raw.dtype.kind == "c":
        imaginary = np.flatnonzero(np.imag(raw).reshape(-1) != 0).tolist()
        where = f" (non-zero imaginary parts at {entries} {imaginary})" if imaginary else ""
        raise ValueError(f"action is complex ({raw.dtype}){where}; the action space is real: pass real numbers "
                         f"of {expected}")
    try:
        a = raw.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"action must be numeric with {expected}, got {action!r}") from err
    if a.size != size or np.squeeze(a).ndim > 1 or (a.ndim > 1 and a.shape[-1] != size):
        raise ValueError(f"action must have {expected}, got shape {a.shape}")
    a = a.reshape(size)
    if finite and not np.all(np.isfinite(a)):
        bad = np.flatnonzero(~np.isfinite(a)).tolist()
        raise ValueError(f"action has NaN/inf entries at {entries} {bad}; every entry must be a finite number")
    return a


__all__ = ["real_action"]
