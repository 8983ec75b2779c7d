"""SQL nodes on a real PostgreSQL: fetch modes, transactions, cancellation, errors, pools."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from planner import CallOptions, FlowFailed, NodeState, NodeTimeout, Planner, QueryError
from planner.db.translate import translate

Write = Callable[..., Path]


@pytest.fixture
async def db_planner(tmp_path: Path, demo_dsn: str) -> AsyncIterator[Planner]:
    async with Planner(flows=tmp_path, dsn=demo_dsn, call_options=CallOptions(allowed_modules=["tests"])) as planner:
        yield planner


async def _server_queries(dsn: str, needle: str) -> list[str]:
    con = await asyncpg.connect(dsn)
    try:
        rows = await con.fetch(
            "SELECT query FROM pg_stat_activity WHERE state <> 'idle' AND pid <> pg_backend_pid() AND query LIKE '%' || $1 || '%'",
            needle,
        )
        return [r["query"] for r in rows]
    finally:
        await con.close()


async def _eventually_gone(dsn: str, needle: str) -> list[str]:
    for _ in range(40):  # the cancel request is asynchronous: give the server a moment
        left = await _server_queries(dsn, needle)
        if not left:
            return []
        await asyncio.sleep(0.05)
    return left


async def test_fetch_modes_give_plain_values(write_flow: Write, db_planner: Planner) -> None:
    write_flow("""
        inputs: {name: str}
        nodes:
          one: {sql: "SELECT id, instance_name FROM whatsapp_instances WHERE instance_name = $name", fetch: one}
          all: {sql: "SELECT id FROM whatsapp_instances WHERE id <= $one.id + 1 ORDER BY id", fetch: all}
          value: {sql: "SELECT count(*) FROM whatsapp_instances WHERE id <= $one.id", fetch: value}
          none: {sql: "UPDATE whatsapp_instances SET escalation_threshold = 3 WHERE id = $one.id", fetch: none}
          missing: {sql: "SELECT id FROM whatsapp_instances WHERE instance_name = 'nobody'", fetch: one}
        """)
    result = await db_planner.run("t", {"name": "acme"})
    assert result.values["one"] == {"id": 1, "instance_name": "acme"}
    assert type(result.values["one"]) is dict
    assert result.values["all"] == [{"id": 1}, {"id": 2}]
    assert result.values["value"] == 1
    assert result.values["none"] == "UPDATE 1"
    assert result.values["missing"] is None and result.nodes["missing"].state is NodeState.OK


async def test_a_hostile_input_is_a_bound_parameter(write_flow: Write, db_planner: Planner, demo_dsn: str) -> None:
    evil = "'); DROP TABLE whatsapp_instances; --"
    write_flow("""
        inputs: {name: str}
        nodes:
          put: {sql: "INSERT INTO whatsapp_instances (instance_name) VALUES ($name) RETURNING instance_name", fetch: value}
        """)
    assert (await db_planner.run("t", {"name": evil})).values["put"] == evil
    con = await asyncpg.connect(demo_dsn)
    try:
        assert await con.fetchval("SELECT count(*) FROM whatsapp_instances WHERE instance_name = $1", evil) == 1
    finally:
        await con.close()


async def test_a_statement_list_is_one_transaction(write_flow: Write, db_planner: Planner, demo_dsn: str) -> None:
    # A row's `xmin` is the transaction that wrote it: both rows and the last statement must
    # share one. Statements on their own would each be a transaction of their own.
    write_flow("""
        nodes:
          three:
            sql:
              - INSERT INTO whatsapp_instances (instance_name) VALUES ('tx-one')
              - INSERT INTO whatsapp_instances (instance_name) VALUES ('tx-two')
              - >-
                SELECT count(*) AS rows, count(DISTINCT xmin::text) AS writers,
                       bool_and(xmin = pg_current_xact_id()::xid) AS by_this_transaction
                FROM whatsapp_instances WHERE instance_name IN ('tx-one', 'tx-two')
            fetch: one
        """)
    result = await db_planner.run("t")
    assert result.values["three"] == {"rows": 2, "writers": 1, "by_this_transaction": True}
    con = await asyncpg.connect(demo_dsn)
    try:  # and the transaction was committed
        assert await con.fetchval("SELECT count(*) FROM whatsapp_instances WHERE instance_name IN ('tx-one', 'tx-two')") == 2
    finally:
        await con.close()


async def test_a_failed_statement_in_a_list_leaves_nothing_written(write_flow: Write, db_planner: Planner, demo_dsn: str) -> None:
    write_flow("""
        nodes:
          two:
            sql:
              - INSERT INTO whatsapp_instances (instance_name) VALUES ('half-way')
              - INSERT INTO whatsapp_instances (instance_name) VALUES (NULL)
            on_error: fail
        """)
    with pytest.raises(FlowFailed) as info:
        await db_planner.run("t")
    error = info.value.result.nodes["two"].error
    assert isinstance(error, QueryError) and error.sqlstate == "23502" and not error.transient
    con = await asyncpg.connect(demo_dsn)
    try:
        assert await con.fetchval("SELECT count(*) FROM whatsapp_instances WHERE instance_name = 'half-way'") == 0
    finally:
        await con.close()


async def test_a_timeout_cancels_the_query_on_the_server(write_flow: Write, db_planner: Planner, demo_dsn: str) -> None:
    write_flow("nodes:\n  slow: {sql: 'SELECT pg_sleep(30) AS planner_timeout_probe', timeout: 200ms}\n")
    result = await db_planner.run("t")
    assert result.nodes["slow"].state is NodeState.DEFAULTED
    assert isinstance(result.nodes["slow"].error, NodeTimeout)
    assert await _eventually_gone(demo_dsn, "planner_timeout_probe") == []


async def test_cancelling_the_caller_cancels_the_query_on_the_server(write_flow: Write, db_planner: Planner, demo_dsn: str) -> None:
    write_flow("nodes:\n  slow: {sql: 'SELECT pg_sleep(30) AS planner_cancel_probe'}\n")
    task = asyncio.create_task(db_planner.run("t"))
    for _ in range(100):
        if await _server_queries(demo_dsn, "planner_cancel_probe"):
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _eventually_gone(demo_dsn, "planner_cancel_probe") == []


async def test_connections_go_back_to_a_borrowed_pool_which_stays_open(write_flow: Write, tmp_path: Path, demo_dsn: str) -> None:
    write_flow("""
        nodes:
          a: {sql: SELECT 1, fetch: value}
          b: {sql: SELECT 2, fetch: value}
          slow: {sql: 'SELECT pg_sleep(10)', timeout: 50ms}
          bad: {sql: SELECT 1/0}
        """)
    pool = await asyncpg.create_pool(demo_dsn, min_size=1, max_size=4)
    try:
        async with Planner(flows=tmp_path, pool=pool) as planner:
            for _ in range(5):
                await planner.run("t")
        assert pool.get_idle_size() == pool.get_size()
        assert await pool.fetchval("SELECT 42") == 42  # not closed by the planner
    finally:
        await pool.close()


async def test_a_lost_connection_is_retried_on_a_fresh_one(write_flow: Write, db_planner: Planner, demo_dsn: str) -> None:
    con = await asyncpg.connect(demo_dsn)
    await con.execute("CREATE SEQUENCE kill_once")
    await con.close()
    write_flow("""
        nodes:
          a:
            sql: SELECT CASE WHEN nextval('kill_once') = 1 THEN pg_terminate_backend(pg_backend_pid()) END, pg_backend_pid() AS pid
            fetch: one
            retry: {attempts: 2, backoff: 10ms}
        """)
    result = await db_planner.run("t")
    assert result.nodes["a"].state is NodeState.OK and result.nodes["a"].attempts == 2


async def test_a_lost_connection_without_retry_is_defaulted(write_flow: Write, db_planner: Planner) -> None:
    write_flow("nodes:\n  a: {sql: SELECT pg_terminate_backend(pg_backend_pid()), default: gone}\n")
    node = (await db_planner.run("t")).nodes["a"]
    assert node.state is NodeState.DEFAULTED and node.value == "gone"
    assert isinstance(node.error, QueryError) and node.error.transient


async def test_a_bad_parameter_is_reported_by_its_reference(write_flow: Write, db_planner: Planner) -> None:
    write_flow("inputs: {x: str}\nnodes:\n  a: {sql: 'SELECT $x::int + 1', fetch: value}\n")
    node = (await db_planner.run("t", {"x": "abc"})).nodes["a"]
    assert isinstance(node.error, QueryError) and "$x" in str(node.error)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        pytest.param(asyncpg.SerializationError("s"), True, id="serialization"),
        pytest.param(asyncpg.DeadlockDetectedError("d"), True, id="deadlock"),
        pytest.param(asyncpg.TooManyConnectionsError("t"), True, id="too-many-connections"),
        pytest.param(asyncpg.AdminShutdownError("a"), True, id="admin-shutdown"),
        pytest.param(asyncpg.ConnectionDoesNotExistError("c"), True, id="connection-gone"),
        pytest.param(ConnectionResetError("reset"), True, id="socket-reset"),
        pytest.param(asyncpg.UndefinedColumnError("u"), False, id="undefined-column"),
        pytest.param(asyncpg.UniqueViolationError("u"), False, id="unique-violation"),
    ],
)
def test_transient_errors_are_classified(exc: BaseException, transient: bool) -> None:
    mapped = translate(exc)
    assert isinstance(mapped, QueryError) and mapped.transient is transient


def test_foreign_errors_other_than_database_ones_pass_through() -> None:
    error = ValueError("x")
    assert translate(error) is error


async def test_a_call_node_with_a_db_parameter_receives_the_pool(write_flow: Write, db_planner: Planner, tmp_path: Path) -> None:
    (tmp_path / "dbfuncs.py").write_text(
        "async def count(db, table_hint: str):\n"
        "    return await db.fetchval('SELECT count(*) FROM whatsapp_instances') > 0\n"
    )
    write_flow("nodes:\n  a: {call: dbfuncs:count, with: {table_hint: x}}\n")
    planner = Planner(flows=tmp_path, pool=await db_planner.stack.primary.pool())
    assert (await planner.run("t")).values["a"] is True


async def test_a_dsn_planner_owns_and_closes_its_pool(write_flow: Write, tmp_path: Path, demo_dsn: str) -> None:
    write_flow("nodes:\n  a: {sql: SELECT 1, fetch: value}\n")
    planner = Planner(flows=tmp_path, dsn=demo_dsn)
    await planner.run("t")
    pool = await planner.stack.primary.pool()
    await planner.close()
    assert pool.is_closing()


async def test_an_unreachable_database_fails_before_any_node_runs(write_flow: Write, tmp_path: Path) -> None:
    from planner import DatabaseUnavailable

    write_flow("nodes:\n  a: {sql: SELECT 1, default: 0}\n")
    planner = Planner(flows=tmp_path, dsn="postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(DatabaseUnavailable, match="cannot reach the database"):
        await planner.run("t")


async def test_the_pytest_plugin_gives_each_test_an_empty_database(planner_database: str) -> None:
    con = await asyncpg.connect(planner_database)
    try:
        assert await con.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        assert (await con.fetchval("SELECT current_database()")).startswith("planner_test_")
    finally:
        await con.close()
