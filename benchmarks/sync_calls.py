"""Sync `call:` nodes under load (issue 22): many users, few threads, every answer checked.

    python -m benchmarks.sync_calls                 # 200 users, 5 s per setup (about 15 s)
    python -m benchmarks.sync_calls --smoke         # tiny sizes, for CI

Each user runs a flow of one sync call (a blocking client: `time.sleep(call_ms)`) and one
async call, again and again, and checks the answer's content. Before issue 22 a sync call that
found every thread busy failed at once and its node defaulted: the run answered, wrongly. Now
it waits for a thread within its timeout. The figure to read is `wrong` (answers built on a
fallback value; it must be 0 unless `rejected` and the log say why), and throughput as a share
of what the threads can do at most (`threads / call_ms`).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import textwrap
import time
from pathlib import Path

from planner import CallOptions, FlowFailed, Planner
from planner.kinds.backend import Offline

FLOW = """
inputs: {i: int}
nodes:
  summary: {call: "work:summarize", with: {i: $i}}
  other: {call: "work:echo", with: {i: $i}}
output: {summary: $summary, other: $other}
"""

WORK = """
import time


def summarize(i: int) -> str:
    time.sleep({seconds})  # a blocking client, as a service's sync code has
    return f"s{{i}}"


async def echo(i: int) -> int:
    return i
"""


async def load(folder: Path, users: int, seconds: float, calls: CallOptions) -> dict[str, float]:
    """`users` users running the flow for `seconds`; what they got."""
    subject = Planner(flows=folder, backend=Offline("no database in this benchmark"), call_options=calls)
    runs = wrong = degraded = failed = 0
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def user(first: int) -> None:
        nonlocal runs, wrong, degraded, failed
        i = first
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                result = await subject.run("load", {"i": i})
            except FlowFailed:
                failed += 1
                continue
            latencies.append(time.monotonic() - started)
            runs += 1
            degraded += result.degraded
            wrong += result.output != {"summary": f"s{i}", "other": i}
            i += users

    await asyncio.gather(*(user(u) for u in range(users)))
    latencies.sort()
    return {"threads": subject.threads.size, "runs/s": runs / seconds, "wrong": wrong, "degraded": degraded,
            "failed": failed, "rejected": subject.threads.rejected, "waited": subject.threads.waited,
            "p50 ms": latencies[len(latencies) // 2] * 1000 if latencies else 0.0,
            "p95 ms": latencies[int(len(latencies) * 0.95)] * 1000 if latencies else 0.0}


async def main(users: int, seconds: float, call_ms: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "load.yaml").write_text(textwrap.dedent(FLOW))
        (folder / "work.py").write_text(WORK.format(seconds=call_ms / 1000))
        print(f"## Sync calls under load: {users} users, a {call_ms:g} ms sync call per run, {seconds:g} s each\n")
        print("| setup | threads | runs/s | share of the threads' bound | wrong | rejected | waited | p50 ms | p95 ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        setups: list[tuple[str, CallOptions]] = [
            ("default (32 threads)", CallOptions()),
            (f"concurrency={users}", CallOptions(concurrency=users)),
            ("threads=8", CallOptions(threads=8)),
        ]
        for name, calls in setups:
            got = await load(folder, users, seconds, calls)
            bound = got["threads"] / (call_ms / 1000)
            print(f"| {name} | {got['threads']:.0f} | {got['runs/s']:.0f} | {got['runs/s'] / bound:.2f} | "
                  f"{got['wrong']:.0f} | {got['rejected']:.0f} | {got['waited']:.0f} | {got['p50 ms']:.0f} | "
                  f"{got['p95 ms']:.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the benchmark still runs")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--call-ms", type=float, default=20.0)
    args = parser.parse_args()
    if args.smoke:
        asyncio.run(main(20, 0.3, 2.0))
    else:
        asyncio.run(main(args.users, args.seconds, args.call_ms))
