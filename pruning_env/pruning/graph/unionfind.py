"""Union-find over channel sources: tied sources share one root, which records whether the channels are fixed
(never removed), how they were tied (residual add, multiply, partition) and the block size they are removed in."""
from __future__ import annotations

import math
from typing import List, Optional

from pruning_env.pruning.graph.layouts import FIXED

__all__ = ["UnionFind"]


class UnionFind:
    def __init__(self) -> None:
        self.parent: List[int] = []
        self.fixed: List[bool] = []
        self.kinds: List[set] = []
        self.granularity: List[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        self.fixed.append(False)
        self.kinds.append(set())
        self.granularity.append(1)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: Optional[int], b: Optional[int], kind: str) -> None:
        """Tie two sources; ``None``/FIXED on either side makes the other one unprunable."""
        if a is None or a == FIXED or b is None or b == FIXED:
            for s in (a, b):
                if s is not None and s != FIXED:
                    self.fixed[self.find(s)] = True
            return
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            self.kinds[ra].add(kind)
            return
        # the earlier source stays the root so that group order follows execution order
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        self.kinds[ra] |= self.kinds[rb] | {kind}
        self.granularity[ra] = math.lcm(self.granularity[ra], self.granularity[rb])

    def require_blocks(self, a: int, block: int) -> None:
        """Channels of ``a`` may only be removed in aligned blocks of ``block``."""
        if a != FIXED:
            r = self.find(a)
            self.granularity[r] = math.lcm(self.granularity[r], block)

    def fix(self, a: int) -> None:
        if a != FIXED:
            self.fixed[self.find(a)] = True
