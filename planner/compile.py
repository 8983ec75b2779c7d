"""Compiling a flow's SQL nodes into the fewest statements its data allows (issue 21).

Connected `sql:` nodes with no `call:` node between them become one statement: each node a
CTE of its own (`"n:name"`), a `$node.field` reference a scalar subquery on that node's CTE,
and every node's rows returned by one result, tagged per node, each column with its own
PostgreSQL type (no json, no arrays): the rows of node k are the rows whose first column is k.

    WITH "n:conversation" AS (UPDATE ... WHERE <guard> RETURNING ...),
         "n:history" AS (SELECT * FROM (<history's SELECT, $conversation.id ->
                          (SELECT "n:conversation".id FROM "n:conversation" LIMIT 1)>) AS "?q" WHERE <guard>)
    SELECT "#k".i, ... FROM (VALUES (0), (1), (2)) AS "#k"(i)
      LEFT JOIN (<each node's guard>) ON i = 0
      LEFT JOIN (SELECT row_number() OVER () AS "#1", * FROM "n:conversation") AS "q1" ON i = 1 ...

A node's *guard* is what decides, inside the statement, whether it runs: its `when:` and the
references it needs, exactly as the executor decides it (`policy.prepare`). A write whose guard
is false changes nothing (the guard is written into its WHERE, or its INSERT's source); a read
whose guard is false returns no rows. Python keeps the last word: the executor still decides
each node's state from the values, and a node the executor runs whose guard was false in the
statement sends its own statement after it (see `planner.run.compiled`).

What may not share a statement splits the group (the next round trip), decided by
`effects_of` from PostgreSQL's parser: a node that reads or writes a table an earlier node of
the group writes (one statement sees one snapshot, and two writes of one table in one
statement are undefined), unless their `when:` exclude each other; a statement list (a
transaction of its own); a statement that may change the session; a call of a function not
known to be a pure built-in; locking reads; a `when:` the translation below cannot say; a
reference whose shape SQL cannot take (a whole row, a list, a field of a field).

`when:` translation (`translate_when`): references to nodes of the group, `and`, `or`, `not`,
`==`/`!=` (as IS [NOT] DISTINCT FROM: null equals null, as in Python), `in`/`not in` a list of
literals, `<`/`<=`/`>`/`>=` against a number literal (and only when the reference is not
null, where Python would raise), literals (bound as parameters). A bare reference is true
only when it is boolean true. A `when:` that refers only to inputs and settled nodes outside
the group is evaluated by Python itself and sent as a boolean parameter. Anything else (a
`when:` that mixes both, a comparison of two lists...) keeps the node out of the group.

Nothing here runs anything: `plan_groups` is pure, called once per flow version.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pglast
from pglast import ast, enums
from pglast.stream import RawStream
from pglast.visitors import Visitor

from planner.graph import CompiledFlow, Trips
from planner.lang.expr import BoolOp, Compare, Expr, ListOf, Lit, Not, refs_of
from planner.lang.nodes import CompiledNode
from planner.lang.refs import Ref
from planner.lang.sqlinfo import rename_cte

__all__ = ["CompiledGroup", "Member", "Param", "compiled_trips", "effects_of", "explain",
           "plan_groups", "translate_when", "variant"]

# Built-in functions that compute a value from their arguments (or the transaction's start
# time) and touch no table: a statement that calls any other function (the user's own, or
# one with effects) is never compiled with others, until the catalog can say what it does.
PURE_FUNCTIONS = frozenset({
    "abs", "age", "array_agg", "array_length", "array_position", "array_to_string", "avg", "bool_and", "bool_or",
    "btrim", "cardinality", "ceil", "ceiling", "char_length", "character_length", "coalesce", "concat", "concat_ws",
    "count", "date_part", "date_trunc", "dense_rank", "every", "extract", "first_value", "floor", "format",
    "generate_series", "greatest", "initcap", "json_agg", "json_build_array", "json_build_object", "jsonb_agg",
    "jsonb_build_array", "jsonb_build_object", "jsonb_extract_path", "jsonb_extract_path_text", "jsonb_typeof",
    "lag", "last_value", "lead", "least", "left", "length", "lower", "lpad", "ltrim", "make_interval", "max", "md5",
    "min", "mod", "now", "nullif", "octet_length", "position", "power", "rank", "regexp_replace", "replace",
    "right", "round", "row_number", "rpad", "rtrim", "split_part", "sqrt", "starts_with", "statement_timestamp",
    "string_agg", "strpos", "substr", "substring", "sum", "timezone", "to_char", "to_json", "to_jsonb",
    "to_timestamp", "transaction_timestamp", "trim", "trunc", "unnest", "upper",
})


@dataclass(frozen=True, slots=True)
class Effects:
    """Which tables a statement reads and writes (by name), or why it cannot be compiled."""

    reads: frozenset[str] = frozenset()
    writes: frozenset[str] = frozenset()
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of a compiled statement: a reference outside the group (an input or a
    settled node), a literal of a `when:`, or a member's guard computed in Python."""

    kind: str  # "ref" | "lit" | "guard"
    ref: Ref | None = None
    value: Any = None
    member: str = ""  # for "guard": the member whose Python-side guard it is


@dataclass(frozen=True, slots=True)
class Member:
    """One node of a compiled group, as the statement serves it."""

    name: str
    index: int  # its tag in the result (1-based)
    fetch: str
    status: str  # for `fetch: none`: the command tag ("UPDATE", "INSERT 0"...)
    external: tuple[Ref, ...]  # references outside the group (checked in Python for the guard)
    python_when: bool  # its `when:` refers to nothing in the group: evaluated in Python


@dataclass(frozen=True)
class CompiledGroup:
    """Nodes of one flow sent as one statement; `text` takes `params` in order."""

    flow: str
    number: int  # 1-based, in the flow's order
    members: tuple[Member, ...]
    text: str
    params: tuple[Param, ...]
    roots: tuple[str, ...]  # members that wait for nothing inside the group
    timeout: float | None  # the smallest of its members'
    split: dict[str, str] = field(default_factory=dict)  # nodes kept out, and why (for `planner explain`)
    nodes: tuple[CompiledNode, ...] = ()  # every member, those the cache answered included
    known: frozenset[str] = frozenset()  # members the cache answered: not in this statement

    @property
    def label(self) -> str:
        return f"{self.flow}#{self.number}"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)


class Untranslatable(ValueError):
    """A node the compiler keeps out of a group; the message says why."""


# --- effects --------------------------------------------------------------------------------

def effects_of(text: str) -> Effects:
    """Tables `text` reads and writes, from PostgreSQL's parser; `refused` when it does more
    than read and write tables (a function that is not a pure built-in, a locking read...)."""
    try:
        tree = pglast.parse_sql(text)
    except pglast.parser.ParseError as exc:
        return Effects(refused=f"does not parse: {exc}")
    if len(tree) != 1:
        return Effects(refused="more than one statement")
    ctes: set[str] = set()
    reads: set[str] = set()
    writes: set[str] = set()
    refused: list[str] = []

    class Walk(Visitor):
        def visit(self, ancestors: object, node: Any) -> None:
            if isinstance(node, ast.CommonTableExpr):
                ctes.add(str(node.ctename))
            elif isinstance(node, ast.RangeVar):
                reads.add(str(node.relname).lower())
            elif isinstance(node, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)):
                target: Any = node.relation
                writes.add(str(target.relname).lower())
            elif isinstance(node, ast.MergeStmt):
                refused.append("MERGE is not compiled")
            elif isinstance(node, ast.FuncCall):
                parts: Any = node.funcname
                name = str(parts[-1].sval).lower()
                schema = str(parts[0].sval).lower() if len(parts) > 1 else "pg_catalog"
                if name not in PURE_FUNCTIONS or schema != "pg_catalog":
                    refused.append(f"calls {'.'.join(str(p.sval) for p in parts)}(), not known to be a "
                                   "pure built-in")
            elif isinstance(node, ast.SelectStmt) and (node.lockingClause or node.intoClause):
                refused.append("locks rows or creates a table (FOR UPDATE, SELECT INTO)")
            elif isinstance(node, ast.RawStmt) or type(node).__name__.endswith("Stmt"):
                if not isinstance(node, (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.RawStmt)):
                    refused.append(f"{type(node).__name__} is not compiled")

    Walk()(tree)
    if refused:
        return Effects(refused=refused[0])
    lowered = {c.lower() for c in ctes}
    return Effects(frozenset(reads - lowered), frozenset(writes), None)


# --- when: translation ----------------------------------------------------------------------

class _When:
    """Translates one `when:` into a SQL condition that is true exactly when Python's is."""

    def __init__(self, members: dict[str, CompiledNode], params: list[Param]) -> None:
        self.members, self.params = members, params
        self.not_null: list[str] = []  # operands of ordering comparisons: null makes Python raise

    def truth(self, tree: Expr) -> str:
        if isinstance(tree, Ref):
            return f"({self.operand(tree)}) IS TRUE"
        if isinstance(tree, Lit):
            return "true" if tree.value else "false"
        if isinstance(tree, Not):
            return f"NOT ({self.truth(tree.operand)})"
        if isinstance(tree, BoolOp):
            joined = f" {tree.op.upper()} ".join(f"({self.truth(o)})" for o in tree.operands)
            return f"({joined})"
        if isinstance(tree, Compare):
            return f"({self.compare(tree)}) IS TRUE"
        raise Untranslatable("a list is not a condition")

    def compare(self, tree: Compare) -> str:
        op, left, right = tree.op, tree.left, tree.right
        if op in ("in", "not in"):
            if not isinstance(right, ListOf) or not all(isinstance(i, Lit) for i in right.items):
                raise Untranslatable("`in` is translated only for a list of literals")
            item = self.operand(left)
            alternatives = [self._equal(item, i) for i in right.items] or ["false"]
            joined = " OR ".join(f"({a})" for a in alternatives)
            return joined if op == "in" else f"NOT (({joined}) IS TRUE)"
        if op in ("==", "!="):
            condition = self._equal(self.operand(left), right)
            return condition if op == "==" else f"NOT (({condition}) IS TRUE)"
        # Ordering: only against a number literal (text order depends on collations, Python's
        # does not), and only for non-null operands (Python raises for null).
        if not (_number(left) or _number(right)) or isinstance(left, ListOf) or isinstance(right, ListOf):
            raise Untranslatable(f"`{op}` is translated only against a number literal")
        a, b = self.operand(left), self.operand(right)
        for side, text in ((left, a), (right, b)):
            if isinstance(side, Ref):
                self.not_null.append(text)
        return f"({a}) {op} ({b})"

    def _equal(self, left: str, right: Expr) -> str:
        if isinstance(right, Lit) and right.value is None:
            return f"({left}) IS NULL"
        return f"({left}) IS NOT DISTINCT FROM ({self.operand(right)})"

    def operand(self, tree: Expr) -> str:
        if isinstance(tree, Ref):
            return member_ref(tree, self.members)
        if isinstance(tree, Lit):
            if tree.value is None:
                return "NULL"
            if isinstance(tree.value, bool):
                return "true" if tree.value else "false"
            self.params.append(Param("lit", value=tree.value))
            return f"${len(self.params)}"
        raise Untranslatable("a list is compared only with `in`")


def translate_when(tree: Expr, members: dict[str, CompiledNode], params: list[Param],
                   raises: list[str] | None = None) -> str:
    """`tree` (whose references all name `members`) as a SQL condition; literals are appended
    to `params` and written as `$n`; the conditions under which Python would raise instead
    (an ordering comparison with null) are appended to `raises`, negated. Raises `Untranslatable`."""
    when = _When(members, params)
    condition = when.truth(tree)
    guards = [f"({t}) IS NOT NULL" for t in when.not_null]
    if raises is not None:
        raises += guards
    return " AND ".join([*guards, f"({condition})"])


def _number(tree: Expr) -> bool:
    return isinstance(tree, Lit) and type(tree.value) in (int, float)


def member_ref(ref: Ref, members: dict[str, CompiledNode]) -> str:
    """A reference to a node of the group, as a scalar subquery on its CTE."""
    node = members[ref.root]
    cte = _ident(f"n:{ref.root}")
    if node.sql.fetch == "one" and len(ref.path) == 1:
        return f"(SELECT {cte}.{_ident(ref.path[0])} FROM {cte} LIMIT 1)"
    if node.sql.fetch == "value" and not ref.path:
        return f'(SELECT {cte}."#v" FROM {cte} LIMIT 1)'
    raise Untranslatable(f"{ref}: only $node.field of a `fetch: one` node or $node of a `fetch: value` node "
                         "is compiled into a reference")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- grouping -------------------------------------------------------------------------------

def eligible(node: CompiledNode, settings_compile: bool) -> str | None:
    """Why `node` can never be part of a compiled group, or None."""
    if not node.sql.statements:
        return "not an SQL node"  # it sends no statement of its own
    if not settings_compile or not node.sql.compile:
        return "compile: false"
    if len(node.sql.statements) != 1:
        return "a statement list is a transaction of its own"
    if node.sql.session:
        return "may change the session"
    return None


def _exclusive(a: CompiledNode, b: CompiledNode) -> bool:
    """Whether the `when:` of `a` and `b` can never both be true: one is `not` of the other,
    on values neither of them changes."""
    if a.when is None or b.when is None:
        return False
    pair = (a.when, b.when)
    for x, y in (pair, pair[::-1]):
        if isinstance(x, Not) and x.operand == y:
            roots = {r.root for r in refs_of(y)}
            return a.name not in roots and b.name not in roots
    return False


@dataclass
class _Draft:
    deps: frozenset[str]  # what its roots wait for (all the same)
    closure: set[str]  # those and everything they wait for: settled when the group starts
    members: list[CompiledNode] = field(default_factory=list)
    effects: dict[str, Effects] = field(default_factory=dict)


def plan_groups(flow: CompiledFlow) -> tuple[CompiledGroup, ...]:
    """The compiled groups of `flow` (two nodes or more each), in the flow's order."""
    return explain(flow)[0]


def explain(flow: CompiledFlow) -> tuple[tuple[CompiledGroup, ...], dict[str, str]]:
    """The compiled groups of `flow`, and why each other SQL node goes alone."""
    reasons: dict[str, str] = {}
    drafts: list[_Draft] = []
    group_of: dict[str, _Draft] = {}
    ancestors = _ancestors(flow)
    for name in flow.order:
        node = flow.nodes[name]
        why = eligible(node, flow.settings.compile)
        effects = effects_of(node.sql.statements[0].text) if why is None else Effects()
        if why is None and effects.refused:
            why = effects.refused
        if why is not None:
            reasons[name] = why
            continue
        inside = {d for d in node.deps if d in group_of}
        draft = group_of[next(iter(inside))] if inside else None
        reason = None
        if draft is not None:
            reason = _joins(node, effects, draft, inside, group_of, flow)
            if reason is not None:
                reasons[name] = reason
                draft = None
        if draft is None:
            # A new group, unless a group whose roots wait for exactly what this one waits for
            # takes it as another root.
            deps = frozenset(node.deps)
            for candidate in drafts:
                if candidate.deps == deps and _joins(node, effects, candidate, set(), group_of, flow) is None:
                    draft = candidate
                    break
        if draft is None:
            draft = _Draft(frozenset(node.deps), set(node.deps) | {a for d in node.deps for a in ancestors[d]})
            drafts.append(draft)
        draft.members.append(node)
        draft.effects[name] = effects
        group_of[name] = draft
    groups: list[CompiledGroup] = []
    for draft in drafts:
        if len(draft.members) < 2:
            reasons.setdefault(draft.members[0].name, "no SQL node it could share a statement with")
            continue
        groups.append(_build(flow, len(groups) + 1, draft.members, reasons))
    alone = {n: r for n, r in reasons.items() if flow.nodes[n].sql.statements
             and not any(n in g.names for g in groups)}
    return tuple(groups), alone


def _ancestors(flow: CompiledFlow) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name in flow.order:
        found[name] = {a for d in flow.nodes[name].deps for a in (d, *found[d])}
    return found


def _joins(node: CompiledNode, effects: Effects, draft: _Draft, inside: set[str],
           group_of: dict[str, _Draft], flow: CompiledFlow) -> str | None:
    """Why `node` cannot join `draft`, or None."""
    members = {m.name: m for m in draft.members}
    for dep in node.deps:
        if dep in members:
            continue
        if dep in group_of:
            return f"waits for {dep}, which another compiled statement serves"
        if dep not in draft.closure:
            return f"waits for {dep}, which may settle after the statement is sent"
    for earlier in draft.members:
        seen = draft.effects[earlier.name]
        touched = (effects.reads | effects.writes) & seen.writes
        if touched and not _exclusive(earlier, node):
            return (f"{'writes' if touched & effects.writes else 'reads'} {', '.join(sorted(touched))}, which "
                    f"{earlier.name} writes: one statement sees one snapshot")
    try:
        _refs_into(node, members)
        if node.when is not None and any(r.root in members for r in refs_of(node.when)):
            if any(r.root not in members for r in refs_of(node.when)):
                raise Untranslatable("its when: mixes nodes of the statement with values outside it")
            translate_when(node.when, members, [])
    except Untranslatable as exc:
        return str(exc)
    return None


def _refs_into(node: CompiledNode, members: dict[str, CompiledNode]) -> None:
    for ref in node.sql.statements[0].params:
        if ref.root in members:
            member_ref(ref, members)
            if members[ref.root].sql.fetch == "none":
                raise Untranslatable(f"{ref}: a command status is not compiled into a reference")


# --- the statement --------------------------------------------------------------------------

def _expr(text: str) -> Any:
    tree: Any = pglast.parse_sql(f"SELECT {text}")[0].stmt
    return tree.targetList[0].val


class _Rewrite(Visitor):
    """Renumber a member's parameters into the group's, refer to group members through their
    CTEs, and give the member's own CTEs names of their own (still read by their old ones)."""

    def __init__(self, mapping: dict[int, str], ctes: set[str], prefix: str) -> None:
        super().__init__()
        self.mapping, self.ctes, self.prefix = mapping, ctes, prefix

    def visit(self, ancestors: object, node: ast.Node) -> ast.Node | None:
        if isinstance(node, ast.ParamRef):
            replacement: ast.Node = _expr(self.mapping[int(node.number or 0)])
            return replacement
        return rename_cte(node, self.ctes, lambda name: self.prefix + name)


def _and(guard: ast.Node, where: ast.Node | None) -> ast.Node:
    if where is None:
        return guard
    return ast.BoolExpr(boolop=enums.BoolExprType.AND_EXPR, args=(guard, where))


def _guard_write(stmt: Any, guard: str) -> None:
    """Make the write `stmt` change nothing unless `guard` is true."""
    condition = _expr(guard)
    if isinstance(stmt, (ast.UpdateStmt, ast.DeleteStmt)):
        stmt.whereClause = _and(condition, stmt.whereClause)
        return
    assert isinstance(stmt, ast.InsertStmt)
    source: Any = stmt.selectStmt
    if source is None:
        raise Untranslatable("INSERT ... DEFAULT VALUES under a condition is not compiled")
    if source.valuesLists:
        if len(source.valuesLists) != 1 or any(isinstance(v, ast.SetToDefault) for v in source.valuesLists[0]):
            raise Untranslatable("a conditional INSERT of several rows (or DEFAULT) is not compiled")
        stmt.selectStmt = ast.SelectStmt(targetList=tuple(ast.ResTarget(val=v) for v in source.valuesLists[0]),
                                         whereClause=condition, limitOption=enums.LimitOption.LIMIT_OPTION_DEFAULT,
                                         op=enums.SetOperation.SETOP_NONE)
        return
    if (source.op == enums.SetOperation.SETOP_NONE and not source.groupClause and not source.havingClause
            and not source.distinctClause and source.limitCount is None and source.limitOffset is None
            and not source.windowClause and source.withClause is None
            and not any(isinstance(n, (ast.FuncCall, ast.SubLink)) for t in source.targetList or ()
                        for n in _walk(t))):
        # A plain SELECT: the guard joins its WHERE, and its parameters keep the types the
        # target columns give them (a subquery would leave them untyped).
        source.whereClause = _and(condition, source.whereClause)
        return
    wrapped: Any = pglast.parse_sql(f'SELECT * FROM (SELECT 1) AS "?s" WHERE {guard}')[0].stmt
    wrapped.fromClause = (ast.RangeSubselect(subquery=source, alias=ast.Alias(aliasname="?s")),)
    stmt.selectStmt = wrapped


def _walk(tree: ast.Node) -> list[ast.Node]:
    found: list[ast.Node] = []

    class _All(Visitor):
        def visit(self, ancestors: object, node: ast.Node) -> None:
            found.append(node)

    _All()(tree)
    return found


def _has_returning(stmt: ast.Node) -> bool:
    returning = getattr(stmt, "returningClause", None)
    return bool(returning is not None and returning.exprs)


def variant(flow: CompiledFlow, group: CompiledGroup, known: frozenset[str]) -> CompiledGroup | None:
    """`group` without the members in `known` (their values came from the cache: references to
    them become parameters); None when fewer than two members are left or it cannot be said."""
    if len(group.nodes) - len(known) < 2:
        return None
    try:
        return _build(flow, group.number, list(group.nodes), dict(group.split), known)
    except Untranslatable:
        return None


def _build(flow: CompiledFlow, number: int, nodes: list[CompiledNode], reasons: dict[str, str],
           known: frozenset[str] = frozenset()) -> CompiledGroup:
    present = [n for n in nodes if n.name not in known]
    members = {m.name: m for m in present}
    params: list[Param] = []
    ctes: list[str] = []
    built: list[Member] = []
    guards: list[str] = []
    stops: list[str] = []  # conditions under which an earlier node failed the run (see below)
    for index, node in enumerate(present, start=1):
        own_stops: list[str] = []
        statement = node.sql.statements[0]
        external = tuple(dict.fromkeys(r for r in (*statement.params, *(refs_of(node.when) if node.when else ()))
                                       if r.root not in members))
        python_when = node.when is not None and not any(r.root in members for r in refs_of(node.when))
        conjuncts: list[str] = []
        if external or python_when:
            params.append(Param("guard", member=node.name))
            conjuncts.append(f"${len(params)}::boolean")
        needs_rows = [r for r in statement.params if r.root in members]
        if node.when is not None and not python_when:
            needs_rows += [r for r in refs_of(node.when) if r.root in members]
        for ref in dict.fromkeys(needs_rows):
            if ref.path or members[ref.root].default is not None:
                conjuncts.append(f'EXISTS (SELECT 1 FROM {_ident("n:" + ref.root)})')
        if node.when is not None and not python_when:
            if any(r.root not in members for r in refs_of(node.when)):
                raise Untranslatable("its when: mixes nodes of the statement with values outside it")
            conjuncts.append(translate_when(node.when, members, params, own_stops))
        conjuncts += stops
        guard = " AND ".join(dict.fromkeys(conjuncts)) or "true"
        # A node that may fail the run (on_error: fail, or the Planner's, unknown here) stops
        # the nodes after it when it fails where the statement does not: without its row when
        # it is `required`, or when Python's `when:` would raise. Those later nodes then write
        # nothing in the statement (the executor runs them alone, if the run goes on).
        if node.on_error != "default":
            if node.sql.required:
                own_stops.append(f'EXISTS (SELECT 1 FROM {_ident("n:" + node.name)})')
            stops += own_stops
        guards.append(guard)
        mapping: dict[int, str] = {}
        for k, ref in enumerate(statement.params, start=1):
            if ref.root in members:
                mapping[k] = member_ref(ref, members)
            else:
                params.append(Param("ref", ref=ref))
                mapping[k] = f"${len(params)}"
        tree = pglast.parse_sql(statement.text)
        stmt: Any = tree[0].stmt
        own = {str(c.ctename) for c in (stmt.withClause.ctes if stmt.withClause else ())}
        prefix = f"{node.name}:"
        _Rewrite(mapping, own, prefix)(tree)
        hoisted = list(stmt.withClause.ctes) if stmt.withClause else []
        stmt.withClause = None
        writes = isinstance(stmt, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt))
        for cte in hoisted:
            inner = cte.ctequery
            if isinstance(inner, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)) and guard != "true":
                _guard_write(inner, guard)
            ctes.append(RawStream()(cte))
        status = "SELECT"
        if writes:
            status = {ast.InsertStmt: "INSERT 0", ast.UpdateStmt: "UPDATE", ast.DeleteStmt: "DELETE"}[type(stmt)]
            if guard != "true":
                _guard_write(stmt, guard)
            if not _has_returning(stmt):
                stmt.returningClause = ast.ReturningClause(exprs=(ast.ResTarget(name="?r", val=_expr("1")),))
            body = RawStream()(stmt)
        else:
            body = RawStream()(stmt)
            if guard != "true":
                body = f'SELECT * FROM ({body}) AS "?q" WHERE {guard}'
        columns = '("#v")' if node.sql.fetch == "value" else ""
        ctes.append(f"{_ident('n:' + node.name)}{columns} AS ({body})")
        built.append(Member(node.name, index, node.sql.fetch, status, external, python_when))
    tags = ", ".join(f"({i})" for i in range(len(built) + 1))
    guard_columns = ", ".join(f'{g} AS "?{m.index}"' for g, m in zip(guards, built, strict=True))
    joins = [f'LEFT JOIN (SELECT {guard_columns}) AS "#g" ON "#k".i = 0']
    order = []
    for m in built:
        alias = _ident(f"q{m.index}")
        joins.append(f'LEFT JOIN (SELECT row_number() OVER () AS "#{m.index}", * FROM {_ident("n:" + m.name)}) '
                     f'AS {alias} ON "#k".i = {m.index}')
        order.append(f'{alias}."#{m.index}"')
    text = (f"WITH {(','+chr(10)).join(ctes)}\nSELECT * FROM (VALUES {tags}) AS \"#k\"(i)\n" + "\n".join(joins)
            + f"\nORDER BY \"#k\".i, coalesce({', '.join(order)})")
    timeouts = [m.timeout for m in present if m.timeout is not None]
    roots = tuple(m.name for m in present if not any(d in members for d in m.deps))
    names = {n.name for n in nodes}
    split = {n: r for n, r in reasons.items() if any(d in names for d in flow.nodes[n].deps)}
    return CompiledGroup(flow.name, number, tuple(built), text, tuple(params), roots,
                         min(timeouts) if timeouts else None, split, tuple(nodes), known)


def compiled_trips(flow: CompiledFlow, groups: Iterable[CompiledGroup], *, warm: bool = False) -> Trips:
    """`graph.trips` with compilation: each compiled group is one statement (one round trip)
    that starts once everything outside it that its nodes wait for has settled."""
    group_of = {m.name: g for g in groups for m in g.members}
    cost: dict[str, int] = {}
    together: dict[tuple[str, ...], list[str]] = {}
    for name in flow.order:
        node = flow.nodes[name]
        if name in group_of or not node.sql.statements or (warm and node.sql.cache_ttl is not None):
            cost[name] = 0
            continue
        cost[name] = len(node.sql.statements) + (2 if len(node.sql.statements) > 1 else 0)
        if node.sql.fuse and node.sql.cache_ttl is None:
            together.setdefault(tuple(sorted(node.deps)), []).append(name)
    fused = tuple(tuple(names) for names in together.values() if len(names) > 1)
    # With the cache warm, a group's cached members are answered before it is sent (a group
    # left with no member sends nothing).
    sent = {id(g): int(any(not (warm and flow.nodes[n].sql.cache_ttl is not None) for n in g.names))
            for g in group_of.values()}
    statements = sum(cost.values()) - sum(len(g) - 1 for g in fused) + sum(sent.values())
    finish: dict[str, int] = {}
    group_finish: dict[int, int] = {}
    for name in flow.order:
        group = group_of.get(name)
        if group is None:
            finish[name] = max((finish[d] for d in flow.nodes[name].deps), default=0) + cost[name]
            continue
        if id(group) not in group_finish:
            outside = {d for m in group.names for d in flow.nodes[m].deps if d not in group.names}
            group_finish[id(group)] = max((finish[d] for d in outside), default=0) + sent[id(group)]
        finish[name] = group_finish[id(group)]
    return Trips(statements, max(finish.values(), default=0), fused)
