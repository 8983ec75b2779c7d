"""OpenTelemetry: a span per run and per node, when an SDK is configured (in a subprocess,
since a tracer provider is process-wide), and none without one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from planner.run import telemetry

SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from planner import CallOptions, Planner

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    async def main():
        planner = Planner(flows=sys.argv[1], call_options=CallOptions(allowed_modules=["tests"]))
        await planner.run("t")

    asyncio.run(main())
    print(json.dumps([{"name": s.name, "parent": s.parent.span_id if s.parent else None, "id": s.context.span_id,
                       "attributes": dict(s.attributes), "status": s.status.status_code.name} for s in exporter.get_finished_spans()]))
""")


@pytest.mark.subprocess
def test_runs_and_nodes_become_spans(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(
        "nodes:\n"
        "  a: {call: tests.nodes:echo, with: {value: 1}}\n"
        "  b: {call: tests.nodes:fail, default: 0}\n"
        "  c: {call: tests.nodes:echo, with: {value: $a}, when: 'false'}\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, cwd=root, timeout=60)
    assert proc.returncode == 0, proc.stderr
    spans = {s["name"]: s for s in json.loads(proc.stdout.strip().splitlines()[-1])}
    flow = spans["planner.flow t"]
    assert flow["attributes"]["planner.flow.status"] == "ok" and flow["parent"] is None
    assert spans["planner.node a"]["attributes"]["planner.node.outcome"] == "ok"
    assert spans["planner.node a"]["attributes"]["planner.node.kind"] == "call"
    assert spans["planner.node b"]["attributes"]["planner.node.outcome"] == "defaulted"
    assert spans["planner.node b"]["status"] == "ERROR"
    assert all(spans[f"planner.node {n}"]["parent"] == flow["id"] for n in ("a", "b"))
    assert "planner.node c" not in spans  # skipped: it never ran


def test_without_an_sdk_nothing_is_traced() -> None:
    assert telemetry.tracer() is None


LATE = textwrap.dedent("""
    import asyncio, sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from planner import CallOptions, Planner

    async def main():
        planner = Planner(flows=sys.argv[1], call_options=CallOptions(allowed_modules=["tests"]))
        await planner.run("t")                      # no SDK yet: nothing traced (and the check remembered)
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        await planner.run("t")
        print(sorted(s.name for s in exporter.get_finished_spans()))

    asyncio.run(main())
""")


@pytest.mark.subprocess
def test_a_tracer_provider_set_after_a_run_traces_the_later_runs(tmp_path: Path) -> None:
    # Whether an SDK is there is asked on every run, cheaply once the API's stand-in has answered
    # (tracer()); a provider set later must still be found.
    (tmp_path / "t.yaml").write_text("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", LATE, str(tmp_path)], capture_output=True, text=True, cwd=root, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['planner.flow t', 'planner.node a']"
