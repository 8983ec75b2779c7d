"""SVG and HTML drawings of a flow, made by planner itself (no Graphviz, no browser JS).

Nodes stand in columns, one per group, left to right; the critical path is drawn in red (a
traced run's, through its actual finish times, when a trace is given). With a run's trace,
each node is coloured by its state, says why it failed, defaulted or was skipped, and a Gantt
strip shows when each node ran. Every node is a `<g data-node=...>` and every edge a
`<path data-from data-to>`, so tests (and scripts) can read the drawing back.

Where things go is worked out first, as data (`layout`: the boxes and each edge's polyline),
and the SVG is drawn from it. An edge between neighbouring columns crosses the gap between
them; an edge that skips columns leaves its source into that gap, runs along a lane between
two rows of boxes (rows line up across columns, and a gap grows when it holds more lanes), and
comes down to its target in the gap before the target's column. So no edge passes under a box:
each piece of a polyline, with the curve drawn for it, stays inside the box its two points
span, and that box meets no node's box (`tests/views/test_layout.py` checks it on random graphs).

Every string that reaches the page, wherever it came from (the flow file, a trace file), goes
through `_esc`: made `plain` (no control characters XML forbids) and then HTML-escaped, quotes
included, so it is the same text inside an element, an attribute or a `<title>`, in HTML and SVG.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from html import escape

from planner.graph import CompiledFlow, Plan
from planner.kinds import kind_of
from planner.views.render import (
    NO_LATENCY,
    STATE_FILLS,
    Picture,
    clip,
    edges,
    ms_number,
    ms_text,
    picture,
    plain,
    plan_rows,
    when_text,
)
from planner.views.trace import RunData

NODE_W, NODE_H, NODE_H_RUN = 220, 64, 80  # a run adds a line: the node's outcome
GAP_X, GAP_Y = 90, 22
LANE_STEP = 7  # between two lanes in one gap between rows
LANE_INSET = 8  # a lane starts this far before the first column it crosses
MARGIN, HEADER = 24, 34
MIN_WIDTH = 640  # the legend and the Gantt strip need room, however few the columns
RED, GREY, INK = "#c0392b", "#8a8f98", "#1f2430"
STATE_STROKES = {"ok": "#2e8b57", "defaulted": "#c98a00", "skipped": "#9aa0a6", "failed": RED, "cancelled": "#8e44ad"}
FONT = "font-family:Helvetica,Arial,sans-serif"
ERROR_CHARS = 600  # of an error in a tooltip: enough for asyncpg's DETAIL and HINT
CHAR_W = 6.6  # about the width of a 12px Helvetica character, to wrap the legend
NOTE_CHARS = 34  # of an error or reason on one line of a box (11px): the tooltip and the table have it whole

Point = tuple[float, float]


def _esc(text: str, *, lines: bool = False) -> str:
    return escape(plain(text, lines=lines), quote=True)


# --- the layout, as data ----------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A node's rectangle: `column` is its group (from 0), `row` its place in it."""

    node: str
    column: int
    row: int
    x: float
    y: float
    w: float
    h: float

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + self.h


@dataclass(frozen=True)
class Route:
    """An edge's polyline, from a point on the right side of its source's box to one just left
    of its target's. Two points at one height are joined by a straight line, other pairs by a
    curve that stays inside the rectangle they span (see `path_d`)."""

    source: str
    target: str
    ordering: bool  # `after:` only: no data flows along it
    points: tuple[Point, ...]
    lane: tuple[int, int] | None = None  # (gap between rows, lane in it) of an edge that skips columns


@dataclass(frozen=True)
class Layout:
    """Where `layout` put every box and edge of a flow, and the size of the drawing."""

    boxes: dict[str, Box]
    routes: list[Route]
    columns: int
    width: float
    height: float  # of the graph, bands and margins included (the legend and Gantt go below)


def layout(flow: CompiledFlow, plan: Plan, node_h: float = NODE_H) -> Layout:
    """Where every box and edge goes. Linear in nodes and edges (but for a search of a few
    gaps per edge that skips columns)."""
    groups = plan.groups
    rows = max((len(g) for g in groups), default=1)
    place = {name: (col, row) for col, group in enumerate(groups) for row, name in enumerate(group)}
    all_edges = edges(flow)

    # Edges that skip columns get a lane in a gap between rows: gap k lies below row k - 1
    # (k = rows: below every box), so it is free of boxes in every column. The gap nearest
    # the two ends, then the first lane in it free over the strips the edge crosses.
    skips = sorted(((place[a][0], place[b][0], i) for i, (a, b, _) in enumerate(all_edges) if place[b][0] - place[a][0] > 1))
    lanes_end: dict[int, list[int]] = {}  # per gap: the last strip each lane is taken to
    lane_of: dict[int, tuple[int, int]] = {}
    for col_a, col_b, i in skips:
        a, b, _ = all_edges[i]
        middle = (place[a][1] + place[b][1]) / 2 + 0.5
        best: tuple[float, int, int] | None = None
        for k in range(max(1, math.floor(middle) - 2), min(rows, math.ceil(middle) + 2) + 1):
            taken = lanes_end.get(k, [])
            free = next((s for s, end in enumerate(taken) if end < col_a), len(taken))
            cost = abs(k - middle) + (0.3 if free == len(taken) and taken else 0.0)
            if best is None or cost < best[0]:
                best = (cost, k, free)
        assert best is not None
        _, k, free = best
        taken = lanes_end.setdefault(k, [])
        if free == len(taken):
            taken.append(col_b - 1)
        else:
            taken[free] = col_b - 1
        lane_of[i] = (k, free)

    # Rows line up across columns; a gap is as tall as its lanes need.
    gap_h = {k: max(GAP_Y if k < rows else 0, (len(lanes_end[k]) + 1) * LANE_STEP if k in lanes_end else 0)
             for k in range(1, rows + 1)}
    row_y = [float(MARGIN + HEADER)]
    for r in range(1, rows):
        row_y.append(row_y[-1] + node_h + gap_h[r])
    col_x = [float(MARGIN + c * (NODE_W + GAP_X)) for c in range(len(groups))]
    boxes = {name: Box(name, col, row, col_x[col], row_y[row], NODE_W, node_h) for name, (col, row) in place.items()}

    def lane_y(k: int, s: int) -> float:
        top = row_y[k - 1] + node_h
        return round(top + gap_h[k] * (s + 1) / (len(lanes_end[k]) + 1), 1)  # as drawn (`path_d`)

    # Ports: a box's edges leave its right side (and reach its left side) spread over its
    # height, in the order of where they head, so that they do not cross at the box.
    heading: dict[int, float] = {}  # the height each edge leaves its source towards
    coming: dict[int, float] = {}  # the height each edge comes to its target from
    for i, (a, b, _) in enumerate(all_edges):
        if i in lane_of:
            heading[i] = coming[i] = lane_y(*lane_of[i])
        else:
            heading[i] = boxes[b].y + node_h / 2
            coming[i] = boxes[a].y + node_h / 2
    outs: dict[str, list[int]] = {}
    ins: dict[str, list[int]] = {}
    for i, (a, b, _) in enumerate(all_edges):
        outs.setdefault(a, []).append(i)
        ins.setdefault(b, []).append(i)
    out_y: dict[int, float] = {}
    in_y: dict[int, float] = {}
    for ports, side, key in ((outs, out_y, heading), (ins, in_y, coming)):
        for name, indexes in ports.items():
            box = boxes[name]
            indexes.sort(key=lambda i: (key[i], i))
            for n, i in enumerate(indexes):
                side[i] = round(box.y + box.h * (n + 1) / (len(indexes) + 1), 1)

    routes = []
    for i, (a, b, ordering) in enumerate(all_edges):
        start, end = (boxes[a].right, out_y[i]), (boxes[b].x - 2, in_y[i])
        if i in lane_of:
            y = lane_y(*lane_of[i])
            first = col_x[place[a][0] + 1] - LANE_INSET
            last = col_x[place[b][0] - 1] + NODE_W + LANE_INSET
            routes.append(Route(a, b, ordering, (start, (first, y), (last, y), end), lane_of[i]))
        else:
            routes.append(Route(a, b, ordering, (start, end)))
    width = max(MARGIN * 2 + len(groups) * NODE_W + max(len(groups) - 1, 0) * GAP_X, MIN_WIDTH)
    bottom = row_y[-1] + node_h + gap_h.get(rows, 0)
    return Layout(boxes, routes, len(groups), width, bottom + MARGIN)


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def path_d(points: tuple[Point, ...]) -> str:
    """The SVG path of a polyline: straight where two points are at one height, else a curve
    leaving and reaching them level, whose control points lie in the rectangle the two points
    span (so the curve does too: a Bézier curve stays in the hull of its control points)."""
    (x0, y0), rest = points[0], points[1:]
    out = [f"M{_num(x0)},{_num(y0)}"]
    for x1, y1 in rest:
        if y1 == y0:
            out.append(f"L{_num(x1)},{_num(y1)}")
        else:
            mid = _num((x0 + x1) / 2)
            out.append(f"C{mid},{_num(y0)} {mid},{_num(y1)} {_num(x1)},{_num(y1)}")
        x0, y0 = x1, y1
    return " ".join(out)


# --- drawing ----------------------------------------------------------------------------------


def svg(flow: CompiledFlow, plan: Plan, run: RunData | None = None, *, recorded: Mapping[str, float] | None = None) -> str:
    """The graph (and, with a run, its Gantt strip) as a standalone SVG document.

    `recorded` is the recorded latencies the plan was made with, to say where figures come from."""
    return _svg(picture(flow, plan, run, recorded))


def _svg(pic: Picture) -> str:
    run = pic.run
    lay = layout(pic.flow, pic.plan, NODE_H_RUN if run else NODE_H)
    width, graph_h = lay.width, lay.height
    legend, legend_h = _legend(pic, width, graph_h)
    gantt = _gantt(pic, run, width, graph_h + legend_h) if run and run.spans else ("", 0.0)
    height = graph_h + legend_h + gantt[1] + 16
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(width)}" height="{_num(height)}" viewBox="0 0 {_num(width)} {_num(height)}" '
        f'role="img" aria-label="flow {_esc(pic.flow.name)}">',
        "<defs>",
        f'<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" markerHeight="9" markerUnits="userSpaceOnUse" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{GREY}"/></marker>',
        f'<marker id="arrow-red" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="11" markerHeight="11" markerUnits="userSpaceOnUse" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{RED}"/></marker>',
        "</defs>",
        f'<rect width="{_num(width)}" height="{_num(height)}" fill="#ffffff"/>',
    ]
    parts += _group_bands(pic.plan, lay)
    parts += _edge_paths(pic, lay)
    parts += _node_boxes(pic, lay)
    parts.append(legend)
    parts.append(gantt[0])
    parts.append("</svg>")
    return "\n".join(p for p in parts if p) + "\n"


def _group_bands(plan: Plan, lay: Layout) -> list[str]:
    out = []
    for col, group in enumerate(plan.groups):
        x = MARGIN + col * (NODE_W + GAP_X) - 10
        out.append(f'<rect x="{x}" y="{MARGIN - 6}" width="{NODE_W + 20}" height="{_num(lay.height - MARGIN)}" rx="10" fill="#f5f7fa" stroke="#e3e7ed"/>')
        out.append(f'<text x="{x + 12}" y="{MARGIN + 14}" style="{FONT};font-size:12px;font-weight:600" fill="{GREY}">GROUP {col + 1}'
                   f'<tspan dx="6" font-weight="400">{len(group)} node{"s" if len(group) != 1 else ""}</tspan></text>')
    return out


def _edge_paths(pic: Picture, lay: Layout) -> list[str]:
    critical = set(zip(pic.critical_path, pic.critical_path[1:], strict=False))
    plain_edges: list[str] = []
    red_edges: list[str] = []
    for route in lay.routes:
        a, b = route.source, route.target
        red = (a, b) in critical
        style = f'stroke="{RED if red else GREY}" stroke-width="{2.6 if red else 1.4}" fill="none"'
        dash = ' stroke-dasharray="5 4"' if route.ordering else ""
        marker = "arrow-red" if red else "arrow"
        (red_edges if red else plain_edges).append(
            f'<path data-from="{_esc(a)}" data-to="{_esc(b)}" d="{path_d(route.points)}" '
            f'{style}{dash} marker-end="url(#{marker})"><title>{_esc(a)} → {_esc(b)}{" (after)" if route.ordering else ""}</title></path>')
    return plain_edges + red_edges  # the critical path on top


def _node_boxes(pic: Picture, lay: Layout) -> list[str]:
    flow, run = pic.flow, pic.run
    critical = set(pic.critical_path)
    expected, origin = pic.estimate.expected, pic.estimate.origin
    spans = {s.node: s for s in run.spans} if run else {}
    out = []
    for name, box in lay.boxes.items():
        x, y = box.x, box.y
        node = flow.nodes[name]
        state = run.states.get(name) if run else None
        fill = STATE_FILLS.get(state or "", "#ffffff")
        stroke = RED if name in critical else STATE_STROKES.get(state or "", "#5b6270")
        width = 2.6 if name in critical else 1.3
        rx = 26 if kind_of(node.kind).shape == "round" else 8
        ms = expected.get(name)
        latency = "" if ms is None else f" · {ms_text(ms)}"
        when = when_text(flow, name)
        span = spans.get(name)
        note = pic.outcomes.get(name)
        lines = [f'<text x="{x + 14}" y="{y + 24}" style="{FONT};font-size:14px;font-weight:700" fill="{INK}">{_esc(clip(name, 24))}</text>',
                 f'<text x="{x + 14}" y="{y + 42}" style="{FONT};font-size:11.5px" fill="#4a5160">{_esc(node.kind.upper() + latency)}</text>']
        line_y = y + 57
        if when:
            lines.append(f'<text x="{x + 14}" y="{line_y}" style="{FONT};font-size:11px;font-style:italic" fill="#7a5c00">'
                         f'<title>{_esc("when " + when, lines=True)}</title>{_esc("when " + clip(when, 28))}</text>')
            line_y += 15
        if state:
            took = f" {ms_text(span.end_ms - span.start_ms)}" if span else ""
            lines.append(f'<text x="{x + NODE_W - 10}" y="{y + 42}" text-anchor="end" style="{FONT};font-size:11px;font-weight:600" '
                         f'fill="{STATE_STROKES.get(state, INK)}">{_esc(state + took)}</text>')
        # the outcome on the box, in the lines left (a cancelled node's state says it all; a
        # `when:` shown just above says why a node was skipped when the trace could not)
        if note and state != "cancelled" and not (when and note.startswith("skipped (when:")):
            shown = note.partition(": ")[2] if state in ("failed", "defaulted") and ": " in note else note
            room = max(int((y + box.h - line_y) // 15) + 1, 1)
            wrapped = textwrap.wrap(" ".join(plain(shown).split()), NOTE_CHARS) or [""]
            if len(wrapped) > room:
                wrapped = [*wrapped[: room - 1], clip(" ".join(wrapped[room - 1:]), NOTE_CHARS)]
            for k, text in enumerate(wrapped):
                lines.append(f'<text x="{x + 14}" y="{line_y + 15 * k}" style="{FONT};font-size:11px" fill="{STATE_STROKES.get(state or "", INK)}">'
                             f'<title>{_esc(_clip_error(note), lines=True)}</title>{_esc(text)}</text>')
        latency_tip = (f"expected {ms_text(ms)} ({'median of recorded runs' if origin.get(name) == 'recorded' else 'latency: hint'})"
                       if ms is not None else "no latency hint or record")
        tip = [f"{name} ({node.kind})", latency_tip, *([f"when {when}"] if when else []),
               *([state + (f", {ms_text(span.end_ms - span.start_ms)}" if span else "")] if state else []),
               *([_clip_error(note)] if note else [])]
        tip_text = _esc("\n".join(tip), lines=True)
        out.append(f'<g data-node="{_esc(name)}" data-state="{_esc(state or "")}"><title>{tip_text}</title>'
                   f'<rect x="{x}" y="{_num(y)}" width="{NODE_W}" height="{_num(box.h)}" rx="{rx}" fill="{fill}" stroke="{stroke}" stroke-width="{width}"/>'
                   + "".join(lines) + "</g>")
    return out


def _clip_error(text: str) -> str:
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"


def _legend(pic: Picture, width: float, top: float) -> tuple[str, float]:
    """The marked path and the estimate (or why there is none), wrapped to the drawing's width."""
    run = pic.run
    first, _, rest = pic.legend().partition(" · ") if pic.critical_path else ("", "", pic.legend())
    if run:
        rest += f" · this run: {run.status} in {ms_text(run.elapsed_ms)}"
    chars = max(int((width - MARGIN * 2 - 30) / CHAR_W), 40)
    lines = [*(textwrap.wrap(plain(first), chars) if first else []), *textwrap.wrap(plain(rest), chars)]
    out = []
    y = top + 18
    if first:
        out.append(f'<line x1="{MARGIN}" y1="{y - 4}" x2="{MARGIN + 22}" y2="{y - 4}" stroke="{RED}" stroke-width="2.6"/>')
    for line in lines:
        out.append(f'<text x="{MARGIN + 30}" y="{_num(y)}" style="{FONT};font-size:12px" fill="{INK}">{_esc(line)}</text>')
        y += 17
    return "\n".join(out), 17 * len(lines) + 8


def _gantt(pic: Picture, run: RunData, width: float, top: float) -> tuple[str, float]:
    spans = sorted(run.spans, key=lambda s: (s.start_ms, s.node))
    critical = set(pic.critical_path) if pic.critical_of_run else set()
    row_h, label_w = 20, 190
    top += 24
    total = max(run.elapsed_ms, max(s.end_ms for s in spans), 0.001)
    scale = (width - MARGIN * 2 - label_w - 60) / total
    out = [f'<text x="{MARGIN}" y="{_num(top)}" style="{FONT};font-size:13px;font-weight:700" fill="{INK}">Timeline ({_esc(ms_text(run.elapsed_ms))})</text>']
    base = top + 12
    for t in _ticks(total):
        x = MARGIN + label_w + t * scale
        out.append(f'<line x1="{_num(x)}" y1="{_num(base)}" x2="{_num(x)}" y2="{_num(base + len(spans) * row_h)}" stroke="#e3e7ed"/>')
        out.append(f'<text x="{_num(x)}" y="{_num(base + len(spans) * row_h + 14)}" text-anchor="middle" style="{FONT};font-size:10px" fill="{GREY}">{_esc(ms_text(t))}</text>')
    for i, span in enumerate(spans):
        y = base + i * row_h
        x = MARGIN + label_w + span.start_ms * scale
        w = max((span.end_ms - span.start_ms) * scale, 2)
        color = STATE_STROKES.get(span.state, GREY)
        outline = f' stroke="{RED}" stroke-width="2"' if span.node in critical else ""
        tip = (f"{span.node}: {span.state}, {ms_number(span.start_ms)}–{ms_text(span.end_ms)} ({ms_text(span.end_ms - span.start_ms)})"
               + (" · on the critical path of this run" if span.node in critical else "")
               + (f"\n{_clip_error(span.error)}" if span.error else ""))
        out.append(f'<g data-span="{_esc(span.node)}"><text x="{MARGIN}" y="{_num(y + 14)}" style="{FONT};font-size:11.5px" fill="{INK}">{_esc(clip(span.node, 26))}</text>'
                   f'<rect x="{_num(x)}" y="{_num(y + 3)}" width="{_num(w)}" height="{row_h - 6}" rx="3" fill="{color}" opacity="0.85"{outline}><title>{_esc(tip, lines=True)}</title></rect>'
                   f'<text x="{_num(x + w + 5)}" y="{_num(y + 14)}" style="{FONT};font-size:10.5px" fill="{GREY}">{_esc(ms_text(span.end_ms - span.start_ms))}</text></g>')
    return "\n".join(out), 24 + 12 + len(spans) * row_h + 24


def _ticks(total: float) -> list[float]:
    """Round times for the Gantt strip's axis: 0, 2, 4, 6, 8 ms rather than 0, 2.05, 4.1..."""
    raw = total / 5
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * 0.999)
    return [i * step for i in range(int(total / step + 1e-9) + 1)]


def html(flow: CompiledFlow, plan: Plan, run: RunData | None = None, *, recorded: Mapping[str, float] | None = None) -> str:
    """A self-contained page: the SVG, the plan table, and the run's outcome when given."""
    pic = picture(flow, plan, run, recorded)
    est = pic.estimate
    spans = {s.node: s for s in run.spans} if run else {}
    mixed = est.source == "recorded runs and latency: hints"  # then each figure says which it is
    rows = []
    for r in plan_rows(flow, plan, recorded, pic.critical_path):
        expected = "?" if r.expected_ms is None else ms_number(r.expected_ms)
        if mixed and r.latency_from:
            expected += " (recorded)" if r.latency_from == "recorded" else " (hint)"
        cells = [r.node, r.kind, ", ".join(r.waits_for) or "–", r.group, expected, "●" if r.critical else "", r.when or ""]
        if run:
            span = spans.get(r.node)
            state = run.states.get(r.node, "")
            cells.append(state + (f" · {ms_text(span.end_ms - span.start_ms)}" if span else ""))
            note = pic.outcomes.get(r.node, "")
            cells.append(note.partition(": ")[2] if note.startswith(f"{state}: ") else note)
        rows.append("<tr>" + "".join(f'<td class="c{i}">{_esc(str(c), lines=True)}</td>' for i, c in enumerate(cells)) + "</tr>")
    cards = [("groups", str(len(plan.groups)), "")]
    if est.known:
        lower = est.lower_percent
        cards += [("sequential estimate", ms_text(plan.sequential_ms), ""), ("parallel estimate", ms_text(plan.parallel_ms), ""),
                  ("expected gain", "–" if lower is None else f"{lower:.0f}% lower", ""),
                  ("latency from", est.source, f"{len(est.unknown)} node(s) without one, counted as 0" if est.unknown else "")]
    else:
        head, _, tail = NO_LATENCY.partition(": ")
        cards.append(("latency estimate", head, tail))
    if run:
        cards.append(("this run", f"{run.status} · {ms_text(run.elapsed_ms)}",
                      "critical path: " + " → ".join(pic.critical_path) if pic.critical_of_run else ""))
    card_html = "\n".join(f'<div class="card"><span>{_esc(label)}</span><b>{_esc(value)}</b>'
                          + (f'<span class="note">{_esc(note)}</span>' if note else "") + "</div>" for label, value, note in cards)
    critical_head = "critical (this run)" if pic.critical_of_run else "critical"
    run_heads = "<th>state</th><th>error or reason</th>" if run else ""
    description = flow.loaded.spec.description or ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>planner · {_esc(flow.name)}</title>
<style>
body{{margin:0;padding:28px 32px;font-family:Helvetica,Arial,sans-serif;color:{INK};background:#fbfcfd}}
h1{{font-size:22px;margin:0 0 4px}} p.d{{color:#4a5160;margin:0 0 18px;max-width:900px}}
.cards{{display:flex;flex-wrap:wrap;gap:14px;margin:0 0 18px}} .card{{background:#fff;border:1px solid #e3e7ed;border-radius:10px;padding:10px 16px;max-width:420px}}
.card b{{display:block;font-size:20px}} .card span{{color:{GREY};font-size:12px;text-transform:uppercase;letter-spacing:.04em}}
.card span.note{{display:block;text-transform:none;letter-spacing:0;margin-top:2px}}
.graph{{background:#fff;border:1px solid #e3e7ed;border-radius:12px;padding:8px;overflow-x:auto}}
table{{border-collapse:collapse;margin-top:18px;font-size:13px;background:#fff}} td,th{{border-bottom:1px solid #e3e7ed;padding:6px 12px;text-align:left;vertical-align:top}}
th{{color:{GREY};font-weight:600;font-size:12px;text-transform:uppercase;white-space:nowrap}}
td.c6,td.c8{{max-width:380px;white-space:pre-wrap;overflow-wrap:break-word}} td.c2{{max-width:260px}} td.c4,td.c7{{white-space:nowrap}}
</style></head><body>
<h1>{_esc(flow.name)}</h1><p class="d">{_esc(description)}</p>
<div class="cards">{card_html}</div>
<div class="graph">{_svg(pic)}</div>
<table><thead><tr><th>node</th><th>kind</th><th>waits for</th><th>group</th><th>expected ms</th><th>{critical_head}</th><th>when</th>{run_heads}</tr></thead>
<tbody>{''.join(rows)}</tbody></table>
</body></html>
"""
