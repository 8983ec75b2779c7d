"""What a flow statement does, read from PostgreSQL's own parser (pglast), never from its first word.

`analyze` answers three questions at compile time, once per statement:
- `read_only`: one plain query that writes nothing and locks nothing: no INSERT/UPDATE/DELETE/
  MERGE anywhere (data-modifying CTEs included), no `SELECT ... INTO`, no `FOR UPDATE/SHARE`,
  and no call of a built-in function with effects (`planner.lang.builtin_effects`, generated from
  the catalog). That is necessary, not sufficient: the functions, operators and views it
  uses are judged by the server's catalog before anything is shared (`planner.lang.effects`,
  `planner.db.judge`). `functions` lists the names it calls, as written.
- `session`: whether it may change its connection's session (SET, RESET, set_config,
  SET ROLE, LISTEN, PREPARE, DECLARE, temporary tables, session advisory locks...), in which
  case the connection is reset before anyone else uses it.
- `error`: PostgreSQL's syntax error, with its offset, so `planner validate` finds it offline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pglast
from pglast import ast, enums
from pglast.parser import parse_sql_json
from pglast.stream import RawStream
from pglast.visitors import Visitor

from planner.lang.builtin_effects import BUILTIN_EFFECTS

# Those that change the session itself (the connection must be reset after them).
_SESSION_FUNCTIONS = frozenset({"set_config", "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
                                "pg_try_advisory_lock_shared", "setseed", "nextval", "setval"})
_WRITES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)


@dataclass(frozen=True, slots=True)
class SqlInfo:
    """What `analyze` found in one statement (see the module): the defaults are the safe answer
    for a statement it could not read (not read-only, no session change known)."""

    read_only: bool = False
    session: bool = False
    functions: frozenset[str] = field(default_factory=frozenset)
    error: str | None = None
    error_offset: int | None = None


_WRITE_NAMES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_SESSION_NAMES = frozenset({"VariableSetStmt", "ListenStmt", "PrepareStmt", "DeclareCursorStmt", "DiscardStmt",
                            "LoadStmt", "LockStmt", "DoStmt", "CallStmt"})


def analyze(text: str) -> SqlInfo:
    """Analyse one compiled statement (`$1..$n` parameters). Never raises for bad SQL: a syntax
    error is reported in `.error` (and the statement is treated as neither read-only nor safe).

    It walks the parser's JSON form (dicts built in C) rather than pglast's node objects:
    a 5,000-node flow compiles several times faster that way."""
    try:
        tree = json.loads(parse_sql_json(text))
    except pglast.parser.ParseError as exc:
        message = str(exc.args[0]) if exc.args else str(exc)
        offset = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
        return SqlInfo(session=True, error=message, error_offset=offset)
    statements = [s.get("stmt", {}) for s in tree.get("stmts", [])]
    writes = session = effectful = False
    functions: set[str] = set()
    stack: list[Any] = list(statements)
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        for name, body in item.items():
            if name in _WRITE_NAMES:
                writes = True
            elif name in _SESSION_NAMES:
                session = True
                writes = writes or name in ("DoStmt", "CallStmt", "LockStmt")
            elif name == "SelectStmt" and isinstance(body, dict):
                into = body.get("intoClause")
                if into is not None or body.get("lockingClause"):
                    writes = True
                if into is not None and into.get("rel", {}).get("relpersistence") == "t":
                    session = True
            elif name in ("CreateStmt", "CreateTableAsStmt") and isinstance(body, dict):
                writes = True
                rel = body.get("relation") if name == "CreateStmt" else (body.get("into") or {}).get("rel")
                session = session or (rel or {}).get("relpersistence") == "t"
            elif name == "FuncCall" and isinstance(body, dict):
                parts = [str(p.get("String", {}).get("sval", "")) for p in body.get("funcname", [])]
                function = parts[-1] if parts else ""
                functions.add(".".join(parts))
                # The offline approximation of the catalog's verdict (`planner.db.judge`): a
                # built-in it lists as having effects, called by its name or as pg_catalog's.
                if function in BUILTIN_EFFECTS and (len(parts) == 1 or parts[0] == "pg_catalog"):
                    effectful = True
                    if function in _SESSION_FUNCTIONS or (function.startswith(("pg_advisory", "pg_try_advisory"))
                                                          and "xact" not in function):
                        session = True
            elif name.endswith("Stmt") and name not in ("SelectStmt", "RawStmt"):
                writes = True  # DDL, COPY, VACUUM...: not a read
            if isinstance(body, (dict, list)):
                stack.append(body)
    single = len(statements) == 1 and "SelectStmt" in statements[0]
    return SqlInfo(read_only=single and not writes and not effectful, session=session, functions=frozenset(functions))


def combine_writes(text: str, members: int, *, first_row: bool = False) -> str | None:
    """One statement that runs the write `text` once per member, every member's parameters
    numbered after the previous member's ($1..$k for the first, $k+1..$2k for the second...),
    and returns each member's rows tagged with its 1-based ordinal in a first column `?ord`
    (only its first row with `first_row`: a `fetch: one`/`value` member sends no more, as alone).

    Each member's own CTEs are hoisted to the top under names of their own (`found` becomes
    `found__m2`, still read as `found` inside), its main statement becomes the CTE `r__m2`, and
    the result is their `UNION ALL`. None when `text` cannot be combined: no rows returned
    (a write without RETURNING), a recursive or nested WITH, more than one statement, or a
    write whose target rows cannot be named (`WHERE CURRENT OF`, MERGE's `NOT MATCHED BY
    SOURCE`).

    Members must never change the same row: in one statement every part reads one snapshot,
    and a row changed by one member is skipped by the next (an increment lost, a run answered
    `None`), which no order of separate statements could give. So each UPDATE, DELETE and MERGE of
    each member (in its CTEs or its main statement) also names its target rows, `(tableoid,
    ctid)` as the statement's snapshot sees them, in the CTE `?targets`; when two members name
    one row, `?overlap` has two rows or more and reading it as one value fails the statement
    (21000, cardinality violation) before anything is committed: the members are then sent one
    by one (`PoolBackend._write_batch_on`). An INSERT ... ON CONFLICT DO UPDATE that meets a row
    another member changed fails on its own (21000 too); plain inserts that collide fail on
    their unique key.
    """
    pieces: list[str] = []
    selects: list[str] = []
    targets: list[str] = []
    for i in range(members):
        tree = pglast.parse_sql(text)
        if len(tree) != 1:
            return None
        stmt: Any = tree[0].stmt
        if stmt is None or not _returns_rows(stmt) or not _plain_with(stmt):
            return None
        offset = i * _param_count(stmt)
        ctes = list(stmt.withClause.ctes or ()) if stmt.withClause else []
        names = {str(cte.ctename) for cte in ctes}
        _Renumber(offset, names, f"__m{i + 1}")(tree)
        for write in [cte.ctequery for cte in ctes] + [stmt]:
            if isinstance(write, (ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)):
                target = _targets(write, i + 1)
                if target is None:
                    return None
                targets.append(target)
        if ctes:
            pieces += [RawStream()(cte) for cte in ctes]
            stmt.withClause = None
        pieces.append(f'"r__m{i + 1}" AS ({RawStream()(stmt)})')
        selects.append(f'SELECT {i + 1} AS "?ord", * FROM "r__m{i + 1}"')
    if targets and members > 1:
        # Each member's targets once (an UPDATE ... FROM may join one row several times), then
        # the rows named by more than one member: none, or at least two rows.
        pieces.append(f'"?targets" AS ({" UNION ALL ".join(targets)})')
        pieces.append('"?overlap" AS (SELECT "?m" FROM (SELECT "?m", count(*) OVER (PARTITION BY "?o", "?c") AS "?n" '
                      'FROM (SELECT DISTINCT "?m", "?o", "?c" FROM "?targets") AS "?d") AS "?w" WHERE "?n" > 1)')
        # Read where it is always evaluated: the first branch's one-time filter, before its first row.
        selects[0] += ' WHERE (SELECT "?m" FROM "?overlap") IS NULL'
    if first_row:
        selects = [f"({select} LIMIT 1)" for select in selects]
    return f"WITH {', '.join(pieces)} {' UNION ALL '.join(selects)}"


def _targets(write: ast.UpdateStmt | ast.DeleteStmt | ast.MergeStmt, member: int) -> str | None:
    """`SELECT member AS "?m", t.tableoid AS "?o", t.ctid AS "?c" FROM ... WHERE ...`: the rows
    the UPDATE, DELETE or MERGE `write` would change (a superset for MERGE: every matched row,
    whatever its WHEN conditions), or None when they cannot be named so."""
    relation: Any = write.relation
    alias = relation.alias.aliasname if relation.alias is not None else relation.relname
    ref = '"' + str(alias).replace('"', '""') + '"'
    head = f'SELECT {member} AS "?m", {ref}.tableoid AS "?o", {ref}.ctid AS "?c" FROM {RawStream()(relation)}'
    if isinstance(write, ast.MergeStmt):
        if any(c.matchKind == enums.MergeMatchKind.MERGE_WHEN_NOT_MATCHED_BY_SOURCE for c in write.mergeWhenClauses or ()):
            return None  # it changes rows that match nothing: any row of the table
        source: Any = write.sourceRelation
        condition: Any = write.joinCondition
        return f"{head} JOIN {RawStream()(source)} ON {RawStream()(condition)}"
    others = write.fromClause if isinstance(write, ast.UpdateStmt) else write.usingClause
    where: Any = write.whereClause
    if isinstance(where, ast.CurrentOfExpr):
        return None
    joined = "".join(f", {RawStream()(item)}" for item in others or ())
    return f"{head}{joined}" + (f" WHERE {RawStream()(where)}" if where is not None else "")


def _returns_rows(stmt: ast.Node) -> bool:
    if isinstance(stmt, ast.SelectStmt):
        return True
    if not isinstance(stmt, _WRITES):
        return False
    # pglast 7 (PostgreSQL 17) has `returningList`; pglast 8 (PostgreSQL 18) a `returningClause`.
    returning = getattr(stmt, "returningClause", None)
    return bool(getattr(returning, "exprs", None) if returning is not None else getattr(stmt, "returningList", None))


def _plain_with(stmt: ast.Node) -> bool:
    """Only the top-level WITH may define names (a nested one could shadow a renamed CTE)."""
    top = getattr(stmt, "withClause", None)
    if top is not None and top.recursive:
        return False
    nested = [n for _, n in _nodes(stmt) if isinstance(n, ast.WithClause) and n is not top]
    return not nested


def _param_count(stmt: ast.Node) -> int:
    return max((int(n.number or 0) for _, n in _nodes(stmt) if isinstance(n, ast.ParamRef)), default=0)


def _nodes(tree: ast.Node) -> list[tuple[object, ast.Node]]:
    found: list[tuple[object, ast.Node]] = []

    class _All(Visitor):
        def visit(self, ancestors: object, node: ast.Node) -> None:
            found.append((ancestors, node))

    _All()(tree)
    return found


class _Renumber(Visitor):
    """Shift parameter numbers by `offset`; give the CTEs in `names` the suffix, keeping the
    old name as the alias so that `found.id` still means what it meant."""

    def __init__(self, offset: int, names: set[str], suffix: str) -> None:
        super().__init__()
        self.offset, self.names, self.suffix = offset, names, suffix

    def visit(self, ancestors: object, node: ast.Node) -> ast.Node | None:
        if isinstance(node, ast.ParamRef):
            return ast.ParamRef(number=int(node.number or 0) + self.offset, location=node.location)
        return rename_cte(node, self.names, lambda name: name + self.suffix)


def rename_cte(node: ast.Node, names: set[str], rename: Callable[[str], str]) -> ast.Node | None:
    """The step of a visitor that gives the CTEs in `names` new names (a statement's own CTEs,
    hoisted beside others' into one statement): a reference becomes one to the new name, aliased
    by the old, so that `found.id` still means what it meant; a definition takes the new name.
    A replacement node, or None (changed in place, or nothing to change)."""
    if isinstance(node, ast.RangeVar) and node.schemaname is None and node.relname in names:
        return ast.RangeVar(relname=rename(node.relname), inh=node.inh, relpersistence=node.relpersistence,
                            alias=node.alias or ast.Alias(aliasname=node.relname), location=node.location)
    if isinstance(node, ast.CommonTableExpr) and node.ctename in names:
        node.ctename = rename(node.ctename)
    return None
