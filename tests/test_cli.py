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

from tests.support.pgbouncer import PgBouncer

pytestmark = pytest.mark.subprocess

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
    # `record` was skipped (no escalation): it keeps its hint, and the plan says so
    assert data["latency_source"] == "recorded runs and latency: hints"
    assert data["nodes"][0]["expected_ms"] < 50 and data["nodes"][0]["latency_from"] == "recorded"  # a local query, not the 50 ms hint
    assert {n["node"]: n["latency_from"] for n in data["nodes"]}["record"] == "hint"


NO_HINTS = "nodes:\n  a: {sql: SELECT 1}\n  b: {sql: SELECT $a}\n  c: {sql: 'SELECT $a, $b'}\n"


def test_plan_without_hints_or_records_says_no_latency_is_known(tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text(NO_HINTS)
    proc = cli("plan", "f", "--flows", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "no latency known: add latency: hints or run the flow" in proc.stdout
    assert "0 ms" not in proc.stdout and "critical path" not in proc.stdout
    data = json.loads(cli("plan", "f", "--flows", str(tmp_path), "--json").stdout)
    assert data["sequential_ms"] is None and data["critical_path"] == [] and data["latency_source"] == "none"


def _record(flow: str, latencies: dict[str, Any], flows: Path) -> None:
    """Latencies as `planner run` records them (`planner.views.stats`), in the test's own PLANNER_HOME."""
    from planner.views.stats import stats_path

    path = stats_path(flow, flows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(latencies))


def test_plan_uses_recorded_latencies_where_hints_are_missing_rounded(tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text(NO_HINTS)
    _record("f", {"a": [2.5725], "b": [1.0, 1.25, 9.0], "c": [0.5]}, tmp_path)
    proc = cli("plan", "f", "--flows", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "expected times from recorded runs" in proc.stdout
    assert re.search(r"^a\s+sql\s+-\s+1\s+2\.6\s+\*", proc.stdout, re.M), proc.stdout
    assert "critical path: a -> b -> c" in proc.stdout
    assert "sequential 4.3 ms, parallel 4.3 ms" in proc.stdout and "2.5725" not in proc.stdout


SIBLINGS = "nodes:\n  a: {sql: SELECT 1 AS x}\n  b: {sql: SELECT 2 AS y}\n  c: {sql: SELECT 3 AS z}\n"


def test_validate_reports_each_unknown_key_as_its_own_finding(tmp_path: Path) -> None:
    (tmp_path / "k.yaml").write_text("nodes:\n  a: {sql: SELECT 1, fetchh: one}\n  b: {sql: SELECT 2, fetchh: one}\n"
                                    "  c: {sql: SELECT 3, timeot: 1s}\n  d: {call: tests.nodes:echo, wth: {value: 1}}\n")
    proc = cli("validate", str(tmp_path / "k.yaml"), "--format", "json")
    assert proc.returncode == 1
    findings = json.loads(proc.stdout)["findings"]
    assert [(f["node"], f["line"]) for f in findings] == [("a", 2), ("b", 3), ("c", 4), ("d", 5)]
    assert all("more" not in f["message"] for f in findings)
    assert "4 problem(s)" in proc.stderr


def test_plan_counts_a_fused_statements_time_once(tmp_path: Path) -> None:
    # a, b and c went as one 10 ms statement: each recorded 10 ms. Sequentially that is one
    # statement's 10 ms, not 30 ms (which made the speedup look three times what it was).
    (tmp_path / "f.yaml").write_text(SIBLINGS)
    _record("f", {"a": [10.0], "b": [10.0], "c": [10.0], "#fused": {"a": [3], "b": [3], "c": [3]}}, tmp_path)
    data = json.loads(cli("plan", "f", "--flows", str(tmp_path), "--json").stdout)
    assert data["sequential_ms"] == 10 and data["parallel_ms"] == 10


def test_planner_run_records_how_many_nodes_shared_a_statement(tmp_path: Path, demo_dsn: str) -> None:
    from planner.views.stats import recorded_fused

    (tmp_path / "f.yaml").write_text(SIBLINGS)
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn)
    assert proc.returncode == 0, proc.stderr
    assert recorded_fused("f", tmp_path) == {"a": 3, "b": 3, "c": 3}
    data = json.loads(cli("plan", "f", "--flows", str(tmp_path), "--json").stdout)
    assert data["sequential_ms"] == pytest.approx(data["parallel_ms"], rel=0.5)


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
        pytest.param(["run", "escalaton"], 2, "no flow named 'escalaton' in flows/ (did you mean 'escalation'?)",
                     id="unknown-flow-close-to-one"),
        pytest.param(["run", "escalation", "-i", "instance_idd=1"], 2,
                     "has no input 'instance_idd' (did you mean 'instance_id'?)", id="unknown-input-close-to-one"),
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
    for command in ("run", "plan", "visualize", "validate", "schema", "demo", "list", "init",
                    "db url", "db status", "db psql", "db stop"):
        proc = cli(*command.split(), "--help")
        # The example runs the command itself (`Example: planner db url`), or inside another one
        # (`Example: psql "$(planner db url --show-password)"`).
        example = re.search(r"Example: (.*)", proc.stdout)
        assert proc.returncode == 0 and example and f"planner {command}" in example.group(1), command


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

    from planner.lang.safeyaml import parse_yaml

    schema = json.loads(cli("schema").stdout)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    for path in FLOWS.glob("*.yaml"):
        data, _ = parse_yaml(path.read_text(), str(path))
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
    # It says what was done: every statement of both seed flows prepared on that server.
    assert proc.stderr == "planner: 2 flow(s) ok\n"
    assert re.fullmatch(r"12 statement\(s\) of 2 flow file\(s\) prepared on the server postgresql://\S+: all accepted\n",
                        proc.stdout)
    data = json.loads(cli("validate", "--db", demo_dsn, "--format", "json").stdout)
    assert data["prepared"] == 12 and data["findings"] == [] and data["server"].startswith("postgresql://")
    github = cli("validate", "--db", demo_dsn, "--format", "github").stdout
    assert github.startswith("::notice title=planner validate::12 statement(s) of 2 flow file(s) prepared")


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
    # The database line is a DSN that works when pasted: the socket folder (`?host=`) is kept.
    shown = re.search(r"^database: (\S+)$", out, re.M)
    assert shown is not None and "?host=" in shown.group(1) and ":@" not in shown.group(1)
    assert _current_database(shown.group(1)) == "planner_demo"
    assert "under load" not in out  # a demo of a few runs skips the load table


def test_demo_through_pgbouncer_honours_the_dsn_parameter(pg_dsn: str, pgbouncer: PgBouncer) -> None:
    through = pgbouncer.dsn(pg_dsn)  # ...?pgbouncer=transaction: planner's, never the server's
    proc = cli("demo", "--db", through, "--runs", "3", "--rtt", "0")
    assert proc.returncode == 0, proc.stderr
    assert f":{pgbouncer.port}/planner_demo?pgbouncer=transaction" in proc.stdout
    assert len(re.findall(r"^eager\s+\d+\.\d+", proc.stdout, re.M)) == 2


def test_db_status_through_pgbouncer_honours_the_dsn_parameter(pg_dsn: str, pgbouncer: PgBouncer) -> None:
    status = cli("db", "status", env={"DATABASE_URL": pgbouncer.dsn(pg_dsn)})
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"^reachable:\s+yes \(PostgreSQL \d+", status.stdout, re.M)


def test_demo_names_its_database_before_any_table(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from planner.cli import app
    from planner.demo import run

    # The load table, small: it is printed from a few runs on, at the end.
    for name, value in (("LOAD_MIN_RUNS", 1), ("LOAD_IN_FLIGHT", 10), ("LOAD_POOL", 2), ("LOAD_SECONDS", 0.2)):
        monkeypatch.setattr(run, name, value)
    result = CliRunner().invoke(app, ["demo", "--db", pg_dsn, "--runs", "2", "--rtt", "0"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    first_table = next(i for i, line in enumerate(lines) if "under load" in line or line.startswith("measured over"))
    assert "under load" in result.output
    assert lines.index(next(line for line in lines if line.startswith("database: "))) < first_table


def test_db_psql_through_pgbouncer_leaves_the_dsn_parameter_out(demo_dsn: str, pgbouncer: PgBouncer) -> None:
    psql = cli("db", "psql", "-X", "-A", "-t", "-c", "SELECT 40 + 2", env={"DATABASE_URL": pgbouncer.dsn(demo_dsn)})
    assert psql.returncode == 0 and psql.stdout.strip() == "42", psql.stderr


def test_db_url_through_pgbouncer_prints_a_dsn_psql_accepts(demo_dsn: str, pgbouncer: PgBouncer) -> None:
    from planner.cli import find_psql

    url = cli("db", "url", env={"DATABASE_URL": pgbouncer.dsn(demo_dsn)})
    assert url.returncode == 0, url.stderr
    psql = find_psql()
    assert psql is not None
    asked = subprocess.run([psql, "-X", "-A", "-t", "-c", "SELECT 40 + 2", url.stdout.strip()],
                           capture_output=True, text=True, timeout=60)
    assert asked.returncode == 0 and asked.stdout.strip() == "42", asked.stderr


def _current_database(dsn: str) -> str:
    import asyncio

    import asyncpg

    async def ask() -> str:
        con = await asyncpg.connect(dsn)
        try:
            return str(await con.fetchval("SELECT current_database()"))
        finally:
            await con.close()

    return asyncio.run(ask())


async def test_the_demo_load_table_compares_coalescing_on_and_off(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    from planner.cli import print_table
    from planner.demo.run import demo_dsn, load_notes, load_table, measure_load

    dsn = await demo_dsn(pg_dsn, lambda _m: None)
    load = await measure_load(dsn, in_flight=20, pool=2, seconds=0.4)
    assert [f.coalesce for f in load] == [True, False]
    assert all(f.ok_per_s > 0 and f.p50_ms > 0 for f in load)
    title, headers, rows, right = load_table(load, 0)
    print_table(title, headers, rows, right=right)
    out = capsys.readouterr().out
    assert "process_buffered under load: 20 messages in flight, pool 2, eager, at least 0.4 s each (the bare local database)" in out
    assert re.search(r"^coalescing on\s+\d+\.\d\s+\d+\.\d\d\s+\d+\.\d\s+\d+\.\d$", out, re.M), out
    assert re.search(r"^coalescing off\s+\d+\.\d\s+1\.00\s+\d+\.\d\s+\d+\.\d$", out, re.M), out
    notes = load_notes(load)
    assert notes[0].startswith("messages/s: runs that finished ok") and "failed/s: runs that raised FlowFailed" in notes[0]


def test_the_demo_load_notes_say_why_runs_failed() -> None:
    from planner.demo.run import LoadFigures, load_notes

    load = [LoadFigures(200, 10, 2, True, 400.0, 0.0, 50.0),
            LoadFigures(200, 10, 2, False, 150.0, 7.8, 900.0,
                        {"passed the flow's deadline (FlowTimeout: flow 'process_buffered' hit its deadline of 5s)": 14,
                         "node 'conversation' failed: QueryError: deadlock detected": 2})]
    notes = load_notes(load)
    assert notes[1] == ("failed with coalescing off: 14 passed the flow's deadline (FlowTimeout: flow 'process_buffered' "
                        "hit its deadline of 5s); 2 node 'conversation' failed: QueryError: deadlock detected")
    assert "no run failed" not in notes and len(notes) == 2


async def test_a_failed_runs_reason_names_its_node_and_error(demo_dsn: str, tmp_path: Path) -> None:
    from planner import FlowFailed, Planner
    from planner.demo.run import failure_reason

    (tmp_path / "f.yaml").write_text("settings: {timeout: 100ms}\nnodes:\n"
                                     "  boom: {sql: SELECT 1/0, fetch: value, on_error: fail}\n"
                                     "  nap: {sql: SELECT pg_sleep(2), fetch: value, when: 'false'}\n")
    (tmp_path / "slow.yaml").write_text("settings: {timeout: 100ms}\nnodes:\n  nap: {sql: SELECT pg_sleep(2), fetch: value}\n")
    async with Planner(flows=tmp_path, dsn=demo_dsn, metrics=False) as planner:
        with pytest.raises(FlowFailed) as failed:
            await planner.run("f")
        with pytest.raises(FlowFailed) as slow:
            await planner.run("slow")
    assert failure_reason(failed.value).startswith("node 'boom' failed: QueryError: DivisionByZeroError")
    assert failure_reason(slow.value).startswith("passed the flow's deadline (FlowTimeout: flow 'slow' hit its deadline")


def test_the_demo_says_the_embedded_server_it_used_is_still_running(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from urllib.parse import parse_qs

    from planner.cli import _embedded_left_running

    socket = parse_qs(urlsplit(pg_dsn).query).get("host", [""])[0]
    if not socket:
        pytest.skip("the suite runs on a server of its own (--planner-dsn / DATABASE_URL), not an embedded one")
    monkeypatch.setenv("PLANNER_HOME", str(Path(socket).parent))
    _embedded_left_running()
    out = capsys.readouterr().out
    assert "The embedded PostgreSQL is still running (pid " in out and "`planner db stop` stops it" in out


def test_the_demo_says_nothing_of_a_server_that_is_not_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from planner.cli import _embedded_left_running

    monkeypatch.setenv("PLANNER_HOME", str(tmp_path / "no-server"))
    _embedded_left_running()
    assert capsys.readouterr().out == ""


# --- a trace given to `visualize` ------------------------------------------------------------

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
    (tmp_path / "f.yaml").write_text("nodes:\n  late: {sql: 'SELECT $middle::int', fetch: value}\n"
                                     "  middle: {sql: 'SELECT $early::int', fetch: value}\n  early: {sql: SELECT 1, fetch: value}\n")
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
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn, "--allow-defaults")
    assert proc.returncode == 0, proc.stderr  # `boom` is defaulted: the run goes on, and the flag accepts it
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
    assert rows[1].startswith("b ") and rows[1].endswith("$a != 1") and rows[2].startswith("no latency known: ")


def test_a_table_cell_is_never_read_as_rich_markup(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from planner.cli import common

    monkeypatch.setattr(common, "_is_tty", lambda: True)
    common.print_table("[bold]title[/bold]", ["error"], [["[/nope] [red]not red"]])
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


def test_plan_shows_statements_and_round_trips_with_and_without_the_cache() -> None:
    proc = cli("plan", "process_buffered")
    assert proc.returncode == 0, proc.stderr
    assert ("statements per run: at most 7 (5 with the cache warm); longest chain of round trips: 4 "
            "(3 with the cache warm); fused: is_duplicate+history+recent_messages") in proc.stdout
    data = json.loads(cli("plan", "process_buffered", "--json").stdout)
    assert data["round_trips"]["critical_cache_warm"] == 3 and data["round_trips"]["statements"] == 7


# --- degraded runs, bugs, a lost database (`planner run`) --------------------------------------

DEGRADED = "nodes:\n  ok: {sql: SELECT 1, fetch: value}\n  missing: {sql: SELECT * FROM no_such_table, default: [], on_bug: default}\n"


def test_a_degraded_run_exits_1_and_says_why(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text(DEGRADED)
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn)
    assert proc.returncode == 1, proc.stderr
    assert "planner: flow 'f' ran degraded: defaulted missing; exit 1 (pass --allow-defaults to accept defaulted nodes)" in proc.stderr
    # A statement PostgreSQL refuses as written is called out as a bug, in the table and below it.
    row = next(r for r in _table_rows(proc.stdout) if r.startswith("missing "))
    assert re.search(r"defaulted\s.*bug \(SQLSTATE 42P01\): QueryError: UndefinedTableError", row)
    assert "planner: node 'missing' looks like a bug in the flow (SQLSTATE 42P01): no retry can fix it" in proc.stderr


def test_allow_defaults_accepts_a_degraded_run(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text(DEGRADED)
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn, "--allow-defaults")
    assert proc.returncode == 0, proc.stderr
    assert "ran degraded: defaulted missing (accepted: --allow-defaults)" in proc.stderr


def test_run_json_says_the_run_was_degraded(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text(DEGRADED)
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn, "--json")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["status"] == "ok" and data["degraded"] is True
    assert list(data["defaulted"]) == ["missing"] and "UndefinedTableError" in data["defaulted"]["missing"]
    assert data["nodes"]["missing"]["bug"] is True and "bug" not in data["nodes"]["ok"]


def test_a_clean_run_is_not_degraded(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text("nodes:\n  a: {sql: SELECT 1, fetch: value}\n  b: {sql: SELECT 2, when: false}\n")
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["degraded"] is False and proc.stderr == ""


def test_a_database_lost_mid_run_exits_2_and_says_it_is_not_the_flow(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text("nodes:\n  order: {sql: SELECT pg_terminate_backend(pg_backend_pid()), on_error: fail}\n")
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn)
    assert proc.returncode == 2, proc.stderr
    assert "node 'order' lost its database connection (the database, not the flow, is the problem)" in proc.stderr
    assert re.search(r"^order\s+1\s+failed", proc.stdout, re.M)


# --- `planner validate` on folders, offline syntax ---------------------------------------------


def test_validate_takes_a_folder(tmp_path: Path) -> None:
    sub = tmp_path / "more"
    sub.mkdir()
    (sub / "a.yaml").write_text("nodes:\n  x: {sql: SELECT 1}\n")
    (sub / "b.yml").write_text("nodes:\n  y: {sql: SELECT $nope}\n")
    (sub / "notes.txt").write_text("not a flow")
    proc = cli("validate", "more", cwd=tmp_path)  # a relative folder, no path separator
    assert proc.returncode == 1
    assert proc.stdout.startswith("more/b.yml:2:") and "PLN200" in proc.stdout
    assert "1 problem(s) in 1 of 2 file(s)" in proc.stderr
    proc = cli("validate", str(FLOWS) + os.sep)
    assert proc.returncode == 0 and "2 flow(s) ok" in proc.stderr


def test_validate_refuses_a_folder_without_flows(tmp_path: Path) -> None:
    assert "no flows (*.yaml, *.yml) in" in _one_line_error(cli("validate", str(tmp_path)), 2)


def test_validate_without_a_database_finds_sql_syntax_errors(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("nodes:\n  a:\n    sql: |\n      SELECT id\n      FRM whatsapp_instances\n")
    proc = cli("validate", str(tmp_path / "s.yaml"))
    assert proc.returncode == 1
    assert proc.stdout.strip() == (f'{tmp_path / "s.yaml"}:5:11: PLN111 node \'a\': SQL does not parse: syntax error at '
                                   'or near "whatsapp_instances" (SQL line 2, column 5)')


def test_validate_says_it_prepared_nothing_without_a_database() -> None:
    proc = cli("validate")
    assert proc.returncode == 0
    assert proc.stderr == "planner: 2 flow(s) ok (no database: static checks and SQL syntax; --db also prepares each statement on a server)\n"
    assert proc.stdout == ""


# --- `planner list` ------------------------------------------------------------------------------


def test_list_shows_each_flow_and_its_inputs() -> None:
    proc = cli("list")
    assert proc.returncode == 0, proc.stderr
    rows = _table_rows(proc.stdout)
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
    assert [r.split()[:2] for r in _table_rows(proc.stdout)] == [["bad", "(does"], ["good", "n"], ["none", "-"]]
    assert "unknown key 'fecth' (did you mean 'fetch'?)" in proc.stderr


# --- `planner init` ------------------------------------------------------------------------------


def test_init_scaffolds_a_project_that_validates_and_tests_green(tmp_path: Path, pg_dsn: str) -> None:
    project = tmp_path / "proj"
    proc = cli("init", str(project))
    assert proc.returncode == 0, proc.stderr
    made = sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file())
    assert made == [".github/workflows/flows.yml", "db/schema.sql", "flows/example.yaml", "flows/flow.schema.json",
                    "pytest.ini", "tests/test_flows.py"]
    example = (project / "flows" / "example.yaml").read_text()
    assert example.startswith("# yaml-language-server: $schema=flow.schema.json\n")
    assert json.loads((project / "flows" / "flow.schema.json").read_text()) == json.loads(cli("schema").stdout)
    assert "planner validate flows" in (project / ".github" / "workflows" / "flows.yml").read_text()
    assert cli("validate", str(project / "flows")).returncode == 0
    assert cli("validate", str(project / "flows"), "--db", pg_dsn).returncode == 0
    # The scaffolded test passes as its CI runs it (`pytest`, configured by its pytest.ini), with
    # planner's own pytest plugin, `planner_flow_db` and the scaffold's db/schema.sql.
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("DATABASE_URL", None)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "pt"),
         "--planner-dsn", pg_dsn],
        capture_output=True, text=True, cwd=project, env=env, timeout=120)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "1 passed" in tests.stdout


def test_init_never_overwrites_a_file(tmp_path: Path) -> None:
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "example.yaml").write_text("mine")
    line = _one_line_error(cli("init", str(tmp_path)), 2)
    assert f"would overwrite {tmp_path / 'flows' / 'example.yaml'}; nothing written" in line
    assert (tmp_path / "flows" / "example.yaml").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["example.yaml", "flows"]


# --- recorded latencies belong to the flows folder -----------------------------------------------


def test_plan_ignores_latencies_recorded_for_another_folder(tmp_path: Path, demo_dsn: str) -> None:
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "f.yaml").write_text("nodes:\n  a: {sql: SELECT 1, fetch: value, latency: 700ms}\n")
    assert cli("run", "f", "--flows", str(tmp_path / "one"), "--db", demo_dsn).returncode == 0
    one = json.loads(cli("plan", "f", "--flows", str(tmp_path / "one"), "--json").stdout)
    two = json.loads(cli("plan", "f", "--flows", str(tmp_path / "two"), "--json").stdout)
    assert one["latency_source"] == "recorded runs" and one["nodes"][0]["expected_ms"] < 700
    assert two["latency_source"] == "latency: hints" and two["nodes"][0]["expected_ms"] == pytest.approx(700)


# --- `planner db` ----------------------------------------------------------------------------------


def test_db_manages_the_embedded_server(tmp_path: Path) -> None:
    from planner.db.embedded import stop_embedded

    home = tmp_path / "home"
    env = {"PLANNER_HOME": str(home), "DATABASE_URL": ""}
    try:
        status = cli("db", "status", env=env)
        assert status.returncode == 1  # nothing running: not up
        assert "embedded:    not created yet" in status.stdout and f"data folder: {home / 'pgdata'}" in status.stdout
        url = cli("db", "url", env=env)
        assert url.returncode == 0, url.stderr
        dsn = url.stdout.strip()
        assert dsn.startswith("postgresql://postgres@/postgres?host=") and _current_database(dsn) == "postgres"
        status = cli("db", "status", env=env)
        assert status.returncode == 0, status.stdout
        assert re.search(r"^embedded:\s+running \(pid \d+\)$", status.stdout, re.M)
        assert re.search(r"^version:\s+PostgreSQL \d+", status.stdout, re.M)
        assert f"embedded url: {dsn}" in status.stdout
        other = cli("db", "url", "--database", "template1", env=env).stdout.strip()
        assert _current_database(other) == "template1"
        psql = cli("db", "psql", "-X", "-A", "-t", "-c", "SELECT 40 + 2", env=env)
        assert psql.returncode == 0 and psql.stdout.strip() == "42", psql.stderr
        stop = cli("db", "stop", env=env)
        assert stop.returncode == 0 and stop.stdout.strip() == f"stopped the embedded PostgreSQL in {home / 'pgdata'}"
        again = cli("db", "stop", env=env)
        assert again.returncode == 0 and "is not running" in again.stdout
        status = cli("db", "status", env=env)
        assert status.returncode == 1 and "embedded:    stopped" in status.stdout
    finally:
        stop_embedded(home)


def test_db_with_database_url_shows_it_without_the_password(demo_dsn: str) -> None:
    dsn, password = _with_password(demo_dsn)
    url = cli("db", "url", env={"DATABASE_URL": dsn})
    assert url.returncode == 0 and password not in url.stdout and ":***@" in url.stdout
    assert "--show-password" in url.stderr and password not in url.stderr  # says why pasting it would fail
    status = cli("db", "status", env={"DATABASE_URL": dsn})
    assert status.returncode == 0, status.stdout
    assert re.search(r"^database:\s+DATABASE_URL \(the embedded server is not used\)$", status.stdout, re.M)
    assert re.search(r"^reachable:\s+yes \(PostgreSQL \d+", status.stdout, re.M)
    assert password not in status.stdout + status.stderr
    psql = cli("db", "psql", "-X", "-A", "-t", "-c", "SELECT current_database()", env={"DATABASE_URL": dsn})
    assert psql.returncode == 0 and psql.stdout.strip() == urlsplit(demo_dsn).path.lstrip("/"), psql.stderr


def test_db_url_show_password_prints_a_dsn_that_connects(demo_dsn: str) -> None:
    dsn, password = _with_password(demo_dsn)
    url = cli("db", "url", "--show-password", env={"DATABASE_URL": dsn})
    assert url.returncode == 0 and f":{password}@" in url.stdout and url.stderr == ""
    psql = cli("db", "psql", "-X", "-A", "-t", "-c", "SELECT 1", env={"DATABASE_URL": url.stdout.strip()})
    assert psql.returncode == 0 and psql.stdout.strip() == "1", psql.stderr


def test_db_url_without_a_password_says_nothing_of_one(demo_dsn: str) -> None:
    url = cli("db", "url", env={"DATABASE_URL": demo_dsn.replace(f":{urlsplit(demo_dsn).password}@", "@")
                                if urlsplit(demo_dsn).password else demo_dsn})
    assert url.returncode == 0 and "***" not in url.stdout and "password" not in url.stderr


def test_db_status_of_an_unreachable_database_url_exits_1() -> None:
    status = cli("db", "status", env={"DATABASE_URL": SLASHED.replace("/x@", "@")})
    assert status.returncode == 1
    assert re.search(r"^reachable:\s+no: ", status.stdout, re.M) and "planner-secret" not in status.stdout


def test_db_without_any_database_allowed_is_a_one_line_error(tmp_path: Path) -> None:
    env = {"DATABASE_URL": "", "PLANNER_EMBEDDED": "0", "PLANNER_HOME": str(tmp_path)}
    line = _one_line_error(cli("db", "url", env=env), 2)
    assert line == "planner: no database configured: DATABASE_URL is not set and PLANNER_EMBEDDED=0 forbids the embedded server"
    assert not (tmp_path / "pgdata").exists()


def test_db_psql_without_psql_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from planner import cli as cli_module
    from planner.db import embedded as db

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(db, "embedded_psql", lambda: None)
    monkeypatch.setattr(sys, "argv", ["planner", "db", "psql"])
    with pytest.raises(SystemExit) as info:
        cli_module.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("planner: psql is not installed") and err.count("\n") == 1
