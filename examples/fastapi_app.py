"""The seed flows behind HTTP: planner in a FastAPI service (see docs/service.md).

    DATABASE_URL=postgresql://localhost/app uvicorn examples.fastapi_app:app

- POST /messages   -> flow `process_buffered` (a user's buffered messages, stored as one turn)
- POST /escalation -> flow `escalation` (does this conversation need a human?)
- GET  /healthz    -> 200 when a tiny flow runs against the database, else 503

One `Planner` per process, opened in the lifespan and closed (pool drained) on shutdown. The
request body is the flow's inputs: the flow's `inputs:` block is the contract, checked by
planner (`FlowInputError` -> 422). A database that cannot be reached is a 503 with a JSON body
(`DatabaseUnavailable`), and so is a run that hit its deadline (`FlowTimeout`: the database
was slow or the pool saturated, which retrying later may cure); any other failure is a 500
that carries the run's id, never the error text (it is in the log, with the same run id). A
client that disconnects cancels its run. GET /metrics is the process's metrics in
Prometheus' text format.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict, TypeVar

from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from planner import (
    DatabaseUnavailable,
    FlowFailed,
    FlowInputError,
    FlowResult,
    FlowTimeout,
    NotFound,
    Planner,
    PoolOptions,
    load_flow,
    metrics_text,
)
from planner.results import jsonable
from planner.run.metrics import CONTENT_TYPE

FLOWS = Path(__file__).resolve().parent.parent / "flows"
T = TypeVar("T")

logger = logging.getLogger("examples.fastapi_app")

# The readiness probe: one round trip on a pooled connection (no new connection per probe),
# bounded by the flow's deadline. `on_error: fail` makes a failed ping fail the run.
PING = load_flow(text="""
settings: {timeout: 2s}
nodes:
  ping: {sql: SELECT 1, fetch: value, on_error: fail}
""", name="healthz")


class State(TypedDict):
    planner: Planner


def create_app(dsn: str | None = None, *, flows: str | Path = FLOWS, min_size: int | None = None,
               max_size: int | None = None) -> FastAPI:
    """The app. `dsn` defaults to `DATABASE_URL`; pool sizes to `POOL_MIN_SIZE` / `POOL_MAX_SIZE` (2 / 10)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        url = dsn or os.environ.get("DATABASE_URL")
        if not url:  # a service names its database; planner would otherwise start an embedded one
            raise RuntimeError("set DATABASE_URL (postgresql://user:password@host/db)")
        sizes = PoolOptions(
            min_size=min_size if min_size is not None else int(os.environ.get("POOL_MIN_SIZE", "2")),
            max_size=max_size if max_size is not None else int(os.environ.get("POOL_MAX_SIZE", "10")),
        )
        planner = Planner(flows=flows, dsn=url, pool_options=sizes)
        try:
            # Open the pool now: a database that is down at startup shows in the log at once.
            # The app still starts (and answers 503) so that it recovers when the database does.
            await planner.backend.open()
        except DatabaseUnavailable as exc:
            logger.error("database unavailable at startup: %s", exc)
        try:
            yield {"planner": planner}
        finally:
            await planner.close()  # waits for background connection releases, closes the pool

    app = FastAPI(title="planner example", lifespan=lifespan)

    @app.post("/messages")
    async def messages(request: Request, inputs: Annotated[dict[str, Any], Body()]) -> JSONResponse:
        return await run(request, "process_buffered", inputs)

    @app.post("/escalation")
    async def escalation(request: Request, inputs: Annotated[dict[str, Any], Body()]) -> JSONResponse:
        return await run(request, "escalation", inputs)

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        planner: Planner = request.state.planner
        try:
            await planner.run(PING)
        except (DatabaseUnavailable, FlowFailed) as exc:
            logger.warning("readiness check failed: %s", exc)
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(metrics_text(), media_type=CONTENT_TYPE)

    return app


async def run(request: Request, flow: str, inputs: dict[str, Any]) -> JSONResponse:
    """Run `flow` with `inputs` and map planner's outcome to HTTP."""
    planner: Planner = request.state.planner
    try:
        result = await cancel_on_disconnect(request, planner.run(flow, inputs))
    except ClientDisconnected:
        # Nobody reads this answer; the run was cancelled, and its queries on the server with it.
        return JSONResponse({"error": "client_disconnected"}, status_code=499)
    # DatabaseUnavailable comes first: an error that is both a FlowFailed and a
    # DatabaseUnavailable (the database lost during a run) is a 503 too.
    except DatabaseUnavailable as exc:
        logger.warning("flow %s: database unavailable: %s", flow, exc, extra={"flow": flow})
        return JSONResponse({"error": "database_unavailable", "detail": "the database cannot be reached; try again later"},
                            status_code=503, headers={"Retry-After": "1"})
    except FlowInputError as exc:
        return JSONResponse({"error": "invalid_input", "detail": str(exc), "input": exc.input}, status_code=422)
    except FlowTimeout as exc:
        # The deadline passed (a slow or saturated database, an outage starting): a 503 the
        # client may retry, like DatabaseUnavailable, not a 500 that says the service is wrong.
        logger.warning("flow %s: %s", flow, exc, extra={"flow": flow, "run_id": exc.result.run_id})
        return JSONResponse({"error": "timeout", "run_id": exc.result.run_id}, status_code=503,
                            headers={"Retry-After": "1"})
    except NotFound as exc:  # a `required: true` node found no row (before FlowFailed: it is one too)
        return JSONResponse({"error": "not_found", "detail": str(exc)}, status_code=404)
    except FlowFailed as exc:
        failed = [name for name, node in exc.result.nodes.items() if node.state == "failed"]
        logger.error("flow %s failed: %s", flow, exc, extra={"flow": flow, "run_id": exc.result.run_id})
        return JSONResponse({"error": "flow_failed", "run_id": exc.result.run_id, "status": exc.result.status,
                             "failed": failed}, status_code=500)
    except Exception:
        # A bug: no run id exists (the run never returned); the log and the body share an id.
        error_id = uuid.uuid4().hex[:12]
        logger.exception("flow %s: internal error %s", flow, error_id, extra={"flow": flow, "error_id": error_id})
        return JSONResponse({"error": "internal", "run_id": None, "error_id": error_id}, status_code=500)
    response = JSONResponse(body(result))
    if result.degraded:
        # An answer built on fallback values says so: the nodes are also in the WARNING log.
        response.headers["X-Planner-Degraded"] = ",".join(result.defaulted)
    return response


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then `ClientDisconnected`).

    Starlette does not cancel a handler whose client has gone (fastapi #3766): without this,
    a run nobody waits for any more keeps its database connections busy to the end. Cancelling
    a run cancels its nodes, and asyncpg cancels their queries on the server.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        # The body has been read: the next message is the disconnect (or never comes).
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if watcher.done() and not watcher.cancelled() and (current is None or current.cancelling() == 0):
            raise ClientDisconnected from None
        raise  # the handler itself was cancelled
    finally:
        watcher.cancel()


def body(result: FlowResult) -> dict[str, Any]:
    """The response: the flow's `output:` (JSON-ready) and the run's id."""
    return {"run_id": result.run_id, **jsonable(result.output)}


app = create_app()
