"""The seed's claims, measured: the two seed flows on the demo data, over a real network delay.

    python -m benchmarks.seed_table                # full run, about 10 minutes; writes BENCHMARKS.md
    python -m benchmarks.seed_table --smoke        # tiny sizes, for CI (seconds)
    python -m benchmarks.seed_table --profile      # where the time goes in one eager run at 0 ms

Variants, all sending the same statements: `naive` (awaited one after another on one
connection), `gather` (the seed's hand-written asyncio.gather groups, `async with
pool.acquire()` per query), and planner in `sequential`, `layered` and `eager` mode. Latency
runs are interleaved variant by variant so the machine's noise hits all alike.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks import handwritten
from benchmarks.latency_proxy import LatencyProxy
from planner import FlowFailed, Planner
from planner import __version__ as planner_version
from planner.demo.run import demo_dsn, percentile, queries_of
from planner.graph import CompiledFlow, plan

ROOT = Path(__file__).resolve().parent.parent
FLOWS = ROOT / "flows"
Runner = Callable[[dict[str, Any]], Awaitable[Any]]
VARIANTS = ("naive", "gather", "sequential", "layered", "eager")
_ids = itertools.count()


def inputs(flow: str) -> dict[str, Any]:
    i = next(_ids)
    phone = f"+1555{(i // 2000) % 10 + 1:07d}"
    if flow == "process_buffered":
        return {"instance_name": f"inst-{i % 2000 + 1:05d}", "user_phone": phone, "message": f"bench {time.time_ns()} {i}"}
    return {"instance_id": 3 + i % 2000, "user_phone": phone, "message": "I need an agent" if i % 4 == 0 else "thanks"}


def runners(flow: str, pool: asyncpg.Pool, planner: Planner) -> dict[str, Runner]:
    """The hand-written variants on `pool` (asyncpg's defaults, as a user creates it); planner on
    `planner`, which owns its own pool of the same size (as `run_flow` users get it)."""
    naive = handwritten.naive_process_buffered if flow == "process_buffered" else handwritten.naive_escalation
    gather = handwritten.gather_process_buffered if flow == "process_buffered" else handwritten.gather_escalation

    def mode(m: str) -> Runner:
        return lambda i: planner.run(flow, i, mode=m)

    return {"naive": lambda i: naive(pool, i), "gather": lambda i: gather(pool, i),
            **{m: mode(m) for m in ("sequential", "layered", "eager")}}


def critical_round_trips(flow: CompiledFlow, states: dict[str, str]) -> float:
    """Round trips on the critical path of one run: the floor of any schedule, in round trips."""
    trips = {n: float(queries_of(flow, {n: s})) for n, s in states.items()}
    return plan(flow, trips).parallel_ms


@dataclass
class Figures:
    latency_ms: dict[int, dict[str, list[float]]] = field(default_factory=dict)  # rtt -> variant -> samples
    floor_trips: list[float] = field(default_factory=list)
    round_trips: dict[str, float] = field(default_factory=dict)
    throughput: dict[tuple[int, int], dict[str, tuple[float, float]]] = field(default_factory=dict)  # (pool, in flight) -> variant -> (ok, failed) runs/s


async def _pool(dsn: str, size: int) -> asyncpg.Pool:
    from planner.db import _init_connection

    return await asyncpg.create_pool(dsn, min_size=size, max_size=size, init=_init_connection)


def _planner(dsn: str, size: int) -> Planner:
    return Planner(flows=FLOWS, dsn=dsn, min_size=size, max_size=size)


async def count_round_trips(server: str, flow: str, runs: int) -> dict[str, float]:
    """Chunks each variant sends per run, counted at a zero-delay proxy (resets included)."""
    out = {}
    for variant in VARIANTS:
        async with LatencyProxy(server, 0) as proxy:
            pool = await _pool(proxy.dsn, 4)
            async with _planner(proxy.dsn, 4) as planner:
                run = runners(flow, pool, planner)[variant]
                for _ in range(3):
                    await run(inputs(flow))
                await planner.backend.drain()
                before = proxy.requests
                for _ in range(runs):
                    await run(inputs(flow))
                await planner.backend.drain()
                out[variant] = (proxy.requests - before) / runs
            await pool.close()
    return out


async def measure_latency(dsn: str, flow: str, runs: int, figures: Figures, rtt: int) -> None:
    pool = await _pool(dsn, 10)
    async with _planner(dsn, 10) as planner:
        compiled = planner.load(flow)
        run = runners(flow, pool, planner)
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(5):
            for variant in VARIANTS:
                await run[variant](inputs(flow))
        for _ in range(runs):
            for variant in VARIANTS:
                t0 = time.perf_counter()
                result = await run[variant](inputs(flow))
                samples[variant].append((time.perf_counter() - t0) * 1000)
                if variant == "eager" and rtt == 0:
                    figures.floor_trips.append(critical_round_trips(compiled, result.states()))
        figures.latency_ms[rtt] = samples
    await pool.close()


async def measure_throughput(dsn: str, flow: str, pool_size: int, in_flight: int, seconds: float) -> dict[str, tuple[float, float]]:
    out = {}
    for variant in VARIANTS:
        pool = await _pool(dsn, pool_size)
        async with _planner(dsn, pool_size) as planner:
            run = runners(flow, pool, planner)[variant]
            for _ in range(3):
                await run(inputs(flow))
            out[variant] = await _runs_per_second(run, flow, in_flight, seconds)
        await pool.close()
    return out


async def _runs_per_second(run: Runner, flow: str, in_flight: int, seconds: float) -> tuple[float, float]:
    """`in_flight` workers run back to back until `seconds` pass: (ok runs/s, failed runs/s).

    A planner run that fails (say, a node timed out waiting for a connection) is counted apart;
    the hand-written versions have no timeouts and simply wait."""
    done = failed = 0
    t0 = time.perf_counter()
    stop = t0 + seconds

    async def worker() -> None:
        nonlocal done, failed
        while time.perf_counter() < stop:
            try:
                await run(inputs(flow))
                done += 1
            except FlowFailed:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - t0
    return done / elapsed, failed / elapsed


def render(flow: str, f: Figures, rtts: list[int], pools: list[int], flights: list[int]) -> str:
    lines = [f"### {flow}", ""]
    head = "| variant | round trips/run | " + " | ".join(f"p50 @{r} ms | p95 @{r} ms" for r in rtts)
    top = max(rtts)
    head += f" | p50 vs naive @{top} | p50 vs gather @{top} |"
    lines += [head, "|---|---:|" + "---:|---:|" * len(rtts) + "---:|---:|"]
    for v in VARIANTS:
        cells = [f"{statistics.median(f.latency_ms[r][v]):.2f} | {percentile(f.latency_ms[r][v], 0.95):.2f}" for r in rtts]
        p50 = statistics.median(f.latency_ms[top][v])
        naive = statistics.median(f.latency_ms[top]["naive"])
        gather = statistics.median(f.latency_ms[top]["gather"])
        lines.append(f"| {v} | {f.round_trips.get(v, float('nan')):.1f} | " + " | ".join(cells)
                     + f" | {p50 / naive:.2f} ({(p50 / naive - 1) * 100:+.0f}%) | {p50 / gather:.2f} |")
    floor = statistics.median(f.floor_trips) if f.floor_trips else float("nan")
    lines += ["", f"Critical path of an eager run (median): {floor:g} round trip{'s' if floor != 1 else ''}, so the floor is " +
              ", ".join(f"{floor * r:g} ms @{r} ms" for r in rtts) + "."]
    if f.throughput:
        lines += ["", f"Throughput at {top} ms round trip: successful runs per second, ratio to naive in brackets, "
                  "and failed runs per second where any (planner's node timeouts under overload):", ""]
        cols = [(p, n) for p in pools for n in flights]
        lines.append("| variant | " + " | ".join(f"pool {p}, {n} in flight" for p, n in cols) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        for v in VARIANTS:
            cells = []
            for c in cols:
                ok, failed = f.throughput[c][v]
                cells.append(f"{ok:.1f} ({ok / f.throughput[c]['naive'][0]:.2f}x)" + (f", {failed:.1f} failed" if failed else ""))
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def goals(f: Figures, rtts: list[int]) -> str:
    top = max(rtts)
    eager, naive, gather = (statistics.median(f.latency_ms[top][v]) for v in ("eager", "naive", "gather"))
    floor = statistics.median(f.floor_trips) * top
    zero = (statistics.median(f.latency_ms[0]["eager"]) / statistics.median(f.latency_ms[0]["gather"])) if 0 in f.latency_ms else float("nan")
    return "\n".join([
        f"- eager p50 @{top} ms is {(1 - eager / naive) * 100:.1f}% below naive (goal: at least 55%): {'met' if eager <= 0.45 * naive else 'NOT met'}",
        f"- eager p50 / gather p50 @{top} ms = {eager / gather:.3f} (goal: at most 1.0): {'met' if eager <= gather else 'NOT met'}",
        f"- eager p50 @{top} ms = {eager:.1f} ms vs floor {floor:.0f} ms: +{(eager / floor - 1) * 100:.1f}% (goal: within 10%): {'met' if eager <= 1.1 * floor else 'NOT met'}",
        f"- eager p50 / gather p50 @0 ms = {zero:.3f} (goal: at most 1.2): {'met' if zero <= 1.2 else 'NOT met'}",
    ]) + "\n"


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
    rtts = [int(r) for r in args.rtts.split(",")]
    report = [f"# Benchmarks: the seed flows on PostgreSQL {pg_version}", "",
              f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.",
              f"Command: `{' '.join(['python -m benchmarks.seed_table', *args.argv])}`; {args.runs} runs per variant and round trip, "
              f"throughput over {args.seconds:g} s per cell.", ""]
    for flow in ("process_buffered", "escalation"):
        figures = Figures()
        figures.round_trips = await count_round_trips(dsn, flow, max(5, args.runs // 10))
        for rtt in rtts:
            if rtt == 0:
                await measure_latency(dsn, flow, args.runs, figures, 0)
            else:
                async with LatencyProxy(dsn, rtt / 2) as proxy:
                    await measure_latency(proxy.dsn, flow, args.runs, figures, rtt)
            print(f"{flow}: latency at {rtt} ms done", flush=True)
        print(render(flow, figures, rtts, args.pools, args.flights), flush=True)
        if args.seconds > 0:
            async with LatencyProxy(dsn, max(rtts) / 2) as proxy:
                for p in args.pools:
                    for n in args.flights:
                        figures.throughput[(p, n)] = await measure_throughput(proxy.dsn, flow, p, n, args.seconds)
            print(f"{flow}: throughput done", flush=True)
        table = render(flow, figures, rtts, args.pools, args.flights)
        print(table)
        report.append(table)
        if flow == "process_buffered" and 0 in rtts:
            text = goals(figures, rtts)
            print(text)
            report += ["Goals (issue 5):", "", text]
    return "\n".join(report)


async def profile(runs: int) -> None:
    """cProfile over eager runs of process_buffered at 0 ms: the share of each part."""
    import cProfile
    import pstats

    dsn = await demo_dsn(os.environ.get("DATABASE_URL"), print)
    pool = await _pool(dsn, 10)
    async with _planner(dsn, 10) as planner:
        for _ in range(20):
            await planner.run("process_buffered", inputs("process_buffered"))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(runs):
            await planner.run("process_buffered", inputs("process_buffered"))
        prof.disable()
    await pool.close()
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
    rules = [("asyncpg", "asyncpg"), ("planner/executor", "planner executor"), ("planner/refs", "planner reference resolution"),
             ("planner/expr", "planner reference resolution"), ("planner/db", "planner db layer"), ("planner/", "planner other"),
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
    parser.add_argument("--seconds", type=float, default=2.0, help="throughput measuring time per cell (0: skip)")
    parser.add_argument("--dsn", default=None, help="server DSN (default: DATABASE_URL, else embedded)")
    parser.add_argument("--out", default="BENCHMARKS.md")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    args.pools, args.flights = [10, 20], [1, 50, 200]
    if args.smoke:
        args.runs, args.rtts, args.seconds, args.out = 3, "0,2", 0.3, None
        args.pools, args.flights = [4], [1, 4]
    if args.profile:
        asyncio.run(profile(500))
    else:
        text = asyncio.run(main(args))
        if args.out:
            Path(args.out).write_text(text)
            print(f"wrote {args.out}")
