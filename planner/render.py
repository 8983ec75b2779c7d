"""Text renderings of a flow: the plan table, Mermaid and DOT. Pure functions, no I/O.

Every string drawn (node names, `when:` text, states, flow names) passes through `plain`
and then the target format's own escaping, so no text can end a label, a statement or a line.
Each renderer is linear in the size of the flow: flows of tens of thousands of nodes are drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from planner.graph import CompiledFlow, Plan

MERMAID_MAX_EDGES = 500
MERMAID_MAX_TEXT = 50_000
STATE_FILLS = {"ok": "#e8f6ec", "defaulted": "#fff4d6", "skipped": "#eeeeee", "failed": "#fde2e1", "cancelled": "#f3e5f5"}


@dataclass(frozen=True)
class PlanRow:
    node: str
    kind: str
    waits_for: tuple[str, ...]
    group: int
    expected_ms: float | None
    critical: bool
    when: str | None


def plain(text: str, *, lines: bool = False) -> str:
    """`text` with nothing a renderer must not pass on: line breaks and tabs become spaces
    (kept with `lines=True`), other unprintable characters (controls, bidi overrides, lone
    surrogates, characters XML forbids) become U+FFFD."""
    if text.isprintable():  # the usual case, checked in C
        return text
    out = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif char in "\n\r\t":
            out.append("\n" if lines and char == "\n" else " ")
        else:
            out.append("\ufffd")
    return "".join(out)


def expected_ms(plan: Plan) -> dict[str, float]:
    """Each node's expected latency, for the nodes that have one (a hint or a record).

    `plan.unknown` is a tuple: asking it once per node made drawing quadratic in nodes.
    """
    unknown = set(plan.unknown)
    return {name: ms for name, ms in plan.latency_ms.items() if name not in unknown}


def plan_rows(flow: CompiledFlow, plan: Plan) -> list[PlanRow]:
    """One row per node, in group order: the table the seed's analysis drew by hand."""
    critical = set(plan.critical_path)
    expected = expected_ms(plan)
    rows = []
    for group in plan.groups:
        for name in group:
            node = flow.nodes[name]
            rows.append(
                PlanRow(
                    node=name,
                    kind=node.kind,
                    waits_for=node.deps,
                    group=flow.group_of[name],
                    expected_ms=expected.get(name),
                    critical=name in critical,
                    when=when_text(flow, name),
                )
            )
    return rows


def when_text(flow: CompiledFlow, name: str) -> str | None:
    """The `when:` of a node as its author wrote it."""
    spec = flow.loaded.spec.nodes[name]
    if spec.when is None or spec.when is True:
        return None
    return str(spec.when).lower() if isinstance(spec.when, bool) else spec.when


def plan_json(flow: CompiledFlow, plan: Plan, source: str) -> dict[str, Any]:
    return {
        "flow": flow.name,
        "latency_source": source,
        "groups": [list(g) for g in plan.groups],
        "critical_path": list(plan.critical_path),
        "sequential_ms": plan.sequential_ms,
        "parallel_ms": plan.parallel_ms,
        "speedup": round(plan.speedup, 3),
        "nodes": [
            {
                "node": r.node,
                "kind": r.kind,
                "waits_for": list(r.waits_for),
                "group": r.group,
                "expected_ms": r.expected_ms,
                "critical": r.critical,
                "when": r.when,
            }
            for r in plan_rows(flow, plan)
        ],
    }


# --- Mermaid ------------------------------------------------------------------------------


class RenderError(ValueError):
    """The graph cannot be drawn in the asked format (say, too many edges for Mermaid)."""


def _mermaid_id(name: str) -> str:
    # Prefixed, so `end`, `o...` and `x...` can never be read as Mermaid keywords or edge heads.
    return "n_" + "".join(c if c.isalnum() or c == "_" else "_" for c in name)


# Mermaid's entity codes. `#` first, or `#quot;` typed by an author would come out as `"`;
# a backtick opens a Markdown string. Labels are already `plain`: no line break ends a statement.
_MERMAID_ESCAPES = str.maketrans({"#": "#35;", "&": "#amp;", '"': "#quot;", "<": "#lt;", ">": "#gt;", "`": "#96;"})


def _mermaid_label(parts: list[str]) -> str:
    return '"' + "<br/>".join(p.translate(_MERMAID_ESCAPES) for p in parts) + '"'


def edges(flow: CompiledFlow) -> list[tuple[str, str, bool]]:
    """(from, to, ordering_only) for every edge of the flow."""
    out = []
    for name, node in flow.nodes.items():
        data = {r.root for r in node.refs}
        for dep in node.deps:
            out.append((dep, name, dep not in data))
    return out


def _node_label(flow: CompiledFlow, expected: dict[str, float], name: str, states: dict[str, str] | None) -> list[str]:
    """The lines of a node's label, each `plain`: the caller escapes them for its format."""
    node = flow.nodes[name]
    ms = expected.get(name)
    parts = [name, node.kind + ("" if ms is None else f" · {ms:g} ms")]
    when = when_text(flow, name)
    if when:
        parts.append(f"when {when}")
    if states and name in states:
        parts.append(states[name])
    return [plain(p) for p in parts]


def mermaid(flow: CompiledFlow, plan: Plan, states: dict[str, str] | None = None) -> str:
    """A Mermaid flowchart: groups as subgraphs left to right, the critical path marked."""
    all_edges = edges(flow)
    if len(all_edges) > MERMAID_MAX_EDGES:
        raise RenderError(f"Mermaid draws at most {MERMAID_MAX_EDGES} edges and this flow has {len(all_edges)}: use --format dot or svg")
    expected = expected_ms(plan)
    lines = ["flowchart LR"]
    for i, group in enumerate(plan.groups, 1):
        lines.append(f'  subgraph g{i}["group {i}"]')
        lines.append("    direction TB")
        for name in group:
            shape = ("[", "]") if flow.nodes[name].kind == "sql" else ("([", "])")
            label = _mermaid_label(_node_label(flow, expected, name, states))
            lines.append(f"    {_mermaid_id(name)}{shape[0]}{label}{shape[1]}")
        lines.append("  end")
    critical = set(zip(plan.critical_path, plan.critical_path[1:], strict=False))
    link_styles = []
    for index, (a, b, ordering) in enumerate(all_edges):
        arrow = "-.->" if ordering else ("==>" if (a, b) in critical else "-->")
        lines.append(f"  {_mermaid_id(a)} {arrow} {_mermaid_id(b)}")
        if (a, b) in critical:
            link_styles.append(str(index))
    lines.append("  classDef critical stroke:#c0392b,stroke-width:3px")
    for state, fill in STATE_FILLS.items():
        lines.append(f"  classDef {state} fill:{fill}")
    if plan.critical_path:
        lines.append("  class " + ",".join(_mermaid_id(n) for n in plan.critical_path) + " critical")
    by_state: dict[str, list[str]] = {}
    for name, state in (states or {}).items():
        if state in STATE_FILLS and name in flow.nodes:  # anything else has no class to name
            by_state.setdefault(state, []).append(name)
    for state in STATE_FILLS:
        if state in by_state:
            lines.append("  class " + ",".join(_mermaid_id(n) for n in by_state[state]) + f" {state}")
    if link_styles:
        lines.append(f"  linkStyle {','.join(link_styles)} stroke:#c0392b,stroke-width:3px")
    text = "\n".join(lines) + "\n"
    if len(text) > MERMAID_MAX_TEXT:
        raise RenderError(f"the Mermaid text is {len(text)} characters, over Mermaid's {MERMAID_MAX_TEXT}: use --format dot or svg")
    return text


# --- DOT ----------------------------------------------------------------------------------


def _dot_str(text: str) -> str:
    # A JSON string is a valid DOT quoted string: `"` and `\` escaped, so no text ends it or
    # becomes one of Graphviz's `\N`/`\G` escapes; a line break becomes the label's `\n`.
    return json.dumps(plain(text, lines=True), ensure_ascii=False)


def dot(flow: CompiledFlow, plan: Plan, states: dict[str, str] | None = None) -> str:
    """Graphviz DOT: one `cluster_` per group (ranked left to right), the critical path in red."""
    critical_nodes = set(plan.critical_path)
    critical = set(zip(plan.critical_path, plan.critical_path[1:], strict=False))
    expected = expected_ms(plan)
    lines = [f"digraph {_dot_str(flow.name)} {{", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=11];']
    for i, group in enumerate(plan.groups, 1):
        lines.append(f"  subgraph cluster_g{i} {{")
        lines.append(f'    label="group {i}"; style="rounded,dashed"; color="#999999";')
        for name in group:
            attrs = {
                "label": "\n".join(_node_label(flow, expected, name, states)),
                "shape": "box" if flow.nodes[name].kind == "sql" else "ellipse",
                "style": "filled" + (",dashed" if when_text(flow, name) else ""),
                "fillcolor": STATE_FILLS.get((states or {}).get(name, ""), "#ffffff"),
            }
            if name in critical_nodes:
                attrs.update(color="#c0392b", penwidth="2.5")
            lines.append(f"    {_dot_str(name)} [" + ", ".join(f"{k}={_dot_str(v)}" for k, v in attrs.items()) + "];")
        lines.append("  }")
    for a, b, ordering in edges(flow):
        edge_attrs = []
        if ordering:
            edge_attrs.append('style="dashed"')
        if (a, b) in critical:
            edge_attrs.append('color="#c0392b", penwidth="2.5"')
        lines.append(f"  {_dot_str(a)} -> {_dot_str(b)}" + (f" [{', '.join(edge_attrs)}]" if edge_attrs else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"
