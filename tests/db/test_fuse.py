"""Fusion: the sibling reads of one run that become ready together go as one statement, and
each node gets exactly the value, type, state and error it would have had alone."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner import CacheOptions, DatabaseUnavailable, NodeState, Planner, QueryError, load_flow
from planner.db.fuse import FusingBackend
from planner.kinds.backend import Query
from tests.support.spies import Counting

# This module is about another mechanism: nodes run as they would without compiled groups.
pytestmark = pytest.mark.usefixtures("uncompiled")

SIBLINGS = """
inputs: {k: int, bad: {type: str, default: "1"}}
nodes:
  root: {sql: "SELECT $k::int AS k", fetch: one}
  rows: {sql: "SELECT id, k, t, n, ts, b, j, u, f FROM fuse_t WHERE k >= $root.k ORDER BY id", fetch: all}
  first: {sql: "SELECT id, k, t, n, ts, b, j, u, f FROM fuse_t WHERE k = $root.k ORDER BY id DESC", fetch: one}
  count: {sql: "SELECT count(*) FROM fuse_t WHERE k < $root.k", fetch: value}
  cast: {sql: "SELECT $bad::text::int + $root.k AS v", fetch: value}
"""

Row = tuple[int, str | None, decimal.Decimal | None, dt.datetime | None, bool | None, Any, uuid.UUID | None, float | None]

rows_strategy = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=8)),
        st.one_of(st.none(), st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-10**6, max_value=10**6)),
        st.one_of(st.none(), st.datetimes(min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(dt.UTC))),
        st.one_of(st.none(), st.booleans()),
        st.one_of(st.none(), st.dictionaries(st.sampled_from("abc"), st.integers(-5, 5), max_size=3)),
        st.one_of(st.none(), st.uuids()),
        st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=32)),
    ),
    max_size=12,
)


@pytest.fixture
async def fuse_db(demo_dsn: str) -> AsyncIterator[str]:
    con = await asyncpg.connect(demo_dsn)
    try:
        await con.execute("CREATE TABLE fuse_t (id serial PRIMARY KEY, k int, t text, n numeric, ts timestamptz, "
                          "b bool, j jsonb, u uuid, f float4, arr int[] DEFAULT '{1,2}')")
    finally:
        await con.close()
    yield demo_dsn


def _planner(dsn: str, *, fuse: bool) -> tuple[Planner, Counting]:
    from planner.db.pool import PoolBackend

    counting = Counting(PoolBackend(dsn=dsn))
    return Planner(backend=FusingBackend(counting, fuser=counting, enabled=fuse)), counting


async def _fill(dsn: str, rows: list[Row]) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await con.set_type_codec("jsonb", encoder=__import__("json").dumps, decoder=__import__("json").loads, schema="pg_catalog")
        await con.execute("TRUNCATE fuse_t")
        await con.executemany("INSERT INTO fuse_t (k, t, n, ts, b, j, u, f) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", rows)
    finally:
        await con.close()


@pytest.mark.slow  # 15 generated tables, each read fused and unfused
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows_strategy, k=st.integers(0, 3))
async def test_fused_and_unfused_reads_give_the_same_values_and_types(fuse_db: str, rows: list[Row], k: int) -> None:
    await _fill(fuse_db, rows)
    flow = load_flow(text=SIBLINGS, name="siblings")
    fused_planner, fused_count = _planner(fuse_db, fuse=True)
    plain_planner, _ = _planner(fuse_db, fuse=False)
    async with fused_planner, plain_planner:
        fused = await fused_planner.run(flow, {"k": k})
        plain = await plain_planner.run(flow, {"k": k})
    assert fused_count.fused == [4]  # rows, first, count and cast: one statement
    for name in flow.nodes:
        assert fused.values[name] == plain.values[name], name
        assert _types(fused.values[name]) == _types(plain.values[name]), name
    assert fused.states() == plain.states()


def _types(value: Any) -> Any:
    if isinstance(value, list):
        return [_types(v) for v in value]
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    return type(value)


async def test_fused_nodes_say_so_on_their_result(fuse_db: str) -> None:
    await _fill(fuse_db, [(1, "a", None, None, True, {"a": 1}, None, 1.5)])
    planner, counting = _planner(fuse_db, fuse=True)
    async with planner:
        result = await planner.run(load_flow(text=SIBLINGS, name="siblings"), {"k": 1})
    assert counting.fused == [4]
    assert {n: r.served.fused for n, r in result.nodes.items() if r.served} == {
        "root": 1, "rows": 4, "first": 4, "count": 4, "cast": 4}


@pytest.mark.slow  # holds connections with 3 s sleeps on the server
@pytest.mark.parametrize(("held", "fused"), [(0, [4]), (2, [4]), (4, [])])
async def test_fusion_stops_once_half_the_pool_is_in_use(fuse_db: str, held: int, fused: list[int]) -> None:
    # Under load a round trip shared by the same read of many runs does more than one shared
    # by the reads of one run: from half the pool (4 of 8), siblings go on to coalescing instead.
    # (`root`'s connection may still be on its way back when its children start: it counts.)
    from planner.db.pool import PoolBackend

    await _fill(fuse_db, [(1, "a", None, None, True, None, None, None)])
    counting = Counting(PoolBackend(dsn=fuse_db, min_size=8, max_size=8))
    planner = Planner(backend=FusingBackend(counting, fuser=counting, enabled=True))
    nap = load_flow(text='nodes: {nap: {sql: "SELECT pg_sleep(3)::text AS napping_for_fusion", fetch: value}}',
                    name="nap")
    async with planner:
        await planner.backend.open()
        sleepers = [asyncio.create_task(planner.run(nap)) for _ in range(held)]
        admin = await asyncpg.connect(fuse_db)
        try:
            while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "  # noqa: ASYNC110 - polls the server
                                       "AND query LIKE '%napping_for_fusion%' AND pid <> pg_backend_pid()") < held:
                await asyncio.sleep(0.02)
        finally:
            await admin.close()
        result = await planner.run(load_flow(text=SIBLINGS, name="siblings"), {"k": 1})
        await asyncio.gather(*sleepers)
    assert counting.fused == fused
    assert result.nodes["count"].value == 0


async def test_a_burst_of_runs_fuses_only_while_half_the_pool_is_free(fuse_db: str) -> None:
    # Six runs' sibling groups flushed in one turn: each decides as the pool stands when it
    # would take its connection, not as it stood before any of them did. (It rests on nothing
    # yielding between that decision and PoolBackend counting the connection: asyncpg's
    # acquire is only awaited after the count.)
    from planner.db.pool import PoolBackend

    counting = Counting(PoolBackend(dsn=fuse_db, min_size=8, max_size=8))
    fuser = FusingBackend(counting, fuser=counting, enabled=True)
    nodes = load_flow(text=SIBLINGS, name="siblings").nodes
    try:
        await counting.open()
        runs = [object() for _ in range(6)]
        values = await asyncio.gather(*(fuser.run(Query(nodes[name], [params], run=run))
                                        for k, run in enumerate(runs)
                                        for name, params in (("count", [k]), ("cast", ["1", k]))))
    finally:
        await counting.close()
    assert counting.fused == [2, 2, 2, 2]  # the pool's first half; the other two runs went alone
    assert counting.single == 4
    assert values == [v for k in range(6) for v in (0, 1 + k)]


async def test_a_failing_member_keeps_its_own_error_and_the_others_their_values(fuse_db: str) -> None:
    await _fill(fuse_db, [(1, "a", None, None, True, None, None, None)])
    planner, _ = _planner(fuse_db, fuse=True)
    async with planner:
        result = await planner.run(load_flow(text=SIBLINGS, name="siblings"), {"k": 1, "bad": "not a number"})
    assert result.nodes["cast"].state is NodeState.DEFAULTED
    assert isinstance(result.nodes["cast"].error, QueryError) and result.nodes["cast"].error.sqlstate == "22P02"
    assert result.nodes["count"].state is NodeState.OK and result.values["count"] == 0
    assert [r["t"] for r in result.values["rows"]] == ["a"]


async def test_nodes_whose_fused_statement_failed_as_a_whole_get_errors_of_their_own() -> None:
    # A pool that cannot be opened fails the whole group; each node raises its error, which
    # writes its traceback: one object per node.
    from planner.db.pool import PoolBackend

    flow = load_flow(text="nodes:\n  a: {sql: SELECT 1, fetch: value}\n  b: {sql: SELECT 2, fetch: value}\n", name="two")
    nowhere = PoolBackend(dsn="postgresql://postgres@/postgres?host=/tmp/planner-no-server-here")
    backend = FusingBackend(nowhere, fuser=nowhere, enabled=True)
    run = object()  # one run: its sibling reads fuse
    try:
        errors = await asyncio.gather(*(backend.run(Query(flow.nodes[name], [[]], run=run)) for name in ("a", "b")),
                                      return_exceptions=True)
    finally:
        await backend.close()
    one, two = errors
    assert isinstance(one, DatabaseUnavailable) and isinstance(two, DatabaseUnavailable)
    assert one is not two and str(one) == str(two)


async def test_a_column_that_cannot_travel_in_an_array_runs_the_group_alone(fuse_db: str) -> None:
    await _fill(fuse_db, [(2, "b", None, None, None, None, None, None)])
    planner, counting = _planner(fuse_db, fuse=True)
    async with planner:
        result = await planner.run(load_flow(text=SIBLINGS.replace("SELECT id, k, t, n, ts, b, j, u, f FROM", "SELECT * FROM"),
                                             name="star"), {"k": 2})  # `*` includes arr int[]
    assert result.values["first"]["arr"] == [1, 2]
    assert all(r.served is None or r.served.fused == 1 for r in result.nodes.values())
    assert counting.fused == [4] and counting.single == 5  # asked once, then each alone


async def test_a_member_that_would_time_out_alone_still_times_out(fuse_db: str) -> None:
    flow = load_flow(text="""
        nodes:
          root: {sql: "SELECT 1 AS k", fetch: one}
          slow: {sql: "SELECT pg_sleep(0.5) IS NULL AS slept, $root.k::int AS k", fetch: one, timeout: 100ms}
          quick: {sql: "SELECT $root.k + 1", fetch: value}
        """, name="timeouts")
    planner, _ = _planner(fuse_db, fuse=True)
    async with planner:
        result = await planner.run(flow)
    assert result.nodes["slow"].state is NodeState.DEFAULTED
    assert "timed out" in str(result.nodes["slow"].error)
    assert result.values["quick"] == 2


@pytest.mark.parametrize("switch", ["node", "settings"])
async def test_fusion_can_be_turned_off(fuse_db: str, switch: str) -> None:
    text = SIBLINGS
    if switch == "node":
        text = text.replace('fetch: value}\n  cast', 'fetch: value, fuse: false}\n  cast')
    else:
        text = "settings: {fuse: false}\n" + text
    from planner.db.pool import PoolBackend

    counting = Counting(PoolBackend(dsn=fuse_db))
    async with Planner(backend=FusingBackend(counting, fuser=counting)) as planner:
        result = await planner.run(load_flow(text=text, name="off"), {"k": 1})
    if switch == "node":
        assert counting.fused == [3] and result.nodes["count"].served.fused == 1  # type: ignore[union-attr]
    else:
        assert counting.fused == [] and counting.single == 5


@pytest.mark.parametrize(("value", "fused"), [("0", False), ("1", True)])
async def test_planner_fuse_0_turns_fusion_off_in_the_planners_own_stack(
        fuse_db: str, value: str, fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNER_FUSE", value)
    async with Planner(dsn=fuse_db, cache_options=CacheOptions(channel=None)) as planner:
        result = await planner.run(load_flow(text=SIBLINGS, name="env"), {"k": 1})
    sizes = [node.served.fused for node in result.nodes.values() if node.served is not None]
    assert (max(sizes) > 1) is fused, sizes


async def test_sequential_mode_neither_fuses_nor_coalesces(fuse_db: str) -> None:
    from planner.db.coalesce import CoalescingBackend
    from planner.db.pool import PoolBackend

    await _fill(fuse_db, [(1, "a", None, None, None, None, None, None)])
    pool = PoolBackend(dsn=fuse_db, min_size=1, max_size=1)
    counting = Counting(CoalescingBackend(pool, batches=pool, enabled=True), pool)
    flow = load_flow(text=SIBLINGS, name="siblings")
    async with Planner(backend=FusingBackend(counting, fuser=counting, enabled=True)) as planner:
        results = await asyncio.gather(*(planner.run(flow, {"k": 1}, mode="sequential") for _ in range(6)))
        eager = await asyncio.gather(*(planner.run(flow, {"k": 1}) for _ in range(6)))
    assert all(r.served is None or (r.served.fused, r.served.batch) == (1, 1) for res in results for r in res.nodes.values())
    # The same runs in eager mode on the same busy pool do share statements:
    assert any(r.served is not None and r.served.batch > 1 for res in eager for r in res.nodes.values())


async def test_a_member_the_server_cannot_prepare_fails_alone(fuse_db: str) -> None:
    # A statement that never prepares is not proven pure (`planner.lang.effects`) and never
    # fuses; one that stops preparing after its verdict was kept (its table dropped) does.
    con = await asyncpg.connect(fuse_db)
    await con.execute("CREATE TABLE gone_t (id int)")
    flow = load_flow(text="""
        nodes:
          ok: {sql: SELECT 1, fetch: value}
          missing: {sql: SELECT * FROM gone_t, default: [], on_bug: default}
        """, name="prepare")
    planner, counting = _planner(fuse_db, fuse=True)
    try:
        async with planner:
            await planner.run(flow)
            await con.execute("DROP TABLE gone_t")
            result = await planner.run(flow)
    finally:
        await con.close()
    assert counting.fused == [2, 2]
    assert result.values == {"ok": 1, "missing": []}
    assert result.nodes["ok"].state is NodeState.OK and result.nodes["missing"].state is NodeState.DEFAULTED


async def test_members_ending_in_a_semicolon_or_a_comment_still_fuse(fuse_db: str) -> None:
    flow = load_flow(text="""
        nodes:
          root: {sql: SELECT 1 AS k, fetch: one}
          semi: {sql: "SELECT $root.k + 1 AS v;", fetch: value}
          comment: {sql: "SELECT $root.k + 2 AS v, $root.k + 3 AS v -- the first v", fetch: value}
        """, name="ends")
    planner, counting = _planner(fuse_db, fuse=True)
    async with planner:
        result = await planner.run(flow)
    assert counting.fused == [2]
    assert result.values["semi"] == 2 and result.values["comment"] == 3  # the first column, as alone
    assert result.nodes["semi"].served is not None and result.nodes["semi"].served.fused == 2


def test_a_read_that_fetches_a_status_is_never_fused() -> None:
    flow = load_flow(text="nodes:\n  a: {sql: SELECT 1, fetch: none}\n  b: {sql: SELECT 2, fetch: value}\n", name="s")
    assert not flow.nodes["a"].sql.fuse and flow.nodes["b"].sql.fuse
