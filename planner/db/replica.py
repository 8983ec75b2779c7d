"""Read replicas: reads a replica may answer go to it, everything else to the primary.

    CacheBackend --> ReplicaBackend --node.sql.replica, replica healthy--> replica stack (its own pool)
                                    +--anything else, or a failure--> primary stack

Where a node may go is decided when its flow is compiled (`SqlBody.replica`, see
`planner.graph.replica_routes`): a single read-only statement, not `replica: false`, and no
node that may write among its ancestors (references and `after:`), so a run always reads its
own writes. Writes and statement lists always use the primary; so do `call:` pools and `describe`,
which never pass this router (`planner.db.stack` gives them the primary's pool).

The replica is never a reason for a run to fail:

- A monitor task checks the replica every `interval` seconds, off the runs' path: one
  statement on a connection of its own (`pg_is_in_recovery()`, `pg_last_wal_replay_lsn()`)
  and one on the primary (`pg_current_wal_flush_lsn()`). The primary's positions are kept
  with the time they were seen until the replica has replayed past them: the lag is the age
  of the oldest position it has not replayed yet, a lower bound of how stale it is, known
  within one interval (the interval is a quarter of `max_lag`, between 50 ms and 1 s). Past
  `max_lag`, reads go to the primary until the replica catches up.
- A query the replica cannot answer (lost connection, refused, a conflict with recovery, any
  error of the server) is sent again to the primary, whose answer is the run's. A connection
  failure also marks the replica down: reads go to the primary, and the monitor tries it
  again after a backoff (1 s, doubled up to 10 s) until it answers.
- The replica has the node's `timeout` to answer, its wait for a replica connection
  included. A read it has not answered by then is sent again to the primary, timed by the
  node's `timeout` there as every statement is (nothing of it is left: see docs/scaling.md),
  and the monitor checks the replica at once: one that does not answer its check within
  `probe_timeout` is marked down. Marking it down (for any reason) sends every read still in
  flight on it to the primary at once, those of nodes without a timeout included.
- Each change of state is logged once (a WARNING when reads leave the replica, with the
  reason; INFO when they come back), never once per query.

A replica reached but not in recovery (a promoted standby, or a primary given by mistake) is
not used: it may miss the primary's writes. `Served.replica` tells which server answered.

A read that must see every write committed before some moment (`Query.fresh_after`: the
cache's refill after an invalidation) goes to the replica only once it is proven past that
moment: a check asked the primary for its WAL insert position after it, and the replica had
replayed that position (at that check or a later one). Until then the primary answers it.
Lag within `max_lag` is fine for a read; never for a value about to be kept for a new ttl in
place of one dropped because it changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

from planner.db.dsn import dsn_secrets, redact_text
from planner.db.standby import Positions, ask_replica, primary_position
from planner.errors import DatabaseUnavailable, NodeTimeout, QueryError
from planner.kinds.backend import Backend, Database, Query, WrappingBackend
from planner.lang.models import parse_duration
from planner.results import Served, error_text

logger = logging.getLogger("planner")

DEFAULT_MAX_LAG = 10.0
"""Seconds a replica may lag behind the primary before reads leave it (`PLANNER_REPLICA_MAX_LAG`)."""
PROBE_TIMEOUT = 2.0  # a check that takes longer marks the replica down
BACKOFF = (1.0, 10.0)  # first and longest wait before a replica that failed is tried again
# SQLSTATE classes and codes that mean the server (or the way to it) is gone, not the statement:
# connection exceptions, admin or crash shutdown, cannot connect now (still starting up).
_DOWN_STATES = ("08", "57P01", "57P02", "57P03")

State = Literal["unknown", "up", "lagging", "down"]


def parse_max_lag(value: str | float | None = None) -> float:
    """`replica_max_lag` in seconds: a duration (`"500ms"`, `"2s"`) or a number of seconds;
    None: 10 s (`Settings.replica_max_lag` holds `PLANNER_REPLICA_MAX_LAG`'s). Raises `ValueError`
    for anything else."""
    if value is None:
        value = DEFAULT_MAX_LAG
    if isinstance(value, bool):
        raise ValueError(f"bad replica_max_lag {value!r}: give a duration such as 500ms or 2s")
    if isinstance(value, int | float):
        if not 0 < value <= 24 * 3600:
            raise ValueError(f"bad replica_max_lag {value!r}: must be above 0 and at most 24h")
        return float(value)
    return parse_duration(value)


def check_interval(lag: float) -> float:
    """How often the monitor checks a replica allowed to lag `lag` seconds."""
    return min(1.0, max(0.05, lag / 4))


class ReplicaBackend(WrappingBackend):
    """Sends the reads a replica may answer to `replica`, everything else to `primary` (`inner`).

    `replica` is a backend over the replica's pool (`planner.db.stack` builds the same stack
    as the primary's: fusion, coalescing, a pool); `dsn` is the replica's, for the monitor's
    own connection; `primary_pool` the primary's pool (`PoolBackend`), where the monitor reads
    the primary's WAL position. It routes whole queries (`run`), so it sits above fusion and
    coalescing and each side fuses and coalesces its own. See the module's docstring.
    """

    def __init__(
        self,
        primary: Backend,
        replica: Backend,
        *,
        dsn: str,
        primary_pool: Database,
        max_lag: float = DEFAULT_MAX_LAG,
        interval: float | None = None,
        probe_timeout: float = PROBE_TIMEOUT,
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        super().__init__(primary)
        from planner.db.pool import PoolBackend

        self.replica = replica
        self.primary_pool = primary_pool
        self.max_lag = max_lag
        self.interval = check_interval(max_lag) if interval is None else interval
        self.probe_timeout = probe_timeout
        self.backoff = backoff
        self.state: State = "unknown"
        self.reason: str | None = None  # why reads do not go to the replica, when they do not
        self.fallbacks = 0  # queries the replica failed and the primary answered (a figure for tests)
        self._probe = PoolBackend(dsn=dsn, min_size=1, max_size=1)  # the monitor's own connection
        self._secrets = dsn_secrets(dsn)
        self.positions = Positions()  # how far behind it is, and what it is proven past (`planner.db.standby`)
        self._wait = backoff[0]
        self._retry_at = 0.0
        self._downs = 0  # times it was marked down: a check begun before the last one cannot bring it up
        self._checked = asyncio.Event()
        self._wake = asyncio.Event()  # set: the monitor checks now, not after its interval
        self._in_flight: set[asyncio.Timeout] = set()  # the time limits of the reads on the replica now
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # --- routing ------------------------------------------------------------------------

    def usable(self) -> bool:
        """Whether a read sent now may go to the replica: up, and not lagging past `max_lag`
        (the age of the oldest position it had not replayed at the last check grows meanwhile)."""
        if self.state != "up":
            return False
        if not self.positions.behind:
            return True
        lag = self.lag()
        if lag <= self.max_lag:
            return True
        self._lagging(lag)  # known now, before the next check: reads leave it at once
        return False

    def lag(self) -> float:
        """Seconds the replica is known to lag behind the primary (0 when it had replayed all
        the primary had written at the last check)."""
        return self.positions.lag(asyncio.get_running_loop().time())

    def past(self, moment: float | None) -> bool:
        """Whether the replica is proven to have every write committed before `moment`
        (`time.monotonic()`; None: no such need)."""
        return self.positions.past(moment)

    async def run(self, query: Query) -> Any:
        if not query.sql.replica or not self._ready() or not self.past(query.fresh_after):
            return await self.inner.run(query)
        # The node's timeout bounds the replica's part as a whole: a stalled replica holds its
        # connections, and the reads queued behind them would otherwise wait for the run's
        # deadline. `_down` ends every such wait at once.
        limit = asyncio.timeout(query.timeout)
        try:
            async with limit:
                self._in_flight.add(limit)
                try:
                    value = await self.replica.run(query)
                finally:
                    self._in_flight.discard(limit)
        except (QueryError, DatabaseUnavailable) as exc:
            self._failed(exc)
        except (NodeTimeout, TimeoutError) as exc:
            if isinstance(exc, TimeoutError) and not limit.expired():
                raise  # not ours: the replica's stack raised it
            self._timed_out()
        else:
            query.served.replica = True
            return value
        query.served = Served(cached=query.served.cached, statements=query.served.statements)  # nothing the replica's stack did counts
        return await self.inner.run(query)

    def _ready(self) -> bool:
        if self._task is None and not self._closed:
            self._start()
        return self.usable()

    def _timed_out(self) -> None:
        """A read the replica did not answer in time (or in flight on it when it was marked down): it goes
        to the primary. A slow statement is not proof of a stalled server, so the monitor,
        woken now, decides: a replica that does not answer its check is marked down."""
        self.fallbacks += 1
        if self.state == "up":
            logger.debug("read replica: no answer within the node's timeout; the primary answers instead")
            self._wake.set()

    def _failed(self, exc: QueryError | DatabaseUnavailable) -> None:
        """A query the replica did not answer: it goes to the primary; a lost server is marked down."""
        self.fallbacks += 1
        sqlstate = getattr(exc, "sqlstate", None)
        lost = isinstance(exc, DatabaseUnavailable) or (
            exc.transient and (sqlstate is None or sqlstate.startswith(_DOWN_STATES)))
        if lost:
            self._down(str(exc), probe=False)
        else:
            logger.debug("read replica: %s; the primary answers instead", self._redact(str(exc)))

    # --- the monitor --------------------------------------------------------------------

    async def open(self) -> None:
        """Open the primary (raises `DatabaseUnavailable`); start the monitor and wait (at most
        `probe_timeout`) for its first check. A replica that cannot be reached raises nothing."""
        await self.inner.open()
        if self._task is None:
            self._start()
        try:
            await asyncio.wait_for(self._checked.wait(), self.probe_timeout + 0.5)
        except TimeoutError:
            pass

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="planner-replica-monitor")

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.state == "down" and loop.time() < self._retry_at:
                await asyncio.sleep(self._retry_at - loop.time())
                continue
            try:
                await self.check(self._downs)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                self._down(f"no answer to the health check in {self.probe_timeout:g}s", probe=True)
            except Exception as exc:
                self._down(error_text(exc), probe=True)
            self._checked.set()
            if self.state != "down":
                await self._pause()

    async def _pause(self) -> None:
        """Wait for the next check: `interval`, or less when a read timed out on the replica."""
        try:
            async with asyncio.timeout(self.interval):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.clear()  # a read that times out during the check asks for another one

    async def check(self, downs: int | None = None) -> None:
        """Check the replica once: reachable, a standby, and how far behind the primary. Raises
        what reaching it raised (`TimeoutError` past `probe_timeout`). `downs`: a check begun
        before a later failure changes nothing."""
        asked = time.monotonic()  # every write committed before this lies before `inserted`
        # A primary that does not answer never counts against the replica.
        position, inserted = await primary_position(self.primary_pool, self.probe_timeout, self._redact)
        # Taken once the position is read: the primary had written it by then, so the replica
        # lacks something at least this old while it has not replayed it (a lower bound).
        seen = asyncio.get_running_loop().time()
        async with asyncio.timeout(self.probe_timeout):
            row = await ask_replica(self._probe)
        if downs is not None and downs != self._downs:
            return
        if not row["standby"]:
            self._down("it is not a standby (pg_is_in_recovery() is false): it may miss the primary's writes",
                       probe=True)
            return
        self.positions.record(int(row["replayed"]), position, seen, inserted, asked)
        lag = self.lag()
        if lag > self.max_lag:
            self._lagging(lag)
        else:
            self._set("up", None)

    def _lagging(self, lag: float) -> None:
        self._set("lagging", f"it lags {lag:.1f}s behind the primary (more than ReplicaOptions.max_lag, {self.max_lag:g}s)")

    def _down(self, reason: str, *, probe: bool) -> None:
        now = asyncio.get_running_loop().time()
        if self.state == "down":
            if probe:  # tried again and failed: wait longer before the next try
                self._wait = min(self._wait * 2, self.backoff[1])
                self._retry_at = now + self._wait
            return
        self._wait = self.backoff[0]
        self._retry_at = now + self._wait
        self._downs += 1
        self._set("down", reason)
        for limit in self._in_flight:  # the reads still on it go to the primary now
            if not limit.expired():
                limit.reschedule(now)

    def _set(self, state: State, reason: str | None) -> None:
        if state == self.state:
            self.reason = reason if reason is None else self._redact(reason)
            return
        before, self.state = self.state, state
        self.reason = None if reason is None else self._redact(reason)
        if state == "up":
            if before != "unknown":
                logger.info("read replica back: reads go to it again", extra={"replica_state": state})
        else:
            logger.warning("read replica %s, reads go to the primary: %s",
                           "lagging" if state == "lagging" else "unavailable", self.reason,
                           extra={"replica_state": state})

    def _redact(self, text: str) -> str:
        return redact_text(text, self._secrets)

    # --- the rest -----------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the monitor; close the replica's pools and the primary's."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        try:
            await self._probe.close()
            await self.replica.close()
        finally:
            await self.inner.close()
