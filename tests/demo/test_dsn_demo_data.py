"""The demo's data loader given a DSN with planner's `?pgbouncer=transaction`: the parameter is
planner's (taken off and honoured by `planner.db.pooler.connect`), never PgBouncer's or the server's."""

from __future__ import annotations

import asyncpg

from planner.demo import data
from tests.support.pgbouncer import PgBouncer


async def test_ensure_through_pgbouncer_loads_the_demo_data(planner_database: str, pgbouncer: PgBouncer) -> None:
    assert await data.ensure(pgbouncer.dsn(planner_database), data.Scale.tiny()) is True
    con = await asyncpg.connect(planner_database)
    try:
        assert await data.is_loaded(con, data.Scale.tiny())
    finally:
        await con.close()
