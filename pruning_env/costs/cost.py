"""The cost values every layer of the project passes around: a model's MACs and params, and reductions.

``Cost`` is what a counter or the analytic plan model returns; ``reductions(cost, original)`` is the one place
that turns two costs into the fractions removed that the env, the heuristics, the run layer and reports use.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Cost", "Reductions", "reductions"]


@dataclass(frozen=True)
class Cost:
    """MACs per image and parameter count of a model."""

    macs: int
    params: int

    @property
    def flops(self) -> int:
        """FLOPs counted as 2 x MACs (the convention of ``torch.utils.flop_counter``)."""
        return 2 * self.macs


@dataclass(frozen=True)
class Reductions:
    """Fractions of the original cost removed (0 = nothing removed, 1 = everything).

    :ivar flops: fraction of MACs (equivalently FLOPs) removed.
    :ivar params: fraction of parameters removed.
    """

    flops: float
    params: float


def reductions(cost: Cost, original: Cost) -> Reductions:
    """Fractions of ``original``'s MACs and params that ``cost`` removes (negative if it grew).

    :param cost: cost of the pruned model.
    :param original: cost of the model it was pruned from (a zero count is treated as 1).
    """
    if not isinstance(cost, Cost) or not isinstance(original, Cost):
        raise TypeError(f"reductions expects two Cost values, got {type(cost).__name__} and "
                        f"{type(original).__name__}")
    return Reductions(flops=1.0 - cost.macs / max(original.macs, 1),
                      params=1.0 - cost.params / max(original.params, 1))
