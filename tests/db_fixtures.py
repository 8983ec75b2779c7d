"""PostgreSQL for the suite: `DATABASE_URL` when set, else planner's own embedded server.

`pg_dsn` (session) is the server; `demo_dsn` is a fresh database per test, cloned from a
template that holds the demo schema and a small, deterministic data set.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from planner.db import embedded_dsn, stop_embedded, with_database

TEMPLATE = "planner_test_template"
_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DSN of a server the suite may create databases on."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    home = Path(os.environ.get("PLANNER_TEST_HOME") or tmp_path_factory.mktemp("planner-home"))
    dsn = embedded_dsn(home)
    yield dsn
    if not os.environ.get("PLANNER_TEST_HOME"):
        stop_embedded(home)


@pytest.fixture(scope="session")
async def demo_template(pg_dsn: str) -> str:
    """A template database with the demo schema and a small deterministic data set."""
    from planner.demo import data

    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
    finally:
        await admin.close()
    con = await asyncpg.connect(with_database(pg_dsn, TEMPLATE))
    try:
        await data.load(con, scale=data.Scale.tiny())
    finally:
        await con.close()
    return TEMPLATE


@asynccontextmanager
async def fresh_database(pg_dsn: str, template: str) -> AsyncIterator[str]:
    """A new database cloned from `template`, dropped afterwards."""
    name = f"planner_test_{os.getpid()}_{next(_numbers)}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    try:
        yield with_database(pg_dsn, name)
    finally:
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def demo_dsn(pg_dsn: str, demo_template: str) -> AsyncIterator[str]:
    """A database of its own for one test, cloned from the demo template (~100 ms)."""
    async with fresh_database(pg_dsn, demo_template) as dsn:
        yield dsn
