"""Coalescing: the same statement of many concurrent runs sent as one (the group-commit pattern).

`CoalescingBackend` wraps a backend, and is given the pool that runs batches (`batches=`, a
`planner.kinds.backend.Batches`: `PoolBackend.run_batch` and its `idle`). A query
that finds a free connection goes at once, direct: coalescing adds nothing to an idle service.
A query that would wait for a connection joins the pending batch of its statement instead;
the batch's own task (`planner.db.batcher`) waits for one connection, closes the batch when
it gets it, and sends every member's parameters in one statement (`unnest ... WITH ORDINALITY` joined `LATERAL` to
the node's statement), then hands each member its own value.

What stays per run: each member awaits only its own result, so its cancellation (the run's
deadline, a fail-fast, the caller) ends its own wait; a member nobody waits for any more when
the batch gets its connection is left out of the statement, and the statement is cancelled on
the server only when no member waits any more. The node's `timeout` times statements, as it
does direct: the combined statement, and when that fails, each member's statement run again
separately, so that a slow or bad member times out or fails by itself. Identical parameters in one
read batch are sent once (single-flight) and each run gets its own copy of the value (and of
the error). Only single statements proven pure are coalesced by default (by syntax and by the
server's catalog: `planner.lang.effects`, applied above this wrapper); a write only
with `coalesce: true` (`SqlBody.coalesce`), and two writes with identical parameters
never share a statement. `PLANNER_COALESCE=0` turns coalescing off for the process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from typing import Any

from planner.db.batcher import Batch, Batcher
from planner.kinds.backend import ANSWER, SEQUENTIAL, Backend, Batches, Outcome, Query, WrappingBackend, freeze
from planner.lang.nodes import CompiledNode

logger = logging.getLogger("planner")

MAX_BATCH = 500  # runs sharing one read; more start the next batch
MAX_WRITE_BATCH = 32  # runs sharing one write: past this, the server's cost per member grows
# (one combined write holds every member's CTEs; planning it grows faster than its size)
MAX_UNSHAREABLE = 1024  # statements remembered as impossible to share; past this the oldest is forgotten

# Statement text, fetch, timeout, read-only: what a batch's statement depends on (a statement
# whose verdict changed, `planner.lang.effects`, starts batches of its new kind).
_BatchKey = tuple[str, str, float | None, bool]


class CoalescingBackend(WrappingBackend):
    """Coalesces the statements of concurrent runs (see the module's docstring).

    `inner` runs each query sent direct; `batches` (the pool under it) says whether a
    connection is free and runs the batches. With `batches=None` nothing is coalesced."""

    def __init__(self, inner: Backend, *, batches: Batches | None, max_batch: int = MAX_BATCH,
                 enabled: bool = True, max_unshareable: int = MAX_UNSHAREABLE) -> None:
        super().__init__(inner)
        self.max_batch = max_batch
        # A Planner passes `Settings.coalesce` (PLANNER_COALESCE); nothing to batch on, nothing coalesced.
        self.enabled = enabled and batches is not None
        self.pool = batches
        # A member is a run's query; runs with identical parameters share one (reads only).
        self._batcher: Batcher[Query] = Batcher(self._send)
        # Statements the inner backend said cannot be batched, oldest first. Bounded: flows
        # edited and reloaded (or made from text per request) bring new texts for as long as
        # the process lives; a statement forgotten is only asked once more (nothing is sent).
        self._unshareable: dict[str, None] = {}
        self.max_unshareable = max_unshareable
        self.batches = 0  # statements sent for more than one run (a figure for benchmarks)
        self.direct = 0  # coalescible queries that found a free connection and went direct

    async def run(self, query: Query) -> Any:
        node, pool = query.node, self.pool
        if not node.sql.coalesce or not self.enabled or pool is None or SEQUENTIAL.get():
            return await self.inner.run(query)
        text = node.sql.statements[0].text
        # Runs share a batch only when they would send the same statement, fetch its rows the
        # same way and time it the same way: the batch runs with its first member's node.
        key: _BatchKey = (text, node.sql.fetch, node.timeout, node.sql.read_only)
        share = _freeze(query.params[0])
        batch = self._batcher.pending(key)
        limit = self.max_batch if node.sql.read_only else min(self.max_batch, MAX_WRITE_BATCH)
        if batch is None or not _admits(batch, share, node.sql.read_only, limit):
            if text in self._unshareable or pool.idle():
                self.direct += 1
                return await self.inner.run(query)  # a free connection: go now, direct
            batch = self._batcher.open(key)
        # Two runs reading the same thing share one answer (each gets its own copy of it);
        # two runs writing it both write.
        member = batch.join(query, share, merge=node.sql.read_only)
        # No timer here: the node's timeout times the statements (see `PoolBackend.run_batch`),
        # and the wait for a connection is bounded by the run's deadline only, as direct.
        try:
            return await batch.wait(member)
        finally:
            if batch.sent is not None:
                query.served.batch = batch.runs if batch.shared else member.sharing

    async def _send(self, batch: Batch[Query]) -> list[Outcome]:
        pool = self.pool
        assert pool is not None  # `run` coalesces nothing without it
        node = batch.members[0].item.node
        params: list[list[Any]] = []  # filled when the batch starts: the inner backend reads it then

        def started() -> None:
            """The batch has its connection: it closes, and leaves out the members nobody waits
            for any more (a run cancelled while it waited must not write, as it would not have
            direct)."""
            params[:] = [member.item.params[0] for member in batch.start()]

        # Members answered before the batch is over (a read batch split because it ran long)
        # get their values at once: `Batch.answer`.
        answering = ANSWER.set(batch.answer)
        try:
            outcomes = await pool.run_batch(node, params, started)
        finally:
            ANSWER.reset(answering)
        if outcomes is None:  # the statement cannot be shared: remember, and run each separately
            self._remember_unshareable(node.sql.statements[0].text)
            batch.shared = False
            if batch.sent is None:
                started()
            return await self._each_separately(node, params)
        if batch.runs > 1:
            self.batches += 1
        return outcomes

    def _remember_unshareable(self, text: str) -> None:
        unshareable = self._unshareable
        unshareable[text] = None
        while len(unshareable) > self.max_unshareable:
            del unshareable[next(iter(unshareable))]

    async def _each_separately(self, node: CompiledNode, params: list[list[Any]]) -> list[Outcome]:
        async def one(member_params: list[Any]) -> Outcome:
            try:
                return (await self.inner.run(Query(node, [member_params])), None)
            except Exception as exc:
                return (None, exc)

        return list(await asyncio.gather(*(one(p) for p in params)))


def _admits(batch: Batch[Query], share: Hashable | None, read_only: bool, limit: int) -> bool:
    """Whether a run may join `batch` (`share`: its parameters' key). Two writes with the same
    parameters never share a statement: in one statement the second cannot see the first's
    rows (a find-or-create would find nothing and create nothing), which no order of two
    separate runs could give. A write whose parameters cannot be compared joins nobody."""
    if len(batch) >= limit:
        return False
    if read_only:
        return True
    return share is not None and not batch.holds(share)


def _freeze(params: list[Any]) -> Hashable | None:
    """A member's key (`planner.kinds.backend.freeze`), or None when a parameter cannot be hashed:
    such a member is never merged with another."""
    try:
        return freeze(params)
    except TypeError:
        return None
