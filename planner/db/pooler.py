"""Transaction-mode poolers (PgBouncer's pool_mode = transaction): refusing statements whose effects outlive a transaction, and
`PoolerConnection`, which keeps no prepared statement on the server. `connect` opens one
connection of planner's own through the same rules. Reading the mode (`pooler_mode`,
`split_pooler`) is in `planner.db.dsn`, which needs no driver."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import asyncpg

from planner.db.dsn import TRANSACTION_POOLER, pooler_mode, split_pooler
from planner.db.synced import SyncedConnection
from planner.db.wire import Check, Expected, StaleResult, Wire, install, may_send_again
from planner.errors import DatabaseUnavailable

logger = logging.getLogger("planner")

DESCRIBED_S = 5.0  # behind a transaction pooler: how long a statement's description is used (`PoolerConnection`)


# --- transaction-mode poolers -------------------------------------------------------------
# Behind PgBouncer's pool_mode = transaction (1.18 keeps no prepared statement from one
# transaction to the next) each transaction may run on another server connection, shared with
# other clients. planner then keeps no prepared statement on the server (asyncpg sends unnamed
# ones, parsed again with each use, `PoolerConnection`; the `prepare()` calls that learn
# parameter types and columns for coalescing, fusion and `validate --db` make unnamed statements
# too), resets no session, and refuses statements whose effects outlive their transaction
# (`outlives_transaction`). LISTEN cannot work there: anything in planner that comes to LISTEN
# must use a direct DSN of its own, never this pool.

STATEMENT_CACHE = 256  # prepared statements kept per connection (asyncpg's default: 100)

def outlives_transaction(texts: Sequence[str]) -> str | None:
    """What in `texts` would leave state on the session beyond its transaction (`"it runs
    SET"`), or None. Transaction-scoped effects pass: SET LOCAL, set_config(..., true), LOCK,
    nextval, advisory xact locks, cursors without HOLD, temporary tables ON COMMIT DROP.
    Statement analysis (`planner.lang.sqlinfo`) flags all of them as `session`; this tells them apart."""
    import pglast
    from pglast import ast, enums

    found: list[str] = []

    def temporary(rel: Any, on_commit: Any) -> None:
        if rel is not None and rel.relpersistence == "t" and on_commit != enums.OnCommitAction.ONCOMMIT_DROP:
            found.append("it creates a temporary table (without ON COMMIT DROP)")

    def visit(node: Any) -> None:
        if isinstance(node, ast.VariableSetStmt):
            if not node.is_local and (node.name or "").lower() != "transaction":
                verb = "RESET" if node.kind is not None and "RESET" in node.kind.name else "SET"
                found.append(f"it runs {verb} {node.name or 'ALL'}")
        elif isinstance(node, ast.ListenStmt):
            found.append("it runs LISTEN")
        elif isinstance(node, ast.PrepareStmt):
            found.append("it runs PREPARE")
        elif isinstance(node, ast.DeclareCursorStmt) and (node.options or 0) & 0x0020:  # CURSOR_OPT_HOLD
            found.append("it declares a cursor WITH HOLD")
        elif isinstance(node, ast.DiscardStmt | ast.LoadStmt):
            found.append(f"it runs {'DISCARD' if isinstance(node, ast.DiscardStmt) else 'LOAD'}")
        elif isinstance(node, ast.DoStmt | ast.CallStmt):
            found.append(f"it runs {'a DO block' if isinstance(node, ast.DoStmt) else 'CALL'}, which may change the session")
        elif isinstance(node, ast.CreateStmt):
            temporary(node.relation, node.oncommit)
        elif isinstance(node, ast.CreateTableAsStmt) and node.into is not None:
            temporary(node.into.rel, node.into.onCommit)
        elif isinstance(node, ast.SelectStmt) and node.intoClause is not None:
            temporary(node.intoClause.rel, node.intoClause.onCommit)
        elif isinstance(node, ast.FuncCall):
            name = str(getattr((node.funcname or (None,))[-1], "sval", "")).lower()
            if name == "set_config":
                local = node.args[2] if node.args and len(node.args) == 3 else None
                if not (isinstance(local, ast.A_Const) and getattr(local.val, "boolval", False) is True):
                    found.append("it calls set_config(...) without is_local = true")
            elif name == "setseed":
                found.append("it calls setseed()")
            elif name.startswith(("pg_advisory", "pg_try_advisory")) and "xact" not in name and "unlock" not in name:
                found.append(f"it takes a session advisory lock ({name})")
        for child in _children(node):
            visit(child)

    for text in texts:
        try:
            trees = pglast.parse_sql(text)
        except pglast.parser.ParseError:
            continue  # the server will say what is wrong with it
        for tree in trees:
            visit(tree)
    return found[0] if found else None


def _children(node: Any) -> list[Any]:
    from pglast import ast

    children: list[Any] = []
    if isinstance(node, ast.Node):
        for name in node:
            value = getattr(node, name)
            items = value if isinstance(value, tuple) else (value,)
            children += [item for item in items if isinstance(item, ast.Node | tuple)]
    elif isinstance(node, tuple):
        children += [item for item in node if isinstance(item, ast.Node | tuple)]
    return children


class PoolerConnection(SyncedConnection):
    """A connection behind a transaction pooler. asyncpg's statement cache is off there (its
    named statements would not survive the transaction), so asyncpg sends every statement
    unnamed: one round trip to describe it, a second to execute it. This keeps what the server
    said of each statement (parameter and column types) and sends it unnamed again with each
    use (Parse, Describe, Bind, Execute, Sync): one round trip, on whatever server connection
    the pooler picks.

    A description is never trusted blindly (`planner.db.wire`): each use pins its parameter types
    in the Parse and compares the column types the server announces with it before a row is
    decoded. After a migration (`int8 -> float8`, a column added under `SELECT *`, a view
    redefined) a statement proven free of effects is sent again, described afresh (the right
    value); any other raises `StaleResult` naming the column (a clear error, its rows never
    decoded with the old types). A description is also dropped after `DESCRIBED_S` and after
    any error. Where the wire cannot be watched, no description is kept (see `wire.install`)."""

    _described: OrderedDict[tuple[Any, ...], tuple[Any, float, Expected]] | None = None
    _wire: Wire | None = None
    _last: tuple[Any, Expected] | None = None  # the statement `_get_statement` last returned, and its description

    def __init__(self, protocol: Any, transport: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(protocol, transport, *args, **kwargs)
        self._wire = install(transport, protocol)

    def _watching(self) -> Wire | None:
        wire = self._wire
        if wire is not None and wire.broken is not None:
            logger.warning("behind the transaction pooler, planner describes every statement before each use "
                           "on this connection: %s", wire.broken)
            self._wire = wire = None
            self._drop_described()
        return wire

    async def _get_statement(self, query: str, timeout: float | None, *,  # noqa: ASYNC109 - asyncpg's signature
                             named: Any = False, use_cache: bool = True, ignore_custom_codec: bool = False,
                             record_class: Any = None) -> Any:
        if self._watching() is None:  # described before each use: nothing kept can be stale
            return await super()._get_statement(query, timeout, named=named, use_cache=use_cache,
                                                ignore_custom_codec=ignore_custom_codec, record_class=record_class)
        described = self._described
        if described is None:
            described = self._described = OrderedDict()
        key = (query, record_class, ignore_custom_codec)
        now = time.monotonic()
        if use_cache and not named:  # `prepare()` always asks the server
            kept = described.get(key)
            if kept is not None and kept[1] > now and not kept[0].closed:
                described.move_to_end(key)
                kept[0].mark_unprepared()  # sent with its text again: Parse, Describe, Bind, Execute
                self._last = (kept[0], kept[2])
                return kept[0]
        statement = await super()._get_statement(query, timeout, named=named, use_cache=use_cache,
                                                 ignore_custom_codec=ignore_custom_codec, record_class=record_class)
        if use_cache and not named and not statement.name:
            expected = Expected.of(statement)
            described[key] = (statement, now + DESCRIBED_S, expected)
            described.move_to_end(key)
            self._last = (statement, expected)
            if len(described) > STATEMENT_CACHE:
                described.popitem(last=False)
        return statement

    async def _do_execute(self, query: str, executor: Any, timeout: float | None,  # noqa: ASYNC109 - asyncpg's signature
                          retry: bool = True, **kwargs: Any) -> Any:
        wire = self._watching()
        if wire is None or getattr(executor, "checked", False):
            return await self._execute_once(query, executor, timeout, retry, **kwargs)
        for attempt in (1, 2):
            check = Check()
            failure: Exception | None = None
            try:
                result = await self._execute_once(query, wire.checked(executor, self._expected, check), timeout,
                                                  retry, **kwargs)
            except Exception as exc:
                if check.stale is None:
                    raise
                failure = exc  # rows that did not fit the old description: the same staleness
            if check.stale is None:
                return result
            self._drop_described()
            # A read proven free of effects is sent again; anything else might write (a job claimed twice).
            # The effects model's verdict decides (`wire.repeatable`), never the functions' names.
            again = attempt == 1 and may_send_again()
            logger.info("a statement's result changed since planner described it (%s)%s", check.stale,
                        ": it is sent again, described afresh" if again else "")
            if not again:
                raise StaleResult(
                    f"the statement's result changed since planner described it: {check.stale} (a migration?). "
                    "It was executed on the server (in a transaction, that is rolled back with it), and its rows "
                    "were not returned: decoded as the old types they would have been wrong values. "
                    "It is described afresh from its next use.") from failure
        raise AssertionError("unreachable")  # pragma: no cover

    def _expected(self, statement: Any) -> Expected:
        last = self._last
        return last[1] if last is not None and last[0] is statement else Expected.of(statement)

    async def _execute_once(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super()._do_execute(*args, **kwargs)
        except (asyncpg.exceptions.ProtocolError, BufferError) as exc:
            # Rows that do not fit the description: the statement's result changed under it.
            self._drop_described()
            raise asyncpg.exceptions.ProtocolError(
                f"{exc}: the statement's result changed since planner described it (a migration?); "
                "it was executed, and it is described again from its next use") from exc
        except BaseException:
            self._drop_described()  # perhaps a description gone stale: ask again
            raise

    def _drop_described(self) -> None:
        self._last = None
        if self._described:
            self._described.clear()

    def _drop_local_statement_cache(self) -> None:
        super()._drop_local_statement_cache()
        self._drop_described()


async def connect(dsn: str, *, pooler: str | None = None, default_pooler: str | None = None,
                  connect_timeout: float = 60.0) -> asyncpg.Connection:
    """A connection of its own to `dsn`'s database (no pool), for planner's helpers: the
    demo, `planner db status`, creating and dropping databases. With `PoolBackend.pool()`,
    the one place a DSN planner is given reaches asyncpg: its `?pgbouncer=` is taken off
    (asyncpg would send it to the server as a setting, which refuses it) and honoured, as
    `pooler=` and `default_pooler` are (the argument first, then the DSN, then the default,
    which an edge takes from `Settings.pooler`, i.e. `PLANNER_POOLER`):
    behind a transaction pooler, no named prepared statement is left on the server
    (`PoolerConnection`). A bad pooler value is `DatabaseUnavailable`."""
    dsn, given = split_pooler(dsn)
    try:
        if pooler is not None:
            mode = pooler_mode(pooler, "pooler=")
        elif given is not None:
            mode = pooler_mode(given, "the DSN's pgbouncer=")
        else:
            mode = default_pooler
    except ValueError as exc:
        raise DatabaseUnavailable(str(exc)) from None
    if mode == TRANSACTION_POOLER:
        return await asyncpg.connect(dsn, timeout=connect_timeout, statement_cache_size=0,
                                     connection_class=PoolerConnection)
    return await asyncpg.connect(dsn, timeout=connect_timeout)
