"""Planners over `CoalescingBackend(Spy(PoolBackend))` whose batches a test forces: every
connection of the pool is held by a statement blocked on a table lock the test holds (a gate);
N runs start, and once all N have reached the coalescer (they wait, so they have joined one
batch) the gate opens. For tests/db/ (coalescing, combined writes, batch splitting); the
`stacks` fixture is in tests/db/conftest.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from asyncpg.connection import LoggedQuery

from planner import FlowFailed, FlowResult, Planner
from planner.db.coalesce import CoalescingBackend
from planner.db.pool import PoolBackend
from planner.kinds.backend import Outcome, Query, WrappingBackend
from planner.lang.nodes import CompiledNode

Write = Callable[..., Path]

HOLD = """
inputs: {s: float}
nodes:
  hold: {sql: "SELECT pg_sleep($s)", fetch: value}   # pg_sleep has effects: never coalesced
"""
GATE = """
nodes:
  wait: {sql: "SELECT count(*) FROM {table}", fetch: value, coalesce: false}   # blocks while the test locks {table}
"""

# Read-only as far as planner can tell (a STABLE function of the user's), and slow on demand.
SLOW_ECHO = """
CREATE FUNCTION slow_echo(v int, ms int) RETURNS int STABLE LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_sleep(ms / 1000.0); RETURN v; END $$
"""


class Entry(WrappingBackend):
    """Counts the queries that reach the coalescer, by flow: a query counted here has joined its batch
    (or gone alone), for `CoalescingBackend.run` joins before it first awaits."""

    def __init__(self, inner: CoalescingBackend) -> None:
        super().__init__(inner)
        self.flows: list[str] = []

    async def run(self, query: Query) -> Any:
        self.flows.append(query.node.flow)
        return await self.inner.run(query)

    def count(self) -> int:
        return sum(1 for flow in self.flows if not flow.startswith("gate"))


@dataclass
class Gate:
    """Statements holding connections, blocked until `release()`."""

    con: asyncpg.Connection
    holders: list[asyncio.Task[FlowResult]]

    async def release(self) -> None:
        await self.con.close()  # its transaction ends, and its lock with it
        await asyncio.gather(*self.holders)


class Spy(WrappingBackend):
    """Records what reaches the pool: each batch's parameters as sent (as the coalescer's
    `batches`), each statement of one run (as the backend under it)."""

    def __init__(self, inner: PoolBackend) -> None:
        super().__init__(inner)
        self.pool = inner
        self.sent: list[list[list[Any]]] = []  # per batch that got its connection: its members' parameters
        self.shared: list[bool] = []  # per batch: whether it was sent as one statement
        self.single: list[list[Any]] = []  # parameters of statements sent for one run each

    async def run(self, query: Query) -> Any:
        self.single.append(query.params[0] if query.params else [])
        return await self.inner.run(query)

    def idle(self, share: float = 1.0) -> bool:
        return self.pool.idle(share)

    async def run_batch(self, node: CompiledNode, params: list[list[Any]],
                        started: Callable[[], None]) -> list[Outcome] | None:
        def on_start() -> None:
            started()
            self.sent.append([list(p) for p in params])

        outcomes = await self.pool.run_batch(node, params, on_start)
        self.shared.append(outcomes is not None)
        return outcomes


@dataclass
class Stack:
    """A planner over `CoalescingBackend(Spy(PoolBackend))` with a pool of `size` connections."""

    planner: Planner
    coalescer: CoalescingBackend
    spy: Spy
    entry: Entry
    pool: PoolBackend
    size: int
    dsn: str
    log: list[LoggedQuery] = field(default_factory=list)  # every statement the pool's connections ran

    async def watch(self) -> None:
        """Log what every connection of the pool runs (and how it ended) into `log`."""
        if self.log:
            return
        pool = await self.pool.pool()
        connections = [await pool.acquire() for _ in range(self.size)]
        for con in connections:
            con.add_query_logger(self.log.append)
            await pool.release(con)
        self.log.append(LoggedQuery("-- watching", (), None, 0.0, None, None, None))

    def combined(self) -> list[LoggedQuery]:
        """The combined statements sent (reads and writes), in order."""
        return [q for q in self.log if '"?ord"' in q.query]

    def failed(self) -> list[LoggedQuery]:
        return [q for q in self.log if q.exception is not None]

    def load(self, *names: str) -> None:
        for name in names:
            self.planner.load(name)  # compiled before the runs start: they reach the pool together

    async def hold(self, table: str = "gate", connections: int | None = None) -> Gate:
        """Take `connections` (all) of the pool until the gate is released; returns once they are taken."""
        self.load(table)
        await self.watch()
        con = await asyncpg.connect(self.dsn)
        await con.execute(f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        holders = [asyncio.create_task(self.planner.run(table)) for _ in range(connections or self.size)]
        await until(lambda: self.entry.flows.count(table) == len(holders))
        return Gate(con, holders)

    async def joined(self, queries: int) -> None:
        """Wait until `queries` more queries of the test's flows have reached the coalescer."""
        await until(lambda: self.entry.count() >= queries)

    async def batched(self, runs: Iterable[tuple[str, dict[str, Any]]], queries: int | None = None) -> list[FlowResult]:
        """Start `runs` while the pool is held; open the gate once their first `queries` (one
        per run) have joined: they share statements."""
        runs = list(runs)
        self.load(*{flow for flow, _ in runs})
        gate = await self.hold()
        before = self.entry.count()
        tasks = [asyncio.create_task(outcome(self.planner.run(flow, inputs))) for flow, inputs in runs]
        await self.joined(before + (len(runs) if queries is None else queries))
        await gate.release()
        return list(await asyncio.gather(*tasks))

    async def assert_clean(self) -> None:
        await assert_clean(self.planner, self.dsn)


async def until(condition: Callable[[], Any], seconds: float = 5.0) -> None:
    """Wait until `condition()` holds (polled: what it watches has no event to wait on)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition never held")
        await asyncio.sleep(0.002)


async def outcome(run: Any) -> FlowResult:
    try:
        return await run  # type: ignore[no-any-return]
    except FlowFailed as exc:
        return exc.result


async def assert_clean(planner: Planner, dsn: str) -> None:
    """Every connection back in the pool, and no statement of this database still running."""
    await planner.stack.primary.drain()
    pool = await planner.stack.primary.pool()
    assert pool.get_idle_size() == pool.get_size(), "a connection was not returned"
    con = await asyncpg.connect(dsn)
    try:
        for _ in range(60):  # a cancel request is asynchronous: give the server a moment
            active = await con.fetch("SELECT query FROM pg_stat_activity WHERE datname = current_database() "
                                     "AND pid <> pg_backend_pid() AND state <> 'idle'")
            if not active:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"statements left running: {[r['query'] for r in active]}")
    finally:
        await con.close()


async def run_ddl(dsn: str, ddl: str) -> None:
    """Run `ddl` on a connection of its own (a lock it waits for fails it after 20 s)."""
    con = await asyncpg.connect(dsn)
    try:
        # A connection left holding the table's lock fails the test instead of hanging it.
        await con.execute("SET lock_timeout = '20s'")
        await con.execute(ddl)
    finally:
        await con.close()


async def fetch_rows(dsn: str, sql: str) -> list[dict[str, Any]]:
    """The rows of `sql`, as dicts, on a connection of its own."""
    con = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await con.fetch(sql)]
    finally:
        await con.close()
