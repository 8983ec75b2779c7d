"""Coalescing: the same read of many concurrent runs sent as one statement (the group-commit pattern).

`CoalescingBackend` wraps a backend that can run a batch (`PoolBackend.run_batch`). A query
that finds a free connection goes at once, alone: coalescing adds nothing to an idle service.
A query that would wait for a connection joins the pending batch of its statement instead;
the batch's own task waits for one connection, closes the batch when it gets it, and sends
every member's parameters in one statement (`unnest ... WITH ORDINALITY` joined `LATERAL` to
the node's statement), then hands each member its own value.

What stays per run: each member awaits only its own result, so its timeout or cancellation
ends its own wait; the batch's statement is cancelled only when no member waits any more.
Identical parameters in one batch are sent once (single-flight) and each run gets its own
copy. A member whose value breaks the statement (a bad cast) gets its own error: the batch
is re-run member by member. Only single statements proven read-only are coalesced
(`CompiledNode.coalesce`); `PLANNER_COALESCE=0` turns coalescing off for the process.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from planner.backend import ALONE, Backend, Outcome, Query, WrappingBackend
from planner.graph import CompiledNode
from planner.policy import timed

logger = logging.getLogger("planner")

MAX_BATCH = 500  # runs sharing one read; more start the next batch
MAX_WRITE_BATCH = 32  # runs sharing one write: past this, the server's cost per member grows
# (one combined write holds every member's CTEs; planning it grows faster than its size)


def _env_enabled() -> bool:
    """`PLANNER_COALESCE=0` (or `false`/`no`/`off`) turns coalescing off for the process."""
    return os.environ.get("PLANNER_COALESCE", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(eq=False)
class _Batch:
    node: CompiledNode
    keys: dict[tuple[Any, ...], int] = field(default_factory=dict)  # parameters -> member index
    params: list[list[Any]] = field(default_factory=list)
    waiters: list[int] = field(default_factory=list)  # runs still waiting, per member
    joined: list[int] = field(default_factory=list)  # runs that asked, per member
    runs: int = 0  # runs that asked, in all
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def admits(self, params: list[Any], limit: int) -> bool:
        """Whether a run with `params` may join. Two writes with the same parameters never
        share a statement: in one statement the second cannot see the first's rows (a
        find-or-create would find nothing and create nothing), which no order of two
        separate runs could give."""
        if len(self.params) >= limit:
            return False
        return self.node.read_only or _freeze(params) not in self.keys

    def join(self, params: list[Any]) -> int:
        key = _freeze(params)
        # Two runs reading the same thing share one answer; two runs writing it both write.
        index = self.keys.get(key) if key is not None and self.node.read_only else None
        if index is None:
            index = len(self.params)
            if key is not None:
                self.keys.setdefault(key, index)
            self.params.append(params)
            self.waiters.append(0)
            self.joined.append(0)
            self.futures.append(asyncio.get_running_loop().create_future())
        self.waiters[index] += 1
        self.joined[index] += 1
        self.runs += 1
        return index


class CoalescingBackend(WrappingBackend):
    """Coalesces the reads of concurrent runs (see the module's docstring)."""

    def __init__(self, inner: Backend, *, max_batch: int = MAX_BATCH, enabled: bool | None = None) -> None:
        super().__init__(inner)
        self.max_batch = max_batch
        self.enabled = _env_enabled() if enabled is None else enabled
        self._pending: dict[str, _Batch] = {}
        self._alone: set[str] = set()  # statements the inner backend said cannot be batched
        self.batches = 0  # statements sent for more than one run (a figure for benchmarks)
        self.alone = 0  # coalescible queries that found a free connection and went alone

    async def run(self, query: Query) -> Any:
        node = query.node
        if not node.coalesce or not self.enabled or ALONE.get():
            return await self.inner.run(query)
        text = node.statements[0].text
        batch = self._pending.get(text)
        limit = self.max_batch if node.read_only else min(self.max_batch, MAX_WRITE_BATCH)
        if batch is None or not batch.admits(query.params[0], limit):
            if text in self._alone or self.inner.idle():
                self.alone += 1
                return await self.inner.run(query)  # a free connection: go now, alone
            batch = self._pending[text] = _Batch(node)
            batch.task = asyncio.get_running_loop().create_task(self._send(text, batch))
        index = batch.join(query.params[0])
        return await self._wait(text, batch, index, query)

    async def _wait(self, text: str, batch: _Batch, index: int, query: Query) -> Any:
        future = batch.futures[index]
        try:
            await batch.started.wait()  # the wait for a connection: only the run's deadline bounds it
            timeout = query.node.timeout
            value = await (asyncio.shield(future) if timeout is None else timed(asyncio.shield(future), timeout))
        finally:
            batch.waiters[index] -= 1
            if not any(batch.waiters) and batch.task is not None and not batch.task.done():
                self._close(text, batch)  # nobody may join a batch that nobody waits for
                batch.task.cancel()  # ... and its statement is cancelled on the server
        query.served.batch = batch.runs
        # Runs that asked the same thing share one answer: each gets its own copy of it.
        return copy.deepcopy(value) if batch.joined[index] > 1 else value

    async def _send(self, text: str, batch: _Batch) -> None:
        try:
            outcomes = await self.inner.run_batch(batch.node, batch.params, lambda: self._close(text, batch))
        except asyncio.CancelledError:
            self._close(text, batch)
            _settle(batch, [], asyncio.CancelledError())
            raise
        except Exception as exc:
            self._close(text, batch)
            _settle(batch, [], exc)
            return
        if outcomes is None:  # the statement cannot be shared: remember, and run each alone
            self._alone.add(text)
            outcomes = await self._one_by_one(batch)
        elif len(batch.params) > 1:
            self.batches += 1
        _settle(batch, outcomes, None)

    async def _one_by_one(self, batch: _Batch) -> list[Outcome]:
        async def one(params: list[Any]) -> Outcome:
            try:
                return (await self.inner.run(Query(batch.node, [params])), None)
            except Exception as exc:
                return (None, exc)

        return list(await asyncio.gather(*(one(p) for p in batch.params)))

    def _close(self, text: str, batch: _Batch) -> None:
        batch.started.set()
        if self._pending.get(text) is batch:
            del self._pending[text]


def _settle(batch: _Batch, outcomes: list[Outcome], failure: BaseException | None) -> None:
    """Hand each member its outcome (or all of them `failure`)."""
    for index, future in enumerate(batch.futures):
        if future.done():
            continue
        value, error = outcomes[index] if failure is None else (None, failure)
        if isinstance(error, asyncio.CancelledError):
            future.cancel()
        elif error is not None:
            future.set_exception(error)
            if not batch.waiters[index]:
                future.exception()  # nobody waits for it any more: it is not a lost error
        else:
            future.set_result(value)


def _freeze(params: list[Any]) -> tuple[Any, ...] | None:
    """A hashable key for a member's parameters, or None (then it is never merged with another)."""
    try:
        key = tuple(params)
        hash(key)
    except TypeError:
        return None
    return key
