"""Cache invalidations between processes: LISTEN/NOTIFY on one channel, and a process that lost
the channel serving nothing from its cache until it is back.

Two Planners in one process stand for two processes here (each has its own cache and its own
listening connection); one test runs the other side in a real second process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from planner import FlowResult, Planner, PoolOptions
from planner.db.pool import PoolBackend
from planner.demo.latency_proxy import LatencyProxy

# This module is about another mechanism: nodes run as they would without compiled groups.
pytestmark = pytest.mark.usefixtures("uncompiled")

ROOT = Path(__file__).resolve().parents[2]

FLOW = """
inputs: {name: str, threshold: {type: int, default: 5}}
nodes:
  instance:
    sql: SELECT id, escalation_threshold AS threshold FROM whatsapp_instances WHERE instance_name = $name
    fetch: one
    cache: 30s
  edit:
    sql: UPDATE whatsapp_instances SET escalation_threshold = $threshold WHERE id = $instance.id
    fetch: none
    when: $threshold != 5
    invalidates: [instance]
"""


@pytest.fixture
def flows(tmp_path: Path) -> Path:
    (tmp_path / "t.yaml").write_text(FLOW)
    return tmp_path


@pytest.fixture
async def two(flows: Path, demo_dsn: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Planner, Planner]]:
    monkeypatch.delenv("PLANNER_CACHE", raising=False)
    a, b = Planner(flows=flows, dsn=demo_dsn), Planner(flows=flows, dsn=demo_dsn)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def _eventually(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


async def _threshold(planner: Planner) -> FlowResult:
    return await planner.run("t", {"name": "acme"})


async def test_a_write_in_one_process_drops_the_cached_value_in_another(two: tuple[Planner, Planner]) -> None:
    a, b = two
    assert (await _threshold(b)).values["instance"]["threshold"] == 3
    assert (await _threshold(b)).nodes["instance"].served.cached  # type: ignore[union-attr]
    await a.run("t", {"name": "acme", "threshold": 8})  # writes, and invalidates `instance`

    async def b_sees_it() -> bool:
        return bool((await _threshold(b)).values["instance"]["threshold"] == 8)

    assert await _eventually(b_sees_it)


async def test_planner_invalidate_reaches_the_other_processes(two: tuple[Planner, Planner], demo_dsn: str) -> None:
    a, b = two
    await _threshold(a)
    await _threshold(b)
    con = await asyncpg.connect(demo_dsn)
    try:
        await con.execute("UPDATE whatsapp_instances SET escalation_threshold = 6 WHERE instance_name = 'acme'")
    finally:
        await con.close()
    assert (await _threshold(b)).values["instance"]["threshold"] == 3  # cached: the write was out of band
    a.invalidate("instance")

    async def b_sees_it() -> bool:
        return bool((await _threshold(b)).values["instance"]["threshold"] == 6)

    assert await _eventually(b_sees_it)


async def _listeners(dsn: str) -> list[int]:
    con = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await con.fetch(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN %planner_cache%' AND datname = current_database()")]
    finally:
        await con.close()


async def test_a_process_that_lost_the_channel_trusts_its_cache_again_only_once_it_is_back(
    two: tuple[Planner, Planner], demo_dsn: str
) -> None:
    _, b = two
    await _threshold(b)
    assert (await _threshold(b)).nodes["instance"].served.cached  # type: ignore[union-attr]
    pids = await _listeners(demo_dsn)
    assert len(pids) == 1
    con = await asyncpg.connect(demo_dsn)
    try:
        await con.execute("SELECT pg_terminate_backend($1)", pids[0])
    finally:
        await con.close()

    async def untrusted() -> bool:
        return not b.cache.trusted

    assert await _eventually(untrusted)
    lost = await _threshold(b)
    assert not lost.nodes["instance"].served.cached  # type: ignore[union-attr]  # asked the database
    assert b.cache_stats().untrusted >= 1

    async def back() -> bool:
        return b.cache.trusted and len(await _listeners(demo_dsn)) == 1

    assert await _eventually(back)
    await _threshold(b)
    assert (await _threshold(b)).nodes["instance"].served.cached  # type: ignore[union-attr]


SIDE = textwrap.dedent("""
    import asyncio, json, sys
    from planner import Planner

    async def main(flows, dsn):
        async with Planner(flows=flows, dsn=dsn) as planner:
            async def read():
                result = await planner.run("t", {"name": "acme"})
                return {"threshold": result.values["instance"]["threshold"], "cached": result.nodes["instance"].served.cached}
            print(json.dumps(await read()), flush=True)
            print(json.dumps(await read()), flush=True)
            for line in sys.stdin:  # one line per read the test asks for
                print(json.dumps(await read()), flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


@pytest.mark.subprocess
async def test_a_real_second_process_drops_its_value_when_this_one_writes(flows: Path, demo_dsn: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    side = await asyncio.create_subprocess_exec(sys.executable, "-c", SIDE, str(flows), demo_dsn, env=env,
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert side.stdin is not None and side.stdout is not None

    async def line() -> dict[str, object]:
        assert side.stdout is not None
        return dict(json.loads(await asyncio.wait_for(side.stdout.readline(), 30)))

    try:
        first, second = await line(), await line()
        assert first["threshold"] == 3 and second == {"threshold": 3, "cached": True}
        async with Planner(flows=flows, dsn=demo_dsn) as planner:
            await planner.run("t", {"name": "acme", "threshold": 9})
        for _ in range(100):
            side.stdin.write(b"read\n")
            seen = await line()
            if seen["threshold"] == 9:
                break
            await asyncio.sleep(0.05)
        assert seen == {"threshold": 9, "cached": False}
    finally:
        side.stdin.close()
        await asyncio.wait_for(side.wait(), 30)


class FreezableProxy(LatencyProxy):
    """A proxy whose forwarding can be frozen: bytes are held back and no socket is closed, as
    when the peer vanished without a FIN (a host powered off, a NAT entry dropped)."""

    def __init__(self, upstream_dsn: str) -> None:
        super().__init__(upstream_dsn, one_way_ms=0)
        self._flowing: asyncio.Event | None = None  # of the proxy's own loop (it runs on a thread of its own)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await super()._start()

    def freeze(self, frozen: bool) -> None:
        assert self._loop is not None and self._flowing is not None
        self._loop.call_soon_threadsafe(self._flowing.clear if frozen else self._flowing.set)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, count: bool) -> None:
        assert self._flowing is not None
        while data := await reader.read(65536):
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()


async def test_a_listening_connection_that_goes_silent_is_reported_lost_and_replaced(demo_dsn: str) -> None:
    states: list[bool] = []

    async def seen(*expected: bool) -> bool:
        return states == list(expected)

    proxy = FreezableProxy(demo_dsn)
    async with proxy:
        backend = PoolBackend(dsn=proxy.dsn, min_size=1, max_size=1)
        backend.channel._heartbeat_s, backend.channel._heartbeat_timeout_s = 0.1, 0.5
        try:
            backend.channel.subscribe("planner_cache", lambda _payload: None, states.append)
            assert await _eventually(lambda: seen(True))
            proxy.freeze(True)  # no error will ever arrive: only the heartbeat can tell
            assert await _eventually(lambda: seen(True, False), seconds=10)
            proxy.freeze(False)
            assert await _eventually(lambda: seen(True, False, True), seconds=10)
        finally:
            proxy.freeze(False)
            await backend.close()


# --- a borrowed pool (`Planner(pool=...)`) lends one of its connections to the channel --------


async def _keep_session(_con: asyncpg.Connection) -> None:
    """A pool reset that leaves the session alone (asyncpg's default one would UNLISTEN *)."""


@pytest.fixture
async def borrowed(demo_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A user's pool of two connections, for a Planner to borrow; its reset sends nothing."""
    pool = await asyncpg.create_pool(demo_dsn, min_size=2, max_size=2, reset=_keep_session)
    try:
        yield pool
    finally:
        await pool.close()


async def _listening(planner: Planner, demo_dsn: str) -> int:
    """The server pid of `planner`'s listening connection, once it listens."""
    await _threshold(planner)  # the first cached read subscribes

    async def one() -> bool:
        return planner.cache.trusted and len(await _listeners(demo_dsn)) == 1

    assert await _eventually(one)
    return (await _listeners(demo_dsn))[0]


async def _every_connection(pool: asyncpg.Pool) -> dict[int, int]:
    """Take all of `pool`'s connections at once (failing if one never comes), give them back:
    the server pid of each, and how many channels it listens on."""
    async with asyncio.timeout(5):
        cons = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        return {con.get_server_pid(): await con.fetchval("SELECT count(*) FROM pg_listening_channels()") for con in cons}
    finally:
        for con in cons:
            await pool.release(con)


async def test_closing_a_planner_gives_a_borrowed_pool_its_listening_connection_back_as_lent(
        flows: Path, demo_dsn: str, borrowed: asyncpg.Pool) -> None:
    planner = Planner(flows=flows, pool=borrowed)
    listener = await _listening(planner, demo_dsn)
    await planner.close()
    assert (borrowed.get_size(), borrowed.get_idle_size()) == (2, 2)
    # The same connection, not a new one, and UNLISTENed by planner itself: this pool's reset
    # sends nothing.
    channels = await _every_connection(borrowed)
    assert listener in channels and set(channels.values()) == {0}


async def test_a_borrowed_pools_listening_connection_lost_and_replaced_costs_the_pool_no_connection(
        flows: Path, demo_dsn: str, borrowed: asyncpg.Pool) -> None:
    planner = Planner(flows=flows, pool=borrowed)
    try:
        first = await _listening(planner, demo_dsn)
        con = await asyncpg.connect(demo_dsn)
        try:
            await con.execute("SELECT pg_terminate_backend($1)", first)
        finally:
            await con.close()

        async def replaced() -> bool:
            return planner.cache.trusted and (await _listeners(demo_dsn)) not in ([], [first])

        assert await _eventually(replaced)
    finally:
        await planner.close()
    assert len(await _every_connection(borrowed)) == 2


async def test_a_process_with_a_cache_holds_its_pool_and_one_listening_connection(
        flows: Path, demo_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The sizing advice of docs/service.md counts max_size + 1 per process: this is the + 1.
    monkeypatch.delenv("PLANNER_CACHE", raising=False)
    probe = await asyncpg.connect(demo_dsn)
    try:
        async def planners() -> int:
            return int(await probe.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"))

        async with Planner(flows=flows, dsn=demo_dsn, metrics=False, pool_options=PoolOptions(min_size=2, max_size=2)) as planner:
            await asyncio.gather(*(_threshold(planner) for _ in range(8)))  # the pool grown to its size
            pool = await planner.stack.primary.pool()
            assert pool.get_size() == 2
            assert await _eventually(lambda: _equals(planners, 3))  # 2 pooled + the listening one
    finally:
        await probe.close()


async def _equals(count: Callable[[], Awaitable[int]], expected: int) -> bool:
    return await count() == expected
