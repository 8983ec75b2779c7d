"""`planner validate --format github`: nothing in a finding can start or change a workflow command.

Each line is read back the way GitHub's runner reads it (actions/runner, ActionCommand
TryParseV2): the command runs to the first `::`, properties split on `,` and `=`, and
`%XX` escapes are undone only after that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.views.validate import Finding, render_findings

PLANNER = str(Path(sys.executable).parent / "planner")


def _unescape(text: str, *, prop: bool) -> str:
    pairs = [("%0D", "\r"), ("%0A", "\n")] + ([("%3A", ":"), ("%2C", ",")] if prop else []) + [("%25", "%")]
    for escaped, plain in pairs:
        text = text.replace(escaped, plain)
    return text


def _read_as_github(line: str) -> tuple[str, dict[str, str], str]:
    """(command, properties, message) as the runner sees one line of output."""
    assert line.startswith("::")
    end = line.index("::", 2)
    command, _, props = line[2:end].partition(" ")
    properties = {}
    for prop in filter(None, props.strip().split(",")):
        key, _, value = prop.partition("=")
        properties[key] = _unescape(value, prop=True)
    return command, properties, _unescape(line[end + 2:], prop=False)


def _one_command(finding: Finding) -> tuple[str, dict[str, str], str]:
    out = render_findings([finding], "github", checked=1)
    assert "\r" not in out and "\n" not in out  # the runner reads a command per line
    return _read_as_github(out)


@pytest.mark.parametrize(
    "file",
    [
        pytest.param("flows/a.yaml\n::warning file=x.yaml::owned", id="newline-then-command"),
        pytest.param("flows/a,line=99,title=owned.yaml", id="commas-add-properties"),
        pytest.param("flows/a::warning::owned.yaml", id="colons-end-properties"),
        pytest.param("flows/100%0A::warning::owned.yaml", id="percent-escape"),
        pytest.param("flows/a\r::warning::owned.yaml", id="carriage-return"),
    ],
)
def test_a_hostile_file_name_stays_the_file_property(file: str) -> None:
    command, props, message = _one_command(Finding(file, 3, 2, None, "PLN100", "bad"))
    assert (command, message) == ("error", "bad")
    assert props == {"file": file, "line": "3", "col": "2", "title": "PLN100"}


@pytest.mark.parametrize(
    "message",
    [
        pytest.param("bad\n::warning file=x.yaml::owned", id="newline-then-command"),
        pytest.param("bad\r\n::error::owned", id="crlf"),
        pytest.param("literal %0A and %25 stay literal", id="percent-escape"),
        pytest.param("a, b: c :: d", id="commas-and-colons"),
    ],
)
def test_a_hostile_message_stays_the_message(message: str) -> None:
    command, props, shown = _one_command(Finding("a.yaml", 1, 1, None, "PLN100", message))
    assert (command, shown) == ("error", message)
    assert props["file"] == "a.yaml"


def test_a_hostile_node_name_stays_in_the_message() -> None:
    node = "a%0A::warning::owned"  # what a refused name reports as its node
    _command, _props, shown = _one_command(Finding("a.yaml", 1, 1, node, "PLN100", "not a valid name"))
    assert shown == f"node {node!r}: not a valid name"


@pytest.mark.subprocess
def test_validate_github_output_of_a_hostile_file_name_is_one_command(tmp_path: Path) -> None:
    path = tmp_path / "a,line=9::b\n::warning file=x::owned.yaml"
    path.write_text("nodes:\n  x: {sql: SELECT $nope}\n")
    env = {**os.environ, "NO_COLOR": "1", "PLANNER_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [PLANNER, "validate", "--flows", str(tmp_path), "--format", "github"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 1, proc.stderr
    command, props, message = _read_as_github(proc.stdout.rstrip("\n"))
    assert "\n" not in proc.stdout.rstrip("\n")
    assert (command, props["file"], props["line"], props["title"]) == ("error", str(path), "2", "PLN200")
    assert message.startswith("node 'x': unknown reference $nope")
