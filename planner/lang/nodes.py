"""A node compiled once and run many times: plain frozen data, no I/O.

`planner.graph` makes these from the validated models; each kind (`planner.kinds`) builds its
node's *body*, the part only that kind has: an `SqlBody` for `sql:`, a `CallBody` for `call:`.
The body types live here, below `planner.kinds`, because they are data every layer above
reads (the database backends read an `SqlBody`); what they mean (binding, checks, pictures)
lives with the kind. A layer that needs the SQL a node sends asks `CompiledNode.sql`, which is
empty (`NO_SQL`) for a node that sends none, and never branches on a kind's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from planner.lang.expr import Expr
from planner.lang.models import OnError
from planner.lang.refs import CompiledSql, Ref

KindName = Literal["sql", "call"]
Fetch = Literal["one", "all", "value", "none", "records"]  # records: the driver's rows, for compiled groups only


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 1
    backoff: float = 0.0
    on_any: bool = False


@dataclass(frozen=True, slots=True)
class SqlBody:
    """What an `sql:` node sends: its statements, how it fetches, and what it may share."""

    kind: ClassVar[KindName] = "sql"
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
    replica_allowed: bool = False  # its author allows a replica (`replica:`, on by default); see `replica`
    replica: bool = False  # may be answered by a read replica (decided by `planner.graph.replica_routes`)
    compile: bool = False  # may be sent in one statement with the SQL nodes around it (`planner.compile`)
    # The statements of the SQL nodes it follows: with `replica`, each must be proven pure by the
    # server's catalog before this node reads the replica (read-your-writes, `planner.lang.effects`).
    replica_after: tuple[str, ...] = ()

    @property
    def refs(self) -> tuple[Ref, ...]:
        """The references its statements bind, in order."""
        return tuple(ref for s in self.statements for ref in s.params)

    @property
    def sql(self) -> SqlBody:
        return self


NO_SQL = SqlBody(fetch="none")
"""The SQL of a node that sends none itself (a `call:`): no statements, shares nothing."""


@dataclass(frozen=True, slots=True)
class CallBody:
    """What a `call:` node calls: a function named on the allow-list, and its `with:` template."""

    kind: ClassVar[KindName] = "call"
    target: str
    args: dict[str, Any] = field(default_factory=dict)
    refs: tuple[Ref, ...] = ()  # the references `with:` holds

    @property
    def sql(self) -> SqlBody:
        return NO_SQL  # its function may use the pool it is given; planner sends nothing for it


Body = SqlBody | CallBody
"""A kind's part of a compiled node (one type per kind in `planner.kinds.KINDS`)."""


@dataclass(frozen=True, slots=True)
class CompiledNode:
    """One node, ready to run: references parsed, dependencies known, its kind's `body`."""

    name: str
    index: int
    deps: tuple[str, ...]
    refs: tuple[Ref, ...]  # the body's, then `when:`'s, each once
    when: Expr | None
    default: Any
    # What a failure does: written on the node, implied by `required: true` (fail), else the
    # flow's `settings.on_error`; None leaves it to the Planner's `on_error=` at run time.
    on_error: OnError | None
    timeout: float | None
    retry: RetryPolicy
    latency: float | None
    body: Body
    flow: str = ""  # the flow's name (the cache keys values by flow and node)
    bug_fails: bool = True  # `on_bug: fail`: an error meaning the flow is wrong fails the run whatever on_error says
    invalidates: tuple[str, ...] = ()  # cached nodes of this flow whose values are dropped when this one is ok
    # Read from the body once, into slots of their own: the database backends read `sql` for
    # every query, the executor's observers `kind` for every node.
    sql: SqlBody = field(init=False, repr=False, compare=False)  # the SQL it sends itself (`NO_SQL`: none)
    kind: KindName = field(init=False, repr=False, compare=False)  # its kind's name (`planner.kinds.kind_of`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sql", self.body.sql)
        object.__setattr__(self, "kind", self.body.kind)
