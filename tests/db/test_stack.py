"""The narrow seam and the one place that builds the stack (`planner.db.stack`):

- a `Backend` is open, run and close: a backend with nothing else runs every kind of node;
- `build_stack` names each part, and hands the pool's capabilities explicitly to what needs them
  (batches to coalescing, fused reads to fusion, the channel to the cache, the pool to the replica
  router, the catalog and `call:` nodes);
- over a caller's own backend, the `PoolBackend` under it (if any) is found once, at build time;
- a cache channel without what carries it is refused, not quietly kept in the process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from planner import (
    CacheOptions,
    CallOptions,
    DatabaseUnavailable,
    FlowFailed,
    Planner,
    PoolOptions,
    QueryError,
    ReplicaOptions,
    load_flow,
)
from planner.db.cache import CacheBackend
from planner.db.pool import PoolBackend
from planner.db.stack import build_stack
from planner.kinds.backend import Offline, Query, WrappingBackend

NOWHERE = "postgresql://nobody@127.0.0.1:1/none"


class Minimal:
    """A backend with the three methods of the seam and nothing else: answers 7 to every query."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    async def open(self) -> None:
        return None

    async def run(self, query: Query) -> Any:
        self.queries.append(query.node.name)
        return 7

    async def close(self) -> None:
        return None


def takes_db(db: Any) -> str:
    return type(db).__name__


async def test_a_backend_of_open_run_and_close_runs_cached_and_plain_sql_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNER_COMPILE", "0")  # its answer (7) is no compiled group's rows
    flow = load_flow(text="nodes:\n  a: {sql: SELECT 1, fetch: value, cache: 60s}\n  b: {sql: 'SELECT $a', fetch: value}\n",
                     name="minimal")
    backend = Minimal()
    async with Planner(backend=backend) as planner:
        first = await planner.run(flow)
        second = await planner.run(flow)
    assert first.values == second.values == {"a": 7, "b": 7}
    assert backend.queries == ["a", "b", "b"]  # a's second read came from the cache (kept in this process)


async def test_a_call_node_that_takes_db_over_a_backend_with_no_pool_is_told_there_is_none(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("nodes:\n  c: {call: tests.db.test_stack:takes_db, on_error: fail}\n")
    async with Planner(flows=tmp_path, backend=Minimal(), call_options=CallOptions(allowed_modules=["tests"])) as planner:
        with pytest.raises(FlowFailed) as raised:
            await planner.run("t")
    error = raised.value.result.nodes["c"].error
    assert isinstance(error, DatabaseUnavailable) and "no database pool" in str(error)


def test_the_stack_names_each_part_and_gives_each_wrapper_the_pool() -> None:
    stack = build_stack(dsn=NOWHERE, replica_options=ReplicaOptions(dsn=NOWHERE + "_replica"),
                        cache_options=CacheOptions(channel="c"))
    primary, replica_pool = stack.pools["primary"], stack.pools["replica"]
    assert stack.primary is primary and stack.database is primary
    assert stack.coalescers["primary"].pool is primary and stack.coalescers["replica"].pool is replica_pool
    assert stack.fusers["primary"].fuser is primary and stack.fusers["replica"].fuser is replica_pool
    assert stack.cache.via is primary.channel and stack.cache.channel == "c"
    assert stack.replica is not None and stack.replica.primary_pool is primary
    assert stack.replica.replica is stack.fusers["replica"]
    assert stack.catalog is not None and primary.verdict == stack.catalog.known == replica_pool.verdict
    assert stack.backend is stack.effects and not primary.opened  # built, nothing opened


def test_behind_a_transaction_pooler_the_cache_stays_in_its_process() -> None:
    stack = build_stack(dsn=NOWHERE, pool_options=PoolOptions(pooler="transaction"), cache_options=CacheOptions(channel="c"))
    assert stack.cache.channel is None and stack.cache.via is None


def test_over_a_callers_backend_the_pool_under_it_is_found_once() -> None:
    pool = PoolBackend(dsn=NOWHERE)
    stack = build_stack(backend=WrappingBackend(WrappingBackend(pool)))
    assert stack.pools == {} and stack.primary is pool and stack.database is pool
    assert stack.cache.via is pool.channel and stack.catalog is not None


def test_over_a_callers_backend_with_no_pool_there_is_no_channel_nor_catalog() -> None:
    stack = build_stack(backend=Minimal())
    assert (stack.primary_pool, stack.database, stack.catalog, stack.cache.channel) == (None, None, None, None)
    with pytest.raises(LookupError):
        _ = stack.primary
    offline = Offline()
    assert build_stack(backend=offline).database is offline  # it answers describe and pool (with errors)


def test_a_cache_channel_without_what_carries_it_is_refused() -> None:
    with pytest.raises(ValueError, match="without via="):
        CacheBackend(Minimal(), channel="planner_cache")


def test_a_replica_with_a_callers_backend_is_refused() -> None:
    with pytest.raises(TypeError, match="ReplicaBackend"):
        build_stack(backend=Minimal(), replica_options=ReplicaOptions(dsn=NOWHERE))


async def test_a_connection_held_for_a_block_goes_back_and_its_error_is_planners(demo_dsn: str) -> None:
    backend = PoolBackend(dsn=demo_dsn, min_size=1, max_size=1)
    try:
        pool = await backend.pool()
        with pytest.raises(QueryError) as raised:
            async with backend.held(pool, False) as con:
                assert backend.load.in_use == 1 and not backend.idle()
                await con.execute("SELECT 1 / 0")
        await backend.drain()
        assert raised.value.sqlstate == "22012"  # the driver's error, translated at the boundary
        assert pool.get_idle_size() == pool.get_size() == 1 and backend.load.in_use == 0 and backend.idle()
    finally:
        await backend.close()
