"""Sync `call:` functions on planner's own threads (`planner.kinds.call.CallThreads`, issue #10
item 6): a timed-out call keeps its thread (Python cannot stop one) and is counted as
abandoned; once every thread is held, a new sync call fails at once instead of queueing behind
the stuck ones; the process never waits for them at exit."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from planner import NodeError, NodeState, NodeTimeout, Planner
from planner.kinds.backend import Offline
from planner.kinds.call import CallThreads
from tests import nodes

ROOT = Path(__file__).resolve().parent.parent
Write = Callable[..., Path]


@pytest.fixture(autouse=True)
def _free_blocked_threads() -> Iterator[None]:
    nodes.unblock.clear()
    yield
    nodes.unblock.set()  # let every blocked call return: no thread is left held after a test


async def _until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


async def test_a_sync_call_that_times_out_is_defaulted_and_its_thread_counted_abandoned(write_flow: Write, tmp_path: Path) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:block, with: {seconds: 2}, timeout: 100ms, default: late}\n")
    planner = Planner(flows=tmp_path, backend=Offline(), allowed_modules=["tests"])
    started = time.monotonic()
    result = await planner.run("t")
    assert time.monotonic() - started < 1.0, "the run waited for the thread"
    node = result.nodes["a"]
    assert node.state is NodeState.DEFAULTED and node.value == "late" and isinstance(node.error, NodeTimeout)
    assert (planner.threads.busy, planner.threads.abandoned) == (1, 1)
    nodes.unblock.set()
    await _until(lambda: planner.threads.busy == 0)
    assert planner.threads.abandoned == 0


async def test_when_every_thread_is_held_a_sync_call_fails_at_once_saying_so(write_flow: Write, tmp_path: Path) -> None:
    write_flow("""
        nodes:
          stuck1: {call: tests.nodes:block, with: {seconds: 10}, timeout: 100ms}
          stuck2: {call: tests.nodes:block, with: {seconds: 10}, timeout: 100ms}
          third: {call: tests.nodes:quick, after: [stuck1, stuck2], timeout: 5s}
        """)
    planner = Planner(flows=tmp_path, backend=Offline(), allowed_modules=["tests"], call_threads=2)
    result = await planner.run("t")
    third = result.nodes["third"]
    assert [result.nodes[n].state for n in ("stuck1", "stuck2")] == [NodeState.DEFAULTED] * 2
    assert third.state is NodeState.DEFAULTED
    assert isinstance(third.error, NodeError) and not isinstance(third.error, NodeTimeout)
    assert "all 2 threads for sync calls are busy (2 of them still running calls that timed out" in str(third.error)
    assert third.duration_ms is not None and third.duration_ms < 50, "it failed at once, not after waiting"
    assert planner.threads.busy == 2


async def test_threads_freed_by_returning_calls_serve_new_calls(write_flow: Write, tmp_path: Path) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:block, with: {seconds: 10}, timeout: 100ms}\n")
    planner = Planner(flows=tmp_path, backend=Offline(), allowed_modules=["tests"], call_threads=1)
    await planner.run("t")
    (tmp_path / "q.yaml").write_text("nodes:\n  a: {call: tests.nodes:quick}\n")
    assert isinstance((await planner.run("q")).nodes["a"].error, NodeError)
    nodes.unblock.set()
    await _until(lambda: planner.threads.busy == 0)
    assert (await planner.run("q")).values == {"a": "quick"}


async def test_a_sync_call_runs_off_the_event_loop() -> None:
    threads = CallThreads(2)
    loop_ticks = 0

    async def ticker() -> None:
        nonlocal loop_ticks
        while True:
            loop_ticks += 1
            await asyncio.sleep(0.01)

    tick = asyncio.create_task(ticker())
    try:
        nodes.unblock.clear()
        assert await threads.run(nodes.block, {"seconds": 0.2, "value": "slept"}) == "slept"
    finally:
        tick.cancel()
    assert loop_ticks >= 5


async def test_sync_calls_reuse_idle_threads_rather_than_start_new_ones() -> None:
    threads = CallThreads(8)
    for i in range(20):
        assert await threads.run(nodes.quick, {"value": i}) == i
    assert await asyncio.gather(*(threads.run(nodes.add, {"a": i, "b": 1}) for i in range(4))) == [1, 2, 3, 4]
    assert threads.threads <= 4
    assert threads.busy == 0


async def test_a_chain_of_sync_calls_runs_on_one_thread(write_flow: Write, tmp_path: Path) -> None:
    # Each call's thread is free again before its value wakes the next node up.
    write_flow("""
        nodes:
          a: {call: tests.nodes:add, with: {a: 1, b: 1}}
          b: {call: tests.nodes:add, with: {a: $a, b: 1}}
          c: {call: tests.nodes:add, with: {a: $b, b: 1}}
          d: {call: tests.nodes:add, with: {a: $c, b: 1}}
        """)
    planner = Planner(flows=tmp_path, backend=Offline(), allowed_modules=["tests"], call_threads=1)
    for _ in range(30):
        result = await planner.run("t")
        assert {n: r.error for n, r in result.nodes.items() if r.error} == {}
        assert result.values == {"a": 2, "b": 3, "c": 4, "d": 5}


async def test_an_exception_of_a_sync_call_is_the_nodes_error(write_flow: Write, tmp_path: Path) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:add, with: {a: 1, b: x}, default: 0}\n")
    planner = Planner(flows=tmp_path, backend=Offline(), allowed_modules=["tests"])
    node = (await planner.run("t")).nodes["a"]
    assert node.state is NodeState.DEFAULTED and isinstance(node.error, TypeError)
    assert planner.threads.busy == 0


@pytest.mark.subprocess
def test_planner_run_exits_promptly_though_a_sync_call_is_still_sleeping(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text("import time\n\n\ndef nap():\n    time.sleep(30)\n    return 'woke'\n")
    (tmp_path / "f.yaml").write_text("nodes:\n  a: {call: 'slow:nap', timeout: 200ms, default: late}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "PLANNER_HOME": str(tmp_path / "home")}
    env.pop("PLANNER_ALLOWED_MODULES", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "planner", "run", str(tmp_path / "f.yaml"), "--json", "--allow-defaults"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 15, f"planner run took {elapsed:.1f} s: it waited for the sleeping thread"
    assert '"state": "defaulted"' in proc.stdout and "timed out after 200 ms" in proc.stdout


async def test_an_idle_thread_ends_and_a_later_call_starts_another() -> None:
    threads = CallThreads(4, idle_s=0.05)
    assert await threads.run(nodes.quick, {}) == "quick"
    assert threads.threads == 1
    await _until(lambda: threads.threads == 0)
    await _until(lambda: not [t for t in threading.enumerate() if t.name == f"planner-call-{id(threads):x}"])
    assert await threads.run(nodes.quick, {"value": 2}) == 2
    assert threads.threads == 1


async def test_calls_racing_idle_threads_that_end_are_all_served() -> None:
    # Each call comes about when the idle thread gives up waiting: the call must be served
    # either by that thread (it saw the call queued) or by a new one.
    threads = CallThreads(4, idle_s=0.002)
    for i in range(400):
        assert await asyncio.wait_for(threads.run(nodes.quick, {"value": i}), 2) == i
        await asyncio.sleep(0.0005 * (i % 8))
