"""A node compiled once and run many times: plain frozen data, no I/O.

`planner.graph` makes these from the validated models (each kind compiling its own part);
the kinds bind them to what runs them; the database backends read their SQL fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from planner.lang.expr import Expr
from planner.lang.models import OnError
from planner.lang.refs import CompiledSql, Ref

KindName = Literal["sql", "call"]
Fetch = Literal["one", "all", "value", "none", "records"]  # records: the driver's rows, for compiled groups only
FETCHES: tuple[Fetch, ...] = ("one", "all", "value", "none")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 1
    backoff: float = 0.0
    on_any: bool = False


@dataclass(frozen=True, slots=True)
class CompiledNode:
    """One node, ready to run: references parsed, dependencies known."""

    name: str
    kind: KindName
    index: int
    deps: tuple[str, ...]
    refs: tuple[Ref, ...]
    when: Expr | None
    default: Any
    # What a failure does: written on the node, implied by `required: true` (fail), else the
    # flow's `settings.on_error`; None leaves it to the Planner's `on_error=` at run time.
    on_error: OnError | None
    timeout: float | None
    retry: RetryPolicy
    latency: float | None
    flow: str = ""  # the flow's name (the cache keys values by flow and node)
    bug_fails: bool = True  # `on_bug: fail`: an error meaning the flow is wrong fails the run whatever on_error says
    invalidates: tuple[str, ...] = ()  # cached nodes of this flow whose values are dropped when this one is ok
    # sql
    statements: tuple[CompiledSql, ...] = ()
    fetch: Fetch = "all"
    required: bool = False  # `fetch: one` with `required: true`: no row is the node's error (`NotFound`)
    read_only: bool = False  # one statement, proven to write nothing (see `planner.lang.sqlinfo`)
    session: bool = False  # may change its connection's session (reset before reuse)
    functions: frozenset[str] = frozenset()  # functions it calls, as written (the catalog judges them)
    coalesce: bool = False  # may share one statement with other runs' (read-only, and not turned off)
    coalesce_writes: bool = False  # `coalesce: true`: may share one even when it is not proven pure
    fuse: bool = False  # may share one statement with sibling reads of its own run
    cache_ttl: float | None = None  # `cache:` in seconds (read-only nodes only; see `planner.db.cache`)
    replica: bool = False  # may be answered by a read replica (see `replica_routes`)
    compile: bool = False  # may be sent in one statement with the SQL nodes around it (`planner.compile`)
    # The statements of the SQL nodes it follows: with `replica`, each must be proven pure by the
    # server's catalog before this node reads the replica (read-your-writes, `planner.lang.effects`).
    replica_after: tuple[str, ...] = ()
    # call
    call: str = ""
    args: dict[str, Any] = field(default_factory=dict)
