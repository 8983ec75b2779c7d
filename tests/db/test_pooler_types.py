"""Behind PgBouncer (transaction mode) a kept statement description never decodes a wrong value.

planner keeps what the server said of a statement and sends it unnamed again with each use
(`planner.db.pooler.PoolerConnection`); each use is checked on the wire (`planner.db.wire`). After a
migration between two runs, the second run gets the right value (a read runs again, described
afresh) or a clear error naming the column (a write, or a read calling a volatile function),
never a value decoded with the old types. See docs/reliability.md, "Stale descriptions".

Every test runs the statement once (described and kept), migrates with another connection,
and runs it again on the same single connection, within the description's lifetime.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from planner import CacheOptions, FlowFailed, Planner, PoolOptions, QueryError, load_flow
from planner.db.pool import PoolBackend
from planner.kinds.backend import Query
from planner.lang.sqlinfo import combine_writes
from tests.support.pgbouncer import PgBouncer


@pytest.fixture(autouse=True)
def _descriptions_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("planner.db.pooler.DESCRIBED_S", 3600.0)  # the second run reuses the first one's description


@pytest.fixture
async def admin(demo_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    con = await asyncpg.connect(demo_dsn)
    try:
        yield con
    finally:
        await con.close()


@pytest.fixture
async def pooled(demo_dsn: str, pgbouncer: PgBouncer) -> AsyncIterator[Planner]:
    async with Planner(dsn=pgbouncer.dsn(demo_dsn), pool_options=PoolOptions(min_size=1, max_size=1), cache_options=CacheOptions(size=0)) as planner:
        assert planner.pools["primary"].pooler == "transaction"
        yield planner


def _flow(sql: str, fetch: str = "value", **extra: Any) -> Any:
    node = {"sql": sql, "fetch": fetch, "on_error": "fail", **extra}
    return load_flow(text=json.dumps({"inputs": {"k": "int"}, "nodes": {"r": node}}), name="r")


async def _value(planner: Planner, flow: Any, k: int = 1) -> Any:
    return (await planner.run(flow, {"k": k})).values["r"]


# --- a read gets the right value ------------------------------------------------------------------

SAME_WIDTH = [
    # (column type before, value before, migration, value stored after, value expected after)
    ("int8", 7, "ALTER TABLE pt ALTER COLUMN v TYPE float8", 1.5, 1.5),
    ("int4", 7, "ALTER TABLE pt ALTER COLUMN v TYPE float4", 2.5, 2.5),
    ("float8", 1.5, "ALTER TABLE pt ALTER COLUMN v TYPE int8", 9, 9),
    ("date", datetime.date(2026, 1, 2), "ALTER TABLE pt ALTER COLUMN v TYPE int4 USING 5", 6, 6),
    ("text", "a", "ALTER TABLE pt ALTER COLUMN v TYPE varchar(20)", "b", "b"),
    ("int4", 7, "ALTER TABLE pt ALTER COLUMN v TYPE text", "x", "x"),
]


@pytest.mark.parametrize(("before", "first", "migration", "stored", "after"), SAME_WIDTH,
                         ids=[f"{c[0]}->{c[2].split()[-1] if 'USING' not in c[2] else 'int4'}" for c in SAME_WIDTH])
async def test_a_read_after_a_column_type_change_gets_the_new_value(
        pooled: Planner, admin: asyncpg.Connection, before: str, first: Any, migration: str, stored: Any,
        after: Any) -> None:
    await admin.execute(f"CREATE TABLE pt (id int PRIMARY KEY, v {before})")
    await admin.execute("INSERT INTO pt VALUES (1, $1)", first)
    flow = _flow("SELECT v FROM pt WHERE id = $k")
    assert await _value(pooled, flow) == first
    await admin.execute(migration)
    await admin.execute("UPDATE pt SET v = $1 WHERE id = 1", stored)
    value = await _value(pooled, flow)
    assert value == after and type(value) is type(after)


async def test_a_timestamp_that_becomes_timestamptz_keeps_its_zone(pooled: Planner, admin: asyncpg.Connection) -> None:
    await admin.execute("CREATE TABLE pt (id int PRIMARY KEY, at timestamp)")
    await admin.execute("INSERT INTO pt VALUES (1, '2026-12-06 10:00:00')")
    flow = _flow("SELECT at FROM pt WHERE id = $k")
    assert await _value(pooled, flow) == datetime.datetime(2026, 12, 6, 10, 0)
    await admin.execute("ALTER TABLE pt ALTER COLUMN at TYPE timestamptz USING at AT TIME ZONE 'UTC'")
    value = await _value(pooled, flow)
    assert value == datetime.datetime(2026, 12, 6, 10, 0, tzinfo=datetime.UTC)
    assert value.tzinfo is not None


async def test_a_row_read_with_a_column_added_and_one_dropped_has_the_new_columns(
        pooled: Planner, admin: asyncpg.Connection) -> None:
    await admin.execute("CREATE TABLE pt (id int PRIMARY KEY, a int8, b text)")
    await admin.execute("INSERT INTO pt VALUES (1, 10, 'x')")
    flow = _flow("SELECT * FROM pt WHERE id = $k", fetch="one")
    assert await _value(pooled, flow) == {"id": 1, "a": 10, "b": "x"}
    await admin.execute("ALTER TABLE pt ADD COLUMN c float8 DEFAULT 0.5")
    assert await _value(pooled, flow) == {"id": 1, "a": 10, "b": "x", "c": 0.5}
    await admin.execute("ALTER TABLE pt DROP COLUMN b")
    assert await _value(pooled, flow) == {"id": 1, "a": 10, "c": 0.5}
    # Dropped and added with the same count of columns: a new name, a new type, same width.
    await admin.execute("ALTER TABLE pt DROP COLUMN a, ADD COLUMN d float8 DEFAULT 2.5")
    assert await _value(pooled, flow) == {"id": 1, "c": 0.5, "d": 2.5}


async def test_a_renamed_column_is_read_under_its_new_name(pooled: Planner, admin: asyncpg.Connection) -> None:
    await admin.execute("CREATE TABLE pt (id int PRIMARY KEY, a int)")
    await admin.execute("INSERT INTO pt VALUES (1, 10)")
    flow = _flow("SELECT * FROM pt WHERE id = $k", fetch="all")
    assert await _value(pooled, flow) == [{"id": 1, "a": 10}]
    await admin.execute("ALTER TABLE pt RENAME COLUMN a TO b")
    assert await _value(pooled, flow) == [{"id": 1, "b": 10}]


async def test_a_view_redefined_with_other_types_is_read_with_them(pooled: Planner, admin: asyncpg.Connection) -> None:
    await admin.execute("CREATE VIEW pv AS SELECT 1 AS id, 42::int8 AS v, now()::timestamp AS at")
    flow = _flow("SELECT v, at FROM pv WHERE id = $k", fetch="one")
    assert (await _value(pooled, flow))["v"] == 42
    await admin.execute("DROP VIEW pv; CREATE VIEW pv AS SELECT 1 AS id, 0.25::float8 AS v, "
                        "'2026-12-06 10:00+00'::timestamptz AS at")
    assert await _value(pooled, flow) == {"v": 0.25, "at": datetime.datetime(2026, 12, 6, 10, 0, tzinfo=datetime.UTC)}


async def test_a_parameter_whose_column_changed_type_is_read_as_what_was_sent(
        pooled: Planner, admin: asyncpg.Connection) -> None:
    # Described as int8, the parameter is encoded as an int8: the server must read those bytes
    # as an int8 (and compare it with the float8 column), never as a float8.
    await admin.execute("CREATE TABLE pt (id int8 PRIMARY KEY, v text)")
    await admin.execute("INSERT INTO pt VALUES (1, 'one'), (2, 'two')")
    flow = _flow("SELECT v FROM pt WHERE id = $k")
    assert await _value(pooled, flow, 2) == "two"
    await admin.execute("ALTER TABLE pt ALTER COLUMN id TYPE float8")
    assert await _value(pooled, flow, 2) == "two"
    assert await _value(pooled, flow, 1) == "one"


async def test_a_parameter_written_to_a_column_that_changed_type_is_stored_as_its_value(
        pooled: Planner, admin: asyncpg.Connection) -> None:
    await admin.execute("CREATE TABLE pt (id serial PRIMARY KEY, v int8)")
    flow = _flow("INSERT INTO pt (v) VALUES ($k)", fetch="none")
    await pooled.run(flow, {"k": 3})
    await admin.execute("ALTER TABLE pt ALTER COLUMN v TYPE float8")
    await pooled.run(flow, {"k": 4})
    assert [r["v"] for r in await admin.fetch("SELECT v FROM pt ORDER BY id")] == [3.0, 4.0]


async def test_a_statement_list_whose_read_changed_type_fails_and_writes_nothing(
        pooled: Planner, admin: asyncpg.Connection) -> None:
    # A statement list is one transaction and not proven read-only: a clear error, rolled back.
    await admin.execute("CREATE TABLE pt (id int PRIMARY KEY, v int8, n int DEFAULT 0)")
    await admin.execute("INSERT INTO pt VALUES (1, 7)")
    flow = load_flow(text="inputs: {k: int}\nnodes:\n  r:\n    sql:\n      - UPDATE pt SET n = n + 1 WHERE id = $k\n"
                          "      - SELECT v FROM pt WHERE id = $k\n    fetch: value\n    on_error: fail\n", name="r")
    assert await _value(pooled, flow) == 7
    await admin.execute("ALTER TABLE pt ALTER COLUMN v TYPE float8; UPDATE pt SET v = 1.5")
    with pytest.raises(FlowFailed) as info:
        await _value(pooled, flow)
    assert "column 1 ('v') is float8 now, int8 when described" in str(info.value.result.nodes["r"].error)
    assert await admin.fetchval("SELECT n FROM pt") == 1
    assert await _value(pooled, flow) == 1.5


# --- a write (or a read that may write) gets a clear error ----------------------------------------


async def test_a_write_whose_returned_column_changed_type_fails_naming_it(
        pooled: Planner, admin: asyncpg.Connection) -> None:
    await admin.execute("CREATE TABLE pt (id int PRIMARY KEY, v int8)")
    await admin.execute("INSERT INTO pt VALUES (1, 7)")
    flow = _flow("UPDATE pt SET v = v + 1 WHERE id = $k RETURNING v")
    assert await _value(pooled, flow) == 8
    await admin.execute("ALTER TABLE pt ALTER COLUMN v TYPE float8; UPDATE pt SET v = 1.5")
    with pytest.raises(FlowFailed) as info:
        await _value(pooled, flow)
    error = info.value.result.nodes["r"].error
    assert isinstance(error, QueryError) and not error.transient
    message = str(error)
    assert "changed since planner described it" in message and "'v'" in message
    assert "float8" in message and "int8" in message
    assert await admin.fetchval("SELECT v FROM pt") == 2.5  # it ran once, and was not run again
    assert await _value(pooled, flow) == 3.5  # described afresh


async def test_a_read_calling_a_volatile_function_is_not_run_again(pooled: Planner, admin: asyncpg.Connection) -> None:
    # A volatile function may write (a job claimed, an order placed): running it twice is not a read.
    await admin.execute("CREATE TABLE pt (id int PRIMARY KEY, v int8); INSERT INTO pt VALUES (1, 0)")
    await admin.execute("CREATE FUNCTION pt_bump(k int) RETURNS int8 LANGUAGE sql VOLATILE AS "
                        "'UPDATE pt SET v = v + 1 WHERE id = k RETURNING v'")
    flow = _flow("SELECT pt_bump($k) AS v")
    assert await _value(pooled, flow) == 1
    await admin.execute("DROP FUNCTION pt_bump(int); CREATE FUNCTION pt_bump(k int) RETURNS float8 LANGUAGE sql "
                        "VOLATILE AS 'UPDATE pt SET v = v + 1 WHERE id = k RETURNING v::float8'")
    with pytest.raises(FlowFailed) as info:
        await _value(pooled, flow)
    assert "changed since planner described it" in str(info.value.result.nodes["r"].error)
    assert await admin.fetchval("SELECT v FROM pt") == 2


async def test_a_read_whose_function_shares_its_name_with_a_volatile_one_elsewhere_runs_again(
        pooled: Planner, admin: asyncpg.Connection) -> None:
    # Whether a stale read may run again is the catalog's verdict on the statement (one effects
    # model), never a look-up of its functions' bare names: `public.pt_read` is STABLE, the
    # VOLATILE `elsewhere.pt_read` is another function.
    await admin.execute("CREATE TABLE pt (id int PRIMARY KEY, v int8); INSERT INTO pt VALUES (1, 7)")
    await admin.execute("CREATE FUNCTION pt_read(k int) RETURNS TABLE (v int8) LANGUAGE sql STABLE AS "
                        "'SELECT v FROM pt WHERE id = k'")
    await admin.execute("CREATE SCHEMA elsewhere; CREATE FUNCTION elsewhere.pt_read(k int) RETURNS int "
                        "LANGUAGE sql VOLATILE AS 'SELECT 1'")
    flow = _flow("SELECT v, (SELECT count(*) FROM pt_read($k)) AS n FROM pt WHERE id = $k", fetch="one")
    assert dict(await _value(pooled, flow)) == {"v": 7, "n": 1}
    await admin.execute("ALTER TABLE pt ALTER COLUMN v TYPE float8; UPDATE pt SET v = 1.5")
    assert dict(await _value(pooled, flow)) == {"v": 1.5, "n": 1}


async def test_the_replica_pool_decides_a_stale_read_from_the_same_verdict_as_the_primary(demo_dsn: str) -> None:
    # Reads routed to a replica are the pure ones; behind a pooler, its pool must be able to run
    # one again after a migration as the primary's does (one verdict, both pools).
    flow = _flow("SELECT 1 AS v")
    async with Planner(dsn=demo_dsn, replica_dsn=demo_dsn, cache_options=CacheOptions(size=0)) as planner:
        await _value(planner, flow)
        node = flow.nodes["r"]
        assert planner.pools["primary"].proven_pure(node)
        assert planner.pools["replica"].proven_pure(node)


async def test_a_read_not_proven_free_of_effects_is_not_run_again_whatever_it_names(
        demo_dsn: str, pgbouncer: PgBouncer, admin: asyncpg.Connection) -> None:
    # A view hides the volatile function that writes: no function name in the statement. Without
    # the catalog's verdict (a PoolBackend of its own) the read is not proven pure, so not repeatable.
    await admin.execute("CREATE TABLE pt (id int PRIMARY KEY, v int8); INSERT INTO pt VALUES (1, 0)")
    await admin.execute("CREATE FUNCTION pt_bump() RETURNS int8 LANGUAGE sql VOLATILE AS "
                        "'UPDATE pt SET v = v + 1 WHERE id = 1 RETURNING v'")
    await admin.execute("CREATE VIEW pt_bumped AS SELECT pt_bump() AS v")
    node = _flow("SELECT v FROM pt_bumped").nodes["r"]
    assert node.sql.read_only and not node.sql.functions  # by its syntax, a read that names no function
    backend = PoolBackend(dsn=pgbouncer.dsn(demo_dsn), min_size=1, max_size=1)
    try:
        assert await backend.run(Query(node=node, params=[[]])) == 1
        await admin.execute("DROP VIEW pt_bumped; CREATE VIEW pt_bumped AS SELECT pt_bump()::float8 AS v")
        with pytest.raises(QueryError, match="changed since planner described it"):
            await backend.run(Query(node=node, params=[[]]))
        assert await admin.fetchval("SELECT v FROM pt") == 2  # it ran once, and was not run again
    finally:
        await backend.close()


async def test_a_read_that_changed_type_is_never_served_wrong_on_many_connections(
        demo_dsn: str, pgbouncer: PgBouncer, admin: asyncpg.Connection) -> None:
    # Every connection of the pool has its own kept description; each one is checked.
    await admin.execute("CREATE TABLE pt (id int PRIMARY KEY, v int8); INSERT INTO pt VALUES (1, 7)")
    flow = _flow("SELECT v FROM pt WHERE id = $k")
    async with Planner(dsn=pgbouncer.dsn(demo_dsn), pool_options=PoolOptions(min_size=4, max_size=4), cache_options=CacheOptions(size=0)) as planner:
        assert {r.values["r"] for r in await asyncio.gather(*(planner.run(flow, {"k": 1}) for _ in range(16)))} == {7}
        await admin.execute("ALTER TABLE pt ALTER COLUMN v TYPE float8; UPDATE pt SET v = 1.5")
        values = [r.values["r"] for r in await asyncio.gather(*(planner.run(flow, {"k": 1}) for _ in range(16)))]
    assert values == [1.5] * 16


async def test_a_combined_write_whose_returned_column_changed_type_is_not_run_again(
        demo_dsn: str, pgbouncer: PgBouncer, admin: asyncpg.Connection) -> None:
    # `coalesce: true` writes of several runs go as one statement: once it ran, a stale result
    # must not send each member again (that would write twice); each member gets the error.
    await admin.execute("CREATE TABLE pt (id int PRIMARY KEY, v int8); INSERT INTO pt VALUES (1, 0), (2, 0)")
    node = _flow("UPDATE pt SET v = v + 1 WHERE id = $k RETURNING v", coalesce=True).nodes["r"]
    assert combine_writes(node.sql.statements[0].text, 2) is not None
    backend = PoolBackend(dsn=pgbouncer.dsn(demo_dsn), min_size=1, max_size=1)
    try:
        first = await backend.run_batch(node, [[1], [2]], lambda: None)
        assert first == [(1, None), (1, None)]
        await admin.execute("ALTER TABLE pt ALTER COLUMN v TYPE float8")
        second = await backend.run_batch(node, [[1], [2]], lambda: None)
        assert second is not None and all(value is None and isinstance(error, QueryError) for value, error in second)
        assert all("changed since planner described it" in str(error) for _, error in second)
        assert [r["v"] for r in await admin.fetch("SELECT v FROM pt ORDER BY id")] == [2.0, 2.0]  # once each
    finally:
        await backend.close()


async def test_fused_sibling_reads_after_a_type_change_get_the_new_values(
        pooled: Planner, admin: asyncpg.Connection) -> None:
    await admin.execute("CREATE TABLE pt (id int PRIMARY KEY, v int8, at timestamp)")
    await admin.execute("INSERT INTO pt VALUES (1, 7, '2026-12-06 10:00')")
    flow = load_flow(text=json.dumps({"inputs": {"k": "int"}, "settings": {"compile": False}, "nodes": {  # fusion's path
        "v": {"sql": "SELECT v FROM pt WHERE id = $k", "fetch": "value", "on_error": "fail"},
        "at": {"sql": "SELECT at FROM pt WHERE id = $k", "fetch": "value", "on_error": "fail"}}}), name="siblings")
    first = await pooled.run(flow, {"k": 1})
    assert first.values == {"v": 7, "at": datetime.datetime(2026, 12, 6, 10, 0)}
    assert first.nodes["v"].served is not None and first.nodes["v"].served.fused == 2
    await admin.execute("ALTER TABLE pt ALTER COLUMN v TYPE float8, ALTER COLUMN at TYPE timestamptz "
                        "USING at AT TIME ZONE 'UTC'; UPDATE pt SET v = 1.5")
    second = await pooled.run(flow, {"k": 1})
    assert second.values == {"v": 1.5, "at": datetime.datetime(2026, 12, 6, 10, 0, tzinfo=datetime.UTC)}
