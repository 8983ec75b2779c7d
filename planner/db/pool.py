"""The database: the asyncpg pool backend, error translation, and the embedded server.

This is the one module that imports asyncpg, and the one boundary where its exceptions (and
the socket's) become planner's: `QueryError` (with `sqlstate`, `transient` and, for a
statement the server refused, `position`) and `DatabaseUnavailable`, as httpx maps httpcore's
in one place. `PoolBackend` implements `planner.kinds.backend.Backend` over a pool.

Connections are checked out per statement (or per transaction) and never held while a node
waits for another. A node hands its value to its dependents first and the connection goes
back to the pool in the background; `drain()` waits for those releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
from cachetools import LRUCache

from planner.db.channel import PoolChannel
from planner.db.dsn import TRANSACTION_POOLER, pooler_mode, redact_dsn, split_pooler
from planner.db.embedded import embedded_dsn, planner_home
from planner.db.fused import FusedReads
from planner.db.pooler import STATEMENT_CACHE, PoolerConnection, outlives_transaction
from planner.db.shared import STATEMENTS_KEPT, SharedStatements, _query
from planner.db.synced import SyncedConnection, settle
from planner.db.translate import POOLER_HINT, _reraise
from planner.db.wire import repeatable
from planner.db.writes import CombinedWrites
from planner.errors import DatabaseUnavailable, QueryError
from planner.kinds.backend import Described, Outcome, Query
from planner.lang.effects import Effects
from planner.lang.nodes import CompiledNode
from planner.results import error_text
from planner.run.policy import timed

logger = logging.getLogger("planner")
RETIRED_POOL_S = 5.0  # how long a pool replaced by `_adopt_pooler` stays open for the statements that took it
CONNECT_TIMEOUT_S = 60.0  # how long opening one connection may take (asyncpg's default, said aloud in errors)
_RELEASE_TIMEOUT_S = 2.0  # a connection that cannot be reset in this time (a frozen backend) is terminated
# What a flow statement may leave behind on its session, undone before the connection is
# reused. RESET ALL leaves the role alone, hence SET SESSION AUTHORIZATION DEFAULT (which
# also resets the role); asyncpg's own reset query lacks it.
RESET_SESSION = (
    "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; CLOSE ALL; UNLISTEN *; "
    "SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES"
)
# Settings the server reports to the client whenever they change (GUC_REPORT): a change the
# statement analysis could not see (a function that calls set_config) still shows here.
_REPORTED = ("TimeZone", "search_path", "session_authorization", "is_superuser", "DateStyle", "IntervalStyle",
             "application_name", "default_transaction_read_only", "standard_conforming_strings")


async def _init_connection(con: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await con.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(con: asyncpg.Connection) -> None:
    """Release without asyncpg's reset round trip; `PoolBackend` resets what needs it itself."""


def _reported(con: Any) -> tuple[str | None, ...]:
    settings = con.get_settings()
    return tuple(getattr(settings, name, None) for name in _REPORTED)


class PoolBackend:
    """The direct backend: an asyncpg pool, owned (`dsn=`) or borrowed (`pool=`), opened on first use.

    A pool planner owns skips asyncpg's reset query on release (a full round trip that would
    double how long each connection is held per statement). Instead a connection is reset
    (`RESET_SESSION`, in the background, off the run's critical path) only when a statement
    may have changed its session: the statement analysis says so (`SET`, `set_config(...,
    false)`, `SET ROLE`, `LISTEN`...), or a setting the server reports changed. A borrowed
    pool keeps its own reset; `full_reset=True` keeps asyncpg's on an owned one too.
    """

    def __init__(
        self,
        *,
        dsn: str | None = None,
        pool: asyncpg.Pool | None = None,
        min_size: int = 2,
        max_size: int = 10,
        full_reset: bool = False,
        embedded: bool | None = None,
        pooler: str | None = None,
        database_url: str | None = None,
        embedded_default: bool = True,
        default_pooler: str | None = None,
    ) -> None:
        # The last three are the environment's (`planner.settings.Settings`: DATABASE_URL,
        # PLANNER_EMBEDDED, PLANNER_POOLER), passed in: nothing here reads the environment.
        self._dsn, self._pool, self._owned = dsn, pool, pool is None
        self._database_url = database_url
        self._embedded = embedded
        self._embedded_default = embedded_default
        # Behind a transaction-mode pooler (PgBouncer's pool_mode = transaction): `pooler=`,
        # else the DSN's `?pgbouncer=` (read when the pool opens), else `default_pooler`.
        self._pooler_given = pooler is not None
        self.pooler = pooler_mode(pooler, "pooler=") if pooler is not None else default_pooler
        if dsn is not None and not self._pooler_given and split_pooler(dsn)[1] is not None:
            with contextlib.suppress(ValueError):  # a bad value is DatabaseUnavailable when the pool opens
                self.pooler = pooler_mode(split_pooler(dsn)[1])
        self._sizes = (min_size, max_size)
        self._full_reset = full_reset
        self._lock = asyncio.Lock()
        self._releases: set[asyncio.Task[None]] = set()
        self._retired: list[asyncpg.Pool] = []  # pools replaced when planner found a pooler (`_adopt_pooler`)
        self._baseline: tuple[str | None, ...] | None = None
        self.shared = SharedStatements(self, CombinedWrites(self))  # read batches and combined writes
        self.fused = FusedReads(self.shared)  # a run's sibling reads
        self._search_paths: weakref.WeakKeyDictionary[asyncpg.Connection, str] = weakref.WeakKeyDictionary()
        # What planner learnt of each statement text, kept per text (see `STATEMENTS_KEPT`):
        kept = STATEMENTS_KEPT
        self._refused: LRUCache[str, str | None] = LRUCache(kept)  # statements -> why they cannot be sent behind the pooler
        # The effects model's verdict on a statement text (`planner.db.catalog.Catalog.known`),
        # set by `catalog_of`: whether a stale read may be sent again (`proven_pure`).
        self.verdict: Callable[[str], Effects | None] | None = None
        self.load = PoolLoad(self._size)  # how busy it is: what sharing decides from, and metrics read
        self.channel = PoolChannel(self)  # the cache's channel between processes, on this pool's server
        self._connected_dsn: str | None = None  # the DSN an owned pool was made from

    @property
    def opened(self) -> bool:
        return self._pool is not None

    async def open(self) -> None:
        await self.pool()

    async def pool(self) -> asyncpg.Pool:
        """The pool, created at the first call: from `dsn`, else `database_url`, else the embedded
        server (unless `embedded=False` or `PLANNER_EMBEDDED=0`: then `DatabaseUnavailable`).

        Which database, and why, is logged once at WARNING on the `planner` logger (password
        hidden): a service that meant to use its own server but runs on the embedded one says so.
        """
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                dsn, source, why = await choose_dsn(self._dsn, self._database_url, self._embedded,
                                                    self._embedded_default)
                shown = redact_dsn(dsn)
                logger.warning("planner uses the database %s (%s: %s)", shown, source, why,
                               extra={"database": shown, "database_source": source})
                dsn = self._take_pooler(dsn)
                self._connected_dsn = dsn
                self._pool = await create_pool(dsn, self._sizes, self._init, full_reset=self._full_reset,
                                               pooled=self.pooler == TRANSACTION_POOLER)
        return self._pool

    def _take_pooler(self, dsn: str) -> str:
        """`dsn` without its `pgbouncer=` parameter (asyncpg would send it to the server as a
        setting); the parameter sets `pooler` unless `pooler=` was given."""
        dsn, given = split_pooler(dsn)
        if given is not None and not self._pooler_given:
            try:
                self.pooler = pooler_mode(given, "the DSN's pgbouncer=")
            except ValueError as exc:
                raise DatabaseUnavailable(str(exc)) from None
        return dsn

    def _check_pooler(self, node: CompiledNode) -> None:
        refuse_session_state(node, self.pooler, self._refused)

    async def _init(self, con: asyncpg.Connection) -> None:
        await _init_connection(con)
        if self._baseline is None:
            self._baseline = _reported(con)
        # Which function a name means depends on it: the effects catalog asks under the same one
        # (`search_paths`). A connection keeps the search_path it opened with (the database's or
        # role's default then), so after `ALTER DATABASE ... SET search_path` the pool's older and
        # newer connections differ; the server does not report it before PostgreSQL 18.
        self._search_paths[con] = await con.fetchval("SELECT current_setting('search_path')")

    def search_paths(self) -> set[str]:
        """The search_paths the pool's open connections started with (empty for a borrowed pool,
        whose connections the catalog asks on)."""
        return {path for con, path in list(self._search_paths.items()) if not con.is_closed()}

    def proven_pure(self, node: CompiledNode) -> bool:
        """Whether `node`'s statement is proven free of effects by the one effects model (the
        catalog's verdict, `planner.lang.effects`): a read of it whose result went stale under
        its description behind a pooler may be sent again. Not judged (no catalog) is not proven."""
        verdict = self.verdict
        if not node.sql.read_only or verdict is None:
            return False
        effects = verdict(node.sql.statements[0].text)
        return effects is not None and effects.pure

    async def run(self, query: Query) -> Any:
        pool = self._pool or await self._first_pool()
        self._check_pooler(query.node)
        async with self.held(pool, query.sql.session) as con:
            # The node's timeout times the statements, not the wait for a connection above.
            timeout = query.timeout
            started = time.monotonic()
            with repeatable(self.proven_pure(query.node)):
                value = await (_query(con, query) if timeout is None else timed(_query(con, query), timeout))
        if query.sql.coalesce and query.sql.read_only:  # what it costs sent direct: a batch of it splits past a bound
            self.shared._record(query.statements[0].text, time.monotonic() - started)
        return value

    @contextlib.asynccontextmanager
    async def held(self, pool: asyncpg.Pool, session: bool) -> AsyncIterator[asyncpg.Connection]:
        """A connection of `pool` for one statement (or one transaction), given back in the
        background however the block ends (reset first when `session` says a statement may
        have changed it, `_release_later`). An error of the block is planner's once out of it
        (BEGIN/COMMIT or the socket; statements translate their own), and a pooler it reveals
        is adopted (`_adopt_pooler`)."""
        con = await self._acquire(pool)
        try:
            yield con
        except BaseException as exc:  # CancelledError too: the connection must still go back
            self._release_later(pool, con, session)
            self._adopt_pooler(exc)
            _reraise(exc)
        self._release_later(pool, con, session)

    def _adopt_pooler(self, exc: BaseException) -> None:
        """A transaction-mode pooler planner was not told of has just answered (its error says
        so first, see `translate.POOLER_HINT`): from now on run as if told, on a new pool of an
        owned pool's DSN (unnamed statements, nothing kept between transactions); the old pool
        closes once its connections are back. The statements that failed before stay failed:
        the DSN should still say so, and the WARNING says how."""
        if self.pooler == TRANSACTION_POOLER or not self._owned or not str(exc).startswith(POOLER_HINT):
            return
        self.pooler = TRANSACTION_POOLER
        old, self._pool = self._pool, None
        shown = redact_dsn(self._connected_dsn) if self._connected_dsn else "the DSN"
        logger.warning("planner: runs behind a transaction-mode pooler from now on (a new pool of %s, no prepared "
                       "statement kept): say so in the DSN (?pgbouncer=transaction) so that no statement fails first",
                       shown, extra={"database": shown, "outcome": "pooler_adopted"})
        if old is not None:
            # Not closed at once: a statement that took the old pool a moment ago may still ask
            # it for a connection (a closing pool refuses). `close()` closes it sooner if asked.
            self._retired.append(old)
            asyncio.get_running_loop().call_later(RETIRED_POOL_S, self._close_retired, old)

    def _close_retired(self, pool: asyncpg.Pool) -> None:
        if pool in self._retired:
            self._retired.remove(pool)
            closing = asyncio.get_running_loop().create_task(pool.close())
            self._releases.add(closing)
            closing.add_done_callback(self._releases.discard)

    def idle(self, share: float = 1.0) -> bool:
        """`PoolLoad.idle` (what fusion and coalescing ask of the pool they are given)."""
        return self.load.idle(share)

    def _size(self) -> int:
        """The pool's most connections (a borrowed pool's own)."""
        return self._sizes[1] if self._owned or self._pool is None else self._pool.get_max_size()

    async def _first_pool(self) -> asyncpg.Pool:
        return await self.load.opening(self.pool)

    async def _acquire(self, pool: asyncpg.Pool) -> asyncpg.Connection:
        return await self.load.acquire(pool)  # counted until `_release_later`'s task is done

    async def run_batch(self, node: CompiledNode, params: list[list[Any]], started: Callable[[], None]) -> list[Outcome] | None:
        return await self.shared.run_batch(node, params, started)

    async def run_fused(self, queries: list[Query]) -> list[Outcome] | None:
        return await self.fused.run_fused(queries)

    @property
    def splits(self) -> int:
        """Read batches split because they ran long with a connection free (a figure for benchmarks)."""
        return self.shared.splits

    async def describe(self, text: str) -> Described:
        """Prepare `text` on a connection of the pool, without sending it (`Database.describe`)."""
        return await describe_on(self._pool or await self.pool(), text)

    async def drain(self) -> None:
        """Wait until every connection a node used is back in the pool."""
        while self._releases:
            await asyncio.wait(list(self._releases))

    async def close(self) -> None:
        """Stop listening, wait for background releases; close the pool if this object created it."""
        await self.channel.close()
        await self.drain()
        while self._retired:
            await self._retired.pop().close()
        if self._pool is not None and self._owned:
            pool, self._pool = self._pool, None
            await pool.close()

    def _release_later(self, pool: asyncpg.Pool, con: asyncpg.Connection, session: bool) -> asyncio.Task[None]:
        # A borrowed pool, or a full reset, leaves resetting to asyncpg. Behind a transaction
        # pooler nothing is reset: the next statement may reach another server connection
        # anyway (and statements that would leave session state are refused, `_check_pooler`).
        check = self._owned and not self._full_reset and self.pooler != TRANSACTION_POOLER
        task = asyncio.get_running_loop().create_task(_release(pool, con, check and session, self._baseline if check else None))
        task.add_done_callback(self.load.released)
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return task


class PoolLoad:
    """How busy a pool backend is: planner's statements holding or waiting for one of `size()`
    connections (a `planner.kinds.backend.Load`: fusion, coalescing and compiled groups decide
    from it; metrics read `in_use`, `waiting`, `max_size` and are told each wait, `on_wait`).
    asyncpg's idle count cannot tell: a connection just released is counted idle while a waiter
    is about to take it."""

    def __init__(self, size: Callable[[], int]) -> None:
        self.size = size
        self.busy = 0  # connections held or waited for by planner's statements
        self.waiting = 0  # statements waiting for a connection now
        self.on_wait: Callable[[float], None] | None = None  # told how long each statement waited (metrics)

    def idle(self, share: float = 1.0) -> bool:
        """Whether fewer of planner's statements hold or wait for a connection than `share` of
        the pool: with 1, whether a statement sent now finds a connection without waiting."""
        return self.busy < self.size() * share

    @property
    def in_use(self) -> int:
        """Connections held by planner's statements now (those waiting for one not counted)."""
        return max(0, self.busy - self.waiting)

    @property
    def max_size(self) -> int:
        """The pool's most connections (a borrowed pool's own once it is known)."""
        return self.size()

    async def opening(self, pool: Callable[[], Awaitable[asyncpg.Pool]]) -> asyncpg.Pool:
        """`pool()`, counted busy while the pool opens: the statements of a burst that arrive
        meanwhile see each other (and join batches) instead of all finding an unopened pool idle
        and all going direct, one connection each."""
        self.busy += 1
        try:
            return await pool()
        finally:
            self.busy -= 1

    async def acquire(self, pool: asyncpg.Pool) -> asyncpg.Connection:
        """A connection of `pool`, counted busy until `released` (its release's task is done)."""
        self.busy += 1
        self.waiting += 1
        asked = time.monotonic()
        try:
            con = await pool.acquire()
        except TimeoutError as exc:  # only a new connection times out: the pool's own wait has no timeout
            self.busy -= 1
            raise QueryError(f"no connection: opening a new pooled connection took longer than {CONNECT_TIMEOUT_S:g} s "
                             "(the server or the network does not answer)", transient=True) from exc
        except BaseException as exc:
            self.busy -= 1
            _reraise(exc)
        finally:
            self.waiting -= 1
        if self.on_wait is not None:
            self.on_wait(time.monotonic() - asked)
        return con

    def released(self, _task: asyncio.Task[None]) -> None:
        self.busy -= 1


async def choose_dsn(dsn: str | None, database_url: str | None, embedded: bool | None,
                     embedded_default: bool) -> tuple[str, str, str]:
    """The DSN a pool opens, where it comes from (`dsn`, `DATABASE_URL` or `embedded`), and why:
    `dsn`, else `database_url`, else the embedded server (`embedded`, else `embedded_default`,
    allows it; else `DatabaseUnavailable`)."""
    if dsn:
        return dsn, "dsn", "given by the caller"
    if database_url:
        return database_url, "DATABASE_URL", "no dsn= given, the environment names a server"
    if not (embedded if embedded is not None else embedded_default):
        off = "embedded=False" if embedded is False else "PLANNER_EMBEDDED=0"
        raise DatabaseUnavailable("no database configured: pass dsn= (or pool=) or set DATABASE_URL; "
                                  f"the embedded fallback is off ({off})")
    try:
        # Starting the server runs pg_ctl and waits for it: not on the event loop.
        started = await asyncio.to_thread(embedded_dsn)
    except Exception as exc:
        raise DatabaseUnavailable(f"cannot start the embedded PostgreSQL: {error_text(exc)} "
                                  "(set DATABASE_URL to use another server)") from exc
    return started, "embedded", (f"no dsn= and no DATABASE_URL, so the embedded PostgreSQL in {planner_home() / 'pgdata'}; "
                                 "embedded=False or PLANNER_EMBEDDED=0 forbids this fallback")


async def create_pool(dsn: str, sizes: tuple[int, int], init: Callable[[asyncpg.Connection], Awaitable[None]], *,
                      full_reset: bool, pooled: bool) -> asyncpg.Pool:
    """An asyncpg pool of `sizes` (least, most) connections to `dsn`, each set up by `init`;
    `pooled`: behind a transaction-mode pooler. Raises `DatabaseUnavailable`."""
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=sizes[0],
            max_size=sizes[1],
            init=init,
            reset=None if full_reset and not pooled else _keep_session,
            # Combined writes are one statement per batch size: room for them. Behind
            # a transaction pooler, none: asyncpg then sends unnamed statements only.
            statement_cache_size=0 if pooled else STATEMENT_CACHE,
            connection_class=PoolerConnection if pooled else SyncedConnection,
            timeout=CONNECT_TIMEOUT_S,
        )
    except TimeoutError as exc:
        raise DatabaseUnavailable(
            f"cannot reach the database: opening a connection took longer than {CONNECT_TIMEOUT_S:g} s "
            "(the server or the network does not answer)") from exc
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, OverflowError) as exc:
        # ValueError: a DSN asyncpg cannot parse (`:notaport`); OverflowError: a port above 65535
        raise DatabaseUnavailable(f"cannot reach the database: {error_text(exc)}") from exc


def refuse_session_state(node: CompiledNode, pooler: str | None, refused: LRUCache[str, str | None]) -> None:
    """Behind a transaction-mode `pooler`, refuse a node whose statements would leave session
    state on a server connection that the pooler shares with other clients (nothing is sent);
    `refused` keeps each statement list's verdict."""
    if pooler != TRANSACTION_POOLER or not node.sql.session:
        return
    key = "\0".join(s.text for s in node.sql.statements)
    if key not in refused:
        refused[key] = outlives_transaction([s.text for s in node.sql.statements])
    reason = refused[key]
    if reason is not None:
        raise QueryError(
            f"node {node.name!r}{f' of flow {node.flow!r}' if node.flow else ''} cannot run behind a "
            f"transaction-mode pooler (pooler='transaction'): {reason}, which would outlive its "
            "transaction on a server connection the pooler shares with other clients. Use SET LOCAL "
            "(or set_config(..., true)) in a statement list, or run this flow on a direct DSN.")


async def describe_on(pool: asyncpg.Pool, text: str) -> Described:
    """`text` prepared on a connection of `pool` and never executed: its parameter types and columns."""
    try:
        async with pool.acquire() as con:
            try:
                prepared = await con.prepare(text)
                return Described(tuple(t.name for t in prepared.get_parameters()),
                                 tuple(a.name for a in prepared.get_attributes()))
            finally:
                await settle(con)  # prepared, never executed: its implicit transaction is open
    except (Exception, asyncio.CancelledError) as exc:
        _reraise(exc)


async def _release(pool: asyncpg.Pool, con: asyncpg.Connection, dirty: bool, baseline: tuple[str | None, ...] | None) -> None:
    try:
        if not dirty and baseline is not None:
            try:
                dirty = _reported(con) != baseline
            except asyncpg.InterfaceError:
                return  # its connection died (a terminated backend) and asyncpg took it back already
        # A statement that failed before it was sent (a value asyncpg could not encode) after its
        # Parse, or a prepare() alone, left the server in an implicit transaction holding its
        # locks (`planner.db.synced`): ended before anyone else gets the connection.
        try:
            async with asyncio.timeout(_RELEASE_TIMEOUT_S):
                await settle(con)
        except Exception as exc:
            logger.warning("connection terminated: its open statement could not be ended: %s", error_text(exc))
            con.terminate()
        if dirty and not con.is_closed():
            try:
                async with asyncio.timeout(_RELEASE_TIMEOUT_S):
                    await con.execute(RESET_SESSION)
            except Exception as exc:
                logger.warning("connection terminated: its session could not be reset: %s", error_text(exc))
                con.terminate()  # a session we could not reset must never serve another run
        await pool.release(con, timeout=_RELEASE_TIMEOUT_S)
    except asyncpg.InternalClientError:
        pass  # its connection died and asyncpg already took the holder back
    except (Exception, asyncio.CancelledError) as exc:
        # asyncpg terminates a connection it cannot reset in time (a cancel the server never
        # acknowledged: a frozen backend); the pool replaces it. Nothing is given to anyone else.
        logger.warning("connection terminated instead of returned: %s", error_text(exc))
