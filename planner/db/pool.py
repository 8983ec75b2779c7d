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
import os
import statistics
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from cachetools import LRUCache

from planner.db.admin import quote_ident
from planner.db.channel import Listener
from planner.db.dsn import redact_dsn
from planner.db.embedded import embedded_allowed, embedded_dsn, planner_home
from planner.db.pooler import (
    STATEMENT_CACHE,
    TRANSACTION_POOLER,
    PoolerConnection,
    outlives_transaction,
    pooler_mode,
    split_pooler,
)
from planner.db.synced import SyncedConnection, settle
from planner.db.translate import POOLER_HINT, _reraise, translate
from planner.db.wire import StaleResult, repeatable
from planner.errors import DatabaseUnavailable, NodeTimeout, QueryError
from planner.kinds.backend import ANSWER, Described, Outcome, Query, own_error
from planner.lang.effects import Effects
from planner.lang.nodes import CompiledNode
from planner.lang.refs import CompiledSql
from planner.lang.sqlinfo import combine_writes
from planner.results import error_text
from planner.run.policy import timed

logger = logging.getLogger("planner")
RETIRED_POOL_S = 5.0  # how long a pool replaced by `_adopt_pooler` stays open for the statements that took it
CONNECT_TIMEOUT_S = 60.0  # how long opening one connection may take (asyncpg's default, said aloud in errors)
_RELEASE_TIMEOUT_S = 2.0  # a connection that cannot be reset in this time (a frozen backend) is terminated
# The cache channel's listening connection is asked `SELECT 1` this often, and lost when the
# answer takes longer than the timeout: a peer gone without a FIN (a host powered off, a NAT
# entry dropped) sends no error, and LISTEN alone would wait for notifications forever.
LISTEN_HEARTBEAT_S = 5.0
LISTEN_HEARTBEAT_TIMEOUT_S = 5.0
# A read batch that runs long while a connection is free splits in two, each half on a
# connection of its own (and so on, down to members alone): one slow member must not hold the
# others' values back. "Long" is `SPLIT_FACTOR` times what the statement costs a run alone
# (the median of its last `COSTS_KEPT` latencies, recorded as it runs alone), never less than
# `SPLIT_MIN_S`, and `SPLIT_UNKNOWN_S` before anything is recorded. Not the batch's size: a
# batch's members cost the server a fraction of a round trip each, so a batch of cheap members
# ends well within the bound, and one that does not is worth running in halves side by side.
SPLIT_FACTOR = 4.0
SPLIT_MIN_S = 0.05
SPLIT_UNKNOWN_S = 0.2
COSTS_KEPT = 32
# Entries each of `PoolBackend`'s per-statement caches keeps (least recently used dropped
# first): a service that edits its flows while it runs makes new statement texts forever.
STATEMENTS_KEPT = 4096

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
    ) -> None:
        self._dsn, self._pool, self._owned = dsn, pool, pool is None
        self._embedded = embedded
        # Behind a transaction-mode pooler (PgBouncer's pool_mode = transaction): `pooler=`,
        # else the DSN's `?pgbouncer=` (read when the pool opens), else `PLANNER_POOLER`.
        self._pooler_given = pooler is not None
        self.pooler = pooler_mode(pooler, "pooler=") if pooler is not None else \
            pooler_mode(os.environ.get("PLANNER_POOLER"), "PLANNER_POOLER")
        if dsn is not None and not self._pooler_given and split_pooler(dsn)[1] is not None:
            with contextlib.suppress(ValueError):  # a bad value is DatabaseUnavailable when the pool opens
                self.pooler = pooler_mode(split_pooler(dsn)[1])
        self._sizes = (min_size, max_size)
        self._full_reset = full_reset
        self._lock = asyncio.Lock()
        self._releases: set[asyncio.Task[None]] = set()
        self._retired: list[asyncpg.Pool] = []  # pools replaced when planner found a pooler (`_adopt_pooler`)
        self._baseline: tuple[str | None, ...] | None = None
        self._search_paths: weakref.WeakKeyDictionary[asyncpg.Connection, str] = weakref.WeakKeyDictionary()
        # What planner learnt of each statement text, kept per text (see `STATEMENTS_KEPT`):
        kept = STATEMENTS_KEPT
        self._combined: LRUCache[str, str | None] = LRUCache(kept)  # fetch, read -> its batch statement (None: not shared)
        self._writes: LRUCache[str, str | None] = LRUCache(kept)  # members, write -> the combined write
        self._shapes: LRUCache[str, tuple[str, ...] | None] = LRUCache(kept)  # read -> its column names (None: not fusible)
        self._fused: LRUCache[str, str] = LRUCache(kept)  # reads of one run -> their fused statement
        self._refused: LRUCache[str, str | None] = LRUCache(kept)  # statements -> why they cannot run behind the pooler
        self._uncombined: LRUCache[str, None] = LRUCache(kept)  # writes whose target rows cannot be named (`_never_combine`)
        self._costs: LRUCache[str, deque[float]] = LRUCache(kept)  # read -> its recent seconds alone (`SPLIT_FACTOR`)
        # The effects model's verdict on a statement text (`planner.db.catalog.Catalog.known`),
        # set by `catalog_of`: whether a stale read may run again (`proven_pure`).
        self.verdict: Callable[[str], Effects | None] | None = None
        self.splits = 0  # read batches split because they ran long with a connection free (a figure for benchmarks)
        self._busy = 0  # connections held or waited for by planner's statements
        self.waiting = 0  # statements waiting for a connection now
        self.on_wait: Callable[[float], None] | None = None  # told how long each statement waited (metrics)
        self._listener: asyncio.Task[None] | None = None
        self._heartbeat_s, self._heartbeat_timeout_s = LISTEN_HEARTBEAT_S, LISTEN_HEARTBEAT_TIMEOUT_S
        self._connected_dsn: str | None = None  # the DSN an owned pool was made from

    @property
    def opened(self) -> bool:
        return self._pool is not None

    async def open(self) -> None:
        await self.pool()

    async def pool(self) -> asyncpg.Pool:
        """The pool, created at the first call: from `dsn`, else `DATABASE_URL`, else the embedded
        server (unless `embedded=False` or `PLANNER_EMBEDDED=0`: then `DatabaseUnavailable`).

        Which database, and why, is logged once at WARNING on the `planner` logger (password
        hidden): a service that meant to use its own server but runs on the embedded one says so.
        """
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                dsn, source, why = await self._choose()
                shown = redact_dsn(dsn)
                logger.warning("planner uses the database %s (%s: %s)", shown, source, why,
                               extra={"database": shown, "database_source": source})
                dsn = self._take_pooler(dsn)
                self._connected_dsn = dsn
                pooled = self.pooler == TRANSACTION_POOLER
                try:
                    self._pool = await asyncpg.create_pool(
                        dsn,
                        min_size=self._sizes[0],
                        max_size=self._sizes[1],
                        init=self._init,
                        reset=None if self._full_reset and not pooled else _keep_session,
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
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError,
                        OverflowError) as exc:
                    # ValueError: a DSN asyncpg cannot parse (`:notaport`); OverflowError: a port above 65535
                    raise DatabaseUnavailable(f"cannot reach the database: {error_text(exc)}") from exc
        return self._pool

    async def _choose(self) -> tuple[str, str, str]:
        """The DSN to open, where it comes from (`dsn`, `DATABASE_URL` or `embedded`), and why."""
        if self._dsn:
            return self._dsn, "dsn", "given by the caller"
        env = os.environ.get("DATABASE_URL")
        if env:
            return env, "DATABASE_URL", "no dsn= given, the environment names a server"
        if not embedded_allowed(self._embedded):
            off = "embedded=False" if self._embedded is False else f"PLANNER_EMBEDDED={os.environ.get('PLANNER_EMBEDDED', '')}"
            raise DatabaseUnavailable("no database configured: pass dsn= (or pool=) or set DATABASE_URL; "
                                      f"the embedded fallback is off ({off})")
        try:
            # Starting the server runs pg_ctl and waits for it: not on the event loop.
            dsn = await asyncio.to_thread(embedded_dsn)
        except Exception as exc:
            raise DatabaseUnavailable(f"cannot start the embedded PostgreSQL: {error_text(exc)} "
                                      "(set DATABASE_URL to use another server)") from exc
        return dsn, "embedded", (f"no dsn= and no DATABASE_URL, so the embedded PostgreSQL in {planner_home() / 'pgdata'}; "
                                 "embedded=False or PLANNER_EMBEDDED=0 forbids this fallback")

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
        """Refuse a node whose statements would leave session state on a server connection
        that a transaction-mode pooler shares with other clients (nothing is sent)."""
        if self.pooler != TRANSACTION_POOLER or not node.session:
            return
        key = "\0".join(s.text for s in node.statements)
        if key not in self._refused:
            self._refused[key] = outlives_transaction([s.text for s in node.statements])
        reason = self._refused[key]
        if reason is not None:
            raise QueryError(
                f"node {node.name!r}{f' of flow {node.flow!r}' if node.flow else ''} cannot run behind a "
                f"transaction-mode pooler (pooler='transaction'): {reason}, which would outlive its "
                "transaction on a server connection the pooler shares with other clients. Use SET LOCAL "
                "(or set_config(..., true)) in a statement list, or run this flow on a direct DSN.")

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
        its description behind a pooler may run again. Not judged (no catalog) is not proven."""
        verdict = self.verdict
        if not node.read_only or verdict is None:
            return False
        effects = verdict(node.statements[0].text)
        return effects is not None and effects.pure

    async def run(self, query: Query) -> Any:
        pool = self._pool or await self._first_pool()
        self._check_pooler(query.node)
        con = await self._acquire(pool)
        try:
            # The node's timeout times the statements, not the wait for a connection above.
            timeout = query.timeout
            started = time.monotonic()
            with repeatable(self.proven_pure(query.node)):
                value = await (_query(con, query) if timeout is None else timed(_query(con, query), timeout))
        except BaseException as exc:  # CancelledError too: the connection must still go back
            self._release_later(pool, con, query.node.session)
            self._adopt_pooler(exc)
            _reraise(exc)  # BEGIN/COMMIT or the socket; statements translate their own
        self._release_later(pool, con, query.node.session)
        if query.node.coalesce and query.node.read_only:  # what it costs a run alone: a batch of it splits past a bound
            self._record(query.statements[0].text, time.monotonic() - started)
        return value

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
        """Whether fewer of planner's statements hold or wait for a connection than `share` of
        the pool: with 1, whether a statement sent now finds a connection
        without waiting. (asyncpg's idle count cannot tell: a connection just released is
        counted idle while a waiter is about to take it.)"""
        return self._busy < self._size() * share

    def _size(self) -> int:
        """The pool's most connections (a borrowed pool's own)."""
        return self._sizes[1] if self._owned or self._pool is None else self._pool.get_max_size()

    async def _first_pool(self) -> asyncpg.Pool:
        # Counted busy while the pool opens: the statements of a burst that arrive meanwhile see
        # each other (and join batches) instead of all finding an unopened pool idle and all
        # going alone, one connection each.
        self._busy += 1
        try:
            return await self.pool()
        finally:
            self._busy -= 1

    async def _acquire(self, pool: asyncpg.Pool) -> asyncpg.Connection:
        self._busy += 1  # until `_release` has given it back
        self.waiting += 1
        asked = time.monotonic()
        try:
            con = await pool.acquire()
        except TimeoutError as exc:  # only a new connection times out: the pool's own wait has no timeout
            self._busy -= 1
            raise QueryError(f"no connection: opening a new pooled connection took longer than {CONNECT_TIMEOUT_S:g} s "
                             "(the server or the network does not answer)", transient=True) from exc
        except BaseException as exc:
            self._busy -= 1
            _reraise(exc)
        finally:
            self.waiting -= 1
        if self.on_wait is not None:
            self.on_wait(time.monotonic() - asked)
        return con

    @property
    def in_use(self) -> int:
        """Connections held by planner's statements now (those waiting for one not counted)."""
        return max(0, self._busy - self.waiting)

    @property
    def max_size(self) -> int:
        """The pool's most connections (a borrowed pool's own once it is known)."""
        return self._size()

    async def run_batch(self, node: CompiledNode, params: list[list[Any]], started: Callable[[], None]) -> list[Outcome] | None:
        """Run `node`'s one statement for each parameter list, as one statement on one connection.

        `started()` is called once a connection is in hand (no more members can join); it may
        leave members out of `params` (runs that stopped waiting), which is read only after it.
        Each member of `params` then gets its own outcome: its value exactly as `run` would have
        returned it, or its own error. The node's timeout times the statements, as in `run`.
        When the combined statement fails (a member's bad value, a constraint, a read that took
        too long), each member runs again alone, so that one member's failure is only that
        member's: a read's members all at once, each on a connection of its own (`_again`); a
        write's one after the other on the batch's connection, in the order the runs asked.
        """
        pool = self._pool or await self._first_pool()
        self._check_pooler(node)
        con = await self._acquire(pool)
        try:
            started()
            with repeatable(self.proven_pure(node)):
                outcomes = await self._batch_on(con, node, params)
        except BaseException as exc:  # CancelledError too: the connection must still go back
            self._release_later(pool, con, node.session)
            self._adopt_pooler(exc)
            _reraise(exc)
        self._release_later(pool, con, node.session)
        answer = ANSWER.get()
        if isinstance(outcomes, _Again):
            return await self._again(pool, outcomes, answer)
        if isinstance(outcomes, _Split):
            return await self._halves(pool, node, params, 0, answer, None)
        return outcomes

    async def _halves(self, pool: asyncpg.Pool, node: CompiledNode, params: list[list[Any]], offset: int,
                      answer: Callable[[int, Outcome], None] | None, budget: asyncio.Semaphore | None) -> list[Outcome]:
        """A read batch ran long while a connection was free (`_within`): its members, whose
        statement was cancelled, run again in two halves side by side, each a batch of its own
        on a connection of its own, which splits again if it runs long too, down to members
        alone. The slow member ends up alone; the others are answered (`answer`) as soon as
        their half is. `offset` is the first member's index in the batch as sent.

        `budget`, made at the first split, is shared by everything the batch runs from then on
        (halves, and members run again alone when a half fails): at most half the pool's
        connections (two at least) at once, as for any batch's re-runs (`_again`)."""
        self.splits += 1
        if budget is None:
            budget = asyncio.Semaphore(max(2, self._size() // 2))
        half = (len(params) + 1) // 2
        first, second = await asyncio.gather(self._part(pool, node, params[:half], offset, answer, budget),
                                             self._part(pool, node, params[half:], offset + half, answer, budget))
        return first + second

    async def _part(self, pool: asyncpg.Pool, node: CompiledNode, params: list[list[Any]], offset: int,
                    answer: Callable[[int, Outcome], None] | None, budget: asyncio.Semaphore) -> list[Outcome]:
        """One half of a split batch (see `_halves`): its members' outcomes, each also given to
        `answer` as soon as it is known. A connection lost here fails this half's members only."""
        async with budget:
            try:
                con = await self._acquire(pool)
            except QueryError as exc:  # the pool cannot give a connection (the server is gone)
                return _answered(answer, offset, [(None, exc if i == 0 else own_error(exc)) for i in range(len(params))])
            try:
                with repeatable(self.proven_pure(node)):
                    outcomes = await self._batch_on(con, node, params, budget)
            except asyncio.CancelledError:
                self._release_later(pool, con, node.session)
                raise
            except Exception as exc:
                self._release_later(pool, con, node.session)
                error = translate(exc)
                return _answered(answer, offset, [(None, error if i == 0 else own_error(error)) for i in range(len(params))])
            # Its place is kept until the connection is back: a statement cancelled (split) or
            # timed out is still being cancelled on the server until then.
            await asyncio.shield(self._release_later(pool, con, node.session))
        if isinstance(outcomes, _Again):
            return await self._again(pool, outcomes, answer, offset, budget)
        if isinstance(outcomes, _Split):
            return await self._halves(pool, node, params, offset, answer, budget)
        if outcomes is None:  # cannot happen: its text was shared a moment ago (a bounded cache forgot it?)
            again = _Again([(node, node.statements[0], p) for p in params])
            return await self._again(pool, again, answer, offset, budget)
        return _answered(answer, offset, outcomes)

    def _record(self, text: str, seconds: float) -> None:
        costs = self._costs.get(text)
        if costs is None:
            costs = self._costs[text] = deque(maxlen=COSTS_KEPT)
        costs.append(seconds)

    def _split_after(self, text: str) -> float:
        """How long a read batch of `text` runs before it splits (see `SPLIT_FACTOR`)."""
        costs = self._costs.get(text)
        if not costs:
            return SPLIT_UNKNOWN_S
        return max(SPLIT_MIN_S, SPLIT_FACTOR * statistics.median(costs))

    async def _within(self, fetching: Awaitable[Any], text: str, budget: asyncio.Semaphore | None) -> Any:
        """The rows of a read batch's statement, or `_SPLIT` when it ran past `_split_after` while a
        connection was free (then it is cancelled on the server, and has returned when this
        does). While every connection is taken, the batch goes on: the members would only queue
        for connections, and the batch shares its round trip; so it does while the batch's
        `budget` (see `_halves`) has no room for a second half. It is asked again as often."""
        task = asyncio.ensure_future(fetching)
        try:
            bound = self._split_after(text)
            while not (await asyncio.wait({task}, timeout=bound))[0]:
                if self.idle() and (budget is None or not budget.locked()):
                    task.cancel()
                    await asyncio.wait({task})
                    if task.cancelled():
                        return _SPLIT
                    break  # it ended meanwhile: its rows (or its error) as ever
        except BaseException:  # the batch itself cancelled: its statement too
            task.cancel()
            await asyncio.wait({task})
            raise
        return task.result()

    async def _batch_on(self, con: asyncpg.Connection, node: CompiledNode, params: list[list[Any]],
                        budget: asyncio.Semaphore | None = None) -> list[Outcome] | _Again | _Split | None:
        statement = node.statements[0]
        if len(params) <= 1:  # nothing to share: the statement as it is
            return await _each_alone(con, node, statement, params, self.proven_pure(node))
        if not node.read_only:
            return await self._write_batch_on(con, node, params)
        again = _Again([(node, statement, p) for p in params])
        failed: str | None = None  # the combined statement that failed as a stale one would
        while True:
            try:
                text = await self._batch_text(con, node)
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if _lost(exc) or con.is_closed():
                    raise
                # The statement itself does not prepare: each member gets the error it gets alone.
                return again
            if text is None:
                return None
            if text == failed:  # described afresh, nothing changed: it failed for another reason
                return again
            columns = [list(column) for column in zip(*params, strict=True)]
            try:
                fetching = con.fetch(text, *columns)
                rows = await self._within(fetching if node.timeout is None else timed(fetching, node.timeout),
                                          statement.text, budget)
                if isinstance(rows, _Split):
                    return rows
            except Exception as exc:
                if _lost(exc) or con.is_closed():
                    raise
                if failed is None and _stale(exc):
                    # The parameter types written into it may be a migration old: describe
                    # the statement again, once, and retry if that changes the combined one.
                    failed = text
                    self._combined.pop(f"{node.fetch}\0{statement.text}", None)
                    continue
                # One member's bad value fails the whole statement, and one slow member times it
                # out: each again alone, with its own outcome (a read has no effect to undo).
                return again
            break
        return _split(rows, len(params), node.fetch, row_numbers=True)

    async def _again(self, pool: asyncpg.Pool, again: _Again, answer: Callable[[int, Outcome], None] | None = None,
                     offset: int = 0, budget: asyncio.Semaphore | None = None) -> list[Outcome]:
        """Each read of `again` run alone, all at once, each on a connection of its own from
        the pool, timed by its node's timeout from its own statement's start (as alone).

        Why so: one after the other on one connection, N members would cost N round trips, and
        a slow member would hold the others' values back past their own timeouts. Why this keeps
        the pool whole: the shared statement's connection is given back before a re-run asks for
        one, so nothing holds a connection while it waits for another (batches that fall back at
        the same time cannot starve each other of connections); and each re-run gives its
        connection back in a `finally` that cancellation runs too (`gather` cancels every re-run
        and waits for them all before the batch's own cancellation ends it). At most half the
        pool re-runs at once: a batch of hundreds that failed (often because the server is slow)
        must not put hundreds of statements ahead of every other run waiting for a connection.
        """
        at_once = budget if budget is not None else asyncio.Semaphore(max(1, self._size() // 2))

        async def one(position: int, node: CompiledNode, statement: CompiledSql, params: list[Any]) -> Outcome:
            async with at_once:
                try:
                    con = await self._acquire(pool)
                except QueryError as exc:  # the pool cannot give a connection (the server is gone)
                    return _answered(answer, position, [(None, exc)])[0]
                try:
                    outcome = await _alone(con, node, statement, params, self.proven_pure(node))
                finally:
                    released = self._release_later(pool, con, node.session)
                _answered(answer, position, [outcome])  # its run need not wait for the others'
                # The place is kept until the connection is back: a statement that timed out is
                # still being cancelled on the server until then, and the next would run beside it.
                await asyncio.shield(released)
                return outcome

        return list(await asyncio.gather(*(one(offset + i, *member) for i, member in enumerate(again.members))))

    async def _write_batch_on(self, con: asyncpg.Connection, node: CompiledNode, params: list[list[Any]]) -> list[Outcome] | None:
        """Writes an author marked `coalesce: true`: one statement, so one transaction: all of
        it is written or none, and when the server refuses it each member runs again alone,
        with its own outcome. (The coalescer keeps write batches small: see `MAX_WRITE_BATCH`.)

        A combined write that times out is not run again: its cancel may have come after it
        committed, and running the members again could write twice. Every member then gets
        the timeout, as a statement of its own might have."""
        statement = node.statements[0]
        text = self._write_text(statement.text, len(params), node.fetch)
        if text is None:
            return None
        # Members in one order whatever the batch: two batches that write the same rows take
        # their locks in the same order, instead of deadlocking (and waiting a second for the
        # server to notice).
        order = sorted(range(len(params)), key=lambda i: repr(params[i]))
        try:
            fetching = con.fetch(text, *[value for i in order for value in params[i]])
            rows = await (fetching if node.timeout is None else timed(fetching, node.timeout))
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if _lost(exc) or con.is_closed():
                raise
            if isinstance(exc, StaleResult):
                # It was written, and its rows came back in types other than described (a
                # migration): running the members again would write twice. Each gets the error.
                return [(None, translate(exc, statement, p)) for p in params]
            if _unnamed_targets(exc):
                self._never_combine(statement.text, node)
            # The server refused it (or a value could not be sent): nothing was written.
            return await _each_alone(con, node, statement, params, self.proven_pure(node))
        outcomes: list[Outcome] = [(None, None)] * len(params)
        for position, outcome in zip(order, _split(rows, len(params), node.fetch, row_numbers=False), strict=True):
            outcomes[position] = outcome
        return outcomes

    def _never_combine(self, text: str, node: CompiledNode) -> None:
        """The overlap guard of a combined write cannot name its target's rows (an updatable
        view has no `ctid`): every batch of it would be refused. From now on it is not combined
        (the coalescer runs its members alone, and remembers), and a warning says so once."""
        if text not in self._uncombined:
            logger.warning("node %r%s: its coalesce: true write is not combined: the rows it changes cannot be "
                           "named by (tableoid, ctid) (a view?), so two runs changing one row could not be told "
                           "apart; each run sends its own statement", node.name,
                           f" of flow {node.flow!r}" if node.flow else "")
        self._uncombined[text] = None

    def _write_text(self, text: str, members: int, fetch: str) -> str | None:
        if text in self._uncombined:
            return None
        key = f"{members}\0{fetch}\0{text}"
        if key not in self._writes:
            self._writes[key] = combine_writes(text, members, first_row=fetch in ("one", "value"))
        return self._writes[key]

    async def run_fused(self, queries: list[Query]) -> list[Outcome] | None:
        """The reads of one run as one statement: each member's statement materialized once,
        its columns sent back as typed arrays (`ARRAY(SELECT c ...)`), one row in all. None
        when a member returns a column that cannot travel in an array (an array, a composite).
        When the fused statement fails (or times out), each member runs again alone, all at
        once, each on a connection of its own (`_again`), with its own error and timeout."""
        pool = self._pool or await self._first_pool()
        con = await self._acquire(pool)
        try:
            with repeatable(all(self.proven_pure(q.node) for q in queries)):  # reads only, fused when proven pure
                outcomes = await self._fused_on(con, queries)
        except BaseException as exc:  # CancelledError too: the connection must still go back
            self._release_later(pool, con, False)
            self._adopt_pooler(exc)
            _reraise(exc)
        self._release_later(pool, con, False)
        return await self._again(pool, outcomes) if isinstance(outcomes, _Again) else outcomes

    async def _fused_on(self, con: asyncpg.Connection, queries: list[Query]) -> list[Outcome] | _Again | None:
        again = _Again([(q.node, q.statements[0], q.params[0]) for q in queries])
        texts = [q.statements[0].text for q in queries]
        # The fetch is part of the key: it decides whether a member stops at its first row.
        key = "\0".join(f"{q.fetch}\0{text}" for q, text in zip(queries, texts, strict=True))
        timeouts = [q.timeout for q in queries if q.timeout is not None]
        failed: str | None = None  # the fused statement that failed as a stale one would
        while True:
            try:
                shapes = [await self._columns(con, text) for text in texts]
            except Exception as exc:
                if _lost(exc):
                    raise
                # A member the server refuses to prepare: each alone, with its own error.
                return again
            if any(shape is None for shape in shapes):
                return None
            text = self._fused.get(key)
            if text is None:
                text = self._fused[key] = _fused_text([q.statements[0] for q in queries], [s or () for s in shapes],
                                                       [q.fetch for q in queries])
            if text == failed:  # described afresh, nothing changed: it failed for another reason
                return again
            try:
                fetching = con.fetchrow(text, *[v for q in queries for v in q.params[0]])
                row = await (fetching if not timeouts else timed(fetching, min(timeouts)))
            except Exception as exc:
                if _lost(exc):
                    raise
                if failed is None and _stale(exc):
                    # A migration may have changed a member's columns since they were
                    # described: describe them again, once, and retry if that changes anything.
                    failed = text
                    for member in texts:
                        self._shapes.pop(member, None)
                    self._fused.pop(key, None)
                    continue
                # A failing (or slow) member: each again alone, with its own error and timeout.
                return again
            break
        assert row is not None
        outcomes: list[Outcome] = []
        column = 0
        for query, shape in zip(queries, shapes, strict=True):
            names = shape or ()
            arrays = [row[column + i] for i in range(len(names))]
            column += len(names)
            rows = [dict(zip(names, values, strict=True)) for values in zip(*arrays, strict=True)] if names else []
            fetch = query.fetch
            if fetch == "all":
                outcomes.append((rows, None))
            elif fetch == "one":
                outcomes.append((rows[0] if rows else None, None))
            else:  # the first column by position: names may repeat
                outcomes.append((arrays[0][0] if names and arrays[0] else None, None))
        return outcomes

    async def _columns(self, con: asyncpg.Connection, text: str) -> tuple[str, ...] | None:
        """The names of `text`'s columns, or None if one of them cannot be returned in an array."""
        if text not in self._shapes:
            prepared = await con.prepare(text)
            attributes = prepared.get_attributes()
            fits = attributes and all(a.type.kind == "scalar" for a in attributes)
            self._shapes[text] = tuple(a.name for a in attributes) if fits else None
        return self._shapes[text]

    async def _batch_text(self, con: asyncpg.Connection, node: CompiledNode) -> str | None:
        """The combined statement for `node` (cached), or None when it cannot be shared safely:
        a parameter that is itself an array (unnest would flatten it), or a statement that does
        not fit in a subquery (the combined form is prepared once to find out)."""
        statement = node.statements[0]
        key = f"{node.fetch}\0{statement.text}"
        if key in self._combined:
            return self._combined[key]
        prepared = await con.prepare(statement.text)
        types = prepared.get_parameters()
        text: str | None = None
        # Only statements proven pure come here as reads (`planner.lang.effects`): a volatile
        # function makes the node a write before it reaches the pool.
        if types and all(t.kind == "scalar" for t in types):
            # Names of the batch's own that no statement uses: an alias `b` of the statement
            # must not capture a parameter written `b.p1`.
            names = [f'"?p{i + 1}"' for i in range(len(types))]
            arrays = ", ".join(f"${i + 1}::{quote_ident(t.schema)}.{quote_ident(t.name)}[]" for i, t in enumerate(types))
            inner = statement.render([f'("?b".{n})' for n in names]).rstrip()
            inner = inner[:-1] if inner.endswith(";") else inner
            # One row is all `fetch: one`/`value` reads, as alone (asyncpg asks for one row).
            limit = " LIMIT 1" if node.fetch in ("one", "value") else ""
            # The newline ends a trailing `-- comment` of the statement.
            text = (f'SELECT "?b"."?ord", "?q".* FROM unnest({arrays}) WITH ORDINALITY AS "?b"({", ".join(names)}, "?ord") '
                    f'CROSS JOIN LATERAL (SELECT "?q0".*, row_number() OVER () AS "?row" FROM ({inner}\n) AS "?q0"{limit}) '
                    'AS "?q" ORDER BY "?b"."?ord", "?q"."?row"')
            try:
                await con.prepare(text)
            except asyncpg.PostgresError as exc:
                logger.debug("statement not shared between runs: its combined form does not prepare: %s", exc)
                text = None
        self._combined[key] = text
        return text

    async def describe(self, text: str) -> Described:
        pool = self._pool or await self.pool()
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

    async def drain(self) -> None:
        """Wait until every connection a node used is back in the pool."""
        while self._releases:
            await asyncio.wait(list(self._releases))

    async def close(self) -> None:
        """Stop listening, wait for background releases; close the pool if this object created it."""
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        await self.drain()
        while self._retired:
            await self._retired.pop().close()
        if self._pool is not None and self._owned:
            pool, self._pool = self._pool, None
            await pool.close()

    # --- notifications (the cache's channel between processes) ----------------------------

    def subscribe(self, channel: str, on_message: Callable[[str], None], on_state: Callable[[bool], None]) -> None:
        """Keep a connection of its own LISTENing on `channel` until `close()`: `on_message` gets
        each payload, `on_state(True)` says it listens, `on_state(False)` that it lost the
        channel (it reconnects, backing off up to 5 s). Lost also means silent: the connection
        is asked `SELECT 1` every `LISTEN_HEARTBEAT_S` and given up when no answer comes within
        `LISTEN_HEARTBEAT_TIMEOUT_S` (a half-open connection never reports an error). Not a
        pool connection: the pool keeps its size. A borrowed pool lends one of its connections
        for it, and gets it back at `close()` (UNLISTENed: the pool's own reset may not do it),
        or its slot back when it is lost."""
        if self._listener is None:
            listener = Listener(channel, on_message, on_state, self._listening_connection,
                                self._heartbeat_s, self._heartbeat_timeout_s)
            self._listener = asyncio.get_running_loop().create_task(listener.run())

    async def _listening_connection(self) -> tuple[asyncpg.Connection, asyncpg.Pool | None] | None:
        """A connection for the cache channel: one of its own (from the DSN an owned pool was made
        from), or one lent by a borrowed pool (returned to it); None behind a transaction pooler."""
        pool = self._pool or await self.pool()
        if self.pooler == TRANSACTION_POOLER:
            return None
        if self._connected_dsn:
            return await asyncpg.connect(self._connected_dsn), None  # a connection of its own, never the pool's
        return await pool.acquire(), pool

    async def notify(self, channel: str, payload: str) -> None:
        """`pg_notify(channel, payload)` on a pooled connection (delivered when it commits)."""
        pool = self._pool or await self._first_pool()
        con = await self._acquire(pool)
        try:
            await con.execute("SELECT pg_notify($1, $2)", channel, payload)
        except BaseException as exc:
            self._release_later(pool, con, False)
            _reraise(exc)
        self._release_later(pool, con, False)

    def _released(self, _task: asyncio.Task[None]) -> None:
        self._busy -= 1

    def _release_later(self, pool: asyncpg.Pool, con: asyncpg.Connection, session: bool) -> asyncio.Task[None]:
        # A borrowed pool, or a full reset, leaves resetting to asyncpg. Behind a transaction
        # pooler nothing is reset: the next statement may reach another server connection
        # anyway (and statements that would leave session state are refused, `_check_pooler`).
        check = self._owned and not self._full_reset and self.pooler != TRANSACTION_POOLER
        task = asyncio.get_running_loop().create_task(_release(pool, con, check and session, self._baseline if check else None))
        task.add_done_callback(self._released)
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return task


@dataclass(frozen=True)
class _Again:
    """A shared statement failed: each of these reads (node, statement, parameters) is to run
    again alone, once the shared statement's connection is back in the pool (`PoolBackend._again`)."""

    members: list[tuple[CompiledNode, CompiledSql, list[Any]]]


class _Split:
    """A read batch that ran long while a connection was free: its statement was cancelled and
    its members are to run again in halves (`PoolBackend._halves`)."""


_SPLIT = _Split()


def _answered(answer: Callable[[int, Outcome], None] | None, offset: int, outcomes: list[Outcome]) -> list[Outcome]:
    """Give each outcome to `answer` (member `offset`, `offset + 1`...) and return them."""
    if answer is not None:
        for i, outcome in enumerate(outcomes):
            answer(offset + i, outcome)
    return outcomes


def _unnamed_targets(exc: BaseException) -> bool:
    """Whether a combined write failed because its overlap guard named a system column its
    target lacks (`column v.ctid does not exist`: a view)."""
    text = str(exc)
    return getattr(exc, "sqlstate", None) == "42703" and ("ctid" in text or "tableoid" in text)


def _lost(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, ConnectionError, asyncpg.ConnectionDoesNotExistError, asyncio.CancelledError))


async def _alone(con: asyncpg.Connection, node: CompiledNode, statement: CompiledSql, params: list[Any],
                 pure: bool) -> Outcome:
    """One member's statement on its own, timed by the node's timeout: its value, or its error."""
    try:
        with repeatable(pure):
            coro = _fetch(con, node.fetch, statement, params)
            return (await (coro if node.timeout is None else timed(coro, node.timeout)), None)
    except (QueryError, NodeTimeout) as exc:
        return (None, exc)


async def _each_alone(con: asyncpg.Connection, node: CompiledNode, statement: CompiledSql,
                      members: list[list[Any]], pure: bool) -> list[Outcome]:
    """Each member's statement alone, one after the other on `con`: a lone member, or the
    members of a write in the order the runs asked (a later one may depend on an earlier one's
    rows, so they are not run at once). A member whose statement fails keeps its own error (a
    transient one too: its own retry policy decides); once the connection is lost, the members
    not yet run get a transient error."""
    outcomes: list[Outcome] = []
    for params in members:
        if not con.is_closed():
            # Each as alone: not inside the implicit transaction a statement before it left open
            # by failing before it was sent (a value it could not encode, `planner.db.synced`).
            try:
                await settle(con)
            except Exception:
                con.terminate()
        if con.is_closed():
            outcomes.append((None, QueryError("connection lost before the statement was sent", transient=True)))
        else:
            outcomes.append(await _alone(con, node, statement, params, pure))
    return outcomes


def _split(rows: list[Any], members: int, fetch: str, *, row_numbers: bool) -> list[Outcome]:
    """Rows of the combined statement -> each member's value, as `_fetch_raw` would give it.
    The first column is the member's ordinal; with `row_numbers` the last is a row number."""
    grouped: list[list[Any]] = [[] for _ in range(members)]
    for row in rows:
        grouped[row[0] - 1].append(row)
    outcomes: list[Outcome] = []
    for group in grouped:
        if fetch == "value":
            outcomes.append((group[0][1] if group else None, None))
            continue
        end = -1 if row_numbers else None
        dicts = [dict(list(r.items())[1:end]) for r in group]
        outcomes.append((dicts if fetch == "all" else (dicts[0] if dicts else None), None))
    return outcomes


def _fused_text(statements: list[CompiledSql], shapes: list[tuple[str, ...]], fetches: Sequence[str]) -> str:
    """`WITH m1 AS MATERIALIZED (...), m2 ... SELECT ARRAY(SELECT c1 FROM m1 ORDER BY "?row"), ...`:
    each statement runs once, with its parameters numbered after the previous one's.

    `shapes` (each member's column names) were learnt earlier, and a migration may have changed
    them since: the statement is written to fail then, never to return a value of the old
    shape (`_stale` tells such failures apart; the members are described again). A member's
    columns are taken by name, so a column renamed or dropped is an undefined column (by
    position only when names repeat, where a dropped one is still an error); and a count of
    its columns that is parsed but never run (the planner folds `true OR ...` away) fails
    when a column was added under `SELECT *`.

    A member fetched `one` or `value` reads up to its first row only (`LIMIT 1`), as it does
    alone (asyncpg asks the server for one row): a fused member keeps the cost of its fetch."""
    ctes: list[str] = []
    columns: list[str] = []
    offset = 0
    for i, (statement, names, fetch) in enumerate(zip(statements, shapes, fetches, strict=True)):
        inner = statement.render([f"${offset + k + 1}" for k in range(len(statement.params))]).rstrip()
        inner = inner[:-1] if inner.endswith(";") else inner
        offset += len(statement.params)
        if len(set(names)) == len(names):
            taken, source = [f"q.{quote_ident(name)}" for name in names], "q"
        else:
            taken = [f"q.c{k + 1}" for k in range(len(names))]
            source = f"q({', '.join(f'c{k + 1}' for k in range(len(names)))})"
        picked = ", ".join(f"{column} AS c{k + 1}" for k, column in enumerate(taken))
        count = f"true OR EXISTS (SELECT q.* UNION ALL SELECT {', '.join(['NULL'] * len(names))})"
        # The newline ends a trailing `-- comment` of the statement.
        limit = " LIMIT 1" if fetch in ("one", "value") else ""
        ctes.append(f'm{i + 1} AS MATERIALIZED (SELECT {picked}, row_number() OVER () AS "?row" '
                    f"FROM ({inner}\n) AS {source} WHERE {count}{limit})")
        columns += [f'ARRAY(SELECT c{k + 1} FROM m{i + 1} ORDER BY "?row")' for k in range(len(names))]
    return f"WITH {', '.join(ctes)} SELECT {', '.join(columns)}"


# What a statement built from an earlier description gets once a migration changed what it
# describes: a column renamed or dropped (42703), more or fewer columns than it names (42P10;
# 42601 from `_fused_text`'s count), a column's type changed under a parameter whose type was
# written into it (42804 datatype mismatch, 42883 no such operator), and asyncpg's own word
# for a result that changed (it retries those once by itself; this is the second time).
_STALE_SQLSTATES = frozenset({"42703", "42P10", "42601", "42804", "42883"})


def _stale(exc: BaseException) -> bool:
    """Whether `exc` may mean that a statement planner built from a cached description is stale."""
    if isinstance(exc, (asyncpg.exceptions.InvalidCachedStatementError, asyncpg.exceptions.OutdatedSchemaCacheError)):
        return True
    return isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", None) in _STALE_SQLSTATES




async def _query(con: asyncpg.Connection, query: Query) -> Any:
    statements, fetch, params = query.statements, query.fetch, query.params
    if len(statements) == 1:
        return await _fetch(con, fetch, statements[0], params[0])
    async with con.transaction():
        for statement, values in zip(statements, params, strict=True):
            value = await _fetch(con, fetch, statement, values)
    return value


async def _fetch(con: asyncpg.Connection, fetch: str, statement: CompiledSql, params: list[Any]) -> Any:
    try:
        return await _fetch_raw(con, fetch, statement, params)
    except Exception as exc:
        _reraise(exc, statement, params)  # here the failing statement is known: `$2` becomes `$conversation.id`


async def _fetch_raw(con: asyncpg.Connection, fetch: str, statement: CompiledSql, params: list[Any]) -> Any:
    if fetch == "all":
        return [dict(r) for r in await con.fetch(statement.text, *params)]
    if fetch == "records":  # a compiled group's rows: `planner.run.compiled` splits them per node
        return await con.fetch(statement.text, *params)
    if fetch == "one":
        row = await con.fetchrow(statement.text, *params)
        return None if row is None else dict(row)
    if fetch == "value":
        return await con.fetchval(statement.text, *params)
    return await con.execute(statement.text, *params)


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
