"""Running a compiled flow: settled-style outcomes, three modes, fail-fast, deadlines.

The scheduler is graphlib's ready-set protocol turned into callbacks: each node keeps a count
of dependencies not yet settled; when a node settles, its successors' counts drop, and a
successor whose count reaches zero starts at once (eager). Nothing polls: a task's done
callback drives everything, and the run's own coroutine only waits for "all settled" or
"stop". Layered and sequential modes reuse the same machinery with a gate in front of it.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from planner import telemetry
from planner.errors import FlowFailed, FlowInputError, FlowTimeout, NodeError, NodeTimeout, ReferenceFieldError
from planner.expr import evaluate
from planner.graph import CompiledFlow, CompiledNode
from planner.models import value_fits
from planner.refs import Unresolved, compile_getter
from planner.results import FlowResult, NodeResult, NodeState

logger = logging.getLogger("planner")

MODES = ("eager", "layered", "sequential")
STOP_GRACE_S = 1.0  # how long a stopping run waits for cancelled nodes to finish
_run_ids = itertools.count(1)
_monotonic = time.monotonic
_RUN_PREFIX = os.urandom(3).hex()


@dataclass(frozen=True, slots=True)
class BoundNode:
    """A node joined to its implementation: `args(values)` then `await run(args)`.

    `args` raises `Unresolved` (the node is skipped) or `LookupError` (a typo: it fails).
    `own_timeout` says `run` applies the node's timeout itself (SQL nodes time the query, not
    the wait for a connection, which only the run's deadline bounds).
    """

    spec: CompiledNode
    args: Callable[[dict[str, Any]], Any]
    run: Callable[[Any], Coroutine[Any, Any, Any]]
    own_timeout: bool = False


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


def template_args(spec: CompiledNode) -> Callable[[dict[str, Any]], Any]:
    """The `args` of a node whose arguments are its `with:` template."""
    return compile_getter(spec.args)


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying by default: lost connections, serialization failures, deadlocks..."""
    return bool(getattr(exc, "transient", False)) or isinstance(exc, ConnectionError)


def resolve_mode(flow: CompiledFlow, mode: str | None) -> str:
    """`PLANNER_MODE` beats the call's `mode=`, which beats the flow's `settings.mode`."""
    chosen = os.environ.get("PLANNER_MODE") or mode or flow.settings.mode
    if chosen not in MODES:
        raise FlowInputError(f"unknown mode {chosen!r} (choose eager, layered or sequential)", flow=flow.name)
    return chosen


def bind_inputs(flow: CompiledFlow, given: dict[str, Any]) -> dict[str, Any]:
    """Check the inputs against the flow's declaration and fill defaults. Raises `FlowInputError`."""
    unknown = sorted(set(given) - set(flow.inputs))
    if unknown:
        raise FlowInputError(f"unknown input {unknown[0]!r} (declared: {', '.join(flow.inputs) or 'none'})", flow=flow.name, input=unknown[0])
    values: dict[str, Any] = {}
    for name, spec in flow.inputs.items():
        if name not in given:
            if spec.required:
                raise FlowInputError(f"missing input {name!r} ({spec.type})", flow=flow.name, input=name)
            values[name] = copy.deepcopy(spec.default)
            continue
        value = given[name]
        if not value_fits(spec.type, value):
            raise FlowInputError(f"input {name!r} must be {spec.type}, got {type(value).__name__}", flow=flow.name, input=name)
        values[name] = value
    return values


async def execute(
    flow: CompiledFlow,
    bound: dict[str, BoundNode],
    inputs: dict[str, Any],
    *,
    mode: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> FlowResult:
    """Run `flow` once. Returns the result, or raises `FlowFailed` (carrying it) on failure."""
    return await execute_checked(flow, bound, bind_inputs(flow, inputs), resolve_mode(flow, mode), overrides)


async def execute_checked(
    flow: CompiledFlow, bound: dict[str, BoundNode], values: dict[str, Any], mode: str, overrides: dict[str, Any] | None
) -> FlowResult:
    """`execute` for inputs already passed through `bind_inputs` and a mode from `resolve_mode`."""
    return await _Run(flow, bound, values, mode, overrides or {}).main()


class _Run:
    """The state of one run. Every node ends in `results` exactly once, through `_settle`."""

    def __init__(
        self, flow: CompiledFlow, bound: dict[str, BoundNode], values: dict[str, Any], mode: str, overrides: dict[str, Any]
    ) -> None:
        self.flow, self.bound, self.values, self.mode, self.overrides = flow, bound, values, mode, overrides
        self.run_id = f"{_RUN_PREFIX}-{next(_run_ids)}"
        self.loop = asyncio.get_running_loop()
        self.t0 = _monotonic()  # the loop's clock (asyncio's loop.time() is time.monotonic())
        self.active: AbstractSet[str]
        if overrides:
            self.active = _needed(flow, overrides)
            self.waiting = {
                n: 0 if n in overrides else sum(1 for d in flow.nodes[n].deps if d in self.active) for n in self.active
            }
        else:
            self.active = flow.nodes.keys()
            self.waiting = flow.indegree.copy()
        self.results: dict[str, NodeResult] = {}
        self.tasks: dict[asyncio.Task[Any], str] = {}
        self.started: dict[str, float] = {}
        self.attempts: dict[str, int] = {}
        self.queue: deque[tuple[BoundNode, Any]] = deque()  # ready with their args, held back by max_concurrency
        self.limit = flow.settings.max_concurrency or 1 << 30
        self.ready: deque[str] = deque()
        self.outstanding = 0
        self.wake: asyncio.Future[None] = self.loop.create_future()
        self.failure: str | None = None
        self.eager = mode == "eager"
        self.on_done = self._on_done  # one bound method for every task, not one per task
        self.tracer = telemetry.tracer()
        self.spans: dict[str, Any] = {}

    async def main(self) -> FlowResult:
        timed_out = completed = False
        flow_span = telemetry.start_flow(self.tracer, self.flow.name, self.mode, self.run_id) if self.tracer else None
        self.flow_span = flow_span
        try:
            async with asyncio.timeout(self.flow.settings.timeout):
                if self.mode == "eager":
                    await self._eager()
                else:
                    await self._gated(self.flow.groups if self.mode == "layered" else [(n,) for n in self.flow.order])
            completed = True
        except TimeoutError:
            timed_out = True
        finally:
            await self._stop()
            if flow_span is not None:
                status = "timeout" if timed_out else "failed" if self.failure else "ok" if completed else "cancelled"
                telemetry.end_flow(flow_span, status)
        return self._finish(timed_out)

    async def _eager(self) -> None:
        self.outstanding = len(self.active)
        self.ready.extend(n for n in self.flow.order if n in self.waiting and self.waiting[n] == 0)
        self._drain()
        if self.outstanding:
            await self.wake

    async def _gated(self, steps: Any) -> None:
        for step in steps:
            names = [n for n in step if n in self.waiting]
            if not names:
                continue
            self.outstanding = len(names)
            if self.wake.done():
                self.wake = self.loop.create_future()
            self.ready.extend(names)
            self._drain()
            if self.outstanding:
                await self.wake
            if self.failure:
                return

    # --- starting nodes -----------------------------------------------------------------

    def _drain(self) -> None:
        """Start every ready node (iteratively: a long chain of skips must not recurse)."""
        ready = self.ready
        while ready and self.failure is None:
            self._start(ready.popleft())

    def _start(self, name: str) -> None:
        if name in self.overrides:
            self._settle(name, NodeState.OK, self.overrides[name], None)
            return
        node = self.bound[name]
        spec = node.spec
        try:
            if spec.when is not None and not evaluate(spec.when, self.values):
                self._settle(name, NodeState.SKIPPED, _copy(spec.default), None)
                return
            args = node.args(self.values)
        except Unresolved:
            self._settle(name, NodeState.SKIPPED, _copy(spec.default), None)
            return
        except LookupError as exc:
            self.started[name] = self._now()
            self._failed(name, ReferenceFieldError(str(exc)))
            return
        except Exception as exc:  # a `when` that compares the incomparable
            self.started[name] = self._now()
            self._failed(name, NodeError(f"when: {exc}"))
            return
        if len(self.tasks) >= self.limit:
            self.queue.append((node, args))
            return
        self._launch(node, args)

    def _launch(self, node: BoundNode, args: Any) -> None:
        spec = node.spec
        name = spec.name
        self.started[name] = (_monotonic() - self.t0) * 1000.0
        if (spec.timeout is None or node.own_timeout) and spec.retry.attempts == 1:
            coro = node.run(args)  # the fast path: no wrapper coroutine at all
        else:
            coro = self._attempt_loop(node, args)
        if self.tracer is not None:
            span = self.spans[name] = telemetry.start_node(self.tracer, self.flow_span, self.flow.name, name, spec.kind)
            coro = telemetry.within(span, coro)
        task = self.loop.create_task(coro)
        self.tasks[task] = name
        task.add_done_callback(self.on_done)

    async def _attempt_loop(self, node: BoundNode, args: Any) -> Any:
        spec, name = node.spec, node.spec.name
        for attempt in range(1, spec.retry.attempts + 1):
            self.attempts[name] = attempt
            try:
                if spec.timeout is None or node.own_timeout:
                    return await node.run(args)
                return await timed(node.run(args), spec.timeout)
            except Exception as exc:
                retryable = spec.retry.on_any or is_transient(exc)
                if attempt == spec.retry.attempts or not retryable:
                    raise
                logger.info(
                    "node %s of flow %s: attempt %d failed (%s), retrying",
                    name, self.flow.name, attempt, exc,
                    extra={"flow": self.flow.name, "node": name, "run_id": self.run_id, "attempt": attempt},
                )
                await asyncio.sleep(spec.retry.backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable")  # pragma: no cover

    # --- settling nodes -----------------------------------------------------------------

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        name = self.tasks.pop(task)
        try:
            value = task.result()
        except asyncio.CancelledError:
            if self.failure is None:  # not cancelled by the run: the node cancelled itself
                self._failed(name, NodeError("the node's own code raised CancelledError"))
            else:
                self._settle(name, NodeState.CANCELLED, None, None)
        except Exception as exc:
            self._failed(name, exc)
        else:
            self._settle(name, NodeState.OK, value, None)
        if self.queue and self.failure is None:
            self._launch(*self.queue.popleft())
        if self.ready:
            self._drain()

    def _failed(self, name: str, error: BaseException) -> None:
        spec = self.flow.nodes[name]
        if spec.fail:
            self._settle(name, NodeState.FAILED, None, error)
            if self.failure is None:
                self.failure = name
                self._cancel_all()
                self._wake()
            return
        logger.warning(
            "node %s of flow %s defaulted: %s: %s",
            name, self.flow.name, type(error).__name__, error,
            exc_info=error,
            extra={"flow": self.flow.name, "node": name, "run_id": self.run_id, "outcome": "defaulted"},
        )
        self._settle(name, NodeState.DEFAULTED, _copy(spec.default), error)

    def _settle(self, name: str, state: NodeState, value: Any, error: BaseException | None) -> None:
        started = self.started.get(name)
        attempts = 0 if started is None else self.attempts.get(name, 1)
        self.results[name] = NodeResult(state, value, error, attempts, started, (_monotonic() - self.t0) * 1000.0)
        self.values[name] = value
        if self.spans and name in self.spans:
            telemetry.end_node(self.spans.pop(name), state.value, error)
        if self.failure is not None:
            return
        waiting = self.waiting
        for successor in self.flow.successors[name]:
            if successor in waiting:
                left = waiting[successor] = waiting[successor] - 1
                if left == 0 and self.eager:
                    self.ready.append(successor)
        self.outstanding -= 1
        if self.outstanding == 0:
            self._wake()

    def _wake(self) -> None:
        if not self.wake.done():
            self.wake.set_result(None)

    # --- stopping -----------------------------------------------------------------------

    def _cancel_all(self) -> None:
        self.ready.clear()
        self.queue.clear()
        for task in self.tasks:
            task.cancel()

    async def _stop(self) -> None:
        """Cancel what is still in flight and wait until every node task has finished."""
        if not self.tasks:
            return
        if self.failure is None:
            self.failure = ""  # stop successors from starting while we wind down
        self._cancel_all()
        pending = list(self.tasks)
        try:
            _, stuck = await asyncio.wait(pending, timeout=STOP_GRACE_S)
        except asyncio.CancelledError:
            await asyncio.wait(pending, timeout=STOP_GRACE_S)  # cancelled again while cleaning up
            raise
        if stuck:
            # A node that swallows cancellation must not hold the run past its deadline.
            logger.error("flow %s: %d node(s) ignored cancellation and were left running: %s", self.flow.name,
                         len(stuck), ", ".join(sorted(self.tasks[t] for t in stuck if t in self.tasks)),
                         extra={"flow": self.flow.name, "run_id": self.run_id})

    def _finish(self, timed_out: bool) -> FlowResult:
        for name in self.active:
            if name not in self.results:
                self.results[name] = NodeResult(NodeState.CANCELLED, None, None, 0, self.started.get(name), None)
        results = {name: self.results[name] for name in self.flow.order if name in self.results}
        status = "timeout" if timed_out else "failed" if self.failure else "ok"
        output = self._output() if status == "ok" else None
        result = FlowResult(self.flow.name, self.run_id, self.mode, status, results, output, self._now())
        if status == "timeout":
            raise FlowTimeout(f"flow {self.flow.name!r} hit its deadline of {self.flow.settings.timeout:g}s", result=result)
        if status == "failed":
            error = results[self.failure].error if self.failure else None
            raise FlowFailed(f"flow {self.flow.name!r} failed: node {self.failure!r}: {error}", result=result)
        return result

    def _output(self) -> Any:
        if self.flow.output_getters is None:
            return {name: node.value for name, node in self.results.items()}
        output: dict[str, Any] = {}
        for key, get in self.flow.output_getters.items():
            # Everything has run (and written): an entry that walks into null is null, not a
            # failure. A missing field is a typo worth a warning.
            try:
                output[key] = get(self.values)
            except Unresolved:
                output[key] = None
            except LookupError as exc:
                logger.warning("flow %s: output %s: %s", self.flow.name, key, exc, extra={"flow": self.flow.name, "run_id": self.run_id})
                output[key] = None
        return output

    def _now(self) -> float:
        return (_monotonic() - self.t0) * 1000.0


def _copy(value: Any) -> Any:
    # Defaults are shared by every run; hand each run its own copy of a mutable one.
    return copy.deepcopy(value) if isinstance(value, (list, dict)) else value


def _needed(flow: CompiledFlow, overrides: dict[str, Any]) -> set[str]:
    """The nodes a run with `overrides` must settle: overridden ones, and what the rest needs."""
    unknown = sorted(set(overrides) - set(flow.nodes))
    if unknown:
        raise FlowInputError(f"override of unknown node {unknown[0]!r}", flow=flow.name)
    wanted = {r.root for t in (flow.output or {}).values() for r in t.refs}
    keep: set[str] = set()
    for name in reversed(flow.order):
        successors = flow.successors[name]
        if (
            name in overrides
            or name in wanted
            or not successors
            or any(s in keep and s not in overrides for s in successors)
        ):
            keep.add(name)
    return keep
