"""One batcher: concurrent asks for the same work share it, and each asker gets its own answer.

Coalescing (one statement for many runs, `planner.db.coalesce`), fusion (the sibling reads of
one run as one statement, `planner.db.fuse`) and the cache's single flight (one statement for
every run that misses one key, `planner.db.cache`) are one mechanism, aiodataloader's shape:

- A `Batcher` keeps at most one pending `Batch` per key. `open(key)` makes one and dispatches
  its work in a task of its own, whose first step runs on the loop's next turn: every ask of
  this turn can still join. With a `triage`, that turn first looks at the batch (no task yet)
  and may answer it at once (fusion: a lone member goes direct, no task made for it).
- `Batch.join(item, share)` adds a `Member` (what one ask needs) or, under a `share` key the
  batch holds already, one more waiter to that member: identical asks share one answer.
- The work says when the batch starts (`Batch.start`, e.g. a connection in hand): it closes to
  newcomers, and members nobody waits for any more are left out (a run that gave up must not
  write). The work returns one `Outcome` per member sent, may hand one over early (`answer`),
  or raises: then every member fails.
- `Batch.wait(member)` is one waiter's wait. Its cancellation ends that wait only; when nobody
  waits for the batch any more, it closes and its work is cancelled. Every waiter of a shared
  member (of every member, with `private=True`: values kept elsewhere too) gets its own copy of
  the value (`private_copy`) and of the error (`own_error`); no two members get one error object.

    >>> async def double(batch):
    ...     return [(2 * member.item, None) for member in batch.start()]
    >>> async def ask():
    ...     batch = Batcher(double).open("numbers")
    ...     members = [batch.join(n, share=n) for n in (1, 2, 1)]
    ...     return len(batch), await asyncio.gather(*(batch.wait(m) for m in members))
    >>> asyncio.run(ask())
    (2, [2, 4, 2])
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from planner.kinds.backend import Outcome, own_error, private_copy

I = TypeVar("I")  # noqa: E741 -- what one member asks (a `Query`, parameters)
Work = Callable[["Batch[I]"], Awaitable[list[Outcome]]]
Triage = Callable[["Batch[I]"], list[Outcome] | None]


@dataclass(slots=True, eq=False)
class Member(Generic[I]):
    """One ask in a batch: its item, and a future for each of its waiters (a waiter cancelled
    cancels its own future only, which is all the others' protection: no shield needed)."""

    item: I
    futures: list[asyncio.Future[Any]] = field(default_factory=list)  # one per `Batch.join`
    waiting: int = 0  # waiters awaiting it now
    joined: int = 0  # waiters that asked for it in all: past one, each gets copies
    sharing: int = 0  # waiters when the batch started (`Batch.start`)
    answered: bool = False  # its outcome is handed (early, or when the batch settled)
    claimed: int = 0  # futures taken by `Batch.wait` (each join is one wait)


class Batch(Generic[I]):
    """The members waiting for one dispatch of a batcher's work (see the module's docstring)."""

    __slots__ = ("key", "members", "sent", "runs", "shared", "task", "_shares", "_waiting", "_batcher")

    def __init__(self, batcher: Batcher[I], key: Hashable) -> None:
        self.key = key
        self.members: list[Member[I]] = []  # in the order they joined
        self.sent: list[Member[I]] | None = None  # fixed by `start`: the members still waited for
        self.runs = 0  # waiters when it started
        self.shared = True  # the work's word: False when it did each member separately
        self.task: asyncio.Task[None] | None = None
        self._shares: dict[Hashable, Member[I]] = {}
        self._waiting = 0
        self._batcher = batcher

    def __len__(self) -> int:
        return len(self.members)

    def holds(self, share: Hashable) -> bool:
        """Whether a member joined under `share`."""
        return share in self._shares

    def join(self, item: I, share: Hashable | None = None, *, merge: bool = True) -> Member[I]:
        """One more waiter: on the member that joined under `share` first when `merge`, else on a
        new member for `item` (no `share`: never merged)."""
        self._waiting += 1
        future = asyncio.get_running_loop().create_future()
        member = self._shares.get(share) if merge and share is not None else None
        if member is None:
            member = Member(item, [future], 1, 1)
            self.members.append(member)
            if share is not None:
                self._shares.setdefault(share, member)
        else:
            member.futures.append(future)
            member.waiting += 1
            member.joined += 1
        return member

    def start(self) -> list[Member[I]]:
        """Close the batch to newcomers and fix what is sent: the members still waited for."""
        self._batcher.close(self)
        sent: list[Member[I]] = []
        runs = 0
        for member in self.members:
            if member.waiting:
                member.sharing = member.waiting
                runs += member.waiting
                sent.append(member)
        self.sent, self.runs = sent, runs
        return sent

    async def wait(self, member: Member[I]) -> Any:
        """`member`'s value for one waiter (once per `join`), or its error raised: copies of
        their own when the member is shared (or the batcher private)."""
        future = member.futures[member.claimed]
        member.claimed += 1
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                future.exception()  # cancelled after its outcome came: not an error lost
            raise
        finally:
            member.waiting -= 1
            self._waiting -= 1
            task = self.task
            if not self._waiting and task is not None and not task.done():
                self._batcher.close(self)  # nobody may join a batch that nobody waits for
                task.cancel()  # ... and its work (a statement on the server) stops

    def answer(self, position: int, outcome: Outcome) -> None:
        """Member `position` of those sent has its outcome before the work is over: its waiters
        get it now (`settle` skips it later). A cancellation is the batch's to settle."""
        sent = self.sent
        if sent is None or not 0 <= position < len(sent):
            return
        member = sent[position]
        value, error = outcome
        if not member.answered and not isinstance(error, asyncio.CancelledError):
            self._hand(member, value, error)

    def settle(self, outcomes: list[Outcome] | None, failure: BaseException | None) -> None:
        """Hand each member its outcome, or all of them `failure`, each member an error object of
        its own. A member left out of what was sent (nobody waited for it) is cancelled."""
        members = self.members if self.sent is None else self.sent
        if failure is None and (outcomes is None or len(outcomes) != len(members)):
            failure = RuntimeError("the batch ended without an outcome for every member")  # the work's bug
        if failure is not None or outcomes is None:
            outcomes = [(None, failure)] * len(members)
        handed: set[int] = set()  # errors a member has already: another member gets a copy
        for member, (value, error) in zip(members, outcomes, strict=True):
            if member.answered:
                continue
            if error is not None and not isinstance(error, asyncio.CancelledError):
                if id(error) in handed:
                    error = own_error(error)
                handed.add(id(error))
            self._hand(member, value, error)
        if len(members) < len(self.members):
            for member in self.members:
                if not member.answered:
                    self._hand(member, None, asyncio.CancelledError())  # left out: nobody waits for it

    def _hand(self, member: Member[I], value: Any, error: BaseException | None) -> None:
        """Each waiter of `member` still waiting its outcome: copies when it is shared."""
        member.answered = True
        copies = member.joined > 1 or self._batcher.private
        for future in member.futures:
            if future.done():
                continue  # its waiter was cancelled
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            elif error is not None:
                future.set_exception(own_error(error) if copies else error)
            else:
                future.set_result(private_copy(value) if copies else value)


class Batcher(Generic[I]):
    """Pending batches by key, each dispatched to `work` (see the module's docstring)."""

    __slots__ = ("work", "private", "triage", "_pending")

    def __init__(self, work: Work[I], *, private: bool = False, triage: Triage[I] | None = None) -> None:
        self.work = work
        self.private = private  # every waiter gets copies: the work keeps its values elsewhere too
        # Called on the loop's next turn instead of starting the work there: its outcomes answer
        # the batch at once, or None sends it to `work` (in a task, a turn later).
        self.triage = triage
        self._pending: dict[Hashable, Batch[I]] = {}

    def pending(self, key: Hashable) -> Batch[I] | None:
        """The batch under `key` that newcomers may still join, if any."""
        return self._pending.get(key)

    def open(self, key: Hashable) -> Batch[I]:
        """A new pending batch under `key` (a full one there before is left to finish), its work
        dispatched on the loop's next turn (or triaged then)."""
        batch = self._pending[key] = Batch(self, key)
        loop = asyncio.get_running_loop()
        if self.triage is None:
            batch.task = loop.create_task(self._dispatch(batch))
        else:
            loop.call_soon(self._triaged, batch, self.triage)
        return batch

    def close(self, batch: Batch[I]) -> None:
        """No newcomer joins `batch` any more."""
        if self._pending.get(batch.key) is batch:
            del self._pending[batch.key]

    def _triaged(self, batch: Batch[I], triage: Triage[I]) -> None:
        if not batch._waiting:
            self.close(batch)  # everyone left before it was looked at
            return
        try:
            outcomes = triage(batch)
        except Exception as exc:
            self.close(batch)
            batch.settle(None, exc)
            return
        if outcomes is None:
            batch.task = asyncio.get_running_loop().create_task(self._dispatch(batch))
        else:
            self.close(batch)  # the triage may not have started it
            batch.settle(outcomes, None)

    async def _dispatch(self, batch: Batch[I]) -> None:
        outcomes: list[Outcome] | None = None
        failure: BaseException | None = None
        try:
            outcomes = await self.work(batch)
        except asyncio.CancelledError:
            failure = asyncio.CancelledError()
            raise
        except Exception as exc:
            failure = exc
        finally:
            self.close(batch)
            batch.settle(outcomes, failure)
