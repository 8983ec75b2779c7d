"""OpenTelemetry spans, when `opentelemetry-api` is installed and an SDK is configured.

A run is a `planner.flow <name>` span; each node that runs is a `planner.node <name>` child with
`planner.node.kind` and `planner.node.outcome` (ok, defaulted, failed, cancelled), so asyncpg's
own CLIENT spans (opentelemetry-instrumentation-asyncpg) nest under the node that sent them.
Parameters are never recorded. Without an SDK nothing is created: the check is one
`isinstance` per run.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
except ImportError:  # pragma: no cover - the `otel` extra is optional
    trace = None  # type: ignore[assignment]
    otel_context = None  # type: ignore[assignment]


_proxy_seen = False  # `get_tracer_provider()` has answered with the API's stand-in


def tracer() -> Any | None:
    """planner's tracer, or None when no SDK is configured (the API alone records nothing)."""
    global _proxy_seen
    if trace is None:
        return None
    # Asked on every run. While no provider is set, `get_tracer_provider()` looks the environment
    # up each time (a missing key: several microseconds); once it has answered with its stand-in,
    # the API's own global (private: read with a fallback to the full check) says whether a
    # provider was set since.
    if _proxy_seen and getattr(trace, "_TRACER_PROVIDER", True) is None:
        return None
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        _proxy_seen = True
        return None
    return trace.get_tracer("planner")


def start_flow(t: Any, flow: str, mode: str, run_id: str) -> Any:
    """The `planner.flow <name>` span of one run."""
    return t.start_span(f"planner.flow {flow}", attributes={"planner.flow": flow, "planner.mode": mode, "planner.run_id": run_id})


def start_node(t: Any, parent: Any, flow: str, node: str, kind: str) -> Any:
    """The `planner.node <name>` span of one node, a child of its run's span."""
    return t.start_span(f"planner.node {node}", context=trace.set_span_in_context(parent),
                        attributes={"planner.flow": flow, "planner.node": node, "planner.node.kind": kind})


def within(span: Any, coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any]:
    """Run `coro` with `span` current, so the spans it makes (asyncpg's) are its children."""

    async def run() -> Any:
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            return await coro
        finally:
            otel_context.detach(token)

    return run()


def end_node(span: Any, outcome: str, error: BaseException | None) -> None:
    """End a node's span with its outcome; an error is recorded on it and makes it ERROR."""
    span.set_attribute("planner.node.outcome", outcome)
    if error is not None:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
    span.end()


def end_flow(span: Any, status: str) -> None:
    """End a run's span with its status; any status but ok makes it ERROR."""
    span.set_attribute("planner.flow.status", status)
    if status != "ok":
        span.set_status(trace.Status(trace.StatusCode.ERROR, status))
    span.end()
