"""What the batcher (`planner.db.batcher`) costs the wrappers built on it, with no database.

Each case sends the same queries through a wrapper and, as its baseline, straight to the same
fake backend (which answers after one turn of the loop, a batch after two): CPU microseconds
per query, best of interleaved rounds, and the wrapper's figure over the baseline's.

- coalescing, the pool busy: every query joins a batch (all parameters distinct; 20 distinct);
- fusion: a run's three sibling reads fused; lone reads (one fusible read per run: direct);
- the cache's single flight: concurrent misses on 50 keys (invalidated before each round).

Usage: python -m benchmarks.batcher_overhead [--rounds 9] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Callable, Coroutine
from typing import Any

from planner import load_flow
from planner.db.cache import CacheBackend
from planner.db.coalesce import CoalescingBackend
from planner.db.fuse import FusingBackend
from planner.kinds.backend import Outcome, Query
from planner.lang.nodes import CompiledNode

FLOW = """inputs: {n: int}
nodes:
  a: {sql: 'SELECT $n::int AS n', fetch: all}
  b: {sql: 'SELECT $n::int + 1 AS n', fetch: all}
  c: {sql: 'SELECT $n::int + 2 AS n', fetch: all}
  k: {sql: 'SELECT $n::int + 3 AS n', fetch: all, cache: 60s}
"""


class Fake:
    """A pool that answers every statement after one turn of the loop (a batch after two)."""

    def __init__(self, idle: bool) -> None:
        self._idle = idle

    def idle(self, share: float = 1.0) -> bool:
        return self._idle

    async def open(self) -> None:
        return None

    async def run(self, query: Query) -> Any:
        await asyncio.sleep(0)
        return [{"n": query.params[0][0]}]

    async def run_batch(self, node: CompiledNode, params: list[list[Any]],
                        started: Callable[[], None]) -> list[Outcome] | None:
        await asyncio.sleep(0)
        started()
        await asyncio.sleep(0)
        return [([{"n": p[0]}], None) for p in params]

    async def run_fused(self, queries: list[Query]) -> list[Outcome] | None:
        await asyncio.sleep(0)
        return [([{"n": q.params[0][0]}], None) for q in queries]

    async def close(self) -> None:
        return None


def cases(n: int) -> dict[str, Callable[[bool], Coroutine[Any, Any, float]]]:
    """Each case: `wrapped` -> CPU microseconds per query (baseline when not wrapped)."""
    nodes = load_flow(text=FLOW, name="batcher").nodes
    a, b, c, k = nodes["a"], nodes["b"], nodes["c"], nodes["k"]

    async def coalesce(wrapped: bool, distinct: int) -> float:
        fake = Fake(idle=False)
        backend = CoalescingBackend(fake, batches=fake) if wrapped else fake
        start = time.process_time()
        await asyncio.gather(*(backend.run(Query(a, [[i % distinct]])) for i in range(n)))
        return (time.process_time() - start) / n * 1e6

    async def fuse(wrapped: bool, siblings: tuple[CompiledNode, ...]) -> float:
        fake = Fake(idle=True)
        backend = FusingBackend(fake, fuser=fake) if wrapped else fake
        runs = n // len(siblings)

        async def one(r: int) -> None:
            run = object()
            await asyncio.gather(*(backend.run(Query(node, [[r]], run=run)) for node in siblings))

        start = time.process_time()
        await asyncio.gather(*(one(r) for r in range(runs)))
        return (time.process_time() - start) / (runs * len(siblings)) * 1e6

    async def cache(wrapped: bool) -> float:
        fake = Fake(idle=True)
        backend = CacheBackend(fake) if wrapped else None
        start = time.process_time()
        for _ in range(4):
            if backend is not None:
                backend.invalidate()
            target = backend if backend is not None else fake
            await asyncio.gather(*(target.run(Query(k, [[i % 50]])) for i in range(n // 4)))
        return (time.process_time() - start) / n * 1e6

    return {
        "coalescing, pool busy, all parameters distinct": lambda w: coalesce(w, 10**9),
        "coalescing, pool busy, 20 distinct parameters": lambda w: coalesce(w, 20),
        "fusion, 3 sibling reads per run": lambda w: fuse(w, (a, b, c)),
        "fusion, lone reads (sent direct)": lambda w: fuse(w, (a,)),
        "cache single flight, misses on 50 keys": cache,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    args = parser.parse_args()
    rounds, n = (1, 60) if args.smoke else (args.rounds, 2100)
    table = cases(n)
    best = {(case, wrapped): float("inf") for case in table for wrapped in (False, True)}
    for _ in range(rounds):
        for case, measure in table.items():
            for wrapped in (False, True):
                gc.collect()
                best[case, wrapped] = min(best[case, wrapped], asyncio.run(measure(wrapped)))
    print(f"## Batcher overhead ({rounds} rounds, {n} queries a case, CPU us per query)\n")
    print("| case | straight to the backend | through the wrapper | ratio |")
    print("|---|---|---|---|")
    for case in table:
        bare, through = best[case, False], best[case, True]
        print(f"| {case} | {bare:.1f} | {through:.1f} | {through / bare:.2f} |")


if __name__ == "__main__":
    main()
