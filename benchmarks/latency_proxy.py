"""The latency proxy used by the benchmarks (it lives in `planner.demo`, which `planner demo --rtt` uses too).

    python -m benchmarks.latency_proxy --one-way-ms 10     # prints a DSN through the proxy; Ctrl-C stops
"""

from __future__ import annotations

import argparse
import asyncio
import os

from planner.demo.latency_proxy import LatencyProxy

__all__ = ["LatencyProxy"]


async def _serve(dsn: str, one_way_ms: float) -> None:
    async with LatencyProxy(dsn, one_way_ms) as proxy:
        print(proxy.dsn, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one-way-ms", type=float, default=10.0)
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args()
    from planner.db import embedded_dsn

    asyncio.run(_serve(args.dsn or embedded_dsn(), args.one_way_ms))
