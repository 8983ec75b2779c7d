"""Pictures and plans that tell the truth: figures people can read, no "0 ms" estimate made of
nothing, recorded latencies where hints are missing, a traced run's own critical path, and
every node's error or reason to be skipped shown on the drawing itself."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from planner import CallOptions, FlowFailed, FlowResult, Planner
from planner.graph import CompiledFlow, compile_flow, plan
from planner.kinds.backend import Offline
from planner.lang.loader import load_text
from planner.views import draw, render
from planner.views.render import NO_LATENCY, estimate, ms_number, ms_text, run_critical_path
from planner.views.trace import RunData, Span, read_trace, write_trace

SVG = "{http://www.w3.org/2000/svg}"
RED = draw.RED


def _flow(text: str, name: str = "f") -> CompiledFlow:
    return compile_flow(load_text(text, name=name))


def _visible_text(svg: str, node: str) -> str:
    """What a node's box shows, without its tooltips (`<title>`)."""
    root = ET.fromstring(svg)
    g = next(g for g in root.iter(f"{SVG}g") if g.get("data-node") == node)
    return " | ".join("".join(t.itertext()) if t.find(f"{SVG}title") is None else (t[0].tail or "")
                      for t in g.iter(f"{SVG}text"))


def _tooltips(svg: str, node: str) -> str:
    root = ET.fromstring(svg)
    g = next(g for g in root.iter(f"{SVG}g") if g.get("data-node") == node)
    return "\n".join(t.text or "" for t in g.iter(f"{SVG}title"))


def _red_edges(svg: str) -> set[tuple[str | None, str | None]]:
    root = ET.fromstring(svg)
    return {(p.get("data-from"), p.get("data-to")) for p in root.iter(f"{SVG}path") if p.get("stroke") == RED}


# --- numbers for people ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "text"),
    [(2.5725, "2.6"), (50.0, "50"), (100.4, "100"), (1234.56, "1235"), (12.34, "12.3"), (1.0, "1"),
     (0.997, "1"), (0.0436, "0.04"), (0.5, "0.5"), (0.001, "<0.01"), (0.0, "0"), (99.96, "100")],
)
def test_durations_are_rounded_for_people(ms: float, text: str) -> None:
    assert ms_number(ms) == text
    assert ms_text(ms) == f"{text} ms"


# --- what is known of latency ---------------------------------------------------------------

NO_HINTS = "nodes:\n  a: {sql: SELECT 1}\n  b: {sql: SELECT $a}\n  c: {sql: 'SELECT $a, $b'}\n"


@pytest.mark.parametrize("fmt", ["svg", "html", "dot", "mermaid"])
def test_without_hints_or_records_every_format_says_no_latency_is_known(fmt: str) -> None:
    flow = _flow(NO_HINTS)
    p = plan(flow)
    out = {"svg": draw.svg, "html": draw.html, "dot": render.dot, "mermaid": render.mermaid}[fmt](flow, p)
    assert NO_LATENCY in out
    assert "0 ms" not in out and "sequential" not in out  # no estimate made of nothing
    if fmt == "svg":
        assert _red_edges(out) == set()  # and no critical path: every path weighs 0


def test_without_hints_or_records_the_plan_json_has_no_estimate() -> None:
    flow = _flow(NO_HINTS)
    data = render.plan_json(flow, plan(flow))
    assert data["latency_source"] == "none" and data["latency_note"] == NO_LATENCY
    assert data["sequential_ms"] is None and data["parallel_ms"] is None and data["critical_path"] == []
    assert all(n["expected_ms"] is None and n["latency_from"] is None for n in data["nodes"])


def test_recorded_latencies_fill_in_missing_hints_rounded() -> None:
    flow = _flow("nodes:\n  a: {sql: SELECT 1, latency: 50ms}\n  b: {sql: SELECT $a}\n  c: {sql: SELECT $b}\n")
    recorded = {"b": 2.5725}
    p = plan(flow, recorded)
    est = estimate(flow, p, recorded)
    assert est.source == "recorded runs and latency: hints" and est.unknown == ("c",)
    assert est.origin == {"a": "hint", "b": "recorded"}
    svg = draw.svg(flow, p, recorded=recorded)
    assert "SQL · 2.6 ms" in _visible_text(svg, "b") and "2.5725" not in svg
    assert "median of recorded runs" in _tooltips(svg, "b") and "latency: hint" in _tooltips(svg, "a")
    assert "1 node without a latency counted as 0" in svg
    assert "sequential 52.6 ms, parallel 52.6 ms" in svg
    page = draw.html(flow, p, recorded=recorded)
    assert "recorded runs and latency: hints" in page and "2.6 (recorded)" in page


def test_a_record_is_told_from_a_hint_without_being_given_the_records() -> None:
    flow = _flow("nodes:\n  a: {sql: SELECT 1, latency: 5ms}\n  b: {sql: SELECT $a}\n")
    assert estimate(flow, plan(flow, {"b": 3.0})).origin == {"a": "hint", "b": "recorded"}


# --- a traced run's critical path -----------------------------------------------------------

FORK = ("nodes:\n  slow_hint: {sql: SELECT 1, latency: 100ms}\n  fast_hint: {sql: SELECT 2, latency: 1ms}\n"
        "  join: {sql: 'SELECT $slow_hint, $fast_hint', latency: 1ms}\n")


def _run(flow: CompiledFlow, spans: list[tuple[str, str, float, float]], states: dict[str, str] | None = None,
         **extra: Any) -> RunData:
    made = [Span(n, s, a, b, i, extra.get("errors", {}).get(n)) for i, (n, s, a, b) in enumerate(spans)]
    every = {n: s for n, s, _, _ in spans} | (states or {})
    return RunData(flow.name, "ok", max(b for _, _, _, b in spans), every, made, extra.get("skipped", {}))


def test_with_a_trace_the_run_s_own_critical_path_is_marked() -> None:
    flow = _flow(FORK)
    p = plan(flow)
    assert p.critical_path == ("slow_hint", "join")  # what the hints expect
    run = _run(flow, [("slow_hint", "ok", 0.0, 1.0), ("fast_hint", "ok", 0.0, 5.0), ("join", "ok", 5.1, 6.0)])
    assert run_critical_path(flow, run) == ("fast_hint", "join")  # what happened: join waited for fast_hint
    svg = draw.svg(flow, p, run)
    assert _red_edges(svg) == {("fast_hint", "join")}
    assert "critical path of this run (by finish times): fast_hint → join" in svg
    assert "estimate: sequential 102 ms, parallel 101 ms" in svg
    mermaid = render.mermaid(flow, p, run)
    assert "  class n_fast_hint,n_join critical" in mermaid and "n_fast_hint ==> n_join" in mermaid
    dot = render.dot(flow, p, run)
    assert '"fast_hint" -> "join" [color="#c0392b"' in dot and '"slow_hint" -> "join";' in dot
    assert "CRITICAL (THIS RUN)".lower() in draw.html(flow, p, run)


def test_the_run_s_critical_path_passes_through_a_skipped_node() -> None:
    flow = _flow("nodes:\n  a: {sql: SELECT 1}\n  s: {sql: SELECT $a, when: 'false'}\n  b: {sql: SELECT 2}\n"
                 "  c: {sql: 'SELECT $s, $b'}\n")
    run = _run(flow, [("a", "ok", 0.0, 4.0), ("b", "ok", 0.0, 2.0), ("c", "ok", 4.1, 5.0)], {"s": "skipped"})
    assert run_critical_path(flow, run) == ("a", "s", "c")


def test_a_trace_with_no_spans_marks_the_estimate_s_path() -> None:
    flow = _flow(FORK)
    run = RunData(flow.name, "failed", 1.0, {"slow_hint": "cancelled", "fast_hint": "cancelled", "join": "cancelled"}, [])
    assert render.picture(flow, plan(flow), run).critical_path == ("slow_hint", "join")


# --- errors and reasons, from a real (offline) run ------------------------------------------

OUTCOMES = """
inputs:
  x: int
  obj: {type: dict, required: false}
nodes:
  none: {call: tests.nodes:echo, with: {value: null}}
  short: {call: tests.nodes:echo, with: {value: [1, 2]}}
  by_null: {call: tests.nodes:echo, with: {value: $none.id}}
  by_short_list: {call: tests.nodes:echo, with: {value: $short.3}}
  one: {call: tests.nodes:echo, with: {value: 1}}
  by_when: {call: tests.nodes:echo, with: {value: 2}, when: $one == 2}
  by_null_in_when: {call: tests.nodes:echo, with: {value: 3}, when: $none.flag}
  by_input: {call: tests.nodes:echo, with: {value: 4}, when: $x == 1}
  broken: {call: tests.nodes:fail, with: {message: "the remote said <no>"}, default: 0}
  by_null_input: {call: tests.nodes:echo, with: {value: $obj.id}, when: $one == 1 or $none.flag}
"""


@pytest.fixture
def outcome_trace(tmp_path: Path) -> tuple[CompiledFlow, RunData]:
    import asyncio

    flow = _flow(OUTCOMES, name="outcomes")
    result = asyncio.run(Planner(backend=Offline(), call_options=CallOptions(allowed_modules=["tests"])).run(flow, {"x": 2}))
    write_trace(result, flow, tmp_path / "t.json")
    return flow, read_trace(tmp_path / "t.json", flow)


def test_the_trace_records_why_each_skipped_node_was_skipped(outcome_trace: tuple[CompiledFlow, RunData]) -> None:
    flow, run = outcome_trace
    assert run.skipped == {"by_null": "$none is null", "by_short_list": "$short has no item 3", "by_when": "when false",
                           "by_null_in_when": "$none is null"}
    # by_input's `when:` reads an input, which a trace is not told; by_null_input's null is the
    # input $obj, and its `when:` never read `$none.flag` (`or`): no reason rather than a wrong one
    assert run.states["by_input"] == run.states["by_null_input"] == "skipped"
    notes = render.outcomes(flow, run)
    assert notes["by_input"] == "skipped (when: $x == 1)"
    assert notes["broken"] == "defaulted: ValueError: the remote said <no>"


@pytest.mark.parametrize(
    ("node", "shown"),
    [("by_null", "skipped: $none is null"), ("by_when", "skipped: when false"), ("by_short_list", "skipped: $short has no item 3"),
     ("broken", "ValueError: the remote said <no>")],
)
def test_the_drawing_shows_each_node_s_error_or_reason_on_its_box(outcome_trace: tuple[CompiledFlow, RunData], node: str, shown: str) -> None:
    flow, run = outcome_trace
    svg = draw.svg(flow, plan(flow), run)
    assert shown in _visible_text(svg, node)
    page = draw.html(flow, plan(flow), run)
    assert shown.removeprefix("skipped: ").replace("<", "&lt;").replace(">", "&gt;") in page  # the table's column


def test_a_failed_node_s_error_is_on_its_box_and_in_mermaid_and_dot(tmp_path: Path) -> None:
    import asyncio

    flow = _flow("nodes:\n  a: {call: tests.nodes:fail, with: {message: out of luck}, on_error: fail}\n  b: {call: tests.nodes:echo, with: {value: $a}}\n")
    with pytest.raises(FlowFailed) as info:
        asyncio.run(Planner(backend=Offline(), call_options=CallOptions(allowed_modules=["tests"])).run(flow, {}))
    result: FlowResult = info.value.result
    write_trace(result, flow, tmp_path / "t.json")
    run = read_trace(tmp_path / "t.json", flow)
    svg = draw.svg(flow, plan(flow), run)
    assert "ValueError: out of luck" in _visible_text(svg, "a")
    assert "failed: ValueError: out of luck" in render.mermaid(flow, plan(flow), run)
    assert "failed: ValueError: out of luck" in render.dot(flow, plan(flow), run)


def test_an_older_trace_without_reasons_shows_the_when_as_written(tmp_path: Path) -> None:
    import json

    root = Path(__file__).resolve().parents[2]
    flow = compile_flow(load_text((root / "flows" / "process_buffered.yaml").read_text(), name="process_buffered"))
    data = json.loads((root / "docs" / "process_buffered.trace.json").read_text())
    data["otherData"].pop("skipped", None)
    (tmp_path / "old.json").write_text(json.dumps(data))
    run = read_trace(tmp_path / "old.json", flow)
    assert run.skipped == {}
    assert render.outcomes(flow, run)["mark_duplicate_processed"] == "skipped (when: $is_duplicate)"


def test_a_long_when_is_whole_in_its_tooltip_and_the_table_and_the_box_keeps_its_size() -> None:
    long_when = " and ".join(f"$a.field_{i} != {i}" for i in range(20))
    flow = _flow(f"nodes:\n  a: {{sql: SELECT 1, latency: 1ms}}\n  b: {{sql: SELECT 2, when: '{long_when}'}}\n")
    svg = draw.svg(flow, plan(flow))
    shown = _visible_text(svg, "b")
    assert long_when not in shown and re.search(r"when \$a\.field_0 != 0 and \$a\.fi.*…", shown)
    assert f"when {long_when}" in _tooltips(svg, "b")
    box = next(r for r in ET.fromstring(svg).iter(f"{SVG}rect") if r.get("rx") == "8" and r.get("width") == str(draw.NODE_W))
    assert float(box.get("height") or 0) == draw.NODE_H
    page = draw.html(flow, plan(flow))
    assert f'<td class="c6">{long_when.replace("$", "$")}</td>' in page.replace("&#x27;", "'")
    assert "td.c6,td.c8{max-width:380px;white-space:pre-wrap;overflow-wrap:break-word}" in page
