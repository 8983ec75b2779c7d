"""What a user of the library is told (issue #14): which database, a run that was degraded, an
error that is a bug in the flow, a database that went away mid-run, and load errors that say
what to write instead.

CLI behaviour is tested through the console script in `tests/cli/`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from planner import (
    CallOptions,
    DatabaseUnavailable,
    FlowDatabaseLost,
    FlowError,
    FlowFailed,
    FlowFileError,
    NodeState,
    Planner,
    PoolOptions,
    QueryError,
    ReferenceFieldError,
    load_flow,
)
from planner.views.validate import check_static

# This module is about another mechanism: nodes run as they would without compiled groups.
pytestmark = pytest.mark.usefixtures("uncompiled")

Write = Callable[..., Path]


def _with_password(dsn: str, password: str = "planner-ux-secret") -> str:
    """`dsn` with a password (the test server trusts local connections and ignores it)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{password}@{host}"))


# --- a degraded run says so -----------------------------------------------------------------


async def test_a_run_with_a_defaulted_node_is_degraded(write_flow: Write, planner: Planner) -> None:
    write_flow("""
        nodes:
          webhook: {call: tests.nodes:fail, with: {message: no config}, default: {url: null}}
          fine: {call: tests.nodes:echo, with: {value: 1}}
          skipped: {call: tests.nodes:echo, with: {value: 2}, when: false}
        """)
    result = await planner.run("t")
    assert result.status == "ok" and result.degraded is True
    assert list(result.defaulted) == ["webhook"]
    assert isinstance(result.defaulted["webhook"], ValueError) and str(result.defaulted["webhook"]) == "no config"
    data = result.to_json()
    assert data["degraded"] is True and data["defaulted"] == {"webhook": "ValueError: no config"}
    assert "bug" not in data["nodes"]["webhook"]  # a failing function is not called a bug in the flow


async def test_a_run_without_defaults_is_not_degraded(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo, with: {value: 1}}\n  b: {call: tests.nodes:echo, when: false}\n")
    result = await planner.run("t")
    assert result.degraded is False and result.defaulted == {}
    assert result.to_json()["degraded"] is False and result.to_json()["defaulted"] == {}


# --- errors no retry can fix are called bugs ------------------------------------------------


@pytest.mark.parametrize(
    ("sqlstate", "bug"),
    [
        pytest.param("42601", True, id="syntax-error"),
        pytest.param("42P01", True, id="undefined-table"),
        pytest.param("42703", True, id="undefined-column"),
        pytest.param("42883", True, id="undefined-function"),
        pytest.param("42501", False, id="insufficient-privilege-is-the-deployments"),
        pytest.param("23505", False, id="unique-violation"),
        pytest.param("08006", False, id="connection-failure"),
        pytest.param(None, False, id="no-sqlstate"),
    ],
)
def test_query_errors_of_class_42_are_bugs(sqlstate: str | None, bug: bool) -> None:
    assert QueryError("x", sqlstate=sqlstate).is_bug is bug


def test_a_missing_field_is_a_bug_and_other_node_errors_are_not() -> None:
    assert ReferenceFieldError("x").is_bug is True
    assert QueryError("x", transient=True).is_bug is False


async def test_the_warning_for_a_defaulted_bug_says_so(write_flow: Write, demo_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    path = write_flow("nodes:\n  a: {sql: SELECT * FROM no_such_table, on_bug: default}\n  b: {sql: SELECT 1}\n")
    async with Planner(flows=path.parent, dsn=demo_dsn) as planner:
        with caplog.at_level(logging.WARNING, logger="planner"):
            result = await planner.run("t")
    assert result.degraded and isinstance(result.defaulted["a"], QueryError) and result.defaulted["a"].is_bug
    record = next(r for r in caplog.records if getattr(r, "node", None) == "a")
    assert "node a of flow t defaulted; looks like a bug in the flow (SQLSTATE 42P01): QueryError:" in record.getMessage()
    assert getattr(record, "bug", None) is True
    assert result.to_json()["nodes"]["a"]["bug"] is True


async def test_a_typo_in_a_field_is_called_a_bug(write_flow: Write, planner: Planner, caplog: pytest.LogCaptureFixture) -> None:
    write_flow("settings: {on_bug: default}\n"
               "nodes:\n  a: {call: tests.nodes:row, with: {id: 1}}\n  b: {call: tests.nodes:echo, with: {value: $a.idd}}\n")
    with caplog.at_level(logging.WARNING, logger="planner"):
        result = await planner.run("t")
    assert isinstance(result.defaulted["b"], ReferenceFieldError)
    assert any("looks like a bug in the flow (a field the upstream value does not have)" in r.getMessage()
               for r in caplog.records)


# --- which database, and never the embedded one by surprise -------------------------------


async def test_the_database_in_use_is_logged_once_without_its_password(write_flow: Write, demo_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    path = write_flow("nodes:\n  a: {sql: SELECT 1, fetch: value}\n")
    with caplog.at_level(logging.WARNING, logger="planner"):
        async with Planner(flows=path.parent, dsn=_with_password(demo_dsn)) as planner:
            await planner.run("t")
            await planner.run("t")
    said = [r for r in caplog.records if r.getMessage().startswith("planner uses the database")]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "(dsn: given by the caller)" in said[0].getMessage() and getattr(said[0], "database_source", None) == "dsn"
    assert "planner-ux-secret" not in caplog.text and ":***@" in said[0].getMessage()


async def test_database_url_is_named_as_the_reason(write_flow: Write, demo_dsn: str, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = write_flow("nodes:\n  a: {sql: SELECT 1, fetch: value}\n")
    monkeypatch.setenv("DATABASE_URL", demo_dsn)
    with caplog.at_level(logging.WARNING, logger="planner"):
        async with Planner(flows=path.parent) as planner:
            await planner.run("t")
    said = next(r for r in caplog.records if r.getMessage().startswith("planner uses the database"))
    assert getattr(said, "database_source", None) == "DATABASE_URL" and "DATABASE_URL: no dsn= given" in said.getMessage()


async def test_the_embedded_fallback_is_named_as_the_reason(write_flow: Write, demo_dsn: str, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    import planner.db.pool

    path = write_flow("nodes:\n  a: {sql: SELECT 1, fetch: value}\n")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("PLANNER_EMBEDDED", raising=False)
    monkeypatch.setattr(planner.db.pool, "embedded_dsn", lambda: demo_dsn)  # stands in for the embedded server
    with caplog.at_level(logging.WARNING, logger="planner"):
        async with Planner(flows=path.parent) as p:
            assert (await p.run("t")).output == {"a": 1}
    said = next(r for r in caplog.records if r.getMessage().startswith("planner uses the database"))
    assert getattr(said, "database_source", None) == "embedded" and "PLANNER_EMBEDDED=0 forbids this fallback" in said.getMessage()


@pytest.mark.parametrize(
    ("flag", "env", "says"),
    [
        pytest.param(False, None, "embedded=False", id="argument"),
        pytest.param(None, "0", "PLANNER_EMBEDDED=0", id="environment"),
        pytest.param(False, "1", "embedded=False", id="argument-beats-environment"),
    ],
)
async def test_a_service_can_forbid_the_embedded_fallback(write_flow: Write, monkeypatch: pytest.MonkeyPatch,
                                                          flag: bool | None, env: str | None, says: str) -> None:
    import planner.db.pool

    def never() -> str:
        raise AssertionError("the embedded server must not be started")

    monkeypatch.setattr(planner.db.pool, "embedded_dsn", never)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    if env is None:
        monkeypatch.delenv("PLANNER_EMBEDDED", raising=False)
    else:
        monkeypatch.setenv("PLANNER_EMBEDDED", env)
    path = write_flow("nodes:\n  a: {sql: SELECT 1, fetch: value}\n")
    async with Planner(flows=path.parent, pool_options=PoolOptions(embedded=flag)) as p:
        with pytest.raises(DatabaseUnavailable, match="no database configured") as info:
            await p.run("t")
    assert says in str(info.value) and "DATABASE_URL" in str(info.value)


async def test_a_flow_without_sql_needs_no_database_even_without_the_fallback(write_flow: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    path = write_flow("nodes:\n  a: {call: tests.nodes:echo, with: {value: 3}}\n")
    async with Planner(flows=path.parent, pool_options=PoolOptions(embedded=False), call_options=CallOptions(allowed_modules=["tests"])) as p:
        assert (await p.run("t")).output == {"a": 3}


# --- a database lost during a run is not a bug ---------------------------------------------


def test_flow_database_lost_is_both_a_failed_run_and_an_unavailable_database() -> None:
    assert issubclass(FlowDatabaseLost, FlowFailed) and issubclass(FlowDatabaseLost, DatabaseUnavailable)


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        pytest.param(QueryError("connection lost: [Errno 104] reset", transient=True), True, id="socket"),
        pytest.param(QueryError("x", sqlstate="08006", transient=True), True, id="class-08"),
        pytest.param(QueryError("x", sqlstate="57P01", transient=True), True, id="admin-shutdown"),
        pytest.param(QueryError("x", sqlstate="53300", transient=True), True, id="too-many-connections"),
        pytest.param(QueryError("x", sqlstate="40001", transient=True), False, id="serialization-failure"),
        pytest.param(QueryError("x", sqlstate="42P01"), False, id="undefined-table"),
        pytest.param(ConnectionError("an HTTP API"), False, id="a-call-nodes-own-connection"),
    ],
)
async def test_a_failed_node_that_lost_the_database_raises_flow_database_lost(
    write_flow: Write, error: BaseException, lost: bool,
) -> None:
    from planner.api import NodeRun

    def wrapper(flow: str, node: str, run: NodeRun) -> NodeRun:
        async def broken(args: object) -> object:
            raise error

        return broken if node == "order" else run

    path = write_flow("nodes:\n  order: {call: tests.nodes:echo, with: {value: 1}, on_error: fail}\n")
    async with Planner(flows=path.parent, node_wrapper=wrapper, call_options=CallOptions(allowed_modules=["tests"])) as p:
        with pytest.raises(FlowFailed) as info:
            await p.run("t")
    assert isinstance(info.value, DatabaseUnavailable) is lost
    assert isinstance(info.value, FlowDatabaseLost) is lost
    assert info.value.result.status == "failed" and info.value.result.nodes["order"].error is error


async def test_a_connection_killed_mid_run_is_database_unavailable(write_flow: Write, demo_dsn: str) -> None:
    path = write_flow("""
        nodes:
          order:
            sql: SELECT pg_terminate_backend(pg_backend_pid())
            fetch: value
            on_error: fail
        """)
    async with Planner(flows=path.parent, dsn=demo_dsn) as p:
        with pytest.raises(DatabaseUnavailable) as info:  # what a web app catches for a 503
            await p.run("t")
    assert isinstance(info.value, FlowDatabaseLost) and isinstance(info.value, FlowFailed)
    assert info.value.result.nodes["order"].state is NodeState.FAILED
    assert isinstance(info.value.cause, QueryError) and info.value.cause.database_unavailable


async def test_a_bug_that_fails_the_run_is_a_plain_flow_failed(write_flow: Write, demo_dsn: str) -> None:
    path = write_flow("nodes:\n  order: {sql: SELECT * FROM no_such_table, on_error: fail}\n")
    async with Planner(flows=path.parent, dsn=demo_dsn) as p:
        with pytest.raises(FlowFailed) as info:
            await p.run("t")
    assert not isinstance(info.value, DatabaseUnavailable)


# --- load errors that say what to write ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param("nodes:\n  a: {sql: SELECT 1, fecth: one}\n", "unknown key 'fecth' (did you mean 'fetch'?)", id="node-key"),
        pytest.param("nodes:\n  a: {call: m:f, wiht: {}}\n", "unknown key 'wiht' (did you mean 'with'?)", id="alias"),
        pytest.param("nodes:\n  a: {sql: SELECT 1, retry: {attempt: 2}}\n", "unknown key 'attempt' (did you mean 'attempts'?)", id="retry"),
        pytest.param("settings: {mod: eager}\nnodes:\n  a: {sql: SELECT 1}\n", "unknown key 'mod' (did you mean 'mode'?)", id="settings"),
        pytest.param("inputs: {x: {type: int, defualt: 1}}\nnodes:\n  a: {sql: SELECT 1}\n", "did you mean 'default'?", id="input"),
        pytest.param("nodez:\n  a: {sql: SELECT 1}\n", "unknown key 'nodez' (did you mean 'nodes'?)", id="top-level-first"),
        pytest.param("nodes:\n  a: {call: m:f, fetch: one}\n", "unknown key 'fetch' (`fetch:` is a key of `sql:` nodes)", id="other-kind"),
        pytest.param("nodes:\n  a: {sqll: SELECT 1}\n", "a node needs either `sql:` or `call:` (is 'sqll' meant to be 'sql'?)", id="kind"),
        pytest.param("nodes:\n  a: {sql: SELECT 1, zzz: 1}\n", "unknown key 'zzz'", id="nothing-close"),
    ],
)
def test_an_unknown_key_suggests_the_closest_one(text: str, says: str) -> None:
    with pytest.raises(FlowFileError) as info:
        load_flow(text=text, name="f")
    assert says in str(info.value)
    assert str(info.value).count("did you mean") <= 1


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        pytest.param("nodes:\n\ta: {sql: SELECT 1}\n", 2, "a tab character: YAML indents with spaces", id="tab"),
        pytest.param("nodes:\n  a: {sql: SELECT 1\n", 3, "the `{` opened at line 2 is not closed", id="brace"),
        pytest.param("nodes:\n  a: [1, 2\n", 3, "the `[` opened at line 2 is not closed", id="bracket"),
        pytest.param("nodes:\n  a:\n    sql: SELECT a: b\n", 3, "quote a value that contains `: `", id="colon"),
        pytest.param("nodes:\n  a: {sql: \"SELECT 1}\n", 3, "the quoted text that starts at line 2 is never closed", id="quote"),
        pytest.param("x: &a 1\nnodes: *bee\n", 2, "`*bee` refers to an anchor `&bee` that is not defined", id="alias"),
        pytest.param("nodes:\n  a:\n    sql: SELECT 1\n   fetch: one\n", 4, "indentation does not fit the mapping", id="indent"),
        pytest.param("nodes:\n  - a\n  b: 1\n", 3, "must begin with `- `", id="list"),
        pytest.param("nodes:\n  a: {sql: @x}\n", 2, "'@' cannot start a value: put the value in quotes", id="reserved"),
    ],
)
def test_yaml_syntax_errors_are_said_in_plain_words(text: str, line: int, says: str) -> None:
    with pytest.raises(FlowFileError) as info:
        load_flow(text=text, name="f")
    assert info.value.message.startswith("YAML: syntax error: ") and says in info.value.message
    assert info.value.line == line


def test_an_unknown_with_argument_names_the_closest_parameter(write_flow: Write, tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text(
        "def pick(items: list, limit: int = 10, db=None):\n    return items[:limit]\n")
    path = write_flow("nodes:\n  a:\n    call: helpers:pick\n    with: {itms: [1, 2], limit: 1}\n")
    _, findings = check_static(path)
    assert [f.code for f in findings] == ["PLN301"]
    assert findings[0].message.endswith("unknown argument 'itms' (did you mean 'items'?)")
    assert (findings[0].line, findings[0].column) == (4, 12)  # at the key itself


def test_a_missing_with_argument_is_named(write_flow: Write, tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("def pick(items, limit=10, db=None):\n    return items\n")
    path = write_flow("nodes:\n  a: {call: 'helpers:pick', with: {limit: 1}}\n")
    _, findings = check_static(path)
    assert findings[0].message.endswith("missing argument 'items'")  # `db` is given by planner: never missing


# --- validate finds SQL syntax errors offline ----------------------------------------------


def test_validate_without_a_database_finds_syntax_errors_where_they_are(write_flow: Write) -> None:
    path = write_flow("""
        inputs: {name: str}
        nodes:
          a:
            sql: |
              SELECT $name, id
              FRM whatsapp_instances
          b: {sql: "SELECT $a.0.id, $name WHERE WHERE"}
          c:
            sql:
              - SELECT 1
              - SELECT FROM FROM
          d: {sql: SELECT $name FROM}
          fine: {sql: "SELECT $name, 'FRM x' -- FRM"}
        """)
    _, findings = check_static(path)
    got = [(f.node, f.code, f.line, f.column) for f in findings]
    assert got == [("a", "PLN111", 6, 11), ("b", "PLN111", 7, 41), ("c", "PLN111", 11, 21), ("d", "PLN111", 12, 29)]
    assert findings[0].message == 'SQL does not parse: syntax error at or near "whatsapp_instances" (SQL line 2, column 5)'
    assert "end of input" in findings[3].message


def test_the_seed_flows_parse() -> None:
    for path in sorted(Path(__file__).resolve().parent.parent.joinpath("flows").glob("*.yaml")):
        assert check_static(path)[1] == [], path


# --- the format documents itself -----------------------------------------------------------


def test_every_field_of_the_format_has_a_description() -> None:
    from planner.lang.models import CallNode, FlowSpec, InputSpec, Retry, Settings, SqlNode

    missing = [f"{model.__name__}.{name}" for model in (FlowSpec, InputSpec, Settings, Retry, SqlNode, CallNode)
               for name, info in model.model_fields.items() if not info.description]
    assert missing == []


def test_the_reference_documents_every_key_of_the_schema() -> None:
    from planner.lang.schema import flow_schema

    keys: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            keys.update(node.get("properties", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(flow_schema())
    reference = (Path(__file__).resolve().parent.parent / "docs" / "flows.md").read_text()
    assert sorted(k for k in keys if f"`{k}" not in reference) == []


# --- recorded latencies belong to a project --------------------------------------------------


def test_recorded_latencies_are_kept_per_flows_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from planner.results import FlowResult, NodeResult
    from planner.views import stats

    monkeypatch.setenv("PLANNER_HOME", str(tmp_path / "home"))
    one, two = tmp_path / "one" / "flows", tmp_path / "two" / "flows"

    def result(ms: float) -> FlowResult:
        return FlowResult("orders", "r", "eager", "ok", {"a": NodeResult(NodeState.OK, 1, None, 1, 0.0, ms)}, None, ms)

    stats.record(result(10.0), one)
    stats.record(result(30.0), two)
    stats.record(result(20.0), one)
    assert stats.recorded_latencies("orders", one) == {"a": 15.0}
    assert stats.recorded_latencies("orders", two) == {"a": 30.0}
    assert stats.recorded_latencies("orders", tmp_path / "three") == {}
    assert stats.stats_path("orders", one) != stats.stats_path("orders", two)
    assert stats.stats_path("orders", one).parent == tmp_path / "home" / "stats"


def test_flow_error_is_the_base_of_the_new_error() -> None:
    assert issubclass(FlowDatabaseLost, FlowError)
