"""When a shared statement (a read batch of many runs, or the fused reads of one run) fails or
times out, its members run again alone: all at once, each on a connection of its own, and
every connection goes back to the pool, cancelled or not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from planner import NodeTimeout, load_flow
from planner.db.pool import PoolBackend
from planner.kinds.backend import Outcome, Query

# This module is about another mechanism: nodes run as they would without compiled groups.
pytestmark = pytest.mark.usefixtures("uncompiled")

# Read-only as far as planner can tell (a STABLE function of the user's), and slow on demand.
SLOW_ECHO = """
CREATE FUNCTION slow_echo(v int, ms int) RETURNS int STABLE LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_sleep(ms / 1000.0); RETURN v; END $$
"""
# How each member's statement shows in pg_stat_activity when it runs alone (the shared
# statements start with `SELECT "?b"` or `WITH m1`).
ALONE = "SELECT slow_echo(%"


@pytest.fixture
async def slow_dsn(demo_dsn: str) -> AsyncIterator[str]:
    con = await asyncpg.connect(demo_dsn)
    try:
        await con.execute(SLOW_ECHO)
    finally:
        await con.close()
    yield demo_dsn


async def _running(con: asyncpg.Connection, pattern: str) -> int:
    return int(await con.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
        "AND pid <> pg_backend_pid() AND query LIKE $1", pattern))


async def _most_at_once(dsn: str, work: asyncio.Task[Any], pattern: str = ALONE) -> int:
    """The most statements matching `pattern` seen running at once while `work` runs."""
    con = await asyncpg.connect(dsn)
    most = 0
    try:
        while not work.done():
            most = max(most, await _running(con, pattern))
            await asyncio.sleep(0.02)
    finally:
        await con.close()
    return most


ECHO = """
inputs: {v: int, ms: int}
nodes:
  q: {sql: "SELECT slow_echo($v::int, $ms::int) AS v", fetch: value, timeout: 1s}
"""


async def _batch_of_slow_members(dsn: str, pool: int, slow: int) -> tuple[list[Outcome] | None, int]:
    """A read batch of `slow` members slower than their timeout (so the combined statement
    times out) and one quick member, on a pool of `pool`: its outcomes, and the most of its
    members seen running again at once."""
    node = load_flow(text=ECHO, name="batch").nodes["q"]
    backend = PoolBackend(dsn=dsn, min_size=1, max_size=pool)
    try:
        members = [[v, 5000] for v in range(1, slow + 1)] + [[0, 0]]
        batch = asyncio.create_task(backend.run_batch(node, members, lambda: None))
        most = await _most_at_once(dsn, batch)
        outcomes = await batch
    finally:
        await backend.close()
    assert outcomes is not None and outcomes[slow] == (0, None)  # the quick one has its value
    assert all(isinstance(error, NodeTimeout) for _, error in outcomes[:slow])
    return outcomes, most


@pytest.mark.slow  # waits out a timeout of slow statements
async def test_a_timed_out_read_batch_runs_its_members_again_at_once(slow_dsn: str) -> None:
    _, most = await _batch_of_slow_members(slow_dsn, pool=8, slow=3)
    # The slow ones ran again side by side, not one after the other (the quick one, the same
    # statement, may be seen beside them for a moment): within half the pool of 8.
    assert 3 <= most <= 4


@pytest.mark.slow  # members sleep on the server until a timeout
async def test_a_failed_batch_runs_again_at_most_half_the_pool_at_once(slow_dsn: str) -> None:
    # A big batch that failed (often: the server is slow) must not put all its members ahead
    # of every other run waiting for a connection.
    _, most = await _batch_of_slow_members(slow_dsn, pool=4, slow=5)
    assert most == 2  # half the pool of 4, never more


@pytest.mark.slow  # waits out a 1 s timeout of 5 s statements
async def test_a_timed_out_fused_group_runs_its_members_again_at_once(slow_dsn: str) -> None:
    nodes = load_flow(text="""
        nodes:
          a: {sql: "SELECT slow_echo(1, 5000) AS a", fetch: value, timeout: 1s}
          b: {sql: "SELECT slow_echo(2, 5000) AS b", fetch: value, timeout: 1s}
          c: {sql: "SELECT slow_echo(3, 0) AS c", fetch: value, timeout: 1s}
        """, name="fused").nodes
    backend = PoolBackend(dsn=slow_dsn, min_size=1, max_size=5)
    try:
        run = object()
        fused = asyncio.create_task(backend.run_fused([Query(nodes[n], [[]], run=run) for n in ("a", "b", "c")]))
        most = await _most_at_once(slow_dsn, fused)
        outcomes = await fused
    finally:
        await backend.close()
    assert outcomes is not None and outcomes[2] == (3, None)
    assert most == 2


async def test_a_batch_cancelled_while_its_members_run_again_gives_every_connection_back(slow_dsn: str) -> None:
    node = load_flow(text="""
        inputs: {v: int, ms: int}
        nodes:
          q: {sql: "SELECT slow_echo($v::int, $ms::int) AS v", fetch: value, timeout: 500ms}
        """, name="cancelled").nodes["q"]
    backend = PoolBackend(dsn=slow_dsn, min_size=1, max_size=3)
    try:
        batch = asyncio.create_task(backend.run_batch(node, [[n, 10_000] for n in range(6)], lambda: None))
        con = await asyncpg.connect(slow_dsn)
        try:
            running = 0
            for _ in range(200):  # the combined statement timed out: its members run alone
                running = await _running(con, ALONE)
                if running:
                    break
                await asyncio.sleep(0.02)
            # Asked once: a member run again on a new connection is prepared first, and between
            # its Parse and its Execute the server shows it idle for a moment.
            assert running
            batch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await batch
            await backend.drain()
            pool = await backend.pool()
            assert pool.get_idle_size() == pool.get_size()  # every connection back
            for _ in range(100):  # a cancel request is asynchronous: give the server a moment
                left = await _running(con, "%slow_echo%")
                if not left:
                    break
                await asyncio.sleep(0.05)
            assert left == 0
        finally:
            await con.close()
    finally:
        await backend.close()
