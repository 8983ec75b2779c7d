"""The `planner` console script, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOWS = ROOT / "flows"
PLANNER = str(Path(sys.executable).parent / "planner")


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    full_env.pop("PLANNER_MODE", None)
    return subprocess.run([PLANNER, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=120)


@pytest.fixture(autouse=True)
def _own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded latencies go to a folder of the test's own, never the user's."""
    monkeypatch.setenv("PLANNER_HOME", str(tmp_path / "planner-home"))


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("planner: ")
    return lines[0]


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
    assert data["latency_source"] == "recorded runs"
    assert data["nodes"][0]["expected_ms"] < 50  # a local query, not the 50 ms hint


def test_run_prints_a_node_table_and_the_output(demo_dsn: str) -> None:
    proc = cli("run", "escalation", "-i", "instance_id=1", "-i", "user_phone=+15550000001", "-i", "message=a human please", "--db", demo_dsn)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^record\s+3\s+ok\s", proc.stdout, re.M)
    assert '"reason": "keyword: human"' in proc.stdout


def test_run_json_is_machine_readable(demo_dsn: str, tmp_path: Path) -> None:
    inputs = tmp_path / "in.json"
    inputs.write_text(json.dumps({"instance_name": "acme", "user_phone": "+15550000001", "message": "hi"}))
    proc = cli("run", "process_buffered", "--inputs", str(inputs), "--json", "--mode", "layered", "--db", demo_dsn)
    data = json.loads(proc.stdout)
    assert data["status"] == "ok" and data["mode"] == "layered"
    assert data["nodes"]["store_message"]["state"] == "ok"
    assert isinstance(data["output"]["history"][0]["created_at"], str)  # datetimes as ISO text


def test_run_writes_a_trace_with_a_lane_per_concurrent_node(demo_dsn: str, tmp_path: Path) -> None:
    trace = tmp_path / "run.json"
    proc = cli("run", "process_buffered", "-i", "instance_name=acme", "-i", "user_phone=+15550000001", "-i", "message=x",
               "--trace", str(trace), "--db", demo_dsn)
    assert proc.returncode == 0, proc.stderr
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["name"] for e in events} >= {"instance", "conversation", "history"}
    by_lane: dict[int, list[tuple[float, float]]] = {}
    for e in events:
        by_lane.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_lane.values():
        spans.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))


def test_a_failed_run_exits_1(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text("nodes:\n  a: {sql: SELECT 1/0, on_error: fail}\n")
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(r"^a\s+1\s+failed", proc.stdout, re.M)


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        pytest.param(["run", "nope"], 2, "no flow named 'nope'", id="unknown-flow"),
        pytest.param(["run", "escalation", "-i", "instance_id=abc"], 2, "not a valid int", id="bad-input-type"),
        pytest.param(["run", "escalation", "-i", "instance_id"], 2, "write key=value", id="bad-input-form"),
        pytest.param(["run", "escalation", "-i", "zzz=1"], 2, "has no input 'zzz'", id="unknown-input"),
        pytest.param(["run", "escalation", "-i", "instance_id=1"], 2, "missing input", id="missing-input"),
        pytest.param(["plan"], 2, "Missing argument", id="missing-argument"),
        pytest.param(["frobnicate"], 2, "No such command", id="unknown-command"),
        pytest.param(["visualize", "escalation", "--format", "png"], 2, "--format 'png'", id="bad-format"),
        pytest.param(["run", "escalation", "--mode", "fast", "-i", "instance_id=1", "-i", "user_phone=x", "-i", "message=m", "--db", "postgresql://u@127.0.0.1:1/x"], 2, "unknown mode", id="bad-mode"),
    ],
)
def test_usage_mistakes_print_one_line_and_exit_2(args: list[str], code: int, needle: str) -> None:
    assert needle in _one_line_error(cli(*args), code)


def test_an_inputs_file_that_is_not_an_object_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text("[1, 2]")
    line = _one_line_error(cli("run", "escalation", "--inputs", str(tmp_path / "in.json")), 2)
    assert "JSON object" in line


def test_a_broken_flow_file_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("nodes:\n  a:\n    sql: SELECT 1\n    fetch: many\n")
    line = _one_line_error(cli("plan", "bad", "--flows", str(tmp_path)), 1)
    assert f"{tmp_path / 'bad.yaml'}:4:" in line and "node 'a'" in line


def test_an_unreachable_database_prints_one_line_and_exits_2() -> None:
    proc = cli("run", "escalation", "-i", "instance_id=1", "-i", "user_phone=x", "-i", "message=m", "--db", "postgresql://u@127.0.0.1:1/x")
    assert "cannot reach the database" in _one_line_error(proc, 2)


def test_help_shows_an_example() -> None:
    for command in ("run", "plan", "visualize", "validate", "schema", "demo"):
        proc = cli(command, "--help")
        assert proc.returncode == 0 and "Example: planner" in proc.stdout, command


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
    assert "500 edges" in _one_line_error(cli("visualize", "big", "--flows", str(tmp_path)), 2)


def test_dot_has_clusters_and_every_edge() -> None:
    out = cli("visualize", "process_buffered", "--format", "dot").stdout
    assert out.count("subgraph cluster_g") == 4
    edges = set(re.findall(r'^\s+"(\w+)" -> "(\w+)"', out, re.M))
    assert ("instance", "conversation") in edges and ("history", "store_message") in edges
    assert len(edges) == 11


def test_schema_validates_the_seed_flows_and_rejects_a_bad_one() -> None:
    import jsonschema

    from planner.loader import _parse_yaml

    schema = json.loads(cli("schema").stdout)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    for path in FLOWS.glob("*.yaml"):
        data, _ = _parse_yaml(path.read_text(), str(path))
        assert list(jsonschema.Draft7Validator(schema).iter_errors(data)) == [], path
        assert list(jsonschema.Draft202012Validator(schema).iter_errors(data)) == [], path
    both = {"nodes": {"a": {"sql": "SELECT 1", "call": "m:f"}}}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(both))
    assert list(jsonschema.Draft7Validator(schema).iter_errors({"nodes": {"a": {"sql": "x", "timeout": "3 parsecs"}}}))


def test_the_shipped_schema_file_is_current() -> None:
    shipped = json.loads((ROOT / "planner" / "flow.schema.json").read_text())
    assert shipped == json.loads(cli("schema").stdout)


def test_the_seed_flows_point_editors_at_the_schema() -> None:
    for path in FLOWS.glob("*.yaml"):
        assert path.read_text().startswith("# yaml-language-server: $schema=../planner/flow.schema.json")


def test_validate_passes_the_seed_flows() -> None:
    proc = cli("validate")
    assert proc.returncode == 0 and "2 flow(s) ok" in proc.stderr


def test_validate_reports_every_broken_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("nodes:\n  x: {sql: SELECT $nope}\n")
    (tmp_path / "b.yaml").write_text("nodes:\n  y: {call: 'os:system'}\n")
    (tmp_path / "c.yaml").write_text("nodes:\n  z: {sql: SELECT 1}\n")
    proc = cli("validate", "--flows", str(tmp_path))
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{tmp_path / 'a.yaml'}:2:") and "PLN200" in lines[0]
    assert lines[1].startswith(f"{tmp_path / 'b.yaml'}:2:") and "not allowed" in lines[1]


def test_validate_github_and_json_formats(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("nodes:\n  x: {sql: SELECT $nope}\n")
    gh = cli("validate", "--flows", str(tmp_path), "--format", "github").stdout
    assert gh.startswith(f"::error file={tmp_path / 'a.yaml'},line=2,")
    data = json.loads(cli("validate", "--flows", str(tmp_path), "--format", "json").stdout)
    assert data["findings"][0]["node"] == "x" and data["findings"][0]["code"] == "PLN200"


def test_validate_against_the_database_catches_schema_mistakes(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "v.yaml").write_text(
        "nodes:\n"
        "  inst:\n    sql: SELECT id, instance_nme FROM whatsapp_instances\n    fetch: one\n"
        "  table:\n    sql: SELECT id FROM whatsapp_instance\n    fetch: one\n"
        "  ok:\n    sql: SELECT id FROM whatsapp_instances LIMIT 1\n    fetch: one\n"
        "  uses:\n    sql: SELECT $ok.webhook_url\n"
        "  typed:\n    sql: SELECT id FROM whatsapp_instances WHERE instance_name = $limit\n"
    )
    (tmp_path / "v.yaml").write_text("inputs: {limit: int}\n" + (tmp_path / "v.yaml").read_text())
    proc = cli("validate", "--flows", str(tmp_path), "--db", demo_dsn)
    assert proc.returncode == 1
    out = proc.stdout
    assert re.search(r"v\.yaml:4:\d+: PLN400 node 'inst': UndefinedColumnError: column \"instance_nme\" does not exist", out)
    assert re.search(r"v\.yaml:7:\d+: PLN400 node 'table': UndefinedTableError: relation \"whatsapp_instance\" does not exist", out)
    assert "node 'typed': $limit is declared int but the statement needs text there" in out
    assert "node 'uses': $ok.webhook_url: node 'ok' returns no column 'webhook_url' (it returns: id)" in out


def test_validate_against_the_database_passes_the_seed_flows(demo_dsn: str) -> None:
    proc = cli("validate", "--db", demo_dsn)
    assert proc.returncode == 0, proc.stdout


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


def test_demo_prints_plans_and_a_latency_table_per_mode(pg_dsn: str) -> None:
    proc = cli("demo", "--db", pg_dsn, "--runs", "3", "--rtt", "2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "groups: instance; conversation, webhook_config, is_escalated; is_duplicate, history, recent_messages" in out
    assert "groups: settings, interactions; decide; record" in out
    for mode in ("eager", "layered", "sequential"):
        assert len(re.findall(rf"^{mode}\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+$", out, re.M)) == 2
    assert "2 ms round trip added" in out
    assert "under load" not in out  # a demo of a few runs skips the load table


async def test_the_demo_load_table_compares_coalescing_on_and_off(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    from planner.demo.run import demo_dsn, measure_load, render_load

    dsn = await demo_dsn(pg_dsn, lambda _m: None)
    load = await measure_load(dsn, in_flight=20, pool=2, seconds=0.4)
    assert [f.coalesce for f in load] == [True, False]
    assert all(f.ok_per_s > 0 and f.p50_ms > 0 for f in load)
    render_load(load, 0)
    out = capsys.readouterr().out
    assert "process_buffered under load: 20 messages in flight, pool 2, eager, at least 0.4 s each (the bare local database)" in out
    assert re.search(r"^coalescing on\s+\d+\.\d\s+\d+\.\d\d\s+\d+\.\d\s+\d+\.\d$", out, re.M), out
    assert re.search(r"^coalescing off\s+\d+\.\d\s+1\.00\s+\d+\.\d\s+\d+\.\d$", out, re.M), out


# --- a trace given to `visualize` ------------------------------------------------------------

SEED_TRACE = ROOT / "docs" / "process_buffered.trace.json"


def _trace_with(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    data = json.loads(SEED_TRACE.read_text())
    change(data)
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(data))
    return path


def _first_span(data: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in data["traceEvents"] if e["ph"] == "X")  # type: ignore[no-any-return]


@pytest.mark.parametrize("fmt", ["svg", "html"])
def test_visualize_refuses_a_trace_with_markup_for_a_state(fmt: str, tmp_path: Path) -> None:
    trace = _trace_with(tmp_path, lambda d: _first_span(d)["args"].update(state="</title><script>alert(1)</script>"))
    proc = cli("visualize", "process_buffered", "--format", fmt, "--trace", str(trace))
    line = _one_line_error(proc, 2)
    assert f"--trace {trace}: not a planner trace: traceEvents[" in line and "].args.state: " in line
    assert proc.stdout == ""


def test_visualize_refuses_a_trace_whose_state_is_not_a_string(tmp_path: Path) -> None:
    trace = _trace_with(tmp_path, lambda d: d["otherData"]["states"].update(instance=5))
    line = _one_line_error(cli("visualize", "process_buffered", "--format", "html", "--trace", str(trace)), 2)
    assert "otherData.states['instance']: 5 is not one of ok, defaulted, skipped, failed, cancelled" in line


def test_visualize_refuses_a_missing_trace_file(tmp_path: Path) -> None:
    line = _one_line_error(cli("visualize", "process_buffered", "--format", "svg", "--trace", str(tmp_path / "nope.json")), 2)
    assert line == f"planner: --trace {tmp_path / 'nope.json'}: cannot read it: No such file or directory"


def test_visualize_refuses_a_trace_of_another_flow() -> None:
    line = _one_line_error(cli("visualize", "escalation", "--format", "svg", "--trace", str(SEED_TRACE)), 2)
    assert "a trace of flow 'process_buffered', not of 'escalation'" in line


def test_visualize_draws_an_error_with_markup_as_text(tmp_path: Path) -> None:
    trace = _trace_with(tmp_path, lambda d: _first_span(d)["args"].update(error='QueryError: "><script>alert(1)</script>'))
    proc = cli("visualize", "process_buffered", "--format", "html", "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    assert "<script>" not in proc.stdout
    assert "QueryError: &quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in proc.stdout


# --- `planner run`'s table ---------------------------------------------------------------------


def _table_rows(out: str) -> list[str]:
    """The rows of the first plain table in `out`: the lines after its dashes, up to a blank line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("----")) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def test_run_lists_nodes_in_group_order(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text("nodes:\n  late: {sql: SELECT $middle}\n  middle: {sql: SELECT $early}\n  early: {sql: SELECT 1}\n")
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn)
    assert proc.returncode == 0, proc.stderr
    assert [row.split()[:2] for row in _table_rows(proc.stdout)] == [["early", "1"], ["middle", "2"], ["late", "3"]]


RAISE_WITH_HINT = (
    "nodes:\n"
    "  first: {sql: SELECT 1}\n"
    "  boom:\n"
    "    sql: \"DO $$ BEGIN RAISE EXCEPTION 'boom' USING DETAIL = 'the detail', HINT = 'the hint'; END $$\"\n"
    "    fetch: none\n"
    "  last: {sql: SELECT 1, after: [boom]}\n"
)


def test_run_shows_a_multi_line_error_on_one_table_line(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text(RAISE_WITH_HINT)
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn)
    assert proc.returncode == 0, proc.stderr  # `boom` is defaulted: the run goes on
    rows = _table_rows(proc.stdout)
    assert [row.split()[0] for row in rows] == ["first", "boom", "last"]
    assert re.search(r"^boom\s+1\s+defaulted\s.*RaiseError: boom \.\.\.$", rows[1])


def test_run_prints_a_multi_line_error_in_full_below_the_table(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text(RAISE_WITH_HINT)
    out = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn).stdout
    assert re.search(r"^\nboom: QueryError: RaiseError: boom\n  DETAIL:  the detail\n  HINT:  the hint$", out[out.index("\n\n"):], re.M)


def test_plan_shows_a_when_over_several_lines_on_one_row(tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text("nodes:\n  a: {sql: SELECT 1}\n  b:\n    sql: SELECT 2\n    when: |\n      $a\n      != 1\n")
    proc = cli("plan", "f", "--flows", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = _table_rows(proc.stdout)
    assert rows[1].startswith("b ") and rows[1].endswith("$a != 1") and rows[2].startswith("critical path: ")


def test_a_table_cell_is_never_read_as_rich_markup(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from planner import cli as cli_module

    monkeypatch.setattr(cli_module, "_is_tty", lambda: True)
    cli_module.print_table("[bold]title[/bold]", ["error"], [["[/nope] [red]not red"]])
    out = capsys.readouterr().out
    assert "[bold]title[/bold]" in out and "[/nope] [red]not red" in out


# --- passwords -------------------------------------------------------------------------------

# asyncpg reads `u:planner-secret/x@h` as host `u`, port `planner-secret`, and its error says so:
# the password is quoted without the DSN around it.
SLASHED = "postgresql://u:planner-secret/x@127.0.0.1:1/x"


@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param(["run", "escalation", "-i", "instance_id=1", "-i", "user_phone=x", "-i", "message=m", "--db", SLASHED], {}, id="run-db"),
        pytest.param(["run", "escalation", "-i", "instance_id=1", "-i", "user_phone=x", "-i", "message=m", f"--db={SLASHED}"], {}, id="run-db-equals"),
        pytest.param(["run", "escalation", "-i", "instance_id=1", "-i", "user_phone=x", "-i", "message=m"], {"DATABASE_URL": SLASHED}, id="run-env"),
        pytest.param(["validate", "--db", SLASHED], {}, id="validate-db"),
        pytest.param(["demo", "--runs", "1", "--db", SLASHED], {}, id="demo-db"),
    ],
)
def test_an_error_never_shows_the_password(args: list[str], env: dict[str, str]) -> None:
    proc = cli(*args, env=env)
    assert proc.returncode == 2
    assert "planner-secret" not in proc.stdout + proc.stderr
    assert "***" in _one_line_error(proc, 2)


def test_the_debug_traceback_never_shows_the_password() -> None:
    # The demo connects with asyncpg itself: its malformed-DSN error is not a FlowError, so
    # PLANNER_DEBUG=1 prints the traceback (`run` reports DatabaseUnavailable, with no traceback).
    proc = cli("demo", "--db", SLASHED, "--runs", "1", env={"PLANNER_DEBUG": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert "planner-secret" not in proc.stderr


def _with_password(dsn: str) -> tuple[str, str]:
    """`dsn` with a password in it (the one it has, or a made-up one: the test server trusts
    local connections and ignores it), and that password."""
    parts = urlsplit(dsn)
    if parts.password:
        return dsn, parts.password
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:planner-secret-pw@{host}")), "planner-secret-pw"


def test_demo_shows_its_database_without_the_password(pg_dsn: str) -> None:
    dsn, password = _with_password(pg_dsn)
    proc = cli("demo", "--db", dsn, "--runs", "1", "--rtt", "0")
    assert proc.returncode == 0, proc.stderr
    assert password not in proc.stdout + proc.stderr
    assert re.search(r"^database: postgresql://[^\s:@]*:\*\*\*@", proc.stdout, re.M)


def test_a_malformed_dsn_is_a_database_error_not_an_internal_one() -> None:
    proc = cli("run", "escalation", "-i", "instance_id=1", "-i", "user_phone=x", "-i", "message=m", "--db", "postgresql://u@127.0.0.1:notaport/x")
    assert _one_line_error(proc, 2).startswith("planner: cannot reach the database: ValueError: ")


def test_an_error_over_several_lines_is_printed_on_one(capsys: pytest.CaptureFixture[str]) -> None:
    from planner import cli as cli_module

    with pytest.raises(SystemExit):
        cli_module._fail("relation \"x\" does not exist\nDETAIL:  why\nHINT:  \x1b[31mfix", 2)
    assert capsys.readouterr().err == 'planner: relation "x" does not exist / DETAIL:  why / HINT:  \ufffd[31mfix\n'
