"""`planner demo`: the embedded database, the demo data, both seed flows in all three modes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from planner.api import Planner
from planner.db.admin import create_database, with_database
from planner.db.coalesce import CoalescingBackend
from planner.db.dsn import redact_dsn
from planner.db.embedded import embedded_dsn
from planner.db.pool import PoolBackend
from planner.db.pooler import connect
from planner.demo import data
from planner.errors import FlowFailed, FlowTimeout
from planner.graph import CompiledFlow
from planner.kinds.call import CallOptions
from planner.results import error_text
from planner.run.executor import MODES
from planner.settings import Settings

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
    # Every connection through `connect`: a `?pgbouncer=` of the DSN given is honoured there
    # (and kept in the DSN returned, for the Planner's pool to honour too).
    admin = await connect(server, default_pooler=Settings.from_env().pooler)
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


def queries_of(flow: CompiledFlow, states: Mapping[str, str]) -> int:
    """Statements sent by the nodes that ran (a transaction adds BEGIN and COMMIT)."""
    total = 0
    for name, state in states.items():
        node = flow.nodes[name]
        if node.sql.statements and state in ("ok", "defaulted", "failed"):
            total += len(node.sql.statements) + (2 if len(node.sql.statements) > 1 else 0)
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
            sent = {n: r.state for n, r in result.nodes.items() if r.served is None or not r.served.cached}
            figures[mode].queries.append(queries_of(compiled, sent))  # a value from the cache sent none
    return list(figures.values())


@dataclass
class LoadFigures:
    in_flight: int
    pool: int
    seconds: float  # measured
    coalesce: bool
    ok_per_s: float  # successful messages per second
    failed_per_s: float  # runs that raised FlowFailed, per second (why: `failures`)
    p50_ms: float
    failures: dict[str, int] = field(default_factory=dict)  # why runs failed in the window: reason -> runs


LOAD_IN_FLIGHT = 200  # messages in flight in the load table
LOAD_POOL = 10  # connections
LOAD_SECONDS = 2.0  # measured per cell at least (see `steady_load`)
LOAD_MIN_RUNS = 10  # a demo of fewer runs per mode (a quick check) skips the load table


def _load_inputs(i: int) -> dict[str, Any]:
    """Messages of different users of different instances, as many concurrent ones are."""
    return {"instance_name": f"inst-{i % 2000 + 1:05d}", "user_phone": f"+1555{(i // 2000) % 10 + 1:07d}",
            "message": f"demo load {time.time_ns()}-{i}"}


async def measure_load(dsn: str, *, in_flight: int = LOAD_IN_FLIGHT, pool: int = LOAD_POOL,
                       seconds: float = LOAD_SECONDS) -> list[LoadFigures]:
    """process_buffered with `in_flight` messages at a time on `pool` connections, with
    coalescing on (planner's default) and off (as `PLANNER_COALESCE=0` makes it)."""
    out = []
    counter = itertools.count()
    for coalesce in (True, False):
        primary = PoolBackend(dsn=dsn, min_size=pool, max_size=pool, default_pooler=Settings.from_env().pooler)
        backend = CoalescingBackend(primary, batches=primary, enabled=coalesce)
        async with Planner(flows=seed_flows_dir(), backend=backend, call_options=CallOptions(allowed_modules=["planner.demo"])) as planner:
            await planner.run("process_buffered", _load_inputs(next(counter)))  # the pool open
            ok, failed, p50, failures = await _workers(planner, counter, in_flight, seconds / 4, seconds)
            out.append(LoadFigures(in_flight, pool, seconds, coalesce, ok, failed, p50, failures))
    return out


async def _workers(planner: Planner, counter: itertools.count[int], in_flight: int, warmup: float,
                   seconds: float) -> tuple[float, float, float, dict[str, int]]:
    """(ok/s, failed/s, p50 ms, why runs failed) of eager process_buffered runs under a steady load (`steady_load`)."""
    window: Window[None] = await steady_load(
        lambda: planner.run("process_buffered", _load_inputs(next(counter)), mode="eager"), in_flight, warmup, seconds)
    return window.ok_per_s, window.failed_per_s, window.p50_ms, dict(window.failures)


def failure_reason(exc: FlowFailed) -> str:
    """Why a run failed, in a few words: its deadline, or the node that failed and its error."""
    if isinstance(exc, FlowTimeout):
        return f"passed the flow's deadline (FlowTimeout: {exc})"
    failed = next((name for name, node in exc.result.nodes.items() if node.state == "failed"), None)
    node = exc.result.nodes.get(failed) if failed else None
    if node is None or node.error is None:
        return str(exc)
    return f"node {failed!r} failed: {error_text(node.error)[:160]}"


T = TypeVar("T")


@dataclass
class Window(Generic[T]):
    """What happened between the two readings of a `steady_load`."""

    elapsed: float  # seconds
    done: int  # successful messages finished in the window
    failed: int  # FlowFailed
    latencies_ms: list[float]  # of the messages finished in the window
    first: T | None  # what `read` returned at the window's start, and at its end
    last: T | None
    failures: Counter[str] = field(default_factory=Counter)  # why the failed runs failed (`failure_reason`)

    @property
    def ok_per_s(self) -> float:
        return self.done / self.elapsed

    @property
    def failed_per_s(self) -> float:
        return self.failed / self.elapsed

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")


async def steady_load(run: Callable[[], Awaitable[Any]], in_flight: int, warmup: float, seconds: float,
                      read: Callable[[bool], Awaitable[T]] | None = None, cap: float = 60.0) -> Window[T]:
    """`in_flight` workers call `run` back to back; measured between two readings, in steady state.

    Unmeasured first: `warmup` seconds and until every worker has finished a message, so that
    the connections are open, the statements prepared, and the first wave (every message
    started at once) has passed. Then the window: `seconds`, and at least as long as it takes
    `in_flight` messages to finish (a window shorter than one message's latency would count
    whichever wave happened to end in it). Each phase is bounded by `cap` seconds. The messages
    running at the end finish unmeasured. `read(first)` is awaited at the start
    (`first=True`) and at the end of the window, for counters of the caller's. A `FlowFailed`
    run counts as failed; any other error ends the load and is raised.
    """
    finished: list[tuple[float, float]] = []  # (finished at, ms)
    failed: list[tuple[float, str]] = []  # finished at, why (`failure_reason`)
    rounds = [0] * in_flight  # messages each worker has finished
    stopping = False

    progress = asyncio.Event()  # set whenever a message ends (or a worker does)

    async def worker(k: int) -> None:
        while not stopping:
            start = time.perf_counter()
            try:
                await run()
            except FlowFailed as exc:
                failed.append((time.perf_counter(), failure_reason(exc)))
            else:
                end = time.perf_counter()
                finished.append((end, (end - start) * 1000))
            finally:
                progress.set()
            rounds[k] += 1

    async def until(ready: Callable[[], bool], at_least: float) -> None:
        start = time.perf_counter()
        await asyncio.sleep(at_least)
        while not ready() and (left := cap - (time.perf_counter() - start)) > 0:
            for w in workers:
                if w.done():
                    w.result()  # an error other than FlowFailed ended it: raised here, not hidden
            progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), left)

    workers = [asyncio.ensure_future(worker(k)) for k in range(in_flight)]
    try:
        await until(lambda: min(rounds) > 0, warmup)
        first = await read(True) if read else None
        t0, before = time.perf_counter(), len(finished) + len(failed)
        await until(lambda: len(finished) + len(failed) - before >= in_flight, seconds)
        t1 = time.perf_counter()
        last = await read(False) if read else None
    finally:
        stopping = True
        await asyncio.gather(*workers)  # the messages running finish, unmeasured
    latencies = [ms for end, ms in finished if t0 <= end <= t1]
    reasons = Counter(why for end, why in failed if t0 <= end <= t1)
    return Window(t1 - t0, len(latencies), sum(reasons.values()), latencies, first, last, reasons)


async def run_demo(
    server_dsn: str | None, runs: int, rtt_ms: float = 0.0, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
) -> dict[str, Any]:
    """Everything `planner demo` shows, as data (the CLI renders it).

    With `rtt_ms`, the queries go through a latency proxy, which adds that round trip: the
    network the seed's backend had, and where running lookups together pays. The proxy runs
    in a process of its own (`ProxyProcess`), so that its work does not slow the runs measured.
    `out["load"]` is the load table (None when `runs` is below `LOAD_MIN_RUNS`).
    """
    from planner.demo.latency_proxy import ProxyProcess

    dsn = await demo_dsn(server_dsn, log)
    # Redacted before the query is cut off: a password may hold an unencoded `?`.
    out: dict[str, Any] = {"database": redact_dsn(dsn).split("?")[0], "rtt_ms": rtt_ms, "flows": {}, "load": None}
    async with contextlib.AsyncExitStack() as stack:
        if rtt_ms:
            dsn = (await stack.enter_async_context(ProxyProcess(dsn, rtt_ms / 2))).dsn
        async with Planner(flows=seed_flows_dir(), dsn=dsn, call_options=CallOptions(allowed_modules=["planner.demo"])) as planner:
            for flow in ("process_buffered", "escalation"):
                figures = await measure(planner, flow, runs)
                out["flows"][flow] = {"plan": planner.plan(flow), "compiled": planner.load(flow), "figures": figures}
        if runs >= LOAD_MIN_RUNS:
            log(f"measuring process_buffered under load ({LOAD_IN_FLIGHT} in flight, coalescing on and off, "
                f"{LOAD_SECONDS:g} s each)")
            out["load"] = await measure_load(dsn, in_flight=LOAD_IN_FLIGHT, pool=LOAD_POOL, seconds=LOAD_SECONDS)
    return out


def load_table(load: list[LoadFigures], rtt_ms: float) -> tuple[str, list[str], list[list[str]], set[int]]:
    """The load table (title, headers, rows, right-aligned columns), for the CLI to print."""
    network = f"{rtt_ms:g} ms round trip added by a local proxy" if rtt_ms else "the bare local database"
    off = next(f for f in load if not f.coalesce).ok_per_s
    rows = [[f"coalescing {'on' if f.coalesce else 'off'}", f"{f.ok_per_s:.1f}", f"{f.ok_per_s / off:.2f}" if off else "-",
             f"{f.p50_ms:.1f}", f"{f.failed_per_s:.1f}"] for f in load]
    first = load[0]
    title = (f"process_buffered under load: {first.in_flight} messages in flight, pool {first.pool}, eager, "
             f"at least {first.seconds:g} s each ({network})")
    return title, ["", "messages/s", "x off", "p50 ms", "failed/s"], rows, {1, 2, 3, 4}


def load_notes(load: list[LoadFigures]) -> list[str]:
    """What the load table's columns mean, and why runs failed when some did (printed under it)."""
    lines = ["messages/s: runs that finished ok, per second; x off: against coalescing off; "
             "failed/s: runs that raised FlowFailed, per second: an `on_error: fail` node failed, or the run "
             "passed the flow's 5 s deadline (the 200 messages wait for 10 connections; a busy machine makes "
             "that wait longer)"]
    for f in load:
        if not f.failures:
            continue
        why = "; ".join(f"{count} {reason}" for reason, count in sorted(f.failures.items(), key=lambda kv: -kv[1]))
        lines.append(f"failed with coalescing {'on' if f.coalesce else 'off'}: {why}")
    if not any(f.failures for f in load):
        lines.append("no run failed")
    return lines


def main_sync(server_dsn: str | None, runs: int, rtt_ms: float = 0.0) -> dict[str, Any]:
    """`run_demo` on an event loop of its own; the caller prints (the load table: `load_table`)."""
    return asyncio.run(run_demo(server_dsn, runs, rtt_ms))
