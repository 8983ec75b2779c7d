"""`planner init`: a new project's files, as docs/testing.md shows them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from planner.cli.common import (
    UsageError,
    app,
)

# --- planner init -----------------------------------------------------------------------------

EXAMPLE_FLOW = """\
# yaml-language-server: $schema=flow.schema.json
description: >
  An example flow. `clock` and `server` need nothing from each other, so they run together;
  `message` uses both, so it waits for them. Nobody wrote that order down: it comes from the
  references ($clock.db, $server). `planner plan example` shows the groups.
inputs:
  name: str
  greeting: {type: str, default: Hello}
nodes:
  clock:
    sql: SELECT now() AS at, current_database() AS db
    fetch: one
    latency: 5ms
  server:
    sql: SHOW server_version
    fetch: value
    latency: 5ms
  message:
    sql: SELECT format('%s, %s! (%s, PostgreSQL %s)', $greeting::text, $name::text, $clock.db::text, $server::text)
    fetch: value
    on_error: fail           # no message, no answer: the run fails rather than default
    latency: 5ms
output:
  message: $message
  at: $clock.at
"""

EXAMPLE_TEST = '''\
"""The flows of this project, run on a fresh database with the project's schema.

`planner_flow_db` comes with planner (its pytest plugin, docs/testing.md): a `Planner` over the
flows folder (`planner_flows` in pytest.ini) on a database of its own for each test, made from
`planner_schema`'s SQL, on DATABASE_URL's server, else on an embedded PostgreSQL started for
the session. `planner_flow_dsn` is that database's DSN, to insert rows before a run.
"""


async def test_example_greets(planner_flow_db) -> None:
    result = await planner_flow_db.run("example", {{"name": "world"}})
    assert not result.degraded, result.defaulted  # a node that fell back on its default fails the test
    assert result.output["message"].startswith("Hello, world!")
'''

EXAMPLE_PYTEST_INI = """\
# planner's pytest fixtures (docs/testing.md): pytest-asyncio runs them.
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
# The SQL that makes the tests' database: files, or folders of *.sql (in name order),
# relative to this file; several separated by spaces or lines.
planner_schema = db/schema.sql
planner_flows = {flows}
"""

EXAMPLE_SCHEMA = """\
-- The tables your flows read and write. Applied once per test session to a template
-- database, which each test then copies (planner_schema in pytest.ini).
CREATE TABLE greetings (
    id       bigserial PRIMARY KEY,
    name     text NOT NULL,
    said_at  timestamptz NOT NULL DEFAULT now()
);
"""

EXAMPLE_CI = """\
# Checks every flow on each push: YAML, schema, references, cycles, call targets and SQL
# syntax (no database needed), then runs the flows' tests on an embedded PostgreSQL.
name: flows
on: [push, pull_request]
jobs:
  flows:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with: {{python-version: "3.12"}}
      - run: pip install planner-flows pytest pytest-asyncio
      - run: planner validate {flows} --format github
      - run: pytest
"""


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="The project folder (default: the current one).")] = Path("."),
    flows_name: Annotated[str, typer.Option("--flows-dir", help="The flows folder, inside the project folder.")] = "flows",
) -> None:
    """Start a project: a flows folder with an example flow (and the schema editors read), a
    test using planner's pytest fixtures with their pytest.ini and the project's db/schema.sql
    (as docs/testing.md shows them), and a CI workflow running `planner validate` and pytest.
    Never overwrites a file: if any of them exists, nothing is written.

    Example: planner init . && planner validate flows
    """
    from planner.lang.schema import flow_schema

    files = {
        Path(flows_name) / "example.yaml": EXAMPLE_FLOW,
        Path(flows_name) / "flow.schema.json": json.dumps(flow_schema(), indent=2) + "\n",
        Path("tests") / "test_flows.py": EXAMPLE_TEST.format(flows=flows_name),
        Path("pytest.ini"): EXAMPLE_PYTEST_INI.format(flows=flows_name),
        Path("db") / "schema.sql": EXAMPLE_SCHEMA,
        Path(".github") / "workflows" / "flows.yml": EXAMPLE_CI.format(flows=flows_name),
    }
    existing = [str(directory / rel) for rel in files if (directory / rel).exists() or (directory / rel).is_symlink()]
    if existing:
        raise UsageError(f"would overwrite {', '.join(existing)}; nothing written (move them away, or init another folder)")
    for rel, text in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x") as handle:  # "x": never replace a file that appeared meanwhile
            handle.write(text)
        typer.echo(f"created {path}")
    flows_dir = directory / flows_name
    typer.echo(f"\nnext: planner validate {flows_dir}\n      planner run example --flows {flows_dir} -i name=you")
