"""The seed's claims, measured: the two seed flows on the demo data, over a real network delay.

    python -m benchmarks.seed_table                # full run, about 20 minutes; writes BENCHMARKS.md
    python -m benchmarks.seed_table --smoke        # tiny sizes, for CI (seconds)
    python -m benchmarks.seed_table --profile      # where the time goes in one eager run at 0 ms

Variants, all sending the same statements: `naive` (awaited one after another on one
connection), `gather` (the seed's hand-written asyncio.gather groups, `async with
pool.acquire()` per query), and planner in `sequential`, `layered` and `eager` mode, with
planner's defaults (coalescing and the cache on); then eager with each of them switched off
(`PLANNER_COALESCE=0`, `PLANNER_CACHE=0`, both: the behaviour before either existed), and
eager with the cache warm (every message for one instance, whose cached lookups then hit).
Latency runs are interleaved variant by variant so the machine's noise hits all alike.

The delaying proxy runs in a process of its own (`ProxyProcess`): in a thread it would share
the GIL, and the CPU time, of the process it measures. It counts the round trips it carries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import os
import platform
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks import handwritten
from benchmarks.latency_proxy import ProxyProcess
from planner import FlowResult, Planner, PoolOptions, Settings
from planner import __version__ as planner_version
from planner.db.coalesce import CoalescingBackend
from planner.db.fuse import FusingBackend
from planner.demo.run import demo_dsn, percentile, queries_of, steady_load
from planner.graph import CompiledFlow, plan

ROOT = Path(__file__).resolve().parent.parent
FLOWS = ROOT / "flows"
Runner = Callable[[dict[str, Any]], Awaitable[Any]]
_ids = itertools.count()

WARM_INSTANCE, WARM_INSTANCE_ID = "acme", 1  # the demo's instance 1: escalation on, a webhook
WARM_PHONES = 1000  # the warm variant's users: concurrent messages are different users'


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str | None = None  # planner's mode; None: hand-written on asyncpg
    coalesce: bool = True  # PLANNER_COALESCE when its Planner is made
    cache: bool = True  # PLANNER_CACHE when its Planner is made
    warm: bool = False  # every message for one instance: the cached lookups hit


EAGER, NO_COALESCE, NO_CACHE, NEITHER, WARM = (
    "eager, coalesce + cache", "eager, no coalesce", "eager, no cache", "eager, neither", "eager, cache warm")
VARIANTS = (
    Variant("naive"),
    Variant("gather"),
    Variant("sequential", "sequential"),
    Variant("layered", "layered"),
    Variant(EAGER, "eager"),
    Variant(NO_COALESCE, "eager", coalesce=False),
    Variant(NO_CACHE, "eager", cache=False),
    Variant(NEITHER, "eager", coalesce=False, cache=False),
    Variant(WARM, "eager", warm=True),
)
NAMES = [v.name for v in VARIANTS]


def inputs(flow: str, warm: bool = False) -> dict[str, Any]:
    """One message's inputs. Cold: consecutive messages go to different instances (2,000 of
    them), so a 30 s cache rarely hits within a measurement. Warm: all go to one instance, from
    `WARM_PHONES` different users."""
    i = next(_ids)
    if warm:
        phone = f"+1555{i % WARM_PHONES + 1:07d}"
        if flow == "process_buffered":
            return {"instance_name": WARM_INSTANCE, "user_phone": phone, "message": f"bench {time.time_ns()} {i}"}
        return {"instance_id": WARM_INSTANCE_ID, "user_phone": phone, "message": "I need an agent" if i % 4 == 0 else "thanks"}
    phone = f"+1555{(i // 2000) % 10 + 1:07d}"
    if flow == "process_buffered":
        return {"instance_name": f"inst-{i % 2000 + 1:05d}", "user_phone": phone, "message": f"bench {time.time_ns()} {i}"}
    return {"instance_id": 3 + i % 2000, "user_phone": phone, "message": "I need an agent" if i % 4 == 0 else "thanks"}


async def _warm_users(dsn: str) -> None:
    """The warm variant's users have a conversation, as the cold variants' users do (the
    find-or-create then takes the same path for both). Idempotent."""
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(
            """INSERT INTO whatsapp_conversations (instance_id, user_phone)
               SELECT $1::int, '+1555' || lpad(g::text, 7, '0') FROM generate_series(1, $2::int) AS g
               ON CONFLICT DO NOTHING""", WARM_INSTANCE_ID, WARM_PHONES)
    finally:
        await con.close()


# --- the variants ---------------------------------------------------------------------------


def _planner(dsn: str, size: int, *, coalesce: bool = True, cache: bool = True) -> Planner:
    # Fusion goes with coalescing: `coalesce=False` is "no statement shared", the behaviour before both.
    settings = dataclasses.replace(Settings.from_env(), coalesce=coalesce, fuse=coalesce, cache=cache)
    planner = Planner(flows=FLOWS, dsn=dsn, settings=settings, pool_options=PoolOptions(min_size=size, max_size=size))
    fuser = planner.stack.fusers["primary"]
    coalescer = planner.stack.coalescers["primary"]
    assert planner.cache.enabled == cache
    assert isinstance(fuser, FusingBackend) and fuser.enabled == coalesce
    assert isinstance(coalescer, CoalescingBackend) and coalescer.enabled == coalesce
    return planner


async def _pool(dsn: str, size: int) -> asyncpg.Pool:
    from planner.db.pool import _init_connection

    return await asyncpg.create_pool(dsn, min_size=size, max_size=size, init=_init_connection)


def _hand(flow: str, variant: Variant, pool: asyncpg.Pool) -> Runner:
    if variant.name == "naive":
        naive = handwritten.naive_process_buffered if flow == "process_buffered" else handwritten.naive_escalation
        return lambda i: naive(pool, i)
    gather = handwritten.gather_process_buffered if flow == "process_buffered" else handwritten.gather_escalation
    return lambda i: gather(pool, i)


def _mode(flow: str, variant: Variant, planner: Planner) -> Runner:
    mode = variant.mode
    return lambda i: planner.run(flow, i, mode=mode)


@dataclass
class Running:
    """One variant ready to run: `run` a message, `drain` its background work (connections
    going back to the pool)."""

    run: Runner
    drain: Callable[[], Awaitable[None]]
    planner: Planner | None


async def _nothing() -> None:
    return None


@contextlib.asynccontextmanager
async def running(flow: str, variant: Variant, dsn: str, size: int) -> AsyncIterator[Running]:
    """`variant` on a pool of `size` connections of its own (a Planner of its own for planner's)."""
    if variant.mode is None:
        pool = await _pool(dsn, size)
        try:
            yield Running(_hand(flow, variant, pool), _nothing, None)
        finally:
            await pool.close()
        return
    async with _planner(dsn, size, coalesce=variant.coalesce, cache=variant.cache) as planner:
        yield Running(_mode(flow, variant, planner), planner.stack.primary.drain, planner)


def critical_round_trips(flow: CompiledFlow, result: FlowResult) -> float:
    """Round trips on the critical path of one run (a node served from the cache sends none):
    the floor of any schedule, in round trips."""
    trips = {}
    for name, node in result.nodes.items():
        cached = node.served is not None and node.served.cached
        trips[name] = 0.0 if cached else float(queries_of(flow, {name: node.state}))
    return plan(flow, trips).parallel_ms


# --- server work ------------------------------------------------------------------------------


class ServerCpu:
    """CPU time of a PostgreSQL server's processes on this machine: the postmaster and its
    children (backends, WAL writer, checkpointer...), plus the children it has reaped (a
    backend that ended), read from /proc. Every process of the server counts, whoever it
    works for: measure on a server nobody else is using.

    A living process's time is read in nanoseconds (`/proc/<pid>/schedstat`; PostgreSQL's
    processes have one thread each), where the kernel has it: `stat`'s clock ticks (10 ms)
    are too coarse for a few messages' work. The reaped children's time only exists in ticks
    (`cutime`, `cstime` of the postmaster): a backend that ends during a measurement moves from
    the one to the other, its difference still right to within a tick."""

    def __init__(self, postmaster: int) -> None:
        self.postmaster = postmaster
        self._tick = os.sysconf("SC_CLK_TCK")

    @classmethod
    async def find(cls, dsn: str) -> ServerCpu | None:
        """The server of `dsn`, if it runs here and /proc can be read; else None. Its
        postmaster is the parent of the backend serving a connection."""
        try:
            con = await asyncpg.connect(dsn)
            try:  # read while the backend lives: it ends with the connection
                return cls._of_backend(await con.fetchval("SELECT pg_backend_pid()"))
            finally:
                await con.close()
        except (OSError, ValueError, IndexError, asyncpg.PostgresError):
            return None

    @classmethod
    def _of_backend(cls, backend: int) -> ServerCpu | None:
        parent = int(_stat(backend)[1])
        if Path(f"/proc/{parent}/comm").read_text().strip() not in ("postgres", "postmaster"):
            return None  # not a server of this machine
        found = cls(parent)
        found.seconds()
        return found

    def seconds(self) -> float:
        fields = _stat(self.postmaster)
        total = (int(fields[13]) + int(fields[14])) / self._tick  # cutime, cstime: the reaped children
        for pid in [self.postmaster, *self._children()]:
            with contextlib.suppress(OSError, IndexError, ValueError):  # ended meanwhile: counted in cutime
                total += self._own(pid)
        return total

    def _own(self, pid: int) -> float:
        """The CPU time of living process `pid`, in seconds."""
        try:
            return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
        except FileNotFoundError:
            if not Path(f"/proc/{pid}").exists():
                raise
            fields = _stat(pid)  # a kernel without schedstat: utime + stime, in ticks
            return (int(fields[11]) + int(fields[12])) / self._tick

    def _children(self) -> list[int]:
        out = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    if int(_stat(int(entry.name))[1]) == self.postmaster:
                        out.append(int(entry.name))
        return out


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: [state, ppid, ...]; utime is [11]."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


# --- measuring ------------------------------------------------------------------------------


@dataclass
class Load:
    """One variant under one load."""

    ok: float  # successful messages per second
    failed: float  # failed messages per second (planner's timeouts under overload)
    p50: float  # ms per message, under this load
    p95: float
    trips: float | None  # round trips per successful message, counted at the proxy (None: no proxy)
    cpu_us: float  # CPU time of this process per successful message
    server_us: float | None  # CPU time of the server's processes per successful message (None: unknown)


LoadKey = tuple[int, int, int]  # (round trip ms, pool size, messages in flight)


@dataclass
class Figures:
    latency_ms: dict[int, dict[str, list[float]]] = field(default_factory=dict)  # rtt -> variant -> samples
    floor_trips: dict[str, list[float]] = field(default_factory=dict)  # variant -> critical path of each run
    round_trips: dict[str, float] = field(default_factory=dict)  # variant -> round trips per run, 1 in flight
    load: dict[LoadKey, dict[str, Load]] = field(default_factory=dict)


async def count_round_trips(proxy: ProxyProcess, flow: str, runs: int, warmup: int = 20) -> dict[str, float]:
    """Round trips each variant starts per run, 1 in flight, counted at a zero-delay proxy
    (connection resets included). First `warmup` runs uncounted: the pool open, the statements
    prepared on its connections (each prepares its own, once), the cache warm where it can be."""
    out = {}
    for variant in VARIANTS:
        async with running(flow, variant, proxy.dsn, 10) as r:  # the latency runs' pool size
            for _ in range(warmup):
                await r.run(inputs(flow, variant.warm))
            await r.drain()
            before = await proxy.requests()
            for _ in range(runs):
                await r.run(inputs(flow, variant.warm))
            await r.drain()
            out[variant.name] = (await proxy.requests() - before) / runs
    return out


async def measure_latency(dsn: str, flow: str, runs: int, figures: Figures, rtt: int) -> None:
    """One message at a time, every variant in turn; at 0 ms the critical path of each eager run too."""
    async with contextlib.AsyncExitStack() as stack:
        planners: dict[tuple[bool, bool], Planner] = {}
        run: dict[str, Runner] = {}
        pool = await _pool(dsn, 10)
        stack.push_async_callback(pool.close)
        for v in VARIANTS:
            if v.mode is None:
                run[v.name] = _hand(flow, v, pool)
                continue
            key = (v.coalesce, v.cache)
            if key not in planners:
                planners[key] = await stack.enter_async_context(_planner(dsn, 10, coalesce=v.coalesce, cache=v.cache))
            run[v.name] = _mode(flow, v, planners[key])
        compiled = planners[(True, True)].load(flow)
        samples: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
        for _ in range(5):
            for v in VARIANTS:
                await run[v.name](inputs(flow, v.warm))
        for _ in range(runs):
            for v in VARIANTS:
                t0 = time.perf_counter()
                result = await run[v.name](inputs(flow, v.warm))
                samples[v.name].append((time.perf_counter() - t0) * 1000)
                if v.name in (EAGER, WARM) and rtt == 0:
                    figures.floor_trips.setdefault(v.name, []).append(critical_round_trips(compiled, result))
        figures.latency_ms[rtt] = samples


async def measure_load(dsn: str, proxy: ProxyProcess | None, server: ServerCpu | None, flow: str,
                       pool_size: int, in_flight: int, seconds: float, warmup: float | None = None) -> dict[str, Load]:
    """Every variant in turn, `in_flight` messages at a time on `pool_size` connections (see `_load`)."""
    out = {}
    for variant in VARIANTS:
        async with running(flow, variant, dsn, pool_size) as r:
            await r.run(inputs(flow, variant.warm))  # the pool open
            out[variant.name] = await _load(r, flow, variant.warm, in_flight,
                                            seconds / 4 if warmup is None else warmup, seconds, proxy, server)
    return out


@dataclass(frozen=True)
class _Counters:
    cpu: float  # process_time
    server: float
    trips: int


async def _load(r: Running, flow: str, warm: bool, in_flight: int, warmup: float, seconds: float,
                proxy: ProxyProcess | None, server: ServerCpu | None) -> Load:
    """`in_flight` messages run back to back, measured in steady state (`steady_load`: after
    `warmup` and the first wave, for `seconds` and at least `in_flight` messages).

    Every cost is the difference of two readings over the messages done between them (the
    work of messages running across either reading cancels out, on average), per successful
    message. A planner run that fails (a node timed out waiting for a connection, say) is
    counted apart; the hand-written versions have no timeouts and simply wait."""

    async def read(first: bool) -> _Counters:  # the reading's own work (/proc, the pipe) left out of the CPU window
        if first:
            trips = await proxy.requests() if proxy else 0
            server_s = server.seconds() if server else 0.0
            return _Counters(time.process_time(), server_s, trips)
        cpu = time.process_time()
        server_s = server.seconds() if server else 0.0
        return _Counters(cpu, server_s, await proxy.requests() if proxy else 0)

    w = await steady_load(lambda: r.run(inputs(flow, warm)), in_flight, warmup, seconds, read)
    await r.drain()
    assert w.first is not None and w.last is not None
    n = max(w.done, 1)
    return Load(
        ok=w.ok_per_s, failed=w.failed_per_s, p50=w.p50_ms,
        p95=percentile(w.latencies_ms, 0.95) if w.latencies_ms else float("nan"),
        trips=(w.last.trips - w.first.trips) / n if proxy else None, cpu_us=(w.last.cpu - w.first.cpu) / n * 1e6,
        server_us=(w.last.server - w.first.server) / n * 1e6 if server else None)


# --- the report ---------------------------------------------------------------------------


def _p50(f: Figures, rtt: int, variant: str) -> float:
    samples = f.latency_ms.get(rtt, {}).get(variant)
    return statistics.median(samples) if samples else float("nan")


def _floor(f: Figures, variant: str) -> float:
    values = f.floor_trips.get(variant)
    return statistics.median(values) if values else float("nan")


def render(flow: str, f: Figures, rtts: list[int]) -> str:
    lines = [f"### {flow}", ""]
    head = "| variant | round trips/run | " + " | ".join(f"p50 @{r} ms | p95 @{r} ms" for r in rtts)
    top = max(rtts)
    head += f" | p50 vs naive @{top} | p50 vs gather @{top} |"
    lines += [head, "|---|---:|" + "---:|---:|" * len(rtts) + "---:|---:|"]
    naive, gather = _p50(f, top, "naive"), _p50(f, top, "gather")
    for v in NAMES:
        cells = [f"{statistics.median(f.latency_ms[r][v]):.2f} | {percentile(f.latency_ms[r][v], 0.95):.2f}" for r in rtts]
        p50 = _p50(f, top, v)
        lines.append(f"| {v} | {f.round_trips.get(v, float('nan')):.1f} | " + " | ".join(cells)
                     + f" | {p50 / naive:.2f} ({(p50 / naive - 1) * 100:+.0f}%) | {p50 / gather:.2f} |")
    lines.append("")
    for v, what in ((EAGER, "an eager run"), (WARM, "an eager run with the cache warm")):
        floor = _floor(f, v)
        lines.append(f"Critical path of {what} (median): {floor:g} round trip{'s' if floor != 1 else ''}, so the floor is "
                     + ", ".join(f"{floor * r:g} ms @{r} ms" for r in rtts) + ".")
    lines.append("")
    for (rtt, pool, n), cell in f.load.items():
        where = f"{rtt} ms round trip" if rtt else "0 ms round trip (no proxy: CPU-bound)"
        lines += [f"Load: {where}, pool {pool}, {n} in flight", ""]
        lines += ["| variant | msg/s | x naive | failed/s | p50 ms | p95 ms | round trips/msg | client CPU us/msg | server CPU us/msg |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        base = cell["naive"].ok
        for v in NAMES:
            c = cell[v]
            trips = "-" if c.trips is None else f"{c.trips:.2f}"
            server = "-" if c.server_us is None else f"{c.server_us:.0f}"
            ratio = f"{c.ok / base:.2f}x" if base else "-"
            lines.append(f"| {v} | {c.ok:.1f} | {ratio} | {c.failed:.1f} | {c.p50:.1f} | {c.p95:.1f} | {trips} | "
                         f"{c.cpu_us:.0f} | {server} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def goals(f: Figures, rtts: list[int]) -> str:
    """Issue 5's goals: eager's latency against the hand-written versions and the floor."""
    top = max(rtts)
    eager, naive, gather = (_p50(f, top, v) for v in (EAGER, "naive", "gather"))
    floor = _floor(f, EAGER) * top
    zero = _p50(f, 0, EAGER) / _p50(f, 0, "gather")
    return "\n".join([
        f"- eager p50 @{top} ms is {(1 - eager / naive) * 100:.1f}% below naive (goal: at least 55%): {_met(eager <= 0.45 * naive)}",
        f"- eager p50 / gather p50 @{top} ms = {eager / gather:.3f} (goal: at most 1.0): {_met(eager <= gather)}",
        f"- eager p50 @{top} ms = {eager:.1f} ms vs floor {floor:.0f} ms: +{(eager / floor - 1) * 100:.1f}% (goal: within 10%): "
        f"{_met(eager <= 1.1 * floor)}",
        f"- eager p50 / gather p50 @0 ms = {zero:.3f} (goal: at most 1.2): {_met(zero <= 1.2)}",
    ]) + "\n"


# Figures of eager before coalescing and the cache (BENCHMARKS.md of 2026-11-25): the issues' baselines.
OLD = {"p10_200": 58.4, "p10_50": 58.2, "p50_20": 85.7, "trips": 8.3, "p50_0": 1.32}


def _at_least(bound: float) -> Callable[[float], bool]:
    return lambda x: x >= bound


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def goals_coalesce_cache(f: Figures) -> str:
    """Issues 11 (coalescing) and 12 (cache): process_buffered at 20 ms unless said otherwise.
    Each line: the figure, the goal, met or not; in brackets, `eager, neither` of this run (the
    old behaviour, measured now on the same machine) where it is the baseline."""
    out: list[str] = []
    nan = float("nan")

    def at(rtt: int, pool: int, n: int, variant: str, what: str = "ok") -> float:
        cell = f.load.get((rtt, pool, n), {}).get(variant)
        value = None if cell is None else getattr(cell, what)
        return nan if value is None else float(value)

    def goal(text: str, value: float, ok: Callable[[float], bool], fmt: str = "{:.1f}", extra: str = "") -> None:
        if value != value:  # nan: not measured in this run
            out.append(f"- {text}: not measured in this run")
        else:
            out.append(f"- {text}: {fmt.format(value)}{extra}: {_met(ok(value))}")

    def old(value: float, fmt: str = "{:.1f}") -> str:
        return "" if value != value else f" (eager, neither: {fmt.format(value)})"

    for pool, least in ((10, 600.0), (20, 800.0)):
        goal(f"#11 msg/s, 200 in flight, pool {pool} (goal: at least {least:g}; was {OLD['p10_200']} at pool 10)",
             at(20, pool, 200, EAGER), _at_least(least), extra=old(at(20, pool, 200, NEITHER)))
    goal(f"#11 msg/s, 50 in flight, pool 10 (goal: at least 3x old eager's {OLD['p10_50']} = {3 * OLD['p10_50']:.0f})",
         at(20, 10, 50, EAGER), lambda x: x >= 3 * OLD["p10_50"], extra=old(at(20, 10, 50, NEITHER)))
    goal(f"#11 p50, 1 in flight (goal: within 3% of old eager's {OLD['p50_20']} ms = {OLD['p50_20'] * 1.03:.1f} ms)",
         _p50(f, 20, EAGER), lambda x: x <= OLD["p50_20"] * 1.03, "{:.1f} ms", old(_p50(f, 20, NEITHER), "{:.1f} ms"))
    for pool in (10, 20):
        goal(f"#11 round trips per message, 200 in flight, pool {pool} (goal: at most 1.5; was {OLD['trips']})",
             at(20, pool, 200, EAGER, "trips"), lambda x: x <= 1.5, "{:.2f}", old(at(20, pool, 200, NEITHER, "trips"), "{:.2f}"))
    mine, naive = at(20, 10, 200, EAGER, "server_us"), at(20, 10, 200, "naive", "server_us")
    goal("#11 server CPU per message, 200 in flight, pool 10, below naive's (goal: at least 40% below)",
         (1 - mine / naive) * 100 if naive else nan, lambda x: x >= 40, "{:.0f}%",
         f" ({mine:.0f} us vs naive {naive:.0f} us; eager, neither: {at(20, 10, 200, NEITHER, 'server_us'):.0f} us)")
    zero = next((k for k in f.load if k[0] == 0), (0, 10, 200))
    where = f"0 ms, {zero[2]} in flight, pool {zero[1]}"
    mine, before = at(*zero, EAGER), at(*zero, NEITHER)
    goal(f"#11 msg/s, {where}, x eager, neither (goal: at least 1.5x)", mine / before if before else nan,
         lambda x: x >= 1.5, "{:.2f}x", f" ({mine:.0f} vs {before:.0f})")
    mine, before = at(*zero, EAGER, "cpu_us"), at(*zero, NEITHER, "cpu_us")
    goal(f"#11 client CPU per message, {where}, x eager, neither (goal: at most 0.6x)", mine / before if before else nan,
         lambda x: x <= 0.6, "{:.2f}x", f" ({mine:.0f} us vs {before:.0f} us)")
    goal(f"#12 statements (round trips) per message, 1 in flight, cache warm (goal: at most 5; was {OLD['trips']})",
         f.round_trips.get(WARM, nan), lambda x: x <= 5, "{:.1f}", old(f.round_trips.get(NEITHER, nan)))
    goal("#12 round trips on the critical path, cache warm (goal: at most 3)", _floor(f, WARM), lambda x: x <= 3, "{:g}",
         f" (cold: {_floor(f, EAGER):g})")
    goal("#12 p50 @20 ms, 1 in flight, cache warm (goal: at most 66 ms)", _p50(f, 20, WARM), lambda x: x <= 66,
         "{:.1f} ms", old(_p50(f, 20, NEITHER), "{:.1f} ms"))
    goal(f"#12 msg/s @20 ms, 50 in flight, pool 10, cache warm (goal: at least 1.6x old eager's {OLD['p10_50']} = "
         f"{1.6 * OLD['p10_50']:.1f})", at(20, 10, 50, WARM), lambda x: x >= 1.6 * OLD["p10_50"],
         extra=old(at(20, 10, 50, NEITHER)))
    goal(f"#12 p50 @0 ms, 1 in flight, cache warm (goal: not above old eager's {OLD['p50_0']} ms)", _p50(f, 0, WARM),
         lambda x: x <= OLD["p50_0"], "{:.2f} ms", old(_p50(f, 0, NEITHER), "{:.2f} ms"))
    return "\n".join(out) + "\n"


def machine() -> str:
    import importlib.metadata as md

    return (f"{platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"asyncpg {md.version('asyncpg')}, planner {planner_version}")


async def main(args: argparse.Namespace) -> str:
    server = args.dsn or os.environ.get("DATABASE_URL")
    dsn = await demo_dsn(server, lambda m: print(m, flush=True))
    con = await asyncpg.connect(dsn)
    pg_version = await con.fetchval("SHOW server_version")
    await con.close()
    await _warm_users(dsn)
    server_cpu = await ServerCpu.find(dsn)
    rtts = [int(r) for r in args.rtts.split(",")]
    top = max(rtts)
    started = time.perf_counter()

    def done(what: str) -> None:
        print(f"{what} done ({time.perf_counter() - started:.0f} s)", flush=True)

    report = [f"# Benchmarks: the seed flows on PostgreSQL {pg_version}", "",
              f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.",
              f"Command: `{' '.join(['python -m benchmarks.seed_table', *args.argv])}`; {args.runs} runs per variant and round trip, "
              f"load measured over {args.seconds:g} s per cell (after "
              f"{args.seconds / 4 if args.load_warmup is None else args.load_warmup:g} s unmeasured).",
              "" if server_cpu else "Server CPU: not measured (the server does not run on this machine, or /proc cannot be read).",
              ""]
    async with contextlib.AsyncExitStack() as stack:
        proxies = {r: await stack.enter_async_context(ProxyProcess(dsn, r / 2)) for r in sorted({0, *rtts})}
        for flow in args.flows:
            figures = Figures()
            figures.round_trips = await count_round_trips(proxies[0], flow, args.count_runs, args.warmup)
            done(f"{flow}: round trips counted")
            for rtt in rtts:
                await measure_latency(proxies[rtt].dsn if rtt else dsn, flow, args.runs, figures, rtt)
                done(f"{flow}: latency at {rtt} ms")
            if args.seconds > 0:
                for p in args.pools:
                    for n in args.flights:
                        figures.load[(top, p, n)] = await measure_load(
                            proxies[top].dsn, proxies[top], server_cpu, flow, p, n, args.seconds, args.load_warmup)
                        done(f"{flow}: load at {top} ms, pool {p}, {n} in flight")
                p, n = args.cpu_bound
                figures.load[(0, p, n)] = await measure_load(dsn, None, server_cpu, flow, p, n, args.seconds,
                                                             args.load_warmup)
                done(f"{flow}: load at 0 ms")
            table = render(flow, figures, rtts)
            print(table)
            report.append(table)
            if flow == "process_buffered" and 0 in rtts:
                for head, text in (("Goals (issue 5):", goals(figures, rtts)),
                                   ("Goals (issues 11 and 12: coalescing and the cache; process_buffered at 20 ms unless said):",
                                    goals_coalesce_cache(figures))):
                    print(f"{head}\n\n{text}")
                    report += [head, "", text]
    return "\n".join(report)


async def profile(runs: int) -> None:
    """cProfile over eager runs of process_buffered at 0 ms: the share of each part."""
    import cProfile
    import pstats

    dsn = await demo_dsn(os.environ.get("DATABASE_URL"), print)
    async with _planner(dsn, 10) as planner:
        for _ in range(20):
            await planner.run("process_buffered", inputs("process_buffered"))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(runs):
            await planner.run("process_buffered", inputs("process_buffered"))
        prof.disable()
    stats = pstats.Stats(prof)
    shares: dict[str, float] = {}
    for (path, _line, fn), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        name = _category(path, fn)
        shares[name] = shares.get(name, 0.0) + tottime
    shares.setdefault("pydantic", 0.0)  # models are validated when a flow loads, never per run
    total = sum(shares.values())
    print(f"profile of {runs} eager runs of process_buffered at 0 ms (share of CPU time by where it is spent):")
    for name, seconds in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<34} {seconds / total * 100:5.1f}%  ({seconds / runs * 1e6:.0f} us per run)")


def _category(path: str, fn: str) -> str:
    if path == "~":  # C functions: say which
        if "poll" in fn or "select" in fn:
            return "waiting for I/O (epoll)"
        if any(w in fn for w in ("send", "recv", "socket")):
            return "socket I/O"
        return "other C builtins"
    rules = [("asyncpg", "asyncpg"), ("planner/run/executor", "planner executor"), ("planner/run/compiled", "planner compiled groups"),
             ("planner/run/metrics", "planner metrics"), ("planner/lang/refs", "planner reference resolution"),
             ("planner/lang/expr", "planner reference resolution"), ("planner/db/coalesce", "planner coalescing"),
             ("planner/db/cache", "planner cache"), ("planner/db/catalog", "planner effects (catalog)"),
             ("planner/db/effects", "planner effects (catalog)"),
             ("planner/db/judge", "planner effects (catalog)"), ("planner/lang/probe", "planner effects (catalog)"),
             ("planner/db", "planner db layer"), ("planner/", "planner other"),
             ("pydantic", "pydantic"), ("asyncio", "asyncio event loop"), ("selectors", "asyncio event loop")]
    for needle, name in rules:
        if needle in path:
            return name
    return "other Python"


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the benchmark still runs")
    parser.add_argument("--profile", action="store_true", help="profile eager runs at 0 ms instead")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rtts", default="0,5,20", help="round trips in ms, comma-separated")
    parser.add_argument("--seconds", type=float, default=2.0, help="load measuring time per cell (0: skip)")
    parser.add_argument("--pools", default="10,20", help="pool sizes of the load tables, comma-separated")
    parser.add_argument("--flights", default="1,50,200", help="messages in flight of the load tables, comma-separated")
    parser.add_argument("--load-warmup", type=float, default=None,
                        help="unmeasured seconds at load before each cell (default: a quarter of --seconds)")
    parser.add_argument("--flows", default="process_buffered,escalation", help="flows to measure, comma-separated")
    parser.add_argument("--dsn", default=None, help="server DSN (default: DATABASE_URL, else embedded)")
    parser.add_argument("--out", default="BENCHMARKS.md")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    args.pools, args.flights = [int(p) for p in args.pools.split(",")], [int(n) for n in args.flights.split(",")]
    args.flows = [f for f in args.flows.split(",") if f]
    args.cpu_bound = (10, 200)  # the 0 ms load: pool, in flight
    args.warmup, args.count_runs = 20, max(20, args.runs // 5)  # runs uncounted, then counted, for round trips/run
    if args.smoke:
        args.runs, args.rtts, args.seconds, args.out, args.warmup, args.count_runs = 2, "0,2", 0.1, None, 3, 2
        args.pools, args.flights, args.cpu_bound = [2], [3], (2, 3)
    if args.profile:
        asyncio.run(profile(500))
    else:
        text = asyncio.run(main(args))
        if args.out:
            Path(args.out).write_text(text)
            print(f"wrote {args.out}")
