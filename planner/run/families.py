"""planner's metric families: each one's Prometheus and OpenTelemetry names, unit, kind, help,
labels and buckets, the one table `planner.run.metrics` records into and exposes (and the docs'
table in docs/service.md follows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COUNTS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256, 500)

Kind = Literal["counter", "histogram", "gauge"]
Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, Labels, float]
"""A value read from a source when metrics are collected: (family name, labels, value)."""


@dataclass(frozen=True)
class Family:
    """One metric: its Prometheus name, OpenTelemetry name and unit, kind, help and labels."""

    name: str  # Prometheus name (with `_total` or the unit's suffix)
    otel: str  # OpenTelemetry name (dots; the unit apart)
    unit: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


FAMILIES: tuple[Family, ...] = (
    # Runs, from the executor (the observer hooks).
    Family("planner_flow_runs_total", "planner.flow.runs", "{run}", "counter",
           "Runs by flow and status: ok; failed, not_found (a required row missing), unavailable (the database "
           "unreachable or lost), timeout; invalid_input (refused before any node ran); cancelled (the caller "
           "cancelled the run: no answer).",
           ("flow", "status")),
    Family("planner_flow_runs_degraded_total", "planner.flow.runs.degraded", "{run}", "counter",
           "Runs that ended ok with at least one node settled by its default (an answer built on a fallback).",
           ("flow",)),
    Family("planner_node_outcomes_total", "planner.node.outcomes", "{node}", "counter",
           "Settled nodes by flow, node and outcome (ok, defaulted, skipped, failed, cancelled).",
           ("flow", "node", "outcome")),
    Family("planner_flow_duration_seconds", "planner.flow.duration", "s", "histogram",
           "How long runs took, by flow and status.", ("flow", "status"), SECONDS),
    Family("planner_node_duration_seconds", "planner.node.duration", "s", "histogram",
           "How long nodes that ran took (every attempt included), by flow, node and outcome.",
           ("flow", "node", "outcome"), SECONDS),
    Family("planner_flow_statements", "planner.flow.statements", "{statement}", "histogram",
           "Statements a run's SQL nodes sent (every attempt; none for a cache hit; shared ones counted for each run).",
           ("flow",), COUNTS),
    Family("planner_flow_round_trips", "planner.flow.round_trips", "{round_trip}", "histogram",
           "Round trips a run waited for: a fused group is one, a statement list adds BEGIN and COMMIT, a cache hit none.",
           ("flow",), COUNTS),
    Family("planner_node_batch_runs", "planner.node.batch_runs", "{run}", "histogram",
           "How many runs shared the statement that answered an SQL node (1: alone).", ("flow", "node"), COUNTS),
    Family("planner_node_fused_nodes", "planner.node.fused_nodes", "{node}", "histogram",
           "How many nodes of one run shared the statement that answered an SQL node (1: not fused).",
           ("flow", "node"), COUNTS),
    # The pools (PoolBackend): one timed wait per statement, the rest read when collected.
    Family("planner_pool_wait_seconds", "planner.pool.wait", "s", "histogram",
           "How long statements waited for a pooled connection.", ("pool",), SECONDS),
    Family("planner_pool_connections", "planner.pool.connections", "{connection}", "gauge",
           "Connections of planner's pools: in_use (held by a statement), max (the pool's size).",
           ("pool", "state")),
    Family("planner_pool_waiting", "planner.pool.waiting", "{statement}", "gauge",
           "Statements waiting for a pooled connection now.", ("pool",)),
    # The cache (CacheBackend.stats()).
    Family("planner_cache_hits_total", "planner.cache.hits", "{query}", "counter",
           "cache: nodes answered from memory (no statement sent).", ()),
    Family("planner_cache_misses_total", "planner.cache.misses", "{query}", "counter",
           "cache: nodes that sent their statement.", ()),
    Family("planner_cache_invalidations_total", "planner.cache.invalidations", "{request}", "counter",
           "Invalidation requests (invalidate(), invalidates:).", ()),
    Family("planner_cache_entries", "planner.cache.entries", "{entry}", "gauge",
           "Values the cache keeps now.", ()),
    # Sync call: nodes (CallThreads).
    Family("planner_call_wait_seconds", "planner.call.wait", "s", "histogram",
           "How long sync call: nodes waited for a thread.", (), SECONDS),
    Family("planner_call_threads", "planner.call.threads", "{thread}", "gauge",
           "Threads for sync call: nodes: busy, abandoned (running a call that timed out), max; queued: calls waiting for one.",
           ("state",)),
    Family("planner_call_rejected_total", "planner.call.rejected", "{call}", "counter",
           "Sync calls that never started for want of a thread (the node failed or defaulted).", ()),
)
BY_NAME = {family.name: family for family in FAMILIES}
