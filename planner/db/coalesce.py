"""Coalescing: the same statement of many concurrent runs sent as one (the group-commit pattern).

`CoalescingBackend` wraps a backend that can run a batch (`PoolBackend.run_batch`). A query
that finds a free connection goes at once, alone: coalescing adds nothing to an idle service.
A query that would wait for a connection joins the pending batch of its statement instead;
the batch's own task waits for one connection, closes the batch when it gets it, and sends
every member's parameters in one statement (`unnest ... WITH ORDINALITY` joined `LATERAL` to
the node's statement), then hands each member its own value.

What stays per run: each member awaits only its own result, so its cancellation (the run's
deadline, a fail-fast, the caller) ends its own wait; a member nobody waits for any more when
the batch gets its connection is left out of the statement, and the statement is cancelled on
the server only when no member waits any more. The node's `timeout` times statements, as it
does alone: the combined statement, and when that fails, each member's statement run again
alone, so that a slow or bad member times out or fails alone. Identical parameters in one
read batch are sent once (single-flight) and each run gets its own copy of the value (and of
the error). Only single statements proven pure are coalesced by default (by syntax and by the
server's catalog: `planner.lang.effects`, applied above this wrapper); a write only
with `coalesce: true` (`CompiledNode.coalesce`), and two writes with identical parameters
never share a statement. `PLANNER_COALESCE=0` turns coalescing off for the process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from planner.config import env_on
from planner.kinds.backend import (
    ALONE,
    ANSWER,
    Backend,
    Outcome,
    Query,
    WrappingBackend,
    freeze,
    own_error,
    private_copy,
)
from planner.lang.nodes import CompiledNode

logger = logging.getLogger("planner")

MAX_BATCH = 500  # runs sharing one read; more start the next batch
MAX_WRITE_BATCH = 32  # runs sharing one write: past this, the server's cost per member grows
# (one combined write holds every member's CTEs; planning it grows faster than its size)
MAX_ALONE = 1024  # statements remembered as impossible to share; past this the oldest is forgotten

# Statement text, fetch, timeout, read-only: what a batch's statement depends on (a statement
# whose verdict changed, `planner.lang.effects`, starts batches of its new kind).
_BatchKey = tuple[str, str, float | None, bool]


@dataclass(eq=False)
class _Batch:
    node: CompiledNode
    keys: dict[Hashable, int] = field(default_factory=dict)  # parameters -> member index
    params: list[list[Any]] = field(default_factory=list)
    waiters: list[int] = field(default_factory=list)  # runs still waiting, per member
    joined: list[int] = field(default_factory=list)  # runs that asked, per member
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    # Fixed when the batch gets its connection:
    members: list[int] | None = None  # the members sent (those still waited for), in `params` order
    sharing: list[int] = field(default_factory=list)  # runs waiting for each member then
    runs: int = 0  # runs sharing the statement then
    shared: bool = True  # False when the inner backend ran each member alone

    def admits(self, params: list[Any], limit: int) -> bool:
        """Whether a run with `params` may join. Two writes with the same parameters never
        share a statement: in one statement the second cannot see the first's rows (a
        find-or-create would find nothing and create nothing), which no order of two
        separate runs could give. A write whose parameters cannot be compared joins nobody."""
        if len(self.params) >= limit:
            return False
        if self.node.read_only:
            return True
        key = _freeze(params)
        return key is not None and key not in self.keys

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
        return index


class CoalescingBackend(WrappingBackend):
    """Coalesces the statements of concurrent runs (see the module's docstring)."""

    def __init__(self, inner: Backend, *, max_batch: int = MAX_BATCH, enabled: bool | None = None,
                 max_alone: int = MAX_ALONE) -> None:
        super().__init__(inner)
        self.max_batch = max_batch
        self.enabled = env_on("PLANNER_COALESCE") if enabled is None else enabled
        self._pending: dict[_BatchKey, _Batch] = {}
        # Statements the inner backend said cannot be batched, oldest first. Bounded: flows
        # edited and reloaded (or made from text per request) bring new texts for as long as
        # the process lives; a statement forgotten is only asked once more (nothing is sent).
        self._alone: dict[str, None] = {}
        self.max_alone = max_alone
        self.batches = 0  # statements sent for more than one run (a figure for benchmarks)
        self.alone = 0  # coalescible queries that found a free connection and went alone

    async def run(self, query: Query) -> Any:
        node = query.node
        if not node.coalesce or not self.enabled or ALONE.get():
            return await self.inner.run(query)
        text = node.statements[0].text
        # Runs share a batch only when they would send the same statement, fetch its rows the
        # same way and time it the same way: the batch runs with its first member's node.
        key: _BatchKey = (text, node.fetch, node.timeout, node.read_only)
        batch = self._pending.get(key)
        limit = self.max_batch if node.read_only else min(self.max_batch, MAX_WRITE_BATCH)
        if batch is None or not batch.admits(query.params[0], limit):
            if text in self._alone or self.inner.idle():
                self.alone += 1
                return await self.inner.run(query)  # a free connection: go now, alone
            batch = self._pending[key] = _Batch(node)
            batch.task = asyncio.get_running_loop().create_task(self._send(key, batch))
        index = batch.join(query.params[0])
        return await self._wait(key, batch, index, query)

    async def _wait(self, key: _BatchKey, batch: _Batch, index: int, query: Query) -> Any:
        # No timer here: the node's timeout times the statements (see `PoolBackend.run_batch`),
        # and the wait for a connection is bounded by the run's deadline only, as alone.
        error: Exception | None = None
        try:
            value = await asyncio.shield(batch.futures[index])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        finally:
            batch.waiters[index] -= 1
            if not any(batch.waiters) and batch.task is not None and not batch.task.done():
                self._close(key, batch)  # nobody may join a batch that nobody waits for
                batch.task.cancel()  # ... and its statement is cancelled on the server
            if batch.members is not None:
                query.served.batch = batch.runs if batch.shared else batch.sharing[index]
        # Runs that asked the same thing share one answer: each gets its own copy of it.
        shared = batch.joined[index] > 1
        if error is not None:
            raise own_error(error) if shared else error
        return private_copy(value) if shared else value

    async def _send(self, key: _BatchKey, batch: _Batch) -> None:
        outcomes: list[Outcome] | None = None
        failure: BaseException | None = None
        try:
            # Members answered before the batch is over (a read batch split because it ran long)
            # get their values at once: `_answer`.
            answering = ANSWER.set(lambda position, outcome: _answer(batch, position, outcome))
            try:
                outcomes = await self.inner.run_batch(batch.node, batch.params, lambda: self._start(key, batch))
            finally:
                ANSWER.reset(answering)
            if outcomes is None:  # the statement cannot be shared: remember, and run each alone
                self._unshareable(key[0])
                batch.shared = False
                outcomes = await self._one_by_one(batch)
            elif batch.runs > 1:
                self.batches += 1
        except asyncio.CancelledError:
            failure = asyncio.CancelledError()
            raise
        except Exception as exc:
            failure = exc
        finally:
            self._close(key, batch)
            _settle(batch, outcomes, failure)

    def _unshareable(self, text: str) -> None:
        alone = self._alone
        alone[text] = None
        while len(alone) > self.max_alone:
            del alone[next(iter(alone))]

    def _start(self, key: _BatchKey, batch: _Batch) -> None:
        """The batch has its connection: close it, and leave out the members nobody waits for
        any more (a run cancelled while it waited must not write, as it would not have alone).
        `params` is pruned in place: the inner backend reads it after calling this."""
        self._close(key, batch)
        batch.members = [i for i, waiting in enumerate(batch.waiters) if waiting]
        batch.sharing = list(batch.waiters)
        batch.runs = sum(batch.waiters)
        batch.params[:] = [batch.params[i] for i in batch.members]

    async def _one_by_one(self, batch: _Batch) -> list[Outcome]:
        async def one(params: list[Any]) -> Outcome:
            try:
                return (await self.inner.run(Query(batch.node, [params])), None)
            except Exception as exc:
                return (None, exc)

        return list(await asyncio.gather(*(one(p) for p in batch.params)))

    def _close(self, key: _BatchKey, batch: _Batch) -> None:
        if self._pending.get(key) is batch:
            del self._pending[key]


def _answer(batch: _Batch, position: int, outcome: Outcome) -> None:
    """Member `position` of the statement sent (the order of `params` once it started) has its
    outcome before the batch is over: its runs get it now (`_settle` leaves it alone later)."""
    if batch.members is None or not 0 <= position < len(batch.members):
        return
    index = batch.members[position]
    future = batch.futures[index]
    value, error = outcome
    if future.done() or isinstance(error, asyncio.CancelledError):
        return  # a cancellation is the batch's to settle
    if error is not None:
        future.set_exception(error)
        if not batch.waiters[index]:
            future.exception()  # nobody waits for it any more: it is not a lost error
    else:
        future.set_result(value)


def _settle(batch: _Batch, outcomes: list[Outcome] | None, failure: BaseException | None) -> None:
    """Hand each member its outcome, or all of them `failure`: one error object per member
    (its runs raise it, writing its traceback). A member left out of the statement (nobody
    waits for it) is cancelled."""
    members = batch.members if batch.members is not None else list(range(len(batch.futures)))
    if failure is None and (outcomes is None or len(outcomes) != len(members)):
        failure = RuntimeError("the batch ended without an outcome for every run")  # a backend's bug
    given: dict[int, Outcome] = {}
    if failure is None and outcomes is not None:
        given = dict(zip(members, outcomes, strict=True))
    handed: set[int] = set()  # the errors given to a member already: another member gets a copy
    for index, future in enumerate(batch.futures):
        if future.done():
            continue
        if failure is None and index not in given:
            future.cancel()
            continue
        value, error = (None, failure) if failure is not None else given[index]
        if isinstance(error, asyncio.CancelledError):
            future.cancel()
        elif error is not None:
            if id(error) in handed:
                error = own_error(error)
            handed.add(id(error))
            future.set_exception(error)
            if not batch.waiters[index]:
                future.exception()  # nobody waits for it any more: it is not a lost error
        else:
            future.set_result(value)


def _freeze(params: list[Any]) -> Hashable | None:
    """A member's key (`planner.kinds.backend.freeze`), or None when a parameter cannot be hashed:
    such a member is never merged with another."""
    try:
        return freeze(params)
    except TypeError:
        return None
