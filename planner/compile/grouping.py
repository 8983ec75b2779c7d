"""Which SQL nodes of a flow share one statement: the compiled groups, and why each other goes alone.

A node joins a group when it is eligible (one statement, `compile:` not off, no session
change), its statement's `effects_of` (from PostgreSQL's parser) does not touch a table an
earlier member writes, what it waits for outside the group has settled when the statement is
sent, and its `when:` and references can be said in SQL (`planner.compile.statement`).
`compiled_trips` counts what a run sends with the groups. Pure, once per flow version.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pglast
from pglast import ast
from pglast.visitors import Visitor

from planner.compile.statement import CompiledGroup, Untranslatable, build, member_ref, translate_when
from planner.graph import CompiledFlow, Trips
from planner.lang.expr import Not, refs_of
from planner.lang.nodes import CompiledNode

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
        groups.append(build(flow, len(groups) + 1, draft.members, reasons))
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
