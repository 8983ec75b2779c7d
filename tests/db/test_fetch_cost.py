"""Fused and batched members keep their fetch's cost (#19, item 5).

Alone, a node fetched `one` or `value` asks the server for one row, and a plan that can stop
there does: a scan reads up to the first row that matches. A member of a batch (runs sharing
one statement, `PoolBackend.run_batch`) or of a fused group (the reads of one run in one
statement, `PoolBackend.run_fused`) must cost no more: fused, such a read used to materialize
every row of its statement (2 ms alone, 3.1 s fused on a large result).

The rows each path reads are counted by the server: the exact text each path sends, run the
way that path runs it, on a connection of the test's own inside a transaction, whose
`pg_stat_xact_user_tables` counts the table rows it read. The table has no index, so every plan
is a sequential scan and the counts do not depend on the planner's choice of index.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner import load_flow
from planner.db.pool import PoolBackend
from planner.db.shared import _fetch
from planner.kinds.backend import Query
from planner.lang.nodes import CompiledNode

STATEMENTS = [
    "SELECT id, k FROM cost_t WHERE k >= $k",
    "SELECT id FROM cost_t WHERE k = $k",
    "SELECT k, id FROM cost_t WHERE k <= $k ORDER BY id DESC",  # a sort reads every row on every path
    "SELECT id, k * 2 AS twice FROM cost_t WHERE k > $k -- a comment at the end",
    "SELECT count(*) AS n FROM cost_t WHERE k < $k;",
]


@pytest.fixture
async def cost_db(demo_dsn: str) -> AsyncIterator[str]:
    con = await asyncpg.connect(demo_dsn)
    try:
        await con.execute("CREATE TABLE cost_t (id int NOT NULL, k int NOT NULL)")
    finally:
        await con.close()
    yield demo_dsn


def _node(sql: str, fetch: str) -> CompiledNode:
    flow = load_flow(text=f"inputs: {{k: int}}\nnodes:\n  q: {{sql: {sql!r}, fetch: {fetch}}}\n", name="cost")
    return flow.nodes["q"]


async def _rows_read(con: asyncpg.Connection, work: Callable[[], Awaitable[Any]]) -> tuple[int, Any]:
    """The table rows `work` read (as the server counts them), and what it returned."""
    # The counts are the backend's not yet reported to the server's totals, which may include
    # earlier transactions': a difference, inside one transaction (none is reported during one).
    count = ("SELECT coalesce(sum(seq_tup_read + coalesce(idx_tup_fetch, 0)), 0) "
             "FROM pg_stat_xact_user_tables WHERE relname = 'cost_t'")
    transaction = con.transaction()
    await transaction.start()
    try:
        before = await con.fetchval(count)
        value = await work()
        read = await con.fetchval(count) - before
    finally:
        await transaction.rollback()
    return int(read), value


@pytest.mark.slow  # 40 generated batches, each run three ways
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ks=st.lists(st.integers(0, 9), max_size=80), sql=st.sampled_from(STATEMENTS),
       fetch=st.sampled_from(["one", "value", "all"]), members=st.lists(st.integers(-1, 10), min_size=2, max_size=4))
async def test_batched_and_fused_members_read_no_more_rows_than_alone(
        cost_db: str, ks: list[int], sql: str, fetch: str, members: list[int]) -> None:
    node = _node(sql, fetch)
    backend = PoolBackend(dsn=cost_db)  # its text caches only: the test's connection runs the statements
    con = await asyncpg.connect(cost_db)
    try:
        await con.execute("TRUNCATE cost_t")
        await con.execute("INSERT INTO cost_t SELECT i, k FROM unnest($1::int[]) WITH ORDINALITY AS u(k, i)", ks)
        alone_read, alone = 0, []
        for k in members:
            def alone_one(k: int = k) -> Awaitable[Any]:
                return _fetch(con, fetch, node.sql.statements[0], [k])

            read, value = await _rows_read(con, alone_one)
            alone_read += read
            alone.append(value)
        batched_read, batched = await _rows_read(con, lambda: backend.shared._batch_on(con, node, [[k] for k in members]))
        fused_read, fused = await _rows_read(con, lambda: backend.fused._fused_on(con, [Query(node, [[k]]) for k in members]))
    finally:
        await con.close()
    assert batched == [(value, None) for value in alone]
    assert fused == [(value, None) for value in alone]
    assert batched_read <= alone_read
    assert fused_read <= alone_read


@pytest.mark.parametrize("fetch", ["one", "value"])
async def test_a_fused_read_of_one_row_stops_at_its_first_row(cost_db: str, fetch: str) -> None:
    # The case: a read whose statement matches every row of a large table.
    node = _node("SELECT id, k FROM cost_t WHERE k >= $k", fetch)
    backend = PoolBackend(dsn=cost_db)
    con = await asyncpg.connect(cost_db)
    try:
        await con.execute("INSERT INTO cost_t SELECT g, g % 10 FROM generate_series(1, 20000) g")
        read, outcomes = await _rows_read(con, lambda: backend.fused._fused_on(con, [Query(node, [[0]]), Query(node, [[5]])]))
    finally:
        await con.close()
    assert read == 1 + 5  # the first row with k >= 0, and the first (id 5) with k >= 5
    assert [value for value, _ in outcomes] == ([{"id": 1, "k": 1}, {"id": 5, "k": 5}] if fetch == "one" else [1, 5])
