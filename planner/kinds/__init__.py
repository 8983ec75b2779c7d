"""Node kinds: what a `sql:` or a `call:` node is, each in one module behind one protocol.

A kind builds its part of a compiled node, the *body* (`SqlBody`, `CallBody` in
`planner.lang.nodes`: the references it holds and its own fields), binds a compiled node to
what runs it, says whether it needs the database, how pictures draw it, what identifies its
work (a recording's hash), where its statements are written (the syntax check), and offers the
static checks `planner validate` runs. Everything else (graph, executor, compile, validate,
pictures, recordings, the database backends) asks the registry, the body or `CompiledNode.sql`,
and never branches on a kind's name nor reads a kind's own field through `getattr`
(`tests/kinds/test_kinds.py` scans for both), so an unknown kind is an error rather than a silent
fall into another kind's branch.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from planner.errors import FlowError
from planner.lang.nodes import Body, KindName

if TYPE_CHECKING:
    from planner.config import CallTargets
    from planner.errors import FlowFileError
    from planner.kinds.backend import Backend, Database
    from planner.kinds.call import CallThreads
    from planner.lang.loader import LoadedFlow
    from planner.lang.models import Settings
    from planner.lang.nodes import CompiledNode
    from planner.lang.safeyaml import Marks
    from planner.results import Served

NodeRun = Callable[[Any], Coroutine[Any, Any, Any]]
Where = tuple[str | int, ...]  # a place in a flow file, as `Marks` finds it: ("nodes", name, "sql", 0)


@dataclass(frozen=True, slots=True)
class BoundNode:
    """A node joined to its implementation: `args(values)` then `await run(args)`.

    `args` raises `Unresolved` (the node is skipped) or `LookupError` (a typo: it fails).
    `own_timeout` says `run` applies the node's timeout itself (SQL nodes time the query, not
    the wait for a connection, which only the run's deadline bounds). `served(args)` tells how
    the value was obtained (cache, batch), for kinds that know.
    """

    spec: CompiledNode
    args: Callable[[dict[str, Any]], Any]
    run: NodeRun
    own_timeout: bool = False
    served: Callable[[Any], Served | None] | None = None
    bare: bool = field(init=False, default=False)  # `run` needs no retry or timeout wrapper

    def __post_init__(self) -> None:
        spec = self.spec
        bare = spec.retry.attempts == 1 and (spec.timeout is None or self.own_timeout)
        object.__setattr__(self, "bare", bare)


@dataclass(frozen=True)
class BindEnv:
    """What binding needs: the allow-list, the database backend, the threads for sync calls, and
    the primary database a `call:` node's `db` parameter is handed the pool of (None: there is
    none, and such a call raises `DatabaseUnavailable`)."""

    targets: CallTargets
    backend: Backend
    threads: CallThreads | None = None
    database: Database | None = None


class NodeKind(Protocol):
    @property
    def name(self) -> KindName:
        """The YAML key that makes a node this kind."""

    @property
    def shape(self) -> Literal["box", "round"]:
        """How pictures draw it."""

    @property
    def model(self) -> type[Any]:
        """Its pydantic model in `planner.lang.models`."""

    @property
    def refs_at(self) -> str:
        """The key under which its references are written (errors point there)."""

    def compile(self, name: str, node: Any, marks: Marks, settings: Settings) -> Body:
        """Its body, from the validated model `node` and the flow's `settings`; raises `FlowFileError`."""

    def bind(self, spec: CompiledNode, marks: Marks, env: BindEnv) -> BoundNode: ...

    def needs_database(self, spec: CompiledNode) -> bool:
        """Whether binding it needs the database opened first."""

    def uses_database(self, spec: CompiledNode, targets: CallTargets) -> bool:
        """Whether a run of it reaches the database (a replay settles such nodes from a recording)."""

    def check(self, spec: CompiledNode, marks: Marks, env: BindEnv) -> list[FlowFileError]: ...

    def identity(self, node: Any) -> dict[str, Any]:
        """What identifies the work a node does, from its validated model `node`: what a
        recording's hash covers (`planner.testing.statement_hash`), so that an edit to it makes
        the recording stale. JSON-able (`repr` for the rest)."""

    def written(self, name: str, node: Any) -> list[tuple[Where, str]]:
        """Each statement its body sends (`CompiledNode.sql.statements`, in order) as its author
        wrote it in the validated model `node`: where in the file, and the text. Empty when it
        sends none."""


def _registry() -> dict[str, NodeKind]:
    from planner.kinds.call import CALL
    from planner.kinds.sql import SQL

    return {kind.name: kind for kind in (SQL, CALL)}


KINDS: dict[str, NodeKind] = _registry()


def kind_of(name: str) -> NodeKind:
    """The kind called `name`. Raises `FlowError` for a kind nobody registered."""
    try:
        return KINDS[name]
    except KeyError:
        raise FlowError(f"unknown node kind {name!r} (known: {', '.join(sorted(KINDS))})") from None


def written_statements(loaded: LoadedFlow) -> dict[str, list[tuple[Where, str]]]:
    """Each node's statements as written (`NodeKind.written`), by node name: what
    `planner.lang.sqlcheck` checks at the author's line."""
    return {name: kind_for_model(node).written(name, node) for name, node in loaded.spec.nodes.items()}


def kind_for_model(node: Any) -> NodeKind:
    """The kind of a validated node model (`SqlNode` -> sql)."""
    for kind in KINDS.values():
        if isinstance(node, kind.model):
            return kind
    raise FlowError(f"no node kind for {type(node).__name__}")
