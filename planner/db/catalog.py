"""What a statement does, asked of the server's catalog (the verdicts of `planner.lang.effects`).

`resolve(con, text)` asks the server itself which objects a statement uses, then judges them:

1. In a transaction that is always rolled back, the statement is prepared (for its parameter
   types), each `$n` is replaced by `NULL::<its type>` on pglast's tree (never by pasting
   text), and a temporary view is created over it as a subquery: `SELECT 1 FROM (<stmt>) s`.
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

`Catalog` keeps one verdict per statement text for `max_age` seconds (a function redefined
from STABLE to VOLATILE is seen within that time), resolves each text once however many runs
ask at the same moment, and forgets a text at once when the server says its statement went
stale (a migration). `planner.db.effects.EffectsBackend`, the outermost wrapper of a
`Planner`'s stack, asks it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import pglast
from pglast import ast
from pglast.stream import RawStream
from pglast.visitors import Visitor

from planner.kinds.backend import Backend
from planner.lang.effects import Effects

logger = logging.getLogger("planner")

MAX_AGE = 60.0
"""Seconds a verdict is kept before the catalog is asked again."""
WATCH_S = 5.0
"""Seconds between checks, while verdicts are used, that the user's functions, views, policies,
operators, casts and domains are unchanged on the server (`Catalog.watch`): a function redefined
from STABLE to VOLATILE (`CREATE OR REPLACE`), or one created earlier in the search_path, is
seen within about this time rather than `MAX_AGE`."""
RETRY_AFTER = 5.0  # a statement that could not be resolved is asked again after this
LOCK_TIMEOUT = 0.25  # seconds a question waits for a lock on what the statement reads
STATEMENT_TIMEOUT = 5.0  # seconds each statement of a question may take
IDLE_CLOSE = 1.0  # seconds without a question after which the catalog's own connection is closed
MAX_STATEMENTS = 4096  # verdicts kept; past this the oldest is forgotten
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

# What verdicts rest on, as the server has it now: the row version (xmin) of every object of the
# user's that a verdict can follow (built-in objects, below FirstNormalObjectId, never change).
# CREATE OR REPLACE and ALTER give a row a new version; CREATE and DROP add and take rows.
_FINGERPRINT = """
SELECT md5(coalesce(string_agg(x, ',' ORDER BY x), '')) FROM (
  SELECT 'p' || oid::text || ':' || xmin::text FROM pg_proc WHERE oid >= 16384
  UNION ALL SELECT 'r' || r.oid::text || ':' || r.xmin::text FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
   WHERE r.oid >= 16384 AND c.relpersistence <> 't'
  UNION ALL SELECT 'o' || oid::text || ':' || xmin::text FROM pg_operator WHERE oid >= 16384
  UNION ALL SELECT 'c' || oid::text || ':' || xmin::text FROM pg_cast WHERE oid >= 16384
  UNION ALL SELECT 'y' || oid::text || ':' || xmin::text FROM pg_policy
  UNION ALL SELECT 'd' || oid::text || ':' || xmin::text FROM pg_constraint WHERE contypid <> 0
  UNION ALL SELECT 'a' || aggfnoid::oid::text || ':' || xmin::text FROM pg_aggregate WHERE aggfnoid::oid >= 16384
  UNION ALL SELECT 'k' || oid::text || ':' || relkind::text FROM pg_class
   WHERE oid >= 16384 AND (relkind = 'f' OR (relrowsecurity AND relkind IN ('r', 'p', 'v', 'f')))
) AS s(x)
"""

# Languages whose non-volatile functions PostgreSQL keeps read-only (SQL and PL/pgSQL refuse
# data-modifying statements in them) or that are the server's and its extensions' own code.
_CHECKED_LANGUAGES = frozenset({"sql", "plpgsql", "internal", "c"})


class StatementRefused(Exception):
    """The server did not prepare the statement itself (its runs get the error)."""


class _Bind(Visitor):
    """Replace each `$n` by `NULL::<type of $n>`, on the tree."""

    def __init__(self, types: list[str], names: tuple[str, ...] = (), function: str = "") -> None:
        super().__init__()
        # Each type as the server spells it (`format_type`: `integer[]`, `public."My Type"`),
        # parsed into a type name: a name of the catalog's, never a value of a run's.
        self.types = [_type_name(t) for t in types]
        # A SQL function's body may name its arguments (`k`, `f.k`) as well as number them.
        self.names = {name: i for i, name in enumerate(names) if name}
        self.function = function

    def visit(self, ancestors: object, node: ast.Node) -> ast.Node | None:
        if isinstance(node, ast.ParamRef):
            return ast.TypeCast(arg=ast.A_Const(isnull=True), typeName=self.types[int(node.number or 0) - 1])
        if isinstance(node, ast.ColumnRef) and self.names:
            fields = [getattr(f, "sval", None) for f in node.fields or ()]
            if len(fields) == 2 and fields[0] == self.function:
                fields = fields[1:]
            if len(fields) == 1 and fields[0] in self.names:
                return ast.TypeCast(arg=ast.A_Const(isnull=True), typeName=self.types[self.names[fields[0]]])
        return None


def _type_name(spelled: str) -> ast.TypeName:
    stmt = pglast.parse_sql(f"SELECT NULL::{spelled}")[0].stmt
    target = stmt.targetList[0].val  # type: ignore[union-attr]
    if not isinstance(target, ast.TypeCast) or not isinstance(target.typeName, ast.TypeName):
        raise ValueError(f"not a type name: {spelled!r}")
    return target.typeName


def probe_text(text: str, types: list[str]) -> str:
    """The view's query for statement `text` whose parameters have `types` (as `format_type`
    spells them): `SELECT 1 FROM (<text, each $n a typed NULL>) AS s`. Raises `ValueError` for
    anything but one plain query."""
    tree = pglast.parse_sql(text)
    if len(tree) != 1 or not isinstance(tree[0].stmt, ast.SelectStmt):
        raise ValueError("only one plain query can be resolved")
    _Bind(types)(tree)
    return f"SELECT 1 FROM ({RawStream()(tree[0].stmt)}) AS s"


async def resolve(con: Any, text: str, search_path: str | None = None) -> Effects:
    """The catalog's verdict on `text` (one plain query, `$n` parameters), asked on asyncpg
    connection `con` in a transaction that is rolled back, under `search_path` when given (the
    one the statement's runs have). Raises what the server raises (a statement that does not
    prepare, no right to create a temporary view)."""
    transaction = con.transaction()
    await transaction.start()
    try:
        # Preparing and creating the view lock what the statement reads (ACCESS SHARE), as its
        # own run would: behind a migration's exclusive lock, give up soon (the statement is a
        # write until asked again) rather than hold up the questions of every other statement.
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
    for number, raw in enumerate(pglast.parse_sql(body["source"])):
        if not isinstance(raw.stmt, ast.SelectStmt):
            raise ValueError("a statement other than a query")
        raw.stmt = _Bind(list(body["types"]), tuple(body["names"]), body["name"])(raw.stmt)
        view = f"{_VIEW}_body_{number}"
        async with con.transaction():
            # A body runs under its function's own `SET search_path = ...` when it has one
            # (SECURITY DEFINER functions should): its names are read under that path. Set
            # locally, and put back (releasing the savepoint would keep it).
            before = None
            if body["search_path"] is not None:
                before = await con.fetchval("SELECT current_setting('search_path')")
                await con.fetchval("SELECT set_config('search_path', $1, true)", body["search_path"])
            await con.execute(_create_view(view, "SELECT 1 FROM (" + RawStream()(raw.stmt) + ") AS s"))
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


Connect = Callable[[], Any]  # an async context manager giving an asyncpg connection


class Catalog:
    """Verdicts per statement text, from one server (see the module's docstring).

    `acquire()` must return an async context manager giving a connection (an asyncpg pool's
    `acquire`)."""

    def __init__(self, acquire: Callable[[], Any], *, max_age: float = MAX_AGE,
                 timer: Callable[[], float] = time.monotonic,
                 search_paths: Callable[[], set[str]] | None = None) -> None:
        self._acquire = acquire
        # The search_paths the statements run with (`PoolBackend.search_paths`): the verdict is
        # asked under that one; under several, a name may mean several functions: not proven.
        self._search_paths = search_paths
        self.max_age = max_age
        self._timer = timer
        self._known: dict[str, tuple[Effects, float]] = {}  # text -> (verdict, asked again after)
        self._flights: dict[str, asyncio.Future[Effects]] = {}
        self._warned: set[str] = set()
        self.resolutions = 0  # statements resolved on the server (a figure for tests)
        self._fingerprint: str | None = None  # `_FINGERPRINT` when verdicts were last asked or checked
        self._watch_due = 0.0
        self._watching: asyncio.Future[None] | None = None

    def known(self, text: str) -> Effects | None:
        """The verdict kept for `text`, if still fresh."""
        entry = self._known.get(text)
        if entry is None or entry[1] <= self._timer():
            return None
        return entry[0]

    def current(self, text: str) -> Effects | None:
        """The verdict kept for `text` without waiting: fresh, or a *write* past `max_age` while
        it is being asked again in the background (so a run is not held up by the refresh, and
        the reads of one run that start together still reach fusion in the same turn of the
        loop). A *pure* verdict past `max_age` is never given: the function it proved pure may
        have been redefined VOLATILE since (`CREATE OR REPLACE`), and sharing on it would hand
        one run's claim to others; the caller waits for the refresh (`effects`). None when
        nothing is kept (never asked, dropped after a schema change, or pure and aged)."""
        entry = self._known.get(text)
        if entry is None:
            return None
        self._maybe_watch()
        if entry[1] <= self._timer():
            if text not in self._flights:
                self._start(text)
            if entry[0].pure:
                return None
        return entry[0]

    def _start(self, text: str) -> asyncio.Future[Effects]:
        flight = self._flights[text] = asyncio.ensure_future(self._resolve(text))
        flight.add_done_callback(lambda _f: self._flights.pop(text, None))
        return flight

    async def effects(self, text: str) -> Effects:
        """The verdict on `text`: kept, or resolved now (once, however many ask at once).
        Never raises for the statement's sake: a statement the server cannot resolve is
        `pure=False`, with the reason, and a WARNING is logged once for it."""
        verdict = self.known(text)
        if verdict is not None:
            self._maybe_watch()
            return verdict
        flight = self._flights.get(text) or self._start(text)
        return await asyncio.shield(flight)

    async def _resolve(self, text: str) -> Effects:
        paths = sorted(self._search_paths()) if self._search_paths is not None else []
        try:
            if len(paths) > 1:
                raise StatementRefused(
                    f"the pool's connections run with different search_paths ({' | '.join(paths)}): a name "
                    "may mean another function on each (the database's search_path changed since some opened)")
            async with self._acquire() as con:
                # Read before the question: a change after it is seen by the next check.
                self._saw(await con.fetchval(_FINGERPRINT))
                verdict = await resolve(con, text, paths[0] if paths else None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = f"could not be resolved on the server ({type(exc).__name__}: {exc})"
            # A statement the server refuses to prepare fails its runs with that error anyway;
            # anything else (no TEMP right, a read-only server...) is a degradation: said once.
            if isinstance(exc, StatementRefused) and len(paths) <= 1:
                logger.debug("statement treated as a write: %s", reason)
            elif text not in self._warned:
                self._warned.add(text)
                logger.warning("statement treated as a write (never shared, cached or sent to a replica): %s: %s",
                               reason, " ".join(text.split())[:200])
            verdict = Effects(pure=False, reasons=(reason,))
            self._keep(text, verdict, RETRY_AFTER)
            return verdict
        self.resolutions += 1
        self._warned.discard(text)
        self._keep(text, verdict, self.max_age)
        return verdict

    def _maybe_watch(self) -> None:
        """Start a check (`watch`) in the background when one is due: it never holds a run up."""
        if self._timer() < self._watch_due or (self._watching is not None and not self._watching.done()):
            return
        self._watch_due = self._timer() + WATCH_S
        self._watching = asyncio.ensure_future(self._watch_quietly())

    async def _watch_quietly(self) -> None:
        try:
            await self.watch()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the next check tries again; verdicts still age out
            logger.debug("could not check the catalog for changes: %s: %s", type(exc).__name__, exc)

    async def watch(self) -> bool:
        """Check now that nothing verdicts rest on changed on the server (`_FINGERPRINT`); when
        something did, forget every verdict (each is asked again at its next use, a pure one
        before its statement is shared again). Returns whether something changed. Done by
        itself every `WATCH_S` while verdicts are used."""
        async with self._acquire() as con:
            seen = await con.fetchval(_FINGERPRINT)
        return self._saw(seen)

    def _saw(self, fingerprint: str) -> bool:
        changed = self._fingerprint is not None and fingerprint != self._fingerprint
        self._fingerprint = fingerprint
        if changed and self._known:
            logger.info("functions, views or policies changed on the server: what each statement does is "
                        "asked again (%d verdicts dropped)", len(self._known))
            self._known.clear()
        return changed

    def _keep(self, text: str, verdict: Effects, age: float) -> None:
        known = self._known
        known.pop(text, None)
        known[text] = (verdict, self._timer() + age)
        while len(known) > MAX_STATEMENTS:
            del known[next(iter(known))]

    async def close(self) -> None:
        """Stop the questions under way; close the connection it asks on, if it has one of its own."""
        watching, self._watching = self._watching, None
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        for flight in list(self._flights.values()):
            flight.cancel()
        await asyncio.gather(*self._flights.values(), return_exceptions=True)
        stop = getattr(self._acquire, "stop", None)
        if stop is not None:
            await stop()

    def forget(self, text: str | None = None) -> None:
        """Ask the catalog again for `text` (every statement when None) at its next use."""
        if text is None:
            self._known.clear()
        else:
            self._known.pop(text, None)


def catalog_of(backend: Backend) -> Catalog | None:
    """A `Catalog` over the primary of planner's stack `backend` (followed through its wrappers'
    `inner`), or None when it ends in a backend of the caller's own.

    It asks on a connection of its own (opened at the first question, to the database the pool
    opened), never one of the pool's: a statement's first run must not wait behind the runs
    that hold the pool, nor take a connection from them. A borrowed pool (`pool=`, no DSN) is
    asked on one of its connections."""
    pool = sys.modules.get("planner.db.pool")  # not loaded: no pool of planner's to find (and asyncpg stays unloaded)
    if pool is None:
        return None
    seen: Backend | None = backend
    while seen is not None and not isinstance(seen, pool.PoolBackend):
        seen = getattr(seen, "inner", None)
    if seen is None:
        return None
    catalog = Catalog(_OwnConnection(seen), search_paths=seen.search_paths)
    seen.verdict = catalog.known  # the pool's "may a stale read run again" is this verdict too
    return catalog


class _OwnConnection:
    """One connection for catalog questions, one question at a time (`Catalog`'s `acquire`),
    closed once no question has been asked for `IDLE_CLOSE` seconds: questions come in bursts
    (a flow's first run, a refresh a minute later), and a process holds its pool and the
    cache's listening connection only between them (docs/service.md's sizing)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.con: Any = None
        self.borrowed: Any = None
        self.lock = asyncio.Lock()
        self.used = 0.0
        self.closer: asyncio.Task[None] | None = None

    def __call__(self) -> _OwnConnection:
        return self

    async def __aenter__(self) -> Any:
        from planner.db.pooler import connect

        await self.lock.acquire()
        try:
            pool = await self.backend.pool()
            dsn = self.backend._connected_dsn
            if dsn is None:  # a borrowed pool: no DSN to open a connection of its own with
                self.borrowed = pool
                self.con = await pool.acquire()
            elif self.con is None or self.con.is_closed():
                self.con = await connect(dsn, pooler=self.backend.pooler)
        except BaseException:
            self.lock.release()
            raise
        return self.con

    async def __aexit__(self, *exc: object) -> None:
        try:
            con = self.con
            if con is None:
                return
            if exc[0] is not None and (isinstance(exc[1], asyncio.CancelledError) or con.is_in_transaction()):
                self.con = None  # in an unknown state (cancelled mid-question): never reused
                if self.borrowed is None:
                    con.terminate()
                else:
                    await self.borrowed.release(con)  # the pool resets or drops it
            elif self.borrowed is not None:
                self.con = None
                await self.borrowed.release(con)
            else:
                self.used = asyncio.get_running_loop().time()
                if self.closer is None or self.closer.done():
                    self.closer = asyncio.get_running_loop().create_task(self._close_when_idle())
        finally:
            self.lock.release()

    async def _close_when_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while self.con is not None:
            await asyncio.sleep(max(0.0, self.used + IDLE_CLOSE - loop.time()))
            if loop.time() >= self.used + IDLE_CLOSE and not self.lock.locked():
                await self.close()

    async def close(self) -> None:
        con, self.con = self.con, None
        if con is not None and self.borrowed is None:
            await con.close()

    async def stop(self) -> None:
        """Close the connection and stop the idle timer (the planner is closing)."""
        closer, self.closer = self.closer, None
        if closer is not None and closer is not asyncio.current_task():
            closer.cancel()
            await asyncio.gather(closer, return_exceptions=True)
        await self.close()


BUILTIN_EFFECTS = """
SELECT DISTINCT proname::text FROM pg_proc
 WHERE pronamespace = 'pg_catalog'::regnamespace AND (provolatile = 'v' OR proparallel = 'u')
 ORDER BY 1
"""
"""The built-in functions `resolve` judges to have effects, by name: what
`planner.lang.builtin_effects` lists for judging statements offline (`python -m planner.db.catalog DSN`
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
    return f'''"""Built-in functions with effects, by name: the offline approximation of `planner.db.catalog`.

Generated by `python -m planner.db.catalog DSN` from PostgreSQL {version}'s catalog (every
`pg_catalog` function with an overload that is volatile or parallel unsafe); checked against
the server's catalog by tests/test_effects.py. `planner.lang.sqlinfo` counts a statement calling one
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
