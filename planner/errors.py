"""The exceptions planner raises, all under one base.

    FlowError
     ├── FlowFileError      a flow file that does not load: YAML, schema, references, call targets
     │    └── FlowGraphError     unknown references, cycles (the cycle is spelled out)
     ├── FlowInputError     inputs that do not match the flow's declared inputs
     ├── DatabaseUnavailable  the database cannot be reached: the pool could not be opened (no node
     │    │                   ran), or no database is configured and the embedded fallback is off
     │    └── FlowDatabaseLost   (also a FlowFailed) a run failed because its database connection was lost
     ├── FlowFailed         a run failed (a node failed and its policy said fail); `.result` is the partial result
     │    ├── FlowTimeout        the run hit its deadline
     │    ├── FlowDatabaseLost   the failed node lost its connection: `except DatabaseUnavailable` (a 503)
     │    └── FlowNotFound       the failed node's error is `NotFound`: `except NotFound` (a 404)
     └── NodeError          the error kept on a node's result (`NodeResult.error`)
          ├── NodeTimeout        the node exceeded its timeout
          ├── QueryError         the database refused or lost a statement (`.sqlstate`, `.transient`, `.is_bug`)
          ├── ReferenceFieldError  `$node.field` named a field the upstream value does not have
          ├── NotFound           `fetch: one` with `required: true` found no row
          └── CallThreadsBusy    a sync `call:` waited for a thread as long as it could; it never started

`NodeError.is_bug` is true for errors that no retry can fix, because the flow itself is wrong: a
statement PostgreSQL refuses as written (SQLSTATE class 42: syntax, unknown table, column or
function; 3F000, an unknown schema) or a field the upstream value does not have. Such an error
fails the run whatever the node's `on_error` says, unless the flow says `on_bug: default`.

Context travels as keyword arguments (`file=`, `line=`, `node=`), as httpx does, and
`str(error)` always reads as one line that says where and what.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from planner.results import FlowResult

__all__ = [
    "DatabaseUnavailable",
    "FlowDatabaseLost",
    "FlowError",
    "FlowFailed",
    "FlowFileError",
    "FlowGraphError",
    "FlowInputError",
    "FlowNotFound",
    "FlowTimeout",
    "CallThreadsBusy",
    "NodeError",
    "NodeTimeout",
    "NotFound",
    "QueryError",
    "ReferenceFieldError",
]


class FlowError(Exception):
    """Base of every error planner raises on purpose."""


class FlowFileError(FlowError):
    """A flow file that cannot be loaded; names the file, the line and (when known) the node.

    The message reads `path:line:col: node 'x': what is wrong`, the form editors and CI
    annotations understand.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        column: int | None = None,
        node: str | None = None,
        code: str = "PLN100",
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.column = column
        self.node = node
        self.code = code
        # Every problem found at once, each with its own text and place (`planner validate`
        # reports each); this error's message is the first's and names the rest.
        self.problems: list[FlowFileError] = [self]
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.file or "<flow>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        what = f"node {self.node!r}: {self.message}" if self.node else self.message
        return f"{where}: {what}"


class FlowGraphError(FlowFileError):
    """Unknown references and cycles. For a cycle, `.cycle` lists it, first node repeated last."""

    def __init__(self, message: str, *, cycle: list[str] | None = None, **where: Any) -> None:
        self.cycle = cycle
        super().__init__(message, **where)


class FlowInputError(FlowError):
    """The inputs given to a run do not match the flow's declared inputs."""

    def __init__(self, message: str, *, flow: str | None = None, input: str | None = None) -> None:
        self.flow = flow
        self.input = input
        super().__init__(f"flow {flow!r}: {message}" if flow else message)


class DatabaseUnavailable(FlowError):
    """The database could not be reached when the pool was first opened (no node ran), or no
    database is configured and the embedded fallback is off (`embedded=False`, `PLANNER_EMBEDDED=0`).

    Once a pool is open, a lost connection is a node's (transient) error instead, settled by
    the node's `retry` and `on_error`; when it fails the run, the run raises `FlowDatabaseLost`,
    which is a `DatabaseUnavailable` too. A service answers both with a 503, not a 500.
    """


class FlowFailed(FlowError):
    """A run failed: a node failed and its policy said fail (`on_error: fail`, `required: true`, or
    an error that means the flow is wrong, see `NodeError.is_bug`). `.result` holds the partial result."""

    def __init__(self, message: str, *, result: FlowResult) -> None:
        self.result = result
        super().__init__(message)


class FlowTimeout(FlowFailed):
    """A run hit its deadline (`settings.timeout`); unfinished nodes are `cancelled`."""


class FlowDatabaseLost(FlowFailed, DatabaseUnavailable):
    """A run failed because the failed node lost its database connection (or the server refused
    new ones): the database, not the flow, is the problem.

    Both a `FlowFailed` (`.result` holds the partial result) and a `DatabaseUnavailable`, so that

        try:
            result = await planner.run("checkout", inputs)
        except DatabaseUnavailable:     # not reachable at start, or lost during the run
            return Response(status_code=503)

    tells an outage from a bug. `.cause` is the node's `QueryError`.
    """

    def __init__(self, message: str, *, result: FlowResult, cause: BaseException | None = None) -> None:
        self.cause = cause
        super().__init__(message, result=result)


class NodeError(FlowError):
    """An error kept on a node's result; `.__cause__` is the original exception, if any."""

    transient = False
    is_bug = False
    """True when retrying can never help because the flow itself is wrong (see the module docstring)."""


class NodeTimeout(NodeError):
    """The node did not finish within its timeout."""


# Lost or refused connections: the database (or the way to it) is down, not the statement wrong.
# Class 08 (connection exceptions), admin/crash shutdown, cannot connect now, too many connections.
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
# Class 42 but not the flow's fault: a missing privilege is the deployment's (a GRANT fixes it);
# a prepared statement that already exists is a transaction-mode pooler's (see `planner.db.translate`).
_NOT_A_BUG = frozenset({"42501", "42P05"})
# Outside class 42 but the flow's fault all the same: a schema that does not exist.
_ALSO_A_BUG = frozenset({"3F000"})


class QueryError(NodeError):
    """The database refused or lost a statement. `.sqlstate` is PostgreSQL's code, when it sent
    one; `.position` the 1-based character of the statement it points at, when it did."""

    def __init__(self, message: str, *, sqlstate: str | None = None, transient: bool = False,
                 position: int | None = None) -> None:
        self.sqlstate = sqlstate
        self.transient = transient
        self.position = position
        super().__init__(message)

    @property
    def is_bug(self) -> bool:  # type: ignore[override]  # a property over NodeError's class attribute
        """SQLSTATE class 42 (syntax error, undefined table, column or function, wrong types...)
        or 3F000 (an unknown schema): the statement can never succeed as written, so no retry will
        help. Insufficient privilege (42501) is left out: it is fixed by a GRANT, not by editing the
        flow; so is a duplicate prepared statement (42P05): a transaction-mode pooler's doing."""
        sqlstate = self.sqlstate
        if not isinstance(sqlstate, str):
            return False
        return (sqlstate.startswith("42") and sqlstate not in _NOT_A_BUG) or sqlstate in _ALSO_A_BUG

    @property
    def database_unavailable(self) -> bool:
        """The connection was lost or refused (not the statement): class 08, a server shutting
        down or not accepting connections, too many connections, or the socket itself."""
        if not self.transient:
            return False
        sqlstate = self.sqlstate
        return sqlstate is None or sqlstate.startswith("08") or sqlstate in _UNAVAILABLE_SQLSTATES


class ReferenceFieldError(NodeError):
    """`$node.field` named a field that the upstream (non-null) value does not have: a typo."""

    is_bug = True


class NotFound(NodeError):
    """`fetch: one` with `required: true` found no row. The node's `on_error` then defaults to
    fail, and the run raises `FlowNotFound`, which is a `NotFound` too: `except NotFound` -> 404."""


class FlowNotFound(FlowFailed, NotFound):
    """A run failed because its failed node found no row it requires (`NotFound`). Both a
    `FlowFailed` (`.result` holds the partial result) and a `NotFound`; `.cause` is the node's error."""

    def __init__(self, message: str, *, result: FlowResult, cause: BaseException | None = None) -> None:
        self.cause = cause
        super().__init__(message, result=result)


class CallThreadsBusy(NodeError):
    """A sync `call:` waited for one of the Planner's threads (`CallOptions.threads`) as long as it could
    (its node's timeout, else `CallOptions.wait`) and never started, or found the queue of waiting calls full.

    Transient: a retry may find a thread free. Every one is counted (`CallThreads.stats()`) and
    logged at WARNING; raise `CallOptions.threads` (or lower the load) when it happens."""

    transient = True
