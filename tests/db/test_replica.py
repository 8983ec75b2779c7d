"""Read replicas (`planner.db.replica`): routing compiled per node, and a real streaming replica.

The replica tests run a primary and a replica of their own (`tests.support.replica_pair`: initdb,
pg_basebackup -R, pg_ctl), never the suite's shared server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from planner import CallOptions, FlowFileError, NodeResult, NodeState, Planner, ReplicaOptions, load_flow
from planner.db.admin import create_database, with_database
from planner.db.replica import parse_max_lag
from planner.kinds.backend import Offline
from planner.settings import Settings, SettingsError
from planner.testing.pytest_plugin import fresh_database, server_folder
from tests.support.replica_pair import Pair, Server, caught_up, start_pair

# This module is about another mechanism: nodes run as they would without compiled groups.
pytestmark = pytest.mark.usefixtures("uncompiled")

FLOWS = Path(__file__).resolve().parents[2] / "flows"
TEMPLATE = "replica_demo_template"


def _routes(text: str) -> dict[str, bool]:
    return {name: node.sql.replica for name, node in load_flow(text=text).nodes.items()}


# --- routing, compiled per node (no database) ------------------------------------------------


def test_reads_with_no_write_before_them_may_go_to_a_replica() -> None:
    routes = _routes("""
        nodes:
          a: {sql: SELECT 1, fetch: value}
          b: {sql: SELECT $a + 1, fetch: value}
          pinned: {sql: SELECT 2, fetch: value, replica: false}
          w: {sql: "INSERT INTO t VALUES ($a) RETURNING id", fetch: value}
          listed: {sql: [SELECT 1, SELECT 2], fetch: value}
    """)
    assert routes == {"a": True, "b": True, "pinned": False, "w": False, "listed": False}


def test_a_read_after_a_write_of_its_run_reads_the_primary() -> None:
    routes = _routes("""
        nodes:
          w: {sql: "INSERT INTO t VALUES (1) RETURNING id", fetch: value}
          direct: {sql: SELECT $w, fetch: value}
          through: {sql: SELECT $direct, fetch: value}
          ordered: {sql: SELECT 1, fetch: value, after: [w]}
          chained: {sql: SELECT 1, fetch: value, after: [ordered]}
          guarded: {sql: SELECT 1, fetch: value, when: $w}
          sibling: {sql: SELECT 1, fetch: value}
    """)
    assert routes == {"w": False, "direct": False, "through": False, "ordered": False, "chained": False,
                      "guarded": False, "sibling": True}


def test_a_read_after_a_call_node_reads_the_primary() -> None:
    routes = _routes("""
        nodes:
          before: {sql: SELECT 1, fetch: value}
          f: {call: "tests.nodes:echo", with: {value: $before}}
          after_call: {sql: SELECT $f, fetch: value}
    """)
    assert routes == {"before": True, "f": False, "after_call": False}


def test_a_cached_read_that_a_write_invalidates_reads_the_primary() -> None:
    routes = _routes("""
        nodes:
          kept: {sql: SELECT 1, fetch: value, cache: 30s}
          other: {sql: SELECT 2, fetch: value, cache: 30s}
          w: {sql: "UPDATE t SET x = 1", fetch: none, invalidates: [kept]}
    """)
    assert routes == {"kept": False, "other": True, "w": False}


def test_the_seed_flows_route_as_documented() -> None:
    escalation = {n: s.sql.replica for n, s in load_flow(FLOWS / "escalation.yaml").nodes.items()}
    assert escalation == {"settings": True, "interactions": True, "decide": False, "record": False}
    buffered = load_flow(FLOWS / "process_buffered.yaml").nodes
    assert {n for n, s in buffered.items() if s.sql.replica} == {"instance", "webhook_config", "is_escalated"}


def test_replica_is_a_boolean_key_in_the_schema() -> None:
    schema = json.loads((Path(__file__).resolve().parents[2] / "planner" / "flow.schema.json").read_text())
    prop = json.dumps(schema)
    assert '"replica"' in prop and "never to a read replica" in prop
    with pytest.raises(FlowFileError, match="replica"):
        load_flow(text="nodes: {a: {sql: SELECT 1, replica: sometimes}}")


def test_max_lag_is_a_duration_or_seconds() -> None:
    assert parse_max_lag(None) == 10.0
    assert parse_max_lag("500ms") == 0.5 and parse_max_lag(2) == 2.0
    for bad in ("soon", 0, -1, True, "0s"):
        with pytest.raises(ValueError):
            parse_max_lag(bad)


def test_the_settings_read_the_replica_and_its_max_lag_from_the_environment() -> None:
    assert (Settings.from_env({}).replica_dsn, Settings.from_env({}).replica_max_lag) == (None, 10.0)
    given = Settings.from_env({"DATABASE_REPLICA_URL": "postgresql://replica/app", "PLANNER_REPLICA_MAX_LAG": "3s"})
    assert (given.replica_dsn, given.replica_max_lag) == ("postgresql://replica/app", 3.0)
    with pytest.raises(SettingsError, match="PLANNER_REPLICA_MAX_LAG='soon'"):
        Settings.from_env({"PLANNER_REPLICA_MAX_LAG": "soon"})


async def test_an_empty_replica_dsn_turns_the_replica_off_whatever_the_settings_say(tmp_path: Path) -> None:
    settings = Settings(replica_dsn="postgresql://replica.invalid/app")
    async with Planner(flows=tmp_path, dsn="postgresql://primary.invalid/app", replica_dsn="", settings=settings) as planner:
        assert planner.replica is None
    async with Planner(flows=tmp_path, dsn="postgresql://primary.invalid/app", settings=settings) as planner:
        assert planner.replica is not None and planner.replica.max_lag == 10.0


async def test_a_planner_takes_its_replica_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATABASE_REPLICA_URL", "postgresql://replica.invalid/app")
    async with Planner(flows=tmp_path, dsn="postgresql://primary.invalid/app") as planner:
        assert planner.replica is not None and planner.replica.max_lag == 10.0
    async with Planner(flows=tmp_path, dsn="postgresql://primary.invalid/app", replica_dsn="") as planner:
        assert planner.replica is None
    with pytest.raises(TypeError, match="replica_dsn"):
        Planner(flows=tmp_path, backend=Offline(), replica_dsn="postgresql://replica.invalid/app")


# --- a real streaming replica ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    # Outside pytest's numbered temporary folders, which another test run may delete under it.
    with server_folder() as folder:
        servers = start_pair(folder)
        try:
            yield servers
        finally:
            servers.close()


@pytest.fixture(scope="module")
async def template(pair: Pair) -> str:
    from planner.demo import data

    await create_database(pair.primary.dsn(), TEMPLATE)
    con = await asyncpg.connect(with_database(pair.primary.dsn(), TEMPLATE))
    try:
        await data.load(con, scale=data.Scale.tiny())
        await con.execute("CREATE TABLE notes (id serial PRIMARY KEY, note text NOT NULL)")
        # Which server answered, in a flow: pg_is_in_recovery() itself is VOLATILE (its answer
        # changes on promotion), so a statement calling it is never routed to the replica
        # (`planner.lang.effects`); this STABLE wrapper is a read like any other. PL/pgSQL, not SQL:
        # the body of a SQL function is judged by the catalog like a statement (and would be
        # found to call the volatile built-in), a PL/pgSQL one is taken at its declared volatility.
        await con.execute("CREATE FUNCTION standby() RETURNS boolean STABLE LANGUAGE plpgsql AS "
                          "$$ BEGIN RETURN pg_is_in_recovery(); END $$")
    finally:
        await con.close()
    return TEMPLATE


Databases = Callable[[], AbstractAsyncContextManager[tuple[str, str]]]


@pytest.fixture
def databases(pair: Pair, template: str) -> Databases:
    """`async with databases() as (primary_dsn, replica_dsn)`: a copy of the demo database, on
    the primary and (once replayed) on the replica, dropped after."""

    @asynccontextmanager
    async def make() -> AsyncIterator[tuple[str, str]]:
        async with fresh_database(pair.primary.dsn(), template=template) as dsn:
            await caught_up(pair)
            yield dsn, with_database(pair.replica.dsn(), urlsplit(dsn).path.lstrip("/"))

    return make


@pytest.fixture
async def db(databases: Databases) -> AsyncIterator[tuple[str, str]]:
    async with databases() as dsns:
        yield dsns


@pytest.fixture
def flows(write_flow: Callable[..., Path]) -> Path:
    write_flow("""
        nodes:
          standby: {sql: SELECT standby(), fetch: value, on_error: fail}
          pinned: {sql: SELECT standby(), fetch: value, on_error: fail, replica: false}
    """, name="where")
    write_flow("""
        inputs: {note: str}
        nodes:
          write: {sql: "INSERT INTO notes (note) VALUES ($note) RETURNING id", fetch: value, on_error: fail}
          read:
            sql: SELECT count(*) AS n, standby() AS standby FROM notes WHERE id = $write
            fetch: one
            on_error: fail
          ordered:
            sql: SELECT count(*) AS n, standby() AS standby FROM notes WHERE note = $note
            fetch: one
            after: [write]
            on_error: fail
          later: {sql: "SELECT $read.n::bigint AS n, standby() AS standby", fetch: one, on_error: fail}
          sibling:
            sql: SELECT count(*) AS n, standby() AS standby FROM notes WHERE note = $note
            fetch: one
            on_error: fail
    """, name="ryw")
    path = write_flow("""
        inputs: {note: str}
        nodes:
          count:
            sql: SELECT count(*) AS n, standby() AS standby FROM notes WHERE note = $note
            fetch: one
            on_error: fail
    """, name="count")
    return path.parent


async def _pause(pair: Pair) -> asyncpg.Connection:
    con = await asyncpg.connect(pair.replica.dsn())
    await con.execute("SELECT pg_wal_replay_pause()")
    return con


async def _resume(con: asyncpg.Connection) -> None:
    try:
        await con.execute("SELECT pg_wal_replay_resume()")
    finally:
        await con.close()


async def _until(condition: Callable[[], Any], within: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    for _ in range(100_000):
        if await condition():
            return
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def _replica(node: NodeResult) -> bool:
    """Whether the replica answered this node."""
    assert node.served is not None
    return node.served.replica


def _replica_logs(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "planner" and r.levelno == level and "read replica" in r.getMessage()]


async def test_reads_go_to_the_replica_and_pinned_reads_to_the_primary(db: tuple[str, str], flows: Path) -> None:
    primary, replica = db
    async with Planner(flows=flows, dsn=primary, replica_dsn=replica) as planner:
        for _ in range(3):
            result = await planner.run("where")
            standby, pinned = result.nodes["standby"], result.nodes["pinned"]
            assert standby.value is True and _replica(standby)
            assert pinned.value is False and not _replica(pinned)
        assert planner.replica is not None and planner.replica.state == "up" and planner.replica.fallbacks == 0


async def test_a_run_reads_its_own_writes_from_the_primary(pair: Pair, db: tuple[str, str], flows: Path) -> None:
    primary, replica = db
    async with Planner(flows=flows, dsn=primary, replica_dsn=replica) as planner:
        await planner.run("where")  # opened, and the replica checked
        paused = await _pause(pair)  # the replica cannot see anything written from now on
        try:
            result = await planner.run("ryw", {"note": "mine"})
        finally:
            await _resume(paused)
    nodes = result.nodes
    for name in ("read", "ordered", "later"):  # after the write: directly, through after:, through a read
        assert nodes[name].value == {"n": 1, "standby": False}, name
        assert not _replica(nodes[name])
    # A read that does not depend on the write may read the replica (which has not seen it).
    assert nodes["sibling"].value == {"n": 0, "standby": True}
    assert _replica(nodes["sibling"])


def _plain(value: Any) -> Any:
    """`value` without its timestamps (`now()` differs between two databases)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not isinstance(v, dt.datetime)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


SEED_RUNS: list[tuple[str, dict[str, Any]]] = [
    ("process_buffered", {"instance_name": "acme", "user_phone": "+15550000101", "message": "hello there"}),
    ("process_buffered", {"instance_name": "acme", "user_phone": "+15550000101", "message": "hello there"}),
    ("escalation", {"instance_id": 1, "user_phone": "+15550000101", "message": "I want a refund"}),
    ("process_buffered", {"instance_name": "acme", "user_phone": "+15550000101", "message": "anyone?"}),
    ("escalation", {"instance_id": 2, "user_phone": "+15550000102", "message": "a human please"}),
    ("process_buffered", {"instance_name": "quiet", "user_phone": "+15550000102", "message": "hi"}),
    ("escalation", {"instance_id": 1, "user_phone": "+15550000103", "message": "where is my parcel"}),
]


@pytest.mark.parametrize("cache", ["1", "0"])
async def test_the_seed_flows_give_the_same_results_with_and_without_the_replica(
    pair: Pair, databases: Databases, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLANNER_CACHE", cache)
    outcomes: list[list[Any]] = []
    served_by_replica = 0
    for use_replica in (False, True):
        async with databases() as (primary, replica), Planner(
                flows=FLOWS, dsn=primary, replica_dsn=replica if use_replica else "") as planner:
            seen = []
            for flow, inputs in SEED_RUNS:
                result = await planner.run(flow, inputs)
                seen.append((flow, result.status, _plain(result.output),
                             {name: node.state for name, node in result.nodes.items()}))
                served_by_replica += sum(1 for n in result.nodes.values() if n.served is not None and n.served.replica)
                await caught_up(pair)  # another run's writes reach the replica a little later
            outcomes.append(seen)
    assert outcomes[0] == outcomes[1]
    assert any(out["escalate"] for flow, _, out, _ in outcomes[0] if flow == "escalation")
    assert any(out["escalated"] for flow, _, out, _ in outcomes[0] if flow == "process_buffered")
    assert served_by_replica > 0


async def test_an_error_only_the_replica_gives_is_answered_by_the_primary(
    db: tuple[str, str], write_flow: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="planner")
    primary, replica = db
    path = write_flow("""
        nodes:
          odd: {sql: "SELECT 1 / (CASE WHEN standby() THEN 0 ELSE 1 END)", fetch: value, on_error: fail}
          broken: {sql: "SELECT 1 / (CASE WHEN standby() THEN 0 ELSE 0 END)", fetch: value}
    """, name="odd")
    async with Planner(flows=path.parent, dsn=primary, replica_dsn=replica) as planner:
        result = await planner.run("odd")
        assert result.nodes["odd"].value == 1
        assert not _replica(result.nodes["odd"])
        broken = result.nodes["broken"]  # an error the primary gives too is the node's, as ever
        assert broken.state is NodeState.DEFAULTED and "division by zero" in str(broken.error)
        assert planner.replica is not None and planner.replica.state == "up" and planner.replica.fallbacks >= 2
    assert _replica_logs(caplog, logging.WARNING) == []


async def test_a_replica_that_cannot_be_reached_leaves_reads_on_the_primary(
    db: tuple[str, str], flows: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="planner")
    primary, _ = db
    nowhere = "postgresql://postgres@/postgres?host=/tmp/planner-no-replica-here"
    async with Planner(flows=flows, dsn=primary, replica_dsn=nowhere) as planner:
        for _ in range(5):
            result = await planner.run("where")
            assert result.nodes["standby"].value is False
            assert not _replica(result.nodes["standby"])
        assert planner.replica is not None and planner.replica.state == "down"
    warnings = _replica_logs(caplog, logging.WARNING)
    assert len(warnings) == 1 and "unavailable" in warnings[0]


async def test_a_server_that_is_not_a_standby_is_not_used_as_one(
    db: tuple[str, str], flows: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="planner")
    primary, _ = db
    async with Planner(flows=flows, dsn=primary, replica_dsn=primary) as planner:
        result = await planner.run("where")
        assert not _replica(result.nodes["standby"])
        assert planner.replica is not None and planner.replica.state == "down"
    warnings = _replica_logs(caplog, logging.WARNING)
    assert len(warnings) == 1 and "not a standby" in warnings[0]


async def test_a_replica_lagging_past_the_bound_sends_reads_to_the_primary(
    pair: Pair, db: tuple[str, str], flows: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="planner")
    primary, replica = db
    async with Planner(flows=flows, dsn=primary, replica_dsn=replica, replica_options=ReplicaOptions(max_lag="300ms")) as planner:
        assert planner.replica is not None
        first = (await planner.run("count", {"note": "late"})).nodes["count"]
        assert first.value == {"n": 0, "standby": True}
        paused = await _pause(pair)
        try:
            writer = await asyncpg.connect(primary)
            try:
                await writer.execute("INSERT INTO notes (note) VALUES ('late')")
            finally:
                await writer.close()
            loop = asyncio.get_running_loop()
            written = loop.time()

            async def on_primary() -> bool:
                node = (await planner.run("count", {"note": "late"})).nodes["count"]
                assert node.state is NodeState.OK
                return bool(node.value == {"n": 1, "standby": False})

            await _until(on_primary, within=10)
            assert loop.time() - written >= 0.25  # the replica was used until it lagged past the bound
            assert planner.replica.state == "lagging" and not planner.replica.usable()
        finally:
            await _resume(paused)

        async def back() -> bool:
            node = (await planner.run("count", {"note": "late"})).nodes["count"]
            return bool(node.value == {"n": 1, "standby": True})

        await _until(back)
    warnings = _replica_logs(caplog, logging.WARNING)
    assert len(warnings) == 1 and "lagging" in warnings[0] and "ReplicaOptions.max_lag" in warnings[0]
    assert len(_replica_logs(caplog, logging.INFO)) == 1


async def test_a_replica_stopped_under_load_fails_no_run(
    pair: Pair, db: tuple[str, str], flows: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="planner")
    monkeypatch.setenv("PLANNER_CACHE", "0")  # every read reaches a server
    for name in ("process_buffered", "escalation"):
        (flows / f"{name}.yaml").write_text((FLOWS / f"{name}.yaml").read_text())
    primary, replica = db
    loop = asyncio.get_running_loop()
    stopped_at: float | None = None
    runs: list[tuple[float, str, Any]] = []  # (started, flow, result)
    try:
        async with Planner(flows=flows, dsn=primary, replica_dsn=replica, call_options=CallOptions(allowed_modules=["planner.demo"])) as planner:
            assert planner.replica is not None
            planner.replica.backoff = (0.2, 0.5)
            done = asyncio.Event()

            async def worker(index: int) -> None:
                count = 0
                while not done.is_set():
                    count += 1
                    started = loop.time()
                    phone = f"+1555{index:03d}{count:04d}"
                    runs.append((started, "where", await planner.run("where")))
                    runs.append((started, "process_buffered", await planner.run(
                        "process_buffered", {"instance_name": "acme", "user_phone": phone, "message": "hi"})))
                    runs.append((started, "escalation", await planner.run(
                        "escalation", {"instance_id": 1, "user_phone": phone, "message": "hello"})))

            workers = [asyncio.create_task(worker(i)) for i in range(4)]
            await asyncio.sleep(0.7)
            await asyncio.to_thread(pair.replica.stop, "immediate")
            stopped_at = loop.time()
            await asyncio.sleep(1.5)
            done.set()
            await asyncio.gather(*workers)  # a failed run (FlowFailed) would be raised here
            assert planner.replica.state == "down"

            await asyncio.to_thread(pair.replica.start)

            async def back() -> bool:
                return bool((await planner.run("where")).nodes["standby"].value is True)

            await _until(back, within=30)
            assert str(planner.replica.state) == "up"
    finally:
        if not pair.replica.running():
            pair.replica.start()
    assert stopped_at is not None
    for _, _, result in runs:
        assert result.status == "ok"
        for name, node in result.nodes.items():
            assert node.state in (NodeState.OK, NodeState.SKIPPED), (name, node.state, node.error)
    before = [r for t, f, r in runs if f == "where" and t < stopped_at - 0.1]
    after = [r for t, f, r in runs if f == "where" and t > stopped_at]
    assert before and any(r.nodes["standby"].value is True for r in before)
    assert after and all(r.nodes["standby"].value is False for r in after)
    assert all(not _replica(r.nodes["standby"]) for r in after)
    warnings = _replica_logs(caplog, logging.WARNING)
    assert len(warnings) == 1 and "unavailable" in warnings[0]
    assert len(_replica_logs(caplog, logging.INFO)) == 1  # back


# A STABLE function of the test's (planner sends reads of it to the replica): slow only where
# it runs in recovery, so only the replica is slow to answer it.
STANDBY_SLEEP = """
CREATE FUNCTION standby_sleep(s float8) RETURNS bool STABLE LANGUAGE plpgsql AS
$$ BEGIN IF standby() THEN PERFORM pg_sleep(s); END IF; RETURN standby(); END $$
"""


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # ended meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
    return found


@contextmanager
def stalled(server: Server) -> Iterator[None]:
    """`server` stopped with SIGSTOP, its postmaster and every backend: it accepts connections
    (the kernel queues them) and answers nothing, not even a cancel, until the block ends."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGSTOP)  # first: it forks nothing new meanwhile
    children = _children(postmaster)
    try:
        for pid in children:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in [*children, postmaster]:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


async def test_a_read_that_runs_over_its_timeout_on_the_replica_only_is_answered_by_the_primary(
    pair: Pair, db: tuple[str, str], write_flow: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="planner")
    primary, replica = db
    writer = await asyncpg.connect(primary)
    try:
        await writer.execute(STANDBY_SLEEP)
    finally:
        await writer.close()
    await caught_up(pair)
    path = write_flow("""
        nodes:
          slow: {sql: "SELECT standby_sleep(30)", fetch: value, timeout: 300ms, on_error: fail}
          where: {sql: "SELECT standby()", fetch: value, on_error: fail}
    """, name="slow")
    async with Planner(flows=path.parent, dsn=primary, replica_dsn=replica) as planner:
        result = await planner.run("slow")
        assert planner.replica is not None and planner.replica.state == "up"
    slow = result.nodes["slow"]
    assert slow.state is NodeState.OK and slow.value is False and not _replica(slow)
    assert result.nodes["where"].value is True  # the replica stays in use for the rest
    assert _replica_logs(caplog, logging.WARNING) == []


async def test_a_read_a_stalled_replica_does_not_answer_within_its_timeout_is_answered_by_the_primary(
    pair: Pair, db: tuple[str, str], write_flow: Callable[..., Path]
) -> None:
    primary, replica = db
    path = write_flow("""
        nodes:
          standby: {sql: SELECT standby(), fetch: value, timeout: 500ms, on_error: fail}
    """, name="timed")
    async with Planner(flows=path.parent, dsn=primary, replica_dsn=replica) as planner:
        assert (await planner.run("timed")).nodes["standby"].value is True
        with stalled(pair.replica):
            node = (await planner.run("timed")).nodes["standby"]
    assert node.state is NodeState.OK and node.value is False and not _replica(node)


async def test_a_stalled_replica_is_marked_down(
    pair: Pair, db: tuple[str, str], flows: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="planner")
    primary, replica = db
    async with Planner(flows=flows, dsn=primary, replica_dsn=replica) as planner:
        await planner.run("where")  # opened, and the replica checked
        monitor = planner.replica
        assert monitor is not None and monitor.state == "up"

        async def down() -> bool:
            return monitor.state == "down"

        with stalled(pair.replica):
            await _until(down, within=15)  # its check, that never gets an answer, gives up
    warnings = _replica_logs(caplog, logging.WARNING)
    assert len(warnings) == 1 and "no answer to the health check" in warnings[0]


async def test_a_read_without_a_timeout_that_a_stalled_replica_holds_goes_to_the_primary_once_it_is_down(
    pair: Pair, db: tuple[str, str], flows: Path
) -> None:
    primary, replica = db
    async with Planner(flows=flows, dsn=primary, replica_dsn=replica) as planner:
        assert planner.replica is not None
        assert (await planner.run("where")).nodes["standby"].value is True
        with stalled(pair.replica):
            async with asyncio.timeout(30):  # generous: it is held until the monitor's check gives up
                node = (await planner.run("where")).nodes["standby"]
            assert planner.replica.state == "down"
        assert node.state is NodeState.OK and node.value is False and not _replica(node)


async def test_closing_a_planner_stops_the_monitor_and_both_pools(pair: Pair, db: tuple[str, str], flows: Path) -> None:
    primary, replica = db
    database = urlsplit(primary).path.lstrip("/")

    async def connections(server_dsn: str) -> int:
        con = await asyncpg.connect(server_dsn)
        try:
            return int(await con.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database))
        finally:
            await con.close()

    planner = Planner(flows=flows, dsn=primary, replica_dsn=replica)
    await planner.run("where")
    monitor = planner.replica
    assert monitor is not None and monitor._task is not None
    task = monitor._task
    assert await connections(pair.primary.dsn()) > 0 and await connections(pair.replica.dsn()) > 0
    await planner.close()
    assert task.done() and monitor._task is None

    async def gone() -> bool:  # a server process ends a moment after its client has left
        return await connections(pair.primary.dsn()) == 0 and await connections(pair.replica.dsn()) == 0

    await _until(gone, within=5)
