"""The suite's demo database: a template with the demo schema and a small deterministic data
set, cloned per test. The server itself comes from planner's own pytest plugin (`planner_pg`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from planner.db.admin import create_database, drop_database, with_database
from planner.testing.pytest_plugin import fresh_database
from tests.support.pgbouncer import PgBouncer, PgBouncerError, start, stop

TEMPLATE = "planner_test_template"


@pytest.fixture(scope="session")
def pg_dsn(planner_pg: str) -> str:
    """The server (see `planner.testing.pytest_plugin.planner_pg`)."""
    return planner_pg


@pytest.fixture(scope="session")
async def demo_template(pg_dsn: str) -> str:
    """A template database with the demo schema and a small deterministic data set."""
    from planner.demo import data

    await drop_database(pg_dsn, TEMPLATE)
    await create_database(pg_dsn, TEMPLATE)
    con = await asyncpg.connect(with_database(pg_dsn, TEMPLATE))
    try:
        await data.load(con, scale=data.Scale.tiny())
    finally:
        await con.close()
    return TEMPLATE


@pytest.fixture
async def demo_dsn(pg_dsn: str, demo_template: str) -> AsyncIterator[str]:
    """A database of its own for one test, cloned from the demo template (~100 ms)."""
    async with fresh_database(pg_dsn, template=demo_template) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def pgbouncer(planner_pg: str) -> Iterator[PgBouncer]:
    """PgBouncer (transaction mode) in front of the suite's server, for the session."""
    try:
        bouncer = start(planner_pg)
    except PgBouncerError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield bouncer
    stop(bouncer)
