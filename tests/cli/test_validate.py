"""`planner validate` and the flow schema (planner/cli/flows.py): findings offline and against a database."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.support.cli import FLOWS, ROOT, cli, one_line_error


@pytest.mark.subprocess
def test_validate_reports_each_unknown_key_as_its_own_finding(tmp_path: Path) -> None:
    (tmp_path / "k.yaml").write_text("nodes:\n  a: {sql: SELECT 1, fetchh: one}\n  b: {sql: SELECT 2, fetchh: one}\n"
                                    "  c: {sql: SELECT 3, timeot: 1s}\n  d: {call: tests.nodes:echo, wth: {value: 1}}\n")
    proc = cli("validate", str(tmp_path / "k.yaml"), "--format", "json")
    assert proc.returncode == 1
    findings = json.loads(proc.stdout)["findings"]
    assert [(f["node"], f["line"]) for f in findings] == [("a", 2), ("b", 3), ("c", 4), ("d", 5)]
    assert all("more" not in f["message"] for f in findings)
    assert "4 problem(s)" in proc.stderr


@pytest.mark.subprocess
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


@pytest.mark.subprocess
def test_the_shipped_schema_file_is_current() -> None:
    shipped = json.loads((ROOT / "planner" / "flow.schema.json").read_text())
    assert shipped == json.loads(cli("schema").stdout)


def test_the_seed_flows_point_editors_at_the_schema() -> None:
    for path in FLOWS.glob("*.yaml"):
        assert path.read_text().startswith("# yaml-language-server: $schema=../planner/flow.schema.json")


@pytest.mark.subprocess
def test_validate_passes_the_seed_flows() -> None:
    proc = cli("validate")
    assert proc.returncode == 0 and "2 flow(s) ok" in proc.stderr


@pytest.mark.subprocess
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


@pytest.mark.subprocess
def test_validate_github_and_json_formats(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("nodes:\n  x: {sql: SELECT $nope}\n")
    gh = cli("validate", "--flows", str(tmp_path), "--format", "github").stdout
    assert gh.startswith(f"::error file={tmp_path / 'a.yaml'},line=2,")
    data = json.loads(cli("validate", "--flows", str(tmp_path), "--format", "json").stdout)
    assert data["findings"][0]["node"] == "x" and data["findings"][0]["code"] == "PLN200"


@pytest.mark.subprocess
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


@pytest.mark.subprocess
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


@pytest.mark.subprocess
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


@pytest.mark.subprocess
def test_validate_refuses_a_folder_without_flows(tmp_path: Path) -> None:
    assert "no flows (*.yaml, *.yml) in" in one_line_error(cli("validate", str(tmp_path)), 2)


@pytest.mark.subprocess
def test_validate_without_a_database_finds_sql_syntax_errors(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("nodes:\n  a:\n    sql: |\n      SELECT id\n      FRM whatsapp_instances\n")
    proc = cli("validate", str(tmp_path / "s.yaml"))
    assert proc.returncode == 1
    assert proc.stdout.strip() == (f'{tmp_path / "s.yaml"}:5:11: PLN111 node \'a\': SQL does not parse: syntax error at '
                                   'or near "whatsapp_instances" (SQL line 2, column 5)')


@pytest.mark.subprocess
def test_validate_says_it_prepared_nothing_without_a_database() -> None:
    proc = cli("validate")
    assert proc.returncode == 0
    assert proc.stderr == "planner: 2 flow(s) ok (no database: static checks and SQL syntax; --db also prepares each statement on a server)\n"
    assert proc.stdout == ""
