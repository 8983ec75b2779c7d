"""`Planner(node_wrapper=...)`: it wraps every node that runs, sees the node's resolved
arguments, and leaves what a node's timeout times alone (for SQL: the statement, not the wait
for a connection)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from planner import CallOptions, NodeState, NodeTimeout, Planner, PoolOptions
from planner.kinds.backend import Offline, Query

Write = Callable[..., Path]


class Recorder:
    """A node wrapper that records each node's resolved arguments as it starts."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def __call__(self, flow: str, node: str, run: Any) -> Any:
        async def wrapped(args: Any) -> Any:
            self.seen[node] = args.params if isinstance(args, Query) else dict(args)
            return await run(args)

        return wrapped


async def test_a_node_wrapper_wraps_every_node_that_runs_and_sees_resolved_args(write_flow: Write, tmp_path: Path, demo_dsn: str) -> None:
    write_flow("""
        inputs: {x: int, name: str}
        nodes:
          inst: {sql: "SELECT id FROM whatsapp_instances WHERE instance_name = $name AND $x > 0", fetch: value}
          added: {call: tests.nodes:add, with: {a: $inst, b: $x}}
          echoed: {call: tests.nodes:echo, with: {value: {sum: $added, tag: [$name]}}}
          skipped: {call: tests.nodes:echo, with: {value: 1}, when: $x > 100}
        """)
    recorder = Recorder()
    async with Planner(flows=tmp_path, dsn=demo_dsn, node_wrapper=recorder, call_options=CallOptions(allowed_modules=["tests"])) as planner:
        result = await planner.run("t", {"x": 2, "name": "acme"})
    assert result.values == {"inst": 1, "added": 3, "echoed": {"sum": 3, "tag": ["acme"]}, "skipped": None}
    assert recorder.seen == {
        "inst": [["acme", 2]],
        "added": {"a": 1, "b": 2},
        "echoed": {"value": {"sum": 3, "tag": ["acme"]}},
    }
    assert result.nodes["skipped"].state is NodeState.SKIPPED


async def test_what_a_node_wrapper_returns_is_the_nodes_value(write_flow: Write, tmp_path: Path) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n  b: {call: tests.nodes:echo, with: {value: $a}}\n")

    def doubling(flow: str, node: str, run: Any) -> Any:
        async def wrapped(args: Any) -> Any:
            return 2 * await run(args)

        return wrapped

    planner = Planner(flows=tmp_path, backend=Offline(), node_wrapper=doubling, call_options=CallOptions(allowed_modules=["tests"]))
    assert (await planner.run("t")).values == {"a": 2, "b": 4}


async def test_under_a_wrapper_a_sql_timeout_times_the_query_not_the_wait_for_a_connection(write_flow: Write, tmp_path: Path, demo_dsn: str) -> None:
    write_flow("settings: {timeout: 3s}\nnodes:\n  a: {sql: 'SELECT 1', fetch: value, timeout: 100ms}\n")
    recorder = Recorder()
    async with Planner(flows=tmp_path, dsn=demo_dsn, node_wrapper=recorder, pool_options=PoolOptions(min_size=1, max_size=1)) as planner:
        pool = await planner.stack.primary.pool()
        held = await pool.acquire()
        run = asyncio.create_task(planner.run("t"))
        await asyncio.sleep(0.4)  # four times the node's timeout, waiting for the only connection
        await pool.release(held)
        result = await run
    assert result.nodes["a"].state is NodeState.OK and result.values["a"] == 1
    assert recorder.seen == {"a": [[]]}


async def test_under_a_wrapper_a_sql_timeout_still_times_the_query(write_flow: Write, tmp_path: Path, demo_dsn: str) -> None:
    write_flow("nodes:\n  a: {sql: 'SELECT pg_sleep(5)', timeout: 100ms, default: late}\n")
    async with Planner(flows=tmp_path, dsn=demo_dsn, node_wrapper=Recorder()) as planner:
        result = await asyncio.wait_for(planner.run("t"), 3)
    node = result.nodes["a"]
    assert node.state is NodeState.DEFAULTED and isinstance(node.error, NodeTimeout) and node.value == "late"


async def test_under_a_wrapper_a_call_timeout_times_the_wrapped_call(write_flow: Write, tmp_path: Path) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:sleep, with: {ms: 2000}, timeout: 100ms, default: late}\n")
    planner = Planner(flows=tmp_path, backend=Offline(), node_wrapper=Recorder(), call_options=CallOptions(allowed_modules=["tests"]))
    result = await asyncio.wait_for(planner.run("t"), 3)
    assert result.nodes["a"].state is NodeState.DEFAULTED and isinstance(result.nodes["a"].error, NodeTimeout)
