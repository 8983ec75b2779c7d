"""docs/service.md's examples, executed: every Python block runs (each has a runner here, and a
block without one fails the suite), the alert rules parse, and every metric the PromQL names
exists."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from planner import CallOptions, Planner
from planner.run.families import FAMILIES
from tests.test_examples import UNREACHABLE, serving

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "service.md"
FENCE = re.compile(r"^( *)```(\w+)\n(.*?)^\1```$", re.M | re.S)


def blocks(language: str) -> list[str]:
    """The doc's fenced blocks in `language`, dedented (a block inside a list item is indented)."""
    return [textwrap.dedent(m[3]) for m in FENCE.finditer(DOC.read_text()) if m[2] == language]


async def run_block(code: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute a block as a module would (top-level `await` allowed); returns its namespace."""
    compiled = compile(code, str(DOC), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(compiled, namespace)  # noqa: S307 - the doc's own example
    if asyncio.iscoroutine(result):
        await result
    return namespace


@dataclass
class Env:
    """What a runner may use: the demo database (a copy of its own), the server, a folder."""

    demo_dsn: str
    pg_dsn: str
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch


Runner = Callable[[str, Env], Awaitable[None]]
RUNNERS: dict[str, Runner] = {}


def runner(marker: str) -> Callable[[Runner], Runner]:
    """Register the runner of the block that contains `marker`."""

    def register(fn: Runner) -> Runner:
        RUNNERS[marker] = fn
        return fn

    return register


def _runner_of(code: str) -> Runner:
    found = [fn for marker, fn in RUNNERS.items() if marker in code]
    assert len(found) == 1, f"a Python example of docs/service.md has {len(found)} runners:\n{code}"
    return found[0]


ESCALATION = {"instance_id": 1, "user_phone": "+15550000002", "message": "I want a human agent"}


@runner("async def lifespan")
async def _fastapi_lifespan(code: str, env: Env) -> None:
    dsn = env.demo_dsn
    monkeypatch = env.monkeypatch
    monkeypatch.chdir(ROOT)  # flows="flows"
    monkeypatch.setenv("DATABASE_URL", dsn)
    namespace = await run_block(code, {"__name__": "service_doc"})
    async with serving(namespace["app"]) as client:
        response = await client.post("/escalation", json=ESCALATION)
    assert response.status_code == 200, response.text
    assert response.json()["escalate"] is True


@runner("settings=Settings(")
async def _settings(code: str, env: Env) -> None:
    env.monkeypatch.chdir(ROOT)  # flows="flows"
    env.monkeypatch.setenv("PLANNER_MODE", "layered")  # ignored by both: each was given its settings
    namespace = await run_block(code, {"__name__": "service_doc", "dsn": env.demo_dsn})
    async with namespace["quiet"] as quiet, namespace["other"] as other:
        first = await quiet.run("escalation", ESCALATION)
        second = await other.run("escalation", ESCALATION)
        assert (first.mode, quiet.cache_stats().enabled) == ("sequential", False)
        assert second.mode == "eager" and first.status == second.status == "ok"


@runner("from aiohttp import web")
async def _aiohttp_cleanup_ctx(code: str, env: Env) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    dsn = env.demo_dsn
    monkeypatch = env.monkeypatch
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("DATABASE_URL", dsn)
    namespace = await run_block(code, {"__name__": "service_doc"})
    async with TestClient(TestServer(namespace["app"])) as client:
        response = await client.post("/escalation", json=ESCALATION)
        assert response.status == 200, await response.text()
        assert (await response.json())["escalate"] is True


@runner("async def answer(")
async def _status_codes(code: str, env: Env) -> None:
    dsn = env.pg_dsn
    folder: Path = env.tmp_path
    (folder / "slow.yaml").write_text("settings: {timeout: 200ms}\nnodes:\n  nap: {sql: SELECT pg_sleep(5), fetch: value}\n")
    (folder / "bad.yaml").write_text("nodes:\n  boom: {sql: SELECT 1/0, fetch: value, on_error: fail}\n")
    (folder / "fine.yaml").write_text("inputs: {x: int}\nnodes:\n  v: {sql: 'SELECT $x::int', fetch: value}\n")
    (folder / "row.yaml").write_text("nodes:\n  r: {sql: 'SELECT 1 AS v WHERE false', fetch: one, required: true}\n")
    answer = (await run_block(code, {"__name__": "service_doc"}))["answer"]
    async with Planner(flows=folder, dsn=dsn, metrics=False) as planner:
        timeout = await answer(planner, "slow", {})
        failed = await answer(planner, "bad", {})
        invalid = await answer(planner, "fine", {"x": "one"})
        fine = await answer(planner, "fine", {"x": 2})
        missing = await answer(planner, "row", {})
    async with Planner(flows=folder, dsn=UNREACHABLE, metrics=False) as planner:
        down = await answer(planner, "fine", {"x": 2})
    assert (timeout.status_code, json.loads(timeout.body)["error"]) == (503, "timeout")
    assert timeout.headers["retry-after"] == "1"
    assert (failed.status_code, json.loads(failed.body)["error"]) == (500, "flow_failed")
    assert (invalid.status_code, json.loads(invalid.body)["input"]) == (422, "x")
    assert (fine.status_code, json.loads(fine.body)) == (200, {"v": 2})
    assert (missing.status_code, json.loads(missing.body)["error"]) == (404, "not_found")
    assert (down.status_code, json.loads(down.body)["error"]) == (503, "database_unavailable")


@runner("class JsonFormatter")
async def _json_formatter(code: str, env: Env) -> None:
    formatter = (await run_block(code, {"__name__": "service_doc"}))["JsonFormatter"]()
    record = logging.LogRecord("planner", logging.WARNING, __file__, 1, "node %s defaulted", ("b",), None)
    record.flow, record.node, record.run_id, record.outcome = "shop", "b", "r-1", "defaulted"
    data = json.loads(formatter.format(record))
    assert data == {"level": "WARNING", "logger": "planner", "message": "node b defaulted", "flow": "shop",
                    "node": "b", "run_id": "r-1", "outcome": "defaulted"}


TRACED = """
import asyncio, sys
{code}
from planner import CallOptions, Planner

async def main():
    async with Planner(flows=sys.argv[1], call_options=CallOptions(allowed_modules=["tests"]), metrics=False) as planner:
        await planner.run("t")

asyncio.run(main())
provider.force_flush()
"""


@runner("set_tracer_provider")
async def _tracing(code: str, env: Env) -> None:
    folder: Path = env.tmp_path
    (folder / "t.yaml").write_text("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n")
    # In a process of its own: a tracer provider is set once per process.
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", TRACED.format(code=code), str(folder)],
                                   capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '"name": "planner.flow t"' in proc.stdout and '"name": "planner.node a"' in proc.stdout


@runner('@app.get("/metrics")')
async def _metrics_route(code: str, env: Env) -> None:
    folder: Path = env.tmp_path
    (folder / "t.yaml").write_text("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n")
    async with Planner(flows=folder, call_options=CallOptions(allowed_modules=["tests"])) as planner:  # the process-wide metrics
        await planner.run("t")
    app = (await run_block(code, {"__name__": "service_doc"}))["app"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://doc") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE planner_flow_runs_total counter" in response.text
    assert re.search(r'^planner_node_outcomes_total\{flow="t",node="a",outcome="ok"\} [1-9]', response.text, re.M)


@runner("PING = load_flow(")
async def _readiness(code: str, env: Env) -> None:
    async with Planner(dsn=env.pg_dsn, metrics=False) as planner:
        namespace = await run_block(code, {"__name__": "service_doc", "planner": planner})
    assert namespace["PING"].name == "healthz"


@pytest.mark.parametrize("index", [
    # The tracing example sets a process-wide tracer provider: it runs in a Python of its own.
    pytest.param(i, marks=pytest.mark.subprocess) if "set_tracer_provider" in code else i
    for i, code in enumerate(blocks("python"))])
async def test_the_python_example_runs(index: int, demo_dsn: str, pg_dsn: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    code = blocks("python")[index]
    await _runner_of(code)(code, Env(demo_dsn, pg_dsn, tmp_path, monkeypatch))


def test_every_python_example_has_one_runner() -> None:
    assert blocks("python")
    for code in blocks("python"):
        _runner_of(code)


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bplanner_[a-z_]+", text))


KNOWN = {f.name for f in FAMILIES} | {f.name + suffix for f in FAMILIES if f.kind == "histogram"
                                      for suffix in ("_bucket", "_sum", "_count")}


def test_every_metric_the_dashboard_and_alerts_name_exists() -> None:
    named = set().union(*(_metric_names(b) for b in blocks("promql") + blocks("yaml")))
    assert named and named <= KNOWN, named - KNOWN


def test_the_alert_rules_are_prometheus_rule_groups() -> None:
    (rules,) = blocks("yaml")
    groups = yaml.safe_load(rules)["groups"]
    alerts = {rule["alert"]: rule for group in groups for rule in group["rules"]}
    assert "planner_flow_runs_degraded_total" in alerts["PlannerDegradedAnswers"]["expr"]
    assert all({"alert", "expr", "for", "labels", "annotations"} <= set(rule) for rule in alerts.values())
