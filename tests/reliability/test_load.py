"""Load: thousands of process_buffered runs, 200 in flight, 5% of node executions failing.

10,000 runs by default (well under a minute); `--soak` or PLANNER_SOAK=1 runs 100,000. Every
result must obey the contract, every new message be stored exactly once, and no connection,
task or object be left behind.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from planner import FlowFailed, FlowResult, NodeState, Planner, PoolOptions

pytestmark = pytest.mark.slow

FLOWS = Path(__file__).resolve().parent.parent.parent / "flows"
IN_FLIGHT = 200
WARM_UP = 1_000
FAILURE_RATE = 0.05


class InjectedFault(ConnectionError):
    """A transient failure injected by the test (retried where the flow says so)."""


def fault_injector(rng: random.Random, counts: Counter[str]) -> Any:
    """A `node_wrapper` that fails `FAILURE_RATE` of node executions before they run."""

    def wrap(flow: str, node: str, run: Any) -> Any:
        async def maybe_fail(args: Any) -> Any:
            counts["executions"] += 1
            if rng.random() < FAILURE_RATE:
                counts["injected"] += 1
                raise InjectedFault(f"injected into {node}")
            return await run(args)

        return maybe_fail

    return wrap


def _live_objects() -> int:
    """Objects the collector tracks, less asyncio's cancelled timers: a finished run's timeout
    handles wait in the loop's heap until their deadline passes, then go."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if not isinstance(o, (asyncio.TimerHandle, contextvars.Context)))


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def check_contract(result: FlowResult) -> None:
    states = {n: r.state for n, r in result.nodes.items()}
    assert len(states) == 9
    for name, node in result.nodes.items():
        assert (node.error is not None) == (node.state in (NodeState.DEFAULTED, NodeState.FAILED)), name
    if result.status == "ok":
        assert not {NodeState.FAILED, NodeState.CANCELLED} & set(states.values())
    else:
        assert NodeState.FAILED in states.values()
    duplicate = result.nodes["is_duplicate"]
    if duplicate.state is NodeState.OK and duplicate.value is True:
        assert states["store_message"] is not NodeState.OK


@pytest.fixture
def quiet_planner_log() -> Iterator[None]:
    """The defaulted nodes' warnings (thousands, with tracebacks) would pile up in pytest's
    log capture and count as growth; logging of defaults is tested elsewhere."""
    log = logging.getLogger("planner")
    level = log.level
    log.setLevel(logging.ERROR)
    yield
    log.setLevel(level)


async def test_many_runs_with_injected_failures_lose_nothing(demo_dsn: str, soak: bool, quiet_planner_log: None) -> None:
    runs = 100_000 if soak else 10_000
    rng = random.Random(20261125)
    counts: Counter[str] = Counter()
    planner = Planner(flows=FLOWS, dsn=demo_dsn, node_wrapper=fault_injector(rng, counts), pool_options=PoolOptions(min_size=10, max_size=10))
    tasks_before = len(asyncio.all_tasks())
    messages: dict[str, bool] = {}  # message -> stored by its run
    statuses: Counter[str] = Counter()
    numbers = iter(range(WARM_UP + runs))
    warm = asyncio.Event()

    async def worker() -> None:
        for i in numbers:
            message = f"load {i}"
            inputs = {"instance_name": "acme" if i % 3 == 0 else f"inst-{i % 5 + 1:05d}",
                      "user_phone": f"+1555{i % 3 + 1:07d}", "message": message}
            try:
                result = await planner.run("process_buffered", inputs)
            except FlowFailed as exc:
                result = exc.result
            check_contract(result)
            statuses[result.status] += 1
            messages[message] = result.nodes["store_message"].state is NodeState.OK
            if i == WARM_UP:
                warm.set()

    workers = [asyncio.create_task(worker()) for _ in range(IN_FLIGHT)]
    await warm.wait()
    objects_during = _live_objects()  # 200 runs in flight, caches warm
    rss_during = _rss_mb()
    await asyncio.gather(*workers)
    await planner.stack.primary.drain()
    pool = await planner.stack.primary.pool()
    assert pool.get_idle_size() == pool.get_size()
    await planner.close()

    assert len(asyncio.all_tasks()) == tasks_before, "node tasks or releases were left behind"
    grown = _live_objects() - objects_during
    # Nothing may be kept per run: 10,000 runs leave fewer objects than 200 runs in flight hold.
    assert grown < 0, f"{grown} more live objects after {runs} runs than during them"
    # RSS only as a coarse bound: the allocator keeps the peak of 200 runs in flight.
    assert _rss_mb() - rss_during < 100, f"memory grew by {_rss_mb() - rss_during:.1f} MB"
    assert counts["injected"] > 0.03 * counts["executions"]
    assert sum(statuses.values()) == WARM_UP + runs
    assert statuses["ok"] > 0.5 * runs and statuses["failed"] > 0

    con = await asyncpg.connect(demo_dsn)
    try:
        rows = await con.fetch(
            "SELECT content, count(*) AS n FROM whatsapp_conversation_messages WHERE content LIKE 'load %' GROUP BY content"
        )
        stored = {r["content"]: r["n"] for r in rows}
        assert all(n == 1 for n in stored.values()), "a message was stored twice"
        assert {m for m, ok in messages.items() if ok} == set(stored), "stored iff the store node succeeded"
        others = await con.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert others == 0, "connections left open on the server"
    finally:
        await con.close()
    print(f"\nload: {WARM_UP + runs} runs, {counts['executions']} node executions, {counts['injected']} failures injected, "
          f"statuses {dict(statuses)}, {len(stored)} messages stored once each; live objects {grown:+d} "
          f"and RSS {_rss_mb() - rss_during:+.1f} MB from mid-run to the end")
