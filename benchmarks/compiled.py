"""Compiled flows (issue 21), side by side in one run: process_buffered (and escalation) on the
demo data over a simulated network, planner with and without compilation, the naive service,
and the floor: one statement per message written out and sent with asyncpg, no planner.

    python -m benchmarks.compiled --rtt 20 --runs 60 --seconds 3

Variants (each on a pool of its own, `seed_table`'s inputs and proxies):
- `naive`: the seed's code, every statement awaited in turn on one connection;
- `planner, uncompiled`: planner's defaults before issue 21 (`PLANNER_COMPILE=0`);
- `planner, compiled`: planner's defaults (compiled groups while the pool is under half busy,
  coalescing past that, `planner.run.compiled.COMPILE_BELOW`);
- `planner, compiled always`: the same with compiled statements under load too (the other
  side of that policy);
- `one statement`: the floor, one hand-sent statement per message (process_buffered only): the
  SQL of `planner explain process_buffered`, cold, sent with `con.fetch`.
Latency: one message at a time, cold (each message another instance) and warm (one instance:
the cached lookups hit); round trips per message counted at the proxy. Load: `--flights`
messages in flight on a pool of `--pool`, at `--rtt` ms and at 0 ms (messages per second,
client and server CPU per message).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from benchmarks import handwritten
from benchmarks.latency_proxy import ProxyProcess
from benchmarks.seed_table import FLOWS, ServerCpu, _pool, _warm_users, inputs, machine
from planner import Planner, PoolOptions, Settings, load_flow
from planner.compile import plan_groups
from planner.demo.run import demo_dsn, percentile, steady_load
from planner.lang.refs import resolve

Runner = Callable[[dict[str, Any]], Awaitable[Any]]
VARIANTS = ("naive", "planner, uncompiled", "planner, compiled", "planner, compiled always", "one statement")


@dataclass
class Row:
    trips_cold: float = float("nan")
    trips_warm: float = float("nan")
    p50_cold: float = float("nan")
    p95_cold: float = float("nan")
    p50_warm: float = float("nan")
    load: float = float("nan")  # msg/s at --rtt
    load_p50: float = float("nan")
    load0: float = float("nan")  # msg/s at 0 ms
    cpu0: float = float("nan")  # client us per message at 0 ms
    server0: float = float("nan")  # server us per message at 0 ms


def _one_statement(flow: str) -> Callable[[asyncpg.Pool, dict[str, Any]], Awaitable[Any]]:
    """process_buffered as the one statement `planner explain` prints, sent by hand."""
    compiled = load_flow(FLOWS / f"{flow}.yaml", name=flow)
    (group,) = plan_groups(compiled)
    defaults = {k: v.default for k, v in compiled.inputs.items() if not v.required}

    async def run(pool: asyncpg.Pool, i: dict[str, Any]) -> Any:
        values = {**defaults, **i}
        params = [True if p.kind == "guard" else p.value if p.kind == "lit" else resolve(p.ref, values)
                  for p in group.params]
        async with pool.acquire() as con:
            return await con.fetch(group.text, *params)

    return run


@contextlib.asynccontextmanager
async def variant(name: str, flow: str, dsn: str, size: int) -> AsyncIterator[tuple[Runner, Callable[[], Awaitable[None]]]]:
    if name in ("naive", "one statement"):
        # The floor keeps its connection's session as planner does (asyncpg's reset query on
        # release would be a second round trip per message); naive is the seed's code as it was.
        pool = await _pool(dsn, size) if name == "naive" else await asyncpg.create_pool(
            dsn, min_size=size, max_size=size, reset=_keep)
        fn = (handwritten.naive_process_buffered if flow == "process_buffered" else handwritten.naive_escalation) \
            if name == "naive" else _one_statement(flow)
        try:
            yield (lambda i: fn(pool, i)), _nothing
        finally:
            await pool.close()
        return
    settings = dataclasses.replace(Settings.from_env(), compile=name != "planner, uncompiled")
    async with Planner(flows=FLOWS, dsn=dsn, settings=settings, pool_options=PoolOptions(min_size=size, max_size=size)) as planner:
        runners = (await planner.versions.entry(flow)).compiled
        assert bool(runners) == (name != "planner, uncompiled"), name
        if name == "planner, compiled always":
            for runner in runners:
                runner.below = 2.0  # compiled whatever the pool's load
        yield (lambda i: planner.run(flow, i)), planner.stack.primary.drain


async def _keep(con: asyncpg.Connection) -> None:
    return None


async def _nothing() -> None:
    return None


async def latency(proxy: ProxyProcess, flow: str, runs: int, rows: dict[str, Row], names: list[str]) -> None:
    for name in names:
        async with variant(name, flow, proxy.dsn, 10) as (run, drain):
            for warm in (False, True):
                for _ in range(10):  # pool open, statements prepared, the cache warm where it can be
                    await run(inputs(flow, warm))
                await drain()
                before = await proxy.requests()
                samples = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    await run(inputs(flow, warm))
                    samples.append((time.perf_counter() - t0) * 1000)
                await drain()
                trips = (await proxy.requests() - before) / runs
                row = rows[name]
                if warm:
                    row.trips_warm, row.p50_warm = trips, statistics.median(samples)
                else:
                    row.trips_cold, row.p50_cold, row.p95_cold = trips, statistics.median(samples), percentile(samples, 0.95)
        print(f"  latency: {name}: {rows[name]}", flush=True)


async def load(dsn: str, flow: str, names: list[str], pool: int, flights: int, seconds: float,
               server: ServerCpu | None, rows: dict[str, Row], zero: bool) -> None:
    for name in names:
        async with variant(name, flow, dsn, pool) as (run, drain):
            await run(inputs(flow))

            async def read(first: bool) -> tuple[float, float]:
                return time.process_time(), server.seconds() if server else 0.0

            w = await steady_load(lambda: run(inputs(flow)), flights, seconds / 3, seconds, read)
            await drain()
            assert w.first is not None and w.last is not None
            n = max(w.done, 1)
            row = rows[name]
            if zero:
                row.load0 = w.ok_per_s
                row.cpu0 = (w.last[0] - w.first[0]) / n * 1e6
                row.server0 = (w.last[1] - w.first[1]) / n * 1e6 if server else float("nan")
            else:
                row.load, row.load_p50 = w.ok_per_s, w.p50_ms
        print(f"  load {'0 ms' if zero else 'rtt'}: {name}: {rows[name]}", flush=True)


def render(flow: str, rows: dict[str, Row], args: argparse.Namespace) -> str:
    r, p, n = args.rtt, args.pool, args.flights
    lines = [f"### {flow}", "",
             f"| variant | round trips/msg cold | warm | p50 cold @{r} ms | p95 cold | p50 warm @{r} ms | "
             f"msg/s @{r} ms, {n} in flight, pool {p} | p50 there | msg/s @0 ms, {n} in flight, pool {p} | "
             "client CPU us/msg @0 | server CPU us/msg @0 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row.trips_cold:.2f} | {row.trips_warm:.2f} | {row.p50_cold:.1f} | {row.p95_cold:.1f} | "
                     f"{row.p50_warm:.1f} | {row.load:.0f} | {row.load_p50:.1f} | {row.load0:.0f} | {row.cpu0:.0f} | "
                     f"{row.server0:.0f} |")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> str:
    dsn = await demo_dsn(args.dsn or os.environ.get("DATABASE_URL"), lambda m: print(m, flush=True))
    await _warm_users(dsn)
    server = await ServerCpu.find(dsn)
    out = [f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {machine()}; command: "
           f"`python -m benchmarks.compiled {' '.join(args.argv)}`", ""]
    async with ProxyProcess(dsn, args.rtt / 2) as proxy:
        for flow in args.flows.split(","):
            names = [v for v in VARIANTS if v != "one statement" or flow == "process_buffered"]
            rows = {name: Row() for name in names}
            await latency(proxy, flow, args.runs, rows, names)
            if args.seconds > 0:
                await load(proxy.dsn, flow, names, args.pool, args.flights, args.seconds, None, rows, zero=False)
                await load(dsn, flow, names, args.pool, args.flights, args.seconds, server, rows, zero=True)
            table = render(flow, rows, args)
            print(table, flush=True)
            out += [table, ""]
    return "\n".join(out)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtt", type=int, default=20)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=3.0, help="load measuring time per cell (0: skip)")
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--flights", type=int, default=200)
    parser.add_argument("--flows", default="process_buffered,escalation")
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check it still runs")
    args = parser.parse_args()
    import sys

    args.argv = sys.argv[1:]
    if args.smoke:
        args.runs, args.seconds, args.flights = 3, 0.5, 4
    print(asyncio.run(main(args)))


if __name__ == "__main__":
    cli()
