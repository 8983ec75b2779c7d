"""`EffectsBackend`, the outermost wrapper of a `Planner`'s stack: each query is sent on as the node
its statement's verdict allows (`planner.lang.effects.as_allowed`), so that the cache, replica routing,
fusion and coalescing below it decide from one verdict. The verdict is the server's
(`planner.db.catalog.Catalog`); a statement that fails because the schema changed under it is
asked again before it is next sent.
"""

from __future__ import annotations

from typing import Any

from planner.db.catalog import Catalog
from planner.errors import QueryError
from planner.kinds.backend import Backend, Query, WrappingBackend
from planner.lang.effects import Effects, as_allowed, of_syntax

# What a statement whose objects changed under it gets: a cached plan that must not change its
# result type (0A000), a column, table, function or type gone or changed (42703, 42P01, 42883,
# 42704, 42804), a column count that no longer matches (42P10).
_SCHEMA_CHANGED = frozenset({"0A000", "42703", "42P01", "42883", "42704", "42804", "42P10"})


class EffectsBackend(WrappingBackend):
    """Gives each query the node its statement's verdict allows (`planner.lang.effects.as_allowed`).

    With `catalog` None (a backend of the caller's own without planner's pool) it passes every
    query on as compiled: its effects are judged by syntax alone (`planner.lang.sqlinfo`)."""

    def __init__(self, inner: Backend, catalog: Catalog | None) -> None:
        super().__init__(inner)
        self.catalog = catalog

    async def run(self, query: Query) -> Any:
        catalog = self.catalog
        node = query.node
        if catalog is None or not node.sql.read_only:
            return await self.inner.run(query)  # a write by its syntax: nothing to ask
        text = node.sql.statements[0].text
        effects = catalog.current(text) or await catalog.effects(text)
        after_write = False
        if node.sql.replica:
            for before in node.sql.replica_after:
                if not (catalog.current(before) or await catalog.effects(before)).pure:
                    after_write = True
                    break
        query.node = as_allowed(node, effects, after_write=after_write)
        try:
            return await self.inner.run(query)
        except QueryError as exc:
            if exc.sqlstate in _SCHEMA_CHANGED:
                catalog.forget(text)  # what it calls may have changed with the schema
            raise

    async def close(self) -> None:
        try:
            if self.catalog is not None:
                await self.catalog.close()
        finally:
            await self.inner.close()

    async def effects(self, node: Any) -> Effects:
        """The verdict on `node`'s statement (`of_syntax` for a write by syntax, or without a catalog)."""
        if self.catalog is None or not node.sql.read_only:
            return of_syntax(node)
        return await self.catalog.effects(node.sql.statements[0].text)
