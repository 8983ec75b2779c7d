"""`planner demo` and `planner db` (planner/cli/server.py): the demo database, the embedded server, DSNs without passwords."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support.cli import cli, one_line_error
from tests.support.pgbouncer import PgBouncer


def _current_database(dsn: str) -> str:
    import asyncio

    import asyncpg

    async def ask() -> str:
        con = await asyncpg.connect(dsn)
        try:
            return str(await con.fetchval("SELECT current_database()"))
        finally:
            await con.close()

    return asyncio.run(ask())


# asyncpg reads `u:planner-secret/x@h` as host `u`, port `planner-secret`, and its error says so:
# the password is quoted without the DSN around it.
SLASHED = "postgresql://u:planner-secret/x@127.0.0.1:1/x"


def _with_password(dsn: str) -> tuple[str, str]:
    """`dsn` with a password in it (the one it has, or a made-up one: the test server trusts
    local connections and ignores it), and that password."""
    parts = urlsplit(dsn)
    if parts.password:
        return dsn, parts.password
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:planner-secret-pw@{host}")), "planner-secret-pw"


@pytest.mark.subprocess
def test_demo_prints_plans_and_a_latency_table_per_mode(pg_dsn: str) -> None:
    proc = cli("demo", "--db", pg_dsn, "--runs", "3", "--rtt", "2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "groups: instance; conversation, webhook_config, is_escalated; is_duplicate, history, recent_messages" in out
    assert "groups: settings, interactions; decide; record" in out
    for mode in ("eager", "layered", "sequential"):
        assert len(re.findall(rf"^{mode}\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+$", out, re.M)) == 2
    assert "2 ms round trip added" in out
    # The database line is a DSN that works when pasted: the socket folder (`?host=`) is kept.
    shown = re.search(r"^database: (\S+)$", out, re.M)
    assert shown is not None and "?host=" in shown.group(1) and ":@" not in shown.group(1)
    assert _current_database(shown.group(1)) == "planner_demo"
    assert "under load" not in out  # a demo of a few runs skips the load table


@pytest.mark.subprocess
def test_demo_through_pgbouncer_honours_the_dsn_parameter(pg_dsn: str, pgbouncer: PgBouncer) -> None:
    through = pgbouncer.dsn(pg_dsn)  # ...?pgbouncer=transaction: planner's, never the server's
    proc = cli("demo", "--db", through, "--runs", "3", "--rtt", "0")
    assert proc.returncode == 0, proc.stderr
    assert f":{pgbouncer.port}/planner_demo?pgbouncer=transaction" in proc.stdout
    assert len(re.findall(r"^eager\s+\d+\.\d+", proc.stdout, re.M)) == 2


@pytest.mark.subprocess
def test_db_status_through_pgbouncer_honours_the_dsn_parameter(pg_dsn: str, pgbouncer: PgBouncer) -> None:
    status = cli("db", "status", env={"DATABASE_URL": pgbouncer.dsn(pg_dsn)})
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"^reachable:\s+yes \(PostgreSQL \d+", status.stdout, re.M)


@pytest.mark.slow  # runs the demo: it makes its database, data and load table (14 s)
def test_demo_names_its_database_before_any_table(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from planner.cli import app
    from planner.demo import run

    # The load table, small: it is printed from a few runs on, at the end.
    for name, value in (("LOAD_MIN_RUNS", 1), ("LOAD_IN_FLIGHT", 10), ("LOAD_POOL", 2), ("LOAD_SECONDS", 0.2)):
        monkeypatch.setattr(run, name, value)
    result = CliRunner().invoke(app, ["demo", "--db", pg_dsn, "--runs", "2", "--rtt", "0"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    first_table = next(i for i, line in enumerate(lines) if "under load" in line or line.startswith("measured over"))
    assert "under load" in result.output
    assert lines.index(next(line for line in lines if line.startswith("database: "))) < first_table


@pytest.mark.subprocess
def test_db_psql_through_pgbouncer_leaves_the_dsn_parameter_out(demo_dsn: str, pgbouncer: PgBouncer) -> None:
    psql = cli("db", "psql", "-X", "-A", "-t", "-c", "SELECT 40 + 2", env={"DATABASE_URL": pgbouncer.dsn(demo_dsn)})
    assert psql.returncode == 0 and psql.stdout.strip() == "42", psql.stderr


@pytest.mark.subprocess
def test_db_url_through_pgbouncer_prints_a_dsn_psql_accepts(demo_dsn: str, pgbouncer: PgBouncer) -> None:
    from planner.cli import find_psql

    url = cli("db", "url", env={"DATABASE_URL": pgbouncer.dsn(demo_dsn)})
    assert url.returncode == 0, url.stderr
    psql = find_psql()
    assert psql is not None
    asked = subprocess.run([psql, "-X", "-A", "-t", "-c", "SELECT 40 + 2", url.stdout.strip()],
                           capture_output=True, text=True, timeout=60)
    assert asked.returncode == 0 and asked.stdout.strip() == "42", asked.stderr


@pytest.mark.slow  # measures the demo's load, coalescing on and off
async def test_the_demo_load_table_compares_coalescing_on_and_off(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    from planner.cli import print_table
    from planner.demo.run import demo_dsn, load_notes, load_table, measure_load

    dsn = await demo_dsn(pg_dsn, lambda _m: None)
    load = await measure_load(dsn, in_flight=20, pool=2, seconds=0.4)
    assert [f.coalesce for f in load] == [True, False]
    assert all(f.ok_per_s > 0 and f.p50_ms > 0 for f in load)
    title, headers, rows, right = load_table(load, 0)
    print_table(title, headers, rows, right=right)
    out = capsys.readouterr().out
    assert "process_buffered under load: 20 messages in flight, pool 2, eager, at least 0.4 s each (the bare local database)" in out
    assert re.search(r"^coalescing on\s+\d+\.\d\s+\d+\.\d\d\s+\d+\.\d\s+\d+\.\d$", out, re.M), out
    assert re.search(r"^coalescing off\s+\d+\.\d\s+1\.00\s+\d+\.\d\s+\d+\.\d$", out, re.M), out
    notes = load_notes(load)
    assert notes[0].startswith("messages/s: runs that finished ok") and "failed/s: runs that raised FlowFailed" in notes[0]


def test_the_demo_load_notes_say_why_runs_failed() -> None:
    from planner.demo.run import LoadFigures, load_notes

    load = [LoadFigures(200, 10, 2, True, 400.0, 0.0, 50.0),
            LoadFigures(200, 10, 2, False, 150.0, 7.8, 900.0,
                        {"passed the flow's deadline (FlowTimeout: flow 'process_buffered' hit its deadline of 5s)": 14,
                         "node 'conversation' failed: QueryError: deadlock detected": 2})]
    notes = load_notes(load)
    assert notes[1] == ("failed with coalescing off: 14 passed the flow's deadline (FlowTimeout: flow 'process_buffered' "
                        "hit its deadline of 5s); 2 node 'conversation' failed: QueryError: deadlock detected")
    assert "no run failed" not in notes and len(notes) == 2


async def test_a_failed_runs_reason_names_its_node_and_error(demo_dsn: str, tmp_path: Path) -> None:
    from planner import FlowFailed, Planner
    from planner.demo.run import failure_reason

    (tmp_path / "f.yaml").write_text("settings: {timeout: 100ms}\nnodes:\n"
                                     "  boom: {sql: SELECT 1/0, fetch: value, on_error: fail}\n"
                                     "  nap: {sql: SELECT pg_sleep(2), fetch: value, when: 'false'}\n")
    (tmp_path / "slow.yaml").write_text("settings: {timeout: 100ms}\nnodes:\n  nap: {sql: SELECT pg_sleep(2), fetch: value}\n")
    async with Planner(flows=tmp_path, dsn=demo_dsn, metrics=False) as planner:
        with pytest.raises(FlowFailed) as failed:
            await planner.run("f")
        with pytest.raises(FlowFailed) as slow:
            await planner.run("slow")
    assert failure_reason(failed.value).startswith("node 'boom' failed: QueryError: DivisionByZeroError")
    assert failure_reason(slow.value).startswith("passed the flow's deadline (FlowTimeout: flow 'slow' hit its deadline")


def test_the_demo_says_the_embedded_server_it_used_is_still_running(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from urllib.parse import parse_qs

    from planner.cli import _embedded_left_running

    socket = parse_qs(urlsplit(pg_dsn).query).get("host", [""])[0]
    if not socket:
        pytest.skip("the suite runs on a server of its own (--planner-dsn / DATABASE_URL), not an embedded one")
    monkeypatch.setenv("PLANNER_HOME", str(Path(socket).parent))
    _embedded_left_running()
    out = capsys.readouterr().out
    assert "The embedded PostgreSQL is still running (pid " in out and "`planner db stop` stops it" in out


def test_the_demo_says_nothing_of_a_server_that_is_not_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from planner.cli import _embedded_left_running

    monkeypatch.setenv("PLANNER_HOME", str(tmp_path / "no-server"))
    _embedded_left_running()
    assert capsys.readouterr().out == ""


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param(["run", "escalation", "-i", "instance_id=1", "-i", "user_phone=x", "-i", "message=m", "--db", SLASHED], {}, id="run-db"),
        pytest.param(["run", "escalation", "-i", "instance_id=1", "-i", "user_phone=x", "-i", "message=m", f"--db={SLASHED}"], {}, id="run-db-equals"),
        pytest.param(["run", "escalation", "-i", "instance_id=1", "-i", "user_phone=x", "-i", "message=m"], {"DATABASE_URL": SLASHED}, id="run-env"),
        pytest.param(["validate", "--db", SLASHED], {}, id="validate-db"),
        pytest.param(["demo", "--runs", "1", "--db", SLASHED], {}, id="demo-db"),
    ],
)
def test_an_error_never_shows_the_password(args: list[str], env: dict[str, str]) -> None:
    proc = cli(*args, env=env)
    assert proc.returncode == 2
    assert "planner-secret" not in proc.stdout + proc.stderr
    assert "***" in one_line_error(proc, 2)


@pytest.mark.subprocess
def test_the_debug_traceback_never_shows_the_password() -> None:
    # The demo connects with asyncpg itself: its malformed-DSN error is not a FlowError, so
    # PLANNER_DEBUG=1 prints the traceback (`run` reports DatabaseUnavailable, with no traceback).
    proc = cli("demo", "--db", SLASHED, "--runs", "1", env={"PLANNER_DEBUG": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert "planner-secret" not in proc.stderr


@pytest.mark.subprocess
def test_demo_shows_its_database_without_the_password(pg_dsn: str) -> None:
    dsn, password = _with_password(pg_dsn)
    proc = cli("demo", "--db", dsn, "--runs", "1", "--rtt", "0")
    assert proc.returncode == 0, proc.stderr
    assert password not in proc.stdout + proc.stderr
    assert re.search(r"^database: postgresql://[^\s:@]*:\*\*\*@", proc.stdout, re.M)


@pytest.mark.subprocess
def test_a_malformed_dsn_is_a_database_error_not_an_internal_one() -> None:
    proc = cli("run", "escalation", "-i", "instance_id=1", "-i", "user_phone=x", "-i", "message=m", "--db", "postgresql://u@127.0.0.1:notaport/x")
    assert one_line_error(proc, 2).startswith("planner: cannot reach the database: ValueError: ")


@pytest.mark.subprocess
def test_db_manages_the_embedded_server(tmp_path: Path) -> None:
    from planner.db.embedded import stop_embedded

    home = tmp_path / "home"
    env = {"PLANNER_HOME": str(home), "DATABASE_URL": ""}
    try:
        status = cli("db", "status", env=env)
        assert status.returncode == 1  # nothing running: not up
        assert "embedded:    not created yet" in status.stdout and f"data folder: {home / 'pgdata'}" in status.stdout
        url = cli("db", "url", env=env)
        assert url.returncode == 0, url.stderr
        dsn = url.stdout.strip()
        assert dsn.startswith("postgresql://postgres@/postgres?host=") and _current_database(dsn) == "postgres"
        status = cli("db", "status", env=env)
        assert status.returncode == 0, status.stdout
        assert re.search(r"^embedded:\s+running \(pid \d+\)$", status.stdout, re.M)
        assert re.search(r"^version:\s+PostgreSQL \d+", status.stdout, re.M)
        assert f"embedded url: {dsn}" in status.stdout
        other = cli("db", "url", "--database", "template1", env=env).stdout.strip()
        assert _current_database(other) == "template1"
        psql = cli("db", "psql", "-X", "-A", "-t", "-c", "SELECT 40 + 2", env=env)
        assert psql.returncode == 0 and psql.stdout.strip() == "42", psql.stderr
        stop = cli("db", "stop", env=env)
        assert stop.returncode == 0 and stop.stdout.strip() == f"stopped the embedded PostgreSQL in {home / 'pgdata'}"
        again = cli("db", "stop", env=env)
        assert again.returncode == 0 and "is not running" in again.stdout
        status = cli("db", "status", env=env)
        assert status.returncode == 1 and "embedded:    stopped" in status.stdout
    finally:
        stop_embedded(home)


@pytest.mark.subprocess
def test_db_with_database_url_shows_it_without_the_password(demo_dsn: str) -> None:
    dsn, password = _with_password(demo_dsn)
    url = cli("db", "url", env={"DATABASE_URL": dsn})
    assert url.returncode == 0 and password not in url.stdout and ":***@" in url.stdout
    assert "--show-password" in url.stderr and password not in url.stderr  # says why pasting it would fail
    status = cli("db", "status", env={"DATABASE_URL": dsn})
    assert status.returncode == 0, status.stdout
    assert re.search(r"^database:\s+DATABASE_URL \(the embedded server is not used\)$", status.stdout, re.M)
    assert re.search(r"^reachable:\s+yes \(PostgreSQL \d+", status.stdout, re.M)
    assert password not in status.stdout + status.stderr
    psql = cli("db", "psql", "-X", "-A", "-t", "-c", "SELECT current_database()", env={"DATABASE_URL": dsn})
    assert psql.returncode == 0 and psql.stdout.strip() == urlsplit(demo_dsn).path.lstrip("/"), psql.stderr


@pytest.mark.subprocess
def test_db_url_show_password_prints_a_dsn_that_connects(demo_dsn: str) -> None:
    dsn, password = _with_password(demo_dsn)
    url = cli("db", "url", "--show-password", env={"DATABASE_URL": dsn})
    assert url.returncode == 0 and f":{password}@" in url.stdout and url.stderr == ""
    psql = cli("db", "psql", "-X", "-A", "-t", "-c", "SELECT 1", env={"DATABASE_URL": url.stdout.strip()})
    assert psql.returncode == 0 and psql.stdout.strip() == "1", psql.stderr


@pytest.mark.subprocess
def test_db_url_without_a_password_says_nothing_of_one(demo_dsn: str) -> None:
    url = cli("db", "url", env={"DATABASE_URL": demo_dsn.replace(f":{urlsplit(demo_dsn).password}@", "@")
                                if urlsplit(demo_dsn).password else demo_dsn})
    assert url.returncode == 0 and "***" not in url.stdout and "password" not in url.stderr


@pytest.mark.subprocess
def test_db_status_of_an_unreachable_database_url_exits_1() -> None:
    status = cli("db", "status", env={"DATABASE_URL": SLASHED.replace("/x@", "@")})
    assert status.returncode == 1
    assert re.search(r"^reachable:\s+no: ", status.stdout, re.M) and "planner-secret" not in status.stdout


@pytest.mark.subprocess
def test_db_without_any_database_allowed_is_a_one_line_error(tmp_path: Path) -> None:
    env = {"DATABASE_URL": "", "PLANNER_EMBEDDED": "0", "PLANNER_HOME": str(tmp_path)}
    line = one_line_error(cli("db", "url", env=env), 2)
    assert line == "planner: no database configured: DATABASE_URL is not set and PLANNER_EMBEDDED=0 forbids the embedded server"
    assert not (tmp_path / "pgdata").exists()


def test_db_psql_without_psql_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from planner import cli as cli_module
    from planner.db import embedded as db

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(db, "embedded_psql", lambda: None)
    monkeypatch.setattr(sys, "argv", ["planner", "db", "psql"])
    with pytest.raises(SystemExit) as info:
        cli_module.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("planner: psql is not installed") and err.count("\n") == 1
