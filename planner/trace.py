"""A run as Chrome trace-event JSON (Perfetto, chrome://tracing), and back.

Perfetto cannot draw overlapping complete events on one thread, so nodes that run at the same
time get lanes of their own: the smallest set of lanes, assigned greedily by start time.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.graph import CompiledFlow
from planner.results import FlowResult


@dataclass(frozen=True)
class Span:
    node: str
    state: str
    start_ms: float
    end_ms: float
    lane: int
    error: str | None


@dataclass(frozen=True)
class RunData:
    """What a trace says about a run: each node's state, and the spans of those that ran."""

    flow: str
    status: str
    elapsed_ms: float
    states: dict[str, str]
    spans: list[Span]


def lanes(intervals: list[tuple[str, float, float]]) -> dict[str, int]:
    """Interval partitioning: a lane per node such that no two nodes in a lane overlap."""
    free: list[tuple[float, int]] = []  # (end, lane) of lanes in use
    assigned: dict[str, int] = {}
    count = 0
    for name, start, end in sorted(intervals, key=lambda i: (i[1], i[2])):
        if free and free[0][0] <= start:
            _, lane = heapq.heappop(free)
        else:
            lane, count = count, count + 1
        assigned[name] = lane
        heapq.heappush(free, (end, lane))
    return assigned


def trace_events(result: FlowResult, flow: CompiledFlow) -> dict[str, Any]:
    ran = [(n, r.started_ms, r.finished_ms if r.finished_ms is not None else result.elapsed_ms)
           for n, r in result.nodes.items() if r.started_ms is not None]
    lane_of = lanes([(n, s, e) for n, s, e in ran])
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": f"flow {result.flow} ({result.mode})"}},
    ]
    for lane in sorted(set(lane_of.values())):
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": lane + 1, "args": {"name": f"lane {lane + 1}"}})
    for name, start, end in ran:
        node = result.nodes[name]
        events.append({
            "name": name, "cat": node.state.value, "ph": "X", "pid": 1, "tid": lane_of[name] + 1,
            "ts": round(start * 1000, 1), "dur": round(max(end - start, 0.0) * 1000, 1),
            "args": {"state": node.state.value, "group": flow.group_of.get(name), "attempts": node.attempts,
                     "error": None if node.error is None else f"{type(node.error).__name__}: {node.error}"},
        })
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"flow": result.flow, "run_id": result.run_id, "status": result.status,
                      "elapsed_ms": result.elapsed_ms, "states": result.states()},
    }


def write_trace(result: FlowResult, flow: CompiledFlow, path: Path) -> None:
    path.write_text(json.dumps(trace_events(result, flow), indent=1))


def read_trace(path: Path) -> RunData:
    """Read a trace written by `write_trace`. Raises `ValueError` for anything else."""
    try:
        data = json.loads(Path(path).read_text())
        other = data["otherData"]
        spans = [
            Span(e["name"], e["args"]["state"], e["ts"] / 1000, (e["ts"] + e["dur"]) / 1000, e["tid"] - 1, e["args"].get("error"))
            for e in data["traceEvents"] if e.get("ph") == "X"
        ]
        return RunData(other["flow"], other["status"], float(other["elapsed_ms"]), dict(other["states"]), spans)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a planner trace ({exc})") from None
