"""Compiled flows (issue 21): connected SQL nodes sent as one statement, each node keeping the
state, value, default, skip reason and error it would have had alone."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner import Planner, PoolOptions, load_flow
from planner.compile import plan_groups
from planner.testing.pytest_plugin import fresh_database

FLOWS = Path(__file__).resolve().parent.parent / "flows"


def _message(phone: str = "+15550000001", message: str = "where is my order?") -> dict[str, Any]:
    return {"instance_name": "acme", "user_phone": phone, "message": message}


@pytest.fixture
async def twin_dsn(pg_dsn: str, demo_template: str) -> AsyncIterator[str]:
    """A second copy of the demo database: the same flow runs compiled on one, sequential on the other."""
    async with fresh_database(pg_dsn, template=demo_template) as dsn:
        yield dsn


async def _tables(dsn: str) -> dict[str, list[Any]]:
    con = await asyncpg.connect(dsn)
    try:
        names = [r[0] for r in await con.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]
        out: dict[str, list[Any]] = {}
        for name in names:
            rows = await con.fetch(f'SELECT * FROM "{name}"')
            # Times differ between two databases; everything else must not.
            out[name] = sorted(repr({k: v for k, v in dict(r).items() if k not in ("created_at", "last_activity",
                                                                                     "updated_at", "escalated_at")})
                               for r in rows)
        return out
    finally:
        await con.close()


def _outcomes(result: Any) -> dict[str, tuple[str, Any, str | None]]:
    return {name: (str(n.state), n.value, type(n.error).__name__ if n.error else None)
            for name, n in result.nodes.items()}


def _strip_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_times(v) for k, v in value.items() if k not in ("created_at",)}
    if isinstance(value, list):
        return [_strip_times(v) for v in value]
    return value


def test_process_buffered_compiles_into_one_statement() -> None:
    groups = plan_groups(load_flow(FLOWS / "process_buffered.yaml", name="process_buffered"))
    assert [g.names for g in groups] == [("instance", "conversation", "webhook_config", "is_escalated", "is_duplicate",
                                          "history", "recent_messages", "store_message", "mark_duplicate_processed")]


def test_compile_false_in_settings_or_on_a_node_keeps_nodes_out(write_flow: Any) -> None:
    text = """
    inputs: {k: int}
    settings: {compile: %s}
    nodes:
      a: {sql: "SELECT $k AS v", fetch: one}
      b: {sql: "SELECT $a.v + 1 AS v", fetch: one%s}
      c: {sql: "SELECT $b.v + 1 AS v", fetch: one}
    """
    assert [g.names for g in plan_groups(load_flow(write_flow(text % ("true", "")), name="t"))] == [("a", "b", "c")]
    assert plan_groups(load_flow(write_flow(text % ("false", "")), name="t")) == ()
    assert [g.names for g in plan_groups(load_flow(write_flow(text % ("true", ", compile: false")), name="t"))] == []


def test_a_read_after_a_write_of_its_table_splits_the_group(write_flow: Any) -> None:
    flow = load_flow(write_flow("""
    inputs: {k: int}
    nodes:
      w: {sql: "INSERT INTO t (k) VALUES ($k) RETURNING id", fetch: value}
      r: {sql: "SELECT count(*) FROM t WHERE id <= $w", fetch: value}
      other: {sql: "SELECT count(*) FROM u WHERE id <= $w", fetch: value}
    """), name="t")
    (group,) = plan_groups(flow)
    assert group.names == ("w", "other")
    assert "t, which w writes" in group.split["r"]


def test_two_writes_of_one_table_split_unless_their_conditions_exclude_each_other(write_flow: Any) -> None:
    text = """
    inputs: {k: int}
    nodes:
      check: {sql: "SELECT $k > 1", fetch: value}
      a: {sql: "UPDATE t SET n = 1 WHERE k = $k", fetch: none, when: "%s"}
      b: {sql: "UPDATE t SET n = 2 WHERE k = $k", fetch: none, when: "not $check"}
    """
    assert [g.names for g in plan_groups(load_flow(write_flow(text % "$check"), name="t"))] == [("check", "a", "b")]
    (group,) = plan_groups(load_flow(write_flow(text % "$check == true"), name="t"))
    assert group.names == ("check", "a")


def test_a_function_not_known_to_be_pure_keeps_its_node_out(write_flow: Any) -> None:
    flow = load_flow(write_flow("""
    inputs: {k: int}
    nodes:
      a: {sql: "SELECT $k AS v", fetch: one}
      b: {sql: "SELECT my_function($a.v) AS v", fetch: one}
      c: {sql: "SELECT nextval('s') + $a.v AS v", fetch: one}
    """), name="t")
    assert plan_groups(flow) == ()


def test_a_when_that_mixes_group_values_and_outside_values_keeps_its_node_out(write_flow: Any) -> None:
    flow = load_flow(write_flow("""
    inputs: {k: int}
    nodes:
      a: {sql: "SELECT $k AS v", fetch: one}
      b: {sql: "SELECT 1 AS v", fetch: one, when: "$a.v == 1 and $k == 2"}
      c: {sql: "SELECT 2 AS v", fetch: one, when: "$a.v == 1 or $a.v in [3, 4]"}
    """), name="t")
    (group,) = plan_groups(flow)
    assert group.names == ("a", "c")
    assert "mixes" in group.split["b"]


async def test_process_buffered_runs_in_one_statement_with_the_results_of_sequential_mode(
        demo_dsn: str, twin_dsn: str) -> None:
    compiled = Planner(flows=FLOWS, dsn=demo_dsn)
    sequential = Planner(flows=FLOWS, dsn=twin_dsn, mode="sequential")
    try:
        for i, message in enumerate(("where is my order?", "where is my order?", "thanks")):
            a = await compiled.run("process_buffered", _message(message=message))
            b = await sequential.run("process_buffered", _message(message=message))
            assert _outcomes(a).keys() == _outcomes(b).keys()
            for name in a.nodes:
                assert a.nodes[name].state == b.nodes[name].state, name
                assert _strip_times(a.nodes[name].value) == _strip_times(b.nodes[name].value), name
            served = {n: r.served.compiled for n, r in a.nodes.items() if r.served is not None and r.served.compiled}
            cached = {n for n, r in a.nodes.items() if r.served is not None and r.served.cached}
            # The first message finds the cache cold: one statement answers every node and fills
            # the cache; then instance and webhook_config come from the cache, the rest from one statement.
            assert set(served.values()) == {"process_buffered#1"}
            assert cached == (set() if i == 0 else {"instance", "webhook_config"})
            assert set(served) == set(a.nodes) - cached - {"mark_duplicate_processed" if i != 1 else "store_message"}
        (runner,) = compiled.versions.load("process_buffered").compiled
        assert (runner.sent, runner.fell_back, runner.broken) == (3, 0, None)
    finally:
        await compiled.close()
        await sequential.close()
    assert await _tables(demo_dsn) == await _tables(twin_dsn)


# --- compiled vs sequential: random flows of reads and writes -------------------------------

TABLES = ("t1", "t2", "t3")


@st.composite
def random_flows(draw: st.DrawFn) -> str:
    """A flow of 2-6 nodes, each after the one before (so eager order is sequential order),
    reading and writing three tables, with conditions, failures and defaults."""
    count = draw(st.integers(2, 6))
    fetches: dict[str, str] = {}
    lines = ["inputs: {k: int}", "nodes:"]
    for i in range(count):
        name = f"n{i}"
        usable = [m for m, f in fetches.items() if f in ("one", "value")]
        refs = ["$k", *[f"${m}.c" if fetches[m] == "one" else f"${m}" for m in usable]]
        ref = draw(st.sampled_from(refs)) + "::int"
        table = draw(st.sampled_from(TABLES))
        kind = draw(st.sampled_from(["read_one", "read_value", "insert", "update", "update_none", "fail"]))
        sql, fetch = {
            "read_one": (f"SELECT count(*)::int AS c FROM {table} WHERE v >= {ref}", "one"),
            "read_value": (f"SELECT coalesce(max(v), 0)::int + {ref} FROM {table}", "value"),
            "insert": (f"INSERT INTO {table} (k, v) VALUES (1, {ref}) RETURNING v AS c", "one"),
            "update": (f"UPDATE {table} SET v = v + 1 WHERE v <= {ref} RETURNING v", "value"),
            "update_none": (f"UPDATE {table} SET v = v + 2 WHERE v = {ref}", "none"),
            "fail": (f"SELECT (1 / ({ref} - {ref}))::int AS c", "one"),
        }[kind]
        whens = [None, "$k == 1", "$k != 1"]
        for m in usable:
            whens += [f"${m}.c > 0", f"${m}.c == 1"] if fetches[m] == "one" else [f"not ${m}", f"${m} in [1, 2]",
                                                                                    f"${m} != 3"]
        when = draw(st.sampled_from(whens))
        default = draw(st.sampled_from([None, {"c": 7} if fetch == "one" else 7]))
        spec: dict[str, Any] = {"sql": sql, "fetch": fetch}
        if when is not None:
            spec["when"] = when
        if default is not None and fetch != "none":
            spec["default"] = default
        if draw(st.integers(0, 9)) == 0:
            spec["on_error"] = "fail"  # the run stops: nothing after it may have written
        if fetch == "one" and kind == "read_one" and draw(st.integers(0, 5)) == 0:
            spec["sql"] = spec["sql"] + " HAVING count(*) > 1"  # no row when there is at most one
            spec["required"] = True
        if i:
            spec["after"] = [f"n{i - 1}"]
        lines.append(f"  {name}: {json.dumps(spec)}")
        fetches[name] = fetch
    return "\n".join(lines) + "\n"


@pytest.fixture
async def twins(pg_dsn: str) -> AsyncIterator[tuple[str, str]]:
    async with fresh_database(pg_dsn) as first, fresh_database(pg_dsn) as second:
        for dsn in (first, second):
            con = await asyncpg.connect(dsn)
            try:
                for table in TABLES:
                    await con.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, k int, v int)")
            finally:
                await con.close()
        yield first, second


async def _reset(dsn: str, rows: list[tuple[str, int]]) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY")
        for table, v in rows:
            await con.execute(f"INSERT INTO {table} (k, v) VALUES (1, $1)", v)
    finally:
        await con.close()


async def _result(running: Any) -> Any:
    """The run's result, failed or not."""
    from planner import FlowFailed

    try:
        return await running
    except FlowFailed as exc:
        assert exc.result is not None
        return exc.result


async def _rows(dsn: str) -> dict[str, list[Any]]:
    """Every table's rows in the order they were inserted. Not their serial ids: a compiled
    statement that failed (and ran its nodes alone) has used sequence values, as any rolled-back
    transaction does (docs/flows.md, compiled flows)."""
    con = await asyncpg.connect(dsn)
    try:
        return {t: [tuple(r) for r in await con.fetch(f"SELECT k, v FROM {t} ORDER BY id")] for t in TABLES}
    finally:
        await con.close()


@pytest.mark.slow  # 40 generated flows, each on two databases
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=random_flows(), k=st.integers(0, 2),
       rows=st.lists(st.tuples(st.sampled_from(TABLES), st.integers(-1, 3)), max_size=5))
async def test_a_compiled_flow_gives_the_outcomes_and_rows_of_sequential_mode(
        twins: tuple[str, str], text: str, k: int, rows: list[tuple[str, int]]) -> None:
    first, second = twins
    await _reset(first, rows)
    await _reset(second, rows)
    flow = load_flow(text=text, name="random")
    async with Planner(dsn=first, pool_options=PoolOptions(embedded=False)) as compiled, \
            Planner(dsn=second, mode="sequential", pool_options=PoolOptions(embedded=False)) as sequential:
        a, b = await _result(compiled.run(flow, {"k": k})), await _result(sequential.run(flow, {"k": k}))
    assert _outcomes(a) == _outcomes(b), text
    assert a.output == b.output
    assert await _rows(first) == await _rows(second), text


CHAIN = """
inputs: {k: int}
nodes:
  a: {sql: "SELECT $k::int AS v", fetch: one}
  b: {sql: "SELECT $a.v + 1 AS v", fetch: one}
  c: {sql: "SELECT (1 / ($b.v::int - $b.v::int))::int AS v", fetch: one, default: {v: -1}}
  d: {sql: "SELECT $b.v * 10", fetch: value, when: "$b.v > 1"}
"""


async def test_a_chain_of_reads_is_one_statement_and_each_node_says_so(pg_dsn: str) -> None:
    flow = load_flow(text=CHAIN.replace("(1 / ($b.v::int - $b.v::int))::int", "$b.v + 1"), name="chain")
    async with Planner(dsn=pg_dsn) as planner:
        result = await planner.run(flow, {"k": 1})
        (runner,) = planner.versions.of(flow).compiled
    assert result.values == {"a": {"v": 1}, "b": {"v": 2}, "c": {"v": 3}, "d": 20}
    assert {n: r.served.compiled for n, r in result.nodes.items() if r.served} == dict.fromkeys("abcd", "chain#1")
    assert (runner.sent, runner.fell_back) == (1, 0)


async def test_a_failing_node_makes_the_group_run_alone_and_defaults_alone(pg_dsn: str) -> None:
    flow = load_flow(text=CHAIN, name="chain")
    async with Planner(dsn=pg_dsn) as planner:
        result = await planner.run(flow, {"k": 1})
        (runner,) = planner.versions.of(flow).compiled
    assert runner.fell_back == 1 and runner.broken is None  # a division by zero is this run's, not the statement's
    assert result.nodes["c"].state == "defaulted" and result.nodes["c"].value == {"v": -1}
    assert "division by zero" in str(result.nodes["c"].error)
    assert result.values["d"] == 20 and result.nodes["d"].state == "ok"
    assert all(r.served is None or r.served.compiled is None for r in result.nodes.values())


async def test_a_node_skipped_by_its_when_is_skipped_inside_the_statement_too(pg_dsn: str) -> None:
    flow = load_flow(text=CHAIN.replace("(1 / ($b.v::int - $b.v::int))::int", "$b.v + 1"), name="chain")
    async with Planner(dsn=pg_dsn) as planner:
        result = await planner.run(flow, {"k": 0})
    assert result.nodes["d"].state == "skipped" and result.values["d"] is None
    assert result.nodes["c"].served is not None and result.nodes["c"].served.compiled == "chain#1"


async def test_a_when_on_a_skipped_nodes_default_runs_the_node_alone(pg_dsn: str) -> None:
    flow = load_flow(text="""
    inputs: {k: int}
    nodes:
      a: {sql: "SELECT $k::int AS v", fetch: one, when: "$k > 5", default: {v: 9}}
      b: {sql: "SELECT $a.v + 1 AS v", fetch: one}
    """, name="defaults")
    async with Planner(dsn=pg_dsn) as planner:
        result = await planner.run(flow, {"k": 1})
    assert result.nodes["a"].state == "skipped"
    assert result.values["b"] == {"v": 10}  # from a's default, which the statement could not see
    assert result.nodes["b"].served is not None and result.nodes["b"].served.compiled is None


@pytest.mark.parametrize("how", ["env", "sequential", "overrides"])
async def test_compilation_is_off_with_planner_compile_0_sequential_mode_or_overrides(
        pg_dsn: str, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "env":
        monkeypatch.setenv("PLANNER_COMPILE", "0")
    flow = load_flow(text=CHAIN.replace("(1 / ($b.v::int - $b.v::int))::int", "$b.v + 1"), name="chain")
    async with Planner(dsn=pg_dsn, mode="sequential" if how == "sequential" else None) as planner:
        result = await planner.run(flow, {"k": 1}, overrides={"d": 5} if how == "overrides" else None)
    assert result.values["c"] == {"v": 3}
    assert all(r.served is None or r.served.compiled is None for r in result.nodes.values())


def test_plan_counts_round_trips_with_compilation_and_explain_prints_the_statement() -> None:
    from typer.testing import CliRunner

    from planner.cli import app

    runner = CliRunner()
    plan = runner.invoke(app, ["plan", "process_buffered", "--flows", str(FLOWS)])
    assert plan.exit_code == 0, plan.output
    assert "compiled (process_buffered#1: instance+conversation+" in plan.output
    assert "statements per run: at most 1; longest chain of round trips: 1 (planner explain" in plan.output
    explained = runner.invoke(app, ["explain", "process_buffered", "--flows", str(FLOWS)])
    assert explained.exit_code == 0, explained.output
    assert '"n:store_message" AS (' in explained.output and "$2: $instance_name" in explained.output
    assert "-- process_buffered#1 with instance, webhook_config from the cache:" in explained.output
    assert "-- record goes alone" in runner.invoke(app, ["explain", "escalation", "--flows", str(FLOWS)]).output


async def test_a_trace_names_the_compiled_statement_of_each_node_it_served(pg_dsn: str) -> None:
    from planner.views.trace import trace_events

    flow = load_flow(text=CHAIN.replace("(1 / ($b.v::int - $b.v::int))::int", "$b.v + 1"), name="chain")
    async with Planner(dsn=pg_dsn) as planner:
        result = await planner.run(flow, {"k": 1})
    events = {e["name"]: e["args"] for e in trace_events(result, flow)["traceEvents"] if e.get("ph") == "X"}
    assert {name: args.get("compiled") for name, args in events.items()} == dict.fromkeys("abcd", "chain#1")


async def test_a_group_that_hits_its_smallest_timeout_runs_its_nodes_alone(pg_dsn: str) -> None:
    flow = load_flow(text="""
    inputs: {k: int}
    nodes:
      a: {sql: "SELECT $k::int AS v", fetch: one}
      slow: {sql: "SELECT count(*) + $a.v FROM generate_series(1, 200000000)", fetch: value, timeout: 100ms, default: -1}
      fast: {sql: "SELECT $a.v + 1 AS v", fetch: one}
    """, name="slow")
    async with Planner(dsn=pg_dsn) as planner:
        result = await planner.run(flow, {"k": 1})
        (runner,) = planner.versions.of(flow).compiled
    assert runner.fell_back == 1 and runner.broken is None
    assert result.nodes["slow"].state == "defaulted" and "timed out" in str(result.nodes["slow"].error)
    assert result.values["fast"] == {"v": 2} and result.nodes["fast"].state == "ok"


async def test_a_required_member_without_a_row_fails_as_it_would_alone(pg_dsn: str) -> None:
    from planner import FlowNotFound

    flow = load_flow(text="""
    inputs: {k: int}
    nodes:
      a: {sql: "SELECT $k::int AS v WHERE $k::int > 5", fetch: one, required: true}
      b: {sql: "SELECT $a.v + 1 AS v", fetch: one}
    """, name="required")
    async with Planner(dsn=pg_dsn) as planner:
        with pytest.raises(FlowNotFound) as caught:
            await planner.run(flow, {"k": 1})
        (runner,) = planner.versions.of(flow).compiled
    assert runner.sent == 1 and caught.value.result.nodes["a"].state == "failed"


async def test_process_buffered_compiled_through_pgbouncer_matches_sequential_direct(
        demo_dsn: str, twin_dsn: str, pgbouncer: Any) -> None:
    compiled = Planner(flows=FLOWS, dsn=pgbouncer.dsn(demo_dsn))
    sequential = Planner(flows=FLOWS, dsn=twin_dsn, mode="sequential")
    try:
        for message in ("hello", "hello"):
            a = await compiled.run("process_buffered", _message(message=message))
            b = await sequential.run("process_buffered", _message(message=message))
            assert {n: (r.state, _strip_times(r.value)) for n, r in a.nodes.items()} == \
                {n: (r.state, _strip_times(r.value)) for n, r in b.nodes.items()}
        (runner,) = compiled.versions.load("process_buffered").compiled
        assert (runner.sent, runner.fell_back, runner.broken) == (2, 0, None)
    finally:
        await compiled.close()
        await sequential.close()
    assert await _tables(demo_dsn) == await _tables(twin_dsn)


@pytest.mark.parametrize("stopper", [
    'a: {sql: "SELECT $k::int AS v WHERE $k::int > 5", fetch: one, required: true}',
    'a: {sql: "SELECT NULL::int AS v, $k::int AS k", fetch: one}\n      f: {sql: "SELECT 1 AS x", fetch: one, '
    'when: "$a.v > 0", on_error: fail}',
])
async def test_a_node_that_fails_the_run_stops_the_writes_after_it_as_sequential_mode_does(
        planner_database: str, stopper: str) -> None:
    from planner import FlowFailed

    con = await asyncpg.connect(planner_database)
    await con.execute("CREATE TABLE tw (v int)")
    last = "f" if "f:" in stopper else "a"
    flow = load_flow(text=f"""
    inputs: {{k: int}}
    nodes:
      {stopper}
      w: {{sql: "INSERT INTO tw (v) VALUES ($k) RETURNING v", fetch: value, after: [{last}]}}
    """, name="stops")
    try:
        async with Planner(dsn=planner_database) as planner:
            with pytest.raises(FlowFailed):
                await planner.run(flow, {"k": 1})
            (runner,) = planner.versions.of(flow).compiled
        assert runner.sent == 1
        assert await con.fetchval("SELECT count(*) FROM tw") == 0  # sequential mode writes nothing either
    finally:
        await con.close()


def test_no_function_compiled_as_pure_is_a_built_in_the_catalog_lists_with_effects() -> None:
    from planner.compile import PURE_FUNCTIONS
    from planner.lang.builtin_effects import BUILTIN_EFFECTS

    assert sorted(PURE_FUNCTIONS & BUILTIN_EFFECTS) == []


async def test_a_read_the_catalog_finds_effects_in_keeps_its_group_out_of_one_statement(demo_dsn: str) -> None:
    # `SELECT ... FROM stamp_view` reads like a plain read to the offline plan, but the view calls
    # a volatile function that writes. One statement sees one snapshot: `seen` would miss the row.
    con = await asyncpg.connect(demo_dsn)
    try:
        await con.execute("""
            CREATE TABLE stamps (id serial PRIMARY KEY, k int);
            CREATE FUNCTION stamp(k int) RETURNS int LANGUAGE sql VOLATILE
              AS 'INSERT INTO stamps (k) VALUES (k) RETURNING k';
            CREATE VIEW stamp_view AS SELECT stamp(7) AS k;
        """)
    finally:
        await con.close()
    flow = load_flow(text="""
inputs: {k: int}
nodes:
  stamped: {sql: "SELECT k FROM stamp_view WHERE k = $k", fetch: one}
  seen: {sql: "SELECT count(*) AS n FROM stamps WHERE k = $stamped.k", fetch: value}
""", name="hidden")
    assert [g.names for g in plan_groups(flow)] == [("stamped", "seen")]  # the offline plan takes both
    async with Planner(dsn=demo_dsn) as planner:
        result = await planner.run(flow, {"k": 7})
        (runner,) = planner.versions.of(flow).compiled
    assert result.values["seen"] == 1  # as in sequential mode: the read after the write sees it
    assert runner.sent == 0 and runner.broken is not None and "stamped" in runner.broken
    assert all(r.served is None or r.served.compiled is None for r in result.nodes.values())


HIDDEN = """
inputs: {k: int}
nodes:
  stamped: {sql: "SELECT k FROM stamp_view WHERE k = $k", fetch: one}
  seen: {sql: "SELECT count(*) AS n FROM stamps WHERE k = $stamped.k", fetch: value}
"""


async def test_the_purity_check_asks_the_judge_it_is_given_whatever_backend_it_holds() -> None:
    # The backend is not an EffectsBackend (a wrapper above it, say): the check must still run.
    from planner.kinds.backend import Offline
    from planner.lang.effects import Effects
    from planner.run.compiled import GroupRunner

    flow = load_flow(text=HIDDEN, name="hidden")
    (group,) = plan_groups(flow)
    asked: list[str] = []

    async def judge(node: Any) -> Effects:
        asked.append(node.name)
        return Effects(pure=False, resolved=True, reasons=("calls volatile function stamp(integer)",))

    runner = GroupRunner(group, flow, Offline("no database"), judge=judge)
    assert await runner._reads_proven_pure() is False
    assert asked == ["stamped"] and runner.broken is not None and "stamp(integer)" in runner.broken


async def test_without_a_judge_the_offline_plan_stands() -> None:
    from planner.kinds.backend import Offline
    from planner.run.compiled import GroupRunner

    flow = load_flow(text=HIDDEN, name="hidden")
    (group,) = plan_groups(flow)
    runner = GroupRunner(group, flow, Offline("no database"))
    assert await runner._reads_proven_pure() is True and runner.broken is None


async def test_a_node_wrapper_turns_compilation_off_for_its_planner(pg_dsn: str) -> None:
    # A wrapper may fail a node before it runs (fault injection, a circuit breaker): its write must
    # not have happened already inside a statement another node sent.
    flow = load_flow(text=CHAIN.replace("(1 / ($b.v::int - $b.v::int))::int", "$b.v + 1"), name="chain")

    def passthrough(flow_name: str, node: str, run: Any) -> Any:
        return run

    async with Planner(dsn=pg_dsn, node_wrapper=passthrough) as planner:
        result = await planner.run(flow, {"k": 1})
        assert planner.versions.of(flow).compiled == ()
    assert result.values == {"a": {"v": 1}, "b": {"v": 2}, "c": {"v": 3}, "d": 20}
    assert all(r.served is None or r.served.compiled is None for r in result.nodes.values())
