"""Fusion: the sibling reads of one run that become ready together, sent as one statement.

When the executor starts several nodes at once (the reads that waited for the same node),
their tasks all take their first step in the same turn of the event loop. `FusingBackend`
collects the fusible queries of one run that arrive in that turn (a batch of
`planner.db.batcher`) and sends them, one turn later, as one statement on one connection
(`fuser=`, the pool under it: `PoolBackend.run_fused`, a `planner.kinds.backend.Fuser`): one
round trip and one connection where there were several. No timer is involved: a lone read waits one turn
of the loop, not a clock.

Fusion serves a quiet service (few runs, most connections free): while fewer than half of
the pool's connections are in use (`FUSE_BELOW`). Past that, each read goes on to the
coalescer, which shares it with the same read of other runs instead: a round trip that
answers one node for each of a dozen runs does more than one that answers three nodes of one
run, and a connection taken by a fused statement under load is one the batches wait for.
(Measured: fusing whenever a connection was free cut the seed flow's throughput at 200 runs
in flight by a third; BENCHMARKS.md.) Each node keeps its own value, type, state and error: a
failure inside the fused statement makes each member run again separately, and a member's own
timeout or cancellation ends only its own wait.
"""

from __future__ import annotations

import asyncio
from typing import Any

from planner.db.batcher import Batch, Batcher
from planner.kinds.backend import SEQUENTIAL, Backend, Fuser, Outcome, Query, WrappingBackend

FUSE_BELOW = 0.5  # fuse while fewer than this share of the pool's connections are in use


class FusingBackend(WrappingBackend):
    """Fuses the sibling reads of one run (see the module's docstring).

    `inner` runs each query sent direct; `fuser` (the pool under it) says how busy it is and
    runs the fused statements. With `fuser=None` nothing is fused."""

    def __init__(self, inner: Backend, *, fuser: Fuser | None, enabled: bool = True) -> None:
        super().__init__(inner)
        self.enabled = enabled and fuser is not None  # a Planner passes `Settings.fuse` (PLANNER_FUSE)
        self.fuser = fuser
        # One batch per run (the id of its `Query.run`), looked at on the loop's next turn.
        self._batcher: Batcher[Query] = Batcher(self._send, triage=self._triage)
        self.fused = 0  # statements that served more than one node (a figure for benchmarks)

    async def run(self, query: Query) -> Any:
        if not self.enabled or not query.sql.fuse or query.run is None or SEQUENTIAL.get():
            return await self.inner.run(query)
        key = id(query.run)
        batch = self._batcher.pending(key)
        if batch is None:
            batch = self._batcher.open(key)
        value = await batch.wait(batch.join(query))
        if value is _DIRECT:  # sent from the node's own task: its cancellation reaches the server
            return await self.inner.run(query)
        return value

    def _triage(self, batch: Batch[Query]) -> list[Outcome] | None:
        """One turn after the batch's first member joined (its siblings have too): every member
        goes direct, or the batch is sent (`_send`, a turn later)."""
        members, fuser = batch.start(), self.fuser
        if len(members) < 2 or fuser is None or not fuser.idle(FUSE_BELOW):
            return [(_DIRECT, None)] * len(members)
        return None

    async def _send(self, batch: Batch[Query]) -> list[Outcome]:
        members, fuser = batch.sent or [], self.fuser
        # Asked again, now: the batches triaged in one turn all saw the pool as it was before any
        # of them took a connection (a burst of runs would fuse them all, far past FUSE_BELOW).
        # From here to the pool counting its connection nothing yields, so the answer holds.
        if fuser is None or not fuser.idle(FUSE_BELOW):
            return [(_DIRECT, None)] * len(members)
        queries = [member.item for member in members]
        # A failure of the fused statement itself: every member fails, each with an error object
        # of its own (the batcher's), and each node raises it.
        outcomes = await fuser.run_fused(queries)
        if outcomes is None:  # not fusible (a column type that cannot travel in an array): each separately
            batch.shared = False
            return list(await asyncio.gather(*(self._separately(q) for q in queries)))
        self.fused += 1
        for query in queries:
            query.served.fused = len(queries)
        return outcomes

    async def _separately(self, query: Query) -> Outcome:
        try:
            return (await self.inner.run(query), None)
        except Exception as exc:
            return (None, exc)


_DIRECT = object()
"""A member's value when it is to go direct, from its own task: it is the only member, or the
pool is too busy to fuse."""
