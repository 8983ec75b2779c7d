"""Python callables that test flows call (allowed as module `tests`)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

calls: list[str] = []
cancelled: list[str] = []
attempts: dict[str, int] = {}


async def echo(value: Any = None, **deps: Any) -> Any:
    return value


async def sleep(ms: float, value: Any = None, tag: str = "", **deps: Any) -> Any:
    calls.append(tag or f"sleep{ms}")
    try:
        await asyncio.sleep(ms / 1000)
    except asyncio.CancelledError:
        cancelled.append(tag)
        raise
    return value


# Event chains (the way anyio's tests order things): a node sets a named event, another waits
# for it, so a test states "b ran while a was still waiting" instead of guessing durations.
# An event nobody sets (`wait: never`) holds a node until it is cancelled or times out, or
# `STEP_LIMIT_S` passes: then the node fails, so a broken planner fails a test, never hangs it.
events: dict[str, asyncio.Event] = {}
STEP_LIMIT_S = 10.0


def event(name: str) -> asyncio.Event:
    """The named event of the current test (made on first use, cleared between tests)."""
    return events.setdefault(name, asyncio.Event())


async def step(tag: str = "", signal: str = "", wait: str = "", value: Any = None, **deps: Any) -> Any:
    """Records `tag` in `calls`, sets the event `signal`, then waits for the event `wait`
    (recording `tag` in `cancelled` if cancelled while waiting) and returns `value`."""
    calls.append(tag)
    if signal:
        event(signal).set()
    if wait:
        try:
            async with asyncio.timeout(STEP_LIMIT_S):
                await event(wait).wait()
        except asyncio.CancelledError:
            cancelled.append(tag)
            raise
        except TimeoutError:
            raise AssertionError(f"{tag}: event {wait!r} not set within {STEP_LIMIT_S:g} s") from None
    return value


async def fail(message: str = "boom", **deps: Any) -> Any:
    raise ValueError(message)


async def flaky(key: str, failures: int, transient: bool = True, value: Any = "done") -> Any:
    """Fails `failures` times, then returns `value`; counts attempts in `attempts[key]`."""
    attempts[key] = attempts.get(key, 0) + 1
    if attempts[key] <= failures:
        raise ConnectionError("lost connection") if transient else ValueError("bad data")
    return value


def add(a: int, b: int) -> int:
    return a + b


async def row(**fields: Any) -> dict[str, Any]:
    return dict(fields)


not_a_function = print


running = {"now": 0}


async def work(ms: float, fail: bool = False, **deps: Any) -> int:
    """Sleeps `ms`, then fails or returns 1 + the sum of its dependencies' values."""
    running["now"] += 1
    try:
        await asyncio.sleep(ms / 1000)
        if fail:
            raise ValueError("injected failure")
        return 1 + sum(v for v in deps.values() if isinstance(v, int))
    finally:
        running["now"] -= 1


async def stubborn(ms: float) -> str:
    """Swallows cancellation: a badly written node."""
    end = asyncio.get_running_loop().time() + ms / 1000
    while asyncio.get_running_loop().time() < end:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            continue
    return "finished anyway"


async def cancels_itself() -> None:
    raise asyncio.CancelledError


async def own_timeout() -> None:
    raise TimeoutError("the remote API timed out")


async def bare_timeout() -> None:
    raise TimeoutError  # as asyncio.timeout and drivers raise it: no message


# Sync calls (run on planner's threads): `block` holds its thread until `unblock` is set (or `seconds` pass).
unblock = threading.Event()


def block(seconds: float = 2.0, value: Any = "unblocked") -> Any:
    calls.append("block")
    unblock.wait(seconds)
    return value


def quick(value: Any = "quick") -> Any:
    return value


def nap(ms: float, value: Any = None) -> Any:
    """A sync call that holds its thread for `ms` (a blocking client, as services have)."""
    time.sleep(ms / 1000)
    return value


def where(**deps: Any) -> dict[str, Any]:
    """A sync call that says which thread runs it, and whether an event loop runs there."""
    try:
        asyncio.get_running_loop()
        loop = True
    except RuntimeError:
        loop = False
    return {"ident": threading.get_ident(), "name": threading.current_thread().name, "loop": loop}


async def with_db(db: Any) -> Any:
    """A call that takes the pool (`db`): a `call:` node that reaches the database."""
    return db
