"""Per-node latency statistics, recorded by `planner run` and read by `planner plan`.

Kept in `PLANNER_HOME/stats/<flow>.json`: the last `KEEP` durations of each node that ran
to an answer (`ok`). The plan uses their median. The library's own `run` records nothing:
no file I/O on a service's hot path.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from planner.results import FlowResult, NodeState

KEEP = 100


def _path(flow: str) -> Path:
    from planner.db import planner_home

    return planner_home() / "stats" / f"{flow}.json"


def _read(path: Path) -> dict[str, list[float]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: [float(x) for x in v] for k, v in data.items() if isinstance(v, list)} if isinstance(data, dict) else {}


def record(result: FlowResult) -> None:
    """Add this run's node durations to the flow's statistics (atomically replaced)."""
    path = _path(result.flow)
    stats = _read(path)
    for name, node in result.nodes.items():
        if node.state is NodeState.OK and node.duration_ms is not None and node.attempts:
            stats[name] = ([*stats.get(name, []), round(node.duration_ms, 3)])[-KEEP:]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(stats, handle)
    os.replace(tmp, path)


def recorded_latencies(flow: str) -> dict[str, float]:
    """The median recorded duration (ms) of each node of `flow`; empty when none was recorded."""
    return {name: statistics.median(values) for name, values in _read(_path(flow)).items() if values}
