"""Spies between planner's backends: what reached the database, counted where a test needs it."""

from __future__ import annotations

from collections import Counter
from typing import Any

from planner.kinds.backend import Backend, Query, WrappingBackend


class Counting(WrappingBackend):
    """Records what reaches the backend below it: each query (`queries`, `single` of them), per
    node (`sent`), each open (`opens`). As fusion's `fuser`, it counts the fused groups too
    (`fused`, their sizes), passing them on to `pool` (the pool under `inner`, or `inner` itself)."""

    def __init__(self, inner: Backend, pool: Any = None) -> None:
        super().__init__(inner)
        self.pool: Any = inner if pool is None else pool
        self.queries: list[Query] = []
        self.sent: Counter[str] = Counter()
        self.opens = 0
        self.fused: list[int] = []

    @property
    def single(self) -> int:
        """How many queries were sent one by one (not fused)."""
        return len(self.queries)

    async def open(self) -> None:
        self.opens += 1
        await super().open()

    async def run(self, query: Query) -> Any:
        self.queries.append(query)
        self.sent[query.node.name] += 1
        return await self.inner.run(query)

    def idle(self, share: float = 1.0) -> bool:
        return bool(self.pool.idle(share))

    async def run_fused(self, queries: list[Query]) -> Any:
        self.fused.append(len(queries))
        return await self.pool.run_fused(queries)
