"""Do process_buffered's `coalesce: true` writes still combine under load? (issue 19, item 7)

    python -m benchmarks.write_combining                   # 1,500 runs, 200 in flight, pool 10
    python -m benchmarks.write_combining --runs 100 --in-flight 20

Runs process_buffered with `benchmarks.seed_table`'s cold inputs on the demo data (planner's
defaults: coalescing and the cache on) and prints msg/s, and for `conversation` and
`store_message` how many runs were answered by a shared statement and the mean batch size,
and the transactions the database rolled back meanwhile (a combined write refused, by the
overlap guard or anything else, is one). Run it before and after a change, side by side, on
one machine: the absolute msg/s moves with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import asyncpg

from benchmarks.seed_table import _planner, _warm_users, inputs
from planner.demo.run import demo_dsn

WRITES = ("conversation", "store_message")
ROLLBACKS = "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()"


async def main(args: argparse.Namespace) -> None:
    dsn = await demo_dsn(args.dsn or os.environ.get("DATABASE_URL"), lambda _: None)
    await _warm_users(dsn)
    planner = _planner(dsn, args.pool)
    con = await asyncpg.connect(dsn)
    sizes: dict[str, list[int]] = {name: [] for name in WRITES}
    try:
        async with planner:
            for _ in range(50):  # warm: the pool open, the statements prepared
                await planner.run("process_buffered", inputs("process_buffered"))
            await asyncio.sleep(1.2)  # the server's statistics are reported at most once a second
            before = await con.fetchval(ROLLBACKS)
            gate = asyncio.Semaphore(args.in_flight)

            async def one() -> None:
                async with gate:
                    result = await planner.run("process_buffered", inputs("process_buffered"))
                for name in WRITES:
                    node = result.nodes.get(name)
                    if node is not None and node.served is not None:
                        sizes[name].append(node.served.batch)

            started = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(args.runs)))
            elapsed = time.perf_counter() - started
        await asyncio.sleep(1.2)
        rollbacks = await con.fetchval(ROLLBACKS) - before
    finally:
        await con.close()
    print(f"{args.runs} runs, {args.in_flight} in flight, pool {args.pool}: {args.runs / elapsed:.0f} msg/s; "
          f"transactions rolled back: {rollbacks}")
    for name, batches in sizes.items():
        shared = sum(1 for b in batches if b > 1)
        mean = statistics.mean(batches) if batches else 0.0
        print(f"  {name}: {shared}/{len(batches)} answered by a shared statement, mean batch {mean:.1f}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1500)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--dsn", default=None, help="server DSN (default: DATABASE_URL, else embedded)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
