"""One batcher: concurrent asks for the same work share it, and each asker gets its own answer.

Coalescing (one statement for many runs, `planner.db.coalesce`), fusion (the sibling reads of
one run as one statement, `planner.db.fuse`) and the cache's single flight (one statement for
every run that misses one key, `planner.db.cache`) are one mechanism, aiodataloader's shape:

- A `Batcher` keeps at most one pending `Batch` per key. `open(key)` makes one and dispatches
  its work in a task of its own, whose first step runs on the loop's next turn: every ask of
  this turn can still join.
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
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from planner.kinds.backend import Outcome, own_error, private_copy

I = TypeVar("I")  # noqa: E741 -- what one member asks (a `Query`, parameters)
Work = Callable[["Batch[I]"], Awaitable[list[Outcome]]]


@dataclass(slots=True, eq=False)
class Member(Generic[I]):
    """One ask in a batch: its item, the future its waiters share, and how many they are."""

    item: I
    future: asyncio.Future[Any]
    waiting: int = 0  # waiters awaiting it now
    joined: int = 0  # waiters that asked for it in all: past one, each gets a copy
    sharing: int = 0  # waiters when the batch started (`Batch.start`)


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
        member = self._shares.get(share) if merge and share is not None else None
        if member is None:
            member = Member(item, asyncio.get_running_loop().create_future())
            self.members.append(member)
            if share is not None:
                self._shares.setdefault(share, member)
        member.waiting += 1
        member.joined += 1
        self._waiting += 1
        return member

    def start(self) -> list[Member[I]]:
        """Close the batch to newcomers and fix what is sent: the members still waited for."""
        self._batcher.close(self)
        sent = self.sent = [m for m in self.members if m.waiting]
        for member in sent:
            member.sharing = member.waiting
        self.runs = sum(m.waiting for m in sent)
        return sent

    async def wait(self, member: Member[I]) -> Any:
        """`member`'s value for one waiter, or its error raised (copies when it is shared)."""
        error: Exception | None = None
        try:
            value = await asyncio.shield(member.future)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        finally:
            member.waiting -= 1
            self._waiting -= 1
            task = self.task
            if not self._waiting and task is not None and not task.done():
                self._batcher.close(self)  # nobody may join a batch that nobody waits for
                task.cancel()  # ... and its work (a statement on the server) stops
        copies = member.joined > 1 or self._batcher.private
        if error is not None:
            raise own_error(error) if copies else error
        return private_copy(value) if copies else value

    def answer(self, position: int, outcome: Outcome) -> None:
        """Member `position` of those sent has its outcome before the work is over: its waiters
        get it now (`settle` skips it later). A cancellation is the batch's to settle."""
        sent = self.sent
        if sent is None or not 0 <= position < len(sent):
            return
        member = sent[position]
        value, error = outcome
        if not member.future.done() and not isinstance(error, asyncio.CancelledError):
            _hand(member, value, error)

    def settle(self, outcomes: list[Outcome] | None, failure: BaseException | None) -> None:
        """Hand each member its outcome, or all of them `failure`, each member an error object of
        its own. A member left out of what was sent (nobody waited for it) is cancelled."""
        members = self.members if self.sent is None else self.sent
        if failure is None and (outcomes is None or len(outcomes) != len(members)):
            failure = RuntimeError("the batch ended without an outcome for every member")  # the work's bug
        given: dict[int, Outcome] = {}
        if failure is None and outcomes is not None:
            given = {id(m): outcome for m, outcome in zip(members, outcomes, strict=True)}
        handed: set[int] = set()  # errors a member has already: another member gets a copy
        for member in self.members:
            if member.future.done():
                continue
            value: Any
            error: BaseException | None
            if failure is not None:
                value, error = None, failure
            elif id(member) in given:
                value, error = given[id(member)]
            else:
                member.future.cancel()
                continue
            if isinstance(error, asyncio.CancelledError):
                member.future.cancel()
                continue
            if error is not None:
                if id(error) in handed:
                    error = own_error(error)
                handed.add(id(error))
            _hand(member, value, error)


def _hand(member: Member[Any], value: Any, error: BaseException | None) -> None:
    if error is None:
        member.future.set_result(value)
        return
    member.future.set_exception(error)
    if not member.waiting:
        member.future.exception()  # nobody waits for it any more: not an error lost


class Batcher(Generic[I]):
    """Pending batches by key, each dispatched to `work` (see the module's docstring)."""

    __slots__ = ("work", "private", "_pending")

    def __init__(self, work: Work[I], *, private: bool = False) -> None:
        self.work = work
        self.private = private  # every waiter gets copies: the work keeps its values elsewhere too
        self._pending: dict[Hashable, Batch[I]] = {}

    def pending(self, key: Hashable) -> Batch[I] | None:
        """The batch under `key` that newcomers may still join, if any."""
        return self._pending.get(key)

    def open(self, key: Hashable) -> Batch[I]:
        """A new pending batch under `key` (a full one there before is left to finish), its work
        dispatched on the loop's next turn."""
        batch = self._pending[key] = Batch(self, key)
        batch.task = asyncio.get_running_loop().create_task(self._dispatch(batch))
        return batch

    def close(self, batch: Batch[I]) -> None:
        """No newcomer joins `batch` any more."""
        if self._pending.get(batch.key) is batch:
            del self._pending[batch.key]

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
