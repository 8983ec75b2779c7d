"""Faults on a real PostgreSQL: killed backends, restarts, timeouts, cancellation, a frozen
server process, pool exhaustion. Nothing hangs past its deadline, and the pool stays whole."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from planner import FlowFailed, FlowTimeout, NodeState, NodeTimeout, Planner, PoolOptions, QueryError
from tests.reliability.conftest import FaultServer

pytestmark = pytest.mark.slow


async def _pids_running(dsn: str, needle: str) -> list[int]:
    con = await asyncpg.connect(dsn)
    try:
        rows = await con.fetch(
            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND state <> 'idle' "
            "AND query LIKE '%' || $1 || '%' AND query NOT LIKE '%pg_stat_activity%'",
            needle,
        )
        return [r["pid"] for r in rows]
    finally:
        await con.close()


async def _wait_for_query(dsn: str, needle: str, seconds: float = 5.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pids = await _pids_running(dsn, needle)
        if pids:
            return pids[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"query {needle!r} never showed up")


async def _gone(dsn: str, needle: str, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not await _pids_running(dsn, needle):
            return True
        await asyncio.sleep(0.05)
    return False


async def _terminate(dsn: str, pid: int) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await con.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await con.close()


async def _assert_pool_whole(planner: Planner) -> None:
    await planner.stack.primary.drain()
    pool = await planner.stack.primary.pool()
    assert pool.get_idle_size() == pool.get_size(), "a connection was not returned"
    assert await pool.fetchval("SELECT 1") == 1


@pytest.fixture
def flows(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "f.yaml"
        path.write_text(text)
        return tmp_path

    return write


@pytest.fixture
async def make_planner(fault_dsn: str) -> AsyncIterator[Callable[[Path], Planner]]:
    made: list[Planner] = []

    def make(folder: Path) -> Planner:
        planner = Planner(flows=folder, dsn=fault_dsn, pool_options=PoolOptions(min_size=2, max_size=4))
        made.append(planner)
        return planner

    yield make
    for planner in made:
        await planner.close()


@pytest.mark.parametrize(
    ("policy", "expect"),
    [
        pytest.param("retry: {attempts: 2, backoff: 10ms}", "ok", id="retried"),
        pytest.param("default: lost", "defaulted", id="defaulted"),
        pytest.param("on_error: fail", "failed", id="fails-the-run"),
    ],
)
async def test_a_backend_killed_mid_query(flows: Callable[[str], Path], make_planner: Callable[[Path], Planner],
                                          fault_dsn: str, policy: str, expect: str) -> None:
    planner = make_planner(flows(f"nodes:\n  a:\n    sql: SELECT pg_sleep(0.4) AS kill_probe\n    {policy}\n"))
    task = asyncio.create_task(planner.run("f"))
    await _terminate(fault_dsn, await _wait_for_query(fault_dsn, "kill_probe"))
    if expect == "failed":
        with pytest.raises(FlowFailed) as info:
            await task
        node = info.value.result.nodes["a"]
    else:
        node = (await task).nodes["a"]
    assert node.state.value == expect
    if expect == "ok":
        assert node.attempts == 2
    else:
        assert isinstance(node.error, QueryError) and node.error.transient
    await _assert_pool_whole(planner)


async def test_a_server_restart_during_a_stream_of_runs(flows: Callable[[str], Path], make_planner: Callable[[Path], Planner],
                                                         fault_server: FaultServer) -> None:
    planner = make_planner(flows(
        "settings: {timeout: 3s}\n"
        "nodes:\n"
        "  a: {sql: 'SELECT count(*) FROM items', fetch: value, retry: {attempts: 5, backoff: 100ms}}\n"
        "  b: {sql: 'SELECT pg_sleep(0.01)', default: skipped, retry: {attempts: 5, backoff: 100ms}}\n"
        "  c: {sql: 'INSERT INTO items (label) SELECT $a::bigint::text RETURNING id', fetch: value, on_error: fail}\n"
    ))
    outcomes: list[str] = []
    longest = 0.0
    stop = time.monotonic() + 2.5

    async def stream() -> None:
        nonlocal longest
        while time.monotonic() < stop:
            t0 = time.monotonic()
            try:
                result = await planner.run("f")
                outcomes.append(result.status)
            except FlowFailed as exc:  # FlowTimeout included
                outcomes.append(exc.result.status)
            longest = max(longest, time.monotonic() - t0)

    streams = [asyncio.create_task(stream()) for _ in range(8)]
    await asyncio.sleep(0.5)
    await asyncio.to_thread(fault_server.restart)
    await asyncio.gather(*streams)
    assert longest < 3.0 + 1.5, f"a run took {longest:.2f}s, past its 3s deadline and the 1s stop grace"
    assert set(outcomes) <= {"ok", "failed", "timeout"} and "ok" in outcomes
    after = [await planner.run("f") for _ in range(10)]  # the service was not restarted
    assert all(r.status == "ok" and r.nodes["a"].state is NodeState.OK for r in after)
    await _assert_pool_whole(planner)


async def test_statement_timeout_ends_a_node_and_nothing_is_left_running(flows: Callable[[str], Path],
                                                                         make_planner: Callable[[Path], Planner], fault_dsn: str) -> None:
    planner = make_planner(flows(
        "nodes:\n  a:\n    sql:\n      - SET LOCAL statement_timeout = '100ms'\n      - SELECT pg_sleep(5) AS st_probe\n"
    ))
    node = (await planner.run("f")).nodes["a"]
    assert node.state is NodeState.DEFAULTED and isinstance(node.error, QueryError) and node.error.sqlstate == "57014"
    assert await _gone(fault_dsn, "st_probe")
    await _assert_pool_whole(planner)


async def test_planner_timeout_cancels_on_the_server(flows: Callable[[str], Path], make_planner: Callable[[Path], Planner],
                                                      fault_dsn: str) -> None:
    planner = make_planner(flows("nodes:\n  a: {sql: 'SELECT pg_sleep(5) AS pt_probe', timeout: 100ms}\n"))
    node = (await planner.run("f")).nodes["a"]
    assert isinstance(node.error, NodeTimeout)
    assert await _gone(fault_dsn, "pt_probe")
    await _assert_pool_whole(planner)


async def test_cancelling_the_caller_returns_every_connection(flows: Callable[[str], Path], make_planner: Callable[[Path], Planner],
                                                              fault_dsn: str) -> None:
    planner = make_planner(flows(
        "nodes:\n  a: {sql: 'SELECT pg_sleep(5) AS cc_probe'}\n  b: {sql: 'SELECT pg_sleep(5) AS cc_probe'}\n"
    ))
    task = asyncio.create_task(planner.run("f"))
    await _wait_for_query(fault_dsn, "cc_probe")
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _gone(fault_dsn, "cc_probe")
    await _assert_pool_whole(planner)


async def test_a_frozen_backend_is_bounded_by_timeouts_and_terminated(flows: Callable[[str], Path],
                                                                       make_planner: Callable[[Path], Planner], fault_dsn: str) -> None:
    planner = make_planner(flows(
        "settings: {timeout: 2s}\n"
        "nodes:\n"
        "  frozen: {sql: 'SELECT pg_sleep(30) AS frozen_probe', timeout: 300ms, default: late}\n"
        "  fine: {sql: 'SELECT 1', fetch: value}\n"
    ))
    task = asyncio.create_task(planner.run("f"))
    pid = await _wait_for_query(fault_dsn, "frozen_probe")
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        result = await asyncio.wait_for(task, timeout=5)
        assert time.monotonic() - t0 < 2.0
        assert result.nodes["frozen"].state is NodeState.DEFAULTED and isinstance(result.nodes["frozen"].error, NodeTimeout)
        assert result.nodes["fine"].value == 1
        t0 = time.monotonic()
        await planner.stack.primary.drain()  # the release gives up on the frozen connection and terminates it
        assert time.monotonic() - t0 < 4.0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert await _gone(fault_dsn, "frozen_probe")
    con = await asyncpg.connect(fault_dsn)
    try:
        assert not await con.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
    finally:
        await con.close()
    await _assert_pool_whole(planner)


async def test_five_hundred_runs_on_a_pool_of_five_all_settle(flows: Callable[[str], Path], fault_dsn: str) -> None:
    folder = flows(
        "settings: {timeout: 60s}\n"
        "nodes:\n"
        "  a: {sql: 'SELECT 1 FROM pg_sleep(0.002)', fetch: value}\n"
        "  b: {sql: 'SELECT 2 FROM pg_sleep(0.002)', fetch: value}\n"
        "  c: {sql: 'SELECT 3 FROM pg_sleep(0.002)', fetch: value}\n"
        "  d: {sql: 'SELECT $a::int + $b::int + $c::int AS total', fetch: value}\n"
    )
    async with Planner(flows=folder, dsn=fault_dsn, pool_options=PoolOptions(min_size=5, max_size=5)) as planner:
        results = await asyncio.wait_for(asyncio.gather(*(planner.run("f") for _ in range(500))), timeout=120)
        assert all(r.status == "ok" and r.values["d"] == 6 for r in results)
        await _assert_pool_whole(planner)


async def test_a_transaction_killed_half_way_leaves_nothing(flows: Callable[[str], Path], make_planner: Callable[[Path], Planner],
                                                            fault_dsn: str) -> None:
    planner = make_planner(flows(
        "nodes:\n  tx:\n    sql:\n"
        "      - INSERT INTO items (label) VALUES ('half-way')\n"
        "      - SELECT pg_sleep(2) AS txn_probe\n"
        "      - INSERT INTO items (label) VALUES ('never')\n"
        "    on_error: fail\n"
    ))
    task = asyncio.create_task(planner.run("f"))
    await _terminate(fault_dsn, await _wait_for_query(fault_dsn, "txn_probe"))
    with pytest.raises(FlowFailed):
        await task
    con = await asyncpg.connect(fault_dsn)
    try:
        assert await con.fetchval("SELECT count(*) FROM items") == 0
    finally:
        await con.close()
    await _assert_pool_whole(planner)


async def test_a_run_deadline_bounds_waiting_for_a_connection(flows: Callable[[str], Path], fault_dsn: str) -> None:
    folder = flows("settings: {timeout: 300ms}\nnodes:\n  a: {sql: 'SELECT 1', fetch: value}\n")
    async with Planner(flows=folder, dsn=fault_dsn, pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
        pool = await planner.stack.primary.pool()
        held = await pool.acquire()  # the only connection
        try:
            t0 = time.monotonic()
            with pytest.raises(FlowTimeout):
                await planner.run("f")
            assert time.monotonic() - t0 < 1.5
        finally:
            await pool.release(held)
        assert (await planner.run("f")).values["a"] == 1


async def test_a_node_timeout_times_the_query_not_the_wait_for_a_connection(flows: Callable[[str], Path], fault_dsn: str) -> None:
    folder = flows("settings: {timeout: 3s}\nnodes:\n  a: {sql: 'SELECT 1', fetch: value, timeout: 100ms}\n")
    async with Planner(flows=folder, dsn=fault_dsn, pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
        pool = await planner.stack.primary.pool()
        held = await pool.acquire()
        run = asyncio.create_task(planner.run("f"))
        await asyncio.sleep(0.4)  # four times the node's timeout, waiting for the only connection
        await pool.release(held)
        result = await run
        assert result.nodes["a"].state is NodeState.OK and result.values["a"] == 1
