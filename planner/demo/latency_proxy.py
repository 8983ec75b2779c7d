"""A TCP proxy that adds a fixed one-way delay in each direction (10 ms -> 20 ms round trip).

It stands between asyncpg and PostgreSQL to give a local database the network delay of the
seed's backend. Each chunk is delivered `delay` after it was read, in order; reading never
waits for delivery, so bandwidth is not limited. It also counts the chunks the client sends,
which for PostgreSQL's protocol is the number of round trips the client started.

It runs on an event loop of its own, in a thread, so that its work stays off the event loop
being measured. A sleep ends a little late (0.3 ms here); the proxy measures by how much when
it starts and wakes that much early, so the round trip it adds is the one asked for.

    async with LatencyProxy(upstream_dsn, one_way_ms=10) as proxy:
        pool = await asyncpg.create_pool(proxy.dsn)

A thread still shares the GIL with the process it sits in: under load the proxy's work slows
the process being measured (and its CPU time counts as that process's). `ProxyProcess` runs
the same proxy in a process of its own, for throughput figures; it still counts round trips:

    async with ProxyProcess(upstream_dsn, one_way_ms=10) as proxy:
        before = await proxy.requests()
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import selectors
import sys
import threading
from collections import deque
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit


def _upstream_of(dsn: str) -> tuple[str | None, str, int]:
    """(unix socket path or None, host, port) of a PostgreSQL DSN."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "localhost"])[0]
    port = int(query.get("port", [parts.port or 5432])[0])
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}", host, port
    return None, host, port


class LatencyProxy:
    """Listen on 127.0.0.1 (a free port); forward each connection to `upstream_dsn`'s server."""

    def __init__(self, upstream_dsn: str, one_way_ms: float) -> None:
        self.upstream_dsn = upstream_dsn
        self.delay = one_way_ms / 1000
        self.requests = 0  # chunks sent by clients: round trips started
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._late = 0.0  # how late a sleep on the proxy's loop ends, measured at start
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def dsn(self) -> str:
        """The upstream DSN, pointed at the proxy."""
        parts = urlsplit(self.upstream_dsn)
        query = "&".join(f"{k}={v[0]}" for k, v in parse_qs(parts.query).items() if k not in ("host", "port"))
        user = parts.username or "postgres"
        netloc = f"{user}{':' + parts.password if parts.password else ''}@127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))

    async def __aenter__(self) -> LatencyProxy:
        loop = self._loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._thread = threading.Thread(target=loop.run_forever, name="latency-proxy", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._start(), loop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._stop(), self._loop))
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join)
        self._loop.close()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        late = [0.0]
        for _ in range(15 if self.delay else 0):  # lateness grows with the length of the sleep
            start = loop.time()
            await asyncio.sleep(self.delay)
            late.append(loop.time() - start - self.delay)
        self._late = sorted(late)[len(late) // 2]
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        path, host, port = _upstream_of(self.upstream_dsn)
        try:
            if path:
                server_r, server_w = await asyncio.open_unix_connection(path)
            else:
                server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        pumps = [
            asyncio.create_task(self._pump(client_r, server_w, count=True)),
            asyncio.create_task(self._pump(server_r, client_w, count=False)),
        ]
        for task in pumps:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # the proxy is closing: end this connection quietly
        finally:
            for task in pumps:
                task.cancel()
            for writer in (client_w, server_w):
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, count: bool) -> None:
        loop = asyncio.get_running_loop()
        queue: deque[tuple[float, bytes]] = deque()
        ready = asyncio.Event()
        done = False

        async def deliver() -> None:
            while True:
                while not queue:
                    if done:
                        return
                    ready.clear()
                    await ready.wait()
                due, data = queue.popleft()
                wait = due - loop.time() - self._late
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                if count:
                    self.requests += 1
                queue.append((loop.time() + self.delay, data))
                ready.set()
            done = True
            ready.set()
            await sender
        finally:
            sender.cancel()


_ROOT = str(Path(__file__).resolve().parent.parent.parent)  # the child imports this very planner: first on its path


class ProxyProcess:
    """`LatencyProxy` in a child process (`python -m planner.demo.latency_proxy`).

    The child prints its DSN on its first line; then each `requests` line on its stdin is
    answered with the number of chunks its clients have sent so far (round trips started).
    Closing its stdin ends it; leaving the context does, and kills it if it lingers. The
    upstream DSN reaches the child through its environment, never its command line (which
    `ps` shows to anyone on the machine).
    """

    def __init__(self, upstream_dsn: str, one_way_ms: float) -> None:
        self.upstream_dsn = upstream_dsn
        self.one_way_ms = one_way_ms
        self.dsn = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._asking = asyncio.Lock()  # one question on the pipe at a time: answers come in order

    async def __aenter__(self) -> ProxyProcess:
        env = {**os.environ, "PLANNER_PROXY_UPSTREAM": self.upstream_dsn,
               "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)}
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "planner.demo.latency_proxy", "--one-way-ms", str(self.one_way_ms), "--serve",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
        assert self._proc.stdout is not None
        line = await self._proc.stdout.readline()
        if not line:
            code = await self._proc.wait()
            raise RuntimeError(f"the latency proxy process ended before it listened (exit code {code})")
        self.dsn = line.decode().strip()
        return self

    async def requests(self) -> int:
        """Chunks the proxy's clients have sent so far: the round trips they started."""
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        async with self._asking:
            self._proc.stdin.write(b"requests\n")
            await self._proc.stdin.drain()
            return int((await self._proc.stdout.readline()).decode())

    async def __aexit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _serve(upstream_dsn: str, one_way_ms: float, *, commands: bool) -> None:
    """Print the proxy's DSN; answer `requests` lines on stdin (with `commands`) until it ends,
    else serve until interrupted."""
    async with LatencyProxy(upstream_dsn, one_way_ms) as proxy:
        print(proxy.dsn, flush=True)
        if not commands:
            await asyncio.Event().wait()
        while line := await asyncio.to_thread(sys.stdin.readline):
            if line.strip() == "requests":
                print(proxy.requests, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A delaying TCP proxy in front of PostgreSQL: prints a DSN through it.")
    parser.add_argument("--one-way-ms", type=float, default=10.0, help="delay added in each direction (ms)")
    parser.add_argument("--dsn", default=None, help="the server (default: DATABASE_URL, else the embedded server)")
    parser.add_argument("--serve", action="store_true",
                        help="answer `requests` lines on stdin with the round trips counted; end when stdin closes")
    args = parser.parse_args(argv)
    dsn = args.dsn or os.environ.get("PLANNER_PROXY_UPSTREAM") or os.environ.get("DATABASE_URL")
    if not dsn:
        from planner.db.embedded import embedded_dsn

        dsn = embedded_dsn()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(dsn, args.one_way_ms, commands=args.serve))


if __name__ == "__main__":
    main()
