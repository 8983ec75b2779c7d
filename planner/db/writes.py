"""Combined writes: the `coalesce: true` writes of concurrent runs as one statement, each
member's statement hoisted into one `WITH` under an overlap guard (`planner.lang.sqlinfo.combine_writes`).
What a batch of a write does on its connection (`SharedStatements` sends the batch); it keeps
each combined text, and the writes that can never be combined.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import asyncpg
from cachetools import LRUCache

from planner.db.shared import STATEMENTS_KEPT, _each_separately, _lost, _split
from planner.db.translate import translate
from planner.db.wire import StaleResult
from planner.kinds.backend import Outcome
from planner.lang.nodes import CompiledNode
from planner.lang.sqlinfo import combine_writes
from planner.run.policy import timed

logger = logging.getLogger("planner")


class _Judge(Protocol):
    def proven_pure(self, node: CompiledNode) -> bool: ...


class CombinedWrites:
    """The combined-write path of one pool backend (see the module's docstring)."""

    def __init__(self, pool: _Judge) -> None:
        self.pool = pool
        self._writes: LRUCache[str, str | None] = LRUCache(STATEMENTS_KEPT)  # members, write -> the combined write
        self._uncombined: LRUCache[str, None] = LRUCache(STATEMENTS_KEPT)  # writes whose target rows cannot be named

    async def on(self, con: asyncpg.Connection, node: CompiledNode, params: list[list[Any]]) -> list[Outcome] | None:
        """Writes an author marked `coalesce: true`: one statement, so one transaction: all of
        it is written or none, and when the server refuses it each member is sent again separately,
        with its own outcome. (The coalescer keeps write batches small: see `MAX_WRITE_BATCH`.)

        A combined write that times out is not sent again: its cancel may have come after it
        committed, and sending the members again could write twice. Every member then gets
        the timeout, as a statement of its own might have."""
        statement = node.sql.statements[0]
        text = self._text(statement.text, len(params), node.sql.fetch)
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
                # migration): sending the members again would write twice. Each gets the error.
                return [(None, translate(exc, statement, p)) for p in params]
            if _unnamed_targets(exc):
                self.never_combine(statement.text, node)
            # The server refused it (or a value could not be sent): nothing was written.
            return await _each_separately(con, node, statement, params, self.pool.proven_pure(node))
        outcomes: list[Outcome] = [(None, None)] * len(params)
        for position, outcome in zip(order, _split(rows, len(params), node.sql.fetch, row_numbers=False), strict=True):
            outcomes[position] = outcome
        return outcomes

    def never_combine(self, text: str, node: CompiledNode) -> None:
        """The overlap guard of a combined write cannot name its target's rows (an updatable
        view has no `ctid`): every batch of it would be refused. From now on it is not combined
        (the coalescer sends its members separately, and remembers), and a warning says so once."""
        if text not in self._uncombined:
            logger.warning("node %r%s: its coalesce: true write is not combined: the rows it changes cannot be "
                           "named by (tableoid, ctid) (a view?), so two runs changing one row could not be told "
                           "apart; each run sends its own statement", node.name,
                           f" of flow {node.flow!r}" if node.flow else "")
        self._uncombined[text] = None

    def _text(self, text: str, members: int, fetch: str) -> str | None:
        if text in self._uncombined:
            return None
        key = f"{members}\0{fetch}\0{text}"
        if key not in self._writes:
            self._writes[key] = combine_writes(text, members, first_row=fetch in ("one", "value"))
        return self._writes[key]


def _unnamed_targets(exc: BaseException) -> bool:
    """Whether a combined write failed because its overlap guard named a system column its
    target lacks (`column v.ctid does not exist`: a view)."""
    text = str(exc)
    return getattr(exc, "sqlstate", None) == "42703" and ("ctid" in text or "tableoid" in text)
