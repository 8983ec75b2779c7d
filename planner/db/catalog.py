"""The verdicts of one server: `Catalog` keeps what `planner.db.judge` says of each statement text.

A verdict is kept for `max_age` seconds (a function redefined from STABLE to VOLATILE is seen
within that time) and asked once per text however many runs want it at the same moment; every
verdict is dropped as soon as a check (`watch`, every `WATCH_S` while verdicts are used) sees
the user's functions, views, operators, casts, policies or domains changed on the server, and
one text is forgotten when its statement fails because the schema changed under it (a
migration). `planner.db.effects.EffectsBackend`, the outermost wrapper of a `Planner`'s stack,
asks it; `catalog_of` builds it over planner's pool, asking on a connection of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from planner.db.judge import StatementRefused, resolve
from planner.lang.effects import Effects

if TYPE_CHECKING:
    from planner.db.pool import PoolBackend

logger = logging.getLogger("planner")

MAX_AGE = 60.0
"""Seconds a verdict is kept before the catalog is asked again."""
WATCH_S = 5.0
"""Seconds between checks, while verdicts are used, that the user's functions, views, policies,
operators, casts and domains are unchanged on the server (`Catalog.watch`): a function redefined
from STABLE to VOLATILE (`CREATE OR REPLACE`), or one created earlier in the search_path, is
seen within about this time rather than `MAX_AGE`."""
RETRY_AFTER = 5.0  # a statement that could not be resolved is asked again after this
IDLE_CLOSE = 1.0  # seconds without a question after which the catalog's own connection is closed
MAX_STATEMENTS = 4096  # verdicts kept; past this the oldest is forgotten

# What verdicts rest on, as the server has it now: the row version (xmin) of every object of the
# user's that a verdict can follow (built-in objects, below FirstNormalObjectId, never change).
# CREATE OR REPLACE and ALTER give a row a new version; CREATE and DROP add and take rows.
_FINGERPRINT = """
SELECT md5(coalesce(string_agg(x, ',' ORDER BY x), '')) FROM (
  SELECT 'p' || oid::text || ':' || xmin::text FROM pg_proc WHERE oid >= 16384
  UNION ALL SELECT 'r' || r.oid::text || ':' || r.xmin::text FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
   WHERE r.oid >= 16384 AND c.relpersistence <> 't'
  UNION ALL SELECT 'o' || oid::text || ':' || xmin::text FROM pg_operator WHERE oid >= 16384
  UNION ALL SELECT 'c' || oid::text || ':' || xmin::text FROM pg_cast WHERE oid >= 16384
  UNION ALL SELECT 'y' || oid::text || ':' || xmin::text FROM pg_policy
  UNION ALL SELECT 'd' || oid::text || ':' || xmin::text FROM pg_constraint WHERE contypid <> 0
  UNION ALL SELECT 'a' || aggfnoid::oid::text || ':' || xmin::text FROM pg_aggregate WHERE aggfnoid::oid >= 16384
  UNION ALL SELECT 'k' || oid::text || ':' || relkind::text FROM pg_class
   WHERE oid >= 16384 AND (relkind = 'f' OR (relrowsecurity AND relkind IN ('r', 'p', 'v', 'f')))
) AS s(x)
"""


class Catalog:
    """Verdicts per statement text, from one server (see the module's docstring).

    `acquire()` must return an async context manager giving a connection (an asyncpg pool's
    `acquire`)."""

    def __init__(self, acquire: Callable[[], Any], *, max_age: float = MAX_AGE,
                 timer: Callable[[], float] = time.monotonic,
                 search_paths: Callable[[], set[str]] | None = None) -> None:
        self._acquire = acquire
        # The search_paths the statements run with (`PoolBackend.search_paths`): the verdict is
        # asked under that one; under several, a name may mean several functions: not proven.
        self._search_paths = search_paths
        self.max_age = max_age
        self._timer = timer
        self._known: dict[str, tuple[Effects, float]] = {}  # text -> (verdict, asked again after)
        self._flights: dict[str, asyncio.Future[Effects]] = {}
        self._warned: set[str] = set()
        self.resolutions = 0  # statements resolved on the server (a figure for tests)
        self._fingerprint: str | None = None  # `_FINGERPRINT` when verdicts were last asked or checked
        self._watch_due = 0.0
        self._watching: asyncio.Future[None] | None = None

    def known(self, text: str) -> Effects | None:
        """The verdict kept for `text`, if still fresh."""
        entry = self._known.get(text)
        if entry is None or entry[1] <= self._timer():
            return None
        return entry[0]

    def current(self, text: str) -> Effects | None:
        """The verdict kept for `text` without waiting: fresh, or a *write* past `max_age` while
        it is being asked again in the background (so a run does not wait for the refresh, and
        the reads of one run that start together still reach fusion in the same turn of the
        loop). A *pure* verdict past `max_age` is never given: the function it proved pure may
        have been redefined VOLATILE since (`CREATE OR REPLACE`), and sharing on it would hand
        one run's claim to others; the caller waits for the refresh (`effects`). None when
        nothing is kept (never asked, dropped after a schema change, or pure and aged)."""
        entry = self._known.get(text)
        if entry is None:
            return None
        self._maybe_watch()
        if entry[1] <= self._timer():
            if text not in self._flights:
                self._start(text)
            if entry[0].pure:
                return None
        return entry[0]

    def _start(self, text: str) -> asyncio.Future[Effects]:
        flight = self._flights[text] = asyncio.ensure_future(self._resolve(text))
        flight.add_done_callback(lambda _f: self._flights.pop(text, None))
        return flight

    async def effects(self, text: str) -> Effects:
        """The verdict on `text`: kept, or resolved now (once, however many ask at once).
        Never raises for the statement's sake: a statement the server cannot resolve is
        `pure=False`, with the reason, and a WARNING is logged once for it."""
        verdict = self.known(text)
        if verdict is not None:
            self._maybe_watch()
            return verdict
        flight = self._flights.get(text) or self._start(text)
        return await asyncio.shield(flight)

    async def _resolve(self, text: str) -> Effects:
        paths = sorted(self._search_paths()) if self._search_paths is not None else []
        try:
            if len(paths) > 1:
                raise StatementRefused(
                    f"the pool's connections run with different search_paths ({' | '.join(paths)}): a name "
                    "may mean another function on each (the database's search_path changed since some opened)")
            async with self._acquire() as con:
                # Read before the question: a change after it is seen by the next check.
                self._saw(await con.fetchval(_FINGERPRINT))
                verdict = await resolve(con, text, paths[0] if paths else None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = f"could not be resolved on the server ({type(exc).__name__}: {exc})"
            # A statement the server refuses to prepare fails its runs with that error anyway;
            # anything else (no TEMP right, a read-only server...) is a degradation: said once.
            if isinstance(exc, StatementRefused) and len(paths) <= 1:
                logger.debug("statement treated as a write: %s", reason)
            elif text not in self._warned:
                self._warned.add(text)
                logger.warning("statement treated as a write (never shared, cached or sent to a replica): %s: %s",
                               reason, " ".join(text.split())[:200])
            verdict = Effects(pure=False, reasons=(reason,))
            self._keep(text, verdict, RETRY_AFTER)
            return verdict
        self.resolutions += 1
        self._warned.discard(text)
        self._keep(text, verdict, self.max_age)
        return verdict

    def _maybe_watch(self) -> None:
        """Start a check (`watch`) in the background when one is due: no run waits for it."""
        if self._timer() < self._watch_due or (self._watching is not None and not self._watching.done()):
            return
        self._watch_due = self._timer() + WATCH_S
        self._watching = asyncio.ensure_future(self._watch_quietly())

    async def _watch_quietly(self) -> None:
        try:
            await self.watch()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the next check tries again; verdicts still age out
            logger.debug("could not check the catalog for changes: %s: %s", type(exc).__name__, exc)

    async def watch(self) -> bool:
        """Check now that nothing verdicts rest on changed on the server (`_FINGERPRINT`); when
        something did, forget every verdict (each is asked again at its next use, a pure one
        before its statement is shared again). Returns whether something changed. Done by
        itself every `WATCH_S` while verdicts are used."""
        async with self._acquire() as con:
            seen = await con.fetchval(_FINGERPRINT)
        return self._saw(seen)

    def _saw(self, fingerprint: str) -> bool:
        changed = self._fingerprint is not None and fingerprint != self._fingerprint
        self._fingerprint = fingerprint
        if changed and self._known:
            logger.info("functions, views or policies changed on the server: what each statement does is "
                        "asked again (%d verdicts dropped)", len(self._known))
            self._known.clear()
        return changed

    def _keep(self, text: str, verdict: Effects, age: float) -> None:
        known = self._known
        known.pop(text, None)
        known[text] = (verdict, self._timer() + age)
        while len(known) > MAX_STATEMENTS:
            del known[next(iter(known))]

    async def close(self) -> None:
        """Stop the questions under way; close the connection it asks on, if it has one of its own."""
        watching, self._watching = self._watching, None
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        for flight in list(self._flights.values()):
            flight.cancel()
        await asyncio.gather(*self._flights.values(), return_exceptions=True)
        stop = getattr(self._acquire, "stop", None)
        if stop is not None:
            await stop()

    def forget(self, text: str | None = None) -> None:
        """Ask the catalog again for `text` (every statement when None) at its next use."""
        if text is None:
            self._known.clear()
        else:
            self._known.pop(text, None)


def catalog_of(pool: PoolBackend) -> Catalog:
    """A `Catalog` over planner's pool `pool` (the primary's: `planner.db.stack` gives it).

    It asks on a connection of its own (opened at the first question, to the database the pool
    opened), never one of the pool's: a statement's first execution must not wait for the pool's
    connections to be given back, nor take one from the statements that use them. A borrowed pool (`pool=`, no DSN) is
    asked on one of its connections. The pool's "may a stale read run again" (`verdict`) is
    this catalog's verdict from now on."""
    catalog = Catalog(_OwnConnection(pool), search_paths=pool.search_paths)
    pool.verdict = catalog.known
    return catalog


class _OwnConnection:
    """One connection for catalog questions, one question at a time (`Catalog`'s `acquire`),
    closed once no question has been asked for `IDLE_CLOSE` seconds: questions come in bursts
    (a flow's first run, a refresh a minute later), and between them a process has only its
    pool and the cache's listening connection open (docs/service.md's sizing)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.con: Any = None
        self.borrowed: Any = None
        self.lock = asyncio.Lock()
        self.used = 0.0
        self.closer: asyncio.Task[None] | None = None

    def __call__(self) -> _OwnConnection:
        return self

    async def __aenter__(self) -> Any:
        from planner.db.pooler import connect

        await self.lock.acquire()
        try:
            pool = await self.backend.pool()
            dsn = self.backend._connected_dsn
            if dsn is None:  # a borrowed pool: no DSN to open a connection of its own with
                self.borrowed = pool
                self.con = await pool.acquire()
            elif self.con is None or self.con.is_closed():
                self.con = await connect(dsn, pooler=self.backend.pooler)
        except BaseException:
            self.lock.release()
            raise
        return self.con

    async def __aexit__(self, *exc: object) -> None:
        try:
            con = self.con
            if con is None:
                return
            if exc[0] is not None and (isinstance(exc[1], asyncio.CancelledError) or con.is_in_transaction()):
                self.con = None  # in an unknown state (cancelled mid-question): never reused
                if self.borrowed is None:
                    con.terminate()
                else:
                    await self.borrowed.release(con)  # the pool resets or drops it
            elif self.borrowed is not None:
                self.con = None
                await self.borrowed.release(con)
            else:
                self.used = asyncio.get_running_loop().time()
                if self.closer is None or self.closer.done():
                    self.closer = asyncio.get_running_loop().create_task(self._close_when_idle())
        finally:
            self.lock.release()

    async def _close_when_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while self.con is not None:
            await asyncio.sleep(max(0.0, self.used + IDLE_CLOSE - loop.time()))
            if loop.time() >= self.used + IDLE_CLOSE and not self.lock.locked():
                await self.close()

    async def close(self) -> None:
        con, self.con = self.con, None
        if con is not None and self.borrowed is None:
            await con.close()

    async def stop(self) -> None:
        """Close the connection and stop the idle timer (the planner is closing)."""
        closer, self.closer = self.closer, None
        if closer is not None and closer is not asyncio.current_task():
            closer.cancel()
            await asyncio.gather(closer, return_exceptions=True)
        await self.close()
