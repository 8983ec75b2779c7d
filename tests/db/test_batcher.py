"""The batcher behind coalescing, fusion and the cache's single flight (`planner.db.batcher`)."""

from __future__ import annotations

import asyncio
import doctest
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.db import batcher as batcher_module
from planner.db.batcher import Batch, Batcher, Member
from planner.kinds.backend import Outcome


class Failed(Exception):
    """One member's own failure."""


class Broken(Exception):
    """The whole work's failure."""


def echo(gate: asyncio.Event | None = None) -> Callable[[Batch[int]], Awaitable[list[Outcome]]]:
    """Work that starts at once, waits for `gate` (if any), and answers each member `[item]`."""

    async def work(batch: Batch[int]) -> list[Outcome]:
        sent = batch.start()
        if gate is not None:
            await gate.wait()
        return [([m.item], None) for m in sent]

    return work


async def turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_the_module_docstring_example_runs() -> None:
    result = doctest.testmod(batcher_module)
    assert result.attempted > 0 and result.failed == 0


async def test_waiters_of_one_shared_member_get_equal_values_that_share_nothing() -> None:
    batch = Batcher(echo()).open("k")
    first, second = batch.join(7, share=7), batch.join(7, share=7)
    assert first is second and len(batch) == 1
    values = list(await asyncio.gather(batch.wait(first), batch.wait(second)))
    assert values == [[7], [7]] and values[0] is not values[1]


async def test_a_member_nobody_shares_gets_the_works_own_value() -> None:
    seen: list[Any] = []

    async def work(batch: Batch[int]) -> list[Outcome]:
        seen.extend([m.item] for m in batch.start())
        return [(v, None) for v in seen]

    batch = Batcher(work).open("k")
    assert await batch.wait(batch.join(1)) is seen[0]


async def test_a_private_batcher_gives_every_waiter_a_copy() -> None:
    kept: list[Any] = []

    async def work(batch: Batch[int]) -> list[Outcome]:
        kept.extend([m.item] for m in batch.start())
        return [(v, None) for v in kept]

    batch = Batcher(work, private=True).open("k")
    value = await batch.wait(batch.join(1))
    assert value == kept[0] and value is not kept[0]


async def test_members_without_a_share_key_are_never_merged() -> None:
    batch = Batcher(echo()).open("k")
    assert batch.join(1) is not batch.join(1)
    assert batch.join(2, share=2, merge=False) is not batch.join(2, share=2, merge=False) and batch.holds(2)


async def test_cancelling_one_waiter_leaves_the_work_running_for_the_others() -> None:
    gate = asyncio.Event()
    batch = Batcher(echo(gate)).open("k")
    member = batch.join(1, share=1)
    batch.join(1, share=1)
    leaving, staying = asyncio.create_task(batch.wait(member)), asyncio.create_task(batch.wait(member))
    await turns()
    leaving.cancel()
    await turns()
    gate.set()
    assert await staying == [1]
    assert leaving.cancelled() and batch.task is not None and not batch.task.cancelled()


async def test_the_work_is_cancelled_when_nobody_waits_any_more() -> None:
    gate = asyncio.Event()
    batcher: Batcher[int] = Batcher(echo(gate))
    batch = batcher.open("k")
    waiter = asyncio.create_task(batch.wait(batch.join(1)))
    await turns()
    waiter.cancel()
    await turns()
    assert batch.task is not None and batch.task.cancelled()
    assert batcher.pending("k") is None  # and nobody may join it


async def test_members_nobody_waits_for_when_it_starts_are_left_out() -> None:
    connected = asyncio.Event()

    async def work(batch: Batch[int]) -> list[Outcome]:
        await connected.wait()  # as a batch waits for its connection
        return [([m.item], None) for m in batch.start()]

    batch = Batcher(work).open("k")
    gone, kept = batch.join(1), batch.join(2)
    leaving = asyncio.create_task(batch.wait(gone))
    staying = asyncio.create_task(batch.wait(kept))
    await turns()
    leaving.cancel()
    await turns()
    connected.set()
    assert await staying == [2]
    assert batch.sent == [kept] and gone.futures[0].cancelled()


async def test_a_started_batch_takes_no_newcomers() -> None:
    gate = asyncio.Event()
    batcher: Batcher[int] = Batcher(echo(gate))
    batch = batcher.open("k")
    waiter = asyncio.create_task(batch.wait(batch.join(1)))
    assert batcher.pending("k") is batch
    await turns()
    assert batch.sent is not None and batcher.pending("k") is None
    gate.set()
    await waiter


async def test_a_failure_of_the_work_gives_every_waiter_an_error_object_of_its_own() -> None:
    async def work(batch: Batch[int]) -> list[Outcome]:
        batch.start()
        raise Broken("down")

    batch = Batcher(work).open("k")
    members = [batch.join(1, share=1), batch.join(1, share=1), batch.join(2, share=2)]
    errors = await asyncio.gather(*(batch.wait(m) for m in members), return_exceptions=True)
    assert all(isinstance(e, Broken) and str(e) == "down" for e in errors)
    assert len({id(e) for e in errors}) == 3


async def test_one_error_object_for_two_members_becomes_two() -> None:
    failure = Failed("same")

    async def work(batch: Batch[int]) -> list[Outcome]:
        return [(None, failure) for _ in batch.start()]

    batch = Batcher(work).open("k")
    first, second = batch.join(1), batch.join(2)
    errors = await asyncio.gather(batch.wait(first), batch.wait(second), return_exceptions=True)
    assert errors[0] is failure and errors[1] is not failure and isinstance(errors[1], Failed)


async def test_an_early_answer_reaches_its_waiters_before_the_work_ends() -> None:
    gate = asyncio.Event()

    async def work(batch: Batch[int]) -> list[Outcome]:
        sent = batch.start()
        outcomes: list[Outcome] = [([m.item], None) for m in sent]
        batch.answer(0, outcomes[0])
        await gate.wait()
        return outcomes

    batch = Batcher(work).open("k")
    fast, slow = batch.join(1), batch.join(2)
    slow_waiter = asyncio.create_task(batch.wait(slow))
    assert await batch.wait(fast) == [1]
    assert not slow_waiter.done()
    gate.set()
    assert await slow_waiter == [2]


async def test_work_without_an_outcome_for_every_member_fails_them_all() -> None:
    async def work(batch: Batch[int]) -> list[Outcome]:
        return [([1], None)]

    batch = Batcher(work).open("k")
    members = [batch.join(1), batch.join(2)]
    errors = await asyncio.gather(*(batch.wait(m) for m in members), return_exceptions=True)
    assert all(isinstance(e, RuntimeError) for e in errors)


# --- the property: any interleaving, each surviving waiter its own outcome -----------------


@dataclass(frozen=True)
class Ask:
    turn: int  # when the waiter joins
    item: int
    shares: bool  # joins under `item` (identical asks share a member)
    cancel: int | None  # when the waiter is cancelled (before or after it joins), if ever


@dataclass(frozen=True)
class Scenario:
    asks: list[Ask]
    start_after: int  # turns the work waits before it starts its batch
    end_after: int  # turns from its start to its end
    failing: frozenset[int]  # items whose own outcome is an error
    early: frozenset[int]  # positions (in the batch as sent) answered before the end
    broken: bool  # the whole work raises at its end
    private: bool
    triage: str  # "none": no triage; "pass": one that lets the work run; "answer": one that answers


scenarios = st.builds(
    Scenario,
    asks=st.lists(st.builds(Ask, turn=st.integers(0, 4), item=st.integers(0, 3), shares=st.booleans(),
                            cancel=st.none() | st.integers(0, 8)), min_size=1, max_size=8),
    start_after=st.integers(0, 3),
    end_after=st.integers(0, 3),
    failing=st.frozensets(st.integers(0, 3)),
    early=st.frozensets(st.integers(0, 7)),
    broken=st.booleans(),
    private=st.booleans(),
    triage=st.sampled_from(["none", "pass", "answer"]),
)


@dataclass
class Record:
    """What the works did: every member answered early, with its outcome."""

    early: dict[int, Outcome] = field(default_factory=dict)  # id(member) -> outcome


async def play(scenario: Scenario) -> tuple[list[Any], list[Member[int] | None], list[bool], Record]:
    record = Record()

    def own(sent: list[Member[int]]) -> list[Outcome]:
        return [(None, Failed(m.item)) if m.item in scenario.failing else ([m.item], None) for m in sent]

    def triage(batch: Batch[int]) -> list[Outcome] | None:
        return own(batch.start()) if scenario.triage == "answer" else None

    async def work(batch: Batch[int]) -> list[Outcome]:
        await turns(scenario.start_after)
        sent = batch.start() if batch.sent is None else batch.sent
        outcomes = own(sent)
        for position in sorted(scenario.early):
            if position < len(sent):
                record.early[id(sent[position])] = outcomes[position]
                batch.answer(position, outcomes[position])
        await turns(scenario.end_after)
        if scenario.broken:
            raise Broken()
        return outcomes

    batcher: Batcher[int] = Batcher(work, private=scenario.private,
                                    triage=None if scenario.triage == "none" else triage)
    members: list[Member[int] | None] = [None] * len(scenario.asks)

    async def waiter(index: int, ask: Ask) -> Any:
        await turns(ask.turn)
        batch = batcher.pending("k")
        if batch is None:
            batch = batcher.open("k")
        member = members[index] = batch.join(ask.item, ask.item if ask.shares else None)
        return await batch.wait(member)

    tasks = [asyncio.create_task(waiter(i, ask)) for i, ask in enumerate(scenario.asks)]
    cancelled = [False] * len(tasks)
    for turn in range(12):
        for i, ask in enumerate(scenario.asks):
            if ask.cancel == turn and not tasks[i].done():
                cancelled[i] = tasks[i].cancel()
        await asyncio.sleep(0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return results, members, cancelled, record


@pytest.mark.slow  # 400 generated interleavings
@settings(max_examples=400, deadline=None)
@given(scenarios)
def test_any_interleaving_gives_each_surviving_waiter_exactly_its_own_outcome(scenario: Scenario) -> None:
    loop = asyncio.new_event_loop()
    try:
        results, members, cancelled, record = loop.run_until_complete(play(scenario))
    finally:
        loop.close()
    for result, member, was_cancelled in zip(results, members, cancelled, strict=True):
        if was_cancelled:
            assert isinstance(result, asyncio.CancelledError)
            continue
        assert member is not None
        value, error = record.early.get(id(member), (None, None))
        if id(member) not in record.early:
            if scenario.broken and scenario.triage != "answer":
                error = Broken()
            elif member.item in scenario.failing:
                error = Failed(member.item)
            else:
                value = [member.item]
        if error is not None:
            assert type(result) is type(error) and result.args == error.args
        else:
            assert result == value
    # Each waiter's value or error is an object of its own (values compared as lists: `[item]`).
    objects = [id(r) for r, gone in zip(results, cancelled, strict=True) if not gone]
    assert len(objects) == len(set(objects))


@pytest.mark.slow  # 200 generated interleavings
def test_the_property_sees_shared_members_cancellations_and_failures() -> None:
    """The strategy reaches the cases the property is about (not only lone, lucky waiters)."""
    seen = set()

    @settings(max_examples=200, deadline=None)
    @given(scenarios)
    def look(scenario: Scenario) -> None:
        loop = asyncio.new_event_loop()
        try:
            results, members, cancelled, _ = loop.run_until_complete(play(scenario))
        finally:
            loop.close()
        if any(cancelled) and not all(cancelled):
            seen.add("cancelled among survivors")
        shared = [m for m in members if m is not None and m.joined > 1]
        if shared:
            seen.add("shared member")
        if any(isinstance(r, Failed | Broken) for r in results):
            seen.add("failure")

    look()
    assert seen == {"cancelled among survivors", "shared member", "failure"}


async def test_a_triage_that_answers_a_batch_makes_no_task_for_it() -> None:
    async def work(batch: Batch[int]) -> list[Outcome]:
        raise AssertionError("not sent")

    batch = Batcher(work, triage=lambda b: [(-m.item, None) for m in b.start()]).open("k")
    assert await batch.wait(batch.join(3)) == -3 and batch.task is None


async def test_a_triage_that_lets_the_batch_go_sends_it_to_the_work_a_turn_later() -> None:
    looked: list[int] = []

    def triage(batch: Batch[int]) -> list[Outcome] | None:
        looked.extend(m.item for m in batch.start())
        return None

    async def work(batch: Batch[int]) -> list[Outcome]:
        return [([m.item], None) for m in batch.sent or []]

    batch = Batcher(work, triage=triage).open("k")
    assert await batch.wait(batch.join(4)) == [4] and looked == [4] and batch.task is not None


@pytest.mark.parametrize("private", [False, True])
async def test_a_waiter_of_a_shared_member_that_fails_raises_its_own_copy(private: bool) -> None:
    failure = Failed("one")

    async def work(batch: Batch[int]) -> list[Outcome]:
        return [(None, failure) for _ in batch.start()]

    batch = Batcher(work, private=private).open("k")
    member = batch.join(1, share=1)
    batch.join(1, share=1)
    errors = await asyncio.gather(batch.wait(member), batch.wait(member), return_exceptions=True)
    assert all(isinstance(e, Failed) for e in errors)
    assert errors[0] is not errors[1] and failure not in errors
