"""A statement that fails before it is sent (a value asyncpg cannot encode, after its Parse) or a
statement prepared and never run leaves no connection inside an open implicit transaction
(`planner.db.synced`): alone, in a combined read or write, fused, described, behind PgBouncer.

The state is read on the server: `pg_stat_activity` (no backend of the test's database but the
observer's in a transaction or not idle) and `pg_locks` (no lock on the flow's table)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from planner import CacheOptions, FlowFailed, FlowResult, NodeState, Planner, PoolOptions, QueryError
from planner.db.pool import PoolBackend
from tests.support.pgbouncer import PgBouncer

Write = Callable[..., Path]

WRITES = """
inputs: {k: int, label: json}
nodes:
  put:
    sql: INSERT INTO labels (k, label) VALUES ($k, $label) RETURNING k
    fetch: value
"""
READS = """
inputs: {label: json}
nodes:
  a: {sql: "SELECT count(*) FROM labels WHERE label = $label", fetch: value}
  b: {sql: "SELECT count(*) FROM labels WHERE k > 0", fetch: value}
"""


@pytest.fixture
async def labels(demo_dsn: str) -> str:
    con = await asyncpg.connect(demo_dsn)
    try:
        await con.execute("CREATE TABLE labels (k int PRIMARY KEY, label text)")
    finally:
        await con.close()
    return demo_dsn


async def outcome(run: Awaitable[FlowResult]) -> FlowResult:
    try:
        return await run
    except FlowFailed as exc:
        return exc.result


async def left_open(dsn: str) -> list[dict[str, Any]]:
    """Backends of `dsn`'s database (the observer's aside) in a transaction or not idle, and
    the locks they hold on `labels`."""
    con = await asyncpg.connect(dsn)
    try:
        active = await con.fetch(
            "SELECT pid, state, wait_event, xact_start IS NOT NULL AS in_xact, query FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND (state <> 'idle' OR xact_start IS NOT NULL)")
        locks = await con.fetch("SELECT pid, mode FROM pg_locks WHERE relation = 'labels'::regclass "
                                "AND pid <> pg_backend_pid()")
        return [dict(r) for r in active] + [dict(r) for r in locks]
    finally:
        await con.close()


async def test_a_value_that_cannot_be_encoded_leaves_no_open_transaction_on_the_connection(
        labels: str, write_flow: Write, tmp_path: Path) -> None:
    write_flow(WRITES, name="writes")
    async with Planner(flows=tmp_path, dsn=labels, pool_options=PoolOptions(min_size=1, max_size=1), cache_options=CacheOptions(size=0)) as planner:
        result = await outcome(planner.run("writes", {"k": 1, "label": 5}))
        assert result.nodes["put"].state is NodeState.DEFAULTED
        assert isinstance(result.nodes["put"].error, QueryError)
        await planner.stack.primary.drain()
        assert await left_open(labels) == []


async def test_the_next_run_on_the_connection_is_not_inside_the_failed_statements_transaction(
        labels: str, write_flow: Write, tmp_path: Path) -> None:
    write_flow(WRITES, name="writes")
    write_flow("nodes:\n  t: {sql: 'SELECT now()', fetch: value}\n", name="clock")
    async with Planner(flows=tmp_path, dsn=labels, pool_options=PoolOptions(min_size=1, max_size=1), cache_options=CacheOptions(size=0)) as planner:
        await outcome(planner.run("writes", {"k": 1, "label": 5}))
        observer = await asyncpg.connect(labels)
        try:
            between = await observer.fetchval("SELECT clock_timestamp()")
        finally:
            await observer.close()
        # In the implicit transaction the failed Parse began, now() is the time of that Parse.
        assert (await planner.run("clock")).values["t"] >= between
        assert (await planner.run("writes", {"k": 2, "label": "b"})).values["put"] == 2


async def test_a_fused_member_that_cannot_be_encoded_leaves_no_open_transaction(
        labels: str, write_flow: Write, tmp_path: Path) -> None:
    write_flow(READS, name="reads")
    async with Planner(flows=tmp_path, dsn=labels, pool_options=PoolOptions(min_size=2, max_size=2), cache_options=CacheOptions(size=0)) as planner:
        result = await outcome(planner.run("reads", {"label": 5}))
        assert result.nodes["a"].state is NodeState.DEFAULTED
        assert result.values["b"] == 0
        await planner.stack.primary.drain()
        assert await left_open(labels) == []


async def test_a_statement_described_and_never_run_leaves_no_open_transaction(labels: str) -> None:
    backend = PoolBackend(dsn=labels, min_size=1, max_size=1)
    try:
        described = await backend.describe("INSERT INTO labels (k, label) VALUES ($1, $2)")
        assert described.parameter_types == ("int4", "text")
        assert await left_open(labels) == []
    finally:
        await backend.close()


async def test_behind_pgbouncer_a_value_that_cannot_be_encoded_leaves_no_open_transaction(
        labels: str, write_flow: Write, tmp_path: Path, pgbouncer: PgBouncer) -> None:
    write_flow(WRITES, name="writes")
    async with Planner(flows=tmp_path, dsn=pgbouncer.dsn(labels), pool_options=PoolOptions(min_size=1, max_size=1), cache_options=CacheOptions(size=0)) as planner:
        result = await outcome(planner.run("writes", {"k": 1, "label": 5}))
        assert result.nodes["put"].state is NodeState.DEFAULTED
        await planner.stack.primary.drain()
        assert await left_open(labels) == []
        assert (await planner.run("writes", {"k": 2, "label": "b"})).values["put"] == 2
