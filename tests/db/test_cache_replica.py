"""The cache is never refilled with a value older than an invalidation, whatever replica lags.

A cached read may be routed to a streaming replica; a replica within `replica_max_lag` may not
have replayed the write that made the cached value stale. After an invalidation, the refill
comes from the primary, or from the replica once it is proven past the invalidating write
(`Query.fresh_after`, `ReplicaBackend.past`). Each way an invalidation arrives is tried with the
replica's replay paused (`pg_wal_replay_pause()`), so the replica still has the old value.
See docs/reliability.md and docs/scaling.md.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from planner import CacheOptions, Planner, ReplicaOptions
from tests.db import test_replica
from tests.db.test_replica import _pause, _resume, _until
from tests.support.replica_pair import Pair

# The streaming pair and its databases: test_replica's fixtures (a pair of this module's own).
pair, template, databases, db = test_replica.pair, test_replica.template, test_replica.databases, test_replica.db

CHANNEL = "planner_test_cache_replica"


@pytest.fixture
def cached(write_flow: Callable[..., Path]) -> Path:
    write_flow("""
        inputs: {note: str}
        nodes:
          count:
            sql: SELECT count(*) AS n, standby() AS standby FROM notes WHERE note = $note
            fetch: one
            cache: 60s
            on_error: fail
    """, name="count")
    write_flow("""
        inputs: {note: str, write: bool}
        nodes:
          count:
            sql: SELECT count(*) AS n, standby() AS standby FROM notes WHERE note = $note
            fetch: one
            cache: 60s
            on_error: fail
          add:
            sql: "INSERT INTO notes (note) VALUES ($note) RETURNING id"
            fetch: value
            when: $write
            invalidates: [count]
            after: [count]
            on_error: fail
    """, name="add")
    return write_flow("""
        inputs: {note: str}
        nodes:
          count:
            sql: SELECT count(*) AS n, standby() AS standby FROM notes WHERE note = $note
            fetch: one
            cache: 60s
            on_error: fail
    """, name="other").parent


@pytest.fixture
async def planners(db: tuple[str, str], cached: Path) -> AsyncIterator[Callable[[], Planner]]:
    """Planners on the pair, sharing one invalidation channel, the replica allowed to lag 60 s
    (its lag alone never sends a read to the primary here)."""
    primary, replica = db
    made: list[Planner] = []

    def make() -> Planner:
        planner = Planner(flows=cached, dsn=primary, replica_dsn=replica, replica_options=ReplicaOptions(max_lag="60s"), cache_options=CacheOptions(channel=CHANNEL))
        made.append(planner)
        return planner

    yield make
    for planner in made:
        await planner.close()


async def _count(planner: Planner, note: str = "x", flow: str = "count") -> dict[str, Any]:
    value: dict[str, Any] = (await planner.run(flow, {"note": note})).nodes["count"].value
    return value


async def _write(primary: str, note: str = "x") -> None:
    con = await asyncpg.connect(primary)
    try:
        await con.execute("INSERT INTO notes (note) VALUES ($1)", note)
    finally:
        await con.close()


async def _cached_from_the_replica(planner: Planner, note: str = "x", flow: str = "count") -> None:
    await planner.__aenter__()
    assert await _count(planner, note, flow) == {"n": 0, "standby": True}  # kept, from the replica
    assert (await planner.run(flow, {"note": note})).nodes["count"].served.cached  # type: ignore[union-attr]


async def test_a_refill_after_planner_invalidate_never_comes_from_a_replica_behind_the_write(
        pair: Pair, db: tuple[str, str], planners: Callable[[], Planner]) -> None:
    planner = planners()
    await _cached_from_the_replica(planner)
    paused = await _pause(pair)
    try:
        await _write(db[0])
        planner.invalidate("count", flow="count")
        assert await _count(planner) == {"n": 1, "standby": False}  # the primary: the replica lacks the write
        assert await _count(planner) == {"n": 1, "standby": False}  # and that is what is kept
    finally:
        await _resume(paused)


async def test_a_refill_after_invalidating_everything_never_comes_from_a_replica_behind_the_write(
        pair: Pair, db: tuple[str, str], planners: Callable[[], Planner]) -> None:
    planner = planners()
    await _cached_from_the_replica(planner)
    paused = await _pause(pair)
    try:
        await _write(db[0])
        planner.invalidate()
        assert await _count(planner) == {"n": 1, "standby": False}
    finally:
        await _resume(paused)


async def test_a_refill_after_invalidating_a_node_in_every_flow_never_comes_from_a_replica_behind_the_write(
        pair: Pair, db: tuple[str, str], planners: Callable[[], Planner]) -> None:
    planner = planners()
    await _cached_from_the_replica(planner)
    paused = await _pause(pair)
    try:
        await _write(db[0])
        planner.invalidate("count")
        assert await _count(planner) == {"n": 1, "standby": False}
        # A flow whose `count` was never run here: its first read is no older than the invalidation.
        assert await _count(planner, flow="other") == {"n": 1, "standby": False}
    finally:
        await _resume(paused)


async def test_a_refill_after_an_invalidation_from_another_process_never_comes_from_a_replica_behind_the_write(
        pair: Pair, db: tuple[str, str], planners: Callable[[], Planner]) -> None:
    writer, reader = planners(), planners()  # two processes' caches: each only hears the other over the channel
    await _cached_from_the_replica(reader)
    await writer.__aenter__()
    paused = await _pause(pair)
    try:
        await _write(db[0])
        writer.invalidate("count", flow="count")

        async def dropped() -> bool:
            return reader.cache.size == 0

        await _until(dropped)
        assert await _count(reader) == {"n": 1, "standby": False}
        assert await _count(reader) == {"n": 1, "standby": False}
    finally:
        await _resume(paused)


async def test_an_invalidation_of_a_node_another_process_never_ran_reaches_it(
        pair: Pair, db: tuple[str, str], planners: Callable[[], Planner]) -> None:
    writer, reader = planners(), planners()
    await _cached_from_the_replica(reader, flow="other")
    await writer.__aenter__()  # it never ran `other`
    paused = await _pause(pair)
    try:
        await _write(db[0])
        writer.invalidate("count", flow="other")

        async def dropped() -> bool:
            return reader.cache.size == 0

        await _until(dropped)
        assert await _count(reader, flow="other") == {"n": 1, "standby": False}
    finally:
        await _resume(paused)


async def test_a_refill_after_a_nodes_invalidates_never_comes_from_a_replica_behind_the_write(
        pair: Pair, db: tuple[str, str], planners: Callable[[], Planner]) -> None:
    # `add` writes and invalidates `count` (of its flow, which the flow's routing already keeps
    # on the primary); the other process hears of it over the channel. Neither refill is old.
    writer, reader = planners(), planners()
    for planner in (writer, reader):
        result = await planner.run("add", {"note": "y", "write": False})
        assert result.nodes["count"].value == {"n": 0, "standby": False}
    paused = await _pause(pair)
    try:
        await writer.run("add", {"note": "y", "write": True})

        async def dropped() -> bool:
            return reader.cache.size == 0

        await _until(dropped)
        for planner in (writer, reader):
            result = await planner.run("add", {"note": "y", "write": False})
            assert result.nodes["count"].value == {"n": 1, "standby": False}
    finally:
        await _resume(paused)


async def test_once_the_replica_has_replayed_the_write_refills_come_from_it_again(
        pair: Pair, db: tuple[str, str], planners: Callable[[], Planner]) -> None:
    planner = planners()
    await _cached_from_the_replica(planner)
    paused = await _pause(pair)
    try:
        await _write(db[0])
        planner.invalidate("count", flow="count")
        assert await _count(planner) == {"n": 1, "standby": False}
    finally:
        await _resume(paused)
    assert planner.replica is not None
    planner.invalidate("count", flow="count")
    invalidated = time.monotonic()

    async def proven() -> bool:
        return planner.replica is not None and planner.replica.past(invalidated)

    await _until(proven)  # a check of the monitor asked the primary after it, and the replica had replayed that
    assert await _count(planner) == {"n": 1, "standby": True}
    assert (await planner.run("count", {"note": "x"})).nodes["count"].served.cached  # type: ignore[union-attr]


async def test_a_lagging_replica_still_serves_reads_that_need_no_freshness(
        pair: Pair, db: tuple[str, str], planners: Callable[[], Planner]) -> None:
    # The fence is per invalidated node: other cached nodes keep reading the replica.
    planner = planners()
    await _cached_from_the_replica(planner)
    paused = await _pause(pair)
    try:
        await _write(db[0])
        planner.invalidate("count", flow="count")
        assert await _count(planner, flow="other") == {"n": 0, "standby": True}
    finally:
        await _resume(paused)
