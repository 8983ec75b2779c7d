"""Observers: what watches a run without steering it (telemetry, and anything a service adds).

An observer is told when a run starts and ends, and when each node starts and settles; it
may also wrap a node's coroutine (to make a span current while it runs). The executor calls
them only when there are any, so a run without observers pays one truth test per node.

A recorder (`Metrics`) needs no news while the run goes on: it is handed the run's `Ledger` once,
when the run ends, and counts every node from it in one pass (per-node hooks cost several
microseconds a node, which a zero-latency node pays in full).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from planner.run import telemetry

if TYPE_CHECKING:
    from planner.results import NodeResult
    from planner.run.ledger import Ledger


class RunObserver(Protocol):
    """Hooks of one run. `flow`, `run_id` and `node` name what is observed."""

    def run_started(self, flow: str, run_id: str, mode: str) -> None:
        """The run began, in `mode` (eager, layered or sequential), before any node starts."""
        ...

    def node_started(self, flow: str, run_id: str, node: str, kind: str,
                     coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any]:
        """Return the coroutine the node's task awaits, every attempt of it included (the given
        one, or a wrapper around it)."""
        ...

    def node_settled(self, flow: str, run_id: str, node: str, result: NodeResult) -> None:
        """The node has its final state (ok, defaulted, skipped, failed, cancelled)."""
        ...

    def run_finished(self, flow: str, run_id: str, status: str) -> None:
        """The run ended with `status` (`FlowResult.status`), every node settled."""
        ...


class RunRecorder(Protocol):
    """Told of each run once, when it ends (after its nodes settled, before it returns or raises)."""

    def run_ended(self, ledger: Ledger) -> None: ...


class Telemetry:
    """OpenTelemetry spans: a `planner.flow` span per run, a `planner.node` child per node that runs."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.flows: dict[str, Any] = {}
        self.nodes: dict[tuple[str, str], Any] = {}

    def run_started(self, flow: str, run_id: str, mode: str) -> None:
        self.flows[run_id] = telemetry.start_flow(self.tracer, flow, mode, run_id)

    def node_started(self, flow: str, run_id: str, node: str, kind: str,
                     coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any]:
        span = self.nodes[run_id, node] = telemetry.start_node(self.tracer, self.flows[run_id], flow, node, kind)
        return telemetry.within(span, coro)

    def node_settled(self, flow: str, run_id: str, node: str, result: NodeResult) -> None:
        span = self.nodes.pop((run_id, node), None)
        if span is not None:
            telemetry.end_node(span, result.state.value, result.error)

    def run_finished(self, flow: str, run_id: str, status: str) -> None:
        span = self.flows.pop(run_id, None)
        if span is not None:
            telemetry.end_flow(span, status)


def default_observers() -> tuple[RunObserver, ...]:
    """Telemetry when an OpenTelemetry SDK is configured; nothing otherwise."""
    tracer = telemetry.tracer()
    return (Telemetry(tracer),) if tracer is not None else ()
