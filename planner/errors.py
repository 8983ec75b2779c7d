"""The exceptions planner raises, all under one base.

    FlowError
     ├── FlowFileError      a flow file that does not load: YAML, schema, references, call targets
     │    └── FlowGraphError     unknown references, cycles (the cycle is spelled out)
     ├── FlowInputError     inputs that do not match the flow's declared inputs
     ├── DatabaseUnavailable  the pool could not be opened (no node ran)
     ├── FlowFailed         a run failed (an `on_error: fail` node failed); `.result` is the partial result
     │    └── FlowTimeout        the run hit its deadline
     └── NodeError          the error kept on a node's result (`NodeResult.error`)
          ├── NodeTimeout        the node exceeded its timeout
          ├── QueryError         the database refused or lost a statement (`.sqlstate`, `.transient`)
          └── ReferenceFieldError  `$node.field` named a field the upstream value does not have

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
    "FlowError",
    "FlowFailed",
    "FlowFileError",
    "FlowGraphError",
    "FlowInputError",
    "FlowTimeout",
    "NodeError",
    "NodeTimeout",
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
    """The database could not be reached when the pool was first opened; no node ran.

    Once a pool is open, a lost connection is a node's (transient) error instead, settled by
    the node's `retry` and `on_error`.
    """


class FlowFailed(FlowError):
    """A run failed: a node with `on_error: fail` failed. `.result` holds the partial result."""

    def __init__(self, message: str, *, result: FlowResult) -> None:
        self.result = result
        super().__init__(message)


class FlowTimeout(FlowFailed):
    """A run hit its deadline (`settings.timeout`); unfinished nodes are `cancelled`."""


class NodeError(FlowError):
    """An error kept on a node's result; `.__cause__` is the original exception, if any."""

    transient = False


class NodeTimeout(NodeError):
    """The node did not finish within its timeout."""


class QueryError(NodeError):
    """The database refused or lost a statement. `.sqlstate` is PostgreSQL's code, when it sent
    one; `.position` the 1-based character of the statement it points at, when it did."""

    def __init__(self, message: str, *, sqlstate: str | None = None, transient: bool = False,
                 position: int | None = None) -> None:
        self.sqlstate = sqlstate
        self.transient = transient
        self.position = position
        super().__init__(message)


class ReferenceFieldError(NodeError):
    """`$node.field` named a field that the upstream (non-null) value does not have: a typo."""
