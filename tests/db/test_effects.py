"""One effects model (`planner.lang.effects`, `planner.db.judge`): what a statement does comes from the
server's catalog, and every sharing mechanism (single-flight, coalescing, fusion, the cache,
replica routing, read-your-writes) takes its decision from that one verdict.

The table below is the specification: statement -> share? coalesce? fuse? cache? replica?
write (for read-your-writes)? Then the behaviours the table stands for, on a real server:
job claims and orders are never merged, a cached statement with effects is refused, a
verdict is asked again when it ages or the schema changes, and the read after an order sees it
with a replica (tests/db/test_replica.py's pair, started here for this module).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from planner import FlowFileError, Planner, PoolOptions, ReplicaOptions, load_flow
from planner.db.catalog import Catalog
from planner.db.judge import BUILTIN_EFFECTS as BUILTIN_QUERY
from planner.db.judge import builtin_effects_source, resolve
from planner.lang import builtin_effects as builtin_effects_module
from planner.lang.builtin_effects import BUILTIN_EFFECTS
from planner.lang.effects import UNRESOLVED, Decisions, Effects, as_allowed, decide, of_syntax
from planner.lang.probe import body_probe_texts, probe_text
from planner.testing.pytest_plugin import server_folder
from planner.views.validate import validate_paths

SCHEMA = """
CREATE TABLE jobs (id serial PRIMARY KEY, name text NOT NULL, claimed boolean NOT NULL DEFAULT false);
INSERT INTO jobs (name) SELECT 'job-' || i FROM generate_series(1, 20) i;
CREATE TABLE orders (id serial PRIMARY KEY, user_id int NOT NULL);
CREATE SEQUENCE tickets;
CREATE FUNCTION claim_job() RETURNS text LANGUAGE sql AS $$
  UPDATE jobs SET claimed = true
   WHERE id = (SELECT id FROM jobs WHERE NOT claimed ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
  RETURNING name $$;
CREATE FUNCTION claim_job_id() RETURNS int LANGUAGE sql AS $$
  UPDATE jobs SET claimed = true
   WHERE id = (SELECT id FROM jobs WHERE NOT claimed ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
  RETURNING id $$;
CREATE FUNCTION place_order(u int) RETURNS int LANGUAGE sql AS $$
  INSERT INTO orders (user_id) VALUES (u) RETURNING id $$;
CREATE SCHEMA shop;
CREATE FUNCTION shop."Place Order"(u int) RETURNS int LANGUAGE sql AS $$
  INSERT INTO orders (user_id) VALUES (u) RETURNING id $$;
CREATE FUNCTION job_name(i int) RETURNS text STABLE LANGUAGE sql AS $$ SELECT name FROM jobs WHERE id = i $$;
CREATE FUNCTION pick(i int) RETURNS int IMMUTABLE LANGUAGE sql AS $$ SELECT i $$;
CREATE FUNCTION pick(t text) RETURNS int VOLATILE LANGUAGE sql AS $$ SELECT nextval('tickets')::int $$;
CREATE VIEW claimed_now AS SELECT claim_job() AS job;
CREATE VIEW claimed_later AS SELECT job FROM claimed_now;
CREATE VIEW pending AS SELECT id, name FROM jobs WHERE NOT claimed;
CREATE FUNCTION takes(a int, b int) RETURNS boolean VOLATILE LANGUAGE sql AS $$ SELECT a = nextval('tickets') $$;
CREATE OPERATOR ==> (LEFTARG = int, RIGHTARG = int, FUNCTION = takes);
CREATE TYPE ticket AS (n bigint);
CREATE FUNCTION issue(i int) RETURNS ticket VOLATILE LANGUAGE sql AS $$ SELECT ROW(nextval('tickets'))::ticket $$;
CREATE CAST (int AS ticket) WITH FUNCTION issue(int);
CREATE TABLE shop.stock (id int);
CREATE FUNCTION shop.open_jobs() RETURNS bigint STABLE SECURITY DEFINER SET search_path = shop, pg_temp
  LANGUAGE sql AS $$ SELECT count(*) FROM stock $$;
CREATE FUNCTION public.ticket_of() RETURNS bigint STABLE LANGUAGE sql AS $$ SELECT 0::bigint $$;
CREATE FUNCTION shop.ticket_of() RETURNS bigint VOLATILE LANGUAGE sql AS $$ SELECT nextval('public.tickets') $$;
CREATE FUNCTION shop.claims_in_shop() RETURNS bigint STABLE SET search_path = shop, public
  LANGUAGE sql AS $$ SELECT ticket_of() $$;
"""

PURE = Decisions(share=True, coalesce=True, fuse=True, cache=True, replica=True, write=False)
WRITE = Decisions(share=False, coalesce=False, fuse=False, cache=False, replica=False, write=True)

# statement -> decisions, for a node with `fetch: one` and every sharing left on.
TABLE: list[tuple[str, Decisions]] = [
    ("SELECT id, name FROM jobs WHERE id = $i", PURE),
    ("SELECT count(*) AS n FROM jobs WHERE id = ANY($i::int[])", PURE),  # an array parameter
    ("SELECT job_name($i) AS name, now() AS at", PURE),  # STABLE functions: pure
    ("SELECT pick($i::int) AS n", PURE),  # the IMMUTABLE overload (an untyped $i would be text)
    ("SELECT * FROM pending WHERE id = $i", PURE),  # a view over a table
    ("SELECT claim_job() AS job", WRITE),
    ("SELECT * FROM claim_job() AS job", WRITE),  # in FROM
    ("SELECT name FROM jobs WHERE id = claim_job_id()", WRITE),  # in WHERE
    ("WITH c AS (SELECT claim_job() AS job) SELECT job FROM c", WRITE),  # in a CTE
    ("SELECT place_order($i) AS id", WRITE),
    ("SELECT public.place_order($i) AS id", WRITE),  # schema-qualified
    ('SELECT "place_order"($i) AS id', WRITE),  # quoted
    ('SELECT shop."Place Order"($i) AS id', WRITE),  # another schema, a quoted name with a space
    ("SELECT pick($t) AS n", WRITE),  # the VOLATILE overload (a text argument)
    ("SELECT job FROM claimed_now", WRITE),  # a view over a volatile function
    ("SELECT job FROM claimed_later", WRITE),  # a view over that view
    ("SELECT $i ==> 1 AS taken", WRITE),  # an operator backed by a volatile function
    ("SELECT ($i::int)::ticket AS t", WRITE),  # a cast through a volatile function
    ("SELECT count(*) AS n FROM jobs TABLESAMPLE BERNOULLI (50)", WRITE),  # a random sample
    ("SELECT id FROM jobs WHERE id = $i FOR UPDATE", WRITE),  # locks rows (syntax)
    ("SELECT nextval('tickets') AS n", WRITE),  # built-ins: the catalog's rule, offline its list
    ("SELECT random() AS r", WRITE),
    ("SELECT txid_current() AS x", WRITE),  # STABLE, but assigns a transaction id: parallel unsafe
    ("SELECT job_name($i) AS name FROM pick(1) AS p", PURE),  # SQL functions whose string bodies only read
    ("SELECT shop.open_jobs() AS n", PURE),  # a body read under its function's own search_path
    ("SELECT shop.claims_in_shop() AS n", WRITE),  # ... which decides which function a name means
]


@pytest.fixture
def planner_schema() -> str:
    """SCHEMA, applied once to a template database that each test's `db` copies."""
    return SCHEMA


@pytest.fixture
async def db(planner_flow_dsn: str) -> str:
    """A database of the test's own with SCHEMA (the plugin's `planner_flow_dsn`)."""
    return planner_flow_dsn


def _node(text: str, *, cache: bool = True) -> Any:
    spec = f"inputs: {{i: int, t: str}}\nnodes:\n  n: {{sql: {text!r}, fetch: one{', cache: 10s' if cache else ''}}}\n"
    try:
        return load_flow(text=spec, name="t").nodes["n"]
    except FlowFileError:  # `cache:` on a write by its syntax is refused at compile time
        return load_flow(text=spec.replace(", cache: 10s", ""), name="t").nodes["n"]


async def _verdict(con: asyncpg.Connection, node: Any) -> Effects:
    return await resolve(con, node.sql.statements[0].text) if node.sql.read_only else of_syntax(node)


async def test_every_sharing_decision_comes_from_the_one_verdict(db: str) -> None:
    con = await asyncpg.connect(db)
    try:
        got = {}
        for text, _ in TABLE:
            node = _node(text)
            decided = decide(node, await _verdict(con, node))
            # A write by its syntax has no `cache:` to keep (refused at compile time).
            got[text] = decided if node.sql.cache_ttl is not None or decided.write else None
    finally:
        await con.close()
    assert got == dict(TABLE)


async def test_the_verdict_names_the_function_schema_and_overload(db: str) -> None:
    con = await asyncpg.connect(db)
    try:
        order = await resolve(con, "SELECT shop.\"Place Order\"($1) AS id")
        overload = await resolve(con, "SELECT pick($1::text)")
        view = await resolve(con, "SELECT job FROM claimed_later")
    finally:
        await con.close()
    assert order.functions == ('shop."Place Order"(u integer)',) and "volatile" in order.why()
    assert overload.functions == ("public.pick(t text)",)
    assert view.functions == ("public.claim_job()",)


@pytest.mark.parametrize(("setup", "statement"), [
    pytest.param("CREATE FUNCTION add_noisy(s int, v int) RETURNS int VOLATILE LANGUAGE sql AS $$ SELECT s + v $$;"
                 "CREATE AGGREGATE noisy_sum(int) (SFUNC = add_noisy, STYPE = int, INITCOND = '0')",
                 "SELECT noisy_sum(id) AS n FROM jobs", id="an-aggregate-whose-step-is-volatile"),
    pytest.param("CREATE FUNCTION seen(i int) RETURNS boolean VOLATILE LANGUAGE sql AS $$ SELECT true $$;"
                 "ALTER TABLE jobs ENABLE ROW LEVEL SECURITY; ALTER TABLE jobs FORCE ROW LEVEL SECURITY;"
                 "CREATE POLICY watched ON jobs USING (seen(id))",
                 "SELECT id FROM jobs", id="a-row-level-security-policy-calling-a-volatile-function"),
    pytest.param("CREATE FUNCTION checked(i int) RETURNS boolean VOLATILE LANGUAGE sql AS $$ SELECT i > 0 $$;"
                 "CREATE DOMAIN positive AS int CHECK (checked(VALUE))",
                 "SELECT $1::int::positive AS p", id="a-cast-to-a-domain-whose-check-is-volatile"),
    pytest.param("", "SELECT count(*) OVER (ORDER BY random()) AS n FROM jobs", id="a-window-ordered-by-random"),
    pytest.param("", "SELECT id FROM jobs WHERE id IN (SELECT claim_job_id())", id="a-subquery-in-where"),
    pytest.param("", "SELECT (SELECT job FROM claimed_now) AS j", id="a-scalar-subquery-over-a-view"),
    # What a call runs beyond the function's own declared volatility, kept in the catalog as trees:
    pytest.param("CREATE FUNCTION stamped(t bigint DEFAULT nextval('tickets')) RETURNS bigint STABLE LANGUAGE sql "
                 "AS $$ SELECT t $$", "SELECT stamped() AS t", id="a-default-argument-calling-a-volatile-function"),
    pytest.param("CREATE FUNCTION named_default(k int, t bigint DEFAULT nextval('tickets')) RETURNS bigint "
                 "IMMUTABLE LANGUAGE sql AS $$ SELECT t + k $$",
                 "SELECT named_default(k => $1::int) AS t", id="a-named-call-filling-in-a-volatile-default"),
    pytest.param("CREATE FUNCTION next_ticket() RETURNS bigint STABLE LANGUAGE sql BEGIN ATOMIC "
                 "SELECT nextval('tickets'); END", "SELECT next_ticket() AS t",
                 id="a-sql-standard-body-calling-a-volatile-function"),
    pytest.param("CREATE FUNCTION inner_next() RETURNS bigint STABLE LANGUAGE sql BEGIN ATOMIC "
                 "SELECT nextval('tickets'); END;"
                 "CREATE FUNCTION outer_next() RETURNS bigint STABLE LANGUAGE sql RETURN inner_next() + 0;"
                 "CREATE VIEW tickets_now AS SELECT outer_next() AS t",
                 "SELECT t FROM tickets_now", id="a-body-calling-a-body-behind-a-view"),
    pytest.param("CREATE FUNCTION str_ticket() RETURNS bigint STABLE LANGUAGE sql AS $$ SELECT nextval('tickets') $$",
                 "SELECT str_ticket() AS t", id="a-sql-function-body-in-a-string-calling-a-volatile-function"),
    pytest.param("CREATE FUNCTION str_claim(k int) RETURNS SETOF text STABLE LANGUAGE sql AS "
                 "$$ SELECT job FROM claimed_now WHERE k > 0 $$",
                 "SELECT * FROM str_claim($1::int) AS c", id="a-sql-function-in-from-whose-body-reads-a-volatile-view"),
    pytest.param("CREATE FUNCTION str_pick(k int, t text) RETURNS int IMMUTABLE LANGUAGE sql AS "
                 "$$ SELECT CASE WHEN k > 0 THEN pick(t) ELSE $1 END $$",
                 "SELECT str_pick($1::int, 'a') AS p", id="a-sql-function-body-naming-its-arguments"),
])
async def test_effects_hidden_behind_other_objects_are_found(db: str, setup: str, statement: str) -> None:
    con = await asyncpg.connect(db)
    try:
        if setup:
            await con.execute(setup)
        verdict = await resolve(con, statement)
    finally:
        await con.close()
    assert not verdict.pure and verdict.functions, verdict


@pytest.mark.parametrize("statement", [
    "SELECT id FROM jobs FOR UPDATE", "SELECT id FROM jobs FOR NO KEY UPDATE", "SELECT id FROM jobs FOR SHARE",
    "SELECT id FROM jobs FOR KEY SHARE", "SELECT * FROM (SELECT id FROM jobs LIMIT 1 FOR UPDATE SKIP LOCKED) s",
    "WITH x AS (SELECT id FROM jobs FOR SHARE) SELECT * FROM x",
    "SELECT 1 AS one WHERE EXISTS (SELECT 1 FROM jobs FOR NO KEY UPDATE NOWAIT)",
])
async def test_the_catalog_counts_row_locks_anywhere_in_the_statement_as_a_write(db: str, statement: str) -> None:
    # The syntax already says so at compile time; the catalog's verdict must agree (one model),
    # for whoever asks it alone (`Catalog.effects`, `planner validate --db`).
    assert not _node(statement, cache=False).sql.read_only
    con = await asyncpg.connect(db)
    try:
        verdict = await resolve(con, statement)
    finally:
        await con.close()
    assert not verdict.pure and "locks rows" in verdict.why(), verdict


@pytest.mark.parametrize("call", [
    "random()", "nextval('tickets')", "clock_timestamp()", "gen_random_uuid()", "pg_advisory_xact_lock(1)",
    "pg_advisory_lock(1)", "pg_notify('c', 'x')", "txid_current()", "pg_current_xact_id()",
    "pg_logical_emit_message(false, 'p', 'm')", "setseed(0.5)", "set_config('a.b', 'c', true)",
])
async def test_built_in_functions_with_effects_fall_out_of_the_catalog_rule(db: str, call: str) -> None:
    con = await asyncpg.connect(db)
    try:
        verdict = await resolve(con, f"SELECT {call}")
    finally:
        await con.close()
    assert not verdict.pure and verdict.resolved and verdict.functions


async def test_the_offline_list_is_the_catalogs_own(db: str) -> None:
    """`planner/builtin_effects.py` is generated by `python -m planner.db.judge DSN`: regenerate it
    when this fails after a PostgreSQL upgrade."""
    con = await asyncpg.connect(db)
    try:
        names = {row[0] for row in await con.fetch(BUILTIN_QUERY)}
    finally:
        await con.close()
    assert names == BUILTIN_EFFECTS


async def test_the_offline_list_is_what_the_judges_generator_writes(db: str) -> None:
    """`python -m planner.db.judge DSN` writes the file as it is (its server's version aside):
    its docstring names the module that generates it."""
    source, count = await builtin_effects_source(db)
    shipped = inspect.getsource(builtin_effects_module)
    version = re.compile(r"from PostgreSQL [^ ]+'s catalog")
    assert version.sub("", source) == version.sub("", shipped)
    assert count == len(BUILTIN_EFFECTS)


def test_offline_a_built_in_with_effects_is_a_write_and_anything_else_unresolved() -> None:
    assert not _node("SELECT random() AS r").sql.read_only
    assert not _node("SELECT pg_catalog.nextval('s') AS n").sql.read_only
    assert _node("SELECT myschema.random() AS r").sql.read_only  # not the built-in: the catalog judges it
    assert of_syntax(_node("SELECT claim_job() AS j")) == UNRESOLVED
    assert decide(_node("SELECT 1 AS one"), UNRESOLVED) == WRITE  # not proven is not pure


def test_a_write_keeps_coalescing_only_when_its_author_says_so() -> None:
    spec = "nodes:\n  n: {sql: 'SELECT claim_job() AS j', fetch: one, coalesce: true}\n"
    node = load_flow(text=spec, name="t").nodes["n"]
    verdict = Effects(pure=False, resolved=True, reasons=("calls volatile function claim_job()",))
    allowed = as_allowed(node, verdict)
    assert (allowed.sql.coalesce, allowed.sql.read_only, allowed.sql.fuse, allowed.sql.replica) == (True, False, False, False)


def test_parameters_become_typed_nulls_on_the_tree_never_pasted_values() -> None:
    text = probe_text("SELECT $1 AS a, '$2' AS b FROM t WHERE x = $2 AND y = $3",
                      ["integer[]", 'public."My Type"', "character varying(3)"])
    assert text == "SELECT 1 FROM (SELECT CAST(NULL AS integer[]) AS a, '$2' AS b FROM t " \
                   "WHERE x = CAST(NULL AS public.\"My Type\") AND y = CAST(NULL AS varchar(3))) AS s"


def test_a_sql_function_body_names_its_arguments_bare_or_qualified_and_each_becomes_a_typed_null() -> None:
    texts = body_probe_texts("SELECT k + $2 FROM t WHERE t.k = f.k; SELECT k", ["bigint", "text"], ("k", ""), "f")
    assert texts == ["SELECT 1 FROM (SELECT CAST(NULL AS bigint) + CAST(NULL AS text) FROM t "
                     "WHERE t.k = CAST(NULL AS bigint)) AS s",
                     "SELECT 1 FROM (SELECT CAST(NULL AS bigint)) AS s"]


def test_a_function_body_with_a_statement_other_than_a_query_cannot_be_probed() -> None:
    with pytest.raises(ValueError, match="other than a query"):
        body_probe_texts("SELECT 1; UPDATE t SET k = 1", [], (), "f")


# --- behaviours on a real server -------------------------------------------------------------

CLAIM = """
nodes:
  claim: {{sql: "{sql}", fetch: value}}
"""


@pytest.mark.parametrize("sql", [
    "SELECT claim_job()", "SELECT * FROM claim_job()", "SELECT job FROM claimed_now",
    "WITH c AS (SELECT claim_job() AS job) SELECT job FROM c",
])
async def test_five_concurrent_job_claims_each_get_a_different_job(db: str, tmp_path: Path, sql: str) -> None:
    (tmp_path / "claim.yaml").write_text(CLAIM.format(sql=sql))
    async with Planner(flows=tmp_path, dsn=db, pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
        results = await asyncio.gather(*(planner.run("claim") for _ in range(5)))
    jobs = [r.nodes["claim"].value for r in results]
    assert len(set(jobs)) == 5, jobs
    assert all(r.nodes["claim"].served is not None and r.nodes["claim"].served.batch == 1 for r in results)


async def test_job_claims_combined_with_coalesce_true_still_each_get_a_different_job(db: str, tmp_path: Path) -> None:
    # Parameters of their own: writes with identical parameters never share a statement at all.
    (tmp_path / "claim.yaml").write_text(
        "inputs: {n: int}\nnodes:\n  claim: {sql: 'SELECT claim_job() AS job, $n::int AS n', fetch: one, coalesce: true}\n")
    async with Planner(flows=tmp_path, dsn=db, pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
        results = await asyncio.gather(*(planner.run("claim", {"n": n}) for n in range(6)))
    jobs = [r.nodes["claim"].value["job"] for r in results]
    assert len(set(jobs)) == 6, jobs
    # Combined as writes (each run its own member), never merged into one answer.
    assert max(r.nodes["claim"].served.batch for r in results) > 1  # type: ignore[union-attr]


ORDER = """
inputs: {user: int}
nodes:
  order: {sql: "SELECT place_order($user) AS id", fetch: value}
"""


async def test_concurrent_orders_of_one_user_are_each_a_row(db: str, tmp_path: Path) -> None:
    (tmp_path / "order.yaml").write_text(ORDER)
    async with Planner(flows=tmp_path, dsn=db, pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
        # The first finds the connection free; the others would wait for it, together.
        results = await asyncio.gather(*(planner.run("order", {"user": 7}) for _ in range(3)))
    con = await asyncpg.connect(db)
    try:
        rows = await con.fetchval("SELECT count(*) FROM orders WHERE user_id = 7")
    finally:
        await con.close()
    assert rows == 3 and len({r.nodes["order"].value for r in results}) == 3


CACHED_CLAIM = """
nodes:
  claim: {sql: "SELECT job FROM claimed_now", fetch: value, cache: 30s}
"""


async def test_caching_a_statement_with_effects_is_refused_at_bind_naming_the_function(db: str, tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(CACHED_CLAIM)
    async with Planner(flows=tmp_path, dsn=db) as planner:
        with pytest.raises(FlowFileError, match=r"claim_job\(\)") as caught:
            await planner.run("c")
    assert caught.value.line == 3 and caught.value.code == "PLN131"
    con = await asyncpg.connect(db)
    try:
        assert await con.fetchval("SELECT count(*) FROM jobs WHERE claimed") == 0  # nothing ran
    finally:
        await con.close()


async def test_validate_with_the_database_names_the_function_a_cached_statement_calls(db: str, tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(CACHED_CLAIM)
    findings = await validate_paths([tmp_path / "c.yaml"], db)
    assert [(f.code, f.line) for f in findings] == [("PLN131", 3)]
    assert "claim_job()" in findings[0].message


async def test_a_verdict_is_asked_again_once_it_is_older_than_max_age(db: str) -> None:
    now = [0.0]
    pool = await asyncpg.create_pool(db, min_size=1, max_size=1)
    try:
        catalog = Catalog(pool.acquire, max_age=60, timer=lambda: now[0])
        text = "SELECT job_name($1) AS name"
        assert (await catalog.effects(text)).pure
        async with pool.acquire() as con:
            await con.execute("ALTER FUNCTION job_name(int) VOLATILE")
        assert (await catalog.effects(text)).pure  # kept: not older than max_age
        now[0] = 61.0
        assert (await catalog.effects(text)).functions == ("public.job_name(i integer)",)
    finally:
        await pool.close()


NEXT_JOB_STABLE = """CREATE OR REPLACE FUNCTION next_job() RETURNS text STABLE LANGUAGE sql AS $$
  SELECT name FROM jobs WHERE NOT claimed ORDER BY id LIMIT 1 $$"""
NEXT_JOB_CLAIMS = """CREATE OR REPLACE FUNCTION next_job() RETURNS text VOLATILE LANGUAGE sql AS $$
  UPDATE jobs SET claimed = true
   WHERE id = (SELECT id FROM jobs WHERE NOT claimed ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
  RETURNING name $$"""


async def test_a_verdict_past_max_age_is_asked_again_before_its_statement_is_shared_again(
        db: str, tmp_path: Path) -> None:
    # A function redefined from STABLE to VOLATILE (CREATE OR REPLACE): once the pure verdict is
    # older than max_age it is not used to share the statement while it is asked again.
    con = await asyncpg.connect(db)
    try:
        await con.execute(NEXT_JOB_STABLE)
        (tmp_path / "claim.yaml").write_text(CLAIM.format(sql="SELECT next_job()"))
        async with Planner(flows=tmp_path, dsn=db, pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
            catalog = planner.effects.catalog
            assert catalog is not None
            now = [0.0]
            catalog._timer = lambda: now[0]
            assert (await planner.run("claim")).nodes["claim"].value == "job-1"
            await con.execute(NEXT_JOB_CLAIMS)
            now[0] = catalog.max_age + 1
            results = await asyncio.gather(*(planner.run("claim") for _ in range(5)))
        jobs = [r.nodes["claim"].value for r in results]
        assert len(set(jobs)) == 5, jobs
        assert await con.fetchval("SELECT count(*) FROM jobs WHERE claimed") == 5
    finally:
        await con.close()


async def test_a_function_redefined_volatile_is_seen_by_the_next_check_well_before_max_age(
        db: str, tmp_path: Path) -> None:
    # CREATE OR REPLACE from STABLE to VOLATILE, 10 s later (max_age is 60): the background check
    # that a use starts every WATCH_S sees the change, and the claims are no longer shared.
    con = await asyncpg.connect(db)
    try:
        await con.execute(NEXT_JOB_STABLE)
        (tmp_path / "claim.yaml").write_text(CLAIM.format(sql="SELECT next_job()"))
        async with Planner(flows=tmp_path, dsn=db, pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
            catalog = planner.effects.catalog
            assert catalog is not None
            now = [0.0]
            catalog._timer = lambda: now[0]
            assert (await planner.run("claim")).nodes["claim"].value == "job-1"
            await con.execute(NEXT_JOB_CLAIMS)
            now[0] = 10.0
            await planner.run("claim")  # alone: its use of the verdict starts the check
            assert catalog._watching is not None
            await catalog._watching
            results = await asyncio.gather(*(planner.run("claim") for _ in range(5)))
        jobs = [r.nodes["claim"].value for r in results]
        assert len(set(jobs)) == 5, jobs
    finally:
        await con.close()


@pytest.mark.parametrize("change", [
    "CREATE OR REPLACE FUNCTION job_name(i int) RETURNS text VOLATILE LANGUAGE sql AS $$ SELECT name FROM jobs WHERE id = i $$",
    "ALTER FUNCTION job_name(int) VOLATILE",
    "CREATE FUNCTION shop.job_name(i int) RETURNS text VOLATILE LANGUAGE sql AS $$ SELECT 'x' $$",
    "CREATE OR REPLACE VIEW pending AS SELECT id, name FROM jobs WHERE NOT claimed AND random() >= 0",
    "CREATE POLICY p ON jobs USING (true)",
    "ALTER TABLE jobs ENABLE ROW LEVEL SECURITY",
    "CREATE DOMAIN checked_int AS int CHECK (VALUE > 0)",
])
async def test_a_check_sees_each_kind_of_change_verdicts_rest_on(db: str, change: str) -> None:
    pool = await asyncpg.create_pool(db, min_size=1, max_size=1)
    try:
        catalog = Catalog(pool.acquire)
        assert (await catalog.effects("SELECT job_name(1) AS n")).pure
        assert not await catalog.watch()  # nothing changed
        async with pool.acquire() as con:
            await con.execute(change)
        assert await catalog.watch()
        assert catalog.known("SELECT job_name(1) AS n") is None  # asked again at its next use
    finally:
        await catalog.close()
        await pool.close()


async def test_a_verdict_is_asked_under_the_search_path_the_pool_runs_with(db: str, tmp_path: Path) -> None:
    # The database's search_path changes while the pool's connections keep the one they opened
    # with: `claim_x()` there is the VOLATILE `shop.claim_x`, for the catalog's newer connection
    # the STABLE `public.claim_x`. The verdict must be on the function the runs call.
    database = db.split("@/", 1)[1].split("?", 1)[0] if "@/" in db else db.rsplit("/", 1)[1].split("?", 1)[0]
    con = await asyncpg.connect(db)
    try:
        await con.execute("CREATE FUNCTION public.claim_x() RETURNS text STABLE LANGUAGE sql AS "
                          "$$ SELECT 'nothing claimed' $$;"
                          "CREATE FUNCTION shop.claim_x() RETURNS text LANGUAGE sql AS $$ SELECT claim_job() $$")
        await con.execute(f'ALTER DATABASE "{database}" SET search_path = shop, public')
        (tmp_path / "claim.yaml").write_text(CLAIM.format(sql="SELECT claim_x()"))
        async with Planner(flows=tmp_path, dsn=db, pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
            assert planner.effects.catalog is not None
            await planner.pools["primary"].pool()  # the pool's connection: shop, public
            await con.execute(f'ALTER DATABASE "{database}" RESET search_path')
            results = await asyncio.gather(*(planner.run("claim") for _ in range(5)))
        jobs = [r.nodes["claim"].value for r in results]
        assert len(set(jobs)) == 5, jobs
    finally:
        await con.execute(f'ALTER DATABASE "{database}" RESET search_path')
        await con.close()


async def test_pool_connections_with_different_search_paths_make_every_verdict_a_write(
        db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    database = db.split("@/", 1)[1].split("?", 1)[0] if "@/" in db else db.rsplit("/", 1)[1].split("?", 1)[0]
    con = await asyncpg.connect(db)
    try:
        await con.execute(f'ALTER DATABASE "{database}" SET search_path = shop, public')
        async with Planner(flows=tmp_path, dsn=db, pool_options=PoolOptions(min_size=1, max_size=2)) as planner:
            catalog = planner.effects.catalog
            assert catalog is not None
            pool = await planner.pools["primary"].pool()
            async with pool.acquire():  # the first connection: shop, public
                await con.execute(f'ALTER DATABASE "{database}" RESET search_path')
                async with pool.acquire():  # a second one, opened with the default
                    pass
            with caplog.at_level(logging.WARNING, logger="planner"):
                verdict = await catalog.effects("SELECT name FROM jobs WHERE id = 1")
        assert not verdict.pure and "different search_paths" in verdict.why(), verdict
        assert any("different search_paths" in r.getMessage() for r in caplog.records)
    finally:
        await con.execute(f'ALTER DATABASE "{database}" RESET search_path')
        await con.close()


async def test_a_changed_schema_makes_the_next_run_ask_the_catalog_again(db: str, tmp_path: Path) -> None:
    (tmp_path / "n.yaml").write_text("inputs: {i: int}\nnodes:\n  n: {sql: 'SELECT job_name($i) AS name', fetch: value, on_bug: default}\n")
    async with Planner(flows=tmp_path, dsn=db, pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
        assert (await planner.run("n", {"i": 1})).nodes["n"].value == "job-1"
        catalog = planner.effects.catalog
        assert catalog is not None and catalog.resolutions == 1
        con = await asyncpg.connect(db)
        try:
            await con.execute("DROP FUNCTION job_name(int)")
            assert (await planner.run("n", {"i": 1})).nodes["n"].state == "defaulted"  # 42883: no such function
            await con.execute("CREATE FUNCTION job_name(i int) RETURNS text VOLATILE LANGUAGE sql "
                              "AS $$ SELECT name FROM jobs WHERE id = i $$")
        finally:
            await con.close()
        await planner.run("n", {"i": 1})
        assert catalog.resolutions == 2
        text = planner.load("n").nodes["n"].sql.statements[0].text
        assert catalog.known(text) == Effects(pure=False, resolved=True, functions=("public.job_name(i integer)",),
                                              reasons=("calls volatile function public.job_name(i integer)",))


async def test_a_statement_the_server_cannot_resolve_is_a_write(db: str, caplog: pytest.LogCaptureFixture) -> None:
    role = f"plain_{os.getpid()}"  # roles belong to the server, shared by every test database
    database = db.split("@/", 1)[1].split("?", 1)[0]
    admin = await asyncpg.connect(db)
    try:
        await admin.execute(f"REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC; CREATE ROLE {role} LOGIN; "
                            f"GRANT SELECT ON jobs TO {role}")
        plain = await asyncpg.create_pool(db.replace("postgres:@", f"{role}:@", 1), min_size=1, max_size=1)
        try:
            with caplog.at_level(logging.WARNING, logger="planner"):
                verdict = await Catalog(plain.acquire).effects("SELECT id FROM jobs")
        finally:
            await plain.close()
        await admin.execute(f"REVOKE SELECT ON jobs FROM {role}; DROP ROLE {role}")
    finally:
        await admin.close()
    assert not verdict.pure and "could not be resolved" in verdict.why()
    assert any("treated as a write" in r.getMessage() for r in caplog.records)


# --- read-your-writes with a replica ---------------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> Iterator[Any]:
    from tests.support.replica_pair import start_pair

    # Outside pytest's numbered temporary folders, which another test run may delete under it.
    with server_folder() as folder:
        started = start_pair(folder)
        try:
            yield started
        finally:
            started.close()


ORDER_THEN_READ = """
inputs: {user: int}
nodes:
  order: {sql: "SELECT place_order($user) AS id", fetch: value}
  seen: {sql: "SELECT count(*) FROM orders WHERE id = $order", fetch: value}
  again: {sql: "SELECT count(*) FROM orders WHERE user_id = $user", fetch: value, after: [order]}
"""


async def test_the_read_after_a_function_that_writes_sees_the_write_with_a_replica(pair: Any, tmp_path: Path) -> None:
    from tests.support.replica_pair import caught_up

    con = await asyncpg.connect(pair.primary.dsn())
    try:
        await con.execute("DROP TABLE IF EXISTS orders; DROP FUNCTION IF EXISTS place_order(int);"
                          "CREATE TABLE orders (id serial PRIMARY KEY, user_id int NOT NULL);"
                          "CREATE FUNCTION place_order(u int) RETURNS int LANGUAGE sql AS "
                          "$$ INSERT INTO orders (user_id) VALUES (u) RETURNING id $$")
    finally:
        await con.close()
    await caught_up(pair)
    replica = await asyncpg.connect(pair.replica.dsn())
    await replica.execute("SELECT pg_wal_replay_pause()")  # the replica lags: it never has the order
    try:
        (tmp_path / "o.yaml").write_text(ORDER_THEN_READ)
        async with Planner(flows=tmp_path,
                           dsn=pair.primary.dsn(),
                           replica_dsn=pair.replica.dsn(),
                           replica_options=ReplicaOptions(max_lag="1h")) as planner:
            await planner.run("o", {"user": 1})
            result = await planner.run("o", {"user": 1})
    finally:
        await replica.execute("SELECT pg_wal_replay_resume()")
        await replica.close()
    assert result.nodes["seen"].value == 1 and result.nodes["again"].value == 2
    assert not result.nodes["seen"].served.replica and not result.nodes["again"].served.replica  # type: ignore[union-attr]
