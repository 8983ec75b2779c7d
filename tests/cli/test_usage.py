"""What every command shares (planner/cli/common.py): usage mistakes and errors on one line, the help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.cli import cli, one_line_error


@pytest.mark.subprocess
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
    assert needle in one_line_error(cli(*args), code)


@pytest.mark.subprocess
def test_an_inputs_file_that_is_not_an_object_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text("[1, 2]")
    line = one_line_error(cli("run", "escalation", "--inputs", str(tmp_path / "in.json")), 2)
    assert "JSON object" in line


@pytest.mark.subprocess
def test_a_broken_flow_file_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("nodes:\n  a:\n    sql: SELECT 1\n    fetch: many\n")
    line = one_line_error(cli("plan", "bad", "--flows", str(tmp_path)), 1)
    assert f"{tmp_path / 'bad.yaml'}:4:" in line and "node 'a'" in line


@pytest.mark.subprocess
def test_an_unreachable_database_prints_one_line_and_exits_2() -> None:
    proc = cli("run", "escalation", "-i", "instance_id=1", "-i", "user_phone=x", "-i", "message=m", "--db", "postgresql://u@127.0.0.1:1/x")
    assert "cannot reach the database" in one_line_error(proc, 2)


@pytest.mark.subprocess
def test_help_shows_an_example() -> None:
    for command in ("run", "plan", "visualize", "validate", "schema", "demo", "list", "init",
                    "db url", "db status", "db psql", "db stop"):
        proc = cli(*command.split(), "--help")
        # The example runs the command itself (`Example: planner db url`), or inside another one
        # (`Example: psql "$(planner db url --show-password)"`).
        example = re.search(r"Example: (.*)", proc.stdout)
        assert proc.returncode == 0 and example and f"planner {command}" in example.group(1), command


def test_an_error_over_several_lines_is_printed_on_one(capsys: pytest.CaptureFixture[str]) -> None:
    from planner import cli as cli_module

    with pytest.raises(SystemExit):
        cli_module._fail("relation \"x\" does not exist\nDETAIL:  why\nHINT:  \x1b[31mfix", 2)
    assert capsys.readouterr().err == 'planner: relation "x" does not exist / DETAIL:  why / HINT:  \ufffd[31mfix\n'
