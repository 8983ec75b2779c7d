"""A run never answers wrong quietly (issue #22): what a failure does to a node when its flow says
nothing (`settings.on_error`, `Planner(on_error=)`, `PLANNER_ON_ERROR`), errors that mean the flow
itself is wrong fail the run whatever `default:` says (`on_bug`), and `required: true` makes a
missing row the node's error (`NotFound`) instead of a null."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from planner import (
    CallOptions,
    FlowFailed,
    FlowFileError,
    FlowNotFound,
    NodeState,
    NotFound,
    Planner,
    PoolOptions,
    QueryError,
    ReferenceFieldError,
    load_flow,
)
from planner.kinds.backend import Offline

Write = Callable[..., Path]
FAILING = "  a: {call: tests.nodes:fail, default: fallback}\n  b: {call: tests.nodes:echo, with: {value: 1}}\n"


def _offline(folder: Path, **kw: object) -> Planner:
    return Planner(flows=folder, backend=Offline(), **kw, call_options=CallOptions(allowed_modules=["tests"]))  # type: ignore[arg-type]


# --- what a failure does when the node says nothing ----------------------------------------


async def test_a_failing_node_defaults_when_nothing_says_otherwise(write_flow: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLANNER_ON_ERROR", raising=False)
    path = write_flow("nodes:\n" + FAILING)
    result = await _offline(path.parent).run("t")
    assert result.nodes["a"].state is NodeState.DEFAULTED and result.degraded


async def test_settings_on_error_fail_makes_fail_the_flows_default(write_flow: Write) -> None:
    path = write_flow("settings: {on_error: fail}\nnodes:\n" + FAILING)
    with pytest.raises(FlowFailed) as info:
        await _offline(path.parent).run("t")
    assert info.value.result.nodes["a"].state is NodeState.FAILED


async def test_a_nodes_own_on_error_beats_the_flows(write_flow: Write) -> None:
    path = write_flow("settings: {on_error: fail}\nnodes:\n"
                      "  a: {call: tests.nodes:fail, default: fallback, on_error: default}\n")
    result = await _offline(path.parent).run("t")
    assert result.nodes["a"].state is NodeState.DEFAULTED and result.values["a"] == "fallback"


async def test_planner_on_error_fail_fails_a_run_whose_flow_says_nothing(write_flow: Write) -> None:
    path = write_flow("nodes:\n" + FAILING)
    with pytest.raises(FlowFailed):
        await _offline(path.parent, on_error="fail").run("t")


async def test_the_environment_sets_the_planners_on_error(write_flow: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNER_ON_ERROR", "fail")
    path = write_flow("nodes:\n" + FAILING)
    with pytest.raises(FlowFailed):
        await _offline(path.parent).run("t")


async def test_the_argument_beats_the_environment(write_flow: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNER_ON_ERROR", "fail")
    path = write_flow("nodes:\n" + FAILING)
    result = await _offline(path.parent, on_error="default").run("t")
    assert result.nodes["a"].state is NodeState.DEFAULTED


async def test_the_flows_settings_beat_the_planners_on_error(write_flow: Write) -> None:
    path = write_flow("settings: {on_error: default}\nnodes:\n" + FAILING)
    result = await _offline(path.parent, on_error="fail").run("t")
    assert result.nodes["a"].state is NodeState.DEFAULTED


@pytest.mark.parametrize("where", ["argument", "environment"])
def test_an_unknown_on_error_is_refused_at_once(where: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if where == "environment":
        monkeypatch.setenv("PLANNER_ON_ERROR", "failure")
        kw: dict[str, object] = {}
    else:
        kw = {"on_error": "failure"}
    with pytest.raises(ValueError, match="'failure': choose default or fail"):
        _offline(tmp_path, **kw)


def test_an_unknown_settings_on_error_is_a_load_error() -> None:
    with pytest.raises(FlowFileError, match="on_error"):
        load_flow(text="settings: {on_error: retry}\nnodes: {a: {sql: SELECT 1}}\n")


async def test_a_defaulted_node_is_logged_with_flow_node_and_error(write_flow: Write, caplog: pytest.LogCaptureFixture) -> None:
    path = write_flow("nodes:\n" + FAILING)
    with caplog.at_level(logging.WARNING, logger="planner"):
        result = await _offline(path.parent).run("t")
    record = next(r for r in caplog.records if getattr(r, "outcome", None) == "defaulted")
    assert (getattr(record, "flow", None), getattr(record, "node", None)) == ("t", "a")
    assert "node a of flow t defaulted" in record.getMessage() and "boom" in record.getMessage()
    assert list(result.defaulted) == ["a"] and result.to_json()["degraded"] is True


# --- errors that mean the flow is wrong fail the run ---------------------------------------


@pytest.mark.parametrize(
    ("sql", "sqlstate"),
    [
        pytest.param("SELECT no_such_column FROM whatsapp_instances", "42703", id="unknown-column"),
        pytest.param("SELECT 1 FRM whatsapp_instances", "42601", id="syntax"),
        pytest.param("SELECT * FROM no_such_table", "42P01", id="unknown-table"),
        pytest.param("SELECT no_such_function(1)", "42883", id="unknown-function"),
        pytest.param("SELECT id FROM whatsapp_instances a, whatsapp_instances b", "42702", id="ambiguous"),
        pytest.param("SELECT no_such_schema.f(1)", "3F000", id="unknown-schema"),
    ],
)
async def test_an_error_that_means_the_flow_is_wrong_fails_the_run_whatever_default_says(
        write_flow: Write, demo_dsn: str, sql: str, sqlstate: str) -> None:
    path = write_flow(f"nodes:\n  a: {{sql: '{sql}', default: [], on_error: default}}\n  b: {{sql: SELECT 1}}\n")
    async with Planner(flows=path.parent, dsn=demo_dsn) as planner:
        with pytest.raises(FlowFailed) as info:
            await planner.run("t")
    error = info.value.result.nodes["a"].error
    assert isinstance(error, QueryError) and error.sqlstate == sqlstate
    assert info.value.result.nodes["a"].state is NodeState.FAILED
    assert f"looks like a bug in the flow (SQLSTATE {sqlstate})" in str(info.value)
    assert "on_bug: default" in str(info.value)


async def test_a_field_the_upstream_row_lacks_fails_the_run(write_flow: Write) -> None:
    path = write_flow("nodes:\n  a: {call: tests.nodes:row, with: {id: 1}}\n"
                      "  b: {call: tests.nodes:echo, with: {value: $a.idd}, default: 0}\n")
    with pytest.raises(FlowFailed) as info:
        await _offline(path.parent).run("t")
    assert isinstance(info.value.result.nodes["b"].error, ReferenceFieldError)


async def test_on_bug_default_on_the_node_lets_a_bug_default_loudly(write_flow: Write, caplog: pytest.LogCaptureFixture) -> None:
    path = write_flow("nodes:\n  a: {call: tests.nodes:row, with: {id: 1}}\n"
                      "  b: {call: tests.nodes:echo, with: {value: $a.idd}, default: 0, on_bug: default}\n")
    with caplog.at_level(logging.WARNING, logger="planner"):
        result = await _offline(path.parent).run("t")
    assert result.nodes["b"].state is NodeState.DEFAULTED and result.values["b"] == 0
    assert any("looks like a bug in the flow" in r.getMessage() for r in caplog.records)


async def test_settings_on_bug_default_lets_every_node_default_on_a_bug(write_flow: Write) -> None:
    path = write_flow("settings: {on_bug: default}\nnodes:\n  a: {call: tests.nodes:row, with: {id: 1}}\n"
                      "  b: {call: tests.nodes:echo, with: {value: $a.idd}, default: 0}\n")
    result = await _offline(path.parent).run("t")
    assert result.nodes["b"].state is NodeState.DEFAULTED


async def test_on_bug_default_still_fails_a_node_that_says_on_error_fail(write_flow: Write) -> None:
    path = write_flow("settings: {on_bug: default}\nnodes:\n  a: {call: tests.nodes:row, with: {id: 1}}\n"
                      "  b: {call: tests.nodes:echo, with: {value: $a.idd}, on_error: fail}\n")
    with pytest.raises(FlowFailed) as info:
        await _offline(path.parent).run("t")
    assert "looks like a bug" not in str(info.value)  # it failed because it said so, not as a bug


@pytest.mark.parametrize(
    ("sqlstate", "bug"),
    [
        pytest.param("42P05", False, id="duplicate-prepared-statement-a-poolers"),
        pytest.param("42501", False, id="privilege-a-grant"),
        pytest.param("26000", False, id="missing-prepared-statement-a-poolers"),
        pytest.param("0A000", False, id="cached-plan-changed"),
        pytest.param("3F000", True, id="unknown-schema"),
        pytest.param("42P01", True, id="unknown-table"),
    ],
)
def test_which_sqlstates_mean_the_flow_is_wrong(sqlstate: str, bug: bool) -> None:
    assert QueryError("x", sqlstate=sqlstate).is_bug is bug


async def test_a_privilege_error_still_follows_on_error(write_flow: Write, demo_dsn: str) -> None:
    import asyncpg

    con = await asyncpg.connect(demo_dsn)
    try:
        await con.execute("CREATE ROLE planner_degrade_reader LOGIN PASSWORD 'p'; "
                          "CREATE TABLE secret (x int); GRANT CONNECT ON DATABASE "
                          f"\"{con._params.database}\" TO planner_degrade_reader")
    except asyncpg.DuplicateObjectError:
        await con.execute("CREATE TABLE secret (x int)")
    finally:
        await con.close()
    parts = urlsplit(demo_dsn)
    dsn = urlunsplit(parts._replace(netloc=parts.netloc.replace(f"{parts.username}:{parts.password or ''}@",
                                                               "planner_degrade_reader:p@")))
    assert "planner_degrade_reader" in dsn
    path = write_flow("nodes:\n  a: {sql: SELECT x FROM secret, default: []}\n")
    async with Planner(flows=path.parent, dsn=dsn) as planner:
        result = await planner.run("t")
    error = result.nodes["a"].error
    assert result.nodes["a"].state is NodeState.DEFAULTED and isinstance(error, QueryError) and error.sqlstate == "42501"


# --- required: true ------------------------------------------------------------------------

REQUIRED = """
inputs: {id: int}
nodes:
  instance:
    sql: SELECT id, instance_name FROM whatsapp_instances WHERE id = $id
    fetch: one
    required: true
  other:
    sql: SELECT count(*) AS n FROM whatsapp_instances
    fetch: one
"""


@pytest.mark.parametrize("mode", ["eager", "sequential"])
async def test_no_row_for_a_required_node_raises_not_found(write_flow: Write, demo_dsn: str, mode: str) -> None:
    path = write_flow(REQUIRED)
    async with Planner(flows=path.parent, dsn=demo_dsn) as planner:
        with pytest.raises(NotFound) as info:
            await planner.run("t", {"id": -1}, mode=mode)
    assert isinstance(info.value, FlowFailed) and isinstance(info.value, FlowNotFound)
    node = info.value.result.nodes["instance"]
    assert node.state is NodeState.FAILED and isinstance(node.error, NotFound)
    assert "required: true" in str(info.value)


async def test_a_row_for_a_required_node_is_its_value(write_flow: Write, demo_dsn: str) -> None:
    path = write_flow(REQUIRED)
    async with Planner(flows=path.parent, dsn=demo_dsn) as planner:
        result = await planner.run("t", {"id": 1})
    assert result.values["instance"]["id"] == 1 and not result.degraded


async def test_concurrent_runs_of_a_required_node_each_get_their_own_answer(write_flow: Write, demo_dsn: str) -> None:
    # Reads of concurrent runs may share one statement: a missing row is still only its own run's error.
    import asyncio

    path = write_flow(REQUIRED)
    async with Planner(flows=path.parent, dsn=demo_dsn, pool_options=PoolOptions(max_size=2)) as planner:
        outcomes = await asyncio.gather(*(planner.run("t", {"id": i % 2 or -1}) for i in range(20)),
                                        return_exceptions=True)
    for i, outcome in enumerate(outcomes):
        if i % 2:
            assert not isinstance(outcome, BaseException) and outcome.values["instance"]["id"] == 1
        else:
            assert isinstance(outcome, NotFound), outcome


async def test_a_required_node_that_says_on_error_default_defaults_loudly(write_flow: Write, demo_dsn: str) -> None:
    path = write_flow(REQUIRED.replace("required: true", "required: true\n    on_error: default\n    default: {id: 0}"))
    async with Planner(flows=path.parent, dsn=demo_dsn) as planner:
        result = await planner.run("t", {"id": -1})
    assert result.degraded and isinstance(result.defaulted["instance"], NotFound)
    assert result.values["instance"] == {"id": 0}


async def test_a_required_node_beats_the_flows_on_error_default(write_flow: Write, demo_dsn: str) -> None:
    path = write_flow("settings: {on_error: default}\n" + REQUIRED.lstrip())
    async with Planner(flows=path.parent, dsn=demo_dsn) as planner:
        with pytest.raises(NotFound):
            await planner.run("t", {"id": -1})


@pytest.mark.parametrize(
    ("fetch", "says"),
    [
        pytest.param("value", "fetch: value cannot tell no row from a NULL column", id="value"),
        pytest.param("all", "fetch: all returns a list", id="all"),
        pytest.param("none", "fetch: none returns the command status", id="none"),
        pytest.param(None, "fetch: all returns a list", id="fetch-not-written"),
    ],
)
def test_required_without_fetch_one_is_refused_naming_file_line_and_node(fetch: str | None, says: str, tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    fetch_line = f"    fetch: {fetch}\n" if fetch else ""
    path.write_text(f"nodes:\n  ok: {{sql: SELECT 1}}\n  a:\n    sql: SELECT 1\n{fetch_line}    required: true\n")
    with pytest.raises(FlowFileError) as info:
        load_flow(path)
    assert info.value.node == "a" and info.value.line == (6 if fetch else 5)
    assert "required: true needs fetch: one" in str(info.value) and says in str(info.value)
    assert str(info.value).startswith(f"{path}:")


def test_required_on_a_call_node_is_an_unknown_key() -> None:
    with pytest.raises(FlowFileError, match="unknown key 'required'"):
        load_flow(text="nodes:\n  a: {call: tests.nodes:quick, required: true}\n")


def test_the_schema_offers_required_on_error_and_on_bug() -> None:
    from planner.lang.schema import flow_schema

    text = str(flow_schema())
    for key in ("'required'", "'on_bug'", "'on_error'"):
        assert key in text


# --- the new user's scenario: a service under load never answers wrong quietly ---------------

LOADED = """
inputs: {id: int}
nodes:
  instance:
    sql: SELECT id, instance_name FROM whatsapp_instances WHERE id = $id
    fetch: one
    required: true
  summary: {call: tests.nodes:nap, with: {ms: 2, value: $instance.instance_name}}
  echoed: {call: tests.nodes:echo, with: {value: $instance.id}}
output: {name: $summary, id: $echoed}
"""


@pytest.mark.parametrize("threads", [None, 4], ids=["sized-by-planner", "four-threads"])
async def test_200_concurrent_runs_with_sync_and_async_calls_all_answer_right(
        write_flow: Write, demo_dsn: str, threads: int | None) -> None:
    import asyncio

    path = write_flow(LOADED)
    async with Planner(flows=path.parent, dsn=demo_dsn, call_options=CallOptions(allowed_modules=["tests"], threads=threads)) as planner:
        expected = (await planner.run("t", {"id": 1})).output
        assert expected["id"] == 1 and isinstance(expected["name"], str)
        results = await asyncio.gather(*(planner.run("t", {"id": 1}) for _ in range(200)))
        assert planner.threads.rejected == 0
    assert [r.output for r in results] == [expected] * 200
    assert not any(r.degraded for r in results)


# --- an output entry that names a field its node's value lacks --------------------------------

OUTPUT_TYPO = """
nodes:
  a: {call: tests.nodes:row, with: {id: 1}}
output: {id: $a.idd}
"""


async def test_an_output_entry_naming_a_missing_field_fails_the_run(write_flow: Write) -> None:
    path = write_flow(OUTPUT_TYPO)
    with pytest.raises(FlowFailed) as info:
        await _offline(path.parent).run("t")
    assert "output 'id'" in str(info.value) and "'idd'" in str(info.value)
    assert "looks like a bug in the flow" in str(info.value)
    assert info.value.result.status == "failed" and info.value.result.output is None


async def test_on_bug_default_makes_a_bad_output_entry_null_with_a_warning(
        write_flow: Write, caplog: pytest.LogCaptureFixture) -> None:
    path = write_flow("settings: {on_bug: default}\n" + OUTPUT_TYPO.lstrip())
    with caplog.at_level(logging.WARNING, logger="planner"):
        result = await _offline(path.parent).run("t")
    assert result.output == {"id": None}
    assert any("output id" in r.getMessage() and "'idd'" in r.getMessage() for r in caplog.records)


async def test_an_output_entry_that_walks_into_null_is_null(write_flow: Write) -> None:
    path = write_flow("nodes:\n  a: {call: tests.nodes:echo}\noutput: {id: $a.id}\n")
    assert (await _offline(path.parent).run("t")).output == {"id": None}
