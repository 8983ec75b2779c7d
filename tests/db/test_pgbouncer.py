"""planner behind PgBouncer in transaction mode (Debian's 1.18, which keeps no prepared statement
from one transaction to the next): the seed flows, coalescing, fusion, faults and `validate --db`
through it, and the clear errors for what cannot work there. See docs/flows.md, "Behind PgBouncer".

The PgBouncer is the suite's own (`tests/support/pgbouncer.py`): missing, these tests fail, never skip.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import planner.db.pool as planner_db
from planner import (
    CacheOptions,
    DatabaseUnavailable,
    FlowFailed,
    NodeState,
    NodeTimeout,
    Planner,
    PoolOptions,
    QueryError,
    load_flow,
)
from planner.db.coalesce import CoalescingBackend
from planner.db.dsn import pooler_mode, split_pooler
from planner.db.fuse import FusingBackend
from planner.db.pool import PoolBackend
from planner.db.pooler import outlives_transaction
from planner.db.translate import translate
from planner.lang.sqlinfo import combine_writes
from planner.settings import Settings
from planner.testing.pytest_plugin import fresh_database
from planner.views.validate import validate_paths
from tests import test_seed_flows as seed_flows
from tests.reliability.test_faults import _assert_pool_whole, _gone, _terminate, _wait_for_query
from tests.support.pgbouncer import PgBouncer
from tests.support.spies import Counting
from tests.test_seed_flows import ACME, FLOWS, _message, _stable, con  # noqa: F401 - `con` is a fixture the seed checks use

# This module is about another mechanism: nodes run as they would without compiled groups.
pytestmark = pytest.mark.usefixtures("uncompiled")

ROOT = Path(__file__).resolve().parents[2]

# --- the seed flows through PgBouncer --------------------------------------------------------
# Every check of tests/test_seed_flows.py that runs the flows on its `seed` planner runs here
# again, on the `seed` below: the same flows, the same database, through PgBouncer.

globals().update({name: check for name, check in vars(seed_flows).items()
                  if name.startswith("test_") and "seed" in inspect.signature(check).parameters})


@pytest.fixture(params=["cache", "no cache"])
async def seed(request: pytest.FixtureRequest, demo_dsn: str, pgbouncer: PgBouncer,
               monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Planner]:
    monkeypatch.setenv("PLANNER_CACHE", "1" if request.param == "cache" else "0")
    async with Planner(flows=FLOWS, dsn=pgbouncer.dsn(demo_dsn)) as planner:
        assert planner.pools["primary"].pooler == "transaction"
        yield planner


async def test_the_seed_flows_give_the_same_results_through_pgbouncer_as_direct(
        pg_dsn: str, demo_template: str, pgbouncer: PgBouncer) -> None:
    outputs = []
    for via in ("direct", "pgbouncer"):
        async with fresh_database(pg_dsn, template=demo_template) as dsn, \
                Planner(flows=FLOWS, dsn=dsn if via == "direct" else pgbouncer.dsn(dsn)) as planner:
            runs = [await planner.run("process_buffered", _message(phone=phone, message=text, instance=instance))
                    for phone, text, instance in [("+15550000001", "hi", "acme"), ("+15550000001", "hi", "acme"),
                                                  ("+15550000004", "hello", "acme"), ("+15550000001", "hi", "quiet"),
                                                  ("+19990000000", "new", "acme"), ("+15550000001", "x", "nobody")]]
            for message in ("thanks", "a HUMAN please", "agent!"):
                runs.append(await planner.run("escalation", {"instance_id": ACME, "user_phone": "+15550000001",
                                                             "message": message}))
            outputs.append([(r.states(), _stable(r.output)) for r in runs])
    assert outputs[0] == outputs[1]


async def test_many_concurrent_seed_runs_on_a_small_pool_through_pgbouncer(demo_dsn: str, pgbouncer: PgBouncer) -> None:
    async with Planner(flows=FLOWS, dsn=pgbouncer.dsn(demo_dsn), pool_options=PoolOptions(min_size=2, max_size=2)) as planner:
        results = await asyncio.gather(*(planner.run("process_buffered", _message(phone=f"+1777000{i:04d}", message=f"m{i}"))
                                         for i in range(40)))
        assert planner.stack.coalescers["primary"].batches > 0  # reads were shared
    assert all(r.status == "ok" and isinstance(r.output["stored"], int) for r in results)
    assert len({r.output["stored"] for r in results}) == 40
    admin = await asyncpg.connect(demo_dsn)
    try:
        assert await admin.fetchval("SELECT count(*) FROM whatsapp_conversation_messages WHERE content ~ '^m[0-9]+$'") == 40
    finally:
        await admin.close()


# --- coalescing and fusion: the statements planner prepares for itself -----------------------

COALESCED = """
inputs: {k: int}
nodes:
  typed: {sql: "SELECT $k::int * 2 AS twice, $k::text AS label", fetch: one}
  counted: {sql: "SELECT count(*) FROM whatsapp_instances WHERE id <= $k", fetch: value}
  stored: {sql: "INSERT INTO pgb_items (k) VALUES ($k) RETURNING k", fetch: value, coalesce: true}
"""


@pytest.fixture
async def items_dsn(demo_dsn: str) -> str:
    admin = await asyncpg.connect(demo_dsn)
    try:
        await admin.execute("CREATE TABLE pgb_items (id serial PRIMARY KEY, k int NOT NULL)")
    finally:
        await admin.close()
    return demo_dsn


async def test_coalesced_reads_and_writes_through_pgbouncer(items_dsn: str, pgbouncer: PgBouncer) -> None:
    # One connection, many runs: reads and writes wait for it, so they go in batches, whose
    # parameter types planner learns by preparing the statement (unnamed, behind PgBouncer).
    flow = load_flow(text=COALESCED, name="coalesced")
    writes_combine = combine_writes(flow.nodes["stored"].sql.statements[0].text, 2) is not None
    pool = PoolBackend(dsn=pgbouncer.dsn(items_dsn), min_size=1, max_size=1)
    coalescer = CoalescingBackend(pool, batches=pool, enabled=True)
    async with Planner(backend=FusingBackend(coalescer, fuser=pool, enabled=False)) as planner:
        for _ in range(2):  # the second round uses what the first one learned
            results = await asyncio.gather(*(planner.run(flow, {"k": k}) for k in range(1, 31)))
            for k, result in enumerate(results, start=1):
                assert result.values["typed"] == {"twice": 2 * k, "label": str(k)}
                assert result.values["stored"] == k
            assert coalescer.batches > 0
            assert any(r.nodes["typed"].served.batch > 1 for r in results)  # type: ignore[union-attr]
            # (Writes are combined where planner.lang.sqlinfo can: not with pglast 8 before its `returningClause` fix.)
            assert any(r.nodes["stored"].served.batch > 1 for r in results) or not writes_combine  # type: ignore[union-attr]
        count = await planner.run(load_flow(text="nodes: {n: {sql: 'SELECT count(*) FROM whatsapp_instances', fetch: value}}"))
        total = count.values["n"]
        assert all(r.values["counted"] == min(k, total) for k, r in enumerate(results, start=1))
    admin = await asyncpg.connect(items_dsn)
    try:
        assert await admin.fetchval("SELECT count(*) FROM pgb_items") == 60
    finally:
        await admin.close()


SIBLINGS = """
inputs: {k: int}
nodes:
  root: {sql: "SELECT $k::int AS k", fetch: one}
  rows: {sql: "SELECT id, instance_name FROM whatsapp_instances WHERE id <= $root.k ORDER BY id", fetch: all}
  one: {sql: "SELECT instance_name, id * 2 AS twice FROM whatsapp_instances WHERE id = $root.k", fetch: one}
  count: {sql: "SELECT count(*) FROM whatsapp_instances WHERE id > $root.k", fetch: value}
"""


async def test_fused_reads_through_pgbouncer_equal_direct_ones(demo_dsn: str, pgbouncer: PgBouncer) -> None:
    flow = load_flow(text=SIBLINGS, name="siblings")
    values = []
    for dsn in (demo_dsn, pgbouncer.dsn(demo_dsn)):
        counting = Counting(PoolBackend(dsn=dsn))
        async with Planner(backend=FusingBackend(counting, fuser=counting, enabled=True)) as planner:
            for k in (1, 2):  # the second run uses the columns the first one learned
                result = await planner.run(flow, {"k": k})
                assert result.nodes["rows"].served.fused == 3  # type: ignore[union-attr]
                values.append((k, result.values))
        assert counting.fused == [3, 3]
    assert values[:2] == values[2:]


async def test_a_statement_is_described_once_not_before_each_use(demo_dsn: str, pgbouncer: PgBouncer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Without its statement cache asyncpg describes each statement before running it: a round
    # trip of its own. planner keeps the description and sends the statement, unnamed, with it.
    described: list[str] = []
    real = asyncpg.Connection._get_statement

    async def describe(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        described.append(query)
        return await real(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "_get_statement", describe)
    flow = load_flow(text="inputs: {k: int}\nnodes: {a: {sql: 'SELECT $k::int + 1 AS v', fetch: value}}", name="one")
    async with Planner(dsn=pgbouncer.dsn(demo_dsn), pool_options=PoolOptions(min_size=1, max_size=1), cache_options=CacheOptions(size=0)) as planner:
        assert (await planner.run(flow, {"k": 0})).values["a"] == 1
        # Once on the pool's connection, and once on the catalog's when it was asked what the
        # statement does (`planner.db.catalog`, a connection of its own, kept for a minute).
        assert described.count("SELECT $1::int + 1 AS v") == 2
        for k in range(10):
            assert (await planner.run(flow, {"k": k})).values["a"] == k + 1
        assert described.count("SELECT $1::int + 1 AS v") == 2


async def test_a_changed_result_is_described_again(demo_dsn: str, pgbouncer: PgBouncer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A kept description is dropped after any error (a column added under `SELECT *`) and at
    # the latest after DESCRIBED_S (a column renamed: nothing fails, the names change).
    admin = await asyncpg.connect(demo_dsn)
    await admin.execute("CREATE TABLE pgb_shape (a int); INSERT INTO pgb_shape VALUES (1)")
    flow = load_flow(text="nodes: {r: {sql: 'SELECT * FROM pgb_shape', fetch: one, on_error: fail}}", name="shape")
    try:
        async with Planner(dsn=pgbouncer.dsn(demo_dsn), pool_options=PoolOptions(min_size=1, max_size=1), cache_options=CacheOptions(size=0)) as planner:
            assert (await planner.run(flow)).values["r"] == {"a": 1}
            await admin.execute("ALTER TABLE pgb_shape ADD COLUMN b int DEFAULT 2")
            try:
                first = (await planner.run(flow)).values["r"]
            except FlowFailed as exc:
                assert isinstance(exc.result.nodes["r"].error, QueryError)  # described once, before the change
            else:
                assert first == {"a": 1, "b": 2}
            assert (await planner.run(flow)).values["r"] == {"a": 1, "b": 2}
        monkeypatch.setattr("planner.db.pooler.DESCRIBED_S", 0.0)  # a description is used once
        async with Planner(dsn=pgbouncer.dsn(demo_dsn), pool_options=PoolOptions(min_size=1, max_size=1), cache_options=CacheOptions(size=0)) as planner:
            assert (await planner.run(flow)).values["r"] == {"a": 1, "b": 2}
            await admin.execute("ALTER TABLE pgb_shape RENAME COLUMN b TO c")
            assert (await planner.run(flow)).values["r"] == {"a": 1, "c": 2}
    finally:
        await admin.close()


# --- faults that apply behind a pooler -------------------------------------------------------


async def test_a_backend_killed_mid_query_through_pgbouncer_is_retried(demo_dsn: str, pgbouncer: PgBouncer,
                                                                        tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text("nodes:\n  a:\n    sql: SELECT pg_sleep(0.4) AS pgb_kill_probe\n"
                                     "    retry: {attempts: 2, backoff: 10ms}\n")
    async with Planner(flows=tmp_path, dsn=pgbouncer.dsn(demo_dsn), pool_options=PoolOptions(min_size=2, max_size=2)) as planner:
        task = asyncio.create_task(planner.run("f"))
        await _terminate(demo_dsn, await _wait_for_query(demo_dsn, "pgb_kill_probe"))
        node = (await task).nodes["a"]
        assert node.state is NodeState.OK and node.attempts == 2
        await _assert_pool_whole(planner)


async def test_a_transaction_killed_half_way_through_pgbouncer_leaves_nothing(items_dsn: str, pgbouncer: PgBouncer,
                                                                              tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text(
        "nodes:\n  tx:\n    sql:\n"
        "      - INSERT INTO pgb_items (k) VALUES (1)\n"
        "      - SELECT pg_sleep(2) AS pgb_txn_probe\n"
        "      - INSERT INTO pgb_items (k) VALUES (2)\n"
        "    on_error: fail\n")
    async with Planner(flows=tmp_path, dsn=pgbouncer.dsn(items_dsn), pool_options=PoolOptions(min_size=2, max_size=2)) as planner:
        task = asyncio.create_task(planner.run("f"))
        await _terminate(items_dsn, await _wait_for_query(items_dsn, "pgb_txn_probe"))
        with pytest.raises(FlowFailed):
            await task
        await _assert_pool_whole(planner)
    admin = await asyncpg.connect(items_dsn)
    try:
        assert await admin.fetchval("SELECT count(*) FROM pgb_items") == 0
    finally:
        await admin.close()


async def test_a_node_timeout_through_pgbouncer_cancels_on_the_server(demo_dsn: str, pgbouncer: PgBouncer,
                                                                       tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text("nodes:\n  a: {sql: 'SELECT pg_sleep(5) AS pgb_cancel_probe', timeout: 100ms}\n")
    async with Planner(flows=tmp_path, dsn=pgbouncer.dsn(demo_dsn), pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
        node = (await planner.run("f")).nodes["a"]
        assert isinstance(node.error, NodeTimeout)
        assert await _gone(demo_dsn, "pgb_cancel_probe")
        await _assert_pool_whole(planner)


# --- session state: refused, with the node named -----------------------------------------------


async def test_a_node_that_changes_its_session_is_refused_behind_pgbouncer(demo_dsn: str, pgbouncer: PgBouncer,
                                                                           tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text(
        "nodes:\n"
        "  first: {sql: 'SELECT 1', fetch: value}\n"
        "  rename: {sql: \"SELECT set_config('application_name', 'pgb_leaked', false) AS v\", fetch: value,"
        " on_error: fail, after: [first]}\n")
    async with Planner(flows=tmp_path, dsn=pgbouncer.dsn(demo_dsn)) as planner:
        with pytest.raises(FlowFailed) as info:
            await planner.run("f")
    error = info.value.result.nodes["rename"].error
    assert isinstance(error, QueryError) and not error.transient
    message = str(error)
    assert "node 'rename'" in message and "transaction-mode pooler" in message and "set_config" in message
    admin = await asyncpg.connect(demo_dsn)
    try:  # nothing was sent
        assert not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgb_leaked'")
    finally:
        await admin.close()
    async with Planner(flows=tmp_path, dsn=demo_dsn) as direct:  # direct, it runs (and is reset after)
        assert (await direct.run("f")).values["rename"] == "pgb_leaked"


async def test_transaction_scoped_effects_run_behind_pgbouncer(items_dsn: str, pgbouncer: PgBouncer,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f.yaml").write_text(
        "nodes:\n"
        "  local:\n    sql:\n      - SET LOCAL statement_timeout = '50ms'\n      - SELECT pg_sleep(1)\n"
        "  seq: {sql: \"INSERT INTO pgb_items (k) VALUES (nextval('pgb_items_id_seq')) RETURNING k\", fetch: value}\n"
        "  locked:\n    sql:\n      - LOCK TABLE pgb_items IN SHARE MODE\n      - SELECT count(*) FROM pgb_items\n"
        "    fetch: value\n    after: [seq]\n")
    releases: list[bool] = []
    real = planner_db._release

    async def spy(pool: Any, connection: Any, dirty: bool, baseline: Any) -> None:
        releases.append(dirty or baseline is not None)
        await real(pool, connection, dirty, baseline)

    monkeypatch.setattr("planner.db.pool._release", spy)
    async with Planner(flows=tmp_path, dsn=pgbouncer.dsn(items_dsn)) as planner:
        result = await planner.run("f")
    local = result.nodes["local"]
    assert isinstance(local.error, QueryError) and local.error.sqlstate == "57014"  # SET LOCAL held
    assert isinstance(result.values["seq"], int) and result.values["locked"] == 1
    assert releases and not any(releases)  # no session reset (nor a check for one) behind the pooler


@pytest.mark.parametrize(("statement", "refused"), [
    ("SET search_path = public", "it runs SET search_path"),
    ("RESET ALL", "it runs RESET ALL"),
    ("SET ROLE postgres", "it runs SET role"),
    ("SET LOCAL statement_timeout = 10", None),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
    ("SELECT set_config('a.b', 'x', false)", "set_config"),
    ("SELECT set_config('a.b', 'x', true)", None),
    ("SELECT set_config('a.b', 'x', $1)", "set_config"),
    ("LISTEN somewhere", "LISTEN"),
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "WITH HOLD"),
    ("DECLARE c CURSOR FOR SELECT 1", None),
    ("CREATE TEMP TABLE t (a int)", "temporary table"),
    ("CREATE TEMP TABLE t (a int) ON COMMIT DROP", None),
    ("SELECT 1 AS a INTO TEMP t", "temporary table"),
    ("SELECT pg_advisory_lock(1)", "advisory lock"),
    ("SELECT pg_advisory_xact_lock(1)", None),
    ("SELECT nextval('s')", None),
    ("LOCK TABLE t", None),
    ("DO $$ BEGIN PERFORM 1; END $$", "DO block"),
    ("CALL p()", "CALL"),
    ("DISCARD ALL", "DISCARD"),
    ("SELECT setseed(0.5)", "setseed"),
])
def test_what_outlives_its_transaction(statement: str, refused: str | None) -> None:
    reason = outlives_transaction([statement])
    assert (reason is None) if refused is None else (reason is not None and refused in reason), reason


# --- validate --db -------------------------------------------------------------------------------


async def test_validate_with_a_database_through_pgbouncer_finds_what_direct_finds(
        demo_dsn: str, pgbouncer: PgBouncer, tmp_path: Path) -> None:
    (tmp_path / "v.yaml").write_text(
        "inputs: {limit: int}\n"
        "nodes:\n"
        "  inst: {sql: 'SELECT id, instance_nme FROM whatsapp_instances', fetch: one}\n"
        "  ok: {sql: 'SELECT id FROM whatsapp_instances LIMIT 1', fetch: one}\n"
        "  uses: {sql: 'SELECT $ok.webhook_url'}\n"
        "  typed: {sql: 'SELECT id FROM whatsapp_instances WHERE instance_name = $limit'}\n"
        "  two: {sql: 'SELECT 1; SELECT 2'}\n")
    paths = [tmp_path / "v.yaml", *sorted(FLOWS.glob("*.yaml"))]
    direct = await validate_paths(paths, demo_dsn)
    through = await validate_paths(paths, pgbouncer.dsn(demo_dsn))
    assert through == direct
    assert {f.node for f in through} == {"inst", "uses", "typed", "two"}


@pytest.mark.subprocess  # runs the planner command
def test_planner_validate_db_through_pgbouncer(demo_dsn: str, pgbouncer: PgBouncer) -> None:
    proc = subprocess.run([sys.executable, "-m", "planner", "validate", "--db", pgbouncer.dsn(demo_dsn)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- configuration -------------------------------------------------------------------------------


def test_the_dsn_parameter_is_read_and_removed() -> None:
    assert split_pooler("postgresql://u@h:6432/db?pgbouncer=transaction") == ("postgresql://u@h:6432/db", "transaction")
    assert split_pooler("postgresql://u@h/db?host=/tmp/s&pgbouncer=true&port=6432") == (
        "postgresql://u@h/db?host=/tmp/s&port=6432", "true")
    assert split_pooler("postgresql://u@h/db?sslmode=require") == ("postgresql://u@h/db?sslmode=require", None)
    assert split_pooler("postgresql://u@h/db") == ("postgresql://u@h/db", None)


@pytest.mark.parametrize(("value", "mode"), [("transaction", "transaction"), ("TRUE", "transaction"), ("1", "transaction"),
                                             ("session", None), ("none", None), ("false", None), ("", None), (None, None)])
def test_pooler_values(value: str | None, mode: str | None) -> None:
    assert pooler_mode(value) == mode


def test_statement_mode_and_unknown_values_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="statement-mode pooler cannot run"):
        Planner(pool_options=PoolOptions(pooler="statement"))
    with pytest.raises(ValueError, match="expected 'transaction'"):
        PoolBackend(pooler="transactoin")


def test_the_argument_beats_the_dsn_which_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNER_POOLER", "transaction")
    assert PoolBackend(default_pooler=Settings.from_env().pooler).pooler == "transaction"
    assert PoolBackend().pooler is None  # the environment is the facade's to read
    backend = PoolBackend(dsn="postgresql://u@h/db?pgbouncer=none")
    assert backend._take_pooler("postgresql://u@h/db?pgbouncer=none") == "postgresql://u@h/db"
    assert backend.pooler is None
    given = PoolBackend(pooler="session")
    given._take_pooler("postgresql://u@h/db?pgbouncer=transaction")
    assert given.pooler is None


async def test_a_statement_mode_dsn_is_a_clear_database_error(tmp_path: Path, demo_dsn: str, pgbouncer: PgBouncer) -> None:
    (tmp_path / "f.yaml").write_text("nodes: {a: {sql: 'SELECT 1', fetch: value}}\n")
    async with Planner(flows=tmp_path, dsn=pgbouncer.dsn(demo_dsn, pooler=False) + "?pgbouncer=statement") as planner:
        with pytest.raises(DatabaseUnavailable, match="statement-mode pooler"):
            await planner.run("f")


def test_an_unconfigured_pooler_error_says_what_to_set() -> None:
    exc = asyncpg.exceptions.InvalidSQLStatementNameError('prepared statement "__asyncpg_stmt_3__" does not exist')
    assert str(translate(exc)).startswith("a transaction-mode pooler (PgBouncer's pool_mode = transaction) is between "
                                          "planner and the server, and planner was not told: add ?pgbouncer=transaction")
    assert "pooler='transaction'" in str(translate(exc))
    other = asyncpg.exceptions.InvalidSQLStatementNameError('prepared statement "mine" does not exist')
    assert "pooler" not in str(translate(other))


# --- a pooler planner was not told of (issue 22) ---------------------------------------------

NOT_TOLD = """
inputs: {i: int}
nodes:
  a: {sql: "SELECT id FROM whatsapp_instances WHERE id = $i", fetch: one}
  b: {sql: "SELECT count(*) FROM whatsapp_instances WHERE id > $i", fetch: value}
"""


async def _errors_through(planner: Planner) -> list[BaseException]:
    errors: list[BaseException] = []
    for i in range(6):
        for result in await asyncio.gather(*(planner.run("f", {"i": i}) for _ in range(3))):
            errors += [node.error for node in result.nodes.values() if node.error is not None]
    return errors


async def test_a_pooler_planner_was_not_told_of_is_named_first_with_what_to_add_to_the_dsn(
        tmp_path: Path, demo_dsn: str, pgbouncer: PgBouncer, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    import planner.db.translate as translate_module

    monkeypatch.setattr(translate_module, "_pooler_told", False)
    monkeypatch.delenv("PLANNER_POOLER", raising=False)
    (tmp_path / "f.yaml").write_text(NOT_TOLD)
    with caplog.at_level(logging.ERROR, logger="planner"):
        async with Planner(flows=tmp_path, dsn=pgbouncer.dsn(demo_dsn, pooler=False), pool_options=PoolOptions(min_size=3, max_size=3)) as p:
            errors = await _errors_through(p)
    # Which statements fail before planner adopts the pooler (below) depends on the timing; those
    # that do, say so first. The log says it once whatever the number.
    for error in errors:
        assert isinstance(error, QueryError) and error.sqlstate in ("26000", "42P05")
        assert str(error).startswith("a transaction-mode pooler (PgBouncer's pool_mode = transaction) is between "
                                     "planner and the server, and planner was not told: add ?pgbouncer=transaction "
                                     "to the DSN"), str(error)
        assert "NOTE: pgbouncer" not in str(error) and "statement_cache_size" not in str(error)  # asyncpg's advice
        assert not error.is_bug  # the deployment's, not the flow's: it never fails the run as a bug
    told = [r for r in caplog.records if getattr(r, "outcome", None) == "pooler_not_told"]
    assert len(told) == 1 and "add ?pgbouncer=transaction to the DSN" in told[0].getMessage()


async def test_after_the_first_pooler_error_planner_runs_as_if_told(
        tmp_path: Path, demo_dsn: str, pgbouncer: PgBouncer, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    monkeypatch.delenv("PLANNER_POOLER", raising=False)
    (tmp_path / "f.yaml").write_text(NOT_TOLD)
    with caplog.at_level(logging.WARNING, logger="planner"):
        async with Planner(flows=tmp_path, dsn=pgbouncer.dsn(demo_dsn, pooler=False), pool_options=PoolOptions(min_size=3, max_size=3)) as p:
            first = await _errors_through(p)
            later = await _errors_through(p)
    assert len(first) < 6 * 3 * 2, first  # not every statement failed: planner adopted the pooler
    assert later == []  # the same load, once planner had seen the pooler: no error
    adopted = [r for r in caplog.records if getattr(r, "outcome", None) == "pooler_adopted"]
    assert len(adopted) == 1 and "say so in the DSN (?pgbouncer=transaction)" in adopted[0].getMessage()


async def test_the_dsn_the_hint_asks_for_runs_the_same_flow_cleanly(tmp_path: Path, demo_dsn: str,
                                                                    pgbouncer: PgBouncer) -> None:
    (tmp_path / "f.yaml").write_text(NOT_TOLD)
    async with Planner(flows=tmp_path,
                       dsn=pgbouncer.dsn(demo_dsn, pooler=False) + "?pgbouncer=transaction",
                       pool_options=PoolOptions(min_size=3, max_size=3)) as p:
        assert await _errors_through(p) == []
