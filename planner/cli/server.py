"""The commands on the database: `planner demo` and `planner db url|status|psql|stop`."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Annotated

import typer

from planner.cli.common import (
    DbOpt,
    UsageError,
    _on_database,
    _one_line,
    _redact,
    _shown_dsn,
    app,
    print_table,
)
from planner.errors import (
    DatabaseUnavailable,
)
from planner.results import error_text


@app.command()
def demo(
    runs: Annotated[int, typer.Option("--runs", min=1, max=10_000, help="Runs per mode and flow.")] = 30,
    rtt: Annotated[float, typer.Option("--rtt", min=0, max=1000, help="Network round trip (ms) added by a local proxy; 0 for the bare local database.")] = 20.0,
    db: DbOpt = None,
) -> None:
    """Run both seed flows on the demo database and compare the three modes.

    Starts (or reuses) the embedded PostgreSQL, loads the demo schema and data if missing,
    prints each flow's plan and a table of measured latency per mode. The queries cross a
    local proxy that adds a 20 ms round trip, the network the seed's backend had.

    Example: planner demo --rtt 0   (the bare local database)
    """
    from planner.demo.run import DEMO_DATABASE, load_notes, load_table, main_sync

    server = db or os.environ.get("DATABASE_URL")
    if server is None:
        from planner.db.embedded import embedded_dsn

        server = embedded_dsn()  # started (or reused) first: the output says which database before any figure
    typer.echo(f"database: {_shown_dsn(_on_database(server, DEMO_DATABASE))}")
    if db is None:
        typer.echo(f"  (open it with: planner db psql --database {DEMO_DATABASE})")
    typer.echo("")
    figures = main_sync(server, runs, rtt)
    for name, info in figures["flows"].items():
        p = info["plan"]
        typer.echo(f"== {name} ==")
        group_text = "; ".join(", ".join(g) for g in p.groups)
        typer.echo(f"groups: {group_text}")
        typer.echo(f"critical path: {' -> '.join(p.critical_path)}")
        typer.echo(f"estimate from latency hints: sequential {p.sequential_ms:g} ms, parallel {p.parallel_ms:g} ms "
                   f"({(1 - p.parallel_ms / p.sequential_ms) * 100:.0f}% lower)")
        base = next(f for f in info["figures"] if f.mode == "sequential").p50
        rows = [[f.mode, f"{f.p50:.2f}", f"{f.p95:.2f}", f"{f.p50 / base:.2f}", f"{f.queries_per_run:.1f}"] for f in info["figures"]]
        network = f"{rtt:g} ms round trip added by a local proxy" if rtt else "local database, no network delay"
        print_table(f"measured over {runs} runs per mode ({network})",
                    ["mode", "p50 ms", "p95 ms", "x sequential", "queries/run"], rows, right={1, 2, 3, 4})
        typer.echo("")
    if figures["load"]:
        title, headers, rows, right = load_table(figures["load"], rtt)
        print_table(title, headers, rows, right=right)
        for line in load_notes(figures["load"]):
            typer.echo(line)
        typer.echo("")
    if db is None and not os.environ.get("DATABASE_URL"):
        _embedded_left_running()


def _embedded_left_running() -> None:
    """Say that the embedded server the demo used is still running, and how to stop it: a
    process that outlives the command it came from should never be a surprise."""
    from planner.db.embedded import embedded_status

    status = embedded_status()
    if status.running:
        typer.echo(f"The embedded PostgreSQL is still running (pid {status.pid}, data in {status.pgdata}), so that "
                   "the next demo or run starts at once; `planner db stop` stops it.")


# --- planner db -----------------------------------------------------------------------------

db_app = typer.Typer(
    name="db",
    help="The database planner uses: DATABASE_URL when set, else the embedded PostgreSQL.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(db_app)
DatabaseOpt = Annotated[str | None, typer.Option("--database", help="Another database of that server (e.g. planner_demo).")]


def _which_database() -> str:
    """The DSN planner uses without `--db`: DATABASE_URL, else the embedded server's (started
    if it is not running). Raises `DatabaseUnavailable` when there is none to use."""
    from planner.db.embedded import embedded_dsn
    from planner.settings import Settings

    env = os.environ.get("DATABASE_URL")
    if env:
        return env
    if not Settings.from_env().embedded:
        raise DatabaseUnavailable("no database configured: DATABASE_URL is not set and PLANNER_EMBEDDED="
                                  f"{os.environ.get('PLANNER_EMBEDDED', '')} forbids the embedded server")
    try:
        return embedded_dsn()
    except Exception as exc:  # pg_ctl, a missing wheel, a data folder it cannot write
        raise DatabaseUnavailable(f"cannot start the embedded PostgreSQL: {error_text(exc)}") from exc


def _for_libpq(dsn: str) -> tuple[str, str | None]:
    """`dsn` without planner's own `?pgbouncer=` parameter, which libpq (psql) refuses, and
    that parameter's value (None when it had none)."""
    from planner.db.dsn import split_pooler

    return split_pooler(dsn)


@db_app.command("url")
def db_url(
    database: DatabaseOpt = None,
    show_password: Annotated[bool, typer.Option(
        "--show-password", help="Print the password too (hidden as *** otherwise), for psql \"$(planner db url --show-password)\".")] = False,
) -> None:
    """Print the DSN planner uses: DATABASE_URL's, else the embedded server's (started if it is
    not running), for psql or any libpq client: planner's own `?pgbouncer=` parameter is left
    out (libpq refuses it), and stderr says so. A password is shown as `***` (a terminal is
    often shared or recorded) unless `--show-password`; stderr says when one was hidden.

    Example: planner db url --database planner_demo --show-password   (then: psql "$(planner db url --show-password)")
    """
    dsn = _which_database()
    dsn, pooler = _for_libpq(_on_database(dsn, database) if database else dsn)
    shown = _shown_dsn(dsn, password=show_password)
    typer.echo(shown)
    if shown != _shown_dsn(dsn, password=True):  # stderr: `$(planner db url)` stays the DSN alone
        typer.echo("(password hidden as ***: --show-password prints it, e.g. psql \"$(planner db url --show-password)\"; "
                   "planner db psql needs neither)", err=True)
    if pooler is not None:
        # stderr: `$(planner db url)` stays the DSN alone
        typer.echo(f"(?pgbouncer={pooler} left out: it is planner's, libpq clients refuse it; "
                   "keep it in the DSN planner is given)", err=True)


@db_app.command("status")
def db_status() -> None:
    """Which database planner uses and whether it is up; the embedded server's data folder,
    state and version. Exits 0 when the database planner would use is up, 1 when it is not.

    Example: planner db status
    """
    from planner.db.admin import server_version
    from planner.db.embedded import embedded_status
    from planner.settings import Settings

    env = os.environ.get("DATABASE_URL")
    status = embedded_status()
    rows: list[tuple[str, str]] = []
    if env:
        try:
            reachable, up = f"yes ({asyncio.run(server_version(env, default_pooler=Settings.from_env().pooler))})", True
        except DatabaseUnavailable as exc:
            reachable, up = f"no: {_one_line(_redact(str(exc)))}", False
        rows += [("database", "DATABASE_URL (the embedded server is not used)"), ("url", _shown_dsn(env)),
                 ("reachable", reachable)]
    elif not Settings.from_env().embedded:
        up = False
        rows.append(("database", "none: DATABASE_URL is not set and PLANNER_EMBEDDED forbids the embedded server"))
    else:
        up = status.running
        rows.append(("database", "the embedded PostgreSQL (DATABASE_URL is not set)"))
    state = (f"running (pid {status.pid})" if status.running else
             "stopped" if status.initialized else "not created yet (planner creates it when it first needs it)")
    rows += [("embedded", state), ("data folder", str(status.pgdata)), ("version", status.version or "unknown")]
    if status.dsn is not None:
        rows.append(("embedded url", _shown_dsn(status.dsn)))
    width = max(len(key) for key, _ in rows) + 1
    for key, value in rows:
        typer.echo(f"{key + ':':<{width}} {value}")
    if not up:
        raise typer.Exit(1)


@db_app.command("psql", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def db_psql(ctx: typer.Context, database: DatabaseOpt = None) -> None:
    """Open psql on the database planner uses (DATABASE_URL, else the embedded server, started
    if needed; planner's `?pgbouncer=` left out, psql refuses it). Other arguments are psql's
    own. Uses the psql on PATH, else the embedded server's own.

    Example: planner db psql --database planner_demo -c 'SELECT count(*) FROM whatsapp_instances'
    """
    psql = find_psql()
    if psql is None:
        raise UsageError("psql is not installed (not on PATH, and the embedded server has none); "
                         "connect with any client to the DSN of: planner db url")
    dsn = _which_database()
    dsn, password = _without_password(_for_libpq(_on_database(dsn, database) if database else dsn)[0])
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password  # not on the command line, where `ps` would show it
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(psql, [psql, dsn, *ctx.args], env)


def find_psql() -> str | None:
    """The psql on PATH, else the one that comes with the embedded server; None when neither."""
    import shutil

    from planner.db.embedded import embedded_psql

    found = shutil.which("psql")
    if found:
        return found
    own = embedded_psql()
    return None if own is None else str(own)


def _without_password(dsn: str) -> tuple[str, str | None]:
    """A URL DSN without its password, and the password (None when it has none)."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    if "://" not in dsn:
        return dsn, None
    parts = urlsplit(dsn)
    user, at, host = parts.netloc.rpartition("@")
    name, colon, password = user.partition(":")
    if not at or not colon:
        return dsn, None
    return urlunsplit(parts._replace(netloc=f"{name}@{host}")), unquote(password) or None


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL (planner starts it again when it next needs it).

    Example: planner db stop
    """
    from planner.db.embedded import embedded_status, stop_embedded

    pgdata = embedded_status().pgdata
    try:
        stopped = stop_embedded()
    except Exception as exc:  # pg_ctl refused: say why, on one line
        raise DatabaseUnavailable(f"cannot stop the embedded PostgreSQL in {pgdata}: {error_text(exc)}") from exc
    typer.echo(f"stopped the embedded PostgreSQL in {pgdata}" if stopped else
               f"the embedded PostgreSQL in {pgdata} is not running")
