"""A slow member of a read batch and the fast runs beside it (issue 19, item 6).

    python -m benchmarks.batch_split                 # 30 runs, one at 4 s, pool 3, 5 rounds
    python -m benchmarks.batch_split --smoke         # seconds: one round, the slow one at 0.3 s

`runs` runs of one read (`SELECT bench_echo($v, $ms)`, a STABLE function that sleeps `ms`
milliseconds and returns `v`) start together on a pool of `pool` connections: all but one ask
for 0 ms, one for `slow_ms`. Runs that find a connection busy join one batch (coalescing), so
the slow member shares a statement with most of the fast ones, and before issue 19 made them
all wait for it while a connection sat free. Printed: the fast runs' median and p95 latency
(the median of the rounds), the slow run's, and the batches split (`PoolBackend.splits`). The
statement is first run alone a few times, as on a service that has been serving it: the
split bound comes from its recorded latencies. Uses `DATABASE_URL` (or `--dsn`), else the
embedded server; the function is created in a `planner_bench_split` database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

import asyncpg

from planner import Planner, PoolOptions, load_flow
from planner.db.admin import create_database, with_database
from planner.db.pool import PoolBackend

DATABASE = "planner_bench_split"
FUNCTION = """
CREATE OR REPLACE FUNCTION bench_echo(v int, ms int) RETURNS int STABLE LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_sleep(ms / 1000.0); RETURN v; END $$
"""
FLOW = """
inputs: {v: int, ms: int}
nodes:
  q: {sql: "SELECT bench_echo($v::int, $ms::int) AS v", fetch: value}
"""


async def database(server: str) -> str:
    dsn = with_database(server, DATABASE)
    try:
        con = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        await create_database(server, DATABASE)
        con = await asyncpg.connect(dsn)
    try:
        await con.execute(FUNCTION)
    finally:
        await con.close()
    return dsn


async def one_round(dsn: str, runs: int, slow_at: int, slow_ms: int, pool: int) -> tuple[list[float], float, int]:
    """The fast runs' latencies (s), the slow run's, and the batches split."""
    flow = load_flow(text=FLOW, name="split")
    async with Planner(dsn=dsn, pool_options=PoolOptions(min_size=pool, max_size=pool)) as planner:  # the default stack: coalescing on
        inner: Any = planner.pools["primary"]
        assert isinstance(inner, PoolBackend)
        for v in range(10):  # served alone first: its latency is recorded
            await planner.run(flow, {"v": v, "ms": 0})
        await planner.stack.primary.drain()

        async def timed(v: int) -> float:
            started = time.perf_counter()
            result = await planner.run(flow, {"v": v, "ms": slow_ms if v == slow_at else 0})
            assert result.values["q"] == v
            return time.perf_counter() - started

        latencies = await asyncio.gather(*(timed(v) for v in range(runs)))
    fast = [t for v, t in enumerate(latencies) if v != slow_at]
    return fast, latencies[slow_at], getattr(inner, "splits", 0)  # no such figure before issue 19


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


async def main(args: argparse.Namespace) -> None:
    from planner.db.embedded import embedded_dsn

    server = str(args.dsn or os.environ.get("DATABASE_URL") or await asyncio.to_thread(embedded_dsn))
    dsn = await database(server)
    medians, p95s, slows, splits = [], [], [], 0
    for _ in range(args.rounds):
        fast, slow, split = await one_round(dsn, args.runs, args.slow_at, args.slow_ms, args.pool)
        medians.append(statistics.median(fast))
        p95s.append(_p95(fast))
        slows.append(slow)
        splits += split
    print(f"{args.runs} runs, one at {args.slow_ms} ms (run {args.slow_at}), pool {args.pool}, {args.rounds} rounds")
    print("| fast runs' median | fast runs' p95 | slow run | batches split |")
    print("|---:|---:|---:|---:|")
    print(f"| {statistics.median(medians) * 1000:.0f} ms | {statistics.median(p95s) * 1000:.0f} ms "
          f"| {statistics.median(slows) * 1000:.0f} ms | {splits} |")
    print("per round, fast median (ms):", ", ".join(f"{m * 1000:.0f}" for m in medians))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one round, the slow member at 300 ms")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--slow-ms", type=int, default=4000)
    parser.add_argument("--slow-at", type=int, default=10, help="which run is slow (the first `pool` go alone)")
    parser.add_argument("--pool", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dsn", default=None, help="server DSN (default: DATABASE_URL, else embedded)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.slow_ms = 1, 300
    return args


if __name__ == "__main__":
    asyncio.run(main(parse()))
