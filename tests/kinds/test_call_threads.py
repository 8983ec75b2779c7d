"""Sync `call:` functions on planner's own threads (`planner.kinds.call.CallThreads`, issue #10
item 6, issue #22): a timed-out call keeps its thread (Python cannot stop one) and is counted as
abandoned; once every thread is busy, a new sync call waits in line within its node's timeout
and past that fails loudly (`CallThreadsBusy`, counted, logged); the process never waits for
the threads at exit."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from planner import CallOptions, CallThreadsBusy, NodeState, NodeTimeout, Planner, PoolOptions
from planner.kinds.backend import Offline
from planner.kinds.call import CallThreads
from tests import nodes

# This module is about another mechanism: nodes run as they would without compiled groups.
pytestmark = pytest.mark.usefixtures("uncompiled")

ROOT = Path(__file__).resolve().parents[2]
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
    planner = Planner(flows=tmp_path, backend=Offline(), call_options=CallOptions(allowed_modules=["tests"]))
    started = time.monotonic()
    result = await planner.run("t")
    assert time.monotonic() - started < 1.0, "the run waited for the thread"
    node = result.nodes["a"]
    assert node.state is NodeState.DEFAULTED and node.value == "late" and isinstance(node.error, NodeTimeout)
    assert (planner.threads.busy, planner.threads.abandoned) == (1, 1)
    nodes.unblock.set()
    await _until(lambda: planner.threads.busy == 0)
    assert planner.threads.abandoned == 0


async def test_a_sync_call_that_gets_no_thread_within_its_timeout_fails_saying_so(
        write_flow: Write, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_flow("""
        nodes:
          stuck1: {call: tests.nodes:block, with: {seconds: 10}, timeout: 100ms}
          stuck2: {call: tests.nodes:block, with: {seconds: 10}, timeout: 100ms}
          third: {call: tests.nodes:quick, after: [stuck1, stuck2], timeout: 300ms}
        """)
    planner = Planner(flows=tmp_path, backend=Offline(), call_options=CallOptions(allowed_modules=["tests"], threads=2))
    with caplog.at_level(logging.WARNING, logger="planner"):
        result = await planner.run("t")
    third = result.nodes["third"]
    assert [result.nodes[n].state for n in ("stuck1", "stuck2")] == [NodeState.DEFAULTED] * 2
    assert third.state is NodeState.DEFAULTED and result.degraded
    assert isinstance(third.error, CallThreadsBusy) and not isinstance(third.error, NodeTimeout)
    assert ("all 2 threads for sync calls stayed busy for the 300 ms this call could wait "
            "(2 of them still running calls that timed out") in str(third.error)
    assert (planner.threads.busy, planner.threads.queued, planner.threads.rejected) == (2, 0, 1)
    assert any("node third of flow t: all 2 threads" in r.getMessage() and "raise CallOptions.threads" in r.getMessage()
               for r in caplog.records)


async def test_a_sync_call_waits_for_a_busy_thread_and_runs_when_one_is_free() -> None:
    threads = CallThreads(1)
    held = asyncio.create_task(threads.run(nodes.block, {"seconds": 10, "value": "first"}))
    await _until(lambda: threads.busy == 1)
    waiting = asyncio.create_task(threads.run(nodes.quick, {"value": "second"}, node_timeout=10))
    await _until(lambda: threads.queued == 1)
    assert not waiting.done()
    nodes.unblock.set()
    assert await held == "first" and await waiting == "second"
    assert (threads.waited, threads.rejected, threads.queued) == (1, 0, 0)


async def test_a_real_load_of_concurrent_runs_on_few_threads_answers_every_run(write_flow: Write, tmp_path: Path) -> None:
    # Issue 22: 200 users on 32 threads answered 55% of requests with a defaulted sync call.
    write_flow("""
        inputs: {i: int}
        nodes:
          summary: {call: tests.nodes:nap, with: {ms: 5, value: $i}}
          other: {call: tests.nodes:echo, with: {value: $i}}
        """)
    planner = Planner(flows=tmp_path, backend=Offline(), call_options=CallOptions(allowed_modules=["tests"], threads=8))
    results = await asyncio.gather(*(planner.run("t", {"i": i}) for i in range(200)))
    assert [r.values["summary"] for r in results] == list(range(200))
    assert not any(r.degraded for r in results)
    assert planner.threads.waited > 0 and planner.threads.rejected == 0 and planner.threads.queued == 0


async def test_when_the_queue_is_full_a_sync_call_fails_at_once_saying_so() -> None:
    threads = CallThreads(1, max_queued=1)
    held = asyncio.create_task(threads.run(nodes.block, {"seconds": 10}))
    await _until(lambda: threads.busy == 1)
    queued = asyncio.create_task(threads.run(nodes.quick, {}, node_timeout=10))
    await _until(lambda: threads.queued == 1)
    with pytest.raises(CallThreadsBusy, match=r"all 1 threads for sync calls are busy .* and 1 calls already wait"):
        await threads.run(nodes.quick, {}, node_timeout=10)
    assert threads.rejected == 1
    nodes.unblock.set()
    assert await queued == "quick"
    await held


async def test_a_waiting_call_whose_node_is_cancelled_never_runs() -> None:
    threads = CallThreads(1)
    ran: list[str] = []
    held = asyncio.create_task(threads.run(nodes.block, {"seconds": 10}))
    await _until(lambda: threads.busy == 1)
    waiting = asyncio.create_task(threads.run(ran.append, {"object": "ran"}, node_timeout=10))
    await _until(lambda: threads.queued == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert threads.queued == 0 and threads.abandoned == 0
    nodes.unblock.set()
    await held
    assert await threads.run(nodes.quick, {}) == "quick"  # the thread went past the dropped call
    assert ran == []


async def test_a_node_without_a_timeout_waits_for_a_thread_at_most_call_wait() -> None:
    threads = CallThreads(1, wait_s=0.2)
    held = asyncio.create_task(threads.run(nodes.block, {"seconds": 10}))
    await _until(lambda: threads.busy == 1)
    with pytest.raises(CallThreadsBusy, match="stayed busy for the 200 ms"):
        await threads.run(nodes.quick, {})
    nodes.unblock.set()
    await held


async def test_the_wait_for_a_thread_is_told_to_on_wait() -> None:
    threads = CallThreads(1)
    waits: list[float] = []
    threads.on_wait = waits.append
    held = asyncio.create_task(threads.run(nodes.block, {"seconds": 10}))
    await _until(lambda: threads.busy == 1)
    waiting = asyncio.create_task(threads.run(nodes.quick, {}, node_timeout=10))
    await _until(lambda: threads.queued == 1)
    await asyncio.sleep(0.05)
    nodes.unblock.set()
    await held
    await waiting
    assert len(waits) == 2 and waits[1] > waits[0]


# --- sizing the threads for the load a Planner is told of -----------------------------------

PARALLEL_SYNC = """
nodes:
  a: {call: tests.nodes:quick, with: {value: 1}}
  b: {call: tests.nodes:quick, with: {value: 2}}
  c: {call: tests.nodes:echo, with: {value: 3}}
  d: {call: tests.nodes:quick, with: {value: $a}}
"""


async def test_a_planner_sizes_its_threads_for_its_concurrency(write_flow: Write, tmp_path: Path) -> None:
    write_flow(PARALLEL_SYNC)
    planner = Planner(flows=tmp_path, backend=Offline(), call_options=CallOptions(allowed_modules=["tests"], concurrency=100))
    await planner.run("t")
    assert planner.threads.size == 200  # two sync calls in the first group, 100 runs at once


async def test_too_few_threads_given_for_the_concurrency_are_warned_about_once(
        write_flow: Write, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_flow(PARALLEL_SYNC)
    planner = Planner(flows=tmp_path, backend=Offline(), call_options=CallOptions(allowed_modules=["tests"], concurrency=10, threads=4))
    with caplog.at_level(logging.WARNING, logger="planner"):
        await planner.run("t")
        await planner.run("t")
    warnings = [r.getMessage() for r in caplog.records if "may need" in r.getMessage()]
    assert len(warnings) == 1 and planner.threads.size == 4
    assert "flow t: up to 2 sync call(s) at once x 10 runs in flight (CallOptions.concurrency) may need 20 threads" in warnings[0]
    assert "CallOptions(threads=4)" in warnings[0]


async def test_without_concurrency_the_pool_size_is_the_runs_in_flight(write_flow: Write, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    write_flow(PARALLEL_SYNC)
    planner = Planner(flows=tmp_path, backend=Offline(), call_options=CallOptions(allowed_modules=["tests"], threads=8), pool_options=PoolOptions(max_size=5))
    with caplog.at_level(logging.WARNING, logger="planner"):
        await planner.run("t")
    assert any("x 5 runs in flight" in r.getMessage() and "may need 10 threads" in r.getMessage()
               for r in caplog.records)


async def test_a_need_beyond_what_planner_sizes_by_itself_is_warned_about(write_flow: Write, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    write_flow(PARALLEL_SYNC)
    planner = Planner(flows=tmp_path, backend=Offline(), call_options=CallOptions(allowed_modules=["tests"], concurrency=1000))
    with caplog.at_level(logging.WARNING, logger="planner"):
        await planner.run("t")
    assert planner.threads.size == 32
    assert any("may need 2000 threads, and there are at most 512" in r.getMessage() for r in caplog.records)


async def test_threads_freed_by_returning_calls_serve_new_calls(write_flow: Write, tmp_path: Path) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:block, with: {seconds: 10}, timeout: 100ms}\n")
    planner = Planner(flows=tmp_path, backend=Offline(), call_options=CallOptions(allowed_modules=["tests"], threads=1, wait=0.1))
    await planner.run("t")
    (tmp_path / "q.yaml").write_text("nodes:\n  a: {call: tests.nodes:quick}\n")
    assert isinstance((await planner.run("q")).nodes["a"].error, CallThreadsBusy)
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
    planner = Planner(flows=tmp_path, backend=Offline(), call_options=CallOptions(allowed_modules=["tests"], threads=1))
    for _ in range(30):
        result = await planner.run("t")
        assert {n: r.error for n, r in result.nodes.items() if r.error} == {}
        assert result.values == {"a": 2, "b": 3, "c": 4, "d": 5}


async def test_an_exception_of_a_sync_call_is_the_nodes_error(write_flow: Write, tmp_path: Path) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:add, with: {a: 1, b: x}, default: 0}\n")
    planner = Planner(flows=tmp_path, backend=Offline(), call_options=CallOptions(allowed_modules=["tests"]))
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
