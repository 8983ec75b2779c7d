"""The minimal reference scheduler planner is measured against (graphlib + asyncio.wait)."""

from __future__ import annotations

import asyncio
import graphlib
from collections.abc import Awaitable, Callable
from typing import Any


async def reference_run(
    deps: dict[str, list[str]], fn: Callable[..., Awaitable[Any]], args: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Start every ready node as a task; wait for the first to finish; repeat."""
    sorter = graphlib.TopologicalSorter(deps)
    sorter.prepare()
    values: dict[str, Any] = {}
    running: dict[asyncio.Task[Any], str] = {}
    extra = args or {}
    while sorter.is_active():
        for name in sorter.get_ready():
            kwargs = {d: values[d] for d in deps[name]}
            task = asyncio.create_task(fn(**kwargs, **extra.get(name, {})))
            running[task] = name
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            name = running.pop(task)
            values[name] = task.result()
            sorter.done(name)
    return values


async def sequential_awaits(
    order: list[str], deps: dict[str, list[str]], fn: Callable[..., Awaitable[Any]], args: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Bare awaits one after another: no tasks at all, the CPU-cheapest baseline."""
    values: dict[str, Any] = {}
    extra = args or {}
    for name in order:
        values[name] = await fn(**{d: values[d] for d in deps[name]}, **extra.get(name, {}))
    return values
