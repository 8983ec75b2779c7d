"""The judge: what a statement does, asked of the server's catalog (a verdict of `planner.lang.effects`).

`resolve(con, text)` asks the server itself which objects a statement uses, then judges them:

1. In a transaction that is always rolled back, the statement is prepared (for its parameter
   types), each `$n` is replaced by `NULL::<its type>` on pglast's tree (`planner.lang.probe`,
   never by pasting text), and a temporary view is created over it as a subquery:
   `SELECT 1 FROM (<stmt>) s`.
2. The view's rewrite rule is the server's own parse of the statement, with every object
   resolved to its oid: overloads, schema-qualified and quoted names, functions in FROM, WHERE
   and CTEs, operators (-> the function behind them), aggregates and window functions (-> their
   support functions), casts, table samples, and relations. Views are followed into their own
   rules, tables with row-level security into their policies, domains into their constraints,
   types into their input and output functions, recursively.
3. Every function reached is judged by `pg_proc`: volatile (`random()`, `nextval`,
   `clock_timestamp`, `gen_random_uuid`, `pg_advisory_*`, `pg_notify`, a user's
   `claim_job()`...) is a write; so is a built-in the catalog marks parallel unsafe (it assigns
   a transaction id, a sequence value or session state: `txid_current`,
   `pg_current_xact_id`...), and a function of the user's in an untrusted procedural language
   (PostgreSQL does not keep it from acting outside the database, whatever its volatility).
   Row locks in a view (`FOR UPDATE`) and foreign tables (what their server does is not
   known) are writes too.

Each verdict is asked once per statement text and kept by `planner.db.catalog.Catalog`.
`python -m planner.db.judge DSN` regenerates `planner/lang/builtin_effects.py`, the offline
list of the built-ins this judge counts as writes.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from typing import Any

from planner.lang.effects import Effects
from planner.lang.probe import body_probe_texts, probe_text

LOCK_TIMEOUT = 0.25  # seconds a question waits for a lock on what the statement reads
STATEMENT_TIMEOUT = 5.0  # seconds each statement of a question may take
_FIRST_NORMAL_OID = 16384  # FirstNormalObjectId: objects below are the server's own (built in)
_VIEW = "planner_effects_probe"

# The oids of a stored query tree (nodeToString): functions, operators, aggregates, window
# functions, table-sample methods, relations and types.
_OIDS = re.compile(r":(funcid|opfuncid|opno|aggfnoid|winfnoid|tsmhandler|relid|resulttype|consttype|opnos) "
                   r"(\(o[ 0-9]*\)|\d+)")
_FUNCTION_FIELDS = frozenset({"funcid", "opfuncid", "aggfnoid", "winfnoid", "tsmhandler"})

_EXPAND = """
SELECT 'f' AS kind, op.oprcode::oid AS oid, NULL::text AS tree, NULL::text AS name
  FROM pg_operator op WHERE op.oid = ANY($1::oid[])
UNION ALL
SELECT 'f', f, NULL, NULL FROM pg_aggregate a
 CROSS JOIN LATERAL unnest(ARRAY[a.aggtransfn, a.aggfinalfn, a.aggcombinefn, a.aggmtransfn, a.aggminvtransfn,
                                 a.aggmfinalfn]::oid[]) AS f
 WHERE a.aggfnoid = ANY($2::oid[]) AND f <> 0
UNION ALL
SELECT 't', NULL, r.ev_action::text, c.oid::regclass::text FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
 WHERE c.oid = ANY($3::oid[]) AND c.relkind = 'v'
UNION ALL
SELECT 't', NULL, x, c.oid::regclass::text FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
 CROSS JOIN LATERAL unnest(ARRAY[p.polqual::text, p.polwithcheck::text]) AS x
 WHERE c.oid = ANY($3::oid[]) AND c.relrowsecurity AND x IS NOT NULL
UNION ALL
SELECT 'foreign', c.oid, NULL, c.oid::regclass::text FROM pg_class c WHERE c.oid = ANY($3::oid[]) AND c.relkind = 'f'
UNION ALL
SELECT 'f', f, NULL, NULL FROM pg_type t CROSS JOIN LATERAL unnest(ARRAY[t.typinput, t.typoutput]::oid[]) AS f
 WHERE t.oid = ANY($4::oid[]) AND f <> 0
UNION ALL
SELECT 'y', t.typbasetype, NULL, NULL FROM pg_type t WHERE t.oid = ANY($4::oid[]) AND t.typtype = 'd'
UNION ALL
SELECT 't', NULL, c.conbin::text, c.contypid::regtype::text FROM pg_constraint c
 WHERE c.contypid = ANY($4::oid[]) AND c.conbin IS NOT NULL
UNION ALL
SELECT 't', NULL, x, p.oid::regprocedure::text FROM pg_proc p
 CROSS JOIN LATERAL unnest(ARRAY[p.proargdefaults::text, to_jsonb(p) ->> 'prosqlbody']) AS x
 WHERE p.oid = ANY($5::oid[]) AND x IS NOT NULL
"""
_STRING_BODIES = """
SELECT p.oid::regprocedure::text AS signature, p.proname::text AS name, p.prosrc AS source,
       ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) WITH ORDINALITY AS a(t, n) ORDER BY n) AS types,
       ARRAY(SELECT a.n FROM unnest(coalesce(p.proargnames, '{}'::text[])) WITH ORDINALITY AS a(n, i)
              WHERE p.proargmodes IS NULL OR p.proargmodes[a.i::int] IN ('i', 'b', 'v') ORDER BY a.i) AS names,
       (SELECT substr(c, 13) FROM unnest(p.proconfig) AS c WHERE c LIKE 'search\\_path=%' LIMIT 1) AS search_path
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE p.oid = ANY($1::oid[]) AND p.oid >= $2 AND l.lanname = 'sql' AND p.provolatile <> 'v'
   AND to_jsonb(p) ->> 'prosqlbody' IS NULL
"""
# A SQL function of the user's whose body is a string, declared STABLE or IMMUTABLE: PostgreSQL
# does not check that its body calls nothing volatile (`AS 'SELECT nextval(''s'')'` runs, and
# takes a ticket per call). Its body is the server's to read, as the statement's own: each of its
# statements, arguments as typed NULLs, becomes a temporary view whose rule is judged like the
# statement's. A body that cannot be read so (a polymorphic argument, a statement other than a
# query) is not proven pure.

# The last part: what a call runs besides the function's own code, kept as trees with oids: the
# defaults of its arguments (evaluated in the caller's query for every argument left out:
# `f(t bigint DEFAULT nextval('s'))` is STABLE, `SELECT f()` takes a ticket) and a SQL-standard
# body (`BEGIN ATOMIC ... END`, `RETURN ...`, PostgreSQL 14+; `to_jsonb` so that older servers,
# which have no `prosqlbody`, answer NULL). A SQL body given as a string: `_STRING_BODIES`. Any
# other language's code (PL/pgSQL, C) is trusted for its declared volatility.

_JUDGE = """
SELECT CASE WHEN n.nspname = 'pg_catalog' THEN '' ELSE quote_ident(n.nspname) || '.' END
       || quote_ident(p.proname) || '(' || pg_get_function_identity_arguments(p.oid) || ')' AS signature,
       p.provolatile::text AS volatility, p.proparallel::text AS parallel, l.lanname AS language,
       l.lanpltrusted AS trusted, p.oid < $2 AS builtin
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
 WHERE p.oid = ANY($1::oid[])
 ORDER BY 1
"""


# Languages whose non-volatile functions PostgreSQL keeps read-only (SQL and PL/pgSQL refuse
# data-modifying statements in them) or that are the server's and its extensions' own code.
_CHECKED_LANGUAGES = frozenset({"sql", "plpgsql", "internal", "c"})


class StatementRefused(Exception):
    """The server did not prepare the statement itself (its runs get the error)."""


async def resolve(con: Any, text: str, search_path: str | None = None) -> Effects:
    """The catalog's verdict on `text` (one plain query, `$n` parameters), asked on asyncpg
    connection `con` in a transaction that is rolled back, under `search_path` when given (the
    one the statement is executed under). Raises what the server raises (a statement that does not
    prepare, no right to create a temporary view)."""
    transaction = con.transaction()
    await transaction.start()
    try:
        # Preparing and creating the view lock what the statement reads (ACCESS SHARE), as its
        # own execution would: behind a migration's exclusive lock, give up soon (the statement is a
        # write until asked again) rather than delay the questions of every other statement.
        await con.fetchval("SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true)",
                           f"{int(LOCK_TIMEOUT * 1000)}ms", f"{int(STATEMENT_TIMEOUT * 1000)}ms")
        if search_path is not None:  # a bound value, never pasted into the text
            await con.fetchval("SELECT set_config('search_path', $1, true)", search_path)
        try:
            prepared = await con.prepare(text)
        except Exception as exc:
            raise StatementRefused(f"{type(exc).__name__}: {exc}") from exc
        oids = [t.oid for t in prepared.get_parameters()]
        types = [row[0] for row in await con.fetch(
            "SELECT format_type(t, NULL) FROM unnest($1::oid[]) WITH ORDINALITY AS p(t, n) ORDER BY n", oids)]
        await con.execute(_create_view(_VIEW, probe_text(text, types)))
        rule = await con.fetchval("SELECT ev_action::text FROM pg_rewrite WHERE ev_class = $1::regclass",
                                  f"pg_temp.{_VIEW}")
        return await _judge(con, rule)
    finally:
        await transaction.rollback()


async def _judge(con: Any, rule: str) -> Effects:
    functions: set[int] = set()
    seen: dict[str, set[int]] = {"op": set(), "agg": set(), "rel": set(), "type": set(), "fn": set()}
    reasons: list[str] = []
    trees: list[tuple[str | None, str]] = [(None, rule)]
    new: dict[str, set[int]] = {"op": set(), "agg": set(), "rel": set(), "type": set(), "fn": set()}

    def function(oid: int) -> None:
        functions.add(oid)
        if oid not in seen["fn"]:  # its argument defaults and SQL-standard body are asked next round
            seen["fn"].add(oid)
            new["fn"].add(oid)

    while True:
        for owner, tree in trees:
            if "ROWMARKCLAUSE" in tree:  # the statement's own FOR UPDATE/SHARE too, in any subquery
                reasons.append(f"locks rows (FOR UPDATE/SHARE in {owner or 'the statement'})")
            for field, value in _OIDS.findall(tree):
                oids = [int(v) for v in value[2:-1].split()] if value.startswith("(o") else [int(value)]
                for oid in oids:
                    if oid == 0:
                        continue
                    if field in _FUNCTION_FIELDS:
                        function(oid)
                    kind = {"opno": "op", "opnos": "op", "aggfnoid": "agg", "relid": "rel",
                            "resulttype": "type", "consttype": "type"}.get(field)
                    if kind is not None and oid not in seen[kind]:
                        seen[kind].add(oid)
                        new[kind].add(oid)
        trees = []
        if not any(new.values()):
            break
        asked = new
        new = {"op": set(), "agg": set(), "rel": set(), "type": set(), "fn": set()}
        rows = await con.fetch(_EXPAND, list(asked["op"]), list(asked["agg"]), list(asked["rel"]),
                               list(asked["type"]), list(asked["fn"]))
        for body in await con.fetch(_STRING_BODIES, list(asked["fn"]), _FIRST_NORMAL_OID):
            try:
                for rule in await _body_rules(con, body):
                    trees.append((body["signature"], rule))
            except Exception as exc:  # noqa: BLE001 - whatever the server says, not proven pure
                reasons.append(f"calls {body['signature']}, whose SQL body could not be judged "
                               f"({type(exc).__name__}: {exc})")
        for row in rows:
            if row["kind"] == "f":
                function(int(row["oid"]))
            elif row["kind"] == "t":
                trees.append((row["name"], row["tree"]))
            elif row["kind"] == "foreign":
                reasons.append(f"reads foreign table {row['name']} (what its server does is not known)")
            elif row["kind"] == "y" and int(row["oid"]) not in seen["type"]:
                seen["type"].add(int(row["oid"]))
                trees.append((None, f":resulttype {int(row['oid'])}"))
    named: list[str] = []
    for row in await con.fetch(_JUDGE, list(functions), _FIRST_NORMAL_OID):
        signature = row["signature"]
        if row["volatility"] == "v":
            reasons.append(f"calls volatile function {signature}")
        elif row["builtin"] and row["parallel"] == "u":
            reasons.append(f"calls {signature}, which the catalog marks parallel unsafe (it may assign a "
                           "transaction id, a sequence value or session state)")
        elif not row["builtin"] and row["language"] not in _CHECKED_LANGUAGES and not row["trusted"]:
            reasons.append(f"calls {signature}, written in the untrusted language {row['language']} "
                           "(PostgreSQL does not keep it from acting outside the database)")
        else:
            continue
        named.append(signature)
    return Effects(pure=not reasons, resolved=True, reasons=tuple(dict.fromkeys(reasons)), functions=tuple(named))


async def _body_rules(con: Any, body: Any) -> list[str]:
    """The rewrite rules of a SQL function's string body (`_STRING_BODIES`), one per statement,
    each a temporary view made in a savepoint (a body the server refuses rolls back alone)."""
    rules: list[str] = []
    probes = body_probe_texts(body["source"], list(body["types"]), tuple(body["names"]), body["name"])
    for number, probe in enumerate(probes):
        view = f"{_VIEW}_body_{number}"
        async with con.transaction():
            # A body runs under its function's own `SET search_path = ...` when it has one
            # (SECURITY DEFINER functions should): its names are read under that path. Set
            # locally, and put back (releasing the savepoint would keep it).
            before = None
            if body["search_path"] is not None:
                before = await con.fetchval("SELECT current_setting('search_path')")
                await con.fetchval("SELECT set_config('search_path', $1, true)", body["search_path"])
            await con.execute(_create_view(view, probe))
            if before is not None:
                await con.fetchval("SELECT set_config('search_path', $1, true)", before)
            rules.append(await con.fetchval("SELECT ev_action::text FROM pg_rewrite WHERE ev_class = $1::regclass",
                                            f"pg_temp.{view}"))
            await con.execute(_drop_view(view))
    return rules


def _create_view(name: str, select: str) -> str:
    """`CREATE TEMPORARY VIEW name AS select`. DDL takes no bound parameters: `name` is planner's
    own (quoted), and `select` is a flow's statement text as pglast printed it, its `$n` already
    typed NULLs (`probe_text`): no value is ever part of it."""
    from planner.db.admin import quote_ident  # admin loads asyncpg: `import planner` must not

    return "CREATE TEMPORARY VIEW " + quote_ident(name) + " AS " + select


def _drop_view(name: str) -> str:
    from planner.db.admin import quote_ident

    return "DROP VIEW pg_temp." + quote_ident(name)


BUILTIN_EFFECTS = """
SELECT DISTINCT proname::text FROM pg_proc
 WHERE pronamespace = 'pg_catalog'::regnamespace AND (provolatile = 'v' OR proparallel = 'u')
 ORDER BY 1
"""
"""The built-in functions `resolve` judges to have effects, by name: what
`planner.lang.builtin_effects` lists for judging statements offline (`python -m planner.db.judge DSN`
writes it)."""


async def builtin_effects_source(dsn: str) -> tuple[str, int]:
    """The text of `planner/builtin_effects.py` from the catalog of the server at `dsn`, and how
    many names it lists."""
    from planner.db.pooler import connect

    con = await connect(dsn)
    try:
        version = await con.fetchval("SHOW server_version")
        names = [row[0] for row in await con.fetch(BUILTIN_EFFECTS)]
    finally:
        await con.close()
    body = "\n".join(f"    {json.dumps(name)}," for name in names)
    return f'''"""Built-in functions with effects, by name: the offline approximation of `planner.db.judge`.

Generated by `python -m planner.db.judge DSN` from PostgreSQL {version}'s catalog (every
`pg_catalog` function with an overload that is volatile or parallel unsafe); checked against
the server's catalog by tests/db/test_effects.py. `planner.lang.sqlinfo` counts a statement calling one
of these as a write at compile time, before any server is asked. Do not edit by hand.
"""

BUILTIN_EFFECTS: frozenset[str] = frozenset({{
{body}
}})
''', len(names)


if __name__ == "__main__":  # pragma: no cover - a maintainer's tool
    from pathlib import Path

    target = Path(__file__).parent.parent / "lang" / "builtin_effects.py"
    source, count = asyncio.run(builtin_effects_source(sys.argv[1]))
    target.write_text(source, encoding="utf-8")
    print(count, "names written to", target)

