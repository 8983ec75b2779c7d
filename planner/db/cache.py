"""The value cache of `cache:` nodes: a `Backend` wrapper, per `Planner`, in process memory.

    sql node --Query--> CacheBackend --miss--> (coalescing) --> PoolBackend
                             |
                             +--hit--> a private copy of the kept value (no connection)

- Only nodes with `cache: <duration>` are cached, and the flow loader accepts `cache:` only on a
  node proven read-only (one statement; `planner.lang.sqlinfo`). Every other query passes straight
  through: the price for them is one attribute check.
- A value is kept per (flow, node, statement texts, fetch, parameters) for the node's duration,
  in a bounded LRU (`cachetools.TLRUCache`: a time-to-use per entry, least recently used
  evicted first when full).
- Single flight: concurrent misses for one key send one statement. It runs in a task of its own
  (a batch of one member, `planner.db.batcher`), awaited by every run that asked; a run that
  gives up (cancelled, its deadline) leaves the others waiting, and the statement is cancelled
  only when nobody waits any more.
- Only values the inner backend returned are kept: never an error (each waiting run gets the
  failure as its own attempt's, and its own retry policy decides) and never a node's default
  (defaults are applied above the backend, by the executor).
- Values are never shared between runs: each run gets its own copy of the kept value (rows
  are dicts and lists of plain values, copied structurally; anything else is deep-copied).
- Parameters are part of the key as they would be sent (`planner.kinds.backend.freeze`, the key
  coalescing shares members by): `1`, `1.0` and `true` are three keys, and so are `2.5` and
  `2.50`; lists and dicts are keyed by their contents. A parameter that cannot be hashed even
  so (an object of a class of the caller's) makes that query uncached: it runs every time.
- Invalidation drops a node's values (`invalidate`) and, through a generation number in every
  key, orphans the statements in flight for it: a value read before a write that invalidates
  it is handed to the runs that asked for it but never kept.
- A refill is never older than an invalidation: each invalidation (`invalidate`, a node's
  `invalidates:`, one received from another process, the channel coming back after it was lost)
  records when it happened for what it names, and a later miss of those nodes asks for a value
  at least that fresh (`Query.fresh_after`): a read replica answers it only once proven to have
  replayed what the primary had written by then (`planner.db.replica`), else the primary does.
  A lagging replica can no longer put the value from before the write back for a whole new ttl.
- `PLANNER_CACHE=0` (or `false`, `off`, `no`) in the environment turns a Planner's cache off
  (`enabled=False`, from `planner.settings.Settings`): every query runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, cast

from cachetools import TLRUCache

from planner.db.batcher import Batch, Batcher
from planner.kinds.backend import Backend, Channel, Outcome, Query, WrappingBackend, freeze, private_copy

DEFAULT_SIZE = 4096
"""How many values a `CacheBackend` keeps at most (all nodes together) before evicting the least
recently used."""

Pair = tuple[str, str]  # (flow, node)
Key = tuple[Any, ...]
# A key: ((flow, node), generation, ttl, statement texts, fetch, frozen parameters).
_PAIR, _GEN, _TTL = 0, 1, 2
_MISSING = object()
NodeRun = Callable[[Any], Coroutine[Any, Any, Any]]


logger = logging.getLogger("planner")
LISTEN_WAIT_S = 2.0  # how long the first cached read waits for the channel between processes


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What a `CacheBackend` did since it was made."""

    enabled: bool
    hits: int  # served from the cache: no statement sent
    misses: int  # statements sent for cached nodes
    joined: int  # waited for another run's statement for the same key instead of sending one
    size: int  # values kept now
    maxsize: int
    invalidations: int  # invalidation requests (`invalidate`, `invalidates:`)
    dropped: int  # values those requests removed
    uncacheable: int  # queries run uncached: a parameter that cannot be hashed
    untrusted: int = 0  # queries sent past the cache while the channel between processes was down
    trusted: bool = True  # whether cached values are served now (the channel is up, or there is none)


class _Store(TLRUCache[Key, Any, float]):
    """The TLRU cache, plus an index (flow, node) -> keys, kept in step with evictions and
    expiries, so that dropping one node's values never scans the others'."""

    def __init__(self, maxsize: int, timer: Callable[[], float]) -> None:
        super().__init__(maxsize, _expires, timer)
        self.index: dict[Pair, set[Key]] = {}

    def __setitem__(self, key: Key, value: Any) -> None:
        super().__setitem__(key, value)
        self.index.setdefault(key[_PAIR], set()).add(key)

    def __delitem__(self, key: Key) -> None:
        try:
            super().__delitem__(key)
        finally:
            self._unindex(key)

    def expire(self, time: float | None = None) -> list[tuple[Key, Any]]:
        expired = super().expire(time)
        for key, _ in expired:
            self._unindex(key)
        return expired

    def _unindex(self, key: Key) -> None:
        keys = self.index.get(key[_PAIR])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.index[key[_PAIR]]


def _expires(key: Key, value: Any, now: float) -> float:
    ttl: float = key[_TTL]
    return now + ttl


class _Values:
    """What a cache keeps and what an invalidation changes there: the values (a `_Store`), the
    generation of every (flow, node) seen (bumped by each invalidation that names it: a value
    read at an older one is not kept) and the fences (when an invalidation last named what)."""

    __slots__ = ("store", "gens", "fences", "_maxsize", "_timer")

    def __init__(self, maxsize: int, timer: Callable[[], float]) -> None:
        self._maxsize, self._timer = maxsize, timer
        self.store = _Store(maxsize, timer)
        self.gens: dict[Pair, int] = {}  # every (flow, node) seen; bumped by each invalidation
        # When an invalidation last named (flow, node) (None: any): a refill must be as fresh.
        # On planner's clock (`time.monotonic`), never the injectable `timer`: a replica compares it.
        self.fences: dict[tuple[str | None, str | None], float] = {}

    def generation(self, pair: Pair) -> int:
        return self.gens.setdefault(pair, 0)

    def keep(self, key: Key, value: Any) -> None:
        """Keep `value` unless an invalidation came since `key`'s generation (the write may have
        happened after the read)."""
        if self.gens.get(key[_PAIR]) == key[_GEN]:
            self.store[key] = value

    def invalidate(self, flow: str | None, node: str | None) -> int:
        """Drop what (flow, node) names (None: any), seen here or not: a refill of it must see
        every write committed by now. Returns how many values were dropped."""
        store, gens, dropped = self.store, self.gens, 0
        for pair in [p for p in gens if (node is None or p[1] == node) and (flow is None or p[0] == flow)]:
            gens[pair] += 1
            for key in store.index.pop(pair, ()):
                if store.pop(key, _MISSING) is not _MISSING:
                    dropped += 1
        self.fences[(flow, node)] = time.monotonic()
        return dropped

    def forget_all(self, *, fence: bool = True) -> None:
        for pair in self.gens:
            self.gens[pair] += 1
        self.store = _Store(self._maxsize, self._timer)
        if fence:
            self.fences.clear()
            self.fences[(None, None)] = time.monotonic()

    def fence(self, pair: Pair) -> float | None:
        """The latest invalidation that named `pair`: its refill must be at least that fresh."""
        fences = self.fences
        if not fences:
            return None
        flow, node = pair
        times = [t for t in (fences.get(pair), fences.get((flow, None)), fences.get((None, node)),
                             fences.get((None, None))) if t is not None]
        return max(times) if times else None


class CacheBackend(WrappingBackend):
    """Serves `cache:` nodes from memory; passes every other query to `inner` untouched.

    `maxsize` bounds how many values are kept; `timer` (seconds, monotonic) decides expiry,
    and tests inject one; `enabled=False` serves nothing from memory (a Planner passes its
    settings' `PLANNER_CACHE`). `channel` names the LISTEN/NOTIFY channel invalidations travel
    on between processes, `via` what carries it (a `planner.kinds.backend.Channel`: the
    primary's `PoolBackend`); without a channel, invalidations stay in this process. Raises
    `ValueError` for a channel without `via`.
    """

    def __init__(
        self,
        inner: Backend,
        *,
        maxsize: int = DEFAULT_SIZE,
        timer: Callable[[], float] = time.monotonic,
        enabled: bool = True,
        channel: str | None = None,
        via: Channel | None = None,
    ) -> None:
        super().__init__(inner)
        if channel is not None and via is None:
            raise ValueError(f"cache channel {channel!r} given without via= (what carries it)")
        self.via = via
        self.enabled = enabled
        # With a channel, invalidations travel between processes (LISTEN/NOTIFY), and values
        # are trusted only while this process listens: one that lost the channel may have
        # missed a write elsewhere.
        self.channel = channel
        self.trusted = channel is None
        self._first_state: asyncio.Event | None = None
        self._origin = os.urandom(6).hex()  # who sent a notification: our own are not news
        self.maxsize = maxsize
        self._values = _Values(maxsize, timer)
        # Single flight: one batch per key, of one member that every run missing it waits for.
        self._flights: Batcher[Query] = Batcher(self._fetch, private=True)
        self._hits = self._misses = self._joined = self._invalidations = self._dropped = self._uncacheable = 0
        self._untrusted = 0
        self._sends: set[asyncio.Task[None]] = set()

    # --- running ------------------------------------------------------------------------

    def run(self, query: Query) -> Coroutine[Any, Any, Any]:  # not async: no coroutine of its own
        ttl = query.sql.cache_ttl
        if ttl is None or not self.enabled:
            return self.inner.run(query)  # the inner coroutine itself: uncached nodes pay nothing more
        return self._cached(query, ttl)

    async def _cached(self, query: Query, ttl: float) -> Any:
        if not self.trusted and not await self._trusted_after_listening():
            return await self.inner.run(query)  # served by the database until the channel is back
        node = query.node
        pair = (node.flow, node.name)
        values = self._values
        try:
            key = (pair, values.generation(pair), ttl, tuple(s.text for s in node.sql.statements), node.sql.fetch,
                   freeze(query.params))
            found = values.store[key]
        except KeyError:
            pass
        except TypeError:  # a parameter that cannot be hashed: run it, uncached
            self._uncacheable += 1
            return await self.inner.run(query)
        else:
            self._hits += 1
            query.served.cached = True
            return private_copy(found)
        flight = self._flights.pending(key)
        if flight is None:
            self._misses += 1
            query.served.cached = False  # a retry of a run that joined a flight before
            query.fresh_after = values.fence(pair)
            flight = self._flights.open(key)
        else:
            self._joined += 1
            query.served.cached = True  # no statement was sent for this run
        # Every run gets its own copy of the value (it is kept) and of the error.
        return await flight.wait(flight.join(query, share=key))

    async def peek(self, query: Query) -> tuple[bool, Any]:
        """For compiled groups (`planner.compile.runner`): `(True, a private copy)` of the kept
        value of `query` (counted a hit), else `(False, None)`. Never sends a statement; the
        first one of a process waits for the channel between processes, as a cached read does."""
        node = query.node
        ttl = node.sql.cache_ttl
        if ttl is None or not self.enabled or (not self.trusted and not await self._trusted_after_listening()):
            return False, None
        try:
            found = self._values.store[self._key(query, ttl, self._values.generation((node.flow, node.name)))]
        except KeyError:
            self._misses += 1
            return False, None
        except TypeError:
            self._uncacheable += 1
            return False, None
        self._hits += 1
        query.served.cached = True
        return True, private_copy(found)

    def generation(self, flow: str, node: str) -> int | None:
        """The generation of `node`'s values now, for `keep`; None when nothing may be kept."""
        if not self.enabled or not self.trusted:
            return None
        return self._values.generation((flow, node))

    def keep(self, query: Query, value: Any, generation: int) -> None:
        """Keep `value`, found for `query` by a compiled statement sent at `generation`, unless
        an invalidation came since (the rule a statement of its own follows)."""
        node = query.node
        if node.sql.cache_ttl is None or not self.enabled or not self.trusted:
            return
        with contextlib.suppress(TypeError):
            # The run keeps `value`: a copy is kept.
            self._values.keep(self._key(query, node.sql.cache_ttl, generation), private_copy(value))

    @staticmethod
    def _key(query: Query, ttl: float, generation: int) -> Key:
        node = query.node
        return ((node.flow, node.name), generation, ttl, tuple(s.text for s in node.sql.statements), node.sql.fetch,
                freeze(query.params))

    async def _fetch(self, flight: Batch[Query]) -> list[Outcome]:
        """The statement of a flight (`_flights`): open to newcomers until its value lands."""
        value = await self.inner.run(flight.members[0].item)
        self._values.keep(cast(Key, flight.key), value)  # the inner backend's own object: nobody else refers to it
        return [(value, None)]

    # --- the channel between processes ---------------------------------------------------

    async def _trusted_after_listening(self) -> bool:
        """Asked while values are not trusted: whether they are once the first cached reads of
        a process have waited for it to listen. A query that finds them untrusted is counted."""
        await self._listen()
        if not self.trusted:
            self._untrusted += 1
        return self.trusted

    async def _listen(self) -> None:
        if self.channel is None:
            return
        if self._first_state is None:
            self._first_state = asyncio.Event()
            assert self.via is not None  # a channel comes with what carries it (`__init__`)
            self.via.subscribe(self.channel, self._received, self._channel_state)
        if self._first_state.is_set():
            return  # it answered once: from now on `trusted` says it all
        try:
            async with asyncio.timeout(LISTEN_WAIT_S):
                await self._first_state.wait()
        except TimeoutError:
            pass  # still connecting: untrusted (and uncached) until it does

    def _channel_state(self, listening: bool) -> None:
        if listening and not self.trusted:
            # What was kept before may have gone stale while nobody listened, and so may what a
            # lagging replica would refill it with. (On the first connection nothing was kept.)
            self._values.forget_all(fence=self._first_state is not None and self._first_state.is_set())
        self.trusted = listening
        if self._first_state is not None:
            self._first_state.set()

    def _received(self, payload: str) -> None:
        origin, _, rest = payload.partition("\t")
        if origin == self._origin:
            return  # our own: already dropped here
        flow, _, node = rest.partition("\t")
        if flow == "*" and node in ("*", ""):
            self._values.forget_all()
            return
        # A node in every flow (`*`), or one pair; named even if this process never ran it:
        # its first read here must not come from before the write either.
        self._dropped += self._values.invalidate(None if flow == "*" else flow, None if node == "*" else node)

    def _publish(self, pairs: Iterable[tuple[str | None, str | None]] | None) -> None:
        """Tell the other processes (in the background: the run does not wait for it)."""
        if self.channel is None:
            return
        pairs = [("*", "*")] if pairs is None else [(flow or "*", node or "*") for flow, node in pairs]
        payloads = [f"{self._origin}\t{flow}\t{node}" for flow, node in pairs]
        channel, via = self.channel, self.via
        assert via is not None  # a channel comes with what carries it (`__init__`)

        async def send() -> None:
            for payload in payloads:
                try:
                    await via.notify(channel, payload)
                except Exception as exc:  # the others keep their values until their ttl ends
                    logger.warning("cache: could not tell other processes of an invalidation: %s", exc)

        task = asyncio.get_running_loop().create_task(send())
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    # --- invalidation -------------------------------------------------------------------

    def invalidate(self, node: str | None = None, *, flow: str | None = None) -> int:
        """Drop cached values: all of them, a node's (in every flow, or in `flow`), or a flow's.
        Returns how many values were dropped. Statements in flight for those nodes are not kept."""
        self._invalidations += 1
        if node is None and flow is None:
            dropped = self.size
            self._values.forget_all()
            self._publish(None)
        else:
            dropped = self._values.invalidate(flow, node)
            # What was asked, not the pairs seen here: another process may hold a node this one never ran.
            self._publish([(flow, node)])
        self._dropped += dropped
        return dropped

    def invalidating(self, flow: str, nodes: Iterable[str], run: NodeRun) -> NodeRun:
        """`run`, followed by dropping `nodes`' values of `flow` when it returns (the node is
        `ok`); a failure drops nothing. `run` itself when the cache is off."""
        if not self.enabled:
            return run
        pairs = tuple((flow, name) for name in nodes)

        async def run_then_invalidate(args: Any) -> Any:
            value = await run(args)
            self._invalidations += 1
            self._dropped += sum(self._values.invalidate(*pair) for pair in pairs)
            self._publish(pairs)
            return value

        return run_then_invalidate

    async def close(self) -> None:
        """Send the invalidations still queued for other processes, then close the rest."""
        await asyncio.gather(*self._sends, return_exceptions=True)
        await self.inner.close()

    # --- statistics ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        self._values.store.expire()
        return len(self._values.store)

    def stats(self, *, expire: bool = True) -> CacheStats:
        """The counters; `expire=False` counts expired values not yet removed in `size` and changes
        nothing (safe from another thread: an OpenTelemetry exporter's)."""
        size = self.size if expire else len(self._values.store)
        return CacheStats(self.enabled, self._hits, self._misses, self._joined, size, self.maxsize,
                          self._invalidations, self._dropped, self._uncacheable, self._untrusted, self.trusted)
