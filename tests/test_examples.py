"""examples/fastapi_app.py under a real uvicorn server, called over HTTP with httpx.

The server runs in a thread of its own (its own event loop, as in production: the Planner
lives on the server's loop) on a free port; each test gets its own copy of the demo database.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx  # noqa: E402  (the dev extra installs httpx, fastapi and uvicorn)
import pytest
import uvicorn  # noqa: E402

from examples.fastapi_app import create_app  # noqa: E402
from planner.demo.latency_proxy import LatencyProxy

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "postgresql://planner@127.0.0.1:1/nowhere"  # port 1: refused at once


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Run `app` under uvicorn on a free port; an httpx client pointed at it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_config=None, access_log=False, loop="asyncio", http="h11",
                            ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped during startup"
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 30)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


async def test_a_message_is_stored_and_returns_its_conversation(demo_dsn: str) -> None:
    async with serving(create_app(demo_dsn)) as client:
        message = {"instance_name": "acme", "user_phone": "+15550000001", "message": "where is my order?"}
        first = await client.post("/messages", json=message)
        assert first.status_code == 200, first.text
        body = first.json()
        assert isinstance(body["conversation_id"], int) and isinstance(body["stored"], int)
        assert body["duplicate"] is False and body["run_id"]

        again = (await client.post("/messages", json=message)).json()  # the same text again: a duplicate
        assert again["conversation_id"] == body["conversation_id"]
        assert again["duplicate"] is True and again["stored"] is None

    con = await asyncpg.connect(demo_dsn)
    try:
        stored = await con.fetchrow("SELECT conversation_id, role, content FROM whatsapp_conversation_messages "
                                    "WHERE id = $1", body["stored"])
    finally:
        await con.close()
    assert dict(stored) == {"conversation_id": body["conversation_id"], "role": "user", "content": "where is my order?"}


async def test_escalation(demo_dsn: str) -> None:
    async with serving(create_app(demo_dsn)) as client:
        asked = await client.post("/escalation", json={"instance_id": 1, "user_phone": "+15550000002",
                                                        "message": "I want a human agent"})
        calm = await client.post("/escalation", json={"instance_id": 1, "user_phone": "+15550000003",
                                                       "message": "thanks"})
    assert asked.status_code == 200, asked.text
    assert asked.json()["escalate"] is True and isinstance(asked.json()["escalation_id"], int)
    assert calm.json()["escalate"] is False and calm.json()["escalation_id"] is None


@pytest.mark.parametrize(("body", "input_name"), [
    pytest.param({"instance_name": "acme", "user_phone": "+15550000001"}, "message", id="missing"),
    pytest.param({"instance_name": "acme", "user_phone": 15550000001, "message": "hi"}, "user_phone", id="wrong-type"),
    pytest.param({"instance_name": "acme", "user_phone": "+1", "message": "hi", "colour": "red"}, "colour", id="unknown"),
    pytest.param(["not", "an", "object"], None, id="not-an-object"),
])
async def test_bad_inputs_are_422(demo_dsn: str, body: Any, input_name: str | None) -> None:
    async with serving(create_app(demo_dsn)) as client:
        response = await client.post("/messages", json=body)
    assert response.status_code == 422, response.text
    if input_name is not None:  # planner's FlowInputError names the input; the other is FastAPI's own
        assert response.json()["error"] == "invalid_input" and response.json()["input"] == input_name


async def test_healthz(demo_dsn: str) -> None:
    async with serving(create_app(demo_dsn)) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_an_unreachable_database_is_503_not_500() -> None:
    async with serving(create_app(UNREACHABLE)) as client:  # the app starts anyway, and says why it cannot serve
        message = await client.post("/messages", json={"instance_name": "acme", "user_phone": "+1", "message": "hi"})
        escalation = await client.post("/escalation", json={"instance_id": 1, "user_phone": "+1", "message": "hi"})
        health = await client.get("/healthz")
        bad = await client.post("/messages", json={"instance_name": "acme"})  # inputs are checked before the database
    for response in (message, escalation):
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "database_unavailable"
        assert response.headers["retry-after"] == "1"
    assert health.status_code == 503 and health.json() == {"status": "unavailable"}
    assert bad.status_code == 422


async def test_a_failed_run_is_500_with_its_run_id_and_no_error_text(demo_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "process_buffered.yaml").write_text(
        "inputs: {instance_name: str}\n"
        "nodes:\n  boom: {sql: 'SELECT 1 / 0 AS secret_column', fetch: value, on_error: fail}\n")
    (tmp_path / "escalation.yaml").write_text("nodes: {broken: {sql: SELECT 1, fetch: sideways}}\n")
    async with serving(create_app(demo_dsn, flows=tmp_path)) as client:
        failed = await client.post("/messages", json={"instance_name": "acme"})
        broken = await client.post("/escalation", json={})
    assert failed.status_code == 500
    assert failed.json() == {"error": "flow_failed", "run_id": failed.json()["run_id"], "status": "failed", "failed": ["boom"]}
    assert failed.json()["run_id"] and "secret_column" not in failed.text and "division" not in failed.text
    assert broken.status_code == 500  # a flow file that does not load: a bug of the service, not of the client
    assert broken.json()["error"] == "internal" and broken.json()["error_id"] and "sideways" not in broken.text


async def test_a_run_past_its_deadline_is_503_with_its_run_id(demo_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "process_buffered.yaml").write_text(
        "inputs: {instance_name: str}\nsettings: {timeout: 200ms}\n"
        "nodes:\n  nap: {sql: 'SELECT pg_sleep(5), $instance_name::text', fetch: value}\n")
    async with serving(create_app(demo_dsn, flows=tmp_path)) as client:
        response = await client.post("/messages", json={"instance_name": "acme"})
    assert response.status_code == 503, response.text
    assert response.json() == {"error": "timeout", "run_id": response.json()["run_id"]} and response.json()["run_id"]
    assert response.headers["retry-after"] == "1"


async def test_metrics_route_shows_the_runs(demo_dsn: str) -> None:
    async with serving(create_app(demo_dsn)) as client:
        await client.post("/escalation", json={"instance_id": 1, "user_phone": "+15550000003", "message": "thanks"})
        response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'planner_flow_runs_total{flow="escalation",status="ok"}' in response.text


async def test_a_client_that_disconnects_cancels_its_run(demo_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "escalation.yaml").write_text(
        "inputs: {instance_id: int, user_phone: str, message: str}\n"
        "nodes:\n  nap: {sql: 'SELECT pg_sleep(30), $instance_id::int', fetch: value}\n")
    con = await asyncpg.connect(demo_dsn)

    async def sleeping() -> int:
        return int(await con.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND state = 'active' AND query LIKE 'SELECT pg_sleep(30)%'"))

    async def until(count: int) -> int:
        for _ in range(200):
            if await sleeping() == count:
                break
            await asyncio.sleep(0.025)
        return await sleeping()

    try:
        async with serving(create_app(demo_dsn, flows=tmp_path)) as client:
            post = asyncio.create_task(client.post("/escalation", json={"instance_id": 1, "user_phone": "+1", "message": "hi"}))
            assert await until(1) == 1  # the run's query is on the server
            post.cancel()  # the client goes away: httpx closes the connection
            with pytest.raises(asyncio.CancelledError):
                await post
            assert await until(0) == 0  # and the query is cancelled on the server, well before its 30 s
    finally:
        await con.close()


@asynccontextmanager
async def lost_later(demo_dsn: str) -> AsyncIterator[tuple[httpx.AsyncClient, Callable[[], Awaitable[None]]]]:
    """The app on a proxy in front of the demo database, and `cut()`: closing the proxy takes the
    database away (open connections drop, new ones are refused), as a server that goes down does."""
    proxy = LatencyProxy(demo_dsn, one_way_ms=0)
    await proxy.__aenter__()
    up = True

    async def cut() -> None:
        nonlocal up
        if up:
            up = False
            await proxy.__aexit__(None, None, None)

    try:
        async with serving(create_app(proxy.dsn, min_size=1, max_size=2)) as client:
            yield client, cut
    finally:
        await cut()


async def test_healthz_turns_503_when_the_database_goes_away(demo_dsn: str) -> None:
    async with lost_later(demo_dsn) as (client, cut):
        assert (await client.get("/healthz")).status_code == 200
        await cut()
        response = await client.get("/healthz")
    assert response.status_code == 503, response.text


async def test_a_run_that_loses_the_database_is_503(demo_dsn: str) -> None:
    async with lost_later(demo_dsn) as (client, cut):
        message = {"instance_name": "acme", "user_phone": "+15550000001", "message": "first"}
        assert (await client.post("/messages", json=message)).status_code == 200
        await cut()
        response = await client.post("/messages", json=message | {"message": "second"})
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "database_unavailable"


@pytest.mark.subprocess
def test_service_load_smoke(pg_dsn: str) -> None:
    """benchmarks/service_load.py runs end to end (a second, few clients): the figure is measured by hand."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.service_load", "--seconds", "1", "--clients", "5",
                           "--warmup", "0.5", "--dsn", pg_dsn], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "requests/s" in proc.stdout and "p95" in proc.stdout
