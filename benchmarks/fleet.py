"""A fleet of planner processes on one PostgreSQL: total messages/s, latency, server connections,
round trips, and every acknowledged message stored exactly once; direct, through PgBouncer, and
with a streaming read replica.

    python -m benchmarks.fleet --processes 1,2,4 --seconds 10 --rtt-ms 20
    python -m benchmarks.fleet --processes 1,2 --via direct,pgbouncer --rounds 3
    python -m benchmarks.fleet --processes 4 --via pgbouncer --bouncer-pool 20
    python -m benchmarks.fleet --processes 1,2 --via direct,pgbouncer --replica
    python -m benchmarks.fleet --processes 3 --kill-one

Each process is a service of its own (one `Planner`, pool of `--pool`, `--in-flight` messages
of `process_buffered` at a time, coalescing and the cache on). Every server it talks to is
behind a latency proxy process of its own (`--rtt-ms`), so the proxies also count the round
trips each server was sent.

- `--via pgbouncer` puts a PgBouncer in transaction mode (the suite's launcher,
  tests/support/pgbouncer.py) between the proxy and the server, as a pooler beside the database would
  be; the processes know it from `?pgbouncer=transaction`. Its pool is `--bouncer-pool`, by
  default the fleet's `processes x pool`: the same server connections as direct.
- `--replica` runs every configuration on a primary of the benchmark's own with a streaming
  replica (tests/support/replica_pair.py), with and without `replica_dsn=`; through PgBouncer, the
  replica has a PgBouncer of its own.

The parent samples the servers' connections (`pg_stat_activity`) and the machine's CPU while
the fleet runs, then checks the table: each message a process acknowledged appears once, none
twice. Configurations are interleaved, round after round (`--rounds`), so that a slow moment of
this noisy machine does not land on one of them only; the summary gives each one's median.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from planner import FlowFailed, Planner, PoolOptions
from planner.db.admin import with_database
from planner.demo.latency_proxy import ProxyProcess
from planner.demo.run import DEMO_DATABASE, demo_dsn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Only the connections this configuration opened (`backend_start` from $1, the server's clock when
# it began): a server connection an earlier configuration or a neighbour left (a PgBouncer keeps
# its idle server connections for minutes) is not this fleet's.
SERVER_CONNECTIONS = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND backend_start >= $1")
SERVER_NOW = "SELECT clock_timestamp()"


async def _server_now(dsn: str | None) -> Any:
    if dsn is None:
        return None
    con = await asyncpg.connect(dsn)
    try:
        return await con.fetchval(SERVER_NOW)
    finally:
        await con.close()


async def child(dsn: str, replica: str, tag: str, index: int, in_flight: int, pool: int,
                warmup: float, seconds: float) -> dict[str, Any]:
    """One service process: messages back to back from the parent's `go` for `warmup` + `seconds`;
    what it acknowledged (all of it) and its figures (over the last `seconds` only)."""
    acked: list[str] = []
    latencies: list[float] = []
    failed = 0
    counter = iter(range(10**9))
    async with Planner(flows=os.path.join(ROOT, "flows"),
                       dsn=dsn,
                       replica_dsn=replica,
                       pool_options=PoolOptions(min_size=pool, max_size=pool)) as planner:
        await planner.backend.open()  # as a service's lifespan would: pools filled, the replica checked
        if planner.replica is not None:  # the benchmark measures the replica in use, not its first check
            deadline = time.monotonic() + 10
            while planner.replica.state != "up" and time.monotonic() < deadline:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.05)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # "go": every process starts its load together
        begin = time.perf_counter() + warmup
        stop = begin + seconds
        cpu = 0.0

        async def worker() -> None:
            nonlocal failed
            while (t0 := time.perf_counter()) < stop:
                i = next(counter)
                message = f"fleet {tag} {index} {i}"
                inputs = {"instance_name": f"inst-{(index * 997 + i) % 2000 + 1:05d}",
                          "user_phone": f"+1666{index:02d}{i % 100000:05d}", "message": message}
                try:
                    result = await planner.run("process_buffered", inputs)
                except FlowFailed:
                    failed += t0 >= begin
                    continue
                if t0 >= begin:
                    latencies.append((time.perf_counter() - t0) * 1000)
                if result.output["stored"] is not None:
                    acked.append(message)
                    print("ack", message, flush=True)  # acknowledged as it happens: a killed process's count

        async def clock() -> None:
            nonlocal cpu
            await asyncio.sleep(warmup)
            cpu0 = time.process_time()
            await asyncio.sleep(seconds)
            cpu = time.process_time() - cpu0

        await asyncio.gather(clock(), *(worker() for _ in range(in_flight)))
        replica_state = planner.replica.state if planner.replica is not None else ""
    return {"acked": acked, "latencies": latencies, "failed": failed, "cpu_s": cpu, "replica_state": replica_state}


@dataclass(frozen=True)
class Setup:
    """One configuration of the fleet: how the processes reach the primary, and the replica."""
    via: str  # "direct" or "pgbouncer"
    replica: bool

    def label(self, bouncer_pool: int | None) -> str:
        via = f"PgBouncer (pool {bouncer_pool})" if self.via == "pgbouncer" else "direct"
        return via + (" + replica" if self.replica else "")


@dataclass
class Servers:
    """The demo database on the primary, and on its replica when there is one (direct DSNs)."""
    primary: str
    replica: str | None


@dataclass
class Row:
    processes: int
    setup: Setup
    bouncer_pool: int | None
    msgs_per_s: float
    p50: float
    p95: float
    failed: int
    connections: int
    replica_connections: int | None
    trips_per_msg: float
    replica_trips_per_msg: float | None
    once: int
    acked: int
    twice: int
    client_cpu_s: float
    machine_busy: float
    killed: bool

    def markdown(self) -> str:
        note = ", one killed -9 half way" if self.killed else ""
        rep_conn = "" if self.replica_connections is None else f" + {self.replica_connections}"
        rep_trips = "" if self.replica_trips_per_msg is None else f" + {self.replica_trips_per_msg:.2f}"
        return (f"| {self.processes}{note} | {self.setup.label(self.bouncer_pool)} | {self.msgs_per_s:,.1f} | "
                f"{self.p50:.1f} | {self.p95:.1f} | {self.failed} | {self.connections}{rep_conn} | "
                f"{self.trips_per_msg:.2f}{rep_trips} | {self.once:,} of {self.acked:,} | {self.twice} | "
                f"{self.client_cpu_s:.1f} | {self.machine_busy:.0%} |")


HEADER = ("| processes | setup | msg/s in all | p50 ms | p95 ms | failed | server connections, max seen "
          "(primary + replica) | round trips per message (primary + replica) | acknowledged stored once | "
          "twice | client CPU s | machine CPU busy |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


class _Cpu:
    """The machine's busy share between two readings of /proc/stat (nan where there is none)."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def busy(self) -> float:
        end = self._read()
        if self.start is None or end is None or end[0] == self.start[0]:
            return float("nan")
        return 1 - (end[1] - self.start[1]) / (end[0] - self.start[0])


@contextlib.asynccontextmanager
async def _through(setup: Setup, servers: Servers, pool_size: int | None,
                   one_way_ms: float) -> AsyncIterator[tuple[ProxyProcess, ProxyProcess | None]]:
    """Latency proxies (and PgBouncers, for `pgbouncer`) in front of the servers of `setup`."""
    from tests.support import pgbouncer  # the suite's launcher: the benchmark runs from a checkout

    bouncers: list[pgbouncer.PgBouncer] = []
    try:
        targets: list[str] = []
        for dsn in (servers.primary, servers.replica if setup.replica else None):
            if dsn is None:
                continue
            if setup.via == "pgbouncer":
                assert pool_size is not None
                bouncers.append(await asyncio.to_thread(pgbouncer.start, dsn, pool_size=pool_size))
                dsn = bouncers[-1].dsn(dsn)
            targets.append(dsn)
        async with contextlib.AsyncExitStack() as stack:
            proxies = [await stack.enter_async_context(ProxyProcess(t, one_way_ms)) for t in targets]
            yield proxies[0], (proxies[1] if len(proxies) > 1 else None)
    finally:
        for bouncer in bouncers:
            pgbouncer.stop(bouncer)


async def run_one(args: argparse.Namespace, servers: Servers, n: int, setup: Setup, *, kill_one: bool) -> Row:
    """`n` processes on `setup` for `--seconds`: their figures, and what the table holds."""
    bouncer_pool = (args.bouncer_pool or n * args.pool) if setup.via == "pgbouncer" else None
    since = await _server_now(servers.primary)
    replica_since = await _server_now(servers.replica) if setup.replica else None
    async with _through(setup, servers, bouncer_pool, args.rtt_ms / 2) as (proxy, replica_proxy):
        tag = f"{os.getpid()}-{n}-{time.time_ns()}"
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.fleet", "--child", str(k), "--tag", tag,
            "--in-flight", str(args.in_flight), "--pool", str(args.pool), "--warmup", str(args.warmup), "--seconds", str(args.seconds),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT, limit=1 << 26,
            # DSNs through the environment: a command line is visible to anyone on the machine
            env={**os.environ, "FLEET_DSN": proxy.dsn,
                 "FLEET_REPLICA_DSN": replica_proxy.dsn if replica_proxy is not None else ""})
            for k in range(n)]
        acks: list[list[str]] = [[] for _ in procs]
        finals: list[dict[str, Any] | None] = [None] * n
        ready = [asyncio.Event() for _ in procs]
        readers = [asyncio.create_task(_read(procs[k], acks[k], finals, k, ready[k])) for k in range(n)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 120)
        admin = await asyncpg.connect(servers.primary)
        replica_admin = await asyncpg.connect(servers.replica) if setup.replica and servers.replica else None
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
        await asyncio.sleep(args.warmup)
        trips0 = await proxy.requests()
        replica_trips0 = await replica_proxy.requests() if replica_proxy is not None else 0
        cpu = _Cpu()
        seen = replica_seen = 0
        t0 = time.perf_counter()
        killed = False
        while time.perf_counter() - t0 < args.seconds:
            seen = max(seen, await admin.fetchval(SERVER_CONNECTIONS, since))
            if replica_admin is not None:
                replica_seen = max(replica_seen, await replica_admin.fetchval(SERVER_CONNECTIONS, replica_since))
            if kill_one and n > 1 and not killed and time.perf_counter() - t0 > args.seconds / 2:
                procs[0].kill()  # SIGKILL mid-load: no cleanup, connections dropped by the server
                killed = True
            await asyncio.sleep(0.2)
        trips = await proxy.requests() - trips0
        replica_trips = await replica_proxy.requests() - replica_trips0 if replica_proxy is not None else 0
        busy = cpu.busy()
        await asyncio.wait_for(asyncio.gather(*readers), 120)
        for p in procs:
            await p.wait()
        if replica_admin is not None:
            await replica_admin.close()
    outs = [f for f in finals if f is not None]
    acked = [m for a in acks for m in a]
    counts = await admin.fetch("SELECT content, count(*) AS n FROM whatsapp_conversation_messages "
                               "WHERE content = ANY($1::text[]) GROUP BY content", acked)
    await admin.close()
    latencies = [x for o in outs for x in o["latencies"]]
    done = max(len(latencies), 1)
    if setup.replica and any(o["replica_state"] != "up" for o in outs):
        print(f"  (the replica was not up in every process at the end: {[o['replica_state'] for o in outs]})")
    return Row(
        processes=n, setup=setup, bouncer_pool=bouncer_pool,
        msgs_per_s=len(latencies) / args.seconds,
        p50=statistics.median(latencies) if latencies else float("nan"),
        p95=statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else float("nan"),
        failed=sum(o["failed"] for o in outs), connections=seen,
        replica_connections=replica_seen if setup.replica else None,
        trips_per_msg=trips / done, replica_trips_per_msg=replica_trips / done if setup.replica else None,
        once=sum(1 for r in counts if r["n"] == 1), acked=len(acked), twice=sum(1 for r in counts if r["n"] > 1),
        client_cpu_s=sum(o["cpu_s"] for o in outs), machine_busy=busy, killed=killed)


async def _read(proc: asyncio.subprocess.Process, acks: list[str], finals: list[dict[str, Any] | None], k: int,
                ready: asyncio.Event) -> None:
    """A child's output: `ready`, one `ack` line per acknowledged message, then its figures as JSON."""
    assert proc.stdout is not None
    async for raw in proc.stdout:
        line = raw.decode().rstrip("\n")
        if line.startswith("ack "):
            acks.append(line[4:])
        elif line == "ready":
            ready.set()
        elif line.startswith("{"):
            finals[k] = json.loads(line)
    ready.set()  # a child that died before it was ready must not hold the others


@contextlib.asynccontextmanager
async def _servers(args: argparse.Namespace) -> AsyncIterator[Servers]:
    """The demo database: on `--dsn`/DATABASE_URL/the embedded server, or on a fresh primary and
    its streaming replica (`--replica`)."""
    quiet = lambda _m: None  # noqa: E731 - demo_dsn's log, unused here
    if not args.replica:
        yield Servers(await demo_dsn(args.dsn or os.environ.get("DATABASE_URL"), quiet), None)
        return
    from tests.support.replica_pair import caught_up, start_pair

    with tempfile.TemporaryDirectory(prefix="planner-fleet-") as base:
        pair = await asyncio.to_thread(start_pair, Path(base))
        try:
            primary = await demo_dsn(pair.primary.dsn(), quiet)
            await caught_up(pair, within=120)
            yield Servers(primary, with_database(pair.replica.dsn(), DEMO_DATABASE))
        finally:
            await asyncio.to_thread(pair.close)


async def parent(args: argparse.Namespace) -> None:
    setups = [Setup(via, replica) for via in args.via for replica in ((False, True) if args.replica else (False,))]
    async with _servers(args) as servers:
        where = "a primary of its own with a streaming replica" if args.replica else "the demo database"
        print(f"# Fleet: process_buffered on {where}, {args.in_flight} in flight per process, pool {args.pool} "
              f"each, {args.rtt_ms:g} ms round trip, {args.warmup:g} s of load then {args.seconds:g} s measured "
              f"per cell, {args.rounds} round(s)\n")
        print(HEADER, flush=True)
        rows: list[Row] = []
        for _ in range(args.rounds):
            for n in args.processes:
                for setup in setups:
                    row = await run_one(args, servers, n, setup, kill_one=args.kill_one)
                    rows.append(row)
                    print(row.markdown(), flush=True)
    if args.rounds > 1 or len(setups) > 1:
        print("\nMedian msg/s per configuration, against direct (PgBouncer) and without the replica:")
        for n in args.processes:
            medians = {setup: statistics.median(r.msgs_per_s for r in rows if r.processes == n and r.setup == setup)
                       for setup in setups}
            for setup, median in medians.items():
                figures = ", ".join(f"{r.msgs_per_s:,.0f}" for r in rows if r.processes == n and r.setup == setup)
                pool = next(r.bouncer_pool for r in rows if r.processes == n and r.setup == setup)
                versus = [f"{median / medians[other]:.2f}x {what}" for other, what in (
                    (Setup("direct", setup.replica), "direct"), (Setup(setup.via, False), "without the replica"))
                    if other != setup and other in medians]
                print(f"- {n} process(es), {setup.label(pool)}: {median:,.1f} (runs: {figures})"
                      + (f"; {', '.join(versus)}" if versus else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured, per cell")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="load before the measured seconds (pools filled, combined statements prepared)")
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--pool", type=int, default=10, help="each process's pool")
    parser.add_argument("--via", default="direct", help="direct, pgbouncer, or both: direct,pgbouncer")
    parser.add_argument("--bouncer-pool", type=int, default=None,
                        help="PgBouncer's pool (default_pool_size); default: processes x pool")
    parser.add_argument("--replica", action="store_true",
                        help="a primary of the benchmark's own with a streaming replica; each setup with and without it")
    parser.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, interleaved")
    parser.add_argument("--dsn", default=None, help="the server (default: DATABASE_URL, else the embedded server)")
    parser.add_argument("--kill-one", action="store_true", help="kill -9 the first process half way (with 2 or more)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        out = asyncio.run(child(os.environ["FLEET_DSN"], os.environ.get("FLEET_REPLICA_DSN", ""), args.tag,
                                args.child, args.in_flight, args.pool, args.warmup, args.seconds))
        out.pop("acked")  # already printed, one line each
        print(json.dumps(out))
        return
    args.processes = [int(n) for n in args.processes.split(",")]
    args.via = [v.strip() for v in args.via.split(",")]
    if not set(args.via) <= {"direct", "pgbouncer"} or args.replica and args.dsn:
        parser.error("--via takes direct and/or pgbouncer; --replica makes its own servers (no --dsn)")
    asyncio.run(parent(args))


if __name__ == "__main__":
    main()
