"""Node policy: what happens to one node, apart from when it is scheduled.

`when:` and reference resolution decide whether a node starts (`prepare`); retries with
backoff and per-node timeouts decide how long it tries (`attempts`); `on_error` and `on_bug`
decide whether a failure defaults the node or fails the run (the executor asks `fails_run`);
defaults are copied per run so that no run can change another's.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from planner.errors import NodeError, NodeTimeout, ReferenceFieldError
from planner.kinds import BoundNode
from planner.lang.expr import evaluate
from planner.lang.models import OnError
from planner.lang.refs import Unresolved

if TYPE_CHECKING:
    from planner.lang.nodes import CompiledNode

logger = logging.getLogger("planner")

SKIP = object()
"""`prepare` returns it for a node whose `when` is false or whose references walk into null."""


def prepare(node: BoundNode, values: dict[str, Any]) -> Any:
    """The node's arguments, or `SKIP`. Raises `NodeError` for a typo'd field or a bad `when`."""
    spec = node.spec
    try:
        if spec.when is not None and not evaluate(spec.when, values):
            return SKIP
        return node.args(values)
    except Unresolved:
        return SKIP
    except LookupError as exc:
        raise ReferenceFieldError(str(exc)) from None
    except Exception as exc:  # a `when` that compares the incomparable
        raise NodeError(f"when: {exc}") from None


async def attempts(node: BoundNode, args: Any, count: Callable[[int], None], flow: str, run_id: str) -> Any:
    """Run `node` with its timeout and retries; `count(n)` is told of each attempt."""
    spec = node.spec
    timeout = None if node.own_timeout else spec.timeout
    for attempt in range(1, spec.retry.attempts + 1):
        count(attempt)
        try:
            if timeout is None:
                return await node.run(args)
            return await timed(node.run(args), timeout)
        except Exception as exc:
            if attempt == spec.retry.attempts or not (spec.retry.on_any or is_transient(exc)):
                raise
            logger.info(
                "node %s of flow %s: attempt %d failed (%s), retrying", spec.name, flow, attempt, exc,
                extra={"flow": flow, "node": spec.name, "run_id": run_id, "attempt": attempt},
            )
            await asyncio.sleep(spec.retry.backoff * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # pragma: no cover


async def timed(awaitable: Awaitable[Any], seconds: float) -> Any:
    """Await with a timeout that raises `NodeTimeout`; a `TimeoutError` of the awaited itself passes."""
    timer = asyncio.timeout(seconds)
    try:
        async with timer:
            return await awaitable
    except TimeoutError:
        if not timer.expired():
            raise
        raise NodeTimeout(f"timed out after {seconds * 1000:g} ms") from None


def fails_run(spec: CompiledNode, error: BaseException, fallback: OnError) -> bool:
    """Whether `error` fails the run rather than default the node.

    An error that means the flow itself is wrong (`NodeError.is_bug`) fails it unless the node
    or its flow says `on_bug: default`. Otherwise the node's `on_error` decides: as written on
    the node, else `fail` for `required: true`, else the flow's `settings.on_error` (all three
    compiled into `spec.on_error`), else `fallback`, the Planner's `on_error=`."""
    if spec.bug_fails and getattr(error, "is_bug", False):
        return True
    return (spec.on_error or fallback) == "fail"


def failed_as_bug(spec: CompiledNode, error: BaseException | None, fallback: OnError) -> bool:
    """Whether a node that failed the run did so only because its error is a bug in the flow."""
    return (error is not None and spec.bug_fails and bool(getattr(error, "is_bug", False))
            and (spec.on_error or fallback) != "fail")


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying by default: lost connections, serialization failures, deadlocks..."""
    return bool(getattr(exc, "transient", False)) or isinstance(exc, ConnectionError)


def copy_default(value: Any) -> Any:
    # Defaults are shared by every run; hand each run its own copy of a mutable one.
    return copy.deepcopy(value) if isinstance(value, (list, dict)) else value


def log_defaulted(flow: str, node: str, run_id: str, error: BaseException) -> None:
    """One WARNING per defaulted node; an error no retry can fix is called a bug in the flow."""
    from planner.results import bug_reason, error_text, is_bug

    bug = is_bug(error)
    note = f"; looks like a bug in the flow ({bug_reason(error)})" if bug else ""
    logger.warning(
        "node %s of flow %s defaulted%s: %s", node, flow, note, error_text(error),
        exc_info=error, extra={"flow": flow, "node": node, "run_id": run_id, "outcome": "defaulted", "bug": bug},
    )
