"""Session state never crosses runs (issue #10, item 2), and costs nothing when untouched.

On a pool of one connection, a flow that changes its session is followed by a flow that reads
it on the same connection: it must see the server's defaults, whichever way the change was
spelled. A plain SELECT must not pay for a reset.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import planner.db.pool
from planner import Planner, PoolOptions
from planner.db.pool import RESET_SESSION

Write = Callable[..., Path]
ROLE = f"planner_session_role_{os.getpid()}"


@pytest.fixture
async def one_connection(tmp_path: Path, demo_dsn: str) -> AsyncIterator[Planner]:
    async with Planner(flows=tmp_path, dsn=demo_dsn, pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
        yield planner


@pytest.fixture
async def prepared(demo_dsn: str) -> AsyncIterator[None]:
    """A NOLOGIN role and a function that changes TimeZone behind the statement analysis' back."""
    con = await asyncpg.connect(demo_dsn)
    try:
        await con.execute(f"DROP ROLE IF EXISTS {ROLE}")
        await con.execute(f"CREATE ROLE {ROLE} NOLOGIN")
        await con.execute(
            "CREATE FUNCTION sneaky_timezone() RETURNS text LANGUAGE sql "
            "AS $$ SELECT set_config('TimeZone', 'Pacific/Chatham', false) $$")
        yield
    finally:
        await con.execute(f"DROP FUNCTION IF EXISTS sneaky_timezone(); DROP ROLE IF EXISTS {ROLE}")
        await con.close()


def _flow(tmp_path: Path, name: str, sql: str | list[str], fetch: str = "value", pid: bool = True) -> None:
    """Flow `name`: node `a` runs `sql`; node `pid` then says which connection the run had."""
    text = f"nodes:\n  a: {{sql: {json.dumps(sql)}, fetch: {fetch}}}\n"
    if pid:
        text += "  pid: {sql: 'SELECT pg_backend_pid()', fetch: value, after: [a]}\n"
    (tmp_path / f"{name}.yaml").write_text(text)


_TIMEZONE = "SHOW TimeZone"
_TIMEOUT = "SELECT current_setting('statement_timeout')"
_PATH = "SELECT current_setting('search_path')"
_USER = "SELECT current_user::text"


@pytest.mark.parametrize(
    ("change", "read", "changed"),
    [
        pytest.param(["SET TimeZone = 'Pacific/Chatham'", "SELECT 1"], _TIMEZONE, "Pacific/Chatham", id="set-timezone-in-a-list"),
        pytest.param("SET TimeZone = 'Pacific/Chatham'", _TIMEZONE, "Pacific/Chatham", id="set-timezone"),
        pytest.param("SELECT set_config('statement_timeout', '10ms', false)", _TIMEOUT, "10ms", id="set-config-statement-timeout"),
        pytest.param("SET search_path TO pg_catalog", _PATH, "pg_catalog", id="set-search-path"),
        pytest.param(f"SET ROLE {ROLE}", _USER, ROLE, id="set-role"),
        pytest.param(f"SET SESSION AUTHORIZATION {ROLE}", _USER, ROLE, id="set-session-authorization"),
        pytest.param("SELECT sneaky_timezone()", _TIMEZONE, "Pacific/Chatham", id="function-calling-set-config"),
        pytest.param(["SELECT 1", "SELECT sneaky_timezone()"], _TIMEZONE, "Pacific/Chatham", id="function-in-a-list"),
    ],
)
async def test_a_session_change_never_reaches_the_next_run(
    one_connection: Planner, prepared: None, tmp_path: Path, change: str | list[str], read: str, changed: str
) -> None:
    _flow(tmp_path, "read", read)
    _flow(tmp_path, "change", [*([change] if isinstance(change, str) else change), read])  # sees its own change
    before = (await one_connection.run("read")).values
    after_change = (await one_connection.run("change")).values
    after = (await one_connection.run("read")).values
    assert after_change["a"] == changed != before["a"]
    assert after["a"] == before["a"]
    assert before["pid"] == after_change["pid"] == after["pid"], "the same connection, reset (not replaced)"


@pytest.mark.parametrize(
    ("change", "read"),
    [
        pytest.param("SET TimeZone = 'Pacific/Chatham'", _TIMEZONE, id="set"),
        pytest.param("SELECT set_config('statement_timeout', '10ms', false)", _TIMEOUT, id="set-config"),
        pytest.param("SET search_path TO pg_catalog", _PATH, id="search-path"),
        pytest.param(f"SET ROLE {ROLE}", _USER, id="role"),
        pytest.param("SELECT sneaky_timezone()", _TIMEZONE, id="function"),
    ],
)
async def test_a_single_statement_session_change_never_reaches_the_next_run(
    one_connection: Planner, prepared: None, tmp_path: Path, change: str, read: str
) -> None:
    _flow(tmp_path, "read", read)
    _flow(tmp_path, "change", change, fetch="none")
    before = (await one_connection.run("read")).values
    changed = (await one_connection.run("change")).values
    after = (await one_connection.run("read")).values
    assert after["a"] == before["a"]
    assert before["pid"] == changed["pid"] == after["pid"]


@pytest.mark.parametrize(
    ("change", "read", "clean"),
    [
        pytest.param("CREATE TEMP TABLE scratch (x int)", "SELECT count(*) FROM pg_class WHERE relname = 'scratch'", 0, id="temp-table"),
        pytest.param("SELECT pg_advisory_lock(4242)",
                     "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND pid = pg_backend_pid()",
                     0, id="advisory-lock"),
        pytest.param("SET application_name = 'changed'", "SELECT current_setting('application_name') = 'changed'", False,
                     id="application-name"),
    ],
)
async def test_other_session_state_never_reaches_the_next_run(
    one_connection: Planner, tmp_path: Path, change: str, read: str, clean: Any
) -> None:
    _flow(tmp_path, "read", read)
    _flow(tmp_path, "change", change, fetch="none")
    assert (await one_connection.run("read")).values["a"] == clean
    await one_connection.run("change")
    assert (await one_connection.run("read")).values["a"] == clean


# --- no reset when nothing changed -------------------------------------------------------------


async def _last_query(dsn: str, pid: int) -> str:
    con = await asyncpg.connect(dsn)
    try:
        return str(await con.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid))
    finally:
        await con.close()


async def test_a_plain_select_sends_no_reset_and_a_set_does(one_connection: Planner, tmp_path: Path, demo_dsn: str) -> None:
    _flow(tmp_path, "plain", "SELECT pg_backend_pid()", pid=False)
    _flow(tmp_path, "change", "SET TimeZone = 'Pacific/Chatham'", fetch="none", pid=False)
    pid = (await one_connection.run("plain")).values["a"]
    await one_connection.stack.primary.drain()
    assert await _last_query(demo_dsn, pid) == "SELECT pg_backend_pid()"  # the run's own statement, nothing after it
    await one_connection.run("change")
    await one_connection.stack.primary.drain()
    assert await _last_query(demo_dsn, pid) == RESET_SESSION  # the same connection, reset after the SET


async def test_only_statements_that_may_change_the_session_are_released_dirty(
    one_connection: Planner, prepared: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    released: list[bool] = []
    real = planner.db.pool._release

    async def recording(pool: Any, con: Any, dirty: bool, baseline: Any) -> None:
        released.append(dirty)
        await real(pool, con, dirty, baseline)

    monkeypatch.setattr(planner.db.pool, "_release", recording)
    flows: list[tuple[str, str | list[str]]] = [
        ("plain", "SELECT count(*) FROM whatsapp_instances"),
        ("listed", ["SELECT 1", "SELECT 2"]),
        ("write", "UPDATE whatsapp_instances SET escalation_threshold = 3 WHERE id = 0"),
        ("set", "SET TimeZone = 'UTC'"),
        ("set_config", "SELECT set_config('search_path', 'public', false)"),
        ("role", f"SET ROLE {ROLE}"),
    ]
    for name, sql in flows:
        _flow(tmp_path, name, sql, fetch="none")
        released.clear()
        await one_connection.run(name)
        await one_connection.stack.primary.drain()
        # node `a`, then node `pid` (a plain SELECT, never dirty)
        assert released == [name in ("set", "set_config", "role"), False], name
