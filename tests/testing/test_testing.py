"""Testing flows, for their authors: `planner_flow_db` (a Planner on a fresh database with the
author's schema) and record/replay (`planner.testing`, the `planner_replay` fixture)."""

from __future__ import annotations

import datetime as dt
import decimal
import ipaddress
import json
import math
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from planner import Planner
from planner.db.admin import with_database
from planner.errors import DatabaseUnavailable
from planner.testing import Cassette, CassetteError, CassetteMismatch, decode, encode, offline_planner, statement_hash
from planner.testing.pytest_plugin import FlowReplay, _Templates, apply_schema, schema_database, schema_texts
from tests.support.pgbouncer import PgBouncer

ROOT = Path(__file__).resolve().parents[2]
SEED_FLOWS = ROOT / "flows"

SCHEMA = """
CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL UNIQUE, joined date NOT NULL DEFAULT '2024-01-02');
INSERT INTO users (name) VALUES ('ada'), ('grace');
"""
GREET = """
inputs: {name: str}
nodes:
  user:
    sql: SELECT id, name, joined FROM users WHERE name = $name
    fetch: one
  visits:
    sql: UPDATE users SET name = name WHERE id = $user.id
    fetch: none
    default: none
  greeting:
    call: helpers:hello
    with: {value: $user.name}
output: {greeting: $greeting, joined: $user.joined}
"""
HELPERS = "def hello(value):\n    return f'hello {value}'\n"


# --- planner_flow_db: the author's schema, a fresh database per test --------------------------


@pytest.fixture
def planner_schema() -> str:
    return SCHEMA


@pytest.fixture
def planner_flows_dir(tmp_path: Path) -> Path:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "greet.yaml").write_text(GREET)
    (flows / "helpers.py").write_text(HELPERS)  # a module of the flows folder: allowed by default
    return flows


@pytest.mark.parametrize("round_", [1, 2])
async def test_planner_flow_db_runs_flows_on_a_fresh_database_with_the_schema(planner_flow_db: Planner,
                                                                              planner_flow_dsn: str, round_: int) -> None:
    result = await planner_flow_db.run("greet", {"name": "ada"})
    assert result.output == {"greeting": "hello ada", "joined": dt.date(2024, 1, 2)}
    con = await asyncpg.connect(planner_flow_dsn)
    try:  # each round starts from the schema alone: the other round's row is not there
        assert await con.fetchval("SELECT count(*) FROM users") == 2
        await con.execute("INSERT INTO users (name) VALUES ('round')")
    finally:
        await con.close()


def test_schema_texts_reads_text_files_and_folders(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "002_b.sql").write_text("SELECT 2;")
    (folder / "001_a.sql").write_text("SELECT 1;")
    (folder / "notes.txt").write_text("not sql")
    single = tmp_path / "extra.sql"
    single.write_text("SELECT 3;")
    texts = schema_texts(["SELECT 0;", folder, single])
    assert [sql for _, sql in texts] == ["SELECT 0;", "SELECT 1;", "SELECT 2;", "SELECT 3;"]
    assert texts[1][0].endswith("001_a.sql")
    assert schema_texts(None) == [] and schema_texts(single) == [(str(single), "SELECT 3;")]


async def test_a_broken_schema_names_its_file(planner_database: str, tmp_path: Path) -> None:
    bad = tmp_path / "schema.sql"
    bad.write_text("CREATE TABLE ok (id int);\nCREATE TABLE broken (id nosuchtype);\n")
    with pytest.raises(RuntimeError, match=r"schema\.sql: UndefinedObjectError: type \"nosuchtype\" does not exist"):
        await apply_schema(planner_database, schema_texts(bad))


async def test_one_template_per_schema(planner_pg: str) -> None:
    templates = _Templates()
    try:
        a = await templates.get(planner_pg, [("a", "CREATE TABLE a (id int);")])
        again = await templates.get(planner_pg, [("elsewhere", "CREATE TABLE a (id int);")])
        b = await templates.get(planner_pg, [("b", "CREATE TABLE b (id int);")])
        assert a == again and a != b and await templates.get(planner_pg, []) is None
        async with schema_database(planner_pg, [("b", "CREATE TABLE b (id int);")], templates) as dsn:
            con = await asyncpg.connect(dsn)
            try:
                assert await con.fetchval("SELECT to_regclass('b') IS NOT NULL")
            finally:
                await con.close()
    finally:
        templates.drop_all()
    admin = await asyncpg.connect(planner_pg)
    try:
        assert not await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = ANY($1)", [a, b])
    finally:
        await admin.close()


async def _has_table(dsn: str, table: str) -> bool:
    con = await asyncpg.connect(dsn)
    try:
        return bool(await con.fetchval("SELECT to_regclass($1) IS NOT NULL", table))
    finally:
        await con.close()


# A DSN with planner's `?pgbouncer=transaction` reaches asyncpg through `planner.db.pooler.connect`
# only: PgBouncer refuses a startup parameter it does not know, and so would the server.


async def test_apply_schema_through_pgbouncer_honours_the_dsn_parameter(planner_database: str, pgbouncer: PgBouncer) -> None:
    await apply_schema(pgbouncer.dsn(planner_database), [("schema", "CREATE TABLE through_bouncer (id int);")])
    assert await _has_table(planner_database, "through_bouncer")


async def test_a_schema_database_on_a_server_behind_pgbouncer_has_the_schema(planner_pg: str, pgbouncer: PgBouncer) -> None:
    templates = _Templates()
    try:
        async with schema_database(pgbouncer.dsn(planner_pg), [("s", "CREATE TABLE behind (id int);")], templates) as dsn:
            assert dsn.endswith("?pgbouncer=transaction")  # the test's Planner is given it: it must know too
            assert await _has_table(with_database(planner_pg, urlsplit(dsn).path.lstrip("/")), "behind")
    finally:
        templates.drop_all()


async def test_flow_replay_execute_through_pgbouncer_honours_the_dsn_parameter(planner_database: str,
                                                                              pgbouncer: PgBouncer) -> None:
    replay = FlowReplay(Cassette(Path("unused.json")), None, pgbouncer.dsn(planner_database))
    assert await replay.execute("CREATE TABLE recorded (id int)") == "CREATE TABLE"
    assert await _has_table(planner_database, "recorded")


# --- record and replay ----------------------------------------------------------------------


MESSAGE = {"instance_name": "acme", "user_phone": "+15550000001", "message": "where is my parcel?"}


async def test_a_seed_flow_replays_without_a_database(demo_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "pb.json"
    async with Planner(flows=SEED_FLOWS, dsn=demo_dsn) as planner:
        cassette = Cassette(path)
        recorded = [await cassette.record(planner, "process_buffered", MESSAGE),
                    await cassette.record(planner, "process_buffered", MESSAGE),  # the same again: a duplicate
                    await cassette.record(planner, "escalation", {"instance_id": 2, "user_phone": "+1", "message": "hi"})]
        cassette.save()

    async with offline_planner(SEED_FLOWS) as offline:
        replay = Cassette.load(path)
        replayed = [await replay.replay(offline, "process_buffered", MESSAGE),
                    await replay.replay(offline, "process_buffered", MESSAGE),
                    await replay.replay(offline, "escalation", {"instance_id": 2, "user_phone": "+1", "message": "hi"})]
        assert replay.unplayed == 0

    for before, after in zip(recorded, replayed, strict=True):
        assert after.output == before.output  # datetimes stay datetimes: history rows compare equal
        assert after.states() == before.states()  # skipped and defaulted nodes keep their state
        assert after.values == before.values
    assert replayed[1].output["duplicate"] is True and replayed[1].nodes["store_message"].state == "skipped"
    history = replayed[0].output["history"]
    assert history and isinstance(history[0]["created_at"], dt.datetime)
    assert replayed[0].nodes["instance"].attempts == 0  # settled from the recording


async def test_replay_needs_no_database_at_all(planner_flows_dir: Path, planner_flow_dsn: str, tmp_path: Path) -> None:
    cassette = Cassette(tmp_path / "c.json")
    async with Planner(flows=planner_flows_dir, dsn=planner_flow_dsn) as planner:
        recorded = await cassette.record(planner, "greet", {"name": "grace"})
    cassette.save()
    async with Planner(flows=planner_flows_dir, dsn="postgresql://nobody@127.0.0.1:1/nowhere") as unreachable:
        with pytest.raises(DatabaseUnavailable):  # this planner cannot reach a database...
            await unreachable.run("greet", {"name": "grace"})
        replayed = await Cassette.load(cassette.path).replay(unreachable, "greet", {"name": "grace"})  # ...nor needs one
    assert replayed.output == recorded.output == {"greeting": "hello grace", "joined": dt.date(2024, 1, 2)}
    assert replayed.nodes["greeting"].attempts == 1  # Python nodes run for real
    assert replayed.nodes["user"].attempts == 0


async def _recorded(flows: Path, dsn: str, path: Path, inputs: dict[str, Any] | None = None) -> Cassette:
    cassette = Cassette(path)
    async with Planner(flows=flows, dsn=dsn) as planner:
        await cassette.record(planner, "greet", inputs or {"name": "ada"})
    cassette.save()
    return Cassette.load(path)


@pytest.mark.parametrize(("old", "new", "message"), [
    pytest.param("WHERE name = $name", "WHERE lower(name) = lower($name)",
                 r"node 'user' changed its statements since the recording \(recorded \w+, now \w+\)", id="sql"),
    pytest.param("fetch: none", "fetch: value", r"node 'visits' changed its statements", id="fetch"),
    pytest.param("  greeting:", "  audit: {sql: SELECT 1, fetch: value}\n  greeting:", r"node 'audit' is new", id="added"),
    pytest.param("  visits:\n    sql: UPDATE users SET name = name WHERE id = $user.id\n    fetch: none\n    default: none\n",
                 "", r"node 'visits' was recorded but is no longer in the flow", id="removed"),
])
async def test_a_changed_statement_fails_the_replay_loudly_naming_the_node(
        planner_flows_dir: Path, planner_flow_dsn: str, tmp_path: Path, old: str, new: str, message: str) -> None:
    cassette = await _recorded(planner_flows_dir, planner_flow_dsn, tmp_path / "c.json")
    flow = planner_flows_dir / "greet.yaml"
    assert old in flow.read_text()
    flow.write_text(flow.read_text().replace(old, new))
    async with offline_planner(planner_flows_dir) as offline:
        with pytest.raises(CassetteMismatch, match=message) as caught:
            await cassette.replay(offline, "greet", {"name": "ada"})
    assert "c.json: run 1 (flow 'greet')" in str(caught.value) and "--planner-record=all" in str(caught.value)


async def test_what_the_database_never_sees_may_change(planner_flows_dir: Path, planner_flow_dsn: str, tmp_path: Path) -> None:
    cassette = await _recorded(planner_flows_dir, planner_flow_dsn, tmp_path / "c.json")
    flow = planner_flows_dir / "greet.yaml"
    flow.write_text(flow.read_text().replace("default: none", "default: nothing\n    timeout: 1s")
                    .replace("output: {greeting: $greeting, joined: $user.joined}", "output: {g: $greeting}"))
    async with offline_planner(planner_flows_dir) as offline:
        result = await cassette.replay(offline, "greet", {"name": "ada"})
    assert result.output == {"g": "hello ada"}


async def test_other_runs_than_recorded_fail_loudly(planner_flows_dir: Path, planner_flow_dsn: str, tmp_path: Path) -> None:
    cassette = await _recorded(planner_flows_dir, planner_flow_dsn, tmp_path / "c.json")
    async with offline_planner(planner_flows_dir) as offline:
        with pytest.raises(CassetteMismatch, match=r"run 1 \(flow 'greet'\) was recorded with other inputs: 'name' differ"):
            await cassette.replay(offline, "greet", {"name": "grace"})
        with pytest.raises(CassetteMismatch, match=r"recorded overriding nothing, replayed overriding \['user'\]"):
            await cassette.replay(offline, "greet", {"name": "ada"}, overrides={"user": None})
        await cassette.replay(offline, "greet", {"name": "ada"})
        with pytest.raises(CassetteMismatch, match=r"run 2 \(flow 'greet'\) was not recorded: the cassette holds 1 run"):
            await cassette.replay(offline, "greet", {"name": "ada"})


async def test_overrides_and_pruned_nodes_replay(planner_flows_dir: Path, planner_flow_dsn: str, tmp_path: Path) -> None:
    # Overriding `plus`, the one reader of `base`, prunes `base`: it is recorded as pruned, and
    # settled (then dropped from the result) when replayed, so the replay needs no database.
    (planner_flows_dir / "two.yaml").write_text(textwrap.dedent("""
        nodes:
          base: {sql: SELECT 41 AS n, fetch: one}
          plus: {sql: SELECT $base.n + 1, fetch: value}
        output: {answer: $plus}
    """))
    cassette = Cassette(tmp_path / "c.json")
    async with Planner(flows=planner_flows_dir, dsn=planner_flow_dsn) as planner:
        recorded = await cassette.record(planner, "two", overrides={"plus": 7})
    assert "base" not in recorded.nodes
    assert cassette.runs[0]["nodes"] == {"base": {"hash": statement_hash(planner.load("two"), "base"), "state": "pruned"},
                                         "plus": {"hash": statement_hash(planner.load("two"), "plus"), "state": "overridden"}}
    async with offline_planner(planner_flows_dir) as offline:
        replayed = await cassette.replay(offline, "two", overrides={"plus": 7})
    assert replayed.output == {"answer": 7} and replayed.states() == recorded.states() == {"plus": "ok"}


@pytest.mark.parametrize("value", [
    None, True, 0, -3, 1.5, "text", "$datetime", [1, [2, "x"]], {"a": {"b": [None]}},
    dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))), dt.datetime(2024, 5, 6),
    dt.date(2024, 5, 6), dt.time(7, 8, 9), dt.timedelta(days=1, microseconds=5), decimal.Decimal("12.3400"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"), b"\x00\xffbytes", (1, "two"), {1, 2}, {1: "int key"},
    {"$datetime": "a dict that looks tagged"}, float("inf"), float("-inf"),
    ipaddress.ip_address("10.0.0.1"), ipaddress.ip_interface("10.0.0.1/24"), ipaddress.ip_network("2001:db8::/32"),
])
def test_values_keep_their_types(value: Any) -> None:
    back = decode(json.loads(json.dumps(encode(value))))
    assert back == value and type(back) is type(value)
    if isinstance(value, dict):
        assert [type(k) for k in back] == [type(k) for k in value]


def test_nan_and_unsupported_values() -> None:
    assert math.isnan(decode(json.loads(json.dumps(encode(float("nan"))))))
    with pytest.raises(CassetteError, match=r"node 'x': a value of type builtins.object cannot be recorded"):
        encode([object()], "node 'x'")


async def test_values_from_the_database_keep_their_types(planner_flows_dir: Path, planner_flow_dsn: str, tmp_path: Path) -> None:
    (planner_flows_dir / "types.yaml").write_text(textwrap.dedent("""
        nodes:
          row:
            sql: |
              SELECT now() AS ts, 1.50::numeric AS amount, gen_random_uuid() AS id, '\\x00ff'::bytea AS raw,
                     interval '90 minutes' AS span, ARRAY[1, 2] AS ids, '192.168.0.1/24'::inet AS ip,
                     '{"k": [1, "v"]}'::jsonb AS doc, current_date AS day, 'nan'::float8 AS nothing
            fetch: one
    """))
    cassette = Cassette(tmp_path / "c.json")
    async with Planner(flows=planner_flows_dir, dsn=planner_flow_dsn) as planner:
        recorded = await cassette.record(planner, "types")
    cassette.save()
    async with offline_planner(planner_flows_dir) as offline:
        replayed = await Cassette.load(cassette.path).replay(offline, "types")
    before, after = recorded.values["row"], replayed.values["row"]
    assert math.isnan(before.pop("nothing")) and math.isnan(after.pop("nothing"))
    assert after == before
    for key, value in before.items():  # asyncpg's UUID is a uuid.UUID: a replay gives the base class
        assert isinstance(after[key], uuid.UUID if isinstance(value, uuid.UUID) else type(value)), key


def test_a_broken_cassette_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"runs": []}')
    with pytest.raises(CassetteError, match="cannot read the cassette"):
        Cassette.load(tmp_path / "bad.json")
    with pytest.raises(CassetteError, match="not a planner cassette"):
        Cassette.load(tmp_path / "other.json")


# --- the planner_replay fixture, in a project of its own --------------------------------------

PROJECT_TEST = '''
async def test_greet(planner_replay):
    await planner_replay.execute("INSERT INTO users (name) VALUES ('linus')")
    result = await planner_replay.run("greet", {"name": "linus"})
    assert result.output == {"greeting": "hello linus", "joined": __import__("datetime").date(2024, 1, 2)}
    assert result.nodes["visits"].state == "ok"
    print("RECORDING" if planner_replay.recording else "REPLAYING")
'''


def _pytest(project: Path, *args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PLANNER_ALLOWED_MODULES")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", "--planner-dsn", dsn,
                           "--basetemp", str(project / ".tmp"), *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.subprocess
def test_the_planner_replay_fixture_records_once_then_replays_without_a_database(tmp_path: Path, planner_pg: str) -> None:
    project = tmp_path / "project"
    (project / "flows").mkdir(parents=True)
    (project / "db").mkdir()
    (project / "tests").mkdir()
    (project / "pytest.ini").write_text(textwrap.dedent("""
        [pytest]
        asyncio_mode = auto
        planner_schema = db/schema.sql
        planner_flows = flows
    """))
    (project / "db" / "schema.sql").write_text(SCHEMA)
    (project / "flows" / "greet.yaml").write_text(GREET)
    (project / "flows" / "helpers.py").write_text(HELPERS)
    (project / "tests" / "test_greet.py").write_text(PROJECT_TEST)
    cassette = project / "tests" / "cassettes" / "test_greet" / "test_greet.json"

    # Replay only, and nothing recorded yet: the test fails and says how to record.
    missing = _pytest(project, "--planner-record=none", dsn="postgresql://nobody@127.0.0.1:1/nowhere")
    assert missing.returncode == 1 and "no cassette at" in missing.stdout, missing.stdout + missing.stderr

    recorded = _pytest(project, dsn=planner_pg)  # once: no cassette yet, so it records (a database is needed)
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    assert "RECORDING" in recorded.stdout and cassette.exists()
    assert json.loads(cassette.read_text())["runs"][0]["nodes"]["user"]["value"]["name"] == "linus"

    # Replayed with no database at all: the server named is unreachable, and never asked.
    replayed = _pytest(project, "--planner-record=none", dsn="postgresql://nobody@127.0.0.1:1/nowhere")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "REPLAYING" in replayed.stdout

    flow = project / "flows" / "greet.yaml"
    flow.write_text(flow.read_text().replace("WHERE name = $name", "WHERE name = $name AND id > 0"))
    stale = _pytest(project, dsn="postgresql://nobody@127.0.0.1:1/nowhere")
    assert stale.returncode == 1
    assert "CassetteMismatch" in stale.stdout and "node 'user' changed its statements" in stale.stdout

    # A test that fails while recording writes nothing; one that passes writes the new recording.
    def user_hash() -> str:
        return str(json.loads(cassette.read_text())["runs"][0]["nodes"]["user"]["hash"])

    old = user_hash()
    test = project / "tests" / "test_greet.py"
    test.write_text(PROJECT_TEST.replace('"hello linus"', '"bye linus"'))
    failed = _pytest(project, "--planner-record=all", dsn=planner_pg)
    assert failed.returncode == 1 and "RECORDING" not in failed.stdout
    assert user_hash() == old
    test.write_text(PROJECT_TEST)
    again = _pytest(project, "--planner-record=all", dsn=planner_pg)
    assert again.returncode == 0, again.stdout + again.stderr
    assert user_hash() != old
    assert _pytest(project, "--planner-record=none", dsn="postgresql://nobody@127.0.0.1:1/nowhere").returncode == 0

    # A test that replays fewer runs than were recorded fails at teardown.
    test.write_text(PROJECT_TEST.replace("    result = await planner_replay.run", "    return\n    result = await planner_replay.run"))
    fewer = _pytest(project, "--planner-record=none", dsn="postgresql://nobody@127.0.0.1:1/nowhere")
    assert fewer.returncode == 1 and "the test replayed 0 run(s) of the 1 recorded" in fewer.stdout


def test_the_hash_covers_what_the_nodes_kind_says_identifies_its_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from planner.api import load_flow
    from planner.kinds import KINDS

    flow = load_flow(SEED_FLOWS / "escalation.yaml")
    before = statement_hash(flow, "settings"), statement_hash(flow, "decide")
    monkeypatch.setattr(type(KINDS["sql"]), "identity", lambda self, node: {"sql": ["SELECT 2"], "fetch": "one"})
    assert statement_hash(flow, "settings") != before[0]
    assert statement_hash(flow, "decide") == before[1]


@pytest.mark.parametrize(("node", "edit"), [("settings", ("fetch: one", "fetch: all")),
                                            ("settings", ("WHERE id = $instance_id", "WHERE id = $instance_id + 0")),
                                            ("decide", ("message: $message}", "message: $user_phone}")),
                                            ("decide", ("escalation:needs_escalation", "escalation:other"))])
def test_an_edit_to_a_nodes_work_changes_its_hash(node: str, edit: tuple[str, str]) -> None:
    from planner.api import load_flow

    text = (SEED_FLOWS / "escalation.yaml").read_text()
    assert edit[0] in text
    old, new = load_flow(text=text, name="escalation"), load_flow(text=text.replace(*edit), name="escalation")
    assert statement_hash(old, node) != statement_hash(new, node)
