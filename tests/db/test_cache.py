"""`cache:` and `invalidates:`: the value cache (`planner.db.cache`), on its own and in a Planner."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from planner import CallOptions, FlowFailed, FlowFileError, NodeResult, NodeState, Planner, QueryError, load_flow
from planner.db.cache import CacheBackend
from planner.db.pool import PoolBackend
from planner.graph import CompiledFlow
from planner.kinds.backend import Offline, Query, freeze, private_copy
from tests.support.spies import Counting

# This module is about another mechanism: nodes run as they would without compiled groups.
pytestmark = pytest.mark.usefixtures("uncompiled")

Write = Callable[..., Path]


# --- helpers --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Fake(Offline):
    """An inner backend without a database: answers `{"v": <first parameter>, "tags": [...]}`,
    counts what reaches it, and can be held at a gate or made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[Any] = Counter()
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.cancelled = 0

    async def run(self, query: Query) -> Any:
        self.calls[(query.node.name, repr(query.params))] += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        return {"v": query.params[0][0] if query.params[0] else None, "tags": ["a", {"deep": [1]}]}

    @property
    def sent(self) -> int:
        return sum(self.calls.values())


TWO = """
inputs: {x: json}
nodes:
  a: {sql: "SELECT $x AS v", fetch: one, cache: 10s}
  b: {sql: "SELECT $x AS v", fetch: one, cache: 1s}
"""


def _flow(text: str = TWO, name: str = "f") -> CompiledFlow:
    return load_flow(text=text, name=name)


def _cached(node: NodeResult) -> bool:
    """Whether an SQL node's value came from the cache (every SQL node says how it was served)."""
    assert node.served is not None, "an SQL node without `served`"
    return node.served.cached


def _query(flow: CompiledFlow, node: str, *params: Any) -> Query:
    return Query(flow.nodes[node], [list(params)])


# --- keys and copies (no database) ------------------------------------------------------------


def test_keys_keep_the_parameter_types_and_hash_lists_and_dicts() -> None:
    assert len({freeze(1), freeze(1.0), freeze(True), freeze("1"), freeze(decimal.Decimal(1))}) == 5
    assert freeze([1, [2, {"a": [3]}]]) == freeze([1, [2, {"a": [3]}]])
    assert freeze([1, 2]) != freeze((1, 2)) and freeze({"a": 1, "b": 2}) != freeze({"a": 1, "b": 3})
    hash(freeze([[1, {"a": [None, "x"]}], dt.date(2024, 1, 1)]))


def test_private_copies_share_nothing_mutable() -> None:
    when = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    value: list[dict[str, Any]] = [{"id": 1, "at": when, "meta": {"tags": ["x"]}, "pair": (1, [2])}]
    twin: list[dict[str, Any]] = private_copy(value)
    assert twin == value and twin is not value
    assert twin[0] is not value[0] and twin[0]["meta"]["tags"] is not value[0]["meta"]["tags"]
    assert twin[0]["pair"][1] is not value[0]["pair"][1]
    assert twin[0]["at"] is when  # immutable values are shared, not copied
    assert private_copy("text") == "text" and private_copy(None) is None


async def test_a_hit_sends_nothing_and_says_so() -> None:
    fake, flow = Fake(), _flow()
    cache = CacheBackend(fake, enabled=True)
    first, second = _query(flow, "a", 1), _query(flow, "a", 1)
    assert await cache.run(first) == {"v": 1, "tags": ["a", {"deep": [1]}]}
    assert await cache.run(second) == {"v": 1, "tags": ["a", {"deep": [1]}]}
    assert fake.sent == 1 and first.served.cached is False and second.served.cached is True
    await cache.run(_query(flow, "a", 2))  # other parameters: another value
    await cache.run(_query(flow, "b", 1))  # another node: its own values
    assert fake.sent == 3
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.size, stats.enabled) == (1, 3, 3, True)


async def test_values_expire_after_the_nodes_duration() -> None:
    fake, flow, clock = Fake(), _flow(), Clock()
    cache = CacheBackend(fake, timer=clock, enabled=True)
    await cache.run(_query(flow, "a", 1))
    await cache.run(_query(flow, "b", 1))
    clock.now += 0.999
    await cache.run(_query(flow, "a", 1))
    await cache.run(_query(flow, "b", 1))
    assert fake.sent == 2
    clock.now += 0.002  # b (1s) has expired, a (10s) has not
    assert cache.stats().size == 1
    await cache.run(_query(flow, "a", 1))
    await cache.run(_query(flow, "b", 1))
    assert fake.sent == 3
    clock.now += 10
    await cache.run(_query(flow, "a", 1))
    assert fake.sent == 4


async def test_the_cache_is_bounded_and_evicts_the_least_recently_used() -> None:
    fake, flow = Fake(), _flow()
    cache = CacheBackend(fake, maxsize=2, enabled=True)
    for x in (1, 2):
        await cache.run(_query(flow, "a", x))
    await cache.run(_query(flow, "a", 1))  # 1 is now more recently used than 2
    await cache.run(_query(flow, "a", 3))  # evicts 2
    assert cache.stats().size == 2
    await cache.run(_query(flow, "a", 1))
    assert fake.sent == 3
    await cache.run(_query(flow, "a", 2))
    assert fake.sent == 4


async def test_a_kept_value_changed_by_one_run_is_unchanged_for_the_next() -> None:
    fake, flow = Fake(), _flow()
    cache = CacheBackend(fake, enabled=True)
    first = await cache.run(_query(flow, "a", 1))
    first["tags"][1]["deep"].append("changed by run 1")
    second = await cache.run(_query(flow, "a", 1))
    second["v"] = "changed by run 2"
    third = await cache.run(_query(flow, "a", 1))
    assert third == {"v": 1, "tags": ["a", {"deep": [1]}]} and fake.sent == 1


async def test_concurrent_misses_send_one_statement() -> None:
    fake, flow = Fake(), _flow()
    fake.gate = asyncio.Event()
    cache = CacheBackend(fake, enabled=True)
    queries = [_query(flow, "a", [1, 2]) for _ in range(10)]
    runs = [asyncio.ensure_future(cache.run(q)) for q in queries]
    await asyncio.sleep(0.01)
    fake.gate.set()
    values = await asyncio.gather(*runs)
    assert fake.sent == 1
    assert all(v == {"v": [1, 2], "tags": ["a", {"deep": [1]}]} for v in values)
    assert len({id(v) for v in values}) == 10  # each run its own copy
    assert [q.served.cached for q in queries] == [False] + [True] * 9
    stats = cache.stats()
    assert (stats.misses, stats.joined, stats.hits) == (1, 9, 0)


async def test_a_failure_is_each_waiters_own_and_never_kept() -> None:
    fake, flow = Fake(), _flow()
    fake.gate, fake.fail = asyncio.Event(), QueryError("relation does not exist", sqlstate="42P01")
    cache = CacheBackend(fake, enabled=True)
    runs = [asyncio.ensure_future(cache.run(_query(flow, "a", 1))) for _ in range(3)]
    await asyncio.sleep(0.01)
    fake.gate.set()
    errors = await asyncio.gather(*runs, return_exceptions=True)
    assert fake.sent == 1
    assert all(isinstance(e, QueryError) and e.sqlstate == "42P01" and str(e) == "relation does not exist" for e in errors)
    assert len({id(e) for e in errors}) == 3
    assert cache.stats().size == 0
    fake.gate, fake.fail = None, None
    assert (await cache.run(_query(flow, "a", 1)))["v"] == 1  # asked again, and now kept
    assert fake.sent == 2 and cache.stats().size == 1


async def test_a_waiter_that_gives_up_leaves_the_others_waiting() -> None:
    fake, flow = Fake(), _flow()
    fake.gate = asyncio.Event()
    cache = CacheBackend(fake, enabled=True)
    first = asyncio.ensure_future(cache.run(_query(flow, "a", 1)))
    second = asyncio.ensure_future(cache.run(_query(flow, "a", 1)))
    await asyncio.sleep(0.01)
    first.cancel()  # the run that sent the statement gives up (its deadline, say)
    await asyncio.sleep(0.01)
    fake.gate.set()
    assert (await second)["v"] == 1 and first.cancelled()
    assert fake.sent == 1 and fake.cancelled == 0 and cache.stats().size == 1


async def test_the_statement_is_cancelled_when_nobody_waits_any_more() -> None:
    fake, flow = Fake(), _flow()
    fake.gate = asyncio.Event()
    cache = CacheBackend(fake, enabled=True)
    runs = [asyncio.ensure_future(cache.run(_query(flow, "a", 1))) for _ in range(2)]
    await asyncio.sleep(0.01)
    for run in runs:
        run.cancel()
    await asyncio.sleep(0.01)
    assert fake.cancelled == 1 and cache.stats().size == 0
    fake.gate.set()
    assert (await cache.run(_query(flow, "a", 1)))["v"] == 1  # a fresh miss, not the cancelled one
    assert fake.sent == 2


async def test_a_value_read_before_an_invalidation_is_handed_out_but_not_kept() -> None:
    fake, flow = Fake(), _flow()
    fake.gate = asyncio.Event()
    cache = CacheBackend(fake, enabled=True)
    before = asyncio.ensure_future(cache.run(_query(flow, "a", 1)))
    await asyncio.sleep(0.01)
    cache.invalidate("a")  # a write ended while the read was in flight
    after = asyncio.ensure_future(cache.run(_query(flow, "a", 1)))  # must not join the old read
    await asyncio.sleep(0.01)
    fake.gate.set()
    assert (await before)["v"] == 1 and (await after)["v"] == 1
    assert fake.sent == 2 and cache.stats().size == 1


async def test_invalidate_by_node_by_flow_and_all() -> None:
    fake, f, g = Fake(), _flow(name="f"), _flow(name="g")
    cache = CacheBackend(fake, enabled=True)

    async def fill() -> None:
        for flow in (f, g):
            for node in ("a", "b"):
                for x in (1, 2):
                    await cache.run(_query(flow, node, x))

    await fill()
    assert cache.stats().size == 8 and fake.sent == 8
    assert cache.invalidate("a", flow="f") == 2
    assert cache.invalidate("a") == 2  # g's a; f's a is gone already
    assert cache.invalidate(flow="g") == 2  # g's b
    assert cache.stats().size == 2
    await fill()
    assert fake.sent == 14  # only the two values of f.b were still kept
    assert cache.invalidate() == 8 and cache.stats().size == 0
    stats = cache.stats()
    assert (stats.invalidations, stats.dropped) == (4, 14)


async def test_unhashable_parameters_run_uncached() -> None:
    fake, flow = Fake(), _flow()
    cache = CacheBackend(fake, enabled=True)
    odd = {1, 2}  # a set: not hashable, whatever we do with it
    for _ in range(2):
        await cache.run(_query(flow, "a", odd))
    assert fake.sent == 2 and cache.stats().uncacheable == 2


async def test_uncached_nodes_and_a_switched_off_cache_pass_straight_through() -> None:
    fake = Fake()
    flow = _flow("inputs: {x: int}\nnodes:\n  a: {sql: SELECT $x, fetch: value}\n")
    cache = CacheBackend(fake, enabled=True)
    for _ in range(2):
        await cache.run(_query(flow, "a", 1))
    off = CacheBackend(fake, enabled=False)
    cached = _flow()
    for _ in range(2):
        query = _query(cached, "a", 1)
        await off.run(query)
        assert query.served.cached is False
    assert fake.sent == 4 and cache.stats().misses == 0 and off.stats().enabled is False


def test_planner_cache_0_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, on in (("0", False), ("false", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv("PLANNER_CACHE", value)
        assert Planner(flows=Path(__file__).parent).cache_stats().enabled is on


def test_a_cache_backend_is_on_unless_told_whatever_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNER_CACHE", "0")  # the environment is the facade's to read (`Settings.from_env`)
    assert CacheBackend(Fake()).enabled is True and CacheBackend(Fake(), enabled=False).enabled is False


# --- loading: where cache: and invalidates: may be written --------------------------------------


def _load_error(text: str) -> FlowFileError:
    with pytest.raises(FlowFileError) as info:
        load_flow(text=text, name="bad")
    return info.value


def test_cache_on_a_write_is_refused_at_load() -> None:
    error = _load_error("nodes:\n  a: {sql: \"SELECT 1\", fetch: value}\n  w:\n    sql: UPDATE t SET x = 1\n    cache: 30s\n")
    assert error.node == "w" and error.line == 5 and error.code == "PLN130"
    assert str(error).startswith("<bad>:5:") and "not proven read-only" in str(error)


@pytest.mark.parametrize(("sql", "why"), [
    ("[SELECT 1, SELECT 2]", "statement list"),
    ("SELECT id FROM t FOR UPDATE", "not proven read-only"),
    ("SELECT nextval('s')", "not proven read-only"),
    ("WITH d AS (DELETE FROM t RETURNING id) SELECT * FROM d", "not proven read-only"),
    ("SELEC 1", "does not parse"),
])
def test_cache_needs_one_read_only_statement(sql: str, why: str) -> None:
    error = _load_error(f"nodes:\n  a:\n    sql: {sql}\n    cache: 1s\n")
    assert error.node == "a" and why in str(error)


def test_cache_is_a_duration_and_only_on_sql_nodes() -> None:
    assert "bad duration" in str(_load_error("nodes:\n  a: {sql: SELECT 1, cache: 30}\n"))
    assert _load_error("nodes:\n  a: {call: tests.nodes:echo, cache: 1s}\n").node == "a"
    assert load_flow(text="nodes:\n  a: {sql: SELECT 1, cache: 1.5m}\n").nodes["a"].sql.cache_ttl == 90.0


def test_invalidates_names_cached_nodes_of_the_flow() -> None:
    head = "nodes:\n  instance: {sql: SELECT 1, cache: 30s}\n  plain: {sql: SELECT 2}\n"
    error = _load_error(head + "  w: {sql: UPDATE t SET x = 1, invalidates: [instanse]}\n")
    assert error.node == "w" and error.line == 4 and "unknown node 'instanse' (did you mean 'instance'?)" in str(error)
    error = _load_error(head + "  w: {sql: UPDATE t SET x = 1, invalidates: [plain]}\n")
    assert "node 'plain' has no cache:" in str(error) and "cached nodes: instance" in str(error)
    flow = load_flow(text=head + "  w: {sql: UPDATE t SET x = 1, invalidates: [instance]}\n"
                              "  c: {call: tests.nodes:echo, invalidates: [instance, instance]}\n", name="ok")
    assert flow.nodes["w"].invalidates == ("instance",) and flow.nodes["c"].invalidates == ("instance",)
    assert flow.nodes["instance"].flow == "ok" and flow.nodes["plain"].sql.cache_ttl is None


# --- in a Planner, on the real database -----------------------------------------------------------


@pytest.fixture
async def counted(tmp_path: Path, demo_dsn: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Planner, Counting]]:
    monkeypatch.delenv("PLANNER_CACHE", raising=False)
    counting = Counting(PoolBackend(dsn=demo_dsn))
    async with Planner(flows=tmp_path, backend=counting, call_options=CallOptions(allowed_modules=["tests"])) as planner:
        yield planner, counting


@pytest.fixture
async def con(demo_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(demo_dsn)
    yield connection
    await connection.close()


INSTANCE = """
inputs: {name: str, threshold: {type: int, default: 5}}
nodes:
  instance:
    sql: SELECT id, escalation_threshold AS threshold, escalation_keywords AS keywords FROM whatsapp_instances WHERE instance_name = $name
    fetch: one
    cache: 30s
  edit:
    sql: UPDATE whatsapp_instances SET escalation_threshold = $threshold WHERE id = $instance.id
    fetch: none
    when: $threshold != 5
    invalidates: [instance]
"""


async def test_a_planner_serves_repeated_reads_from_the_cache(write_flow: Write, counted: tuple[Planner, Counting]) -> None:
    planner, counting = counted
    write_flow(INSTANCE)
    first = await planner.run("t", {"name": "acme"})
    second = await planner.run("t", {"name": "acme"})
    other = await planner.run("t", {"name": "quiet"})
    assert first.values["instance"] == second.values["instance"] and first.values["instance"]["id"] == 1
    assert counting.sent["instance"] == 2  # acme once, quiet once
    assert _cached(first.nodes["instance"]) is False and _cached(second.nodes["instance"]) is True
    assert _cached(other.nodes["instance"]) is False
    assert second.to_json()["nodes"]["instance"]["served"]["cached"] is True
    stats = planner.cache_stats()
    assert (stats.hits, stats.misses, stats.size) == (1, 2, 2)


async def test_parameters_python_calls_equal_but_sent_differently_are_cached_apart(
        write_flow: Write, counted: tuple[Planner, Counting]) -> None:
    # Decimal("2.5") == Decimal("2.50") and 0.0 == -0.0 in Python, but the server gets (and
    # returns) two values: the second of each pair must not be served the first's.
    planner, counting = counted
    write_flow("""
        inputs: {dec: json, flo: json}
        nodes:
          d: {sql: "SELECT $dec::numeric::text", fetch: value, cache: 30s}
          f: {sql: "SELECT $flo::float8::text", fetch: value, cache: 30s}
        """)
    first = await planner.run("t", {"dec": decimal.Decimal("2.5"), "flo": 0.0})
    second = await planner.run("t", {"dec": decimal.Decimal("2.50"), "flo": -0.0})
    assert (first.values, second.values) == ({"d": "2.5", "f": "0"}, {"d": "2.50", "f": "-0"})
    assert counting.sent == {"d": 2, "f": 2}


async def test_a_nan_parameter_is_served_from_the_cache(write_flow: Write, counted: tuple[Planner, Counting]) -> None:
    # No NaN equals another in Python; every one of them is sent as NaN.
    planner, counting = counted
    write_flow("inputs: {x: json}\nnodes:\n  q: {sql: 'SELECT $x::float8::text AS t', fetch: value, cache: 30s}\n")
    results = [await planner.run("t", {"x": float("nan")}) for _ in range(2)]
    assert [r.values["q"] for r in results] == ["NaN", "NaN"]
    assert counting.sent["q"] == 1 and _cached(results[1].nodes["q"])


async def test_a_value_changed_by_one_run_is_not_seen_by_the_next(write_flow: Write, counted: tuple[Planner, Counting]) -> None:
    planner, _ = counted
    write_flow("""
        inputs: {name: str}
        nodes:
          instance: {sql: "SELECT id, escalation_keywords AS keywords FROM whatsapp_instances WHERE instance_name = $name", fetch: one, cache: 30s}
        """)
    first = await planner.run("t", {"name": "acme"})
    original = json.loads(json.dumps(first.values["instance"]))
    first.values["instance"]["keywords"].append("mutated")
    first.values["instance"]["id"] = -1
    second = await planner.run("t", {"name": "acme"})
    assert _cached(second.nodes["instance"]) is True and second.values["instance"] == original


async def test_values_expire(write_flow: Write, counted: tuple[Planner, Counting]) -> None:
    planner, counting = counted
    write_flow("nodes:\n  now: {sql: SELECT now()::text AS t, fetch: value, cache: 200ms}\n")
    first = (await planner.run("t")).values["now"]
    assert (await planner.run("t")).values["now"] == first
    await asyncio.sleep(0.5)  # generously past the 200ms (the fake clock tests expiry exactly)
    assert (await planner.run("t")).values["now"] != first and counting.sent["now"] == 2


async def test_planner_invalidate(write_flow: Write, counted: tuple[Planner, Counting], con: asyncpg.Connection) -> None:
    planner, counting = counted
    write_flow(INSTANCE)
    write_flow(INSTANCE, name="u")
    await planner.run("t", {"name": "acme"})
    await planner.run("u", {"name": "acme"})
    await con.execute("UPDATE whatsapp_instances SET escalation_threshold = 9 WHERE id = 1")
    assert (await planner.run("t", {"name": "acme"})).values["instance"]["threshold"] == 3  # stale, as asked for
    assert planner.invalidate("instance", flow="t") == 1
    assert (await planner.run("t", {"name": "acme"})).values["instance"]["threshold"] == 9
    assert (await planner.run("u", {"name": "acme"})).values["instance"]["threshold"] == 3
    assert planner.invalidate() == 2
    assert (await planner.run("u", {"name": "acme"})).values["instance"]["threshold"] == 9
    assert counting.sent["instance"] == 4


async def test_a_write_that_ends_ok_drops_what_it_invalidates(write_flow: Write, counted: tuple[Planner, Counting]) -> None:
    planner, counting = counted
    write_flow(INSTANCE)
    assert (await planner.run("t", {"name": "acme"})).values["instance"]["threshold"] == 3
    edited = await planner.run("t", {"name": "acme", "threshold": 7})
    assert _cached(edited.nodes["instance"]) is True and edited.nodes["edit"].state is NodeState.OK
    after = await planner.run("t", {"name": "acme"})
    assert after.values["instance"]["threshold"] == 7 and _cached(after.nodes["instance"]) is False
    assert counting.sent["instance"] == 2
    assert planner.cache_stats().invalidations == 1


async def test_a_write_that_fails_or_defaults_drops_nothing(write_flow: Write, counted: tuple[Planner, Counting]) -> None:
    planner, counting = counted
    write_flow(INSTANCE.replace("$threshold WHERE", "$threshold / 0 WHERE"))  # division by zero: defaulted
    write_flow(INSTANCE.replace("$threshold WHERE", "$threshold / 0 WHERE").replace("invalidates", "on_error: fail\n    invalidates"),
               name="u")
    await planner.run("t", {"name": "acme"})
    defaulted = await planner.run("t", {"name": "acme", "threshold": 7})
    assert defaulted.nodes["edit"].state is NodeState.DEFAULTED
    assert _cached((await planner.run("t", {"name": "acme"})).nodes["instance"]) is True
    await planner.run("u", {"name": "acme"})
    with pytest.raises(FlowFailed) as info:
        await planner.run("u", {"name": "acme", "threshold": 7})
    assert info.value.result.nodes["edit"].state is NodeState.FAILED
    assert _cached((await planner.run("u", {"name": "acme"})).nodes["instance"]) is True
    assert counting.sent["instance"] == 2 and planner.cache_stats().invalidations == 0


async def test_a_call_node_can_invalidate_too(write_flow: Write, counted: tuple[Planner, Counting]) -> None:
    planner, counting = counted
    write_flow(INSTANCE + """
  notify:
    call: tests.nodes:echo
    with: {value: $instance.id}
    when: $threshold == 6
    invalidates: [instance]
""")
    await planner.run("t", {"name": "acme"})
    await planner.run("t", {"name": "acme", "threshold": 6})  # the edit and the call both drop it
    assert (await planner.run("t", {"name": "acme"})).values["instance"]["threshold"] == 6
    assert counting.sent["instance"] == 2 and planner.cache_stats().invalidations == 2


async def test_concurrent_runs_send_one_statement(write_flow: Write, counted: tuple[Planner, Counting]) -> None:
    planner, counting = counted
    write_flow("""
        inputs: {name: str}
        nodes:
          slow:   # a read that takes a few tens of milliseconds: every run asks while it is in flight
            sql: SELECT id, escalation_keywords, (SELECT count(*) FROM generate_series(1, 300000)) AS n FROM whatsapp_instances WHERE instance_name = $name
            fetch: one
            cache: 30s
        """)
    await planner.backend.open()
    results = await asyncio.gather(*(planner.run("t", {"name": "acme"}) for _ in range(20)))
    assert counting.sent["slow"] == 1
    assert len({id(r.values["slow"]) for r in results}) == 20
    assert all(r.values["slow"] == results[0].values["slow"] for r in results)
    assert sum(_cached(r.nodes["slow"]) for r in results) == 19
    stats = planner.cache_stats()
    assert (stats.misses, stats.joined, stats.hits) == (1, 19, 0)


async def test_errors_and_defaults_are_never_kept(write_flow: Write, counted: tuple[Planner, Counting], con: asyncpg.Connection) -> None:
    planner, counting = counted
    write_flow("""
        nodes:
          later: {sql: "SELECT count(*) AS n FROM appears_later", fetch: one, cache: 30s, default: {n: -1}, on_bug: default}
        """)
    first = await planner.run("t")
    assert first.nodes["later"].state is NodeState.DEFAULTED and first.values["later"] == {"n": -1}
    await con.execute("CREATE TABLE appears_later (id int)")
    second = await planner.run("t")
    assert second.nodes["later"].state is NodeState.OK and second.values["later"] == {"n": 0}
    assert _cached(second.nodes["later"]) is False
    assert _cached((await planner.run("t")).nodes["later"]) is True
    assert counting.sent["later"] == 2


async def test_a_switched_off_cache_runs_every_time(write_flow: Write, demo_dsn: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNER_CACHE", "0")
    monkeypatch.setenv("PLANNER_MODE", "sequential")
    write_flow(INSTANCE)
    counting = Counting(PoolBackend(dsn=demo_dsn))
    async with Planner(flows=tmp_path, backend=counting) as planner:
        for threshold in (5, 5, 8, 5):
            result = await planner.run("t", {"name": "acme", "threshold": threshold})
            assert _cached(result.nodes["instance"]) is False
        assert result.values["instance"]["threshold"] == 8
        assert counting.sent["instance"] == 4
        stats = planner.cache_stats()
        assert stats.enabled is False and (stats.hits, stats.misses, stats.invalidations) == (0, 0, 0)


async def test_sequential_mode_still_uses_the_cache(write_flow: Write, counted: tuple[Planner, Counting],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, counting = counted
    monkeypatch.setenv("PLANNER_MODE", "sequential")  # read by the Planner made next
    write_flow(INSTANCE)
    async with Planner(flows=tmp_path, backend=counting, call_options=CallOptions(allowed_modules=["tests"])) as planner:
        for _ in range(3):
            result = await planner.run("t", {"name": "acme"})
    assert result.mode == "sequential" and counting.sent["instance"] == 1


@pytest.mark.subprocess  # runs the planner command
def test_run_json_reports_the_cache(demo_dsn: str, tmp_path: Path) -> None:
    from tests.support.cli import cli

    proc = cli("run", "escalation", "-i", "instance_id=1", "-i", "user_phone=+15550000001", "-i", "message=hi",
               "--json", "--db", demo_dsn, env={"PLANNER_HOME": str(tmp_path / "home"), "PLANNER_CACHE": "1"})
    assert proc.returncode == 0, proc.stderr
    cache = json.loads(proc.stdout)["cache"]
    assert cache["enabled"] is True and cache["misses"] == 1 and cache["hits"] == 0 and cache["size"] == 1
