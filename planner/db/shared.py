"""Shared statements: one statement for many queries, and what it costs no run.

`SharedStatements` is what coalescing asks of a pool (`PoolBackend.run_batch`): the same read
of many runs as one statement (`unnest ... WITH ORDINALITY` joined `LATERAL`), `coalesce: true`
writes combined under an overlap guard (`planner.db.writes`); a batch that runs long while a connection is free
split in halves. Fusion's sibling reads of one run are `planner.db.fused`'s. It keeps what it
learnt of each statement text, and reaches connections through the pool backend it serves.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from cachetools import LRUCache

from planner.db.admin import quote_ident
from planner.db.synced import settle
from planner.db.translate import _reraise, translate
from planner.db.wire import repeatable
from planner.errors import NodeTimeout, QueryError
from planner.kinds.backend import ANSWER, Outcome, Query, own_error
from planner.lang.nodes import CompiledNode
from planner.lang.refs import CompiledSql
from planner.run.policy import timed

logger = logging.getLogger("planner")

# Entries each per-statement cache keeps (least recently used dropped first): a service that
# edits its flows while it runs makes new statement texts forever.
STATEMENTS_KEPT = 4096


class _Pool(Protocol):
    """What shared statements need of the pool backend they serve (`planner.db.pool.PoolBackend`)."""

    _pool: asyncpg.Pool | None

    async def _acquire(self, pool: asyncpg.Pool) -> asyncpg.Connection: ...
    def held(self, pool: asyncpg.Pool, session: bool) -> AbstractAsyncContextManager[asyncpg.Connection]: ...
    def _adopt_pooler(self, exc: BaseException) -> None: ...
    def _check_pooler(self, node: CompiledNode) -> None: ...
    async def _first_pool(self) -> asyncpg.Pool: ...
    def _release_later(self, pool: asyncpg.Pool, con: asyncpg.Connection, session: bool) -> asyncio.Task[None]: ...
    def _size(self) -> int: ...
    def idle(self, share: float = 1.0) -> bool: ...
    def proven_pure(self, node: CompiledNode) -> bool: ...


class _Writes(Protocol):
    """What a batch of a write asks of combined writes (`planner.db.writes.CombinedWrites`)."""

    async def on(self, con: asyncpg.Connection, node: CompiledNode, params: list[list[Any]]) -> list[Outcome] | None: ...


class SharedStatements:
    """The shared-statement paths of one pool backend (see the module's docstring)."""

    def __init__(self, pool: _Pool, writes: _Writes) -> None:
        self.pool = pool
        kept = STATEMENTS_KEPT
        self._combined: LRUCache[str, str | None] = LRUCache(kept)  # fetch, read -> its batch statement (None: not shared)
        self.writes = writes  # `coalesce: true` writes (`planner.db.writes.CombinedWrites`)
        self._costs: LRUCache[str, deque[float]] = LRUCache(kept)  # read -> its recent seconds sent direct (`SPLIT_FACTOR`)
        self.splits = 0  # read batches split because they ran long with a connection free

    async def run_batch(self, node: CompiledNode, params: list[list[Any]], started: Callable[[], None]) -> list[Outcome] | None:
        """Send `node`'s one statement for each parameter list, as one statement on one connection.

        `started()` is called once a connection is in hand (no more members can join); it may
        leave members out of `params` (runs that stopped waiting), which is read only after it.
        Each member of `params` then gets its own outcome: its value exactly as `run` would have
        returned it, or its own error. The node's timeout times the statements, as in `run`.
        When the combined statement fails (a member's bad value, a constraint, a read that took
        too long), each member is sent again separately, so that one member's failure is only that
        member's: a read's members all at once, each on a connection of its own (`_again`); a
        write's one after the other on the batch's connection, in the order the runs asked.
        """
        pool = self.pool._pool or await self.pool._first_pool()
        self.pool._check_pooler(node)
        async with self.pool.held(pool, node.sql.session) as con:
            started()
            with repeatable(self.pool.proven_pure(node)):
                outcomes = await self._batch_on(con, node, params)
        answer = ANSWER.get()
        if isinstance(outcomes, _Again):
            return await self._again(pool, outcomes, answer)
        if isinstance(outcomes, _Split):
            return await self._halves(pool, node, params, 0, answer, None)
        return outcomes

    async def _halves(self, pool: asyncpg.Pool, node: CompiledNode, params: list[list[Any]], offset: int,
                      answer: Callable[[int, Outcome], None] | None, budget: asyncio.Semaphore | None) -> list[Outcome]:
        """A read batch ran long while a connection was free (`_within`): its members, whose
        statement was cancelled, are sent again in two halves side by side, each a batch of its own
        on a connection of its own, which splits again if it runs long too, down to single
        members. The slow member ends up in a batch of its own; the others are answered (`answer`) as soon as
        their half is. `offset` is the first member's index in the batch as sent.

        `budget`, made at the first split, is shared by everything the batch sends from then on
        (halves, and members sent again separately when a half fails): at most half the pool's
        connections (two at least) at once, as for any batch's members sent again (`_again`)."""
        self.splits += 1
        if budget is None:
            budget = asyncio.Semaphore(max(2, self.pool._size() // 2))
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
                con = await self.pool._acquire(pool)
            except QueryError as exc:  # the pool cannot give a connection (the server is gone)
                return _answered(answer, offset, [(None, exc if i == 0 else own_error(exc)) for i in range(len(params))])
            try:
                with repeatable(self.pool.proven_pure(node)):
                    outcomes = await self._batch_on(con, node, params, budget)
            except asyncio.CancelledError:
                self.pool._release_later(pool, con, node.sql.session)
                raise
            except Exception as exc:
                self.pool._release_later(pool, con, node.sql.session)
                error = translate(exc)
                return _answered(answer, offset, [(None, error if i == 0 else own_error(error)) for i in range(len(params))])
            # Its place is kept until the connection is back: a statement cancelled (split) or
            # timed out is still being cancelled on the server until then.
            await asyncio.shield(self.pool._release_later(pool, con, node.sql.session))
        if isinstance(outcomes, _Again):
            return await self._again(pool, outcomes, answer, offset, budget)
        if isinstance(outcomes, _Split):
            return await self._halves(pool, node, params, offset, answer, budget)
        if outcomes is None:  # cannot happen: its text was shared a moment ago (a bounded cache forgot it?)
            again = _Again([(node, node.sql.statements[0], p) for p in params])
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
                if self.pool.idle() and (budget is None or not budget.locked()):
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
        statement = node.sql.statements[0]
        if len(params) <= 1:  # nothing to share: the statement as it is
            return await _each_separately(con, node, statement, params, self.pool.proven_pure(node))
        if not node.sql.read_only:
            return await self.writes.on(con, node, params)
        again = _Again([(node, statement, p) for p in params])
        failed: str | None = None  # the combined statement that failed as a stale one would
        while True:
            try:
                text = await self._batch_text(con, node)
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if _lost(exc) or con.is_closed():
                    raise
                # The statement itself does not prepare: each member gets the error it gets sent direct.
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
                    self._combined.pop(f"{node.sql.fetch}\0{statement.text}", None)
                    continue
                # One member's bad value fails the whole statement, and one slow member times it
                # out: each again separately, with its own outcome (a read has no effect to undo).
                return again
            break
        return _split(rows, len(params), node.sql.fetch, row_numbers=True)

    async def _again(self, pool: asyncpg.Pool, again: _Again, answer: Callable[[int, Outcome], None] | None = None,
                     offset: int = 0, budget: asyncio.Semaphore | None = None) -> list[Outcome]:
        """Each read of `again` sent separately, all at once, each on a connection of its own from
        the pool, timed by its node's timeout from its own statement's start (as direct).

        Why so: one after the other on one connection, N members would cost N round trips, and
        a slow member would delay the others' values past their own timeouts. Why this keeps
        the pool whole: the shared statement's connection is given back before a read sent again asks for
        one, so nothing holds a connection while it waits for another (batches that fall back at
        the same time cannot starve each other of connections); and each of them gives its
        connection back in a `finally` that cancellation runs too (`gather` cancels every one
        and waits for them all before the batch's own cancellation ends it). At most half the
        pool's connections send them at once: a batch of hundreds that failed (often because the server is slow)
        must not put hundreds of statements ahead of every other run waiting for a connection.
        """
        at_once = budget if budget is not None else asyncio.Semaphore(max(1, self.pool._size() // 2))

        async def one(position: int, node: CompiledNode, statement: CompiledSql, params: list[Any]) -> Outcome:
            async with at_once:
                try:
                    con = await self.pool._acquire(pool)
                except QueryError as exc:  # the pool cannot give a connection (the server is gone)
                    return _answered(answer, position, [(None, exc)])[0]
                try:
                    outcome = await _send_one(con, node, statement, params, self.pool.proven_pure(node))
                finally:
                    released = self.pool._release_later(pool, con, node.sql.session)
                if outcome[1] is not None:  # a pooler planner was not told of shows here too
                    self.pool._adopt_pooler(outcome[1])
                _answered(answer, position, [outcome])  # its run need not wait for the others'
                # The place is kept until the connection is back: a statement that timed out is
                # still being cancelled on the server until then, and the next would be executed beside it.
                await asyncio.shield(released)
                return outcome

        return list(await asyncio.gather(*(one(offset + i, *member) for i, member in enumerate(again.members))))

    async def _batch_text(self, con: asyncpg.Connection, node: CompiledNode) -> str | None:
        """The combined statement for `node` (cached), or None when it cannot be shared safely:
        a parameter that is itself an array (unnest would flatten it), or a statement that does
        not fit in a subquery (the combined form is prepared once to find out)."""
        statement = node.sql.statements[0]
        key = f"{node.sql.fetch}\0{statement.text}"
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
            # One row is all `fetch: one`/`value` reads, as direct (asyncpg asks for one row).
            limit = " LIMIT 1" if node.sql.fetch in ("one", "value") else ""
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


# A read batch that runs long while a connection is free splits in two, each half on a
# connection of its own (and so on, down to single members): one slow member must not hold the
# others' values back. "Long" is `SPLIT_FACTOR` times what the statement costs sent direct
# (the median of its last `COSTS_KEPT` latencies, recorded each time it is sent direct), never less than
# `SPLIT_MIN_S`, and `SPLIT_UNKNOWN_S` before anything is recorded. Not the batch's size: a
# batch's members cost the server a fraction of a round trip each, so a batch of cheap members
# ends well within the bound, and one that does not is worth sending in halves side by side.
SPLIT_FACTOR = 4.0
SPLIT_MIN_S = 0.05
SPLIT_UNKNOWN_S = 0.2
COSTS_KEPT = 32


@dataclass(frozen=True)
class _Again:
    """A shared statement failed: each of these reads (node, statement, parameters) is to be
    sent again separately, once the shared statement's connection is back in the pool (`PoolBackend._again`)."""

    members: list[tuple[CompiledNode, CompiledSql, list[Any]]]


class _Split:
    """A read batch that ran long while a connection was free: its statement was cancelled and
    its members are to be sent again in halves (`PoolBackend._halves`)."""


def _answered(answer: Callable[[int, Outcome], None] | None, offset: int, outcomes: list[Outcome]) -> list[Outcome]:
    """Give each outcome to `answer` (member `offset`, `offset + 1`...) and return them."""
    if answer is not None:
        for i, outcome in enumerate(outcomes):
            answer(offset + i, outcome)
    return outcomes


def _lost(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, ConnectionError, asyncpg.ConnectionDoesNotExistError, asyncio.CancelledError))


async def _send_one(con: asyncpg.Connection, node: CompiledNode, statement: CompiledSql, params: list[Any],
                    pure: bool) -> Outcome:
    """One member's statement on its own, timed by the node's timeout: its value, or its error."""
    try:
        with repeatable(pure):
            coro = _fetch(con, node.sql.fetch, statement, params)
            return (await (coro if node.timeout is None else timed(coro, node.timeout)), None)
    except (QueryError, NodeTimeout) as exc:
        return (None, exc)


async def _each_separately(con: asyncpg.Connection, node: CompiledNode, statement: CompiledSql,
                           members: list[list[Any]], pure: bool) -> list[Outcome]:
    """Each member's statement separately, one after the other on `con`: a lone member, or the
    members of a write in the order the runs asked (a later one may depend on an earlier one's
    rows, so they are not sent at once). A member whose statement fails keeps its own error (a
    transient one too: its own retry policy decides); once the connection is lost, the members
    not yet sent get a transient error."""
    outcomes: list[Outcome] = []
    for params in members:
        if not con.is_closed():
            # Each as direct: not inside the implicit transaction a statement before it left open
            # by failing before it was sent (a value it could not encode, `planner.db.synced`).
            try:
                await settle(con)
            except Exception:
                con.terminate()
        if con.is_closed():
            outcomes.append((None, QueryError("connection lost before the statement was sent", transient=True)))
        else:
            outcomes.append(await _send_one(con, node, statement, params, pure))
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


_SPLIT = _Split()
