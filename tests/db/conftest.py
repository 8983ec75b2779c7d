"""Fixtures of the tests of planner/db/."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from planner import CallOptions, Planner
from planner.db.coalesce import CoalescingBackend
from planner.db.pool import PoolBackend
from tests.support.stacks import GATE, HOLD, SLOW_ECHO, Entry, Spy, Stack, Write


@pytest.fixture
async def stacks(tmp_path: Path, demo_dsn: str, write_flow: Write) -> AsyncIterator[Callable[..., Stack]]:
    """`stacks(size=1, enabled=True, max_batch=...)`: planners over the flows of `write_flow`."""
    con = await asyncpg.connect(demo_dsn)
    try:
        await con.execute(SLOW_ECHO)
        await con.execute("CREATE FUNCTION vol_echo(v int) RETURNS int VOLATILE LANGUAGE sql AS 'SELECT v'")
        await con.execute("CREATE TABLE gate (); CREATE TABLE gate2 ()")
    finally:
        await con.close()
    write_flow(HOLD, name="hold")
    for table in ("gate", "gate2"):
        write_flow(GATE.replace("{table}", table), name=table)
    made: list[Planner] = []

    def make(size: int = 1, **options: Any) -> Stack:
        pool = PoolBackend(dsn=demo_dsn, min_size=size, max_size=size)
        spy = Spy(pool)
        coalescer = CoalescingBackend(spy, batches=spy, **options)
        entry = Entry(coalescer)
        planner = Planner(flows=tmp_path, backend=entry, call_options=CallOptions(allowed_modules=["tests"]))
        made.append(planner)
        return Stack(planner, coalescer, spy, entry, pool, size, demo_dsn)

    yield make
    for planner in made:
        await planner.close()
