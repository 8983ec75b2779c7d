"""What metrics cost per node: the seed-shaped 8-node flow of `call:` nodes that return at once
(no database, so nothing hides the engine's own cost), run back to back by one Planner per
variant, in interleaved rounds; the best round of each, in CPU microseconds of this process.

    python -m benchmarks.metrics_overhead            # about half a minute
    python -m benchmarks.metrics_overhead --smoke    # tiny sizes, to check it still runs

Variants: `metrics=False`; no metrics but a do-nothing observer (the price of the observer
hooks themselves); `Metrics(otel=False)` (Prometheus text only); the default (the process-wide
`Metrics`, with opentelemetry-api installed and no SDK configured).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from benchmarks.shapes import SEED_SHAPE, flow_yaml
from planner import CallOptions, Metrics, Planner, load_flow
from planner.kinds.backend import Offline
from planner.results import NodeResult


class DoNothing:
    """An observer that watches and does nothing: what the hooks cost before any work."""

    def run_started(self, flow: str, run_id: str, mode: str) -> None:
        pass

    def node_started(self, flow: str, run_id: str, node: str, kind: str,
                     coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any]:
        return coro

    def node_settled(self, flow: str, run_id: str, node: str, result: NodeResult) -> None:
        pass

    def run_finished(self, flow: str, run_id: str, status: str) -> None:
        pass


async def main(smoke: bool) -> None:
    runs, rounds = (50, 2) if smoke else (1000, 21)
    flow = load_flow(text=flow_yaml({n: d for n, (d, _ms) in SEED_SHAPE.items()}, "benchmarks.shapes:zero"),
                     name="seed_shape")
    offline = Offline("no database in this benchmark")

    def make(**kw: Any) -> Planner:
        return Planner(backend=offline, **kw, call_options=CallOptions(allowed_modules=["benchmarks"]))

    variants = {
        "metrics=False": make(metrics=False),
        "no metrics, a do-nothing observer": make(metrics=False, observers=[DoNothing()]),
        "Metrics(otel=False)": make(metrics=Metrics(otel=False)),
        "default (OpenTelemetry API, no SDK)": make(),
    }
    best = dict.fromkeys(variants, float("inf"))
    for planner in variants.values():
        for _ in range(min(runs, 200)):
            await planner.run(flow)
    for _ in range(rounds):
        for name, planner in variants.items():
            t0 = time.process_time()
            for _ in range(runs):
                await planner.run(flow)
            best[name] = min(best[name], (time.process_time() - t0) / runs * 1e6)
    nodes = len(SEED_SHAPE)
    base = best["metrics=False"]
    print(f"| variant | us/run | x off | us/node more |  ({runs} runs x {rounds} rounds, best round, CPU time)")
    print("|---|---|---|---|")
    for name, us in best.items():
        print(f"| {name} | {us:.1f} | {us / base:.2f} | {(us - base) / nodes:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the benchmark still runs")
    asyncio.run(main(parser.parse_args().smoke))
