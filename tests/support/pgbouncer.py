"""A PgBouncer of the suite's own, in transaction mode, in front of the suite's server.

The `pgbouncer` fixture (session, in tests/support/db_fixtures.py) starts the `pgbouncer` binary (Debian's 1.18 in CI: `apt-get install
pgbouncer`; its absence fails the tests that need it, it never skips them) on a free port of
127.0.0.1 in front of `planner_pg`: `pool_mode = transaction`, `default_pool_size = 5`, every
database of the server reachable under its own name. `pgbouncer.dsn(server_dsn)` turns a DSN of
that server (any database: `demo_dsn`'s fresh ones included) into the same database through
PgBouncer, with `?pgbouncer=transaction` so that planner knows. `start` and `stop` work outside
pytest too: benchmarks/fleet.py runs its fleet through them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

POOL_SIZE = 5  # server connections per database (PgBouncer's default_pool_size)
INSTALL = "apt-get install pgbouncer"


class PgBouncerError(RuntimeError):
    """PgBouncer is missing or would not start (the message says which, with its log)."""


def _binary() -> str:
    """`pgbouncer` from PATH (or Debian's /usr/sbin, often missing from a user's PATH)."""
    found = shutil.which("pgbouncer") or next(
        (str(p) for p in (Path("/usr/sbin/pgbouncer"), Path("/usr/local/sbin/pgbouncer")) if p.exists()), None)
    if found is None:
        raise PgBouncerError(f"pgbouncer is not installed (the PgBouncer tests and benchmarks need it): {INSTALL} "
                             "(Debian/Ubuntu; .ci/run installs it)")
    return found


@dataclass
class PgBouncer:
    port: int
    folder: Path
    process: subprocess.Popen[bytes]

    def dsn(self, server_dsn: str, *, pooler: bool = True) -> str:
        """`server_dsn`'s database through PgBouncer (`?pgbouncer=transaction` unless `pooler=False`)."""
        parts = urlsplit(server_dsn)
        user = unquote(parts.username or "postgres")
        return f"postgresql://{user}@127.0.0.1:{self.port}{parts.path or '/postgres'}" + (
            "?pgbouncer=transaction" if pooler else "")

    def log(self) -> str:
        return (self.folder / "pgbouncer.log").read_text(errors="replace")


def _server(dsn: str) -> tuple[str, int, str, str]:
    """(host or socket folder, port, user, password) of a PostgreSQL URL."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "localhost"])[0]
    port = int(query.get("port", [parts.port or 5432])[0])
    user = unquote(parts.username or query.get("user", ["postgres"])[0])
    password = unquote(parts.password or query.get("password", [""])[0])
    return host, port, user, password


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(server_dsn: str, *, pool_size: int = POOL_SIZE) -> PgBouncer:
    """PgBouncer in transaction mode in front of `server_dsn`'s server (stop it with `stop`)."""
    binary = _binary()
    host, port, user, password = _server(server_dsn)
    # World-readable: as root, PgBouncer must be told to run as another user (it refuses root),
    # and pytest's own temporary folders are private.
    folder = Path(tempfile.mkdtemp(prefix="planner-pgbouncer-"))
    folder.chmod(0o755)
    secret = " password='" + password.replace("\\", "\\\\").replace("'", "\\'") + "'" if password else ""
    (folder / "users.txt").write_text(f'"{user}" "{password}"\n')
    listen = _free_port()
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={host} port={port}{secret}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {listen}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {folder / 'users.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        "max_client_conn = 1000\n"
        "ignore_startup_parameters = extra_float_digits\n"
    )
    for path in folder.iterdir():
        path.chmod(0o644)
    command = [binary]
    if os.geteuid() == 0:
        # The user that can reach the server's socket folder (the embedded server's own), else nobody.
        owner = pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/") else "nobody"
        command += ["-u", owner]
    command.append(str(folder / "pgbouncer.ini"))
    with open(folder / "pgbouncer.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    bouncer = PgBouncer(listen, folder, process)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", listen), timeout=1).close()
            return bouncer
        except OSError:
            time.sleep(0.05)
    log_text = bouncer.log()
    stop(bouncer)
    raise PgBouncerError(f"pgbouncer did not start ({' '.join(command)}):\n{log_text}")


def stop(bouncer: PgBouncer) -> None:
    bouncer.process.terminate()
    try:
        bouncer.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        bouncer.process.kill()
        bouncer.process.wait()
    shutil.rmtree(bouncer.folder, ignore_errors=True)
