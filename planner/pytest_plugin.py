"""pytest fixtures for code that runs planner flows (registered as the `planner` pytest11 plugin).

- `planner_pg` (session): the DSN of a PostgreSQL server: `--planner-dsn`, else `DATABASE_URL`,
  else an embedded server started for the session in a temporary `PLANNER_HOME` (stopped after).
- `planner_database`: a fresh, empty database on that server for one test, dropped after it.

    async def test_my_flow(planner_database):
        async with Planner(flows="flows", dsn=planner_database) as planner:
            ...
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from planner.db import create_database, drop_database, embedded_dsn, stop_embedded, with_database

_numbers = itertools.count(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--planner-dsn", default=None, help="PostgreSQL server for planner's fixtures (default: DATABASE_URL, else embedded)")


@pytest.fixture(scope="session")
def planner_pg(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server the tests may create databases on."""
    dsn = request.config.getoption("--planner-dsn") or os.environ.get("DATABASE_URL")
    if dsn:
        yield dsn
        return
    home = Path(tmp_path_factory.mktemp("planner-home"))
    yield embedded_dsn(home)
    stop_embedded(home)


@asynccontextmanager
async def fresh_database(server_dsn: str, *, template: str | None = None) -> AsyncIterator[str]:
    """A new database on `server_dsn` (a copy of `template` if given), dropped afterwards."""
    name = f"planner_test_{os.getpid()}_{next(_numbers)}"
    await create_database(server_dsn, name, template=template)
    try:
        yield with_database(server_dsn, name)
    finally:
        await drop_database(server_dsn, name)


@pytest.fixture
async def planner_database(planner_pg: str) -> AsyncIterator[str]:
    """A fresh, empty database for one test (its DSN)."""
    async with fresh_database(planner_pg) as dsn:
        yield dsn
