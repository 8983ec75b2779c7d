"""Fusion: the sibling reads of one run that become ready together, sent as one statement.

When the executor starts several nodes at once (the reads that waited for the same node),
their tasks all take their first step in the same turn of the event loop. `FusingBackend`
collects the fusible queries of one run that arrive in that turn and sends them, one turn
later, as one statement on one connection (see `PoolBackend.run_fused`): one round trip and
one connection where there were several. No timer is involved: a lone read waits one turn
of the loop, not a clock.

Fusion serves a quiet service (few runs, most connections free): while fewer than half of
the pool's connections are in use (`FUSE_BELOW`). Past that, each read goes on to the
coalescer, which shares it with the same read of other runs instead: a round trip that
answers one node for each of a dozen runs does more than one that answers three nodes of one
run, and a connection taken by a fused statement under load is one the batches wait for.
(Measured: fusing whenever a connection was free cut the seed flow's throughput at 200 runs
in flight by a third; BENCHMARKS.md.) Each node keeps its own value, type, state and error: a
failure inside the fused statement makes each member run again alone, and a member's own
timeout or cancellation ends only its own wait.
"""

from __future__ import annotations

import asyncio
from typing import Any

from planner.config import env_on
from planner.kinds.backend import ALONE, Backend, Outcome, Query, WrappingBackend, own_error

FUSE_BELOW = 0.5  # fuse while fewer than this share of the pool's connections are in use


class _Group:
    __slots__ = ("members", "task")

    def __init__(self) -> None:
        self.members: list[tuple[Query, asyncio.Future[Any]]] = []
        self.task: asyncio.Task[None] | None = None


class FusingBackend(WrappingBackend):
    """Fuses the sibling reads of one run (see the module's docstring)."""

    def __init__(self, inner: Backend, *, enabled: bool | None = None) -> None:
        super().__init__(inner)
        self.enabled = env_on("PLANNER_FUSE") if enabled is None else enabled
        self._groups: dict[int, _Group] = {}
        self.fused = 0  # statements that served more than one node (a figure for benchmarks)

    async def run(self, query: Query) -> Any:
        if not self.enabled or not query.node.fuse or query.run is None or ALONE.get():
            return await self.inner.run(query)
        key = id(query.run)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
            asyncio.get_running_loop().call_soon(self._flush, key)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        group.members.append((query, future))
        try:
            value = await future
        except asyncio.CancelledError:
            if group.task is not None and all(f.done() for _, f in group.members):
                group.task.cancel()  # nobody waits: cancel the statement on the server
            raise
        if value is _ALONE:  # sent from the node's own task: its cancellation reaches the server
            return await self.inner.run(query)
        return value

    def _flush(self, key: int) -> None:
        group = self._groups.pop(key)
        live = [(q, f) for q, f in group.members if not f.done()]
        if not live:
            return
        if len(live) == 1 or not self.inner.idle(FUSE_BELOW):
            _send_alone(live)
            return
        group.task = asyncio.get_running_loop().create_task(self._send(live))

    async def _alone(self, query: Query, future: asyncio.Future[Any]) -> None:
        try:
            value = await self.inner.run(query)
        except Exception as exc:
            _deliver(future, (None, exc))
        else:
            _deliver(future, (value, None))

    async def _send(self, members: list[tuple[Query, asyncio.Future[Any]]]) -> None:
        # Asked again, now: the groups flushed in one turn all saw the pool as it was before any
        # of them took a connection (a burst of runs would fuse them all, far past FUSE_BELOW).
        # From here to the pool counting its connection nothing yields, so the answer holds.
        if not self.inner.idle(FUSE_BELOW):
            _send_alone(members)
            return
        queries = [q for q, _ in members]
        try:
            outcomes = await self.inner.run_fused(queries)
        except Exception as exc:
            # Every member fails, each with an error object of its own: each node raises it.
            for index, (_, future) in enumerate(members):
                _deliver(future, (None, exc if index == 0 else own_error(exc)))
            return
        if outcomes is None:  # not fusible (a column type that cannot travel in an array): each alone
            await asyncio.gather(*(self._alone(q, f) for q, f in members))
            return
        self.fused += 1
        for (query, future), outcome in zip(members, outcomes, strict=True):
            query.served.fused = len(members)
            _deliver(future, outcome)


_ALONE = object()
"""What a member's future holds when it is to go on its own (from its own task)."""


def _send_alone(members: list[tuple[Query, asyncio.Future[Any]]]) -> None:
    for _query, future in members:
        if not future.done():
            future.set_result(_ALONE)


def _deliver(future: asyncio.Future[Any], outcome: Outcome) -> None:
    if future.done():
        return
    value, error = outcome
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
