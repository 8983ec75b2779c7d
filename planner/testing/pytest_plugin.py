"""pytest fixtures for code that runs planner flows (registered as the `planner` pytest11 plugin).

- `planner_pg` (session): the DSN of a PostgreSQL server: `--planner-dsn`, else `DATABASE_URL`,
  else an embedded server started for the session in a temporary `PLANNER_HOME` (stopped after).
- `planner_database`: a fresh, empty database on that server for one test, dropped after it.

    async def test_my_flow(planner_database):
        async with Planner(flows="flows", dsn=planner_database) as planner:
            ...

For flow authors (see docs/testing.md):

- `planner_schema`: the SQL that makes your database: the `planner_schema` ini option (files
  or folders of `*.sql`, relative to the rootdir), or override the fixture in a conftest to
  return SQL text (`str`), paths (`Path`) or a list of both.
- `planner_flows_dir`: your flows folder (the `planner_flows` ini option, default `flows`).
- `planner_flow_dsn`: a fresh database with `planner_schema` applied, cloned per test from a
  template built once per session for each distinct schema.
- `planner_flow_db`: a `Planner` over `planner_flows_dir` on `planner_flow_dsn`, closed after.
- `planner_replay`: record a test's flow runs against a database once, then replay them with
  no database (`planner.testing.Cassette`); `--planner-record=once|none|all`.

The async fixtures need an asyncio plugin running them (pytest-asyncio with `asyncio_mode = auto`).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import shlex
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest

from planner.db.admin import create_database, drop_database, with_database
from planner.db.embedded import embedded_dsn, embedded_status, stop_embedded
from planner.db.pooler import connect
from planner.results import error_text
from planner.settings import Settings

if TYPE_CHECKING:
    import asyncpg

_numbers = itertools.count(1)
RECORD_MODES = ("once", "none", "all")


async def _connect(dsn: str) -> asyncpg.Connection:
    """`planner.db.pooler.connect` with the environment's pooler (`PLANNER_POOLER`) below the
    DSN's `?pgbouncer=`, as planner's own connections have it (the plugin is an edge: it reads
    the environment through `Settings`)."""
    return await connect(dsn, default_pooler=Settings.from_env().pooler)

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--planner-dsn", default=None, help="PostgreSQL server for planner's fixtures (default: DATABASE_URL, else embedded)")
    parser.addoption("--planner-record", default=None, choices=RECORD_MODES,
                     help="planner_replay: once (record a missing cassette, else replay; the default), "
                          "none (replay only: a missing cassette fails), all (record every cassette again)")
    parser.addini("planner_schema", type="linelist", default=[],
                  help="SQL files (or folders of *.sql) applied to planner_flow_dsn's database, relative to the "
                       "configuration file; several separated by spaces or lines (quote a path with spaces)")
    parser.addini("planner_flows", default="flows", help="the flows folder of planner_flow_db and planner_replay")
    parser.addini("planner_record", default="once", help="planner_replay's default record mode: once, none or all")
    parser.addini("planner_cassettes", default="cassettes",
                  help="planner_replay's cassettes: <test folder>/<this>/<test module>/<test>.json")


# --- the session's own folder -----------------------------------------------------------------
#
# The embedded server (its data and its unix socket) lives in a folder of the session's own,
# `<tmp>/planner-pytest-<uid>/run-*`, never in pytest's numbered temporary folders: pytest
# deletes the oldest of those when another run starts, while the run that made them may still
# be using them (a neighbour's suite saw 296 ConnectionRefusedErrors on a socket deleted under
# it). A folder whose owning process is gone (a run that was killed) is swept by the next run.

ROOT_ENV = "PLANNER_TEST_ROOT"
OWNER = "owner.pid"
_servers: dict[str, Path] = {}  # the socket folder of each embedded server of this process -> its folder
unswept: list[str] = []  # leftovers of finished runs that `sweep` could not remove (shown in the summary)


def runs_root() -> Path:
    """Where sessions keep their servers: `PLANNER_TEST_ROOT`, else `<tmp>/planner-pytest-<uid>`."""
    given = os.environ.get(ROOT_ENV)
    root = Path(given) if given else Path(tempfile.gettempdir()) / f"planner-pytest-{os.getuid()}"
    root.mkdir(parents=True, exist_ok=True)
    st = root.lstat()
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():  # a shared /tmp: never another user's folder
        raise pytest.UsageError(f"{root} is not a folder of this user's: set {ROOT_ENV} to a folder of your own")
    return root


def session_folder(root: Path | None = None) -> Path:
    """A new folder of this process's own under `runs_root()`; stale ones are swept first."""
    root = root or runs_root()
    sweep(root)
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    folder.chmod(0o755)  # as root, the server runs as another user, who must reach its socket
    (folder / OWNER).write_text(f"{os.getpid()}\n")
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(root: Path, *, grace_s: float = 60.0) -> list[Path]:
    """Remove the folders of sessions whose process is gone (stopping their server first).
    A folder with no owner yet is left alone for `grace_s` (it is being made). Returns what went."""
    swept = []
    for folder in sorted(root.glob("run-*")):
        try:
            pid = int((folder / OWNER).read_text().strip())
        except (OSError, ValueError):
            try:
                young = time.time() - folder.stat().st_mtime < grace_s
            except OSError:
                continue
            if young:
                continue
            pid = 0
        if pid and _alive(pid):
            continue
        try:
            stop_embedded(folder)
        except Exception as exc:  # its server would not stop: leave the folder; said at the end of the run
            unswept.append(f"{folder}: its run is gone, but its server would not stop: {type(exc).__name__}: {exc}")
            continue
        shutil.rmtree(folder, ignore_errors=True)
        swept.append(folder)
    return swept


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # Another run's leftovers are not this run's failure; they are still never dropped quietly.
    if unswept:
        terminalreporter.section("planner: leftovers of finished runs, not removed")
        for line in unswept:
            terminalreporter.write_line(line)


def server_home(dsn: str) -> Path | None:
    """The folder of the session's own embedded server behind `dsn`; None for any other server."""
    return _servers.get(parse_qs(urlsplit(dsn).query).get("host", [""])[0])


def server_problem(dsn: str) -> str | None:
    """Why the embedded server of this session behind `dsn` cannot be reached (None: it looks
    well, or `dsn` is not one of this session's embedded servers)."""
    socket = parse_qs(urlsplit(dsn).query).get("host", [""])[0]
    home = _servers.get(socket)
    return None if home is None else _problem(home, Path(socket))


def _problem(home: Path, socket: Path) -> str | None:
    pgdata = home / "pgdata"
    where = f"the suite's embedded PostgreSQL ({pgdata})"
    if not pgdata.is_dir():
        return f"{where} is gone: its folder was deleted while the tests ran"
    if not embedded_status(home).running:
        return f"{where} is not running any more (see its log, {pgdata / 'log'})"
    if not any(socket.glob(".s.PGSQL.*")):
        return f"{where} runs, but its socket in {socket} was deleted: nothing can connect to it"
    return None


@contextmanager
def server_folder() -> Iterator[Path]:
    """A folder of this process's own for a server and its socket (`session_folder()`); on
    leaving, the embedded server in it (if any) is stopped and the folder removed. A server that
    will not stop is an error saying so, and its folder is kept for a look."""
    home = session_folder()
    try:
        yield home
    finally:
        try:
            stop_embedded(home)
        except Exception as exc:
            raise RuntimeError(f"planner: the embedded PostgreSQL in {home} would not stop: "
                               f"{error_text(exc)}") from exc
        shutil.rmtree(home, ignore_errors=True)


# A server that lives for one session holds nothing worth keeping past a crash of the machine:
# without fsync, a database cloned from a template costs ~20 ms instead of ~230 ms, and dropping
# it ~10 ms instead of up to ~900 ms (measured on a busy 2-core machine), which is most of what a
# database test costs. A server planner did not start (--planner-dsn, DATABASE_URL) is left as it is.
THROWAWAY_SETTINGS = ("ALTER SYSTEM SET fsync = off", "ALTER SYSTEM SET full_page_writes = off",
                      "ALTER SYSTEM SET synchronous_commit = off")


def throwaway(dsn: str) -> None:
    """Make the server behind `dsn`, started for this session alone, durable no more
    (`THROWAWAY_SETTINGS`, through `ALTER SYSTEM`; none needs a restart)."""
    async def apply() -> None:
        con = await _connect(dsn)
        try:
            for statement in THROWAWAY_SETTINGS:
                await con.execute(statement)
            await con.execute("SELECT pg_reload_conf()")
        finally:
            await con.close()

    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(apply())
        except BaseException as exc:  # raised below, in the caller's thread
            failure.append(exc)

    # A thread of its own: a test loop that may be running is left alone.
    thread = threading.Thread(target=run, name="planner-throwaway")
    thread.start()
    thread.join()
    if failure:
        raise RuntimeError(f"planner: could not turn fsync off on the session's server: {error_text(failure[0])}") from failure[0]


@pytest.fixture(scope="session")
def planner_pg(request: pytest.FixtureRequest) -> Iterator[str]:
    """A server the tests may create databases on: `--planner-dsn`, else `DATABASE_URL`, else an
    embedded one started in a folder of the session's own (`server_folder()`, stopped and removed
    after it)."""
    dsn = request.config.getoption("--planner-dsn") or os.environ.get("DATABASE_URL")
    if dsn:
        yield dsn
        return
    with server_folder() as home:
        dsn = embedded_dsn(home)
        socket = parse_qs(urlsplit(dsn).query).get("host", [""])[0]
        _servers[socket] = home
        throwaway(dsn)
        try:
            yield dsn
        finally:
            _servers.pop(socket, None)


@asynccontextmanager
async def fresh_database(server_dsn: str, *, template: str | None = None) -> AsyncIterator[str]:
    """A new database on `server_dsn` (a copy of `template` if given), dropped afterwards."""
    name = f"planner_test_{os.getpid()}_{next(_numbers)}"
    # On the session's own server (no fsync: `throwaway`), copying a template's files costs a
    # fraction of the default's WAL; on a server of the user's, a checkpoint per test would not.
    own = server_home(server_dsn) is not None
    try:
        await create_database(server_dsn, name, template=template, strategy="FILE_COPY" if own and template else None)
    except OSError as exc:  # refused, or no socket: say whether the server itself is gone
        problem = server_problem(server_dsn)
        if problem is None:
            raise
        raise RuntimeError(problem) from exc
    try:
        yield with_database(server_dsn, name)
    finally:
        if server_problem(server_dsn) is None:  # else the failure above (or the report) says why
            await drop_database(server_dsn, name)


@pytest.fixture
async def planner_database(planner_pg: str) -> AsyncIterator[str]:
    """A fresh, empty database for one test (its DSN)."""
    async with fresh_database(planner_pg) as dsn:
        yield dsn


# --- for flow authors: the schema, a Planner on it, record and replay -------------------------

SchemaPart = str | os.PathLike[str]


@pytest.fixture
def planner_schema(request: pytest.FixtureRequest) -> SchemaPart | list[SchemaPart] | None:
    """The SQL of the authors' database: the `planner_schema` ini option's files; override it to
    return SQL text (a `str`), a `Path` (a file, or a folder of `*.sql` run in name order), or a list."""
    return schema_paths(request.config)


def schema_paths(config: pytest.Config) -> list[SchemaPart]:
    """The `planner_schema` ini option's paths, relative to the configuration file's folder (else
    the rootdir). In an ini file, each line is split like a shell line (several paths on a line;
    quotes for a path with spaces; `#` starts a comment, which pytest would otherwise keep in
    the value); a TOML list gives one path per item."""
    base = Path(config.inipath).parent if config.inipath is not None else Path(config.rootpath)
    toml = config.inipath is not None and Path(config.inipath).suffix == ".toml"
    words: list[str] = []
    for line in config.getini("planner_schema"):
        words += [line] if toml else shlex.split(line, comments=True)
    return [base / word for word in words]


@pytest.fixture
def planner_flows_dir(request: pytest.FixtureRequest) -> Path:
    """The flows folder: the `planner_flows` ini option (default `flows`), relative to the rootdir."""
    return Path(request.config.rootpath) / str(request.config.getini("planner_flows"))


def schema_texts(schema: SchemaPart | list[SchemaPart] | None) -> list[tuple[str, str]]:
    """`(where, sql)` for each piece of a schema: text as given, files read, folders' `*.sql` in name order."""
    parts = [] if schema is None else schema if isinstance(schema, list) else [schema]
    texts: list[tuple[str, str]] = []
    for part in parts:
        if isinstance(part, str):
            texts.append(("planner_schema", part))
            continue
        path = Path(part)
        files = sorted(path.glob("*.sql")) if path.is_dir() else [path]
        for file in files:
            try:
                texts.append((str(file), file.read_text(encoding="utf-8")))
            except OSError as exc:
                raise pytest.UsageError(f"planner_schema: cannot read {file}: {exc}") from exc
    return texts


async def apply_schema(dsn: str, texts: list[tuple[str, str]]) -> None:
    """Run each piece of SQL on `dsn` (several statements per piece are fine)."""
    import asyncpg

    con = await _connect(dsn)  # not asyncpg's own: a `?pgbouncer=` is planner's, never the server's
    try:
        for where, sql in texts:
            try:
                await con.execute(sql)
            except asyncpg.PostgresError as exc:
                raise RuntimeError(f"planner_schema: {where}: {error_text(exc)}") from exc
    finally:
        await con.close()


async def _disconnect_all(server: str, name: str) -> None:
    """End every session on database `name`. A pooler in front of the server (PgBouncer) keeps
    its server connection to the template once the schema's client connection is closed, and
    `CREATE DATABASE ... TEMPLATE` refuses a template anyone is connected to."""
    con = await _connect(server)
    try:
        await con.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE datname = $1 AND pid <> pg_backend_pid()", name)
    finally:
        await con.close()


class _Templates:
    """Template databases, one per (server, schema) for the session; dropped at its end."""

    def __init__(self) -> None:
        self.names: dict[tuple[str, str], str] = {}

    async def get(self, server: str, texts: list[tuple[str, str]]) -> str | None:
        if not texts:
            return None
        digest = hashlib.sha256("\x00".join(sql for _, sql in texts).encode()).hexdigest()[:12]
        key = (server, digest)
        if key not in self.names:
            name = f"planner_tpl_{os.getpid()}_{digest}"
            await drop_database(server, name)
            await create_database(server, name)
            try:
                await apply_schema(with_database(server, name), texts)
                await _disconnect_all(server, name)
            except BaseException:
                await drop_database(server, name)
                raise
            self.names[key] = name
        return self.names[key]

    def drop_all(self) -> None:
        async def drop() -> None:
            for (server, _), name in self.names.items():
                await drop_database(server, name)

        if not self.names:
            return
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(drop())
            except BaseException as exc:  # raised below, in the fixture's teardown, not lost in a thread
                failure.append(exc)

        # A thread of its own: the test loop, if any, is left alone.
        thread = threading.Thread(target=run, name="planner-templates")
        thread.start()
        thread.join()
        if failure:
            exc = failure[0]
            servers = {server for server, _ in self.names}
            reason = next((p for p in map(server_problem, servers) if p is not None), None)
            raise RuntimeError(f"planner: dropping the template databases failed: {error_text(exc)}"
                               + (f" ({reason})" if reason else "")) from exc


@pytest.fixture(scope="session")
def _planner_templates(planner_pg: str) -> Iterator[_Templates]:
    templates = _Templates()
    yield templates
    templates.drop_all()


@asynccontextmanager
async def schema_database(server: str, texts: list[tuple[str, str]], templates: _Templates) -> AsyncIterator[str]:
    """A fresh database on `server` with `texts` applied (cloned from a template), dropped afterwards."""
    template = await templates.get(server, texts)
    async with fresh_database(server, template=template) as dsn:
        yield dsn


@pytest.fixture
async def planner_flow_dsn(planner_pg: str, planner_schema: Any, _planner_templates: _Templates) -> AsyncIterator[str]:
    """A fresh database with `planner_schema` applied, for one test (its DSN)."""
    async with schema_database(planner_pg, schema_texts(planner_schema), _planner_templates) as dsn:
        yield dsn


@pytest.fixture
async def planner_flow_db(planner_flow_dsn: str, planner_flows_dir: Path) -> AsyncIterator[Any]:
    """A `Planner` over `planner_flows_dir` on a fresh database with `planner_schema` applied."""
    from planner.api import Planner

    async with Planner(flows=planner_flows_dir, dsn=planner_flow_dsn) as planner:
        yield planner


class FlowReplay:
    """What `planner_replay` gives a test: `run()` records against a database, or replays.

    `recording` says which; `dsn` is the recording's database (None when replaying), and
    `execute(sql, *args)` runs SQL on it to set up data before a recorded run (it does nothing
    when replaying: the recording already holds what the flow read).
    """

    def __init__(self, cassette: Any, planner: Any, dsn: str | None) -> None:
        self.cassette = cassette
        self.planner = planner
        self.dsn = dsn

    @property
    def recording(self) -> bool:
        return self.dsn is not None

    async def run(self, flow: Any, inputs: dict[str, Any] | None = None, **options: Any) -> Any:
        """Run `flow` (the arguments of `Planner.run`): recorded, or replayed from the cassette."""
        if self.recording:
            return await self.cassette.record(self.planner, flow, inputs, **options)
        return await self.cassette.replay(self.planner, flow, inputs, **options)

    async def execute(self, sql: str, *args: Any) -> str | None:
        """Run `sql` on the recording database (returns its status); nothing when replaying."""
        if self.dsn is None:
            return None
        con = await _connect(self.dsn)
        try:
            return str(await con.execute(sql, *args))
        finally:
            await con.close()


_failed = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_failed] = True  # planner_replay writes no cassette for a failed test
    if report.failed and _servers:
        # A dead server fails every test after it: say so once, by name, and stop the run
        # rather than report hundreds of refused connections.
        problem = next((p for p in (_problem(home, Path(s)) for s, home in _servers.items()) if p), None)
        if problem is not None:
            report.sections.append(("planner_pg", problem))
            item.session.shouldfail = f"planner_pg: {problem}"
    return report


def cassette_path(request: pytest.FixtureRequest) -> Path:
    """`<test file's folder>/<planner_cassettes>/<test module>/<test name>.json`."""
    test_file = Path(request.node.path)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_")
    return test_file.parent / str(request.config.getini("planner_cassettes")) / test_file.stem / f"{name}.json"


@pytest.fixture
async def planner_replay(request: pytest.FixtureRequest, planner_schema: Any, planner_flows_dir: Path) -> AsyncIterator[FlowReplay]:
    """Record this test's flow runs against a database once; replay them afterwards, with none.

    `--planner-record` (or the `planner_record` ini option): `once` records when the test's
    cassette is missing and replays it otherwise; `none` only replays (a missing cassette
    fails: use it in CI); `all` records every cassette again. Recording needs `planner_pg`'s
    server and applies `planner_schema`; replaying needs no database. A cassette is written
    only when the test passes. A replay whose flow changed since the recording fails, naming
    the node (`planner.testing.CassetteMismatch`), as does a test that replays fewer runs
    than were recorded.
    """
    from planner.api import Planner
    from planner.testing import Cassette, offline_planner

    mode = request.config.getoption("--planner-record") or str(request.config.getini("planner_record"))
    if mode not in RECORD_MODES:
        raise pytest.UsageError(f"planner_record must be one of {', '.join(RECORD_MODES)}, not {mode!r}")
    path = cassette_path(request)
    if mode == "all" or (mode == "once" and not path.exists()):
        server: str = request.getfixturevalue("planner_pg")
        templates: _Templates = request.getfixturevalue("_planner_templates")
        async with schema_database(server, schema_texts(planner_schema), templates) as dsn:
            async with Planner(flows=planner_flows_dir, dsn=dsn) as planner:
                replay = FlowReplay(Cassette(path), planner, dsn)
                yield replay
        if not request.node.stash.get(_failed, False):
            replay.cassette.save()
        return
    if not path.exists():
        pytest.fail(f"no cassette at {path} and --planner-record=none: record it with --planner-record=once", pytrace=False)
    cassette = Cassette.load(path)
    async with offline_planner(planner_flows_dir) as planner:
        yield FlowReplay(cassette, planner, None)
    if cassette.unplayed and not request.node.stash.get(_failed, False):
        pytest.fail(f"{path}: the test replayed {cassette.played} run(s) of the {len(cassette.runs)} recorded: "
                    "it no longer runs what was recorded. Record it again (--planner-record=all).", pytrace=False)

