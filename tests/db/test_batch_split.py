"""A batch is never slower for a run than its own statement by more than a bound (#19, item 6).

One slow member of a read batch used to hold every other member's value until it finished:
one member costing 3 s made 29 zero-cost runs wait 3.14 s while a connection sat free. A read
batch that runs past a bound taken from the statement's recorded latencies, while a connection
is free, is cancelled and split: its halves run side by side on connections of their own,
splitting again as long as they run long, and each member is answered as soon as its part is.
While no connection is free, the batch goes on (its members would only queue).

Batches are forced as in `tests/support/stacks.py`: the pool's connections are held until every run
has joined the batch. What is tested is the behaviour (who is answered while what still runs),
not the time; `benchmarks/batch_split.py` measures the time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from planner import FlowResult, NodeState
from tests.support import stacks as support
from tests.support.stacks import Stack, Write

ECHO = """
inputs: {v: int, ms: int}
nodes:
  q: {sql: "SELECT slow_echo($v::int, $ms::int) AS v", fetch: value}
"""


async def _start(stack: Stack, slow: int, runs: int, held: int) -> tuple[list[asyncio.Task[FlowResult]], support.Gate]:
    """`runs` runs of ECHO that join one batch (every connection held meanwhile), run `slow`
    taking 3 s and the others none; the batch gets its connection, `held` others stay held."""
    stack.load("t")
    rest = await stack.hold("gate2", connections=held) if held else None
    gate = await stack.hold("gate", connections=stack.size - held)
    before = stack.entry.count()
    tasks = [asyncio.create_task(support.outcome(stack.planner.run("t", {"v": v, "ms": 3000 if v == slow else 0})))
             for v in range(runs)]
    await stack.joined(before + runs)
    await gate.release()
    assert rest is not None or not held
    return tasks, rest if rest is not None else gate


@pytest.mark.slow  # a member sleeps 3 s on the server
async def test_the_fast_members_of_a_batch_are_answered_while_a_slow_one_still_runs(
        write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow(ECHO)
    stack = stacks(size=3)
    tasks, _ = await _start(stack, slow=4, runs=12, held=0)
    slow, fast = tasks[4], tasks[:4] + tasks[5:]
    await asyncio.wait(fast)
    assert not slow.done()  # every fast run has its value; the slow one is still running
    assert [t.result().values["q"] for t in fast] == [v for v in range(12) if v != 4]
    assert all(t.result().nodes["q"].state is NodeState.OK for t in fast)
    assert stack.pool.splits >= 1
    result = await slow
    assert result.values["q"] == 4 and result.nodes["q"].state is NodeState.OK
    assert [len(members) for members in stack.spy.sent] == [12]  # one batch, split inside the backend
    await stack.assert_clean()


@pytest.mark.slow  # a member sleeps 3 s on the server
async def test_a_batch_that_runs_long_while_no_connection_is_free_is_not_split(
        write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow(ECHO)
    stack = stacks(size=3)
    tasks, rest = await _start(stack, slow=2, runs=6, held=2)  # two connections stay taken
    try:
        results = await asyncio.gather(*tasks)
    finally:
        await rest.release()
    assert [r.values["q"] for r in results] == list(range(6))
    assert stack.pool.splits == 0
    assert [q.exception for q in stack.combined()] == [None]  # one statement, run to its end, for all six
    await stack.assert_clean()


async def test_a_split_batch_whose_runs_all_left_is_cancelled_on_the_server(
        write_flow: Write, stacks: Callable[..., Stack]) -> None:
    write_flow(ECHO)
    stack = stacks(size=3)
    tasks, _ = await _start(stack, slow=1, runs=4, held=0)
    slow, fast = tasks[1], [tasks[0], *tasks[2:]]
    await asyncio.wait(fast)
    assert not slow.done()
    slow.cancel()  # the last run waiting: the statement still running for it is cancelled
    await asyncio.gather(slow, return_exceptions=True)
    await stack.assert_clean()  # every connection back, nothing of the batch left running
