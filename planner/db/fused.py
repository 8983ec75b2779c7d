"""Fused reads: the sibling reads of one run as one statement (`PoolBackend.run_fused`, what
fusion asks of a pool: `planner.db.fuse`). Each member's statement is materialized once and
its columns sent back as typed arrays, one row in all; a member that fails makes each run
again separately (`SharedStatements._again`). It keeps each read's columns and each fused text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg
from cachetools import LRUCache

from planner.db.admin import quote_ident
from planner.db.shared import STATEMENTS_KEPT, _Again, _lost, _stale
from planner.db.wire import repeatable
from planner.kinds.backend import Outcome, Query
from planner.lang.refs import CompiledSql
from planner.run.policy import timed

if TYPE_CHECKING:
    from planner.db.shared import SharedStatements


class FusedReads:
    """The fused-read path of one pool backend (see the module's docstring); its connections
    and its members' reruns (separately) are those of `shared`'s pool."""

    def __init__(self, shared: SharedStatements) -> None:
        self.shared, self.pool = shared, shared.pool
        self._shapes: LRUCache[str, tuple[str, ...] | None] = LRUCache(STATEMENTS_KEPT)  # read -> its column names (None: not fusible)
        self._fused: LRUCache[str, str] = LRUCache(STATEMENTS_KEPT)  # reads of one run -> their fused statement

    async def run_fused(self, queries: list[Query]) -> list[Outcome] | None:
        """The reads of one run as one statement: each member's statement materialized once,
        its columns sent back as typed arrays (`ARRAY(SELECT c ...)`), one row in all. None
        when a member returns a column that cannot travel in an array (an array, a composite).
        When the fused statement fails (or times out), each member is sent again separately, all at
        once, each on a connection of its own (`_again`), with its own error and timeout."""
        pool = self.pool._pool or await self.pool._first_pool()
        async with self.pool.held(pool, False) as con:
            with repeatable(all(self.pool.proven_pure(q.node) for q in queries)):  # reads only, fused when proven pure
                outcomes = await self._fused_on(con, queries)
        return await self.shared._again(pool, outcomes) if isinstance(outcomes, _Again) else outcomes

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
                # A member the server refuses to prepare: each separately, with its own error.
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
                # A failing (or slow) member: each again separately, with its own error and timeout.
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
    sent direct (asyncpg asks the server for one row): a fused member keeps the cost of its fetch."""
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
