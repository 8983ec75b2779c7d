"""Compiling a validated flow into its graph, and planning it. No I/O, no execution.

`compile_flow` turns a `LoadedFlow` into a `CompiledFlow`: every reference parsed, every
dependency derived (plus `after:`), the networkx graph checked for unknown names and cycles,
and the order, groups and successor lists the executor needs precomputed once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import networkx as nx

from planner.config import did_you_mean
from planner.errors import FlowError, FlowFileError, FlowGraphError
from planner.kinds import kind_for_model, kind_of
from planner.lang.expr import Expr, ExprSyntaxError, Lit, refs_of
from planner.lang.expr import parse as parse_expr
from planner.lang.loader import LoadedFlow, unexpected_error
from planner.lang.models import FlowSpec, InputSpec, Settings
from planner.lang.nodes import CompiledNode, RetryPolicy
from planner.lang.refs import Getter, Ref, RefSyntaxError, Template, compile_getter, parse_value
from planner.lang.safeyaml import Marks

MAX_REPLICA_AFTER = 64
"""Distinct statements a node may follow and still read the replica (`replica_routes`)."""


@dataclass(frozen=True, eq=False)  # identity: a Planner keeps what it bound per flow object
class CompiledFlow:
    """A flow compiled once and run many times (see `planner.run.executor`)."""

    name: str
    loaded: LoadedFlow
    inputs: dict[str, InputSpec]
    settings: Settings
    nodes: dict[str, CompiledNode]
    graph: nx.DiGraph
    order: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    group_of: dict[str, int]  # each node's group, counted from 1
    successors: dict[str, tuple[str, ...]]
    indegree: dict[str, int]  # how many dependencies each node waits for
    output: dict[str, Template] | None  # `output:`, one parsed template per key
    output_getters: dict[str, Getter] | None

    @property
    def marks(self) -> Marks:
        return self.loaded.marks


@dataclass(frozen=True)
class Plan:
    """The parallel groups, the critical path, and the latency estimate of a flow."""

    groups: tuple[tuple[str, ...], ...]
    critical_path: tuple[str, ...]
    latency_ms: dict[str, float]
    sequential_ms: float
    parallel_ms: float
    unknown: tuple[str, ...]  # nodes with no latency hint or record (counted as 0)

    @property
    def speedup(self) -> float:
        return self.sequential_ms / self.parallel_ms if self.parallel_ms else 1.0


def compile_flow(loaded: LoadedFlow) -> CompiledFlow:
    """Derive the dependency graph of a validated flow. Raises `FlowGraphError` (or, for
    a malformed reference or expression, `FlowFileError`), never anything else."""
    try:
        spec, marks = loaded.spec, loaded.marks
        nodes: dict[str, CompiledNode] = {}
        for index, (name, node) in enumerate(spec.nodes.items()):
            nodes[name] = _compile_node(name, index, node, spec, marks, loaded.name)
        output: dict[str, Template] | None = None
        if spec.output is not None:
            output = {}
            for key, value in spec.output.items():
                try:
                    output[key] = parse_value(value)
                except RefSyntaxError as exc:
                    raise marks.error(str(exc), ("output", key)) from None
        known = set(spec.inputs) | set(nodes)
        _check_refs(nodes, output, known, loaded)
        _check_invalidates(nodes, loaded)
        graph = nx.DiGraph()
        graph.add_nodes_from(nodes)
        graph.add_edges_from((dep, name) for name, node in nodes.items() for dep in node.deps)
        order = _order(graph, nodes, marks)
        nodes = replica_routes(nodes, order)
        generations = nx.topological_generations(graph)
        groups = tuple(tuple(sorted(g, key=lambda n: nodes[n].index)) for g in generations)
        successors = {name: tuple(graph.successors(name)) for name in nodes}
        return CompiledFlow(
            name=loaded.name,
            loaded=loaded,
            inputs=dict(spec.inputs),
            settings=spec.settings,
            nodes=nodes,
            graph=graph,
            order=order,
            groups=groups,
            group_of={name: i + 1 for i, group in enumerate(groups) for name in group},
            successors=successors,
            indegree={name: len(node.deps) for name, node in nodes.items()},
            output=output,
            output_getters=None if output is None else {k: compile_getter(t.value) for k, t in output.items()},
        )
    except (FlowError, MemoryError):
        raise  # running out of memory is the process's condition, not the file's
    except Exception as exc:  # the backstop: whatever no check caught still names the file
        raise unexpected_error(exc, loaded.marks.file) from exc


def _compile_node(name: str, index: int, node: Any, spec: FlowSpec, marks: Marks, flow: str) -> CompiledNode:
    body = kind_for_model(node).compile(name, node, marks, spec.settings)
    refs: list[Ref] = list(body.refs)
    when: Expr | None = None
    if isinstance(node.when, bool):
        when = Lit(node.when)
    elif isinstance(node.when, str):
        try:
            when = parse_expr(node.when)
        except ExprSyntaxError as exc:
            line, column = marks.inside(("nodes", name, "when"), node.when, exc.offset)
            raise FlowFileError(
                f"when: {exc} (at column {exc.offset + 1} of the expression)",
                file=marks.file, line=line, column=column, node=name, code="PLN120",
            ) from None
        refs.extend(refs_of(when))
    retry = node.retry
    unique_refs = tuple(dict.fromkeys(refs))
    deps = dict.fromkeys([r.root for r in unique_refs if r.root in spec.nodes and r.root != name] + node.after)
    return CompiledNode(
        name=name,
        index=index,
        deps=tuple(deps),
        refs=unique_refs,
        when=when,
        default=node.default,
        on_error=node.on_error or ("fail" if body.sql.required else None) or spec.settings.on_error,
        timeout=node.timeout if node.timeout is not None else spec.settings.node_timeout,
        retry=RetryPolicy(retry.attempts, retry.backoff, retry.on == "any") if retry else RetryPolicy(),
        latency=node.latency,
        flow=flow,
        bug_fails=(node.on_bug or spec.settings.on_bug) == "fail",
        invalidates=tuple(dict.fromkeys(node.invalidates)),
        body=body,
    )


def replica_routes(nodes: dict[str, CompiledNode], order: tuple[str, ...]) -> dict[str, CompiledNode]:
    """`nodes`, with `replica=True` on the reads a read replica may answer (`planner.db.replica`).

    A read may go to the replica unless it says `replica: false`, or one of its ancestors
    (through references and `after:`) may write: its run must read its own writes, which only
    the primary is sure to hold. An SQL node that is not proven read-only may write; so may a
    `call:` node (its function may write through the pool it is given, and which functions do
    is not known when a flow is compiled). A node that a node of its flow `invalidates:` reads
    the primary too: a lagging replica could otherwise put back, in the cache, the value the
    write has just dropped.

    Syntax proves a write, never a read: `SELECT place_order($user)` reads by its syntax and
    writes by its function. So a routed node carries the statements of the SQL nodes it
    follows (`replica_after`), and it reads the replica only once the server's catalog has
    proven each of them pure (`planner.db.catalog`). A node following more than
    `MAX_REPLICA_AFTER` distinct statements reads the primary (bounded work per query).
    """
    invalidated = {target for node in nodes.values() for target in node.invalidates}
    after_write: set[str] = set()
    upstream: dict[str, frozenset[str] | None] = {}  # statements of the nodes it follows; None: too many
    for name in order:  # ancestors first
        # Not proven read-only: an SQL write, or any `call:` node (`read_only` is False for them).
        deps = nodes[name].deps
        if any(dep in after_write or not nodes[dep].sql.read_only for dep in deps):
            after_write.add(name)
            continue
        texts: set[str] | None = set()
        for dep in deps:
            above = upstream.get(dep)
            if above is None or texts is None:
                texts = None
                break
            texts |= above
            texts.update(s.text for s in nodes[dep].sql.statements)
        upstream[name] = None if texts is None or len(texts) > MAX_REPLICA_AFTER else frozenset(texts)
    routed = dict(nodes)
    for name, node in nodes.items():
        sql, after = node.sql, upstream.get(name)
        if (sql.read_only and sql.replica_allowed and after is not None
                and name not in after_write and name not in invalidated):
            routed[name] = replace(node, body=replace(sql, replica=True, replica_after=tuple(sorted(after))))
    return routed


def _check_refs(
    nodes: dict[str, CompiledNode], output: dict[str, Template] | None, known: set[str], loaded: LoadedFlow
) -> None:
    """Refuse references to names that do not exist, and self-references."""
    marks, spec = loaded.marks, loaded.spec
    for name, node in nodes.items():
        in_when = set(refs_of(node.when)) if node.when is not None else set()
        for ref in node.refs:
            where = ("nodes", name, "when" if ref in in_when else kind_of(node.kind).refs_at)
            if ref.root not in known:
                raise _graph_error(marks, _unknown(ref, known), where, name)
            if ref.root == name:
                raise _graph_error(marks, f"{name} -> {name}: a node cannot reference itself", where, name, cycle=[name, name])
        for i, after in enumerate(spec.nodes[name].after):
            if after not in nodes:
                raise _graph_error(marks, f"after: unknown node {after!r}{_suggest(after, nodes)}", ("nodes", name, "after", i), name)
    for key, template in (output or {}).items():
        for ref in template.refs:
            if ref.root not in known:
                raise _graph_error(marks, "output: " + _unknown(ref, known), ("output", key), None)


def _check_invalidates(nodes: dict[str, CompiledNode], loaded: LoadedFlow) -> None:
    """`invalidates:` names nodes of this flow that have `cache:`."""
    marks, spec = loaded.marks, loaded.spec
    cached = {name for name, node in nodes.items() if node.sql.cache_ttl is not None}
    for name in nodes:
        for i, target in enumerate(spec.nodes[name].invalidates):
            where = ("nodes", name, "invalidates", i)
            if target not in nodes:
                raise _graph_error(marks, f"invalidates: unknown node {target!r}{_suggest(target, nodes)}", where, name)
            if target not in cached:
                hint = f"cached nodes: {', '.join(sorted(cached))}" if cached else "no node of this flow has cache:"
                raise _graph_error(marks, f"invalidates: node {target!r} has no cache:, nothing to drop ({hint})",
                                   where, name)


def _unknown(ref: Ref, known: set[str]) -> str:
    return f"unknown reference {ref}: no input or node is named {ref.root!r}{_suggest(ref.root, known)}"


def _suggest(name: str, known: Any) -> str:
    return did_you_mean(name, known)


def _graph_error(
    marks: Marks, message: str, path: tuple[str | int, ...], node: str | None, cycle: list[str] | None = None
) -> FlowGraphError:
    line, column = marks.at(path)
    return FlowGraphError(message, cycle=cycle, file=marks.file, line=line, column=column, node=node, code="PLN200")


def _order(graph: nx.DiGraph, nodes: dict[str, CompiledNode], marks: Marks) -> tuple[str, ...]:
    """Topological order, ties broken by the order of the YAML file (so plans are stable)."""
    try:
        return tuple(nx.lexicographical_topological_sort(graph, key=lambda n: nodes[n].index))
    except nx.NetworkXUnfeasible:
        cycle = [edge[0] for edge in nx.find_cycle(graph)]
        cycle.append(cycle[0])
        first = min(cycle, key=lambda n: nodes[n].index)
        spelled = " -> ".join(cycle)
        raise _graph_error(marks, f"cycle: {spelled}", ("nodes", first), first, cycle=cycle) from None


def plan(flow: CompiledFlow, recorded_ms: dict[str, float] | None = None,
         fused: dict[str, float] | None = None) -> Plan:
    """Groups, critical path and latency estimate, from recorded latencies or `latency:` hints.

    The critical path is the heaviest path through the graph, weighting each node by its
    expected latency: what eager mode needs at least, however many nodes run beside it.
    `fused` says how many nodes shared each node's recorded statement (`views.stats.recorded_fused`):
    the members of a fused group each recorded the one statement's time, which the sequential
    figure counts once (a share each), not once per member.
    """
    recorded_ms = recorded_ms or {}
    fused = fused or {}
    latency: dict[str, float] = {}
    unknown: list[str] = []
    for name, node in flow.nodes.items():
        if name in recorded_ms:
            latency[name] = recorded_ms[name]
        elif node.latency is not None:
            latency[name] = node.latency * 1000
        else:
            latency[name] = 0.0
            unknown.append(name)
    finish: dict[str, float] = {}
    via: dict[str, str | None] = {}
    for name in flow.order:
        deps = flow.nodes[name].deps
        best = max(deps, key=lambda d: finish[d], default=None)
        finish[name] = (finish[best] if best else 0.0) + latency[name]
        via[name] = best
    path: list[str] = []
    step = max(flow.order, key=lambda n: finish[n], default=None)
    while step is not None:
        path.append(step)
        step = via[step]
    return Plan(
        groups=flow.groups,
        critical_path=tuple(reversed(path)),
        latency_ms=latency,
        sequential_ms=sum(ms / max(1.0, fused.get(name, 1.0)) if name in recorded_ms else ms
                          for name, ms in latency.items()),
        parallel_ms=max(finish.values(), default=0.0),
        unknown=tuple(unknown),
    )


@dataclass(frozen=True)
class Trips:
    """What one run of a flow sends at most (every node running, none skipped), by statement."""

    statements: int  # statements sent, fused reads counted once
    critical: int  # round trips on the critical path
    fused_groups: tuple[tuple[str, ...], ...]  # reads that start together and may go as one statement


def trips(flow: CompiledFlow, *, warm: bool = False) -> Trips:
    """Statements and critical-path round trips of one run at most, fusion counted; `warm`
    counts `cache:` nodes as served from the cache (no statement).

    A statement list costs its statements plus BEGIN and COMMIT. Reads fuse when they wait for
    exactly the same nodes (so they start at the same moment), may fuse (`fuse`) and are not
    cached. Nodes whose `when:` excludes each other are both counted: a run sends at most this."""
    cost: dict[str, int] = {}
    together: dict[tuple[str, ...], list[str]] = {}
    for name in flow.order:
        sql = flow.nodes[name].sql
        if not sql.statements or (warm and sql.cache_ttl is not None):
            cost[name] = 0
            continue
        cost[name] = len(sql.statements) + (2 if len(sql.statements) > 1 else 0)
        if sql.fuse and sql.cache_ttl is None:  # a cached read reaches the database a turn later: alone
            together.setdefault(tuple(sorted(flow.nodes[name].deps)), []).append(name)
    groups = tuple(tuple(names) for names in together.values() if len(names) > 1)
    statements = sum(cost.values()) - sum(len(g) - 1 for g in groups)
    finish: dict[str, int] = {}
    for name in flow.order:
        finish[name] = max((finish[d] for d in flow.nodes[name].deps), default=0) + cost[name]
    return Trips(statements, max(finish.values(), default=0), groups)
