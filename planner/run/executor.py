"""Running a compiled, bound flow once: the three modes, fail-fast, deadlines, the result.

The executor drives two smaller parts: the ready set (`planner.run.scheduler.Ready`), which says
what may start once something settles, and node policy (`planner.run.policy`), which says what
starting, failing and retrying mean for one node. Each node's task reports through a done
callback that settles it and starts whatever that released; nothing polls, and the run's own
coroutine only awaits a future resolved by the last settlement (or by a fail-fast). Layered
and sequential modes reuse the same machinery behind a gate that releases one group (or one
node) at a time. Observers (`planner.run.observers`) watch without steering.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, Literal

from planner.config import did_you_mean
from planner.errors import FlowInputError, NodeError
from planner.graph import CompiledFlow
from planner.kinds import BoundNode
from planner.kinds.backend import SEQUENTIAL
from planner.lang.models import OnError, value_fits
from planner.results import FlowResult, NodeState
from planner.run import policy
from planner.run.compiled import RUN_GROUPS
from planner.run.ledger import Ledger, Record, flow_output, node_result
from planner.run.observers import RunObserver, RunRecorder
from planner.run.scheduler import Ready

logger = logging.getLogger("planner")

Mode = Literal["eager", "layered", "sequential"]
MODES: tuple[Mode, ...] = ("eager", "layered", "sequential")
STOP_GRACE_S = 1.0  # how long a stopping run waits for cancelled nodes to finish
_run_ids = itertools.count(1)
_monotonic = time.monotonic
_RUN_PREFIX = os.urandom(3).hex()
_OK, _SKIPPED, _DEFAULTED, _FAILED, _CANCELLED = (NodeState.OK, NodeState.SKIPPED, NodeState.DEFAULTED,
                                                   NodeState.FAILED, NodeState.CANCELLED)


class Phase(enum.Enum):
    """Where a run is: nodes start only while it is RUNNING."""

    RUNNING = "running"
    FAILED = "failed"  # an `on_error: fail` node failed: everything else is cancelled
    STOPPING = "stopping"  # the deadline passed or the caller cancelled: winding down


# Module constants, not `Phase.RUNNING`: an Enum class attribute costs ~0.17 us a read on CPython
# 3.11, and the phase is read a few times for every node.
_RUNNING, _FAILED_RUN, _STOPPING = Phase.RUNNING, Phase.FAILED, Phase.STOPPING


def resolve_mode(flow: CompiledFlow, mode: str | None) -> Mode:
    """`mode` (the caller's: a Planner puts `PLANNER_MODE` first) beats the flow's `settings.mode`."""
    chosen = mode or flow.settings.mode
    for known in MODES:
        if chosen == known:
            return known
    raise FlowInputError(f"unknown mode {chosen!r} (choose eager, layered or sequential)", flow=flow.name)


def bind_inputs(flow: CompiledFlow, given: dict[str, Any]) -> dict[str, Any]:
    """Check the inputs against the flow's declaration and fill defaults. Raises `FlowInputError`."""
    unknown = sorted(set(given) - set(flow.inputs))
    if unknown:
        hint = did_you_mean(unknown[0], [n for n in flow.inputs if n not in given]) or \
            f" (declared: {', '.join(flow.inputs) or 'none'})"
        raise FlowInputError(f"unknown input {unknown[0]!r}{hint}", flow=flow.name, input=unknown[0])
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


async def execute_checked(
    flow: CompiledFlow,
    bound: dict[str, BoundNode],
    values: dict[str, Any],
    mode: Mode,
    overrides: dict[str, Any] | None,
    observers: Sequence[RunObserver] = (),
    on_error: OnError = "default",
    recorder: RunRecorder | None = None,
) -> FlowResult:
    """Run `flow` once, for inputs already passed through `bind_inputs` and a mode from `resolve_mode`.

    `observers` hear of each node as it starts and settles; `recorder` (a Planner's `Metrics`) is
    given the run's `Ledger` once, when it ends. Returns the result or raises `FlowFailed` (or one
    of its kinds) or `FlowTimeout`, carrying it."""
    return await _Run(flow, bound, values, mode, overrides or {}, observers, on_error, recorder).main()


class _Run:
    """The state of one run. Every node ends in `results` exactly once, through `_settle`."""

    __slots__ = ("flow", "bound", "values", "mode", "overrides", "observers", "recorder", "run_id", "loop", "t0",
                 "active", "ready", "results", "tasks", "started", "attempts", "served_args", "limit", "queue", "released",
                 "outstanding", "wake", "phase", "failed_node", "eager", "release", "on_error", "degraded")

    def __init__(self, flow: CompiledFlow, bound: dict[str, BoundNode], values: dict[str, Any], mode: Mode,
                 overrides: dict[str, Any], observers: Sequence[RunObserver], on_error: OnError = "default",
                 recorder: RunRecorder | None = None) -> None:
        self.flow, self.bound, self.values, self.mode, self.overrides = flow, bound, values, mode, overrides
        self.observers, self.recorder = observers, recorder
        self.on_error = on_error
        self.degraded = False  # a node was settled by its default after a failure
        self.run_id = f"{_RUN_PREFIX}-{next(_run_ids)}"
        self.loop = asyncio.get_running_loop()
        self.t0 = _monotonic()  # the loop's clock (asyncio's loop.time() is time.monotonic())
        if overrides:
            self.active: Iterable[str] = _needed(flow, overrides)
            waiting = {n: 0 if n in overrides else sum(1 for d in flow.nodes[n].deps if d in self.active)
                       for n in self.active}
        else:
            self.active = flow.nodes.keys()
            waiting = flow.indegree.copy()
        self.ready = Ready(flow.successors, waiting)
        # Plain records while nodes run; the Ledger builds NodeResults from them at the end (if asked).
        self.results: dict[str, Record] = {}
        self.tasks: dict[asyncio.Task[Any], str] = {}  # running node tasks -> their node
        self.started: dict[str, float] = {}
        self.attempts: dict[str, int] = {}
        self.served_args: dict[str, Any] = {}  # args of started nodes whose kind reports how it was served
        self.limit = flow.settings.max_concurrency or 1 << 30
        self.queue: deque[tuple[BoundNode, Any]] = deque()  # ready with their args, waiting for max_concurrency
        self.released: deque[str] = deque()
        self.outstanding = 0
        self.wake: asyncio.Future[None] = self.loop.create_future()
        self.phase = _RUNNING
        self.failed_node: str | None = None
        self.eager = mode == "eager"
        self.release = self.released.append if self.eager else None  # what `Ready.done` hands released nodes

    async def main(self) -> FlowResult:
        timed_out = cancelled = False
        output: Any = None
        bad_output: str | None = None  # an `output:` entry that is a bug in the flow (on_bug: fail)
        for observer in self.observers:
            observer.run_started(self.flow.name, self.run_id, self.mode)
        # Node tasks copy the context they are created in: sequential runs reach the backend
        # marked, and their queries are never shared with other runs'.
        sequential = SEQUENTIAL.set(True) if self.mode == "sequential" else None
        # Compiled groups (`planner.compile`) serve this run unless it is sequential or overrides nodes.
        groups = RUN_GROUPS.set({}) if sequential is None and not self.overrides else None
        try:
            deadline = self.flow.settings.timeout
            if deadline is None:  # `asyncio.timeout(None)` would still cost a few microseconds a run
                await self._nodes()
            else:
                async with asyncio.timeout(deadline):
                    await self._nodes()
        except TimeoutError:
            timed_out = True
        except asyncio.CancelledError:
            cancelled = True  # the caller gave up (a client gone, a shutdown): no answer, and not an "ok" run
            raise
        finally:
            if sequential is not None:
                SEQUENTIAL.reset(sequential)
            if groups is not None:
                RUN_GROUPS.reset(groups)
            await self._stop()
            if not timed_out and not cancelled and self.phase is _RUNNING:
                # Before anyone hears the status: a bad output fails the run.
                output, bad_output = flow_output(self.flow, self.values, self.results, self.run_id)
            status = ("timeout" if timed_out else "cancelled" if cancelled
                      else "failed" if self.phase is _FAILED_RUN or bad_output else "ok")
            ledger = Ledger(self.flow, self.bound, self.run_id, self.mode, self.results, self.started, self.attempts,
                            self.served_args, degraded=self.degraded, failed_node=self.failed_node, on_error=self.on_error,
                            status=status, elapsed_ms=self._now())
            if self.recorder is not None:
                self.recorder.run_ended(ledger)  # the nodes settled so far; not those `finish` adds
            for observer in self.observers:
                observer.run_finished(self.flow.name, self.run_id, status)
        return ledger.finish(self.active, output, bad_output)

    async def _nodes(self) -> None:
        """Run the nodes: eager releases the roots and waits for the last settlement; the other
        modes release one group (or node) at a time."""
        if self.eager:
            await self._release(self.ready.roots(self.flow.order), self.ready.unsettled)
        else:
            await self._gated(self.flow.groups if self.mode == "layered" else [(n,) for n in self.flow.order])

    async def _release(self, names: Iterable[str], outstanding: int) -> None:
        """Start `names` and wait until `outstanding` more nodes have settled (or the run stops)."""
        self.outstanding = outstanding
        if self.wake.done():
            self.wake = self.loop.create_future()
        self.released.extend(names)
        self._drain()
        if self.outstanding > 0 and self.phase is _RUNNING:
            await self.wake

    async def _gated(self, steps: Sequence[Sequence[str]]) -> None:
        ready = self.ready
        for step in steps:
            names = [n for n in step if n in ready]
            if names:
                await self._release(names, len(names))
            if self.phase is not _RUNNING:
                return

    # --- starting nodes -----------------------------------------------------------------

    def _drain(self) -> None:
        """Start every released node (iteratively: a long chain of skips must not recurse)."""
        released = self.released
        while released and self.phase is _RUNNING:
            self._start(released.popleft())

    def _start(self, name: str) -> None:
        if self.overrides and name in self.overrides:
            self._settle(name, _OK, self.overrides[name], None)
            return
        node, values = self.bound[name], self.values
        try:
            if node.spec.when is None:  # `policy.prepare`'s common case, inlined: this runs for every node
                try:
                    args = node.args(values)
                except Exception:  # prepare says what it means (a skip, or which NodeError); args are pure
                    args = policy.prepare(node, values)
            else:
                args = policy.prepare(node, values)
        except NodeError as exc:
            self.started[name] = self._now()
            self._failed(name, exc)
            return
        if args is policy.SKIP:
            self._settle(name, _SKIPPED, policy.copy_default(node.spec.default), None)
        elif len(self.tasks) >= self.limit:
            self.queue.append((node, args))
        else:
            self._launch(node, args)

    def _launch(self, node: BoundNode, args: Any) -> None:
        name = node.spec.name
        self.started[name] = (_monotonic() - self.t0) * 1000.0
        if node.bare:
            coro = node.run(args)  # the fast path: no wrapper coroutine at all
        else:
            coro = policy.attempts(node, args, partial(self.attempts.__setitem__, name), self.flow.name, self.run_id)
        if node.served is not None:
            self.served_args[name] = args
        if self.observers:
            for observer in self.observers:
                coro = observer.node_started(self.flow.name, self.run_id, name, node.spec.kind, coro)
        task = self.loop.create_task(coro)
        self.tasks[task] = name
        # A method bound here, not one kept on the run (a reference cycle: every finished run would
        # wait for the cyclic GC instead of being freed at once); the task tells the node.
        task.add_done_callback(self._on_done)

    # --- settling nodes -----------------------------------------------------------------

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        name = self.tasks.pop(task)
        try:
            value = task.result()
        except asyncio.CancelledError:
            if self.phase is _RUNNING:  # not cancelled by the run: the node cancelled itself
                self._failed(name, NodeError("the node's own code raised CancelledError"))
            else:
                self._settle(name, _CANCELLED, None, None)
        except Exception as exc:
            self._failed(name, exc)
        else:
            self._settle(name, _OK, value, None)
        if self.queue and self.phase is _RUNNING:
            self._launch(*self.queue.popleft())
        released = self.released
        while released and self.phase is _RUNNING:  # `_drain`, inlined: this runs for every node
            self._start(released.popleft())

    def _failed(self, name: str, error: BaseException) -> None:
        spec = self.flow.nodes[name]
        if policy.fails_run(spec, error, self.on_error):
            self._settle(name, _FAILED, None, error)
            if self.phase is _RUNNING:
                self.phase, self.failed_node = _FAILED_RUN, name
                self._cancel_all()
                self._wake()
            return
        policy.log_defaulted(self.flow.name, name, self.run_id, error)
        self.degraded = True
        self._settle(name, _DEFAULTED, policy.copy_default(spec.default), error)

    def _settle(self, name: str, state: NodeState, value: Any, error: BaseException | None) -> None:
        # A record, not a NodeResult: those are built only if the caller reads `result.nodes`.
        self.results[name] = (state, value, error, self.started.get(name), (_monotonic() - self.t0) * 1000.0)
        self.values[name] = value
        if self.observers:
            self._observe_settled(name)
        if self.phase is not _RUNNING:
            return
        self.ready.done(name, self.release)
        self.outstanding -= 1
        if self.outstanding == 0:
            self._wake()

    def _observe_settled(self, name: str) -> None:
        result = node_result(self.results[name], self.bound[name], self.served_args.get(name), self.attempts.get(name, 1))
        for observer in self.observers:
            observer.node_settled(self.flow.name, self.run_id, name, result)

    def _wake(self) -> None:
        if not self.wake.done():
            self.wake.set_result(None)

    # --- stopping -----------------------------------------------------------------------

    def _cancel_all(self) -> None:
        self.released.clear()
        self.queue.clear()
        for task in self.tasks:
            task.cancel()

    async def _stop(self) -> None:
        """Cancel what is still in flight and wait until every node task has finished."""
        if not self.tasks:
            return
        if self.phase is _RUNNING:
            self.phase = _STOPPING  # successors must not start while we wind down
        self._cancel_all()
        pending = list(self.tasks)
        try:
            _, stuck = await asyncio.wait(pending, timeout=STOP_GRACE_S)
        except asyncio.CancelledError:
            await asyncio.wait(pending, timeout=STOP_GRACE_S)  # cancelled again while cleaning up
            raise
        if stuck:
            # A node that swallows cancellation must not keep the run going past its deadline.
            names = sorted(self.tasks[task] for task in stuck)
            logger.error("flow %s: %d node(s) ignored cancellation and were left running: %s", self.flow.name,
                         len(stuck), ", ".join(names), extra={"flow": self.flow.name, "run_id": self.run_id})

    def _now(self) -> float:
        return (_monotonic() - self.t0) * 1000.0


def _needed(flow: CompiledFlow, overrides: dict[str, Any]) -> set[str]:
    """The nodes a run with `overrides` must settle: overridden ones, and what the rest needs."""
    unknown = sorted(set(overrides) - set(flow.nodes))
    if unknown:
        raise FlowInputError(f"override of unknown node {unknown[0]!r}{did_you_mean(unknown[0], flow.nodes)}",
                             flow=flow.name)
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
