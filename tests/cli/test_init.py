"""`planner init` (planner/cli/scaffold.py): a new project's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import cli, one_line_error

pytestmark = pytest.mark.subprocess  # each test runs the console script


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
    line = one_line_error(cli("init", str(tmp_path)), 2)
    assert f"would overwrite {tmp_path / 'flows' / 'example.yaml'}; nothing written" in line
    assert (tmp_path / "flows" / "example.yaml").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["example.yaml", "flows"]
