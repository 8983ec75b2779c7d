"""The account of a finished run: what each node settled to, turned into what the caller reads.

While nodes run, the executor only writes plain tables (one record tuple per settled node, start
times, attempt counts, the arguments of SQL nodes): nothing per node is built on the hot path. When
the run ends, a `Ledger` over those tables is what the rest is made from: the `FlowResult` (its
`nodes` built only if read), the error a failed or timed-out run raises, and the figures `Metrics`
records, once per run rather than once per node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from planner.errors import FlowFailed, FlowNotFound, FlowTimeout, NotFound
from planner.graph import CompiledFlow
from planner.kinds import BoundNode
from planner.lang.models import OnError
from planner.lang.refs import Unresolved
from planner.results import FlowResult, NodeResult, NodeState, Served, bug_reason
from planner.run import policy

logger = logging.getLogger("planner")

Record = tuple[NodeState, Any, BaseException | None, float | None, float | None]
"""A settled node: (state, value, error, started_ms, finished_ms); times from the start of the run."""


class Ledger:
    """The tables of one finished run, and what is built from them.

    `records` holds the nodes that settled while the run went on, in the order they settled;
    `finish` adds those that never did (cancelled before they started) before the result is built.
    """

    __slots__ = ("flow", "bound", "run_id", "mode", "records", "started", "attempts", "served_args", "degraded",
                 "failed_node", "on_error", "status", "elapsed_ms")

    def __init__(self, flow: CompiledFlow, bound: Mapping[str, BoundNode], run_id: str, mode: str,
                 records: dict[str, Record], started: dict[str, float], attempts: dict[str, int],
                 served_args: dict[str, Any], *, degraded: bool, failed_node: str | None, on_error: OnError,
                 status: str, elapsed_ms: float) -> None:
        self.flow, self.bound, self.run_id, self.mode = flow, bound, run_id, mode
        self.records, self.started, self.attempts, self.served_args = records, started, attempts, served_args
        self.degraded, self.failed_node, self.on_error = degraded, failed_node, on_error
        self.status = status  # ok, failed or timeout (as FlowResult.status); cancelled: the caller gave up (no result)
        self.elapsed_ms = elapsed_ms

    def node_result(self, name: str) -> NodeResult:
        """The `NodeResult` of a settled node."""
        return node_result(self.records[name], self.bound[name], self.served_args.get(name), self.attempts.get(name, 1))

    def node_results(self) -> dict[str, NodeResult]:
        """Every node's `NodeResult`, in the flow's order."""
        records = self.records
        return {name: self.node_result(name) for name in self.flow.order if name in records}

    def failed_error(self) -> BaseException | None:
        """The error of the node that failed the run (None when none did)."""
        return self.records[self.failed_node][2] if self.failed_node is not None else None

    def served(self) -> Iterator[tuple[str, Served, int]]:
        """(node, how it was served, attempts) for each SQL node that was started and settled."""
        records, bound, attempts = self.records, self.bound, self.attempts
        for name, args in self.served_args.items():
            if name in records:
                served = bound[name].served(args)  # type: ignore[misc]
                if served is not None:
                    yield name, served, attempts.get(name, 1)

    def finish(self, active: Iterable[str], output: Any, bad_output: str | None) -> FlowResult:
        """The run's `FlowResult`; raises `FlowTimeout`, `FlowFailed` (or one of its kinds) carrying it."""
        records, started, cancelled = self.records, self.started, NodeState.CANCELLED
        for name in active:
            if name not in records:
                records[name] = (cancelled, None, None, started.get(name), None)
        status, name = self.status, self.flow.name
        result = FlowResult(name, self.run_id, self.mode, status, self.node_results,
                            output if status == "ok" else None, self.elapsed_ms, degraded=self.degraded)
        if status == "timeout":
            raise FlowTimeout(f"flow {name!r} hit its deadline of {self.flow.settings.timeout:g}s", result=result)
        if status != "failed":
            return result
        failed = self.failed_node
        if bad_output is not None and failed is None:
            raise FlowFailed(f"flow {name!r} failed: {bad_output} (looks like a bug in the flow "
                             f"({bug_reason(None)}): it fails the run; settings: {{on_bug: default}} makes the entry "
                             "null instead)", result=result)
        error = self.failed_error()
        message = f"flow {name!r} failed: node {failed!r}: {error}"
        if failed is not None and policy.failed_as_bug(self.flow.nodes[failed], error, self.on_error):
            message += (f" (looks like a bug in the flow ({bug_reason(error)}): such an error fails the run "
                        "whatever on_error says; on_bug: default lets the node default)")
        if getattr(error, "database_unavailable", False):  # the database went away, not a bug: a 503
            from planner.errors import FlowDatabaseLost

            raise FlowDatabaseLost(message, result=result, cause=error)
        if isinstance(error, NotFound):  # a row the flow requires is not there: a 404
            raise FlowNotFound(message, result=result, cause=error)
        raise FlowFailed(message, result=result)


def node_result(record: Record, node: BoundNode, args: Any, attempts: int) -> NodeResult:
    """A settled node's `NodeResult` from its record, the arguments it was started with (kept for
    nodes whose kind reports how they were served) and its attempts (if it started)."""
    state, value, error, started, finished = record
    served = node.served(args) if args is not None and node.served is not None else None
    return NodeResult(state, value, error, 0 if started is None else attempts, started, finished, served)


def flow_output(flow: CompiledFlow, values: dict[str, Any], settled: Mapping[str, Any],
                run_id: str) -> tuple[Any, str | None]:
    """The run's `output`, and what makes it a bug in the flow (None when nothing does).

    Everything has run (and written): an entry that walks into null is null, not a failure. A
    missing field is a typo: a bug in the flow, which fails the run unless the flow says
    `on_bug: default` (then a warning and a null)."""
    if flow.output_getters is None:
        return {name: values[name] for name in flow.order if name in settled}, None
    output: dict[str, Any] = {}
    bad: str | None = None
    for key, get in flow.output_getters.items():
        try:
            output[key] = get(values)
        except Unresolved:
            output[key] = None
        except LookupError as exc:
            if flow.settings.on_bug == "fail":
                bad = bad or f"output {key!r}: {exc}"
            else:
                logger.warning("flow %s: output %s: %s", flow.name, key, exc,
                               extra={"flow": flow.name, "run_id": run_id, "bug": True})
            output[key] = None
    return output, bad
