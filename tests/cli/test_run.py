"""`planner run` (planner/cli/flows.py): its node table, its JSON, its trace, and its exit codes for failed and degraded runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support.cli import SIBLINGS, cli, table_rows

RAISE_WITH_HINT = (
    "nodes:\n"
    "  first: {sql: SELECT 1}\n"
    "  boom:\n"
    "    sql: \"DO $$ BEGIN RAISE EXCEPTION 'boom' USING DETAIL = 'the detail', HINT = 'the hint'; END $$\"\n"
    "    fetch: none\n"
    "  last: {sql: SELECT 1, after: [boom]}\n"
)


DEGRADED = "nodes:\n  ok: {sql: SELECT 1, fetch: value}\n  missing: {sql: SELECT * FROM no_such_table, default: [], on_bug: default}\n"


@pytest.mark.subprocess
def test_planner_run_records_how_many_nodes_shared_a_statement(tmp_path: Path, demo_dsn: str) -> None:
    from planner.views.stats import recorded_fused

    (tmp_path / "f.yaml").write_text(SIBLINGS)
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn)
    assert proc.returncode == 0, proc.stderr
    assert recorded_fused("f", tmp_path) == {"a": 3, "b": 3, "c": 3}
    data = json.loads(cli("plan", "f", "--flows", str(tmp_path), "--json").stdout)
    assert data["sequential_ms"] == pytest.approx(data["parallel_ms"], rel=0.5)


@pytest.mark.subprocess
def test_run_prints_a_node_table_and_the_output(demo_dsn: str) -> None:
    proc = cli("run", "escalation", "-i", "instance_id=1", "-i", "user_phone=+15550000001", "-i", "message=a human please", "--db", demo_dsn)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^record\s+3\s+ok\s", proc.stdout, re.M)
    assert '"reason": "keyword: human"' in proc.stdout


@pytest.mark.subprocess
def test_run_json_is_machine_readable(demo_dsn: str, tmp_path: Path) -> None:
    inputs = tmp_path / "in.json"
    inputs.write_text(json.dumps({"instance_name": "acme", "user_phone": "+15550000001", "message": "hi"}))
    proc = cli("run", "process_buffered", "--inputs", str(inputs), "--json", "--mode", "layered", "--db", demo_dsn)
    data = json.loads(proc.stdout)
    assert data["status"] == "ok" and data["mode"] == "layered"
    assert data["nodes"]["store_message"]["state"] == "ok"
    assert isinstance(data["output"]["history"][0]["created_at"], str)  # datetimes as ISO text


@pytest.mark.subprocess
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


@pytest.mark.subprocess
def test_a_failed_run_exits_1(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text("nodes:\n  a: {sql: SELECT 1/0, on_error: fail}\n")
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(r"^a\s+1\s+failed", proc.stdout, re.M)


@pytest.mark.subprocess
def test_run_lists_nodes_in_group_order(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text("nodes:\n  late: {sql: 'SELECT $middle::int', fetch: value}\n"
                                     "  middle: {sql: 'SELECT $early::int', fetch: value}\n  early: {sql: SELECT 1, fetch: value}\n")
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn)
    assert proc.returncode == 0, proc.stderr
    assert [row.split()[:2] for row in table_rows(proc.stdout)] == [["early", "1"], ["middle", "2"], ["late", "3"]]


@pytest.mark.subprocess
def test_run_shows_a_multi_line_error_on_one_table_line(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text(RAISE_WITH_HINT)
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn, "--allow-defaults")
    assert proc.returncode == 0, proc.stderr  # `boom` is defaulted: the run goes on, and the flag accepts it
    rows = table_rows(proc.stdout)
    assert [row.split()[0] for row in rows] == ["first", "boom", "last"]
    assert re.search(r"^boom\s+1\s+defaulted\s.*RaiseError: boom \.\.\.$", rows[1])


@pytest.mark.subprocess
def test_run_prints_a_multi_line_error_in_full_below_the_table(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text(RAISE_WITH_HINT)
    out = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn).stdout
    assert re.search(r"^\nboom: QueryError: RaiseError: boom\n  DETAIL:  the detail\n  HINT:  the hint$", out[out.index("\n\n"):], re.M)


def test_a_table_cell_is_never_read_as_rich_markup(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from planner.cli import common

    monkeypatch.setattr(common, "_is_tty", lambda: True)
    common.print_table("[bold]title[/bold]", ["error"], [["[/nope] [red]not red"]])
    out = capsys.readouterr().out
    assert "[bold]title[/bold]" in out and "[/nope] [red]not red" in out


@pytest.mark.subprocess
def test_a_degraded_run_exits_1_and_says_why(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text(DEGRADED)
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn)
    assert proc.returncode == 1, proc.stderr
    assert "planner: flow 'f' ran degraded: defaulted missing; exit 1 (pass --allow-defaults to accept defaulted nodes)" in proc.stderr
    # A statement PostgreSQL refuses as written is called out as a bug, in the table and below it.
    row = next(r for r in table_rows(proc.stdout) if r.startswith("missing "))
    assert re.search(r"defaulted\s.*bug \(SQLSTATE 42P01\): QueryError: UndefinedTableError", row)
    assert "planner: node 'missing' looks like a bug in the flow (SQLSTATE 42P01): no retry can fix it" in proc.stderr


@pytest.mark.subprocess
def test_allow_defaults_accepts_a_degraded_run(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text(DEGRADED)
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn, "--allow-defaults")
    assert proc.returncode == 0, proc.stderr
    assert "ran degraded: defaulted missing (accepted: --allow-defaults)" in proc.stderr


@pytest.mark.subprocess
def test_run_json_says_the_run_was_degraded(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text(DEGRADED)
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn, "--json")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["status"] == "ok" and data["degraded"] is True
    assert list(data["defaulted"]) == ["missing"] and "UndefinedTableError" in data["defaulted"]["missing"]
    assert data["nodes"]["missing"]["bug"] is True and "bug" not in data["nodes"]["ok"]


@pytest.mark.subprocess
def test_a_clean_run_is_not_degraded(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text("nodes:\n  a: {sql: SELECT 1, fetch: value}\n  b: {sql: SELECT 2, when: false}\n")
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["degraded"] is False and proc.stderr == ""


@pytest.mark.subprocess
def test_a_database_lost_mid_run_exits_2_and_says_it_is_not_the_flow(tmp_path: Path, demo_dsn: str) -> None:
    (tmp_path / "f.yaml").write_text("nodes:\n  order: {sql: SELECT pg_terminate_backend(pg_backend_pid()), on_error: fail}\n")
    proc = cli("run", "f", "--flows", str(tmp_path), "--db", demo_dsn)
    assert proc.returncode == 2, proc.stderr
    assert "node 'order' lost its database connection (the database, not the flow, is the problem)" in proc.stderr
    assert re.search(r"^order\s+1\s+failed", proc.stdout, re.M)
