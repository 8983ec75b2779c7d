"""A migration between two shared statements: what PoolBackend learnt of a statement before it
(a fused read's columns, a read batch's parameter types) is learnt again, never used stale."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from asyncpg.connection import LoggedQuery

from planner import load_flow
from planner.db.pool import PoolBackend
from planner.kinds.backend import Query

# This module is about another mechanism: nodes run as they would without compiled groups.
pytestmark = pytest.mark.usefixtures("uncompiled")

READS = """
inputs: {id: int}
nodes:
  star: {sql: "SELECT * FROM migrated WHERE id = $id", fetch: one}
  count: {sql: "SELECT count(*) FROM migrated", fetch: value}
"""


class Logged:
    """A backend of one connection whose every statement (and how it ended) is logged."""

    def __init__(self, backend: PoolBackend) -> None:
        self.backend = backend
        self.log: list[LoggedQuery] = []

    async def watch(self) -> None:
        pool = await self.backend.pool()
        con = await pool.acquire()
        con.add_query_logger(self.log.append)
        await pool.release(con)

    def last(self, marker: str) -> LoggedQuery:
        return [q for q in self.log if marker in q.query][-1]


@pytest.fixture
async def logged(demo_dsn: str) -> AsyncIterator[Logged]:
    con = await asyncpg.connect(demo_dsn)
    try:
        await con.execute("CREATE TABLE migrated (id int PRIMARY KEY, a text, flag int); "
                          "INSERT INTO migrated VALUES (1, 'x', 1), (2, 'y', 0)")
    finally:
        await con.close()
    backend = Logged(PoolBackend(dsn=demo_dsn, min_size=1, max_size=1))
    await backend.watch()
    try:
        yield backend
    finally:
        await backend.backend.close()


async def _migrate(dsn: str, statement: str) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(statement)
    finally:
        await con.close()


async def _fused(backend: PoolBackend) -> list[Any]:
    nodes = load_flow(text=READS, name="reads").nodes
    run = object()
    outcomes = await backend.run_fused([Query(nodes["star"], [[1]], run=run), Query(nodes["count"], [[]], run=run)])
    assert outcomes is not None
    return [value for value, _ in outcomes]


@pytest.mark.parametrize(("migration", "star"), [
    ("ALTER TABLE migrated ADD COLUMN b int DEFAULT 7", {"id": 1, "a": "x", "flag": 1, "b": 7}),
    ("ALTER TABLE migrated RENAME COLUMN a TO renamed", {"id": 1, "renamed": "x", "flag": 1}),
    ("ALTER TABLE migrated DROP COLUMN a", {"id": 1, "flag": 1}),
], ids=["add", "rename", "drop"])
async def test_a_fused_read_after_a_migration_has_the_new_columns(logged: Logged, demo_dsn: str,
                                                                  migration: str, star: dict[str, Any]) -> None:
    assert await _fused(logged.backend) == [{"id": 1, "a": "x", "flag": 1}, 2]
    await _migrate(demo_dsn, migration)
    assert await _fused(logged.backend) == [star, 2]
    assert await _fused(logged.backend) == [star, 2]
    assert logged.last("WITH m1").exception is None  # fused again, not a fused statement failing each time


async def test_a_read_batch_after_a_type_change_is_shared_again(logged: Logged, demo_dsn: str) -> None:
    node = load_flow(text="""
        inputs: {flag: int}
        nodes:
          q: {sql: "SELECT count(*) FROM migrated WHERE flag = $flag", fetch: value}
        """, name="batch").nodes["q"]
    assert await logged.backend.run_batch(node, [[1], [0]], lambda: None) == [(1, None), (1, None)]
    await _migrate(demo_dsn, "ALTER TABLE migrated ALTER COLUMN flag TYPE bool USING flag <> 0")
    # The parameter is a boolean now; the combined statement written before says integer[].
    assert await logged.backend.run_batch(node, [[True], [False]], lambda: None) == [(1, None), (1, None)]
    assert await logged.backend.run_batch(node, [[True], [False]], lambda: None) == [(1, None), (1, None)]
    assert logged.last('"?ord"').exception is None  # one statement for the batch again, not each run alone
