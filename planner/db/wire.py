"""Behind a transaction pooler: every execution checks the result's column types on the wire.

Why. `planner.db.pooler.PoolerConnection` keeps what the server said of a statement (its parameter
and column types) and sends the statement unnamed again with each use: one round trip instead
of two. The server parses the text afresh each time, on whatever server connection the pooler
picks, so after a migration it may answer with other types than the kept description says.
Rows decoded with the old codecs are wrong values, not errors, whenever the two types have
the same width: `int8 -> float8` read 1.5 as 4609434218613702656, `timestamp -> timestamptz`
lost its zone. The parameters have the same problem the other way round: an `int8` encoded
for a column now `float8` is read by the server as a tiny float.

What. Each execution's Parse goes out with
- the parameter types of the description pinned in it: the server reads the parameters as
  the types they were encoded for, and converts them (an assignment cast) or refuses them (no
  such operator) by its own rules, never misreading their bytes;
- a Describe of the statement right after it, in the same packet: the server answers with
  the column types it will send (RowDescription) before the first row. A Describe costs bytes,
  not a round trip.
`Wire` reads that answer as it arrives, before asyncpg decodes a row, and compares each
column's name and type with the description the rows will be decoded with. A difference makes
the execution *stale*: its decoded rows are never returned. `PoolerConnection` then drops its
descriptions and sends a statement proven free of effects again, described afresh (`repeatable`),
and raises `StaleResult`, naming the column and both types, for any other.

How (asyncpg internals, pinned by tests/db/test_wire.py against `ASYNCPG_CHECKED`). asyncpg's
protocol is compiled and writes through its transport: `Wire` takes the transport's place on
both sides (its `write`, and the protocol the transport calls with what arrives), for the one
Parse of the checked execution and the few messages before its first row; everything else
passes through untouched. It relies on asyncpg sending an unnamed statement's Parse as one
write with no parameter types (`Parse('', query, 0)`), on the protocol ignoring the
ParameterDescription and RowDescription it did not ask for (it discards unknown messages in its
bind/execute states), and on `PreparedStatementState._get_parameters/_get_attributes`. When any
of that does not hold (another asyncpg, uvloop's transport), `install` says so in a warning and
returns None: `PoolerConnection` then keeps no description at all and asks the server before
each use (asyncpg's own way, two round trips), so a run is slower, never wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

logger = logging.getLogger("planner")

# asyncpg releases whose internals `Wire` was read against (tests/db/test_wire.py pins it): a
# release outside them still works, described before each use, and says so once.
ASYNCPG_CHECKED = ("0.29", "0.30", "0.31", "0.32")

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_DESCRIBE_STATEMENT = b"D" + _INT32.pack(6) + b"S\x00"  # Describe, statement, unnamed
# Messages that may come before a checked execution's description: ParseComplete,
# ParameterDescription, and the asynchronous ones (notice, parameter status, notification).
_BEFORE = frozenset(b"1tNSA")

# Whether the statement being executed may be sent again when its result turned out stale: only when
# the one effects model (`planner.lang.effects`, the catalog's verdict) proved it free of
# effects. Set by whoever knows the verdict (`planner.db.pool.PoolBackend`); not repeatable
# unless said.
_repeatable: contextvars.ContextVar[bool] = contextvars.ContextVar("planner_wire_repeatable", default=False)


@contextlib.contextmanager
def repeatable(pure: bool) -> Iterator[None]:
    """Within this block, a statement whose result changed type under its description is
    sent again, described afresh, if `pure` (the statement's effects verdict proved it reads only);
    else it fails with `StaleResult`."""
    token = _repeatable.set(pure)
    try:
        yield
    finally:
        _repeatable.reset(token)


def may_send_again() -> bool:
    """Whether the statement being executed was proven free of effects (see `repeatable`)."""
    return _repeatable.get()


class StaleResult(asyncpg.InterfaceError):  # type: ignore[misc]
    """The server answered with other column types (or names) than the description planner
    kept for the statement: a migration since it was described. Its rows were not returned."""


@dataclass(eq=False, slots=True)
class Expected:
    """What a kept description says: the parameter types (pinned in the Parse) and each
    column's name and type (compared with the server's RowDescription)."""

    parameters: tuple[int, ...]
    columns: tuple[tuple[str, int], ...]
    names: tuple[str, ...]  # the columns' type names, for the message
    # What the last use sent and was answered, byte for byte: the next use of the statement
    # sends the same Parse and compares the same RowDescription without parsing either again.
    parse: tuple[bytes, bytes] | None = field(default=None, compare=False)  # asyncpg's Parse, the checked one
    seen: bytes | None = field(default=None, compare=False)  # a RowDescription found to match

    @classmethod
    def of(cls, statement: Any) -> Expected:
        """`statement`: asyncpg's `PreparedStatementState`."""
        attributes = statement._get_attributes()
        return cls(tuple(t.oid for t in statement._get_parameters()),
                   tuple((a.name, a.type.oid) for a in attributes), tuple(a.type.name for a in attributes))


class Check:
    """One execution's verdict: None while it matches, else why its result is stale."""

    __slots__ = ("stale", "sent")

    def __init__(self) -> None:
        self.stale: str | None = None
        self.sent = False  # the checked Parse (with its Describe) went out


def _type_name(oid: int) -> str:
    from asyncpg.protocol.protocol import BUILTIN_TYPE_OID_MAP

    name = BUILTIN_TYPE_OID_MAP.get(oid)
    return str(name) if name is not None else f"the type with OID {oid}"


def compare(expected: Expected, described: tuple[tuple[str, int], ...]) -> str | None:
    """Why `described` (the server's columns now) is not what `expected` says, or None."""
    if len(described) != len(expected.columns):
        now = ", ".join(name for name, _ in described) or "none"
        was = ", ".join(name for name, _ in expected.columns) or "none"
        return f"it returns {len(described)} column(s) now ({now}), {len(expected.columns)} when described ({was})"
    for position, ((name, oid), (old_name, old_oid), old_type) in enumerate(
            zip(described, expected.columns, expected.names, strict=True), start=1):
        if oid != old_oid:
            return (f"column {position} ({name!r}) is {_type_name(oid)} now, "
                    f"{old_type} when described")
        if name != old_name:
            return f"column {position} is named {name!r} now, {old_name!r} when described"
    return None


def _row_description(body: bytes) -> tuple[tuple[str, int], ...]:
    """A RowDescription's (name, type OID) per column."""
    count = _INT16.unpack_from(body, 0)[0]
    at, columns = 2, []
    for _ in range(count):
        end = body.index(b"\x00", at)
        name = body[at:end].decode("utf-8", errors="replace")
        oid = _UINT32.unpack_from(body, end + 1 + 6)[0]  # after the table OID and the column number
        columns.append((name, oid))
        at = end + 1 + 18
    return tuple(columns)


class Wire(asyncio.Protocol):
    """Sits between a connection's transport and asyncpg's protocol (see the module's doc).
    `checked(executor, expected, check)` wraps one execution; nothing else is touched."""

    def __init__(self, transport: Any, protocol: Any) -> None:
        self._protocol = protocol
        self._send: Callable[[Any], None] = transport.write
        self._armed: tuple[Expected, Check] | None = None  # the next Parse is checked against this
        self._watched: tuple[Expected, Check] | None = None  # reading the answer to it
        self._carry = b""  # the start of a message that has not all arrived
        self.broken: str | None = None  # why checking stopped on this connection

    # --- the transport's side: what asyncpg writes -------------------------------------------

    def write(self, data: Any) -> None:
        armed, self._armed = self._armed, None
        if armed is not None:
            data = self._checked_parse(bytes(data), *armed)
        self._send(data)

    def _checked_parse(self, data: bytes, expected: Expected, check: Check) -> bytes:
        kept = expected.parse
        if kept is not None and kept[0] == data:
            check.sent = True
            self._watched, self._carry = (expected, check), b""
            return kept[1]
        # asyncpg's Parse of an unnamed statement: 'P', length, '' , query, no parameter types.
        if not (len(data) > 8 and data[0:1] == b"P" and _INT32.unpack_from(data, 1)[0] == len(data) - 1
                and data[5] == 0 and data[-3:] == b"\x00\x00\x00"):
            self.broken = f"asyncpg wrote {data[:1]!r} where its Parse of an unnamed statement was expected"
            check.stale = f"it could not be checked ({self.broken})"
            return data
        body = data[5:-2] + _INT16.pack(len(expected.parameters)) + b"".join(
            _UINT32.pack(oid) for oid in expected.parameters)
        check.sent = True
        self._watched, self._carry = (expected, check), b""
        checked = b"P" + _INT32.pack(len(body) + 4) + body + _DESCRIBE_STATEMENT
        expected.parse = (data, checked)
        return checked

    # --- the protocol's side: what arrives ----------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._watched is not None:
            self._read(data)
        self._protocol.data_received(data)

    def _read(self, data: bytes) -> None:
        assert self._watched is not None
        expected, check = self._watched
        buffer = self._carry + bytes(data) if self._carry else bytes(data)
        at = 0
        while len(buffer) - at >= 5:
            kind = buffer[at]
            end = at + 1 + _INT32.unpack_from(buffer, at + 1)[0]
            if kind in _BEFORE:
                if end > len(buffer):
                    break
                at = end
                continue
            if kind in b"Tn":  # the description: compared before any row reaches asyncpg
                if end > len(buffer):
                    break
                body = buffer[at + 5:end]
                if body != expected.seen:
                    check.stale = compare(expected, _row_description(body) if kind == ord("T") else ())
                    if check.stale is None:
                        expected.seen = body
            elif kind not in b"EZ":  # an error (it did not run) ends the watch with nothing to say
                check.stale = f"it could not be checked: the server sent {chr(kind)!r} before the rows' description"
            self._watched, self._carry = None, b""
            return
        self._carry = buffer[at:]

    def checked(self, executor: Callable[[Any, Any], Awaitable[Any]], describe: Callable[[Any], Expected],
                check: Check) -> Callable[[Any, Any], Awaitable[Any]]:
        """`executor` (asyncpg's bind/execute step) with its Parse checked against what
        `describe(statement)` says of the statement it is given. The result has `checked = True`."""

        async def run(statement: Any, timeout: Any) -> Any:  # noqa: ASYNC109 - asyncpg's executor signature
            if not statement.name:
                statement.mark_unprepared()  # sent with its text: the Parse this checks
            self._armed = (describe(statement), check)
            try:
                result = await executor(statement, timeout)
            finally:
                self._armed = None
                if self._watched is not None and self._watched[1] is check:
                    self._watched, self._carry = None, b""
            if not check.sent and check.stale is None and not statement.name:
                check.stale = "it could not be checked: its Parse was not sent"
            return result

        run.checked = True  # type: ignore[attr-defined]  # asyncpg's own retry passes it back in
        return run

    # --- everything else goes to asyncpg's protocol as it is ----------------------------------

    def connection_made(self, transport: Any) -> None:  # pragma: no cover - made before `install`
        self._protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._protocol.connection_lost(exc)

    def eof_received(self) -> bool | None:
        result: bool | None = self._protocol.eof_received()
        return result

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._protocol, name)


_warned: set[str] = set()


def install(transport: Any, protocol: Any) -> Wire | None:
    """Put a `Wire` between `transport` and `protocol` (asyncpg's), or say why not and return None."""
    version = ".".join(asyncpg.__version__.split(".")[:2])
    reason: str | None = None
    if version not in ASYNCPG_CHECKED:
        reason = f"asyncpg {asyncpg.__version__} is not one planner was checked with ({', '.join(ASYNCPG_CHECKED)})"
    elif not hasattr(transport, "set_protocol") or transport.get_protocol() is not protocol:
        reason = f"the transport ({type(transport).__name__}) does not call asyncpg's protocol directly"
    wire: Wire | None = None
    if reason is None:
        wire = Wire(transport, protocol)
        try:
            transport.write = wire.write
        except (AttributeError, TypeError):  # a compiled transport (uvloop's)
            reason = f"the transport ({type(transport).__name__}) cannot be watched"
            wire = None
        else:
            transport.set_protocol(wire)
    if reason is not None and reason not in _warned:
        _warned.add(reason)
        logger.warning("behind the transaction pooler, planner describes every statement before each use "
                       "(a round trip more): %s", reason)
    return wire
