"""`planner demo`: the embedded database, the demo data, both seed flows in all three modes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from planner.api import Planner
from planner.db import create_database, embedded_dsn, with_database
from planner.demo import data
from planner.dsn import redact_dsn
from planner.executor import MODES
from planner.graph import CompiledFlow

DEMO_DATABASE = "planner_demo"


def seed_flows_dir() -> Path:
    """The seed flows: `flows/` of a checkout, else the copy inside the installed package."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "flows", here / "_flows"):
        if (candidate / "process_buffered.yaml").exists():
            return candidate
    raise FileNotFoundError("the seed flows are missing from this installation")


async def demo_dsn(server_dsn: str | None, log: Callable[[str], None]) -> str:
    """The demo database on `server_dsn` (or the embedded server), created and filled if needed."""
    server = server_dsn or embedded_dsn()
    admin = await asyncpg.connect(server)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DEMO_DATABASE)
    finally:
        await admin.close()
    if not exists:
        await create_database(server, DEMO_DATABASE)
    dsn = with_database(server, DEMO_DATABASE)
    t0 = time.perf_counter()
    if await data.ensure(dsn, data.Scale.demo()):
        log(f"loaded the demo schema and data ({data.Scale.demo().label()}) in {time.perf_counter() - t0:.1f}s")
    return dsn


@dataclass
class ModeFigures:
    mode: str
    latencies_ms: list[float]
    queries: list[int]

    @property
    def queries_per_run(self) -> float:
        return statistics.mean(self.queries)

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_ms)

    @property
    def p95(self) -> float:
        return percentile(self.latencies_ms, 0.95)


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile of `values` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def queries_of(flow: CompiledFlow, states: dict[str, str]) -> int:
    """Statements sent by the nodes that ran (a transaction adds BEGIN and COMMIT)."""
    total = 0
    for name, state in states.items():
        node = flow.nodes[name]
        if node.kind == "sql" and state in ("ok", "defaulted", "failed"):
            total += len(node.statements) + (2 if len(node.statements) > 1 else 0)
    return total


def _inputs(flow: str, i: int) -> dict[str, Any]:
    phone = f"+1555{(i % 10) + 1:07d}"
    if flow == "process_buffered":
        instance = "acme" if i % 2 == 0 else f"inst-{(i % 1000) + 1:05d}"
        return {"instance_name": instance, "user_phone": phone, "message": f"demo message {time.time_ns()}-{i}"}
    return {"instance_id": 1 + i % 50, "user_phone": phone, "message": "can I talk to an agent?" if i % 5 == 0 else "thanks"}


async def measure(planner: Planner, flow: str, runs: int) -> list[ModeFigures]:
    """Interleave the modes run by run, so the machine's noise hits each alike."""
    compiled = planner.load(flow)
    figures = {mode: ModeFigures(mode, [], []) for mode in MODES}
    counter = itertools.count()
    for _ in range(3):  # warm the pool and the server's caches
        await planner.run(flow, _inputs(flow, next(counter)))
    for _ in range(runs):
        for mode in MODES:
            result = await planner.run(flow, _inputs(flow, next(counter)), mode=mode)
            figures[mode].latencies_ms.append(result.elapsed_ms)
            figures[mode].queries.append(queries_of(compiled, result.states()))
    return list(figures.values())


async def run_demo(
    server_dsn: str | None, runs: int, rtt_ms: float = 0.0, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
) -> dict[str, Any]:
    """Everything `planner demo` shows, as data (the CLI renders it).

    With `rtt_ms`, the queries go through `LatencyProxy`, which adds that round trip: the
    network the seed's backend had, and where running lookups together pays.
    """
    from planner.demo.latency_proxy import LatencyProxy

    dsn = await demo_dsn(server_dsn, log)
    # Redacted before the query is cut off: a password may hold an unencoded `?`.
    out: dict[str, Any] = {"database": redact_dsn(dsn).split("?")[0], "rtt_ms": rtt_ms, "flows": {}}
    async with contextlib.AsyncExitStack() as stack:
        if rtt_ms:
            dsn = (await stack.enter_async_context(LatencyProxy(dsn, rtt_ms / 2))).dsn
        planner = await stack.enter_async_context(Planner(flows=seed_flows_dir(), dsn=dsn, allowed_modules=["planner.demo"]))
        for flow in ("process_buffered", "escalation"):
            figures = await measure(planner, flow, runs)
            out["flows"][flow] = {"plan": planner.plan(flow), "compiled": planner.load(flow), "figures": figures}
    return out


def main_sync(server_dsn: str | None, runs: int, rtt_ms: float = 0.0) -> dict[str, Any]:
    return asyncio.run(run_demo(server_dsn, runs, rtt_ms))
