"""Edges never pass under a box: checked on the layout the drawer uses (its polylines, as
segments) and on the SVG it draws (each curve, by the rectangle its control points span), over
200 random DAGs."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.graph import CompiledFlow, compile_flow, plan
from planner.lang.loader import load_text
from planner.views import draw
from planner.views.draw import Box, Layout, layout, path_d
from planner.views.render import edges

SVG = "{http://www.w3.org/2000/svg}"
EPS = 1e-6

Rect = tuple[float, float, float, float]  # x0, y0, x1, y1


@st.composite
def dags(draw_: st.DrawFn) -> str:
    """Up to 24 nodes; each waits for a few earlier ones, by reference (data) or `after:`
    (ordering), often far back, so that many edges skip columns."""
    n = draw_(st.integers(1, 24))
    lines = ["nodes:"]
    for i in range(n):
        deps = sorted(draw_(st.sets(st.integers(0, i - 1), max_size=4))) if i else []
        after = [d for d in deps if draw_(st.integers(0, 3)) == 0]
        refs = [d for d in deps if d not in after]
        sql = "SELECT " + (", ".join(f"$n{d}" for d in refs) or "1")
        extra = f", after: [{', '.join(f'n{d}' for d in after)}]" if after else ""
        lines.append(f"  n{i}: {{sql: '{sql}'{extra}}}")
    return "\n".join(lines) + "\n"


def _flow(text: str) -> CompiledFlow:
    return compile_flow(load_text(text, name="random"))


def _rect(box: Box) -> Rect:
    return (box.x, box.y, box.right, box.bottom)


def _segment_enters(p: tuple[float, float], q: tuple[float, float], rect: Rect) -> bool:
    """Whether the segment p-q passes through the inside of `rect` (touching its edge is not):
    Liang-Barsky clipping of the segment to the rectangle shrunk by EPS."""
    x0, y0, x1, y1 = rect[0] + EPS, rect[1] + EPS, rect[2] - EPS, rect[3] - EPS
    (px, py), (qx, qy) = p, q
    dx, dy = qx - px, qy - py
    t0, t1 = 0.0, 1.0
    for step, room in ((-dx, px - x0), (dx, x1 - px), (-dy, py - y0), (dy, y1 - py)):
        if step == 0:
            if room < 0:
                return False
            continue
        t = room / step
        if step < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 > t1:
            return False
    return True


def _overlap(a: Rect, b: Rect) -> bool:
    """Whether two rectangles share inside area (sharing an edge is not)."""
    return a[0] < b[2] - EPS and b[0] < a[2] - EPS and a[1] < b[3] - EPS and b[1] < a[3] - EPS


def _span(points: list[tuple[float, float]]) -> Rect:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (min(xs), min(ys), max(xs), max(ys))


def _check_layout(flow: CompiledFlow, lay: Layout) -> None:
    boxes = list(lay.boxes.values())
    assert {(r.source, r.target) for r in lay.routes} == {(a, b) for a, b, _ in edges(flow)}
    assert len(lay.routes) == len(edges(flow))
    for i, box in enumerate(boxes):  # boxes never overlap one another
        assert not any(_overlap(_rect(box), _rect(other)) for other in boxes[i + 1:])
    for route in lay.routes:
        source, target = lay.boxes[route.source], lay.boxes[route.target]
        (sx, sy), (tx, ty) = route.points[0], route.points[-1]
        assert sx == source.right and source.y < sy < source.bottom, route  # leaves the source's right side
        assert tx == target.x - 2 and target.y < ty < target.bottom, route  # arrives at the target's left side
        for p, q in zip(route.points, route.points[1:], strict=False):
            for box in boxes:
                # the straight segment (what the brief asks), and the rectangle p and q span (where the curve drawn for them lies)
                assert not _segment_enters(p, q, _rect(box)), f"{route.source} -> {route.target}: {p}-{q} crosses {box.node}"
                assert not _overlap(_span([p, q]), _rect(box)), f"{route.source} -> {route.target}: {p}-{q} passes over {box.node}"
    lanes = [(r.points[1][1], r.points[1][0], r.points[2][0], r) for r in lay.routes if r.lane is not None]
    for i, (y, x0, x1, route) in enumerate(lanes):  # two lanes at one height never overlap: each edge stays traceable
        for y2, a0, a1, other in lanes[i + 1:]:
            assert not (y == y2 and x0 < a1 and a0 < x1), f"{route} and {other} share a lane"


_PATH_NUMBERS = re.compile(r"[MLC]|-?\d+(?:\.\d+)?")


def _drawn_pieces(d: str) -> list[list[tuple[float, float]]]:
    """Each command of an SVG path as its points: the current point, control points, the end."""
    tokens = _PATH_NUMBERS.findall(d)
    pieces: list[list[tuple[float, float]]] = []
    current: tuple[float, float] | None = None
    i = 0
    while i < len(tokens):
        command = tokens[i]
        count = {"M": 1, "L": 1, "C": 3}[command]
        points = [(float(tokens[i + 1 + 2 * k]), float(tokens[i + 2 + 2 * k])) for k in range(count)]
        i += 1 + 2 * count
        if command != "M":
            assert current is not None
            pieces.append([current, *points])
        current = points[-1]
    return pieces


def _check_svg(text: str) -> None:
    """The drawn SVG, read back: no curve or line (by the hull of its control points) enters a box."""
    root = ET.fromstring(text)
    boxes = {}
    for g in root.iter(f"{SVG}g"):
        if g.get("data-node") is not None:
            rect = g.find(f"{SVG}rect")
            assert rect is not None
            x, y, w, h = (float(rect.get(k) or 0) for k in ("x", "y", "width", "height"))
            boxes[g.get("data-node")] = (x, y, x + w, y + h)
    for path in root.iter(f"{SVG}path"):
        if path.get("data-from") is None:
            continue
        for piece in _drawn_pieces(path.get("d") or ""):
            for name, box in boxes.items():
                assert not _overlap(_span(piece), box), f"{path.get('data-from')} -> {path.get('data-to')}: {piece} over {name}"


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=dags())
def test_no_edge_passes_under_a_box_of_a_random_dag(text: str) -> None:
    flow = _flow(text)
    p = plan(flow)
    lay = layout(flow, p)
    _check_layout(flow, lay)
    drawn = draw.svg(flow, p)
    for route in lay.routes:  # the drawing is the layout
        assert f'd="{path_d(route.points)}"' in drawn
    _check_svg(drawn)


def test_an_edge_that_skips_a_group_goes_around_the_box_in_its_way() -> None:
    """The picture that hid a dependency: `order -> summary` was drawn straight under `items`."""
    flow = _flow("nodes:\n  order: {sql: SELECT 1}\n  items: {sql: SELECT $order}\n  summary: {sql: 'SELECT $order, $items'}\n")
    lay = layout(flow, plan(flow))
    items = lay.boxes["items"]
    route = next(r for r in lay.routes if (r.source, r.target) == ("order", "summary"))
    assert route.lane is not None and len(route.points) == 4
    lane_y = route.points[1][1]
    assert lane_y > items.bottom  # below `items`, in the gap under it
    assert route.points[1][0] < items.x and route.points[2][0] > items.right  # and along it, past the whole box
    _check_layout(flow, lay)


def test_lanes_in_one_gap_are_apart_and_the_gap_grows_to_hold_them() -> None:
    """A chain c0..c3 along row 0, each also waiting for the one two and three back: three edges
    skip columns over strips they share, all nearest the gap under row 0."""
    text = ("nodes:\n  c0: {sql: SELECT 1}\n  c1: {sql: SELECT $c0}\n  c2: {sql: 'SELECT $c1, $c0'}\n"
            "  c3: {sql: 'SELECT $c2, $c1, $c0'}\n  d1: {sql: SELECT $c0}\n")
    flow = _flow(text)
    lay = layout(flow, plan(flow))
    lanes = [r for r in lay.routes if r.lane is not None]
    assert {(r.source, r.target) for r in lanes} == {("c0", "c2"), ("c1", "c3"), ("c0", "c3")}
    assert {r.lane[0] for r in lanes if r.lane} == {1}  # all under row 0
    ys = sorted(r.points[1][1] for r in lanes)
    assert min(b - a for a, b in zip(ys, ys[1:], strict=False)) >= draw.LANE_STEP - 0.1
    row0, row1 = lay.boxes["c1"], lay.boxes["d1"]
    assert row0.bottom < ys[0] and ys[-1] < row1.y  # between the rows
    assert row1.y - row0.bottom >= 4 * draw.LANE_STEP > draw.GAP_Y  # the gap grew
    _check_layout(flow, lay)
    _check_svg(draw.svg(flow, plan(flow)))


def test_the_seed_flows_are_drawn_clear_of_boxes() -> None:
    from pathlib import Path

    from planner.api import load_flow

    root = Path(__file__).resolve().parents[2]
    for name in ("process_buffered", "escalation"):
        flow = load_flow(root / "flows" / f"{name}.yaml")
        _check_layout(flow, layout(flow, plan(flow)))
        _check_svg(draw.svg(flow, plan(flow)))
