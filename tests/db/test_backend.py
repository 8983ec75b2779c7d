"""The backend seam (`planner.kinds.backend`): what a Planner asks of its database, and the one
boundary (`planner.db.pool`) where the driver's errors become planner's.

- a flow whose SQL nodes are all overridden opens nothing, whatever the backend;
- a wrapper sees every SQL node's `Query` and changes no value;
- in-memory flows (`load_flow(text=...)`) run, and are bound once per flow object;
- no asyncpg exception escapes: every error path ends in a `FlowError` subclass;
- parameter values never reach an error message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from planner import (
    CallOptions,
    DatabaseUnavailable,
    FlowError,
    FlowFailed,
    FlowResult,
    NodeState,
    Planner,
    PoolOptions,
    QueryError,
    load_flow,
)
from planner.db.pool import PoolBackend
from planner.kinds.backend import Backend, Offline
from planner.views.validate import validate_paths
from tests.support.spies import Counting

# This module is about another mechanism: nodes run as they would without compiled groups.
pytestmark = pytest.mark.usefixtures("uncompiled")

Write = Callable[..., Path]
UNREACHABLE = "postgresql://nobody@127.0.0.1:1/none"
SECRET = "sk_live_SECRET"


# --- runs that need no database -------------------------------------------------------------

_OVERRIDDEN = """
inputs: {x: int}
nodes:
  a: {sql: "SELECT $x", fetch: value}
  b: {sql: ["SELECT 1", "SELECT $a + 1"], fetch: value}
  c: {call: tests.nodes:add, with: {a: $a, b: $b}}
"""


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(Offline, id="offline"),
        pytest.param(lambda: PoolBackend(dsn=UNREACHABLE), id="pool-unreachable"),
        pytest.param(lambda: Counting(PoolBackend(dsn=UNREACHABLE)), id="wrapped-pool-unreachable"),
    ],
)
async def test_a_flow_whose_sql_nodes_are_all_overridden_opens_nothing(write_flow: Write, tmp_path: Path, make: Callable[[], Backend]) -> None:
    write_flow(_OVERRIDDEN)
    backend = make()
    async with Planner(flows=tmp_path, backend=backend, call_options=CallOptions(allowed_modules=["tests"])) as planner:
        result = await planner.run("t", {"x": 1}, overrides={"a": 10, "b": 20})
    assert result.values == {"a": 10, "b": 20, "c": 30}
    if isinstance(backend, Counting):
        assert (backend.opens, backend.queries) == (0, [])
        backend = backend.inner
    if isinstance(backend, PoolBackend):
        assert not backend.opened


@pytest.mark.parametrize("backend", [pytest.param(Offline, id="offline"), pytest.param(lambda: PoolBackend(dsn=UNREACHABLE), id="pool")])
async def test_a_flow_with_one_sql_node_left_to_run_needs_the_database(write_flow: Write, tmp_path: Path, backend: Callable[[], Backend]) -> None:
    write_flow(_OVERRIDDEN)
    async with Planner(flows=tmp_path, backend=backend(), call_options=CallOptions(allowed_modules=["tests"])) as planner:
        with pytest.raises(DatabaseUnavailable):
            await planner.run("t", {"x": 1}, overrides={"a": 10})


# --- a wrapper sees every query -------------------------------------------------------------

_LOOKUPS = """
inputs: {name: str}
nodes:
  inst: {sql: "SELECT id, instance_name FROM whatsapp_instances WHERE instance_name = $name", fetch: one}
  count: {sql: "SELECT count(*) FROM whatsapp_instances WHERE id <= $inst.id", fetch: value}
  pair: {sql: ["SELECT 1", "SELECT $inst.id * 2 AS doubled, $name AS name"], fetch: all}
  touch: {sql: "UPDATE whatsapp_instances SET escalation_threshold = escalation_threshold WHERE id = $inst.id", fetch: none}
  echo: {call: tests.nodes:echo, with: {value: $count}}
"""


async def test_a_wrapping_backend_sees_every_sql_query_and_changes_no_value(write_flow: Write, tmp_path: Path, demo_dsn: str) -> None:
    write_flow(_LOOKUPS)
    async with Planner(flows=tmp_path, dsn=demo_dsn, call_options=CallOptions(allowed_modules=["tests"])) as plain:
        expected = (await plain.run("t", {"name": "acme"})).values
    counting = Counting(PoolBackend(dsn=demo_dsn))
    async with Planner(flows=tmp_path, backend=counting, call_options=CallOptions(allowed_modules=["tests"])) as planner:
        result = await planner.run("t", {"name": "acme"})
    assert result.values == expected
    assert expected["pair"] == [{"doubled": 2, "name": "acme"}] and expected["echo"] == expected["count"]
    seen = {q.node.name: ([s.text for s in q.statements], q.params, q.fetch) for q in counting.queries}
    assert seen == {
        "inst": (["SELECT id, instance_name FROM whatsapp_instances WHERE instance_name = $1"], [["acme"]], "one"),
        "count": (["SELECT count(*) FROM whatsapp_instances WHERE id <= $1"], [[1]], "value"),
        "pair": (["SELECT 1", "SELECT $1 * 2 AS doubled, $2 AS name"], [[], [1, "acme"]], "all"),
        "touch": (["UPDATE whatsapp_instances SET escalation_threshold = escalation_threshold WHERE id = $1"], [[1]], "none"),
    }
    assert len(counting.queries) == 4  # one query per SQL node, none for the call node
    assert counting.opens == 1


# --- in-memory flows ------------------------------------------------------------------------

_IN_MEMORY = "inputs: {x: int}\nnodes:\n  a: {call: tests.nodes:add, with: {a: $x, b: 1}}\n  b: {call: tests.nodes:echo, with: {value: $a}}\n"


async def test_an_in_memory_flow_runs_and_is_bound_once_per_flow_object() -> None:
    binds: list[tuple[str, str]] = []

    def wrapper(flow: str, node: str, run: Any) -> Any:
        binds.append((flow, node))  # called when a node is bound, never when it runs
        return run

    planner = Planner(backend=Offline(), node_wrapper=wrapper, call_options=CallOptions(allowed_modules=["tests"]))
    flow = load_flow(text=_IN_MEMORY, name="mem")
    first = await planner.run(flow, {"x": 1})
    second = await planner.run(flow, {"x": 5})
    assert (first.values, second.values) == ({"a": 2, "b": 2}, {"a": 6, "b": 6})
    assert binds == [("mem", "a"), ("mem", "b")]
    other = load_flow(text=_IN_MEMORY, name="mem")
    assert (await planner.run(other, {"x": 2})).values == {"a": 3, "b": 3}
    assert binds == [("mem", "a"), ("mem", "b")] * 2  # another object: bound again


async def test_an_in_memory_sql_flow_runs_on_the_database(demo_dsn: str) -> None:
    flow = load_flow(text="inputs: {name: str}\nnodes:\n  a: {sql: 'SELECT id FROM whatsapp_instances WHERE instance_name = $name', fetch: value}\n")
    async with Planner(dsn=demo_dsn) as planner:
        assert (await planner.run(flow, {"name": "acme"})).values == {"a": 1}


# --- no driver exception escapes ------------------------------------------------------------


def _assert_planners(error: BaseException | None) -> None:
    assert error is not None
    assert isinstance(error, FlowError), f"{type(error).__module__}.{type(error).__name__}: {error}"
    assert type(error).__module__.startswith("planner."), type(error).__module__
    assert not isinstance(error, asyncpg.PostgresError | asyncpg.InterfaceError)


def _node_errors(result: FlowResult) -> list[BaseException]:
    return [node.error for node in result.nodes.values() if node.error is not None]


@pytest.fixture
async def db_planner(tmp_path: Path, demo_dsn: str) -> AsyncIterator[Planner]:
    async with Planner(flows=tmp_path, dsn=demo_dsn, call_options=CallOptions(allowed_modules=["tests"])) as planner:
        yield planner


async def _run_errors(planner: Planner, inputs: dict[str, Any] | None = None) -> list[BaseException]:
    try:
        result = await planner.run("t", inputs)
    except FlowFailed as exc:
        return [exc, *_node_errors(exc.result)]
    except FlowError as exc:
        return [exc]
    return _node_errors(result)


@pytest.mark.parametrize(
    ("sql", "inputs", "sqlstate"),
    [
        pytest.param("SELEC 1", {}, "42601", id="syntax-error"),
        pytest.param("SELECT * FROM no_such_table", {}, "42P01", id="undefined-table"),
        pytest.param("SELECT 1; SELECT 2", {}, "42601", id="two-commands-in-one-statement"),
        pytest.param("SELECT ($x::text)::int", {"x": "abc"}, "22P02", id="server-side-bad-cast"),
        pytest.param("SELECT $x::int", {"x": "abc"}, "22000", id="client-side-bad-parameter"),  # asyncpg's DataError
        pytest.param("SELECT 1 / ($x::int - $x::int)", {"x": 1}, "22012", id="division-by-zero"),
        pytest.param("INSERT INTO whatsapp_instances (instance_name) VALUES ('acme')", {}, "23505", id="unique-violation"),
        pytest.param("SELECT pg_terminate_backend(pg_backend_pid())", {}, "08003", id="connection-terminated"),
        pytest.param(
            ["CREATE TABLE deferred (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)", "INSERT INTO deferred VALUES (1), (1)"],
            {}, "23505", id="violation-at-commit",
        ),
        pytest.param(["SELECT 1", "SELEC 2"], {}, "42601", id="error-inside-a-transaction"),
    ],
)
async def test_a_statement_error_is_a_query_error_never_the_drivers(
    write_flow: Write, db_planner: Planner, sql: str | list[str], inputs: dict[str, Any], sqlstate: str | None
) -> None:
    declared = "inputs: {x: json}\n" if inputs else ""
    # on_bug: default: this is about the error planner keeps, so class-42 errors must default too.
    write_flow(f"{declared}nodes:\n  a: {{sql: {json.dumps(sql)}, fetch: value, default: fallback, on_bug: default}}\n")
    result = await db_planner.run("t", inputs)
    node = result.nodes["a"]
    assert node.state is NodeState.DEFAULTED and node.value == "fallback"
    _assert_planners(node.error)
    assert isinstance(node.error, QueryError) and node.error.sqlstate == sqlstate, node.error


async def test_a_statement_error_of_a_failing_node_is_raised_as_planners(write_flow: Write, db_planner: Planner) -> None:
    write_flow("nodes:\n  a: {sql: 'SELECT * FROM no_such_table', on_error: fail}\n")
    errors = await _run_errors(db_planner)
    assert isinstance(errors[0], FlowFailed) and len(errors) == 2
    for error in errors:
        _assert_planners(error)


async def test_a_connection_killed_from_outside_mid_query_is_planners(write_flow: Write, db_planner: Planner, demo_dsn: str) -> None:
    write_flow("nodes:\n  a: {sql: 'SELECT pg_sleep(30) /* killed-mid-query */', fetch: value}\n")
    run = asyncio.create_task(_run_errors(db_planner))
    admin = await asyncpg.connect(demo_dsn)
    try:
        for _ in range(100):
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE query LIKE '%killed-mid-query%' AND pid <> pg_backend_pid()")
            if killed:
                break
            await asyncio.sleep(0.05)
        assert killed
    finally:
        await admin.close()
    errors = await asyncio.wait_for(run, 10)
    assert len(errors) == 1 and isinstance(errors[0], QueryError) and errors[0].transient
    _assert_planners(errors[0])


async def test_connections_killed_while_idle_in_the_pool_give_planners_errors(write_flow: Write, db_planner: Planner, demo_dsn: str) -> None:
    write_flow("nodes:\n  a: {sql: 'SELECT 1', fetch: value}\n  b: {sql: 'SELECT 2', fetch: value}\n")
    assert (await db_planner.run("t")).values == {"a": 1, "b": 2}
    await db_planner.stack.primary.drain()
    admin = await asyncpg.connect(demo_dsn)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    finally:
        await admin.close()
    assert killed >= 1
    await asyncio.sleep(0.1)
    for _ in range(3):  # whatever each run meets (a dead connection, a fresh one), it is planner's
        for error in await _run_errors(db_planner):
            _assert_planners(error)


async def test_a_database_dropped_under_an_open_pool_gives_planners_errors(write_flow: Write, tmp_path: Path, pg_dsn: str) -> None:
    from planner.db.admin import create_database, drop_database, with_database

    name = f"planner_dropped_{id(tmp_path)}"
    await create_database(pg_dsn, name)
    write_flow("nodes:\n  a: {sql: 'SELECT 1', fetch: value}\n")
    try:
        async with Planner(flows=tmp_path, dsn=with_database(pg_dsn, name), pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
            assert (await planner.run("t")).values == {"a": 1}
            await planner.stack.primary.drain()
            await drop_database(pg_dsn, name)  # WITH (FORCE): the pool's connection is killed
            errors = await _run_errors(planner)
            assert errors
            for error in errors:
                _assert_planners(error)
    finally:
        await drop_database(pg_dsn, name)


@pytest.mark.parametrize(
    "dsn",
    [
        pytest.param(UNREACHABLE, id="unreachable"),
        pytest.param("postgresql://h:notaport/db", id="port-not-a-number"),
        pytest.param("postgresql://u@127.0.0.1:99999/db", id="port-out-of-range"),
        pytest.param("postgresql://[::1/db", id="broken-ipv6"),
        pytest.param("notadsn", id="no-scheme"),
        pytest.param("postgresql://u@127.0.0.1:1/db?sslmode=bogus", id="bad-option"),
        pytest.param("postgresql://nosuchhost.invalid/db", id="unknown-host"),
    ],
)
async def test_a_database_that_cannot_be_opened_is_database_unavailable(write_flow: Write, tmp_path: Path, dsn: str) -> None:
    write_flow("nodes:\n  a: {sql: SELECT 1, default: 0}\n")
    async with Planner(flows=tmp_path, dsn=dsn) as planner:
        with pytest.raises(FlowError) as info:
            await planner.run("t")
    assert isinstance(info.value, DatabaseUnavailable)
    _assert_planners(info.value)


async def test_a_missing_database_or_role_is_database_unavailable(write_flow: Write, tmp_path: Path, pg_dsn: str) -> None:
    from planner.db.admin import with_database

    write_flow("nodes:\n  a: {sql: SELECT 1, default: 0}\n")
    parts = urlsplit(pg_dsn)
    other_role = urlunsplit(parts._replace(netloc="no_such_role@" + parts.netloc.rpartition("@")[2]))
    for dsn, missing in ((with_database(pg_dsn, "no_such_database"), "no_such_database"), (other_role, "no_such_role")):
        async with Planner(flows=tmp_path, dsn=dsn) as planner:
            with pytest.raises(DatabaseUnavailable, match=missing) as info:
                await planner.run("t")
        _assert_planners(info.value)


async def test_validate_with_a_database_reports_statement_errors_as_findings(write_flow: Write, demo_dsn: str) -> None:
    path = write_flow("nodes:\n  a: {sql: 'SELECT * FROM no_such_table'}\n  b: {sql: 'SELEC 1'}\n  c: {sql: 'SELECT 1; SELECT 2'}\n")
    findings = await validate_paths([path], demo_dsn)
    assert [(f.node, f.code) for f in findings] == [("a", "PLN400"), ("b", "PLN400"), ("c", "PLN400")]
    assert "no_such_table" in findings[0].message


@pytest.mark.parametrize("dsn", [UNREACHABLE, "postgresql://h:notaport/db", "postgresql://u@127.0.0.1:99999/db"])
async def test_validate_with_a_database_that_cannot_be_opened_raises_planners_error(write_flow: Write, dsn: str) -> None:
    path = write_flow("nodes:\n  a: {sql: 'SELECT 1'}\n")
    with pytest.raises(FlowError) as info:
        await validate_paths([path], dsn)
    assert isinstance(info.value, DatabaseUnavailable)
    _assert_planners(info.value)


# --- parameter values stay out of error messages --------------------------------------------


_LEAKS = [
    pytest.param(None, "SELECT $x::int", "22000", id="client-side-data-error"),
    pytest.param(None, "SELECT $x::int + 1", "22000", id="client-side-data-error-expression"),
    pytest.param(None, "SELECT ($x::text)::int", "22P02", id="server-side-cast"),
    pytest.param(None, "SELECT $x::text::jsonb", "22P02", id="server-side-json-detail"),
    pytest.param(None, "SELECT $x::text::uuid", "22P02", id="server-side-uuid"),
    pytest.param(None, "SELECT $x::regclass", "42P01", id="relation-named-by-the-value"),
    pytest.param(None, "SELECT current_setting($x)", "42704", id="setting-named-by-the-value"),
    pytest.param("CREATE TABLE s (k text PRIMARY KEY)", ["INSERT INTO s VALUES ($x)", "INSERT INTO s VALUES ($x)"], "23505",
                 id="unique-violation-detail"),
    pytest.param("CREATE TABLE s (k text, n int NOT NULL)", "INSERT INTO s VALUES ($x, NULL)", "23502", id="not-null-failing-row"),
    pytest.param("CREATE TABLE s (k text CHECK (length(k) < 3))", "INSERT INTO s VALUES ($x)", "23514", id="check-failing-row"),
    pytest.param("CREATE TABLE p (k text PRIMARY KEY); CREATE TABLE s (k text REFERENCES p)", "INSERT INTO s VALUES ($x)",
                 "23503", id="foreign-key-detail"),
]


async def _leak(write_flow: Write, planner: Planner, dsn: str, setup: str | None, sql: str | list[str]) -> QueryError:
    if setup:
        con = await asyncpg.connect(dsn)
        try:
            await con.execute(setup)
        finally:
            await con.close()
    write_flow(f"inputs: {{x: str}}\nnodes:\n  a: {{sql: {json.dumps(sql)}, fetch: value, default: 0, on_bug: default}}\n")
    error = (await planner.run("t", {"x": SECRET})).nodes["a"].error
    assert isinstance(error, QueryError)
    return error


@pytest.mark.parametrize(("setup", "sql", "sqlstate"), _LEAKS)
async def test_a_parameter_value_never_appears_in_a_query_error(
    write_flow: Write, db_planner: Planner, demo_dsn: str, setup: str | None, sql: str | list[str], sqlstate: str
) -> None:
    error = await _leak(write_flow, db_planner, demo_dsn, setup, sql)
    assert error.sqlstate == sqlstate, error
    assert SECRET.lower() not in str(error).lower(), str(error)


@pytest.mark.parametrize(("setup", "sql", "sqlstate"), _LEAKS)
async def test_a_parameter_value_never_appears_in_the_log_of_a_defaulted_node(
    write_flow: Write, db_planner: Planner, demo_dsn: str, caplog: pytest.LogCaptureFixture,
    setup: str | None, sql: str | list[str], sqlstate: str,
) -> None:
    # The defaulted node is logged with its traceback, causes included: none may show the value.
    with caplog.at_level(logging.WARNING, logger="planner"):
        await _leak(write_flow, db_planner, demo_dsn, setup, sql)
    assert any(r.exc_info for r in caplog.records)
    assert SECRET.lower() not in caplog.text.lower(), caplog.text


def test_a_bad_parameter_is_still_named_by_its_reference_and_type() -> None:
    from planner.db.translate import translate
    from planner.lang.refs import compile_sql

    driver = asyncpg.DataError(f"invalid input for query argument $1: {SECRET!r} ('str' object cannot be interpreted as an integer)")
    mapped = translate(driver, compile_sql("SELECT $x::int"), [SECRET])
    assert isinstance(mapped, QueryError)
    assert str(mapped) == "DataError: invalid input for query argument $x: a str value that does not fit the parameter's type (value not shown)"


async def test_a_failed_flow_message_does_not_carry_the_parameter_value(write_flow: Write, db_planner: Planner) -> None:
    write_flow("inputs: {x: str}\nnodes:\n  a: {sql: 'SELECT $x::int', fetch: value, on_error: fail}\n")
    with pytest.raises(FlowFailed) as info:
        await db_planner.run("t", {"x": SECRET})
    assert SECRET not in str(info.value)
    assert "str value" in str(info.value)  # what is wrong is still said: its type
