"""Coalescing (#11): runs that would wait for a connection share one statement, and each run
gets exactly what it would have got alone.

Batches are forced deterministically: every connection of the pool is held by a statement
blocked on a table lock the test holds (a gate); N runs start, and once all N have reached
the coalescer (they wait, so they have joined one batch) the gate opens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from planner import FlowResult, NodeState, NodeTimeout, Planner, PoolOptions, QueryError
from planner.db.coalesce import MAX_WRITE_BATCH, CoalescingBackend
from planner.db.pool import PoolBackend
from planner.kinds.backend import Query
from tests.support.stacks import (
    HOLD,
    Stack,
    Write,
    fetch_rows,
    outcome,
    run_ddl,
    until,
)

# This module is about another mechanism: nodes run as they would without compiled groups.
pytestmark = pytest.mark.usefixtures("uncompiled")

def summary(result: FlowResult) -> dict[str, tuple[Any, ...]]:
    """What a run must give with or without coalescing: per node its state, value, attempts,
    and its error's type, SQLSTATE and message."""
    out: dict[str, tuple[Any, ...]] = {}
    for name, node in result.nodes.items():
        error = node.error
        out[name] = (node.state, node.value, node.attempts, type(error).__name__ if error else None,
                     getattr(error, "sqlstate", None), str(error) if error else None)
    return out


async def alone(planner: Planner, runs: Iterable[tuple[str, dict[str, Any]]]) -> list[FlowResult]:
    """Each run on its own, one after the other (the planner's coalescing is off)."""
    return [await outcome(planner.run(flow, inputs)) for flow, inputs in runs]


# --- sharing a statement ---------------------------------------------------------------


async def test_runs_that_wait_for_a_connection_share_one_statement(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("inputs: {n: int}\nnodes:\n  q: {sql: 'SELECT $n::int * 2 AS doubled', fetch: value}\n")
    stack = stacks(size=1)
    results = await stack.batched(("t", {"n": n}) for n in range(5))
    assert [r.values["q"] for r in results] == [0, 2, 4, 6, 8]
    assert stack.spy.sent == [[[0], [1], [2], [3], [4]]]
    assert stack.coalescer.batches == 1
    await stack.assert_clean()


async def test_served_batch_says_how_many_runs_shared_the_statement(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("inputs: {n: int}\nnodes:\n  q: {sql: 'SELECT $n::int AS n', fetch: value}\n")
    stack = stacks(size=1)
    results = await stack.batched(("t", {"n": n}) for n in range(4))
    served = [r.nodes["q"].served for r in results]
    assert all(s is not None and s.batch == 4 for s in served)


FETCHES = {
    # many rows, zero rows; numeric, timestamps, json, arrays, nulls
    "all": """
      SELECT g AS i, (g * 1.25)::numeric(10, 2) AS x,
             timestamptz '2024-01-01 00:00:00+00' + g * interval '1 hour' AS at,
             jsonb_build_object('g', g, 'tags', jsonb_build_array('a', g)) AS doc,
             ARRAY[g, $k::int] AS pair, NULL::text AS nothing
      FROM generate_series(1, $k::int) AS g ORDER BY g DESC""",
    # a row or none
    "one": "SELECT id, instance_name, escalation_keywords FROM whatsapp_instances WHERE id = $k::int",
    # a value, or null when there is no row or it is null
    "value": "SELECT nullif($k::int, 2) * 10 FROM generate_series(1, least($k::int, 1))",
}


@pytest.mark.parametrize("fetch", ["all", "one", "value"])
async def test_each_run_gets_its_own_result_as_alone(write_flow: Write, stacks: Callable[..., Stack], fetch: str) -> None:
    sql = "\n".join("      " + line.strip() for line in FETCHES[fetch].strip().splitlines())
    write_flow(f"inputs: {{k: int}}\nnodes:\n  q:\n    sql: |\n{sql}\n    fetch: {fetch}\n")
    runs = [("t", {"k": k}) for k in (0, 1, 2, 3, 7, 40)]
    expected = await alone(stacks(size=1, enabled=False).planner, runs)
    stack = stacks(size=1)
    results = await stack.batched(runs)
    assert [r.values["q"] for r in results] == [r.values["q"] for r in expected]
    assert {r.nodes["q"].served.batch for r in results} == {6}  # type: ignore[union-attr]
    if fetch == "all":
        assert len(results[-1].values["q"]) == 40 and results[0].values["q"] == []
    await stack.assert_clean()


async def test_a_request_that_finds_a_free_connection_goes_at_once_direct(write_flow: Write,
                                                                       stacks: Callable[..., Stack]) -> None:
    write_flow("inputs: {n: int}\nnodes:\n  q: {sql: 'SELECT $n::int AS n', fetch: value}\n")
    stack = stacks(size=2)
    stack.load("t")
    results = await asyncio.gather(*(stack.planner.run("t", {"n": n}) for n in range(2)))  # two runs, two connections
    assert [r.values["q"] for r in results] == [0, 1]
    # Straight through to the pool: no batch was made, so no timer or task stood in between.
    assert stack.coalescer.direct == 2 and stack.spy.sent == [] and stack.spy.single == [[0], [1]]
    assert all(r.nodes["q"].served.batch == 1 for r in results)  # type: ignore[union-attr]


async def test_a_burst_before_the_pool_is_open_still_coalesces(pg_dsn: str) -> None:
    # The first runs of a service reach a pool that is still connecting: they must see each
    # other there, or every one of them finds the pool "idle" and goes alone.
    from planner import load_flow

    node = load_flow(text="inputs: {n: int}\nnodes:\n  q: {sql: 'SELECT $n::int AS n', fetch: value}\n",
                     name="burst").nodes["q"]
    pool = PoolBackend(dsn=pg_dsn, min_size=4, max_size=4)
    coalescer = CoalescingBackend(pool, batches=pool)
    try:
        values = await asyncio.gather(*(coalescer.run(Query(node, [[n]])) for n in range(40)))
    finally:
        await pool.close()
    assert values == list(range(40))
    assert coalescer.direct <= 4  # one per connection; the other runs shared batches
    assert coalescer.batches >= 1


async def test_identical_reads_in_a_batch_are_sent_once(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("inputs: {n: int}\nnodes:\n  q: {sql: 'SELECT $n::int + 1 AS m', fetch: value}\n")
    stack = stacks(size=1)
    results = await stack.batched(("t", {"n": n}) for n in (5, 5, 7, 5))
    assert [r.values["q"] for r in results] == [6, 6, 8, 6]
    assert stack.spy.sent == [[[5], [7]]]
    assert {r.nodes["q"].served.batch for r in results} == {4}  # type: ignore[union-attr]


async def test_runs_that_shared_a_read_get_values_of_their_own(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("""
        inputs: {n: int}
        nodes:
          q: {sql: "SELECT g, jsonb_build_object('n', $n::int, 'l', jsonb_build_array(g)) AS doc FROM generate_series(1, 2) g", fetch: all}
        """)
    stack = stacks(size=1)
    first, second = await stack.batched([("t", {"n": 1}), ("t", {"n": 1})])
    assert stack.spy.sent == [[[1]]]
    first.values["q"].append({"g": 99})
    first.values["q"][0]["doc"]["l"].append("mutated")
    assert second.values["q"] == [{"g": 1, "doc": {"n": 1, "l": [1]}}, {"g": 2, "doc": {"n": 1, "l": [2]}}]


async def test_parameters_python_calls_equal_but_sent_differently_are_not_shared(
        write_flow: Write, stacks: Callable[..., Stack]) -> None:
    # 1 == True, Decimal("2.5") == Decimal("2.50") and 0.0 == -0.0 in Python, but not on the wire.
    for name, cast in (("b", "bool"), ("n", "numeric"), ("f", "float8")):
        write_flow(f"inputs: {{x: json}}\nnodes:\n  q: {{sql: 'SELECT $x::{cast}::text AS t', fetch: value}}\n", name=name)
    runs: list[tuple[str, dict[str, Any]]] = [("b", {"x": True}), ("b", {"x": 1}), ("n", {"x": Decimal("2.5")}), ("n", {"x": Decimal("2.50")}),
            ("f", {"x": 0.0}), ("f", {"x": -0.0})]
    expected = await alone(stacks(size=1, enabled=False).planner, runs)
    stack = stacks(size=1)
    results = await stack.batched(runs)
    assert [summary(r) for r in results] == [summary(r) for r in expected]
    assert [r.values["q"] for r in results] == ["true", None, "2.5", "2.50", "0", "-0"]


async def test_a_statement_alias_does_not_capture_the_batch_parameters(write_flow: Write,
                                                                      stacks: Callable[..., Stack]) -> None:
    # The statement's own alias `b` with a column `p1`: the batch's parameters must not be read from it.
    write_flow("inputs: {v: int}\nnodes:\n  q: {sql: 'SELECT b.p1 + $v::int AS n FROM (VALUES (100)) AS b(p1)', fetch: value}\n")
    stack = stacks(size=1)
    results = await stack.batched(("t", {"v": v}) for v in (1, 2, 3))
    assert [r.values["q"] for r in results] == [101, 102, 103]
    assert len(stack.combined()) == 1 and stack.failed() == []


async def test_a_statement_ending_in_a_semicolon_or_a_comment_is_still_shared(write_flow: Write,
                                                                              stacks: Callable[..., Stack]) -> None:
    write_flow("inputs: {v: int}\nnodes:\n  q:\n    sql: |\n      SELECT $v::int AS n;\n    fetch: value\n")
    write_flow("inputs: {v: int}\nnodes:\n  q:\n    sql: |\n      SELECT $v::int AS n -- the end\n    fetch: value\n", name="u")
    stack = stacks(size=1)
    results = await stack.batched([("t", {"v": 1}), ("t", {"v": 2}), ("u", {"v": 3}), ("u", {"v": 4})])
    assert [r.values["q"] for r in results] == [1, 2, 3, 4]
    assert len(stack.combined()) == 2 and stack.failed() == []
    assert {r.nodes["q"].served.batch for r in results} == {2}  # type: ignore[union-attr]


async def test_the_same_statement_fetched_differently_is_never_one_batch(write_flow: Write,
                                                                       stacks: Callable[..., Stack]) -> None:
    write_flow("inputs: {n: int}\nnodes:\n  q: {sql: 'SELECT $n::int AS n', fetch: value}\n", name="v")
    write_flow("inputs: {n: int}\nnodes:\n  q: {sql: 'SELECT $n::int AS n', fetch: all}\n", name="a")
    stack = stacks(size=1)
    results = await stack.batched([("v", {"n": 1}), ("a", {"n": 2}), ("v", {"n": 3}), ("a", {"n": 4})])
    assert [r.values["q"] for r in results] == [1, [{"n": 2}], 3, [{"n": 4}]]


async def test_the_same_statement_with_another_timeout_is_never_one_batch(write_flow: Write,
                                                                        stacks: Callable[..., Stack]) -> None:
    sql = "SELECT slow_echo($v::int, $ms::int) AS v"
    write_flow(f"inputs: {{v: int, ms: int}}\nnodes:\n  q: {{sql: '{sql}', fetch: value, timeout: 100ms}}\n", name="quick")
    write_flow(f"inputs: {{v: int, ms: int}}\nnodes:\n  q: {{sql: '{sql}', fetch: value}}\n", name="patient")
    stack = stacks(size=1)
    runs = [("quick", {"v": 1, "ms": 0}), ("patient", {"v": 2, "ms": 250}), ("quick", {"v": 3, "ms": 0})]
    results = await stack.batched(runs)
    assert [r.values["q"] for r in results] == [1, 2, 3]
    assert [r.nodes["q"].state for r in results] == [NodeState.OK] * 3


async def test_a_read_without_parameters_is_sent_once_for_its_batch(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("nodes:\n  q: {sql: 'SELECT array_agg(id ORDER BY id) AS ids FROM whatsapp_instances', fetch: value}\n")
    expected = (await alone(stacks(size=1, enabled=False).planner, [("t", {})]))[0].values["q"]
    stack = stacks(size=1)
    results = await stack.batched(("t", {}) for _ in range(3))
    assert [r.values["q"] for r in results] == [expected] * 3 and len(expected) > 1
    assert stack.spy.sent == [[[]]]
    assert {r.nodes["q"].served.batch for r in results} == {3}  # type: ignore[union-attr]


async def test_a_call_of_a_volatile_function_is_never_shared(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("inputs: {n: int}\nnodes:\n  q: {sql: 'SELECT vol_echo($n::int) AS n', fetch: value}\n")
    stack = stacks(size=1)
    results = await stack.batched(("t", {"n": n}) for n in range(3))
    assert [r.values["q"] for r in results] == [0, 1, 2]
    # Judged by the catalog before it reaches the coalescer (`planner.lang.effects`): no batch is formed.
    assert stack.spy.sent == [] and stack.spy.shared == []
    assert {r.nodes["q"].served.batch for r in results} == {1}  # type: ignore[union-attr]


async def test_an_array_parameter_is_never_flattened_into_a_batch(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("inputs: {xs: list}\nnodes:\n  q: {sql: 'SELECT cardinality($xs::int[]) AS n, $xs::int[] AS xs', fetch: one}\n")
    stack = stacks(size=1)
    results = await stack.batched(("t", {"xs": xs}) for xs in ([1], [1, 2, 3], []))
    assert [r.values["q"] for r in results] == [{"n": 1, "xs": [1]}, {"n": 3, "xs": [1, 2, 3]}, {"n": 0, "xs": []}]
    assert {r.nodes["q"].served.batch for r in results} == {1}  # type: ignore[union-attr]


# --- per-run semantics -------------------------------------------------------------------


BAD_CAST = """
inputs: {v: json}
nodes:
  q: {sql: "SELECT $v::text::int AS n", fetch: value, default: -1}
"""


async def test_a_value_that_breaks_a_cast_on_the_server_fails_only_its_own_run(write_flow: Write,
                                                                              stacks: Callable[..., Stack]) -> None:
    write_flow(BAD_CAST)
    runs = [("t", {"v": v}) for v in ("1", "two", "3", None)]
    expected = await alone(stacks(size=1, enabled=False).planner, runs)
    stack = stacks(size=1)
    results = await stack.batched(runs)
    assert [summary(r) for r in results] == [summary(r) for r in expected]
    assert [r.nodes["q"].state for r in results] == [NodeState.OK, NodeState.DEFAULTED, NodeState.OK, NodeState.OK]
    error = results[1].nodes["q"].error
    assert isinstance(error, QueryError) and error.sqlstate == "22P02"
    assert [r.values["q"] for r in results] == [1, -1, 3, None]


async def test_a_value_the_driver_cannot_send_fails_only_its_own_run(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("inputs: {v: json}\nnodes:\n  q: {sql: 'SELECT $v::int + 1 AS n', fetch: value, default: -1}\n")
    runs = [("t", {"v": v}) for v in (1, "2", 3, [4])]
    expected = await alone(stacks(size=1, enabled=False).planner, runs)
    stack = stacks(size=1)
    results = await stack.batched(runs)
    assert [summary(r) for r in results] == [summary(r) for r in expected]
    assert [r.values["q"] for r in results] == [2, -1, 4, -1]


async def test_runs_that_shared_an_error_get_errors_of_their_own(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow(BAD_CAST)
    stack = stacks(size=1)
    first, second, third = await stack.batched(("t", {"v": v}) for v in ("x", "x", "3"))
    assert stack.spy.sent == [[["x"], ["3"]]]
    one, two = first.nodes["q"].error, second.nodes["q"].error
    assert isinstance(one, QueryError) and isinstance(two, QueryError)
    assert one is not two and str(one) == str(two) and one.sqlstate == two.sqlstate == "22P02"
    assert third.values["q"] == 3


async def test_runs_whose_batch_failed_as_a_whole_get_errors_of_their_own(
        write_flow: Write, stacks: Callable[..., Stack], demo_dsn: str) -> None:
    # A combined write that runs over its timeout is not run again: every member gets the
    # timeout, and each run must raise an object of its own (raising writes its traceback).
    await run_ddl(demo_dsn, "CREATE TABLE slow_notes (id serial PRIMARY KEY, label text NOT NULL)")
    write_flow("""
        inputs: {label: str}
        nodes:
          q:
            sql: "INSERT INTO slow_notes (label) VALUES ($label) RETURNING id, slow_echo(1, 2000) AS v"
            fetch: one
            coalesce: true
            timeout: 200ms
        """)
    stack = stacks(size=1)
    first, second = await stack.batched(("t", {"label": label}) for label in ("a", "b"))
    assert stack.spy.sent == [[["a"], ["b"]]]
    one, two = first.nodes["q"].error, second.nodes["q"].error
    assert isinstance(one, NodeTimeout) and isinstance(two, NodeTimeout)
    assert one is not two and str(one) == str(two)


async def test_a_slow_member_times_out_alone(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("""
        inputs: {v: int, ms: int}
        nodes:
          q: {sql: "SELECT slow_echo($v::int, $ms::int) AS v", fetch: value, timeout: 150ms, default: -1}
        """)
    runs = [("t", {"v": 1, "ms": 0}), ("t", {"v": 2, "ms": 400}), ("t", {"v": 3, "ms": 0})]
    stack = stacks(size=1)
    results = await stack.batched(runs)
    assert [r.values["q"] for r in results] == [1, -1, 3]
    assert [r.nodes["q"].state for r in results] == [NodeState.OK, NodeState.DEFAULTED, NodeState.OK]
    assert isinstance(results[1].nodes["q"].error, NodeTimeout)
    await stack.assert_clean()


async def test_a_cancelled_run_stops_only_its_own_wait(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("inputs: {n: int}\nnodes:\n  q: {sql: 'SELECT slow_echo($n::int, 100) AS n', fetch: value}\n")
    stack = stacks(size=1)
    stack.load("t")
    gate = await stack.hold()
    runs = [asyncio.create_task(stack.planner.run("t", {"n": n})) for n in range(3)]
    await stack.joined(3)
    runs[1].cancel()
    await until(runs[1].done)
    await gate.release()
    done = await asyncio.gather(*runs, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert [r.values["q"] for r in (done[0], done[2])] == [0, 2]  # type: ignore[union-attr]
    assert stack.spy.sent == [[[0], [2]]]  # the run that left was left out of the statement
    await stack.assert_clean()


async def test_a_run_whose_deadline_passes_in_a_batch_times_out_alone(write_flow: Write,
                                                                       stacks: Callable[..., Stack]) -> None:
    node = "nodes:\n  q: {sql: 'SELECT $n::int * 3 AS n', fetch: value}\n"
    write_flow("inputs: {n: int}\nsettings: {timeout: 100ms}\n" + node, name="hurried")
    write_flow("inputs: {n: int}\nsettings: {timeout: 5s}\n" + node, name="calm")
    stack = stacks(size=1)
    stack.load("calm", "hurried")
    gate = await stack.hold()
    runs = [asyncio.create_task(outcome(stack.planner.run(flow, {"n": n})))
            for flow, n in (("calm", 1), ("hurried", 2), ("calm", 3))]
    await stack.joined(3)
    await until(runs[1].done)  # its deadline passed while it waited in the batch
    await gate.release()
    results = await asyncio.gather(*runs)
    assert results[1].status == "timeout" and results[1].nodes["q"].state is NodeState.CANCELLED
    assert [results[0].values["q"], results[2].values["q"]] == [3, 9]
    assert results[0].nodes["q"].served.batch == 2  # type: ignore[union-attr]


async def test_the_statement_is_cancelled_on_the_server_when_nobody_waits(write_flow: Write,
                                                                          stacks: Callable[..., Stack]) -> None:
    write_flow("inputs: {n: int}\nnodes:\n  q: {sql: 'SELECT slow_echo($n::int, 3000) AS n', fetch: value}\n")
    stack = stacks(size=1)
    stack.load("t")
    gate = await stack.hold()
    runs = [asyncio.create_task(stack.planner.run("t", {"n": n})) for n in range(3)]
    await stack.joined(3)
    await gate.release()
    await until(lambda: stack.spy.sent)  # the batch has its connection: its statement is running
    await asyncio.sleep(0.1)
    for run in runs:
        run.cancel()
    await asyncio.gather(*runs, return_exceptions=True)
    started = time.perf_counter()
    await stack.assert_clean()
    assert time.perf_counter() - started < 2.0, "the statement ran on after nobody waited for it"


async def test_a_statement_list_is_never_merged(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("inputs: {n: int}\nnodes:\n  q: {sql: ['SELECT 1', 'SELECT $n::int AS n'], fetch: value}\n")
    stack = stacks(size=1)
    results = await stack.batched(("t", {"n": n}) for n in range(3))
    assert [r.values["q"] for r in results] == [0, 1, 2]
    assert stack.spy.sent == []
    assert {r.nodes["q"].served.batch for r in results} == {1}  # type: ignore[union-attr]


POLICIES = """
inputs: {v: json, k: int}
nodes:
  parsed: {sql: "SELECT $v::text::int AS n", fetch: value, default: -1, retry: {attempts: 3, backoff: 1ms, on: any}}
  only_some: {sql: "SELECT $k::int * 10 AS n", fetch: value, when: "$k > 1"}
  check: {sql: "SELECT 100 / ($parsed::int - 3) AS r", fetch: value, on_error: fail, after: [only_some]}
"""


async def test_retries_when_defaults_and_fail_fast_behave_as_alone(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow(POLICIES)
    given = [("1", 1), ("x", 2), ("3", 3), ("4", 4), ("x", 0), ("3", 1)]
    runs: list[tuple[str, dict[str, Any]]] = [("t", {"v": v, "k": k}) for v, k in given]
    expected = await alone(stacks(size=1, enabled=False).planner, runs)
    stack = stacks(size=1)
    results = await stack.batched(runs, queries=len(runs) + sum(1 for _, k in given if k > 1))  # parsed, only_some
    assert [summary(r) for r in results] == [summary(r) for r in expected]
    assert [r.status for r in results] == [r.status for r in expected] == ["ok", "ok", "failed", "ok", "ok", "failed"]
    assert results[1].nodes["parsed"].attempts == 3
    assert stack.coalescer.batches >= 2


# --- what is coalesced -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["node", "settings", "argument"])
async def test_coalescing_can_be_turned_off(write_flow: Write, stacks: Callable[..., Stack], where: str) -> None:
    node = "  q: {sql: 'SELECT $n::int AS n', fetch: value" + (", coalesce: false}\n" if where == "node" else "}\n")
    settings = "settings: {coalesce: false}\n" if where == "settings" else ""
    write_flow("inputs: {n: int}\n" + settings + "nodes:\n" + node)
    # (PLANNER_COALESCE=0 reaches the stack a Planner builds: the test below)
    stack = stacks(size=1, enabled=where != "argument")
    results = await stack.batched(("t", {"n": n}) for n in range(3))
    assert [r.values["q"] for r in results] == [0, 1, 2]
    assert stack.spy.sent == [] and stack.spy.single[-3:] == [[0], [1], [2]]
    assert {r.nodes["q"].served.batch for r in results} == {1}  # type: ignore[union-attr]


async def test_the_default_planner_coalesces_unless_the_environment_says_no(
        tmp_path: Path, demo_dsn: str, write_flow: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    write_flow(HOLD, name="hold")
    write_flow("inputs: {n: int}\nnodes:\n  q: {sql: 'SELECT $n::int AS n', fetch: value}\n")
    batches: dict[str, set[int]] = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("PLANNER_COALESCE", setting)
        async with Planner(flows=tmp_path, dsn=demo_dsn, pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
            planner.load("t")
            holder = asyncio.create_task(planner.run("hold", {"s": 0.2}))
            await until(lambda: not planner.stack.primary.idle())
            results = await asyncio.gather(*(planner.run("t", {"n": n}) for n in range(3)))
            await holder
            assert [r.values["q"] for r in results] == [0, 1, 2]
            batches[setting] = {r.nodes["q"].served.batch for r in results}  # type: ignore[union-attr]
    assert batches == {"1": {3}, "0": {1}}


async def test_the_statements_remembered_as_unshareable_are_bounded(write_flow: Write,
                                                                   stacks: Callable[..., Stack]) -> None:
    # Flows edited and reloaded bring new statement texts for as long as the process lives.
    # An array parameter makes a read unshareable (unnest would flatten it): the pool says so.
    for k in range(3):
        write_flow(f"inputs: {{xs: list}}\nnodes:\n  q: {{sql: 'SELECT cardinality($xs::int[]) + {k} AS n', "
                   "fetch: value}\n", name=f"v{k}")
    stack = stacks(size=1, max_unshareable=2)
    results = await stack.batched((f"v{k}", {"xs": [7] * n}) for k in range(3) for n in range(2))
    assert [r.values["q"] for r in results] == [0, 1, 1, 2, 2, 3]
    assert stack.spy.shared == [False] * 3  # three batches, none of which could be shared
    assert len(stack.coalescer._unshareable) == 2


async def test_a_write_is_not_coalesced_unless_its_author_opts_in(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("""
        inputs: {label: str}
        nodes:
          q: {sql: "INSERT INTO planner_demo_meta (key, value) VALUES ($label, 'v') RETURNING key", fetch: value}
        """)
    stack = stacks(size=1)
    results = await stack.batched(("t", {"label": f"k{n}"}) for n in range(3))
    assert [r.values["q"] for r in results] == ["k0", "k1", "k2"]
    assert stack.spy.sent == []
    assert {r.nodes["q"].served.batch for r in results} == {1}  # type: ignore[union-attr]


async def test_a_batch_is_bounded(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("inputs: {n: int}\nnodes:\n  q: {sql: 'SELECT $n::int AS n', fetch: value}\n")
    stack = stacks(size=1, max_batch=3)
    results = await stack.batched(("t", {"n": n}) for n in range(7))
    assert [r.values["q"] for r in results] == list(range(7))
    assert [len(members) for members in stack.spy.sent] == [3, 3, 1]
    assert [r.nodes["q"].served.batch for r in results] == [3, 3, 3, 3, 3, 3, 1]  # type: ignore[union-attr]


async def test_a_write_batch_is_bounded_more_tightly(write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow("""
        inputs: {label: str}
        nodes:
          q: {sql: "INSERT INTO planner_demo_meta (key, value) VALUES ($label, 'v') RETURNING key", fetch: value, coalesce: true}
        """)
    stack = stacks(size=1)
    n = MAX_WRITE_BATCH + 2
    results = await stack.batched(("t", {"label": f"k{i:03d}"}) for i in range(n))
    assert [r.values["q"] for r in results] == [f"k{i:03d}" for i in range(n)]
    assert [len(members) for members in stack.spy.sent] == [MAX_WRITE_BATCH, 2]


# --- writes (coalesce: true) -------------------------------------------------------------


async def test_a_write_batch_gives_each_run_its_own_rows(write_flow: Write, stacks: Callable[..., Stack], demo_dsn: str) -> None:
    await run_ddl(demo_dsn, "CREATE TABLE notes (id serial PRIMARY KEY, label text NOT NULL)")
    write_flow("""
        inputs: {label: str}
        nodes:
          q: {sql: "INSERT INTO notes (label) VALUES ($label) RETURNING id, label", fetch: one, coalesce: true}
        """)
    stack = stacks(size=1)
    results = await stack.batched(("t", {"label": f"n{i}"}) for i in range(4))
    assert [r.values["q"]["label"] for r in results] == ["n0", "n1", "n2", "n3"]
    assert {r.nodes["q"].served.batch for r in results} == {4}  # type: ignore[union-attr]
    assert len(stack.combined()) == 1 and stack.failed() == []
    rows = await fetch_rows(demo_dsn, "SELECT id, label FROM notes ORDER BY id")
    assert sorted(rows, key=lambda r: r["label"]) == [r.values["q"] for r in results]


UPSERT = """
inputs: {k: int, v: str}
nodes:
  q:
    sql: |
      INSERT INTO kv (k, v) VALUES ($k, $v) ON CONFLICT (k) DO UPDATE SET v = excluded.v
      RETURNING k, v, (xmax = 0) AS inserted
    fetch: one
    coalesce: true
"""


async def test_write_members_that_collide_on_a_unique_key_get_their_results_alone(
        write_flow: Write, stacks: Callable[..., Stack], demo_dsn: str) -> None:
    await run_ddl(demo_dsn, "CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL)")
    write_flow(UPSERT)
    runs = [("t", {"k": 1, "v": "a"}), ("t", {"k": 1, "v": "b"}), ("t", {"k": 2, "v": "c"})]
    expected = await alone(stacks(size=1, enabled=False).planner, runs)
    after_alone = await fetch_rows(demo_dsn, "SELECT k, v FROM kv ORDER BY k")
    await run_ddl(demo_dsn, "TRUNCATE kv")
    stack = stacks(size=1)
    results = await stack.batched(runs)
    assert [len(members) for members in stack.spy.sent] == [3]
    assert [q.exception is not None for q in stack.combined()] == [True]  # one statement, refused, then each alone
    assert [r.values["q"] for r in results] == [r.values["q"] for r in expected] == [
        {"k": 1, "v": "a", "inserted": True}, {"k": 1, "v": "b", "inserted": False}, {"k": 2, "v": "c", "inserted": True}]
    assert await fetch_rows(demo_dsn, "SELECT k, v FROM kv ORDER BY k") == after_alone


async def test_writes_with_identical_parameters_never_share_a_statement(
        write_flow: Write, stacks: Callable[..., Stack], demo_dsn: str) -> None:
    # A find-or-create that relies on seeing the rows of the runs before it: in one statement
    # the second member would not see the first's row, and create a second one.
    await run_ddl(demo_dsn, "CREATE TABLE tags (id serial PRIMARY KEY, name text NOT NULL, info jsonb)")
    write_flow("""
        inputs: {name: str, info: json}
        nodes:
          q:
            sql: |
              WITH found AS (SELECT id FROM tags WHERE name = $name), made AS (
                INSERT INTO tags (name, info) SELECT $name, $info::jsonb WHERE NOT EXISTS (SELECT 1 FROM found)
                RETURNING id)
              SELECT id, false AS created FROM found UNION ALL SELECT id, true FROM made
            fetch: one
            coalesce: true
        """)
    stack = stacks(size=1)
    runs: list[tuple[str, dict[str, Any]]] = [("t", {"name": "a", "info": {"x": [1]}}), ("t", {"name": "a", "info": {"x": [1]}}),
            ("t", {"name": "b", "info": None})]
    results = await stack.batched(runs)
    assert [r.values["q"]["created"] for r in results] == [True, False, True]
    assert results[0].values["q"]["id"] == results[1].values["q"]["id"]
    assert await fetch_rows(demo_dsn, "SELECT name, count(*) AS n FROM tags GROUP BY name ORDER BY name") == [
        {"name": "a", "n": 1}, {"name": "b", "n": 1}]
    assert all(len({repr(p) for p in members}) == len(members) for members in stack.spy.sent)


async def test_two_batches_writing_the_same_rows_do_not_deadlock(
        write_flow: Write, stacks: Callable[..., Stack], demo_dsn: str) -> None:
    await run_ddl(demo_dsn, "CREATE TABLE acct (id int PRIMARY KEY, n int NOT NULL); INSERT INTO acct VALUES (1, 0), (2, 0)")
    write_flow("""
        inputs: {id: int, d: int}
        nodes:
          q:
            sql: UPDATE acct SET n = n + $d WHERE id = $id RETURNING id, n, slow_echo(0, 100) AS pause
            fetch: one
            coalesce: true
            timeout: 3s
        """)
    stack = stacks(size=2)
    stack.load("t")
    first_gate = await stack.hold("gate", connections=1)
    second_gate = await stack.hold("gate2", connections=1)
    first = [asyncio.create_task(outcome(stack.planner.run("t", {"id": i, "d": 1}))) for i in (1, 2)]
    await stack.joined(2)
    started = time.perf_counter()
    await first_gate.release()
    await until(lambda: stack.spy.sent)  # the first batch has a connection (and locks row 1): the second forms now
    second = [asyncio.create_task(outcome(stack.planner.run("t", {"id": i, "d": 10}))) for i in (2, 1)]
    await stack.joined(4)
    await second_gate.release()
    results = await asyncio.gather(*first, *second)
    elapsed = time.perf_counter() - started
    assert [len(members) for members in stack.spy.sent] == [2, 2]
    assert all(r.status == "ok" and r.nodes["q"].state is NodeState.OK for r in results)
    assert await fetch_rows(demo_dsn, "SELECT id, n FROM acct ORDER BY id") == [{"id": 1, "n": 11}, {"id": 2, "n": 11}]
    # A deadlock is noticed only after the server's deadlock_timeout (1 s).
    assert elapsed < 1.0, f"took {elapsed:.2f}s: the batches waited for each other"
    await stack.assert_clean()


async def test_a_member_that_violates_a_constraint_fails_alone_and_the_others_are_written_once(
        write_flow: Write, stacks: Callable[..., Stack], demo_dsn: str) -> None:
    await run_ddl(demo_dsn, "CREATE TABLE notes (id serial PRIMARY KEY, label text NOT NULL CHECK (length(label) < 5))")
    write_flow("""
        inputs: {label: str}
        nodes:
          q: {sql: "INSERT INTO notes (label) VALUES ($label) RETURNING label", fetch: value, coalesce: true}
        """)
    stack = stacks(size=1)
    labels = ["a", "too long", "b", "c"]
    results = await stack.batched(("t", {"label": label}) for label in labels)
    assert [len(members) for members in stack.spy.sent] == [4]
    assert [q.exception is not None for q in stack.combined()] == [True]  # refused as a whole: nothing written
    assert [r.nodes["q"].state for r in results] == [NodeState.OK, NodeState.DEFAULTED, NodeState.OK, NodeState.OK]
    error = results[1].nodes["q"].error
    assert isinstance(error, QueryError) and error.sqlstate == "23514"
    assert await fetch_rows(demo_dsn, "SELECT label, count(*) AS n FROM notes GROUP BY label ORDER BY label") == [
        {"label": "a", "n": 1}, {"label": "b", "n": 1}, {"label": "c", "n": 1}]


async def test_a_write_member_cancelled_while_it_waited_is_not_written(
        write_flow: Write, stacks: Callable[..., Stack], demo_dsn: str) -> None:
    await run_ddl(demo_dsn, "CREATE TABLE notes (id serial PRIMARY KEY, label text NOT NULL)")
    write_flow("""
        inputs: {label: str}
        nodes:
          q: {sql: "INSERT INTO notes (label) VALUES ($label) RETURNING label", fetch: value, coalesce: true}
        """)
    stack = stacks(size=1)
    stack.load("t")
    gate = await stack.hold()
    runs = [asyncio.create_task(stack.planner.run("t", {"label": label})) for label in ("a", "b", "c")]
    await stack.joined(3)
    runs[1].cancel()
    await until(runs[1].done)
    await gate.release()
    done = await asyncio.gather(*runs, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert await fetch_rows(demo_dsn, "SELECT label FROM notes ORDER BY label") == [{"label": "a"}, {"label": "c"}]


# --- properties: many runs at once give what each gives alone ------------------------------

READS = """
inputs: {a: json, b: json, k: int, ms: int, j: json}
settings: {timeout: 20s}
nodes:
  parsed:                     # a text that breaks the cast on the server for some runs
    sql: SELECT $a::text::int AS n
    fetch: value
    default: -1
    retry: {attempts: 2, backoff: 1ms, on: any}
  sent:                       # a value the driver cannot send for some runs
    sql: SELECT $b::int + 1 AS n
    fetch: value
    default: -1
  rows:                       # zero to many rows: numeric, timestamps, json, arrays, nulls
    sql: |
      SELECT g AS i, (g * 1.25)::numeric(10, 2) AS x,
             timestamptz '2024-01-01 00:00:00+00' + g * interval '1 hour' AS at,
             jsonb_build_object('g', g, 'a', $a::text) AS doc, ARRAY[g, $k::int] AS pair, nullif(g, 2) AS maybe
      FROM generate_series(1, $k::int * 3) AS g ORDER BY g DESC
    fetch: all
  instance:
    sql: SELECT id, instance_name, escalation_keywords FROM whatsapp_instances WHERE id = $k::int
    fetch: one
    when: "$k > 0"
  doc:
    sql: SELECT $j::jsonb -> 'n' AS n
    fetch: value
  slow:                       # slower than its timeout for some runs
    sql: SELECT slow_echo($k::int, $ms::int) AS v
    fetch: value
    timeout: 500ms            # 5x the fast runs' worst seen under a loaded machine (~100 ms)
    default: -1
  twice:
    sql: SELECT $parsed::int * 2 AS n
    fetch: value
  check:                      # fails the run (fail-fast) for k = 3, once the others have settled
    sql: SELECT 10 / ($k::int - 3) AS r
    fetch: value
    on_error: fail
    after: [sent, rows, instance, doc, slow, twice]
"""

read_inputs = st.fixed_dictionaries({
    "a": st.one_of(st.none(), st.integers(-3, 3).map(str), st.sampled_from(["x", "1.5", " 7", ""])),
    "b": st.sampled_from([1, 2, True, 1.0, 2.5, "3", None, [1]]),
    "k": st.integers(0, 6),
    "ms": st.sampled_from([0] * 15 + [1000]),
    "j": st.one_of(st.none(), st.integers(0, 3).map(lambda n: {"n": n}), st.just({"n": [1, None]}), st.just("text")),
})
cancel_after = st.one_of(st.none(), st.none(), st.none(), st.none(), st.none(), st.floats(0, 0.06))

_few = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture
async def property_flows(stacks: Callable[..., Stack], demo_dsn: str, write_flow: Write) -> Callable[..., Stack]:
    """`stacks`, with the flows of the properties written."""
    await run_ddl(demo_dsn, "CREATE TABLE wprop (k int PRIMARY KEY, label text NOT NULL CHECK (length(label) < 4))")
    write_flow(READS, name="reads")
    write_flow("""
        inputs: {k: int, label: json}
        nodes:
          put:
            sql: INSERT INTO wprop (k, label) VALUES ($k, $label) RETURNING k, label, length(label) AS n
            fetch: one
            coalesce: true
        """, name="writes")
    return stacks


@pytest.mark.slow  # 8 examples of 20-100 runs each, alone and coalesced
@_few
@given(runs=st.lists(st.tuples(read_inputs, cancel_after), min_size=20, max_size=100), size=st.integers(1, 3))
async def test_concurrent_reads_give_every_run_what_it_gets_alone(
        property_flows: Callable[..., Stack], demo_dsn: str, runs: list[tuple[dict[str, Any], float | None]],
        size: int) -> None:
    reference, stack = property_flows(size=4, enabled=False), property_flows(size=size)
    try:
        expected = await asyncio.gather(*(outcome(reference.planner.run("reads", inputs)) for inputs, _ in runs))
        stack.load("reads")
        gate = await stack.hold()
        tasks = [asyncio.create_task(outcome(stack.planner.run("reads", inputs))) for inputs, _ in runs]
        await stack.joined(len(runs))  # every run waits with its first statements: batches have formed
        for task, (_, after) in zip(tasks, runs, strict=True):
            if after is not None:
                asyncio.get_running_loop().call_later(after, task.cancel)
        await gate.release()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for got, want, (_, after) in zip(results, expected, runs, strict=True):
            if isinstance(got, asyncio.CancelledError):
                assert after is not None, "a run nobody cancelled was cancelled"
                continue
            assert isinstance(got, FlowResult)
            assert summary(got) == summary(want)
            assert got.status == want.status
        assert stack.coalescer.batches > 0, "no batch formed"
        await stack.assert_clean()
    finally:
        await stack.planner.close()
        await reference.planner.close()


write_inputs = st.tuples(st.integers(0, 9), st.sampled_from(["a", "bb", "ccc", "dddd", None, 5]))


@pytest.mark.slow  # 8 examples of 10-50 runs each, alone and coalesced
@_few
@given(runs=st.lists(write_inputs, min_size=10, max_size=50))
# A value asyncpg cannot encode (an int for text) among identical writes: the run alone and the
# member alone leave no connection inside the failed statement's implicit transaction.
@example(runs=[(0, 5)] * 10)
@example(runs=[(1, "a"), (2, 5)] + [(3, "bb")] * 8)
async def test_concurrent_writes_give_every_run_what_it_gets_alone_and_write_once(
        property_flows: Callable[..., Stack], demo_dsn: str, runs: list[tuple[int, Any]]) -> None:
    # One connection: batches run one after the other, in the order their runs asked.
    inputs = [("writes", {"k": k, "label": label}) for k, label in runs]
    reference, stack = property_flows(size=1, enabled=False), property_flows(size=1)
    try:
        await run_ddl(demo_dsn, "TRUNCATE wprop")
        expected = await alone(reference.planner, inputs)
        written = await fetch_rows(demo_dsn, "SELECT k, label FROM wprop ORDER BY k")
        await run_ddl(demo_dsn, "TRUNCATE wprop")
        results = await stack.batched(inputs)
        assert [summary(r) for r in results] == [summary(r) for r in expected]
        assert await fetch_rows(demo_dsn, "SELECT k, label FROM wprop ORDER BY k") == written
        assert stack.coalescer.batches > 0 or len(set(runs)) == 1, "no batch formed"  # identical writes never share
        await stack.assert_clean()
    finally:
        await stack.planner.close()
        await reference.planner.close()


@pytest.mark.parametrize(("sql", "fetch"), [
    pytest.param("UPDATE whatsapp_instances SET escalation_threshold = 3 WHERE id = $id", "value", id="no-returning"),
    pytest.param("UPDATE whatsapp_instances SET escalation_threshold = 3 WHERE id = $id RETURNING id", "none",
                 id="fetch-none"),
    pytest.param("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
                 "UPDATE whatsapp_instances SET escalation_threshold = (SELECT max(n) FROM r) WHERE id = $id RETURNING id",
                 "value", id="recursive-with"),
])
def test_coalesce_true_on_a_write_that_cannot_be_combined_is_refused_at_load(sql: str, fetch: str) -> None:
    from planner import FlowFileError, load_flow

    text = f"inputs: {{id: int}}\nnodes:\n  w: {{sql: \"{sql}\", fetch: {fetch}, coalesce: true}}\n"
    with pytest.raises(FlowFileError, match="coalesce: true needs one statement that returns rows") as info:
        load_flow(text=text, name="w")
    assert info.value.node == "w"


# --- a value asyncpg cannot encode (planner.db.synced) ------------------------------------------


async def test_a_read_batch_whose_values_cannot_be_encoded_leaves_no_connection_mid_statement(
        property_flows: Callable[..., Stack], write_flow: Write) -> None:
    # The combined statement fails to encode, then each member alone: the first member's Parse
    # is the statement's first on the connection, and no execution ever syncs it.
    write_flow("inputs: {label: json}\nnodes:\n  q: {sql: 'SELECT count(*) FROM wprop WHERE label = $label', fetch: value}\n",
               name="byl")
    stack = property_flows(size=1)
    results = await stack.batched([("byl", {"label": 5}), ("byl", {"label": 6}), ("byl", {"label": 7})])
    assert [r.nodes["q"].state for r in results] == [NodeState.DEFAULTED] * 3
    assert all(isinstance(r.nodes["q"].error, QueryError) for r in results)
    assert stack.spy.sent == [[[5], [6], [7]]]  # one batch, then each member alone
    await stack.assert_clean()  # no backend left `active` in the failed statement's implicit transaction


async def test_a_combined_write_whose_values_cannot_be_encoded_writes_nothing_and_leaves_nothing_open(
        property_flows: Callable[..., Stack], demo_dsn: str) -> None:
    stack = property_flows(size=1)
    results = await stack.batched([("writes", {"k": 1, "label": 5}), ("writes", {"k": 2, "label": 6})])
    assert [r.nodes["put"].state for r in results] == [NodeState.DEFAULTED] * 2
    assert stack.spy.sent == [[[1, 5], [2, 6]]]
    assert await fetch_rows(demo_dsn, "SELECT k, label FROM wprop ORDER BY k") == []
    await stack.assert_clean()


async def test_a_combined_write_with_a_value_that_cannot_be_encoded_writes_the_others_once(
        property_flows: Callable[..., Stack], demo_dsn: str) -> None:
    stack = property_flows(size=1)
    results = await stack.batched([("writes", {"k": 1, "label": 5}), ("writes", {"k": 2, "label": "a"}),
                                   ("writes", {"k": 3, "label": "bb"})])
    assert [r.nodes["put"].state for r in results] == [NodeState.DEFAULTED, NodeState.OK, NodeState.OK]
    assert await fetch_rows(demo_dsn, "SELECT k, label FROM wprop ORDER BY k") == [{"k": 2, "label": "a"},
                                                                               {"k": 3, "label": "bb"}]
    await stack.assert_clean()
