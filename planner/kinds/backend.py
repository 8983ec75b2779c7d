"""The seam between SQL nodes and the database: a `Backend` sends one node's statements.

    sql node --Query--> [wrappers: cache, coalescing, ...] --Query--> PoolBackend (planner.db.pool, asyncpg)

A `Query` is everything a backend needs to answer one SQL node once: the compiled statements,
their bound values, how to fetch, and the node's timeout. Wrappers take an inner backend and
decide *how* a query reaches the database (served from a cache, batched with other runs'
queries, sent together with a sibling's), never *what* it returns: a run gets the same value
with any stack of wrappers. They report what they did on `Query.served`, which the executor
copies onto the node's result.

This module knows nothing of asyncpg; `planner.db.pool` implements the protocol over a pool.
"""

from __future__ import annotations

import copy
import datetime as dt
import decimal
import uuid
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from planner.lang.nodes import Fetch
from planner.results import Served

if TYPE_CHECKING:
    from planner.lang.nodes import CompiledNode, SqlBody
    from planner.lang.refs import CompiledSql


SEQUENTIAL: ContextVar[bool] = ContextVar("planner_sequential", default=False)
"""True inside a run in sequential mode (the rollback switch): its queries are never
coalesced or fused with anyone else's. The cache still applies."""


@dataclass(slots=True)
class Query:
    """One SQL node's work for one attempt: `statements` sent with `params` (one list each).

    One statement is sent by itself; several are sent in one transaction on one connection, and the
    last one's result is the value. `timeout` times the statements, never the wait for a
    connection (only the run's deadline bounds that wait).
    """

    node: CompiledNode
    params: list[list[Any]]
    served: Served = field(default_factory=Served)
    run: object = None  # which run asks (the same object for every query of one run): fusion's key
    # Must see every write committed before this `time.monotonic()`: a refill of the cache after
    # an invalidation. A replica answers it only once proven to have replayed what the primary
    # had written by then (`planner.db.replica`); else the primary does.
    fresh_after: float | None = None

    @property
    def sql(self) -> SqlBody:
        """The node's SQL body: what it sends, how it fetches, what it may share."""
        return self.node.sql

    @property
    def statements(self) -> tuple[CompiledSql, ...]:
        return self.node.sql.statements

    @property
    def fetch(self) -> Fetch:
        return self.node.sql.fetch

    @property
    def timeout(self) -> float | None:
        return self.node.timeout


Outcome = tuple[Any, BaseException | None]
"""One member's share of a batch: its value, or its own error."""

ANSWER: ContextVar[Callable[[int, Outcome], None] | None] = ContextVar("planner_answer", default=None)
"""Set by whoever sends a batch (`planner.db.coalesce`) around its `Batches.run_batch` call: a
backend may call it with a member's index in `params` and that member's outcome as soon as
the outcome is known, before the whole batch is over (a read batch that runs long splits,
and its fast members are answered while a slow one still runs). What `run_batch` returns
still holds every member's outcome. A context variable rather than a parameter, so that any
wrapper between the two passes it on unchanged."""


@dataclass(frozen=True, slots=True)
class Described:
    """What the server says of a statement it prepared: parameter types and result columns."""

    parameter_types: tuple[str, ...]
    columns: tuple[str, ...]


class Backend(Protocol):
    """Answers queries: what wrappers wrap and fakes fake. Implementations raise planner's errors
    only (`QueryError`, `DatabaseUnavailable`, `NodeTimeout`), never a driver's.

    What else a pool can do (send a batch, fuse reads, say how busy it is, carry notifications,
    prepare a statement, lend its asyncpg pool) is not part of this seam: each is a narrow
    protocol below, given explicitly to what needs it (`planner.db.stack` wires them)."""

    async def open(self) -> None:
        """Connect now (raises `DatabaseUnavailable`); later calls return at once."""

    async def run(self, query: Query) -> Any:
        """The value of `query`: rows, one row, a value or a status, as `query.fetch` says."""

    async def close(self) -> None:
        """Finish background work and release what this backend owns."""


class Load(Protocol):
    """How busy a pool is: what fusion, coalescing and compiled groups decide from."""

    def idle(self, share: float = 1.0) -> bool:
        """Whether fewer than `share` of the connections are held or waited for: with 1, a
        query sent now would start at once (no wait for a connection)."""


class Batches(Load, Protocol):
    """What coalescing needs of a pool (`planner.db.coalesce`): its load, and batches."""

    async def run_batch(self, node: CompiledNode, params: list[list[Any]],
                        started: Callable[[], None]) -> list[Outcome] | None:
        """Send `node`'s one statement once per parameter list, as one statement; each member
        gets its own outcome. `started()` is called once the batch has its connection. None
        when this statement cannot be shared between runs (nothing was sent)."""


class Fuser(Load, Protocol):
    """What fusion needs of a pool (`planner.db.fuse`): its load, and fused reads."""

    async def run_fused(self, queries: list[Query]) -> list[Outcome] | None:
        """Send the one read statement of each query (all of one run) as one statement on one
        connection; each gets its own outcome. None when they cannot be fused (nothing sent)."""


class Channel(Protocol):
    """Notifications between processes (LISTEN/NOTIFY): what the cache's invalidations travel on."""

    def subscribe(self, channel: str, on_message: Callable[[str], None], on_state: Callable[[bool], None]) -> None:
        """Listen on `channel` in the background: payloads to `on_message`, whether it listens
        to `on_state` (see `planner.db.channel.PoolChannel.subscribe`)."""

    async def notify(self, channel: str, payload: str) -> None:
        """Send `payload` to every listener of `channel` (other processes included)."""


@runtime_checkable
class Database(Protocol):
    """What checks and `call:` nodes ask of the primary database besides queries: `describe` for
    `planner validate --db` and hot edits, `pool` for a `call:` function's `db` parameter."""

    async def describe(self, text: str) -> Described:
        """Prepare `text` on the server without executing it (`planner validate --db`)."""

    async def pool(self) -> Any:
        """The connection pool handed to `call:` functions that take a `db` parameter."""


class WrappingBackend:
    """Base of wrappers: `open`, `run` and `close` are passed to `inner` unless overridden."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    async def open(self) -> None:
        await self.inner.open()

    async def run(self, query: Query) -> Any:
        return await self.inner.run(query)

    async def close(self) -> None:
        await self.inner.close()


class Offline:
    """A backend with no database: every query raises `DatabaseUnavailable`, and so do
    `describe` and `pool` (it is a `Database` that has none).

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

    async def pool(self) -> Any:
        raise self._error()

    async def close(self) -> None:
        return None

    def _error(self) -> Exception:
        from planner.errors import DatabaseUnavailable

        return DatabaseUnavailable(self.reason)


# --- what the wrappers share: parameter keys and per-run errors ---------------------------

# Values whose own equality and hash tell exactly how they are sent.
_PLAIN: frozenset[type] = frozenset({str, int, bool, type(None), bytes, uuid.UUID, dt.date, dt.timedelta})


def freeze(value: Any) -> Hashable:
    """A hashable key for a bound parameter (or a list of them), equal for two values only when
    they would be sent the same way: the cache keeps values by it and coalescing shares a
    member by it. Raises `TypeError` for a part that cannot be hashed (an object of the
    caller's own class that does not hash): such a query is neither cached nor shared.

    Types stay apart (`1`, `1.0` and `True` are three keys), lists, tuples and dicts are keyed
    by their contents in order (a `json` parameter keeps its keys' order on the server).
    Where Python's equality is looser than the wire it is not used: `0.0` and `-0.0`,
    `Decimal("2.5")` and `Decimal("2.50")`, and one instant in two UTC offsets are sent (and
    come back) differently. Every float NaN is one key, though no NaN equals another: they
    are all sent as NaN.
    """
    kind = type(value)
    if kind in _PLAIN:
        return (kind, value)
    if kind is list or kind is tuple:
        return (kind, tuple(freeze(v) for v in value))
    if kind is dict:
        return (kind, tuple((freeze(k), freeze(v)) for k, v in value.items()))
    # isinstance from here: a subclass (numpy's float64, a datetime library's) is sent as its base.
    if isinstance(value, float):
        return (kind, float.__repr__(value))
    if isinstance(value, decimal.Decimal):
        return (kind, value.as_tuple())  # sign, digits and exponent: the scale too
    if isinstance(value, dt.datetime | dt.time):
        return (kind, value, value.utcoffset())
    hash(value)  # TypeError now, not at the lookup
    return (kind, value)


_ATOMIC: frozenset[type] = frozenset({
    str, int, float, bool, type(None), bytes, decimal.Decimal, uuid.UUID,
    dt.datetime, dt.date, dt.time, dt.timedelta,
})


def private_copy(value: Any) -> Any:
    """A copy of a query's value that shares nothing mutable with it: what each of the runs
    that one statement (or one cached value) answers gets."""
    kind = type(value)
    if kind in _ATOMIC:
        return value
    if kind is dict:
        return {k: v if type(v) in _ATOMIC else private_copy(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _ATOMIC else private_copy(v) for v in value]
    if kind is tuple:
        return tuple(private_copy(v) for v in value)
    return copy.deepcopy(value)


E = TypeVar("E", bound=BaseException)


def own_error(exc: E) -> E:
    """A copy of `exc` for one of the several runs (or nodes) that one failure answers.

    Raising an exception writes its `__traceback__` (and `__context__`), and `add_note` appends
    to its `__notes__`: one object raised by several runs would carry all their tracebacks and
    notes. The copy keeps the type, message, attributes (`sqlstate`...), cause and notes (in a
    list of its own) and starts with no traceback. `exc` itself when it cannot be rebuilt from
    its arguments (a constructor that takes others).
    """
    try:
        twin = copy.copy(exc)
    except Exception:
        return exc
    if type(twin) is not type(exc) or twin.args != exc.args:
        return exc
    twin.__cause__ = exc.__cause__
    twin.__context__ = exc.__context__
    twin.__suppress_context__ = exc.__suppress_context__
    twin.__traceback__ = None
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        twin.__notes__ = list(notes)  # copy.copy shares the instance dict's list
    return twin
