"""The cache's channel between processes: a connection of its own LISTENing for invalidations.

`PoolChannel` is a pool backend's channel (`PoolBackend.channel`, a `planner.kinds.backend.Channel`
that `planner.db.stack` gives the cache): `subscribe` starts a `Listener`, `notify` sends on
a pooled connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from planner.db.dsn import TRANSACTION_POOLER
from planner.db.pooler import connect
from planner.results import error_text

logger = logging.getLogger("planner")

# The cache channel's listening connection is asked `SELECT 1` this often, and lost when the
# answer takes longer than the timeout: a peer gone without a FIN (a host powered off, a NAT
# entry dropped) sends no error, and LISTEN alone would wait for notifications forever.
LISTEN_HEARTBEAT_S = 5.0
LISTEN_HEARTBEAT_TIMEOUT_S = 5.0
_RELEASE_TIMEOUT_S = 2.0  # a lent connection that cannot be UNLISTENed and released in this time is terminated


@dataclass
class Listener:
    """LISTEN on `channel` until cancelled: `on_message` gets each payload, `on_state(True)` says
    it listens, `on_state(False)` that it lost the channel (it reconnects, backing off up to 5 s).
    Lost also means silent: the connection is asked `SELECT 1` every `heartbeat_s` and given up
    when no answer comes within `heartbeat_timeout_s` (a half-open connection reports no error).
    `connection()` gives the connection to listen on and the pool to return it to (None: its
    own), or None when LISTEN cannot work (behind a transaction pooler)."""

    channel: str
    on_message: Callable[[str], None]
    on_state: Callable[[bool], None]
    connection: Callable[[], Awaitable[tuple[asyncpg.Connection, asyncpg.Pool | None] | None]]
    heartbeat_s: float
    heartbeat_timeout_s: float

    async def listen(self) -> None:
        """Listen until cancelled (the background task `PoolBackend.subscribe` starts)."""
        channel, on_message, on_state = self.channel, self.on_message, self.on_state
        delay = 0.05
        while True:
            lost = asyncio.Event()
            con: Any = None
            pool: Any = None

            def closed(_con: Any, lost: asyncio.Event = lost) -> None:
                lost.set()

            def notified(_con: Any, _pid: int, _channel: str, payload: str) -> None:
                on_message(payload)

            try:
                got = await self.connection()
                if got is None:
                    # LISTEN cannot pass a transaction pooler (found out only now when the DSN
                    # came from DATABASE_URL): the cache stays in its process, and says so once.
                    logger.warning("cache channel %r: not available behind a transaction pooler; cached values "
                                   "are this process's own (invalidations do not reach other processes)", channel)
                    on_state(True)
                    return
                con, pool = got
                con.add_termination_listener(closed)
                await con.add_listener(channel, notified)
                on_state(True)
                delay = 0.05
                why = await self._heartbeat(con, lost)
                logger.warning("cache channel %r lost (%s): cached values are not trusted until it is back", channel, why)
            except asyncio.CancelledError:
                on_state(False)
                if con is not None:
                    await _stop_listening(con, pool, channel, notified, closed, lost=lost.is_set())
                raise
            except Exception as exc:
                logger.warning("cache channel %r unavailable (%s): cached values are not trusted until it is back",
                               channel, error_text(exc))
            on_state(False)
            if con is not None:
                await _stop_listening(con, pool, channel, notified, closed, lost=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _heartbeat(self, con: asyncpg.Connection, lost: asyncio.Event) -> str:
        """Return once the listening connection `con` is lost: closed (`lost` is set), or
        silent (a `SELECT 1` unanswered within the heartbeat's timeout). Says which."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await lost.wait()
            if lost.is_set():
                return "connection closed"
            try:
                await con.fetchval("SELECT 1", timeout=self.heartbeat_timeout_s)
            except TimeoutError:
                return f"no answer to a heartbeat within {self.heartbeat_timeout_s:g} s"
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                return f"heartbeat failed: {error_text(exc)}"


async def _stop_listening(con: Any, pool: asyncpg.Pool | None, channel: str, notified: Callable[..., None],
                         closed: Callable[[Any], None], *, lost: bool) -> None:
    """Done with the cache channel's connection `con`. Its own connection (`pool` None) is
    terminated. A borrowed pool's goes back to that pool: the user's pool must never lose a
    slot or a healthy connection to planner's channel. Whole (`lost` False), it UNLISTENs
    first; lost (closed, or silent to the heartbeat), it is terminated and its slot returned."""
    if pool is None:
        if not con.is_closed():
            con.terminate()
        return
    # asyncpg takes back a pool connection that closed under it; its proxy then refuses every
    # call (InterfaceError), and releasing it again does nothing.
    with contextlib.suppress(asyncpg.InterfaceError):
        con.remove_termination_listener(closed)  # kept by asyncpg across releases: not the user's
        if not lost:
            try:
                async with asyncio.timeout(_RELEASE_TIMEOUT_S):
                    await con.remove_listener(channel, notified)  # UNLISTEN
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                lost = True  # it must not go back to the user's pool still listening
        if lost and not con.is_closed():
            con.terminate()  # a silent connection would delay the pool's reset
    with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresError, OSError, TimeoutError):
        await pool.release(con, timeout=_RELEASE_TIMEOUT_S)  # fails only by terminating it: the slot is back anyway


class _Pool(Protocol):
    """What the channel needs of its pool backend (`planner.db.pool.PoolBackend`)."""

    pooler: str | None
    _pool: asyncpg.Pool | None
    _connected_dsn: str | None

    async def pool(self) -> asyncpg.Pool: ...
    async def _first_pool(self) -> asyncpg.Pool: ...
    def held(self, pool: asyncpg.Pool, session: bool) -> AbstractAsyncContextManager[asyncpg.Connection]: ...


class PoolChannel:
    """LISTEN/NOTIFY on the server of one pool backend (see the module's docstring)."""

    def __init__(self, backend: _Pool) -> None:
        self.backend = backend
        self._listener: asyncio.Task[None] | None = None
        self._heartbeat_s, self._heartbeat_timeout_s = LISTEN_HEARTBEAT_S, LISTEN_HEARTBEAT_TIMEOUT_S

    def subscribe(self, channel: str, on_message: Callable[[str], None], on_state: Callable[[bool], None]) -> None:
        """Keep a connection of its own LISTENing on `channel` until `close()`: `on_message` gets
        each payload, `on_state(True)` says it listens, `on_state(False)` that it lost the
        channel (it reconnects, backing off up to 5 s). Lost also means silent: the connection
        is asked `SELECT 1` every `LISTEN_HEARTBEAT_S` and given up when no answer comes within
        `LISTEN_HEARTBEAT_TIMEOUT_S` (a half-open connection never reports an error). Not a
        pool connection: the pool keeps its size. A borrowed pool lends one of its connections
        for it, and gets it back at `close()` (UNLISTENed: the pool's own reset may not do it),
        or its slot back when it is lost."""
        if self._listener is None:
            listener = Listener(channel, on_message, on_state, self._listening_connection,
                                self._heartbeat_s, self._heartbeat_timeout_s)
            self._listener = asyncio.get_running_loop().create_task(listener.listen())

    async def _listening_connection(self) -> tuple[asyncpg.Connection, asyncpg.Pool | None] | None:
        """A connection for the cache channel: one of its own (from the DSN an owned pool was made
        from), or one lent by a borrowed pool (returned to it); None behind a transaction pooler."""
        backend = self.backend
        pool = backend._pool or await backend.pool()
        if backend.pooler == TRANSACTION_POOLER:
            return None
        if backend._connected_dsn:
            return await connect(backend._connected_dsn, pooler=backend.pooler), None  # its own, never the pool's
        return await pool.acquire(), pool

    async def notify(self, channel: str, payload: str) -> None:
        """`pg_notify(channel, payload)` on a pooled connection (delivered when it commits)."""
        pool = self.backend._pool or await self.backend._first_pool()
        async with self.backend.held(pool, False) as con:
            await con.execute("SELECT pg_notify($1, $2)", channel, payload)

    async def close(self) -> None:
        """Stop listening (a lent connection goes back to its pool)."""
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
