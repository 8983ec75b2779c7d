"""`planner plan`, `visualize`, `list` (planner/cli/flows.py): what a flow would do, drawn or tabled, and the latencies they read."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import ROOT, SIBLINGS, cli, one_line_error, table_rows

pytestmark = pytest.mark.subprocess  # each test runs the console script


NO_HINTS = "nodes:\n  a: {sql: SELECT 1}\n  b: {sql: SELECT $a}\n  c: {sql: 'SELECT $a, $b'}\n"


def _record(flow: str, latencies: dict[str, Any], flows: Path) -> None:
    """Latencies as `planner run` records them (`planner.views.stats`), in the test's own PLANNER_HOME."""
    from planner.views.stats import stats_path

    path = stats_path(flow, flows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(latencies))


SEED_TRACE = ROOT / "docs" / "process_buffered.trace.json"


def _trace_with(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    data = json.loads(SEED_TRACE.read_text())
    change(data)
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(data))
    return path


def _first_span(data: dict[str, Any]) -> dict[str, Any]:
    span: dict[str, Any] = next(e for e in data["traceEvents"] if e["ph"] == "X")
    return span


def test_plan_prints_the_seed_table() -> None:
    proc = cli("plan", "process_buffered")
    assert proc.returncode == 0, proc.stderr
    assert "critical path: instance -> conversation -> history -> store_message" in proc.stdout
    assert "sequential 530 ms, parallel 250 ms: 53% lower" in proc.stdout
    history = next(line for line in proc.stdout.splitlines() if line.startswith("history "))
    assert re.search(r"conversation\s+3\s+100\s+\*", history)


def test_plan_json_has_groups_and_estimate() -> None:
    data = json.loads(cli("plan", "escalation", "--json").stdout)
    assert data["groups"] == [["settings", "interactions"], ["decide"], ["record"]]
    assert data["latency_source"] == "latency: hints"
    assert data["sequential_ms"] == 151 and data["parallel_ms"] == 101


def test_plan_uses_recorded_latencies_after_runs(demo_dsn: str) -> None:
    env: dict[str, str] = {}
    proc = cli("run", "escalation", "-i", "instance_id=1", "-i", "user_phone=+15550000001", "-i", "message=hi", "--db", demo_dsn, env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(cli("plan", "escalation", "--json", env=env).stdout)
    # `record` was skipped (no escalation): it keeps its hint, and the plan says so
    assert data["latency_source"] == "recorded runs and latency: hints"
    assert data["nodes"][0]["expected_ms"] < 50 and data["nodes"][0]["latency_from"] == "recorded"  # a local query, not the 50 ms hint
    assert {n["node"]: n["latency_from"] for n in data["nodes"]}["record"] == "hint"


def test_plan_without_hints_or_records_says_no_latency_is_known(tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text(NO_HINTS)
    proc = cli("plan", "f", "--flows", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "no latency known: add latency: hints or run the flow" in proc.stdout
    assert "0 ms" not in proc.stdout and "critical path" not in proc.stdout
    data = json.loads(cli("plan", "f", "--flows", str(tmp_path), "--json").stdout)
    assert data["sequential_ms"] is None and data["critical_path"] == [] and data["latency_source"] == "none"


def test_plan_uses_recorded_latencies_where_hints_are_missing_rounded(tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text(NO_HINTS)
    _record("f", {"a": [2.5725], "b": [1.0, 1.25, 9.0], "c": [0.5]}, tmp_path)
    proc = cli("plan", "f", "--flows", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "expected times from recorded runs" in proc.stdout
    assert re.search(r"^a\s+sql\s+-\s+1\s+2\.6\s+\*", proc.stdout, re.M), proc.stdout
    assert "critical path: a -> b -> c" in proc.stdout
    assert "sequential 4.3 ms, parallel 4.3 ms" in proc.stdout and "2.5725" not in proc.stdout


def test_plan_counts_a_fused_statements_time_once(tmp_path: Path) -> None:
    # a, b and c went as one 10 ms statement: each recorded 10 ms. Sequentially that is one
    # statement's 10 ms, not 30 ms (which made the speedup look three times what it was).
    (tmp_path / "f.yaml").write_text(SIBLINGS)
    _record("f", {"a": [10.0], "b": [10.0], "c": [10.0], "#fused": {"a": [3], "b": [3], "c": [3]}}, tmp_path)
    data = json.loads(cli("plan", "f", "--flows", str(tmp_path), "--json").stdout)
    assert data["sequential_ms"] == 10 and data["parallel_ms"] == 10


@pytest.mark.parametrize("fmt", ["svg", "html", "dot", "mermaid"])
def test_visualize_uses_recorded_latencies_like_plan(fmt: str, tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text(NO_HINTS)
    before = cli("visualize", "f", "--flows", str(tmp_path), "--format", fmt)
    assert before.returncode == 0, before.stderr
    assert "no latency known: add latency: hints or run the flow" in before.stdout
    _record("f", {"a": [2.5725], "b": [1.25], "c": [0.5]}, tmp_path)
    after = cli("visualize", "f", "--flows", str(tmp_path), "--format", fmt).stdout
    assert "sql · 2.6 ms" in after.replace("SQL", "sql") and "no latency known" not in after
    if fmt in ("svg", "html", "dot"):
        assert "sequential 4.3 ms, parallel 4.3 ms" in after


def test_mermaid_has_every_edge_and_survives_a_node_named_end(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("nodes:\n  end: {sql: SELECT 1}\n  o: {sql: SELECT $end}\n  x: {sql: 'SELECT $o, $end', when: '$o != \"<b>\"'}\n")
    out = cli("visualize", "m", "--flows", str(tmp_path), "--format", "mermaid").stdout
    edges = set(re.findall(r"^\s+(n_\w+) [-=.]+> (n_\w+)$", out, re.M))
    assert edges == {("n_end", "n_o"), ("n_o", "n_x"), ("n_end", "n_x")}
    assert '"x<br/>sql<br/>when $o != #quot;#lt;b#gt;#quot;"' in out
    assert re.search(r'subgraph g1\["group 1"\]', out)


def test_mermaid_refuses_more_than_500_edges(tmp_path: Path) -> None:
    lines = ["nodes:", "  root: {sql: SELECT 1}"] + [f"  n{i}: {{sql: SELECT $root}}" for i in range(501)]
    (tmp_path / "big.yaml").write_text("\n".join(lines) + "\n")
    assert "500 edges" in one_line_error(cli("visualize", "big", "--flows", str(tmp_path)), 2)


def test_dot_has_clusters_and_every_edge() -> None:
    out = cli("visualize", "process_buffered", "--format", "dot").stdout
    assert out.count("subgraph cluster_g") == 4
    edges = set(re.findall(r'^\s+"(\w+)" -> "(\w+)"', out, re.M))
    assert ("instance", "conversation") in edges and ("history", "store_message") in edges
    assert len(edges) == 11


def test_visualize_writes_svg_with_every_node_and_edge(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    out = tmp_path / "g.svg"
    proc = cli("visualize", "process_buffered", "--format", "svg", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    root = ET.fromstring(out.read_text())
    ns = {"s": "http://www.w3.org/2000/svg"}
    nodes = {g.get("data-node") for g in root.iterfind(".//s:g[@data-node]", ns)}
    edges = {(p.get("data-from"), p.get("data-to")) for p in root.iterfind(".//s:path[@data-from]", ns)}
    assert nodes == {"instance", "conversation", "webhook_config", "is_escalated", "is_duplicate", "history",
                     "recent_messages", "store_message", "mark_duplicate_processed"}
    assert len(edges) == 11 and ("conversation", "history") in edges


@pytest.mark.parametrize("fmt", ["svg", "html"])
def test_visualize_refuses_a_trace_with_markup_for_a_state(fmt: str, tmp_path: Path) -> None:
    trace = _trace_with(tmp_path, lambda d: _first_span(d)["args"].update(state="</title><script>alert(1)</script>"))
    proc = cli("visualize", "process_buffered", "--format", fmt, "--trace", str(trace))
    line = one_line_error(proc, 2)
    assert f"--trace {trace}: not a planner trace: traceEvents[" in line and "].args.state: " in line
    assert proc.stdout == ""


def test_visualize_refuses_a_trace_whose_state_is_not_a_string(tmp_path: Path) -> None:
    trace = _trace_with(tmp_path, lambda d: d["otherData"]["states"].update(instance=5))
    line = one_line_error(cli("visualize", "process_buffered", "--format", "html", "--trace", str(trace)), 2)
    assert "otherData.states['instance']: 5 is not one of ok, defaulted, skipped, failed, cancelled" in line


def test_visualize_refuses_a_missing_trace_file(tmp_path: Path) -> None:
    line = one_line_error(cli("visualize", "process_buffered", "--format", "svg", "--trace", str(tmp_path / "nope.json")), 2)
    assert line == f"planner: --trace {tmp_path / 'nope.json'}: cannot read it: No such file or directory"


def test_visualize_refuses_a_trace_of_another_flow() -> None:
    line = one_line_error(cli("visualize", "escalation", "--format", "svg", "--trace", str(SEED_TRACE)), 2)
    assert "a trace of flow 'process_buffered', not of 'escalation'" in line


def test_visualize_draws_an_error_with_markup_as_text(tmp_path: Path) -> None:
    trace = _trace_with(tmp_path, lambda d: _first_span(d)["args"].update(error='QueryError: "><script>alert(1)</script>'))
    proc = cli("visualize", "process_buffered", "--format", "html", "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    assert "<script>" not in proc.stdout
    assert "QueryError: &quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in proc.stdout


def test_plan_shows_a_when_over_several_lines_on_one_row(tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text("nodes:\n  a: {sql: SELECT 1}\n  b:\n    sql: SELECT 2\n    when: |\n      $a\n      != 1\n")
    proc = cli("plan", "f", "--flows", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert rows[1].startswith("b ") and rows[1].endswith("$a != 1") and rows[2].startswith("no latency known: ")


def test_plan_shows_statements_and_round_trips_with_and_without_the_cache() -> None:
    proc = cli("plan", "process_buffered")
    assert proc.returncode == 0, proc.stderr
    assert ("statements per run: at most 7 (5 with the cache warm); longest chain of round trips: 4 "
            "(3 with the cache warm); fused: is_duplicate+history+recent_messages") in proc.stdout
    data = json.loads(cli("plan", "process_buffered", "--json").stdout)
    assert data["round_trips"]["critical_cache_warm"] == 3 and data["round_trips"]["statements"] == 7


def test_list_shows_each_flow_and_its_inputs() -> None:
    proc = cli("list")
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert rows[0].split() == ["escalation", "instance_id", "int", "(required)"]
    assert any(r.split() == ["history_limit", "int", "20"] for r in rows)
    data = json.loads(cli("list", "--json").stdout)
    assert set(data) == {"escalation", "process_buffered"}
    assert data["process_buffered"]["inputs"]["history_limit"] == {"type": "int", "required": False, "default": 20,
                                                                 "description": None}
    assert data["escalation"]["nodes"] == 4


def test_list_reports_a_flow_that_does_not_load(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text("inputs: {n: {type: int, default: 3}}\nnodes:\n  a: {sql: SELECT 1}\n")
    (tmp_path / "bad.yaml").write_text("nodes:\n  a: {sql: SELECT 1, fecth: one}\n")
    (tmp_path / "none.yaml").write_text("nodes:\n  a: {sql: SELECT 1}\n")
    proc = cli("list", "--flows", str(tmp_path))
    assert proc.returncode == 1
    assert [r.split()[:2] for r in table_rows(proc.stdout)] == [["bad", "(does"], ["good", "n"], ["none", "-"]]
    assert "unknown key 'fecth' (did you mean 'fetch'?)" in proc.stderr


def test_plan_ignores_latencies_recorded_for_another_folder(tmp_path: Path, demo_dsn: str) -> None:
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "f.yaml").write_text("nodes:\n  a: {sql: SELECT 1, fetch: value, latency: 700ms}\n")
    assert cli("run", "f", "--flows", str(tmp_path / "one"), "--db", demo_dsn).returncode == 0
    one = json.loads(cli("plan", "f", "--flows", str(tmp_path / "one"), "--json").stdout)
    two = json.loads(cli("plan", "f", "--flows", str(tmp_path / "two"), "--json").stdout)
    assert one["latency_source"] == "recorded runs" and one["nodes"][0]["expected_ms"] < 700
    assert two["latency_source"] == "latency: hints" and two["nodes"][0]["expected_ms"] == pytest.approx(700)
