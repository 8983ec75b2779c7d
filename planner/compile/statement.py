"""The statement of a compiled group: its members' statements as CTEs of one, guarded.

Each member becomes a CTE of its own (`"n:name"`), a `$node.field` reference to another
member a scalar subquery on that member's CTE, and every member's rows come back in one result,
tagged per member (see `planner.compile`). A member's *guard* (its `when:`, the references it
needs, and the members before it that would stop the run) is written into the statement: a
write whose guard is false changes nothing, a read whose guard is false returns no rows.
`translate_when` says a `when:` in SQL; anything it cannot say raises `Untranslatable`, which
keeps the node out of the group (`planner.compile.grouping`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pglast
from pglast import ast, enums
from pglast.stream import RawStream
from pglast.visitors import Visitor

from planner.graph import CompiledFlow
from planner.lang.expr import BoolOp, Compare, Expr, ListOf, Lit, Not, refs_of
from planner.lang.nodes import CompiledNode
from planner.lang.refs import Ref
from planner.lang.sqlinfo import rename_cte


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
        return build(flow, group.number, list(group.nodes), dict(group.split), known)
    except Untranslatable:
        return None


def build(flow: CompiledFlow, number: int, nodes: list[CompiledNode], reasons: dict[str, str],
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
