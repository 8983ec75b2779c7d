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
import threading
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from planner.db.pool import connect, create_database, drop_database, embedded_dsn, stop_embedded, with_database

_numbers = itertools.count(1)
RECORD_MODES = ("once", "none", "all")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--planner-dsn", default=None, help="PostgreSQL server for planner's fixtures (default: DATABASE_URL, else embedded)")
    parser.addoption("--planner-record", default=None, choices=RECORD_MODES,
                     help="planner_replay: once (record a missing cassette, else replay; the default), "
                          "none (replay only: a missing cassette fails), all (record every cassette again)")
    parser.addini("planner_schema", type="linelist", default=[],
                  help="SQL files (or folders of *.sql) applied to planner_flow_dsn's database, relative to the rootdir")
    parser.addini("planner_flows", default="flows", help="the flows folder of planner_flow_db and planner_replay")
    parser.addini("planner_record", default="once", help="planner_replay's default record mode: once, none or all")
    parser.addini("planner_cassettes", default="cassettes",
                  help="planner_replay's cassettes: <test folder>/<this>/<test module>/<test>.json")


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


# --- for flow authors: the schema, a Planner on it, record and replay -------------------------

SchemaPart = str | os.PathLike[str]


@pytest.fixture
def planner_schema(request: pytest.FixtureRequest) -> SchemaPart | list[SchemaPart] | None:
    """The SQL of the authors' database: the `planner_schema` ini option's files; override it to
    return SQL text (a `str`), a `Path` (a file, or a folder of `*.sql` run in name order), or a list."""
    root = Path(request.config.rootpath)
    return [root / line for line in request.config.getini("planner_schema")]


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

    con = await connect(dsn)  # not asyncpg's own: a `?pgbouncer=` is planner's, never the server's
    try:
        for where, sql in texts:
            try:
                await con.execute(sql)
            except asyncpg.PostgresError as exc:
                raise RuntimeError(f"planner_schema: {where}: {type(exc).__name__}: {exc}") from exc
    finally:
        await con.close()


async def _disconnect_all(server: str, name: str) -> None:
    """End every session on database `name`. A pooler in front of the server (PgBouncer) keeps
    its server connection to the template once the schema's client connection is closed, and
    `CREATE DATABASE ... TEMPLATE` refuses a template anyone is connected to."""
    con = await connect(server)
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

        if self.names:  # a thread of its own: the test loop, if any, is left alone
            thread = threading.Thread(target=asyncio.run, args=(drop(),), name="planner-templates")
            thread.start()
            thread.join()


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
        con = await connect(self.dsn)
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

