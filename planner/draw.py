"""SVG and HTML drawings of a flow, made by planner itself (no Graphviz, no browser JS).

Nodes stand in columns, one per group, left to right; the critical path is drawn in red.
With a run's trace, each node is coloured by its state and a Gantt strip shows when each
node ran. Every node is a `<g data-node=...>` and every edge a `<path data-from data-to>`,
so tests (and scripts) can read the drawing back.

Every string that reaches the page, wherever it came from (the flow file, a trace file), goes
through `_esc`: made `plain` (no control characters XML forbids) and then HTML-escaped, quotes
included, so it is the same text inside an element, an attribute or a `<title>`, in HTML and SVG.
"""

from __future__ import annotations

from html import escape
from typing import Any

from planner.graph import CompiledFlow, Plan
from planner.render import STATE_FILLS, edges, expected_ms, plain, plan_rows, when_text
from planner.trace import RunData

NODE_W, NODE_H = 220, 64
GAP_X, GAP_Y = 90, 22
MARGIN, HEADER = 24, 34
RED, GREY, INK = "#c0392b", "#8a8f98", "#1f2430"
STATE_STROKES = {"ok": "#2e8b57", "defaulted": "#c98a00", "skipped": "#9aa0a6", "failed": RED, "cancelled": "#8e44ad"}
FONT = "font-family:Helvetica,Arial,sans-serif"
ERROR_CHARS = 600  # of an error in a tooltip: enough for asyncpg's DETAIL and HINT


def _esc(text: str, *, lines: bool = False) -> str:
    return escape(plain(text, lines=lines), quote=True)


def _layout(plan: Plan) -> dict[str, tuple[float, float]]:
    positions: dict[str, tuple[float, float]] = {}
    for col, group in enumerate(plan.groups):
        for row, name in enumerate(group):
            positions[name] = (MARGIN + col * (NODE_W + GAP_X), MARGIN + HEADER + row * (NODE_H + GAP_Y))
    return positions


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def svg(flow: CompiledFlow, plan: Plan, run: RunData | None = None) -> str:
    """The graph (and, with a run, its Gantt strip) as a standalone SVG document."""
    pos = _layout(plan)
    tallest = max((len(g) for g in plan.groups), default=1)
    width = MARGIN * 2 + len(plan.groups) * NODE_W + (len(plan.groups) - 1) * GAP_X
    graph_h = MARGIN + HEADER + tallest * (NODE_H + GAP_Y) - GAP_Y + MARGIN
    gantt = _gantt(flow, run, width, graph_h) if run and run.spans else ("", 0)
    height = graph_h + gantt[1] + 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="flow {_esc(flow.name)}">',
        "<defs>",
        f'<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" markerHeight="9" markerUnits="userSpaceOnUse" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{GREY}"/></marker>',
        f'<marker id="arrow-red" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="11" markerHeight="11" markerUnits="userSpaceOnUse" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{RED}"/></marker>',
        "</defs>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    parts += _group_bands(plan, graph_h)
    parts += _edge_paths(flow, plan, pos)
    parts += _node_boxes(flow, plan, pos, run)
    parts.append(_legend(plan, run, graph_h))
    parts.append(gantt[0])
    parts.append("</svg>")
    return "\n".join(p for p in parts if p) + "\n"


def _group_bands(plan: Plan, graph_h: float) -> list[str]:
    out = []
    for col, group in enumerate(plan.groups):
        x = MARGIN + col * (NODE_W + GAP_X) - 10
        out.append(f'<rect x="{x}" y="{MARGIN - 6}" width="{NODE_W + 20}" height="{graph_h - MARGIN}" rx="10" fill="#f5f7fa" stroke="#e3e7ed"/>')
        out.append(f'<text x="{x + 12}" y="{MARGIN + 14}" style="{FONT};font-size:12px;font-weight:600" fill="{GREY}">GROUP {col + 1}'
                   f'<tspan dx="6" font-weight="400">{len(group)} node{"s" if len(group) != 1 else ""}</tspan></text>')
    return out


def _edge_paths(flow: CompiledFlow, plan: Plan, pos: dict[str, tuple[float, float]]) -> list[str]:
    critical = set(zip(plan.critical_path, plan.critical_path[1:], strict=False))
    out = []
    for a, b, ordering in edges(flow):
        (ax, ay), (bx, by) = pos[a], pos[b]
        x1, y1, x2, y2 = ax + NODE_W, ay + NODE_H / 2, bx - 2, by + NODE_H / 2
        bend = max(40.0, (x2 - x1) / 2)
        red = (a, b) in critical
        style = f'stroke="{RED if red else GREY}" stroke-width="{2.6 if red else 1.4}" fill="none"'
        dash = ' stroke-dasharray="5 4"' if ordering else ""
        marker = "arrow-red" if red else "arrow"
        out.append(f'<path data-from="{_esc(a)}" data-to="{_esc(b)}" d="M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}" '
                   f'{style}{dash} marker-end="url(#{marker})"><title>{_esc(a)} → {_esc(b)}{" (after)" if ordering else ""}</title></path>')
    return out


def _node_boxes(flow: CompiledFlow, plan: Plan, pos: dict[str, tuple[float, float]], run: RunData | None) -> list[str]:
    critical = set(plan.critical_path)
    expected = expected_ms(plan)
    spans = {s.node: s for s in run.spans} if run else {}
    out = []
    for name, (x, y) in pos.items():
        node = flow.nodes[name]
        state = run.states.get(name) if run else None
        fill = STATE_FILLS.get(state or "", "#ffffff")
        stroke = RED if name in critical else STATE_STROKES.get(state or "", "#5b6270")
        width = 2.6 if name in critical else 1.3
        rx = 26 if node.kind == "call" else 8
        ms = expected.get(name)
        latency = "" if ms is None else f" · {ms:g} ms"
        when = when_text(flow, name)
        span = spans.get(name)
        lines = [f'<text x="{x + 14}" y="{y + 24}" style="{FONT};font-size:14px;font-weight:700" fill="{INK}">{_esc(_clip(name, 24))}</text>',
                 f'<text x="{x + 14}" y="{y + 42}" style="{FONT};font-size:11.5px" fill="#4a5160">{_esc(node.kind.upper() + latency)}</text>']
        if when:
            lines.append(f'<text x="{x + 14}" y="{y + 57}" style="{FONT};font-size:11px;font-style:italic" fill="#7a5c00">{_esc("when " + _clip(when, 27))}</text>')
        if state:
            took = f" {span.end_ms - span.start_ms:.1f} ms" if span else ""
            lines.append(f'<text x="{x + NODE_W - 10}" y="{y + 42}" text-anchor="end" style="{FONT};font-size:11px;font-weight:600" '
                         f'fill="{STATE_STROKES.get(state, INK)}">{_esc(state + took)}</text>')
        tip = [f"{name} ({node.kind})", *([f"when {when}"] if when else []), *([state] if state else []),
               *([_clip(span.error, ERROR_CHARS)] if span and span.error else [])]
        tip_text = _esc("\n".join(tip), lines=True)
        out.append(f'<g data-node="{_esc(name)}" data-state="{_esc(state or "")}"><title>{tip_text}</title>'
                   f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="{rx}" fill="{fill}" stroke="{stroke}" stroke-width="{width}"/>'
                   + "".join(lines) + "</g>")
    return out


def _legend(plan: Plan, run: RunData | None, graph_h: float) -> str:
    y = graph_h + 18
    text = (f"critical path {' → '.join(plan.critical_path)} · sequential {plan.sequential_ms:g} ms, "
            f"parallel {plan.parallel_ms:g} ms")
    if run:
        text += f" · this run: {run.status} in {run.elapsed_ms:.1f} ms"
    return (f'<line x1="{MARGIN}" y1="{y - 4}" x2="{MARGIN + 22}" y2="{y - 4}" stroke="{RED}" stroke-width="2.6"/>'
            f'<text x="{MARGIN + 30}" y="{y}" style="{FONT};font-size:12px" fill="{INK}">{_esc(text)}</text>')


def _gantt(flow: CompiledFlow, run: RunData, width: float, top: float) -> tuple[str, float]:
    spans = sorted(run.spans, key=lambda s: (s.start_ms, s.node))
    row_h, label_w = 20, 190
    top += 40
    total = max(run.elapsed_ms, max(s.end_ms for s in spans), 0.001)
    scale = (width - MARGIN * 2 - label_w - 60) / total
    out = [f'<text x="{MARGIN}" y="{top}" style="{FONT};font-size:13px;font-weight:700" fill="{INK}">Timeline ({run.elapsed_ms:.1f} ms)</text>']
    base = top + 12
    for tick in range(5):
        t = total * tick / 4
        x = MARGIN + label_w + t * scale
        out.append(f'<line x1="{x}" y1="{base}" x2="{x}" y2="{base + len(spans) * row_h}" stroke="#e3e7ed"/>')
        out.append(f'<text x="{x}" y="{base + len(spans) * row_h + 14}" text-anchor="middle" style="{FONT};font-size:10px" fill="{GREY}">{t:.1f} ms</text>')
    for i, span in enumerate(spans):
        y = base + i * row_h
        x = MARGIN + label_w + span.start_ms * scale
        w = max((span.end_ms - span.start_ms) * scale, 2)
        color = STATE_STROKES.get(span.state, GREY)
        tip = f"{span.node}: {span.state}, {span.start_ms:.2f}–{span.end_ms:.2f} ms" + (f"\n{_clip(span.error, ERROR_CHARS)}" if span.error else "")
        out.append(f'<g data-span="{_esc(span.node)}"><text x="{MARGIN}" y="{y + 14}" style="{FONT};font-size:11.5px" fill="{INK}">{_esc(_clip(span.node, 26))}</text>'
                   f'<rect x="{x}" y="{y + 3}" width="{w}" height="{row_h - 6}" rx="3" fill="{color}" opacity="0.85"><title>{_esc(tip, lines=True)}</title></rect>'
                   f'<text x="{x + w + 5}" y="{y + 14}" style="{FONT};font-size:10.5px" fill="{GREY}">{_esc(f"{span.end_ms - span.start_ms:.1f} ms")}</text></g>')
    return "\n".join(out), 40 + len(spans) * row_h + 30


def html(flow: CompiledFlow, plan: Plan, run: RunData | None = None) -> str:
    """A self-contained page: the SVG, the plan table, and the run's outcome when given."""
    rows = []
    for r in plan_rows(flow, plan):
        cells = [r.node, r.kind, ", ".join(r.waits_for) or "–", r.group, "?" if r.expected_ms is None else f"{r.expected_ms:g}",
                 "●" if r.critical else "", r.when or "", *([run.states.get(r.node, "")] if run else [])]
        rows.append("<tr>" + "".join(f"<td>{_esc(str(c))}</td>" for c in cells) + "</tr>")
    summary: dict[str, Any] = {"sequential": f"{plan.sequential_ms:g} ms", "parallel": f"{plan.parallel_ms:g} ms",
                               "gain": f"{(1 - plan.parallel_ms / plan.sequential_ms) * 100:.0f}% lower" if plan.sequential_ms else "–"}
    description = flow.loaded.spec.description or ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>planner · {_esc(flow.name)}</title>
<style>
body{{margin:0;padding:28px 32px;font-family:Helvetica,Arial,sans-serif;color:{INK};background:#fbfcfd}}
h1{{font-size:22px;margin:0 0 4px}} p.d{{color:#4a5160;margin:0 0 18px;max-width:900px}}
.cards{{display:flex;gap:14px;margin:0 0 18px}} .card{{background:#fff;border:1px solid #e3e7ed;border-radius:10px;padding:10px 16px}}
.card b{{display:block;font-size:20px}} .card span{{color:{GREY};font-size:12px;text-transform:uppercase;letter-spacing:.04em}}
.graph{{background:#fff;border:1px solid #e3e7ed;border-radius:12px;padding:8px;overflow-x:auto}}
table{{border-collapse:collapse;margin-top:18px;font-size:13px;background:#fff}} td,th{{border-bottom:1px solid #e3e7ed;padding:6px 12px;text-align:left}}
th{{color:{GREY};font-weight:600;font-size:12px;text-transform:uppercase}}
</style></head><body>
<h1>{_esc(flow.name)}</h1><p class="d">{_esc(description)}</p>
<div class="cards"><div class="card"><span>groups</span><b>{len(plan.groups)}</b></div>
<div class="card"><span>sequential estimate</span><b>{summary['sequential']}</b></div>
<div class="card"><span>parallel estimate</span><b>{summary['parallel']}</b></div>
<div class="card"><span>expected gain</span><b>{summary['gain']}</b></div>
{f'<div class="card"><span>this run</span><b>{_esc(f"{run.status} · {run.elapsed_ms:.1f} ms")}</b></div>' if run else ''}</div>
<div class="graph">{svg(flow, plan, run)}</div>
<table><thead><tr><th>node</th><th>kind</th><th>waits for</th><th>group</th><th>expected ms</th><th>critical</th><th>when</th>{'<th>state</th>' if run else ''}</tr></thead>
<tbody>{''.join(rows)}</tbody></table>
</body></html>
"""
