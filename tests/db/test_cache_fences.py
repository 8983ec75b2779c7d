"""How fresh a cache refill must be after an invalidation (`Query.fresh_after`), without a database.

The replica side (a real streaming replica, paused) is in tests/db/test_cache_replica.py; here, what
the cache asks of whatever is below it, for each way an invalidation arrives.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from planner.db.cache import CacheBackend
from planner.kinds.backend import Offline, Query
from tests.db.test_cache import _flow, _query

OTHER = """
inputs: {x: json}
nodes:
  a: {sql: "SELECT $x AS v", fetch: one, cache: 10s}
"""


class Asked(Offline):
    """Answers every query with its parameter; remembers how fresh each had to be."""

    def __init__(self) -> None:
        super().__init__()
        self.fresh: list[float | None] = []

    async def run(self, query: Query) -> Any:
        self.fresh.append(query.fresh_after)
        return query.params[0][0]


def _cache() -> tuple[CacheBackend, Asked]:
    asked = Asked()
    return CacheBackend(asked, enabled=True), asked


async def test_a_first_read_needs_no_freshness() -> None:
    cache, asked = _cache()
    await cache.run(_query(_flow(), "a", 1))
    assert asked.fresh == [None]


async def test_a_refill_after_invalidate_must_be_as_fresh_as_the_invalidation() -> None:
    for how in ({"node": "a", "flow": "f"}, {"node": "a"}, {"flow": "f"}, {}):
        cache, asked = _cache()
        await cache.run(_query(_flow(), "a", 1))
        before = time.monotonic()
        cache.invalidate(**how)
        await cache.run(_query(_flow(), "a", 1))
        fresh = asked.fresh[-1]
        assert fresh is not None and before <= fresh <= time.monotonic(), how


async def test_a_node_another_flow_or_another_node_is_not_held_to_it() -> None:
    cache, asked = _cache()
    cache.invalidate("a", flow="f")
    await cache.run(_query(_flow(), "b", 1))
    await cache.run(_query(_flow(OTHER, name="g"), "a", 1))
    assert asked.fresh == [None, None]


async def test_a_node_never_run_before_an_invalidation_is_held_to_it() -> None:
    cache, asked = _cache()
    cache.invalidate("a")  # every flow's `a`: g's was never run here
    await cache.run(_query(_flow(OTHER, name="g"), "a", 1))
    assert asked.fresh[0] is not None


async def test_a_refill_after_a_nodes_invalidates_must_be_as_fresh() -> None:
    cache, asked = _cache()
    await cache.run(_query(_flow(), "a", 1))

    async def write(_args: Any) -> str:
        return "written"

    before = time.monotonic()
    assert await cache.invalidating("f", ["a"], write)(None) == "written"
    await cache.run(_query(_flow(), "a", 1))
    assert asked.fresh[-1] is not None and asked.fresh[-1] >= before


async def test_an_invalidation_from_another_process_holds_refills_to_when_it_arrived() -> None:
    cache, asked = _cache()
    cache.channel = "c"
    cache.trusted = True
    for payload in ("other\tf\ta", "other\t*\ta", "other\tf\t*", "other\t*\t*"):
        before = time.monotonic()
        cache._received(payload)
        await cache.run(_query(_flow(), "a", 1))
        assert asked.fresh[-1] is not None and asked.fresh[-1] >= before, payload


async def test_a_lost_channel_back_holds_every_refill_to_when_it_came_back_but_the_first_connection_does_not() -> None:
    cache, asked = _cache()
    cache.channel = "c"
    cache._first_state = asyncio.Event()
    cache._channel_state(True)  # the first connection: nothing was kept, nothing missed
    await cache.run(_query(_flow(), "a", 1))
    assert asked.fresh == [None]
    cache._channel_state(False)
    before = time.monotonic()
    cache._channel_state(True)  # back: invalidations may have been missed meanwhile
    await cache.run(_query(_flow(), "a", 1))
    assert asked.fresh[-1] is not None and asked.fresh[-1] >= before


class Sent:
    """A channel that records what it is asked to send (its payloads without the sender)."""

    def __init__(self) -> None:
        self.payloads: list[str] = []

    def subscribe(self, channel: str, on_message: Any, on_state: Any) -> None:
        return None

    async def notify(self, channel: str, payload: str) -> None:
        self.payloads.append(payload.partition("\t")[2])


async def test_what_invalidate_tells_other_processes_names_what_was_asked() -> None:
    channel = Sent()
    cache = CacheBackend(Asked(), enabled=True, channel="c", via=channel)
    sent = channel.payloads
    cache.invalidate("a")  # never run here: still told
    cache.invalidate(flow="f")
    cache.invalidate("a", flow="f")
    cache.invalidate()
    await cache.close()
    assert sent == ["*\ta", "f\t*", "f\ta", "*\t*"]
