"""docs/testing.md's examples, run as they are written there, and `planner init`'s scaffold,
which must be the same setup (issue 22, item 4).

Each Python block of the page begins with a comment naming its file (`# tests/conftest.py`),
or is the "Without the fixture" snippet; the ini block begins with `# pytest.ini`.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from typer.testing import CliRunner

from planner.demo import data
from planner.testing.pytest_plugin import schema_paths

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "testing.md"
FLOWS = ROOT / "flows"
SEED = "INSERT INTO whatsapp_instances (instance_name, escalation_enabled, escalation_keywords) VALUES ('acme', true, '{agent}');\n"


def _blocks(language: str) -> list[str]:
    text = DOC.read_text()
    return [textwrap.dedent(m.group(2)) for m in re.finditer(rf"^( *)```{language}\n(.*?)^\1```", text, re.M | re.S)]


def _block(language: str, first_line: str) -> str:
    found = [b for b in _blocks(language) if b.startswith(first_line)]
    assert len(found) == 1, f"docs/testing.md has {len(found)} {language} blocks starting {first_line!r}"
    return found[0]


def test_every_python_block_of_the_page_is_run_here() -> None:
    named = [b.splitlines()[0] for b in _blocks("python") if b.startswith("# tests/")]
    assert sorted(named) == ["# tests/conftest.py", "# tests/test_escalation.py", "# tests/test_replay.py"]
    assert len(_blocks("python")) == len(named) + 1  # and the "Without the fixture" snippet


def _project(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "flows").mkdir(exist_ok=True)
    for flow in ("escalation.yaml", "process_buffered.yaml"):
        shutil.copy(FLOWS / flow, root / "flows" / flow)
    return root


def _pytest(project: Path, *args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PLANNER_ALLOWED_MODULES")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "--basetemp", str(project / ".tmp"), "--planner-dsn", dsn, *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.subprocess
def test_the_pytest_ini_and_the_planner_flow_db_example_pass_as_written(tmp_path: Path, planner_pg: str) -> None:
    project = _project(tmp_path, {
        "pytest.ini": _block("ini", "# pytest.ini"),  # planner_schema = db/schema.sql db/seed.sql: two files
        "db/schema.sql": data.schema_sql(),
        "db/seed.sql": SEED,
        "tests/test_escalation.py": _block("python", "# tests/test_escalation.py"),
    })
    run = _pytest(project, dsn=planner_pg)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


@pytest.mark.subprocess
def test_the_schema_fixture_and_the_replay_example_record_then_replay_without_a_database(tmp_path: Path,
                                                                                        planner_pg: str) -> None:
    project = _project(tmp_path, {
        "pytest.ini": "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n",
        "db/migrations/001_schema.sql": data.schema_sql(),
        "tests/conftest.py": _block("python", "# tests/conftest.py"),
        "tests/test_replay.py": _block("python", "# tests/test_replay.py"),
    })
    recorded = _pytest(project, dsn=planner_pg)
    assert recorded.returncode == 0 and "1 passed" in recorded.stdout, recorded.stdout[-3000:] + recorded.stderr[-2000:]
    assert (project / "tests" / "cassettes" / "test_replay" / "test_a_duplicate_is_not_stored.json").is_file()
    replayed = _pytest(project, "--planner-record=none", dsn="postgresql://nobody@127.0.0.1:1/nowhere")
    assert replayed.returncode == 0 and "1 passed" in replayed.stdout, replayed.stdout[-3000:] + replayed.stderr[-2000:]


async def test_the_cassette_example_records_and_replays(tmp_path: Path, demo_dsn: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    snippet = next(b for b in _blocks("python") if not b.startswith("# tests/"))
    imports = "".join(line + "\n" for line in snippet.splitlines() if line.startswith(("from ", "import ")))
    body = "".join(line + "\n" for line in snippet.splitlines() if not line.startswith(("from ", "import ")))
    code = imports + "async def example(dsn, inputs):\n" + textwrap.indent(body, "    ") + "    return result\n"
    _project(tmp_path, {})
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    result = await namespace["example"](demo_dsn, {"instance_id": 1, "user_phone": "+15550000001", "message": "agent please"})
    assert result.status == "ok" and (tmp_path / "tests" / "cassettes" / "escalation.json").is_file()


def test_planner_init_writes_the_pages_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from planner.cli import app

    monkeypatch.chdir(tmp_path)
    made = CliRunner().invoke(app, ["init", "."])
    assert made.exit_code == 0, made.output
    ini, doc = configparser.ConfigParser(), configparser.ConfigParser()
    ini.read_string((tmp_path / "pytest.ini").read_text())
    doc.read_string(_block("ini", "# pytest.ini"))
    assert dict(ini["pytest"]) == {**doc["pytest"], "planner_schema": "db/schema.sql"}
    assert (tmp_path / "db" / "schema.sql").is_file()
    assert "async def test_example_greets(planner_flow_db)" in (tmp_path / "tests" / "test_flows.py").read_text()
    assert "- run: pytest\n" in (tmp_path / ".github" / "workflows" / "flows.yml").read_text()


def _config(tmp_path: Path, values: list[str], *, ini: str = "pytest.ini") -> pytest.Config:
    return cast(pytest.Config, SimpleNamespace(inipath=tmp_path / ini, rootpath=tmp_path / "elsewhere",
                                               getini=lambda name: values))


@pytest.mark.parametrize(("lines", "expected"), [
    pytest.param(["a.sql b.sql"], ["a.sql", "b.sql"], id="several-on-a-line"),
    pytest.param(["a.sql", "db/b.sql"], ["a.sql", "db/b.sql"], id="one-a-line"),
    pytest.param(["a.sql b.sql    # files, or folders"], ["a.sql", "b.sql"], id="an-inline-comment"),
    pytest.param(["a.sql  # tables", "b.sql"], ["a.sql", "b.sql"], id="a-comment-then-a-line"),
    pytest.param(["'my schema.sql' b.sql"], ["my schema.sql", "b.sql"], id="a-quoted-path-with-a-space"),
])
def test_planner_schema_in_an_ini_file(tmp_path: Path, lines: list[str], expected: list[str]) -> None:
    assert schema_paths(_config(tmp_path, lines)) == [tmp_path / p for p in expected]


def test_planner_schema_in_pyproject_is_a_list_of_paths(tmp_path: Path) -> None:
    config = _config(tmp_path, ["db/my schema.sql", "db/seed.sql"], ini="pyproject.toml")
    assert schema_paths(config) == [tmp_path / "db/my schema.sql", tmp_path / "db/seed.sql"]
