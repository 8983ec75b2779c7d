"""Metrics (`planner.run.metrics`): runs and node outcomes, latencies, statements and round trips,
pools, cache and sync-call threads, as Prometheus text and as OpenTelemetry instruments (read
back with the SDK's in-memory reader)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import planner as planner_pkg
from planner import CacheOptions, CallOptions, DatabaseUnavailable, FlowInputError, Metrics, Planner
from planner.api import metrics_text
from planner.run.families import FAMILIES, Family

DEGRADED = """
inputs: {x: int}
nodes:
  good: {sql: "SELECT $x::int AS v", fetch: one}
  broken: {sql: "SELECT 1/0 AS v", fetch: one, default: {v: 0}}
  summary: {call: tests.nodes:echo, with: {value: $good.v}}
"""


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def metrics(reader: InMemoryMetricReader) -> Metrics:
    return Metrics(meter_provider=MeterProvider(metric_readers=[reader]))


@pytest.fixture
async def db_planner(tmp_path: Path, pg_dsn: str, metrics: Metrics) -> AsyncIterator[Planner]:
    async with Planner(flows=tmp_path, dsn=pg_dsn, metrics=metrics, call_options=CallOptions(allowed_modules=["tests"]), cache_options=CacheOptions(channel=None)) as p:
        yield p


def _otel(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Every data point the reader collected, by instrument name."""
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    return points


def _point(points: list[Any], **attributes: str) -> Any:
    found = [p for p in points if dict(p.attributes) == attributes]
    assert len(found) == 1, (attributes, [dict(p.attributes) for p in points])
    return found[0]


def _line(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text (labels in any order)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match[1] != name:
            continue
        got = dict(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', match[2] or ""))
        if got == labels:
            return float(match[3])
    raise AssertionError(f"no {name} {labels} in:\n{text}")


async def test_a_defaulted_node_is_counted_in_prometheus_text(
        db_planner: Planner, metrics: Metrics, write_flow: Callable[..., Path]) -> None:
    write_flow(DEGRADED, name="shop")
    for x in (1, 2, 3):
        result = await db_planner.run("shop", {"x": x})
        assert result.status == "ok" and result.degraded
    text = metrics.text()
    assert _line(text, "planner_node_outcomes_total", flow="shop", node="broken", outcome="defaulted") == 3
    assert _line(text, "planner_node_outcomes_total", flow="shop", node="good", outcome="ok") == 3
    assert _line(text, "planner_flow_runs_total", flow="shop", status="ok") == 3
    assert _line(text, "planner_flow_runs_degraded_total", flow="shop") == 3
    assert _line(text, "planner_node_duration_seconds_count", flow="shop", node="broken", outcome="defaulted") == 3


async def test_a_defaulted_node_is_counted_in_opentelemetry(
        db_planner: Planner, reader: InMemoryMetricReader, write_flow: Callable[..., Path]) -> None:
    write_flow(DEGRADED, name="shop")
    for x in (1, 2):
        await db_planner.run("shop", {"x": x})
    points = _otel(reader)
    assert _point(points["planner.node.outcomes"], flow="shop", node="broken", outcome="defaulted").value == 2
    assert _point(points["planner.node.outcomes"], flow="shop", node="summary", outcome="ok").value == 2
    assert _point(points["planner.flow.runs.degraded"], flow="shop").value == 2
    assert _point(points["planner.node.duration"], flow="shop", node="good", outcome="ok").count == 2
    assert _point(points["planner.flow.duration"], flow="shop", status="ok").count == 2


async def test_a_run_that_defaults_nothing_is_not_degraded(
        db_planner: Planner, metrics: Metrics, write_flow: Callable[..., Path]) -> None:
    write_flow("nodes:\n  a: {sql: SELECT 1 AS v, fetch: one}\n", name="fine")
    await db_planner.run("fine")
    assert metrics.value("planner_flow_runs_total", flow="fine", status="ok") == 1
    assert metrics.value("planner_flow_runs_degraded_total", flow="fine") == 0


async def test_a_failed_run_is_counted_by_status(
        db_planner: Planner, metrics: Metrics, write_flow: Callable[..., Path]) -> None:
    write_flow("nodes:\n  a: {sql: SELECT 1/0, fetch: value, on_error: fail}\n", name="bad")
    with pytest.raises(planner_pkg.FlowFailed):
        await db_planner.run("bad")
    assert metrics.value("planner_flow_runs_total", flow="bad", status="failed") == 1
    assert metrics.value("planner_node_outcomes_total", flow="bad", node="a", outcome="failed") == 1


async def test_a_missing_required_row_is_counted_as_not_found_not_failed(
        db_planner: Planner, metrics: Metrics, write_flow: Callable[..., Path]) -> None:
    write_flow("nodes:\n  r: {sql: 'SELECT 1 AS v WHERE false', fetch: one, required: true}\n", name="row")
    with pytest.raises(planner_pkg.FlowNotFound):
        await db_planner.run("row")
    assert metrics.value("planner_flow_runs_total", flow="row", status="not_found") == 1
    assert metrics.value("planner_flow_runs_total", flow="row", status="failed") == 0


async def test_statements_and_round_trips_per_run(
        db_planner: Planner, metrics: Metrics, write_flow: Callable[..., Path]) -> None:
    # Two single statements (fused into one round trip, or two), and a list of two in a
    # transaction: two statements and BEGIN and COMMIT.
    write_flow("""
        nodes:
          one: {sql: "SELECT 1 AS v", fetch: one}
          listed:
            sql: ["SELECT 2", "SELECT 3"]
            fetch: value
        """, name="count")
    result = await db_planner.run("count", mode="sequential")  # alone: no fusion
    assert result.nodes["one"].served is not None and result.nodes["one"].served.fused == 1
    assert metrics.histogram("planner_flow_statements", flow="count") == (1, 3.0)
    assert metrics.histogram("planner_flow_round_trips", flow="count") == (1, 5.0)


async def test_a_fused_group_is_one_round_trip(
        db_planner: Planner, metrics: Metrics, write_flow: Callable[..., Path]) -> None:
    write_flow("""
        settings: {compile: false}
        nodes:
          a: {sql: "SELECT 1 AS v", fetch: one}
          b: {sql: "SELECT 2 AS w", fetch: one}
          c: {sql: "SELECT 3 AS u", fetch: one}
        """, name="fused")
    result = await db_planner.run("fused")
    fused = {n: r.served.fused for n, r in result.nodes.items() if r.served is not None}
    assert fused == {"a": 3, "b": 3, "c": 3}
    assert metrics.histogram("planner_flow_statements", flow="fused") == (1, 3.0)
    assert metrics.histogram("planner_flow_round_trips", flow="fused") == (1, 1.0)
    assert metrics.histogram("planner_node_fused_nodes", flow="fused", node="a") == (1, 3.0)
    assert {r.served.compiled for r in result.nodes.values() if r.served is not None} == {None}


async def test_a_compiled_statement_is_one_round_trip_and_not_reported_as_fused(
        db_planner: Planner, metrics: Metrics, write_flow: Callable[..., Path]) -> None:
    write_flow("""
        nodes:
          a: {sql: "SELECT 1 AS v", fetch: one}
          b: {sql: "SELECT 2 AS w", fetch: one}
          c: {sql: "SELECT 3 AS u", fetch: one}
        """, name="compiled")
    result = await db_planner.run("compiled")
    served = {n: r.served for n, r in result.nodes.items() if r.served is not None}
    assert {n: (s.compiled, s.compiled_nodes, s.fused) for n, s in served.items()} == {
        n: ("compiled#1", 3, 1) for n in "abc"}
    assert metrics.histogram("planner_flow_round_trips", flow="compiled") == (1, 1.0)
    assert metrics.histogram("planner_node_fused_nodes", flow="compiled", node="a") == (1, 1.0)


async def test_cache_hits_and_misses_are_read_from_the_cache(
        db_planner: Planner, metrics: Metrics, write_flow: Callable[..., Path]) -> None:
    write_flow('nodes:\n  a: {sql: "SELECT 1 AS v", fetch: one, cache: 60s}\n', name="cached")
    for _ in range(3):
        await db_planner.run("cached")
    db_planner.invalidate()
    text = metrics.text()
    assert _line(text, "planner_cache_misses_total") == 1
    assert _line(text, "planner_cache_hits_total") == 2
    assert _line(text, "planner_cache_invalidations_total") == 1
    # A cache hit sends nothing: the two later runs sent no statement.
    assert metrics.histogram("planner_flow_statements", flow="cached") == (3, 1.0)


async def test_pool_waits_and_connections(
        db_planner: Planner, metrics: Metrics, reader: InMemoryMetricReader, write_flow: Callable[..., Path]) -> None:
    write_flow("nodes:\n  a: {sql: SELECT 1, fetch: value}\n", name="p")
    await db_planner.run("p")
    count, _ = metrics.histogram("planner_pool_wait_seconds", pool="primary")
    assert count == 1
    assert metrics.value("planner_pool_connections", pool="primary", state="max") == 10
    assert metrics.value("planner_pool_waiting", pool="primary") == 0
    points = _otel(reader)
    assert _point(points["planner.pool.connections"], pool="primary", state="max").value == 10
    assert _point(points["planner.pool.wait"], pool="primary").count == 1


async def test_sync_call_waits_and_refusals(tmp_path: Path, metrics: Metrics, write_flow: Callable[..., Path]) -> None:
    write_flow("""
        nodes:
          slow: {call: tests.nodes:block, with: {seconds: 1.5}, default: x}
          quick: {call: tests.nodes:quick, default: refused, timeout: 300ms}
        """, name="sync")  # quick waits 300 ms for the one thread, then is refused (CallThreadsBusy)
    # Margins for a busy 2-core machine: slow holds the thread five times longer than quick waits.
    from tests import nodes

    nodes.unblock.clear()  # slow holds the thread its full 1.5 s (another test may have left it set)
    async with Planner(flows=tmp_path, metrics=metrics, call_options=CallOptions(allowed_modules=["tests"], threads=1)) as p:
        result = await p.run("sync")
        assert result.output == {"slow": "unblocked", "quick": "refused"}
        assert metrics.value("planner_call_rejected_total") == 1
        assert metrics.histogram("planner_call_wait_seconds")[0] == 1
        assert metrics.value("planner_call_threads", state="max") == 1
    # A closed planner's threads, pools and cache are no longer read.
    assert metrics.value("planner_call_threads", state="max") == 0


async def test_runs_refused_before_any_node_are_counted(tmp_path: Path, metrics: Metrics,
                                                         write_flow: Callable[..., Path]) -> None:
    write_flow("inputs: {x: int}\nnodes:\n  a: {sql: SELECT $x::int, fetch: value}\n", name="r")
    async with Planner(flows=tmp_path, dsn="postgresql://nobody@127.0.0.1:1/none", metrics=metrics) as p:
        with pytest.raises(FlowInputError):
            await p.run("r", {"x": "one"})
        with pytest.raises(DatabaseUnavailable):
            await p.run("r", {"x": 1})
    assert metrics.value("planner_flow_runs_total", flow="r", status="invalid_input") == 1
    assert metrics.value("planner_flow_runs_total", flow="r", status="unavailable") == 1


async def test_metrics_false_records_nothing(tmp_path: Path, write_flow: Callable[..., Path]) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n", name="off")
    async with Planner(flows=tmp_path, metrics=False, call_options=CallOptions(allowed_modules=["tests"])) as p:
        assert p.metrics is None
        await p.run("off")


async def test_planners_record_into_the_process_wide_registry_by_default(
        tmp_path: Path, write_flow: Callable[..., Path]) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n", name="process_wide_probe")
    async with Planner(flows=tmp_path, call_options=CallOptions(allowed_modules=["tests"])) as p:
        before = p.metrics.value("planner_flow_runs_total", flow="process_wide_probe", status="ok") if p.metrics else -1
        await p.run("process_wide_probe")
    assert _line(metrics_text(), "planner_flow_runs_total", flow="process_wide_probe", status="ok") == before + 1


def test_prometheus_text_declares_every_family_once_with_valid_names() -> None:
    text = Metrics(otel=False).text()
    declared = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
    assert [name for name, _ in declared] == [f.name for f in FAMILIES]
    for family in FAMILIES:
        assert re.fullmatch(r"planner_[a-z_]+", family.name)
        assert family.kind != "counter" or family.name.endswith("_total")
        assert family.unit != "s" or family.name.endswith("_seconds")


def _prometheus_name(family: Family) -> str:
    """What an OpenTelemetry SDK's Prometheus exporter calls an instrument (the specification's
    rules: dots to underscores, the unit `s` as `_seconds`, `{annotations}` dropped, `_total` on
    counters)."""
    name = family.otel.replace(".", "_")
    if family.unit == "s":
        name += "_seconds"
    return name + "_total" if family.kind == "counter" else name


def test_both_forms_give_one_name_per_metric() -> None:
    # PromQL written against planner_metrics_text() works on a collector's export, and back.
    assert [_prometheus_name(f) for f in FAMILIES] == [f.name for f in FAMILIES]


def test_label_values_are_escaped() -> None:
    metrics = Metrics(otel=False)
    metrics.add("planner_flow_runs_total", (("flow", 'a"b\\c\nd'), ("status", "ok")))
    assert 'planner_flow_runs_total{flow="a\\"b\\\\c\\nd",status="ok"} 1' in metrics.text()


def test_histogram_buckets_are_cumulative_and_end_at_inf() -> None:
    metrics = Metrics(otel=False)
    for seconds in (0.0004, 0.003, 0.003, 100.0):
        metrics.observe("planner_pool_wait_seconds", (("pool", "primary"),), seconds)
    text = metrics.text()
    assert _line(text, "planner_pool_wait_seconds_bucket", pool="primary", le="0.0005") == 1
    assert _line(text, "planner_pool_wait_seconds_bucket", pool="primary", le="0.005") == 3
    assert _line(text, "planner_pool_wait_seconds_bucket", pool="primary", le="30") == 3
    assert _line(text, "planner_pool_wait_seconds_bucket", pool="primary", le="+Inf") == 4
    assert _line(text, "planner_pool_wait_seconds_count", pool="primary") == 4


LATE_SDK = """
import asyncio, sys
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from planner import CallOptions, Planner

async def main():
    async with Planner(flows=sys.argv[1], call_options=CallOptions(allowed_modules=["tests"])) as planner:  # the process-wide Metrics
        await planner.run("t")                      # no SDK yet: nothing to record in OpenTelemetry
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        await planner.run("t")
        await planner.run("t")
        data = reader.get_metrics_data()
    points = [p for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
              if m.name == "planner.node.outcomes" for p in m.data.data_points]
    print(sum(p.value for p in points))

asyncio.run(main())
"""


@pytest.mark.subprocess
def test_a_meter_provider_set_after_the_planner_is_made_receives_the_later_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "t.yaml").write_text("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", LATE_SDK, str(tmp_path)], capture_output=True, text=True, cwd=root,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "2"  # the two runs after the SDK was set


async def test_every_degraded_answer_under_load_is_counted_and_logged(
        tmp_path: Path, metrics: Metrics, write_flow: Callable[..., Path], caplog: pytest.LogCaptureFixture) -> None:
    # The new user's item 1 in small: more sync calls at once than threads, each allowed to wait
    # 30 ms for one; those that cannot get one settle to their default. However many that is,
    # each degraded answer is in the metrics (and the alert's ratio) and in the log.
    write_flow("""
        nodes:
          summary: {call: tests.nodes:nap, with: {ms: 20, value: done}, timeout: 30ms, default: null}
        """, name="shop")
    with caplog.at_level(logging.WARNING, logger="planner"):
        async with Planner(flows=tmp_path, metrics=metrics, call_options=CallOptions(allowed_modules=["tests"], threads=2)) as planner:
            results = await asyncio.gather(*(planner.run("shop") for _ in range(40)))
            rejected = metrics.value("planner_call_rejected_total")
    degraded = sum(1 for r in results if r.degraded)
    assert degraded > 0 and all(r.status == "ok" for r in results)  # 200s, some on a fallback
    assert metrics.value("planner_flow_runs_degraded_total", flow="shop") == degraded
    assert metrics.value("planner_node_outcomes_total", flow="shop", node="summary", outcome="defaulted") == degraded
    assert metrics.value("planner_flow_runs_total", flow="shop", status="ok") == 40
    assert rejected >= 1
    logged = [r for r in caplog.records if getattr(r, "outcome", None) == "defaulted" and getattr(r, "flow", None) == "shop"]
    assert len(logged) == degraded


async def test_a_run_is_recorded_when_it_ends_not_node_by_node(
        tmp_path: Path, metrics: Metrics, write_flow: Callable[..., Path]) -> None:
    # Each node's outcome is counted from the run's records in one pass when the run ends (a
    # per-node hook cost a zero-latency node several microseconds): while `held` still waits,
    # `first`, already settled, is not yet in the figures.
    from tests import nodes

    write_flow("""
        nodes:
          first: {call: tests.nodes:step, with: {tag: first, signal: first_done}}
          held: {call: tests.nodes:step, with: {tag: held, wait: release, x: $first}}
        """, name="late")
    async with Planner(flows=tmp_path, metrics=metrics, call_options=CallOptions(allowed_modules=["tests"])) as p:
        run = asyncio.create_task(p.run("late"))
        await nodes.event("first_done").wait()
        await asyncio.sleep(0)  # `first` settles
        assert metrics.value("planner_node_outcomes_total", flow="late", node="first", outcome="ok") == 0
        nodes.event("release").set()
        await run
    assert metrics.value("planner_node_outcomes_total", flow="late", node="first", outcome="ok") == 1
    assert metrics.value("planner_node_outcomes_total", flow="late", node="held", outcome="ok") == 1
    assert metrics.value("planner_flow_runs_total", flow="late", status="ok") == 1


async def test_every_outcome_is_counted_and_only_nodes_that_ran_have_a_latency(
        tmp_path: Path, metrics: Metrics, write_flow: Callable[..., Path]) -> None:
    # One run settles a node of each outcome but `defaulted` (counted above): `fails` fails the
    # run while `slow` runs (cancelled) and `gated` is skipped by its `when`.
    write_flow("""
        nodes:
          ok: {call: tests.nodes:echo, with: {value: 1}}
          gated: {call: tests.nodes:echo, with: {value: 2}, when: "$ok == 0"}
          slow: {call: tests.nodes:sleep, with: {ms: 5000, tag: slow}}
          fails: {call: tests.nodes:fail, with: {x: $ok}, on_error: fail}
        """, name="mixed")
    async with Planner(flows=tmp_path, metrics=metrics, call_options=CallOptions(allowed_modules=["tests"])) as p:
        with pytest.raises(planner_pkg.FlowFailed) as failed:
            await p.run("mixed")
    assert failed.value.result.states() == {"ok": "ok", "gated": "skipped", "slow": "cancelled", "fails": "failed"}
    for node, outcome, ran in (("ok", "ok", True), ("gated", "skipped", False), ("slow", "cancelled", True),
                               ("fails", "failed", True)):
        assert metrics.value("planner_node_outcomes_total", flow="mixed", node=node, outcome=outcome) == 1, node
        count, _ = metrics.histogram("planner_node_duration_seconds", flow="mixed", node=node, outcome=outcome)
        assert count == (1 if ran else 0), node
    assert metrics.value("planner_flow_runs_total", flow="mixed", status="failed") == 1
    assert metrics.histogram("planner_flow_duration_seconds", flow="mixed", status="failed")[0] == 1


async def test_a_run_its_caller_cancels_is_counted_as_cancelled_not_ok(
        tmp_path: Path, metrics: Metrics, write_flow: Callable[..., Path]) -> None:
    # A client that goes away cancels its run: that is no answer, and counting it as an "ok" run
    # (as it was) would hide every request a slow flow lost behind the success rate.
    from tests import nodes

    write_flow("nodes:\n  held: {call: tests.nodes:step, with: {tag: held, signal: started, wait: never}}\n",
               name="gone")
    async with Planner(flows=tmp_path, metrics=metrics, call_options=CallOptions(allowed_modules=["tests"])) as p:
        run = asyncio.create_task(p.run("gone"))
        await nodes.event("started").wait()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    assert metrics.value("planner_flow_runs_total", flow="gone", status="cancelled") == 1
    assert metrics.value("planner_flow_runs_total", flow="gone", status="ok") == 0
    assert metrics.value("planner_node_outcomes_total", flow="gone", node="held", outcome="cancelled") == 1
