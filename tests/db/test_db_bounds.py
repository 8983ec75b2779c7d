"""PoolBackend's per-statement caches stay bounded however many distinct statements it sees
(a service that edits its flows while it runs makes new statement texts forever)."""

from __future__ import annotations

from collections.abc import MutableMapping

import asyncpg
import pytest

from planner import QueryError, load_flow
from planner.db import pool as planner_db
from planner.db import shared as planner_shared
from planner.db.pool import PoolBackend
from planner.kinds.backend import Query

# This module is about another mechanism: nodes run as they would without compiled groups.
pytestmark = pytest.mark.usefixtures("uncompiled")

KEPT = 20
FLOOD = 3 * KEPT

FLOW = """
inputs: {{n: int}}
nodes:
  read: {{sql: "SELECT $n::int + {i} AS v", fetch: value}}
  other: {{sql: "SELECT $n::int - {i} AS w", fetch: value}}
  write: {{sql: "INSERT INTO bounded (v) VALUES ($n::int + {i}) RETURNING v", fetch: value, coalesce: true}}
  session: {{sql: "SET application_name = 'edited {i}'", fetch: none}}
"""


def _caches(backend: PoolBackend) -> dict[str, MutableMapping[object, object]]:
    """Every mapping the backend and its shared statements keep: those keyed by statement are
    the ones that could grow."""
    kept = {**{f"shared.{n}": v for n, v in vars(backend.shared).items()}, **vars(backend)}
    return {name: value for name, value in kept.items() if isinstance(value, MutableMapping)}


@pytest.mark.slow  # a flood of distinct statements
async def test_a_flood_of_distinct_statements_keeps_every_statement_cache_bounded(
        demo_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    con = await asyncpg.connect(demo_dsn)
    try:
        await con.execute("CREATE TABLE bounded (v int)")
    finally:
        await con.close()
    monkeypatch.setattr(planner_db, "STATEMENTS_KEPT", KEPT)
    monkeypatch.setattr(planner_shared, "STATEMENTS_KEPT", KEPT)
    # Transaction-pooler rules on a direct server: the session statements are refused (and
    # remembered) without being sent; the reads and writes run as usual.
    backend = PoolBackend(dsn=demo_dsn, min_size=1, max_size=2, pooler="transaction")
    try:
        for i in range(FLOOD):
            nodes = load_flow(text=FLOW.format(i=i), name=f"edit{i}").nodes
            read, other = (Query(nodes[name], [[i]], run=nodes) for name in ("read", "other"))
            assert await backend.run_fused([read, other]) == [(2 * i, None), (0, None)]
            assert await backend.run_batch(nodes["read"], [[1], [2]], lambda: None) == [(i + 1, None), (i + 2, None)]
            assert await backend.run_batch(nodes["write"], [[1], [2]], lambda: None) is not None
            with pytest.raises(QueryError, match="transaction-mode pooler"):
                await backend.run(Query(nodes["session"], [[]]))
        sizes = {name: len(cache) for name, cache in _caches(backend).items()}
        assert sizes and all(size <= KEPT for size in sizes.values()), sizes
    finally:
        await backend.close()
