"""No error reads `TimeoutError: ` with nothing after it: planner's own timeouts say what timed
out and after how long, and a bare `TimeoutError` of someone else's code says it is theirs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from planner import CallOptions, DatabaseUnavailable, Planner
from planner.db import pool as pool_module
from planner.db import translate as translate_module
from planner.errors import QueryError
from planner.results import error_text


def test_a_bare_timeout_error_is_described_not_left_empty() -> None:
    text = error_text(TimeoutError())
    assert text.startswith("TimeoutError (no message: a timeout of the code that raised it")
    assert not text.endswith(": ")


def test_an_error_with_a_message_reads_type_colon_message() -> None:
    assert error_text(ValueError("bad")) == "ValueError: bad"
    assert error_text(KeyError()) == "KeyError (no message)"


async def test_a_node_that_raises_a_bare_timeout_says_whose_timeout_it_was(
        tmp_path: Path, write_flow: Callable[..., Path], caplog: pytest.LogCaptureFixture) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:bare_timeout, default: null}\n", name="t")
    with caplog.at_level(logging.WARNING, logger="planner"):
        async with Planner(flows=tmp_path, metrics=False, call_options=CallOptions(allowed_modules=["tests"])) as planner:
            result = await planner.run("t")
    assert result.nodes["a"].state == "defaulted"
    assert result.to_json()["nodes"]["a"]["error"].startswith("TimeoutError (no message: a timeout of the code")
    (record,) = [r for r in caplog.records if getattr(r, "node", None) == "a"]
    assert "TimeoutError (no message" in record.getMessage() and not record.getMessage().endswith(": ")


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers (a hung server, a black hole)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_pool_that_cannot_connect_in_time_says_after_how_long(
        tmp_path: Path, write_flow: Callable[..., Path], silent_server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "CONNECT_TIMEOUT_S", 0.3)
    write_flow("nodes:\n  a: {sql: SELECT 1, fetch: value}\n", name="t")
    async with Planner(flows=tmp_path, dsn=f"postgresql://nobody@127.0.0.1:{silent_server}/db", metrics=False) as planner:
        with pytest.raises(DatabaseUnavailable) as caught:
            await planner.run("t")
    assert "opening a connection took longer than 0.3 s" in str(caught.value)
    assert not str(caught.value).rstrip().endswith(":")


def test_a_driver_timeout_becomes_a_query_error_that_says_it_timed_out() -> None:
    translated = translate_module.translate(TimeoutError())
    assert isinstance(translated, QueryError) and translated.transient and translated.database_unavailable
    assert str(translated).startswith("the database did not answer in time (TimeoutError (no message")
