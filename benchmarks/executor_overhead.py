"""Executor overhead, throughput and makespan: planner against a minimal reference scheduler.

    python -m benchmarks.executor_overhead            # full run (about a minute)
    python -m benchmarks.executor_overhead --smoke    # tiny sizes, for CI

Every comparison runs in one process, in interleaved rounds, so machine noise hits both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.reference import reference_run, sequential_awaits
from benchmarks.shapes import SEED_SHAPE, UNEVEN_SHAPE, chain, fan_out, flow_yaml, random_dag
from planner import CallOptions, CompiledFlow, FlowResult, Planner, load_flow
from planner.graph import plan
from planner.kinds.backend import Offline

_planner = Planner(backend=Offline("no database in this benchmark"), call_options=CallOptions(allowed_modules=["benchmarks"]))


def build(deps: dict[str, list[str]], call: str, extra: dict[str, str] | None = None) -> tuple[CompiledFlow, None]:
    return load_flow(text=flow_yaml(deps, call, extra), name="bench"), None


async def execute(flow: CompiledFlow, _bound: None, inputs: dict[str, Any], mode: str | None = None) -> FlowResult:
    return await _planner.run(flow, inputs, mode=mode)


async def _time(fn: Callable[..., Awaitable[Any]], *args: Any) -> float:
    t0 = time.perf_counter()
    await fn(*args)
    return time.perf_counter() - t0


async def overhead(n: int, rounds: int) -> None:
    from benchmarks.shapes import zero

    print(f"\n## Overhead: zero-latency nodes, {n} nodes, best of {rounds} interleaved rounds\n")
    print("| shape | planner us/node | reference us/node | ratio planner/reference |")
    print("|---|---:|---:|---:|")
    for label, deps in (("fan-out", fan_out(n)), ("chain", chain(n)), ("random DAG (3 deps)", random_dag(n))):
        flow, bound = build(deps, "benchmarks.shapes:zero")
        ours, ref = [], []
        for _ in range(rounds):
            ours.append(await _time(execute, flow, bound, {}))
            ref.append(await _time(reference_run, deps, zero))
        a, b = min(ours) / n * 1e6, min(ref) / n * 1e6
        print(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f} |")


async def throughput(runs: int, in_flight: int) -> None:
    from benchmarks.shapes import sleep_ms

    deps = {k: v[0] for k, v in SEED_SHAPE.items()}
    args = {k: {"ms": 1} for k in deps}
    flow, bound = build(deps, "benchmarks.shapes:sleep_ms", {k: "ms: 1" for k in deps})
    order = list(flow.order)

    async def many(one: Callable[[], Awaitable[Any]]) -> float:
        gate = asyncio.Semaphore(in_flight)

        async def guarded() -> None:
            async with gate:
                await one()

        t0 = time.perf_counter()
        await asyncio.gather(*(guarded() for _ in range(runs)))
        return runs / (time.perf_counter() - t0)

    sides = {
        "planner (eager)": lambda: execute(flow, bound, {}),
        "reference scheduler": lambda: reference_run(deps, sleep_ms, args),
        "bare sequential awaits": lambda: sequential_awaits(order, deps, sleep_ms, args),
    }
    rates: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(3):
        for label, one in sides.items():
            rates[label].append(await many(one))
    base = statistics.median(rates["bare sequential awaits"])
    print(f"\n## Throughput: seed-shaped 8-node DAG, 1 ms nodes, {runs} runs, {in_flight} in flight (median of 3)\n")
    print("| runner | runs/s | x bare sequential |")
    print("|---|---:|---:|")
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"| {label} | {rate:,.0f} | {rate / base:.2f} |")


async def makespan(rounds: int) -> None:
    from benchmarks.shapes import sleep_ms  # noqa: F401 - imported by the flow

    print(f"\n## Makespan: sleep-latency nodes (median of {rounds})\n")
    print("| shape | critical path ms | eager ms | eager vs path | layered ms | layered vs path | sequential ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, shape in (("uneven (a10->b100, c100->d10)", UNEVEN_SHAPE), ("seed process_buffered", SEED_SHAPE)):
        deps = {k: v[0] for k, v in shape.items()}
        flow, bound = build(deps, "benchmarks.shapes:sleep_ms", {k: f"ms: {v[1]}" for k, v in shape.items()})
        path = plan(flow, {k: v[1] for k, v in shape.items()}).parallel_ms
        times: dict[str, list[float]] = {"eager": [], "layered": [], "sequential": []}
        for _ in range(rounds):
            for mode in times:
                result = await execute(flow, bound, {}, mode=mode)
                times[mode].append(result.elapsed_ms)
        e, lay, s = (statistics.median(times[m]) for m in ("eager", "layered", "sequential"))
        print(f"| {label} | {path:.0f} | {e:.1f} | +{(e / path - 1) * 100:.1f}% | {lay:.1f} | +{(lay / path - 1) * 100:.1f}% | {s:.1f} |")


async def main(smoke: bool) -> None:
    await overhead(50 if smoke else 1000, 2 if smoke else 15)
    await throughput(40 if smoke else 2000, 10 if smoke else 200)
    await makespan(1 if smoke else 10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the benchmark still runs")
    asyncio.run(main(parser.parse_args().smoke))
