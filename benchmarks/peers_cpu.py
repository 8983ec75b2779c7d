"""The peers suite's W3 and W4 (../shared/bench/peers) as CPU time of this process: planner beside
c2 (precompiled in-degree counters and done callbacks, the tuned minimal scheduler), same DAGs,
same node functions, interleaved rounds, ratios planner / c2.

The suite's own figures are wall-clock medians, which on a shared machine move with whatever
else runs (c2 itself varied 2x between two runs of the same tree). CPU time of this process
does not count time other processes took, so the ratio compares the two engines' own work.

    python -m benchmarks.peers_cpu                       # about a minute
    python -m benchmarks.peers_cpu --smoke               # tiny sizes, to check it still runs
    PYTHONPATH=<other tree> <its venv>/bin/python benchmarks/peers_cpu.py   # another tree, same script

W3: zero-latency DAGs of 1,000 nodes (fan-out, chain, random k=3); one run per executor per
round; CPU us per node, min and median over rounds. W4: the seed flow with 1 ms nodes, N
flows with at most 200 in flight, CPU us per flow (the suite's `throughput_async`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

DEFAULT_PEERS = Path(__file__).resolve().parent.parent.parent / "shared" / "bench" / "peers"

Runner = Callable[[], Awaitable[Any]]


async def w3(ex: Any, dags: Any, rounds: int, nodes: int) -> list[tuple[str, list[float], list[float]]]:
    out = []
    for dag in (dags.fanout(nodes), dags.chain(nodes), dags.random_dag(nodes, 3, 42)):
        runners: dict[str, Runner] = {"planner": ex.prepare_planner(dag), "c2": ex.prepare_eager_callbacks(dag)}
        assert await runners["planner"]() == await runners["c2"](), dag.name
        times: dict[str, list[float]] = {name: [] for name in runners}
        for r in range(rounds):
            for name in (list(runners) if r % 2 == 0 else list(reversed(runners))):
                gc.collect()
                c0 = time.process_time()
                await runners[name]()
                times[name].append((time.process_time() - c0) / len(dag.deps) * 1e6)
        out.append((dag.name, times["planner"], times["c2"]))
    return out


async def w4(ex: Any, dags: Any, bench: Any, rounds: int, flows: int) -> tuple[list[float], list[float]]:
    dag = dags.w1_seed_flow().scaled(latency=1e-3)
    runners: dict[str, Runner] = {"planner": ex.prepare_planner(dag), "c2": ex.prepare_eager_callbacks(dag)}
    for runner in runners.values():
        await bench.throughput_async(runner, 200, 200)  # warm-up
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds):
        for name in (list(runners) if r % 2 == 0 else list(reversed(runners))):
            got = await bench.throughput_async(runners[name], flows, 200)
            cpu[name].append(got["cpu_s"] / flows * 1e6)
    return cpu["planner"], cpu["c2"]


def _line(label: str, planner: list[float], c2: list[float]) -> str:
    med = statistics.median
    return (f"| {label} | {min(planner):.2f} / {med(planner):.2f} | {min(c2):.2f} / {med(c2):.2f} | "
            f"{min(planner) / min(c2):.2f}x / {med(planner) / med(c2):.2f}x |")


async def main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(args.peers))
    import bench  # type: ignore[import-not-found]
    import dags  # type: ignore[import-not-found]
    import executors as ex  # type: ignore[import-not-found]

    import planner

    rounds, nodes, flows = (3, 50, 50) if args.smoke else (args.rounds, 1000, args.flows)
    print(f"planner from {Path(planner.__file__).parent}; CPU time of this process; min / median over {rounds} rounds")
    print("| workload | planner | c2 callbacks | planner / c2 |")
    print("|---|---:|---:|---:|")
    for name, p, c in await w3(ex, dags, rounds, nodes):
        print(_line(f"W3 {name} CPU us/node", p, c))
    p, c = await w4(ex, dags, bench, max(2, rounds // 3), flows)
    print(_line(f"W4 CPU us/flow ({flows} flows, 200 in flight, 1 ms nodes)", p, c))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=Path, default=DEFAULT_PEERS,
                        help="the peers suite's folder (default ../shared/bench/peers)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--flows", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the benchmark still runs")
    asyncio.run(main(parser.parse_args()))
