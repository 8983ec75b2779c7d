"""The example service under load: many HTTP clients against examples/fastapi_app.py.

    python -m benchmarks.service_load --seconds 10                 # 200 clients, POST /messages
    python -m benchmarks.service_load --flow escalation --clients 50
    python -m benchmarks.service_load --env PLANNER_COALESCE=0     # the server without coalescing
    python -m benchmarks.service_load --rtt-ms 20                  # a 20 ms round trip to the database

The app runs under uvicorn (one worker) in a subprocess, on the demo database (`planner_demo`
on `--dsn`, else DATABASE_URL's server, else the embedded one; created and filled if missing).
Each of `--clients` tasks sends a request, waits for the answer, and sends the next. After
`--warmup` seconds, requests are measured for `--seconds`: requests/s counts the successful
answers that arrived within that window, and p50/p95/p99 are the latencies of the requests
sent in it, as the client saw them.

The client: by default (`--client raw`) each task has a keep-alive connection of its own,
spoken to by a minimal HTTP/1.1 client (`RawConnection`, a few microseconds per request).
`--client httpx` shares one `httpx.AsyncClient` with a connection limit of `--clients`: with
many concurrent requests its connection pool, not the service, sets the pace (encode/httpx
#3215: on a 2-core machine, a FastAPI endpoint that returns at once served 3,300 requests/s to
50 raw clients and 65 to one shared httpx client of 50). The client runs in this process, on
the same cores as the server and the database; its CPU time and the server's are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from benchmarks.seed_table import inputs
from planner.db.dsn import redact_dsn
from planner.demo.run import demo_dsn, percentile

ROOT = Path(__file__).resolve().parent.parent
PATHS = {"process_buffered": "/messages", "escalation": "/escalation"}
CLIENTS = {
    "raw": "one keep-alive HTTP/1.1 connection per client (a minimal client, `RawConnection`)",
    "httpx": "one httpx.AsyncClient shared by all clients, as many connections as clients",
}


@dataclass
class Figures:
    window: float
    latencies_ms: list[float] = field(default_factory=list)  # requests sent in the window, ok
    completed: int = 0  # ok answers that arrived in the window
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)  # answers in the window

    @property
    def rps(self) -> float:
        return self.completed / self.window


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid` (Linux; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def app_server(dsn: str, env: dict[str, str]) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """examples/fastapi_app.py under uvicorn in a subprocess; its base URL once /healthz answers 200."""
    port = free_port()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", "--log-level", "warning",
        cwd=ROOT, env=os.environ | {"DATABASE_URL": dsn, "PYTHONPATH": path} | env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            deadline = time.monotonic() + 60
            while True:
                if proc.returncode is not None:
                    raise SystemExit(f"the server exited ({proc.returncode}) before it was ready")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/healthz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not become ready within 60 s")
                await asyncio.sleep(0.1)
        yield url, proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client on one connection: a POST with a JSON body, the
    answer's status read and its body (Content-Length, as uvicorn sends it) skipped."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, payload: Any) -> str:
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            if self.streams is None:
                self.streams = await asyncio.open_connection(self.host, self.port)
            reader, writer = self.streams
            writer.write(head + body)
            lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            await reader.readexactly(int(headers.get("content-length", "0")))
            if headers.get("connection") == "close":
                self.close()
            return lines[0].split(" ")[1]
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            return type(exc).__name__

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def load(url: str, flow: str, clients: int, warmup: float, seconds: float, kind: str) -> Figures:
    figures = Figures(window=seconds)
    path = PATHS[flow]
    start = time.perf_counter() + warmup
    end = start + seconds

    async def one_client(post: Callable[[str, Any], Awaitable[str]]) -> None:
        while (sent := time.perf_counter()) < end:
            status = await post(path, inputs(flow))
            done = time.perf_counter()
            if start <= done <= end:
                figures.statuses[status] += 1
                figures.completed += status == "200"
            if sent >= start and status == "200":
                figures.latencies_ms.append((done - sent) * 1000)

    if kind == "raw":
        parts = urlsplit(url)
        connections = [RawConnection(parts.hostname or "127.0.0.1", parts.port or 80) for _ in range(clients)]
        try:
            await asyncio.gather(*(one_client(con.post) for con in connections))
        finally:
            for con in connections:
                con.close()
        return figures

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def post(path: str, payload: Any) -> str:
            try:
                return str((await client.post(path, json=payload)).status_code)
            except httpx.HTTPError as exc:
                return type(exc).__name__

        await asyncio.gather(*(one_client(post) for _ in range(clients)))
    return figures


async def main_async(args: argparse.Namespace) -> str:
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    dsn = await demo_dsn(args.dsn or os.environ.get("DATABASE_URL"), log)
    env = dict(item.split("=", 1) for item in args.env)
    async with contextlib.AsyncExitStack() as stack:
        if args.rtt_ms:
            from planner.demo.latency_proxy import LatencyProxy

            dsn = (await stack.enter_async_context(LatencyProxy(dsn, args.rtt_ms / 2))).dsn
        url, proc = await stack.enter_async_context(app_server(dsn, env))
        server_cpu, client_cpu = cpu_seconds(proc.pid), time.process_time()
        figures = await load(url, args.flow, args.clients, args.warmup, args.seconds, args.client)
        server_after, client_cpu = cpu_seconds(proc.pid), time.process_time() - client_cpu
    server_cpu = server_after - server_cpu if server_cpu is not None and server_after is not None else None
    return report(args, figures, dsn, env, server_cpu, client_cpu)


def report(args: argparse.Namespace, figures: Figures, dsn: str, env: dict[str, str], server_cpu: float | None,
           client_cpu: float) -> str:
    lat = figures.latencies_ms
    ms = (lambda q: f"{percentile(lat, q):.1f}") if lat else (lambda q: "-")
    errors = {status: n for status, n in figures.statuses.items() if status != "200"}
    settings: dict[str, Any] = {"POOL_MIN_SIZE": "2", "POOL_MAX_SIZE": "10"} | env
    lines = [
        f"## service_load: POST {PATHS[args.flow]} ({args.flow}), {args.clients} clients, {args.seconds:g} s"
        f" after {args.warmup:g} s warm-up, {args.rtt_ms:g} ms round trip to the database",
        "",
        "| requests | requests/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---:|---:|---:|---:|---:|---|",
        f"| {figures.completed} | {figures.rps:.0f} | {ms(0.5)} | {ms(0.95)} | {ms(0.99)} | "
        f"{', '.join(f'{k}: {v}' for k, v in sorted(errors.items())) or 'none'} |",
        "",
        f"- client: {CLIENTS[args.client]}",
        f"- server: uvicorn, 1 worker, examples/fastapi_app.py, {', '.join(f'{k}={v}' for k, v in settings.items())}",
        f"- CPU in the measured window and warm-up: server {server_cpu:.1f} s, client {client_cpu:.1f} s"
        if server_cpu is not None else f"- client CPU: {client_cpu:.1f} s",
        f"- database: {redact_dsn(dsn).split('?')[0]}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"
        + (f", load average {os.getloadavg()[0]:.1f} after the run" if hasattr(os, "getloadavg") else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="load before measuring, not counted (default 2)")
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients (default 200)")
    parser.add_argument("--flow", choices=sorted(PATHS), default="process_buffered")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="raw: one keep-alive connection per client, a minimal HTTP/1.1 client (default); "
                             "httpx: one shared httpx.AsyncClient allowed --clients connections")
    parser.add_argument("--dsn", default=None, help="server DSN (default: DATABASE_URL, else embedded)")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round trip added between the app and the database")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the server (POOL_MAX_SIZE=20, PLANNER_COALESCE=0, ...); repeatable")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.env):
        parser.error("--env takes KEY=VALUE")
    print(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
