"""The seam between SQL nodes and the database: a `Backend` runs one node's statements.

    sql node --Query--> [wrappers: cache, coalescing, ...] --Query--> PoolBackend (planner.db, asyncpg)

A `Query` is everything a backend needs to run one SQL node once: the compiled statements,
their bound values, how to fetch, and the node's timeout. Wrappers take an inner backend and
decide *how* a query reaches the database (served from a cache, batched with other runs'
queries, sent together with a sibling's), never *what* it returns: a run gets the same value
with any stack of wrappers. They report what they did on `Query.served`, which the executor
copies onto the node's result.

This module knows nothing of asyncpg; `planner.db` implements the protocol over a pool.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from planner.graph import CompiledNode
    from planner.refs import CompiledSql

Fetch = Literal["one", "all", "value", "none"]

ALONE: ContextVar[bool] = ContextVar("planner_alone", default=False)
"""True inside a run in sequential mode (the rollback switch): its queries are never
coalesced or fused with anyone else's. The cache still applies."""
FETCHES: tuple[Fetch, ...] = ("one", "all", "value", "none")


@dataclass(slots=True)
class Served:
    """How a query's value was obtained; backends fill it, `NodeResult.served` shows it."""

    cached: bool = False  # from the cache: no statement was sent
    batch: int = 1  # how many runs shared the statement that answered this one
    fused: int = 1  # how many nodes of one run shared that statement
    replica: bool = False  # answered by the read replica (`planner.replica`), not the primary


@dataclass(slots=True)
class Query:
    """One SQL node's work for one attempt: `statements` run with `params` (one list each).

    One statement runs on its own; several run in one transaction on one connection, and the
    last one's result is the value. `timeout` times the statements, never the wait for a
    connection (only the run's deadline bounds that wait).
    """

    node: CompiledNode
    params: list[list[Any]]
    served: Served = field(default_factory=Served)
    run: object = None  # which run asks (the same object for every query of one run): fusion's key

    @property
    def statements(self) -> tuple[CompiledSql, ...]:
        return self.node.statements

    @property
    def fetch(self) -> Fetch:
        return self.node.fetch

    @property
    def timeout(self) -> float | None:
        return self.node.timeout


Outcome = tuple[Any, BaseException | None]
"""One member's share of a batch: its value, or its own error."""


@dataclass(frozen=True, slots=True)
class Described:
    """What the server says of a statement it prepared: parameter types and result columns."""

    parameter_types: tuple[str, ...]
    columns: tuple[str, ...]


class Backend(Protocol):
    """Runs queries. Implementations raise planner's errors only (`QueryError`,
    `DatabaseUnavailable`, `NodeTimeout`), never a driver's."""

    async def open(self) -> None:
        """Connect now (raises `DatabaseUnavailable`); later calls return at once."""

    async def run(self, query: Query) -> Any:
        """The value of `query`: rows, one row, a value or a status, as `query.fetch` says."""

    async def describe(self, text: str) -> Described:
        """Prepare `text` on the server without running it (`planner validate --db`)."""

    def idle(self, share: float = 1.0) -> bool:
        """Whether fewer than `share` of the connections are held or waited for: with 1, a
        query sent now would start at once (no wait for a connection)."""

    async def run_fused(self, queries: list[Query]) -> list[Outcome] | None:
        """Run the one read statement of each query (all of one run) as one statement on one
        connection; each gets its own outcome. None when they cannot be fused (nothing sent)."""

    async def run_batch(self, node: CompiledNode, params: list[list[Any]],
                        started: Callable[[], None]) -> list[Outcome] | None:
        """Run `node`'s one statement once per parameter list, as one statement; each member
        gets its own outcome. `started()` is called once the batch has its connection. None
        when this statement cannot be shared between runs (nothing was sent)."""

    async def pool(self) -> Any:
        """The connection pool handed to `call:` functions that take a `db` parameter."""

    def subscribe(self, channel: str, on_message: Callable[[str], None], on_state: Callable[[bool], None]) -> None:
        """Listen on `channel` in the background: payloads to `on_message`, whether it listens
        to `on_state` (see `PoolBackend.subscribe`)."""

    async def notify(self, channel: str, payload: str) -> None:
        """Send `payload` to every listener of `channel` (other processes included)."""

    async def drain(self) -> None:
        """Wait for background work (connection releases) to finish."""

    async def close(self) -> None:
        """Finish background work and release what this backend owns."""


class WrappingBackend:
    """Base of wrappers: everything is passed to `inner` unless overridden."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    async def open(self) -> None:
        await self.inner.open()

    async def run(self, query: Query) -> Any:
        return await self.inner.run(query)

    async def describe(self, text: str) -> Described:
        return await self.inner.describe(text)

    def idle(self, share: float = 1.0) -> bool:
        return self.inner.idle(share)

    async def run_fused(self, queries: list[Query]) -> list[Outcome] | None:
        return await self.inner.run_fused(queries)

    async def run_batch(self, node: CompiledNode, params: list[list[Any]],
                        started: Callable[[], None]) -> list[Outcome] | None:
        return await self.inner.run_batch(node, params, started)

    async def pool(self) -> Any:
        return await self.inner.pool()

    def subscribe(self, channel: str, on_message: Callable[[str], None], on_state: Callable[[bool], None]) -> None:
        self.inner.subscribe(channel, on_message, on_state)

    async def notify(self, channel: str, payload: str) -> None:
        await self.inner.notify(channel, payload)

    async def drain(self) -> None:
        await self.inner.drain()

    async def close(self) -> None:
        await self.inner.close()


class Offline:
    """A backend with no database: every query raises `DatabaseUnavailable`.

    For runs whose SQL nodes are all overridden, and for checks that bind a flow but never
    run it (`planner validate` without `--db`).
    """

    def __init__(self, reason: str = "no database is configured") -> None:
        self.reason = reason

    async def open(self) -> None:
        raise self._error()

    async def run(self, query: Query) -> Any:
        raise self._error()

    async def describe(self, text: str) -> Described:
        raise self._error()

    def idle(self, share: float = 1.0) -> bool:
        return True

    async def run_fused(self, queries: list[Query]) -> list[Outcome] | None:
        raise self._error()

    async def run_batch(self, node: CompiledNode, params: list[list[Any]],
                        started: Callable[[], None]) -> list[Outcome] | None:
        raise self._error()

    async def pool(self) -> Any:
        raise self._error()

    def subscribe(self, channel: str, on_message: Callable[[str], None], on_state: Callable[[bool], None]) -> None:
        return None  # nothing to listen to: a cache over it stays untrusted (and unused)

    async def notify(self, channel: str, payload: str) -> None:
        return None

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _error(self) -> Exception:
        from planner.errors import DatabaseUnavailable

        return DatabaseUnavailable(self.reason)
