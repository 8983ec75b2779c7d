"""What the replica router's monitor knows of the standby (`planner.db.replica`): the two
questions it asks (the replica's replayed WAL position, the primary's flushed and inserted
ones) and `Positions`, what it makes of the answers: how far the replica lags, and the
moments it is proven to have every write of.

Apart from the router: the router decides where a read goes, this module only measures.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from planner.results import error_text

if TYPE_CHECKING:
    from planner.db.pool import PoolBackend
    from planner.kinds.backend import Database

logger = logging.getLogger("planner")

MAX_SAMPLES = 1000  # primary positions kept while the replica lags (past this, only the oldest are kept)

REPLICA_STATE = ("SELECT pg_is_in_recovery() AS standby, "
                 "(pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::numeric AS replayed")
# The flushed position measures the lag; the insert position (every commit acknowledged by
# then, `synchronous_commit = off` included, lies before it) proves a replica past a moment.
PRIMARY_LSN = ("SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::numeric AS flushed, "
               "(pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::numeric AS inserted")


class Positions:
    """The primary's positions the replica had not replayed at the last check, with the time
    each was seen (the lag is the age of the oldest), and the latest moment the replica is
    proven past (`time.monotonic()`: it has every write committed before it)."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()  # (loop time seen, primary position) not replayed yet
        # (insert position, when it was asked for) not proven replayed yet
        self._asked: deque[tuple[int, float]] = deque()
        self.proven_at: float | None = None

    @property
    def behind(self) -> bool:
        """Whether the replica had not replayed all the primary had written at the last check."""
        return bool(self._samples)

    def lag(self, now: float) -> float:
        """Seconds the replica lags at loop time `now` (0 when it is not behind)."""
        return now - self._samples[0][0] if self._samples else 0.0

    def past(self, moment: float | None) -> bool:
        """Whether the replica is proven past `moment` (None: no such need)."""
        return moment is None or (self.proven_at is not None and self.proven_at >= moment)

    def record(self, replayed: int, flushed: int | None, seen: float, inserted: int | None, asked: float) -> None:
        """One check's answers: the replica had replayed `replayed`; the primary had flushed
        `flushed` by loop time `seen`, and its insert position was `inserted` after `asked`."""
        samples = self._samples
        while samples and samples[0][1] <= replayed:
            samples.popleft()
        if flushed is not None and flushed > replayed and len(samples) < MAX_SAMPLES:
            samples.append((seen, flushed))
        pending = self._asked
        if inserted is not None:
            if pending and len(pending) >= MAX_SAMPLES:
                pending.pop()  # the newest gives way: the oldest are the ones a refill waits for
            pending.append((inserted, asked))
        while pending and pending[0][0] <= replayed:
            _, moment = pending.popleft()
            self.proven_at = moment if self.proven_at is None else max(self.proven_at, moment)


async def ask_replica(probe: PoolBackend) -> Any:
    """The replica's `REPLICA_STATE` row, on the monitor's own connection (`probe`)."""
    pool = await probe.pool()
    con = await pool.acquire()
    try:
        row = await con.fetchrow(REPLICA_STATE)
    except BaseException:
        # Dropped, not cancelled: a stalled server never acknowledges a cancel, and giving
        # the connection back would wait for that (and the monitor with it) until it wakes.
        con.terminate()
        raise
    await pool.release(con)
    return row


async def primary_position(primary: Database, within: float,
                           redact: Callable[[str], str]) -> tuple[int | None, int | None]:
    """The primary's flushed and inserted WAL positions, or Nones when they cannot be read
    `within` seconds (the lag is then measured against the positions seen before)."""
    try:
        async with asyncio.timeout(within):
            pool = await primary.pool()
            async with pool.acquire() as con:
                row = await con.fetchrow(PRIMARY_LSN)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.debug("read replica: the primary's WAL position could not be read: %s", redact(error_text(exc)))
        return None, None
    if row is None:
        return None, None
    return (None if row["flushed"] is None else int(row["flushed"]),
            None if row["inserted"] is None else int(row["inserted"]))
