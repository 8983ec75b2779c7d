"""Per-node latency statistics, recorded by `planner run` and read by `planner plan`.

Kept in `PLANNER_HOME/stats/<flow>-<project>.json`, where `<project>` is a short hash of the
flows folder's resolved path: two projects that both have a flow named `orders` keep their
own figures. Each file holds the last `KEEP` durations of each node that ran to an answer
(`ok`); the plan uses their median. The library's own `run` records nothing: no file I/O on a
service's hot path.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
from pathlib import Path

from planner.results import FlowResult, NodeState

KEEP = 100


def stats_path(flow: str, folder: str | os.PathLike[str]) -> Path:
    """The file that keeps flow `flow`'s latencies, for the flows folder `folder`."""
    from planner.db.embedded import planner_home

    project = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:12]
    return planner_home() / "stats" / f"{flow}-{project}.json"


def _read(path: Path) -> dict[str, list[float]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: [float(x) for x in v] for k, v in data.items() if isinstance(v, list)} if isinstance(data, dict) else {}


FUSED = "#fused"  # not a node name: how many nodes shared each node's statement, per run


def _read_fused(path: Path) -> dict[str, list[float]]:
    try:
        data = json.loads(path.read_text()).get(FUSED, {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: [float(x) for x in v] for k, v in data.items() if isinstance(v, list)} if isinstance(data, dict) else {}


def record(result: FlowResult, folder: str | os.PathLike[str]) -> None:
    """Add this run's node durations to the flow's statistics (atomically replaced), and how
    many nodes shared each one's statement (fusion or a compiled group), so that the plan
    counts a shared statement's time once."""
    path = stats_path(result.flow, folder)
    stats: dict[str, object] = dict(_read(path))
    fused = _read_fused(path)
    for name, node in result.nodes.items():
        if node.state is NodeState.OK and node.duration_ms is not None and node.attempts:
            stats[name] = ([*_read_list(stats, name), round(node.duration_ms, 3)])[-KEEP:]
            share = node.served.run_share if node.served is not None else 1
            fused[name] = [*fused.get(name, []), share][-KEEP:]
    stats[FUSED] = fused
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(stats, handle)
    os.replace(tmp, path)


def _read_list(stats: dict[str, object], name: str) -> list[float]:
    value = stats.get(name)
    return value if isinstance(value, list) else []


def recorded_fused(flow: str, folder: str | os.PathLike[str]) -> dict[str, float]:
    """The median number of nodes that shared each node's statement in the recorded runs (1:
    not fused); empty when nothing was recorded (or only before this was kept)."""
    return {name: statistics.median(values) for name, values in _read_fused(stats_path(flow, folder)).items() if values}


def recorded_latencies(flow: str, folder: str | os.PathLike[str]) -> dict[str, float]:
    """The median recorded duration (ms) of each node of `flow` of the flows folder `folder`;
    empty when none was recorded."""
    return {name: statistics.median(values) for name, values in _read(stats_path(flow, folder)).items() if values}
