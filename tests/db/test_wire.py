"""What `planner.db.wire` relies on in asyncpg (pinned here), and how it reads the wire.

`planner.db.wire` watches the Parse asyncpg writes for an unnamed statement and the description
the server sends back (see its module doc). These tests fail when a new asyncpg changes any of
it: then add the release to `ASYNCPG_CHECKED` only once tests/db/test_pooler_types.py passes with it.
"""

from __future__ import annotations

import inspect
import logging
import struct
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from planner import CacheOptions, Planner, PoolOptions, load_flow
from planner.db import wire
from planner.db.pooler import PoolerConnection
from tests.support.pgbouncer import PgBouncer


def test_the_installed_asyncpg_is_one_the_wire_was_checked_with() -> None:
    assert ".".join(asyncpg.__version__.split(".")[:2]) in wire.ASYNCPG_CHECKED


def test_asyncpg_internals_the_pooler_connection_overrides_keep_their_signatures() -> None:
    do_execute = inspect.signature(asyncpg.Connection._do_execute)
    assert list(do_execute.parameters)[:5] == ["self", "query", "executor", "timeout", "retry"]
    get_statement = inspect.signature(asyncpg.Connection._get_statement)
    assert {"named", "use_cache", "ignore_custom_codec", "record_class"} <= set(get_statement.parameters)
    init = inspect.signature(asyncpg.Connection.__init__)
    assert list(init.parameters)[:3] == ["self", "protocol", "transport"]
    from asyncpg.protocol.protocol import BUILTIN_TYPE_OID_MAP, PreparedStatementState, Protocol

    for name in ("mark_unprepared", "_get_attributes", "_get_parameters"):
        assert callable(getattr(PreparedStatementState, name))
    assert callable(Protocol.bind_execute) and callable(Protocol.data_received)
    assert BUILTIN_TYPE_OID_MAP[20] == "int8"


@pytest.fixture
async def raw(demo_dsn: str, pgbouncer: PgBouncer) -> AsyncIterator[Any]:
    con = await asyncpg.connect(pgbouncer.dsn(demo_dsn, pooler=False), statement_cache_size=0,
                                connection_class=PoolerConnection)
    try:
        yield con
    finally:
        await con.close()


async def test_asyncpg_writes_an_unnamed_parse_alone_and_the_wire_checks_it(raw: Any) -> None:
    watched = raw._wire
    assert isinstance(watched, wire.Wire) and raw._transport.get_protocol() is watched
    written: list[bytes] = []
    send = watched._send

    def spy(data: Any) -> None:
        written.append(bytes(data))
        send(data)

    watched._send = spy
    assert await raw.fetchval("SELECT $1::int8 + 1", 41) == 42
    described, parse = [w for w in written if w[:1] == b"P"]  # asyncpg's describe, then the run
    assert described.endswith(b"S\x00H\x00\x00\x00\x04")  # Parse, Describe, Flush: unchanged
    # Pinned parameter types (one int8) and, in the same write, a Describe of the statement.
    assert parse.endswith(struct.pack("!hI", 1, 20) + b"D" + struct.pack("!i", 6) + b"S\x00")
    assert watched.broken is None


def _parse(query: str) -> bytes:
    body = b"\x00" + query.encode() + b"\x00" + struct.pack("!h", 0)
    return b"P" + struct.pack("!i", len(body) + 4) + body


def _row_description(*columns: tuple[str, int]) -> bytes:
    body = struct.pack("!h", len(columns)) + b"".join(
        name.encode() + b"\x00" + struct.pack("!ihihih", 0, 0, oid, 8, -1, 1) for name, oid in columns)
    return b"T" + struct.pack("!i", len(body) + 4) + body


class _Transport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: Any) -> None:
        self.sent.append(bytes(data))


class _Protocol:
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.received.append(data)


def _expected() -> wire.Expected:
    return wire.Expected(parameters=(20,), columns=(("v", 20),), names=("int8",))


def _watch() -> tuple[wire.Wire, wire.Check, _Protocol]:
    protocol = _Protocol()
    watched, check = wire.Wire(_Transport(), protocol), wire.Check()
    watched._armed = (_expected(), check)
    watched.write(memoryview(_parse("SELECT v FROM t WHERE id = $1")))
    assert check.sent
    return watched, check, protocol


def test_a_description_split_across_reads_is_compared_before_it_is_passed_on() -> None:
    watched, check, protocol = _watch()
    answer = b"1\x00\x00\x00\x04" + b"t\x00\x00\x00\x0a\x00\x01\x00\x00\x00\x14" + _row_description(("v", 701))
    for at in range(0, len(answer), 3):
        watched.data_received(answer[at:at + 3])
    assert check.stale == "column 1 ('v') is float8 now, int8 when described"
    assert b"".join(protocol.received) == answer  # every byte passed on, unchanged


def test_the_same_description_is_not_stale() -> None:
    watched, check, _ = _watch()
    watched.data_received(b"1\x00\x00\x00\x04" + _row_description(("v", 20)) + b"2\x00\x00\x00\x04")
    assert check.stale is None and watched._watched is None


@pytest.mark.parametrize(("columns", "why"), [
    ((("v", 20), ("w", 20)), "it returns 2 column(s) now (v, w), 1 when described (v)"),
    ((), "it returns 0 column(s) now (none), 1 when described (v)"),
    ((("w", 20),), "column 1 is named 'w' now, 'v' when described"),
    ((("v", 1184),), "column 1 ('v') is timestamptz now, int8 when described"),
    ((("v", 987654),), "column 1 ('v') is the type with OID 987654 now, int8 when described"),
])
def test_what_makes_a_description_stale(columns: tuple[tuple[str, int], ...], why: str) -> None:
    assert wire.compare(_expected(), columns) == why


def test_rows_before_any_description_are_never_trusted() -> None:
    watched, check, _ = _watch()
    watched.data_received(b"1\x00\x00\x00\x04" + b"D\x00\x00\x00\x06\x00\x00")
    assert check.stale is not None and "before the rows' description" in check.stale


def test_a_write_that_is_not_asyncpgs_parse_stops_the_checks_and_says_why() -> None:
    watched, check = wire.Wire(_Transport(), _Protocol()), wire.Check()
    watched._armed = (_expected(), check)
    watched.write(b"Q\x00\x00\x00\x0dSELECT 1\x00")
    assert watched.broken is not None and check.stale is not None and not check.sent


async def test_an_unchecked_asyncpg_keeps_no_description_and_says_so(
        demo_dsn: str, pgbouncer: PgBouncer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(wire, "ASYNCPG_CHECKED", ())
    monkeypatch.setattr(wire, "_warned", set())
    monkeypatch.setattr("planner.db.pooler.DESCRIBED_S", 3600.0)
    admin = await asyncpg.connect(demo_dsn)
    try:
        await admin.execute("CREATE TABLE pw (id int PRIMARY KEY, v int8); INSERT INTO pw VALUES (1, 7)")
        flow = load_flow(text="nodes: {r: {sql: 'SELECT v FROM pw WHERE id = 1', fetch: value, on_error: fail}}")
        with caplog.at_level(logging.WARNING, logger="planner"):
            async with Planner(dsn=pgbouncer.dsn(demo_dsn), pool_options=PoolOptions(min_size=1, max_size=1), cache_options=CacheOptions(size=0)) as planner:
                assert (await planner.run(flow)).values["r"] == 7
                await admin.execute("ALTER TABLE pw ALTER COLUMN v TYPE float8; UPDATE pw SET v = 1.5")
                assert (await planner.run(flow)).values["r"] == 1.5
    finally:
        await admin.close()
    assert any("describes every statement before each use" in r.getMessage() and "asyncpg" in r.getMessage()
               for r in caplog.records)


def test_a_description_seen_once_is_recognised_again_and_a_changed_one_is_still_stale() -> None:
    answer = b"1\x00\x00\x00\x04" + _row_description(("v", 20)) + b"2\x00\x00\x00\x04"
    watched, expected = wire.Wire(_Transport(), _Protocol()), _expected()
    for description, stale in ((("v", 20), False), (("v", 20), False), (("v", 701), True), (("v", 20), False)):
        check = wire.Check()
        watched._armed = (expected, check)
        watched.write(memoryview(_parse("SELECT v FROM t WHERE id = $1")))
        watched.data_received(b"1\x00\x00\x00\x04" + _row_description(description) + b"2\x00\x00\x00\x04")
        assert (check.stale is not None) is stale, description
    assert expected.seen == answer[5 + 1 + 4:-5]
