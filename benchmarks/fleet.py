"""A fleet of planner processes on one PostgreSQL: total messages/s, latency, server connections,
and every acknowledged message stored exactly once.

    python -m benchmarks.fleet --processes 1,2,4 --seconds 10 --rtt-ms 20

Each process is a service of its own (one `Planner`, pool of `--pool`, `--in-flight` messages
of `process_buffered` at a time, coalescing and the cache on), all of them through one latency
proxy process in front of the demo database. The parent samples the server's connections
(`pg_stat_activity`) while they run, then checks the table: each message a process acknowledged
appears once, none twice. On this 2-core machine the processes share the CPU with PostgreSQL and
the proxy: the report says how much CPU each part used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

import asyncpg

from planner import FlowFailed, Planner
from planner.demo.latency_proxy import ProxyProcess
from planner.demo.run import demo_dsn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def child(dsn: str, tag: str, index: int, in_flight: int, pool: int, seconds: float) -> dict[str, Any]:
    """One service process: messages back to back for `seconds`; what it acknowledged."""
    acked: list[str] = []
    latencies: list[float] = []
    failed = 0
    counter = iter(range(10**9))
    async with Planner(flows=os.path.join(ROOT, "flows"), dsn=dsn, min_size=pool, max_size=pool) as planner:
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal failed
            while time.perf_counter() < stop:
                i = next(counter)
                message = f"fleet {tag} {index} {i}"
                inputs = {"instance_name": f"inst-{(index * 997 + i) % 2000 + 1:05d}",
                          "user_phone": f"+1666{index:02d}{i % 100000:05d}", "message": message}
                t0 = time.perf_counter()
                try:
                    result = await planner.run("process_buffered", inputs)
                except FlowFailed:
                    failed += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                if result.output["stored"] is not None:
                    acked.append(message)
                    print("ack", message, flush=True)  # acknowledged as it happens: a killed process's count

        cpu0 = time.process_time()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        cpu = time.process_time() - cpu0
    return {"acked": acked, "latencies": latencies, "failed": failed, "cpu_s": cpu}


async def parent(args: argparse.Namespace) -> None:
    server = await demo_dsn(args.dsn or os.environ.get("DATABASE_URL"), lambda _m: None)
    print(f"# Fleet: process_buffered, {args.in_flight} in flight per process, pool {args.pool} each, "
          f"{args.rtt_ms:g} ms round trip, {args.seconds:g} s\n")
    print("| processes | msg/s in all | p50 ms | p95 ms | failed | server connections (max seen) | stored once | stored twice | client CPU s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    async with ProxyProcess(server, args.rtt_ms / 2) as proxy:
        for n in args.processes:
            tag = f"{os.getpid()}-{n}-{time.time_ns()}"
            procs = [await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.fleet", "--child", str(k), "--tag", tag, "--dsn", proxy.dsn,
                "--in-flight", str(args.in_flight), "--pool", str(args.pool), "--seconds", str(args.seconds),
                stdout=asyncio.subprocess.PIPE, cwd=ROOT, limit=1 << 26) for k in range(n)]
            admin = await asyncpg.connect(server)
            acks: list[list[str]] = [[] for _ in procs]
            finals: list[dict[str, Any] | None] = [None] * n

            readers = [asyncio.create_task(_read(procs[k], acks[k], finals, k)) for k in range(n)]
            seen = 0
            t0 = time.perf_counter()
            killed = False
            while any(p.returncode is None for p in procs) and time.perf_counter() - t0 < args.seconds + 60:
                seen = max(seen, await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"))
                if args.kill_one and n > 1 and not killed and time.perf_counter() - t0 > args.seconds / 2:
                    procs[0].kill()  # SIGKILL mid-load: no cleanup, connections dropped by the server
                    killed = True
                await asyncio.sleep(0.2)
            await asyncio.gather(*readers)
            for p in procs:
                await p.wait()
            outs = [f for f in finals if f is not None]
            acked = [m for a in acks for m in a]
            counts = await admin.fetch("SELECT content, count(*) AS n FROM whatsapp_conversation_messages "
                                       "WHERE content = ANY($1::text[]) GROUP BY content", acked)
            await admin.close()
            once = sum(1 for r in counts if r["n"] == 1)
            twice = sum(1 for r in counts if r["n"] > 1)
            latencies = [x for o in outs for x in o["latencies"]]
            p95 = statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else float("nan")
            note = " (one killed -9 half way)" if killed else ""
            print(f"| {n}{note} | {len(latencies) / args.seconds:.1f} | {statistics.median(latencies):.1f} | {p95:.1f} | "
                  f"{sum(o['failed'] for o in outs)} | {seen} | {once} of {len(acked)} | {twice} | "
                  f"{sum(o['cpu_s'] for o in outs):.1f} |", flush=True)


async def _read(proc: asyncio.subprocess.Process, acks: list[str], finals: list[dict[str, Any] | None], k: int) -> None:
    """A child's output: one `ack` line per acknowledged message, then its figures as JSON."""
    assert proc.stdout is not None
    async for raw in proc.stdout:
        line = raw.decode().rstrip("\n")
        if line.startswith("ack "):
            acks.append(line[4:])
        elif line.startswith("{"):
            finals[k] = json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--kill-one", action="store_true", help="kill -9 the first process half way (with 2 or more)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        out = asyncio.run(child(args.dsn, args.tag, args.child, args.in_flight, args.pool, args.seconds))
        out.pop("acked")  # already printed, one line each
        print(json.dumps(out))
        return
    args.processes = [int(n) for n in args.processes.split(",")]
    asyncio.run(parent(args))


if __name__ == "__main__":
    main()
