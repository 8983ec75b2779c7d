"""The executor: settled outcomes, when and skip, timeouts, retries, fail-fast, modes, overrides."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from planner import (
    CallOptions,
    FlowFailed,
    FlowFileError,
    FlowInputError,
    FlowTimeout,
    NodeResult,
    NodeState,
    NodeTimeout,
    Planner,
    ReferenceFieldError,
)
from planner.settings import Settings
from tests import nodes

Write = Callable[..., Path]


def _span(node: NodeResult) -> tuple[float, float]:
    """When a node started and finished (ms from the run's start): a node that ran has both."""
    assert node.started_ms is not None and node.finished_ms is not None, "a node that ran has no times"
    return node.started_ms, node.finished_ms


async def test_independent_nodes_run_together(write_flow: Write, planner: Planner) -> None:
    write_flow("""
        nodes:
          a: {call: tests.nodes:sleep, with: {ms: 150, value: 1}}
          b: {call: tests.nodes:sleep, with: {ms: 150, value: 2}}
          c: {call: tests.nodes:add, with: {a: $a, b: $b}}
        """)
    result = await planner.run("t")
    assert result.values == {"a": 1, "b": 2, "c": 3}
    assert result.status == "ok"
    # a and b overlap: each started before the other finished.
    (a_start, a_end), (b_start, b_end) = _span(result.nodes["a"]), _span(result.nodes["b"])
    assert a_start < b_end and b_start < a_end
    assert _span(result.nodes["c"])[0] >= max(a_end, b_end)


async def test_a_node_starts_as_soon_as_its_own_dependencies_settle(write_flow: Write, planner: Planner) -> None:
    # `slow` waits for an event only `after_fast` sets: it ends well only if `after_fast` ran
    # while `slow`, of the first layer, was still in flight.
    write_flow("""
        nodes:
          fast: {call: tests.nodes:step, with: {tag: fast}}
          slow: {call: tests.nodes:step, with: {tag: slow, wait: after_fast_ran, value: released}, timeout: 500ms, default: waited}
          after_fast: {call: tests.nodes:step, with: {tag: after_fast, signal: after_fast_ran, x: $fast}}
        """)
    result = await planner.run("t")
    assert result.states() == {"fast": "ok", "slow": "ok", "after_fast": "ok"}
    assert result.values["slow"] == "released"
    assert _span(result.nodes["after_fast"])[0] < _span(result.nodes["slow"])[1]
    # Layered waits for the whole first layer: `after_fast` cannot start before `slow` gives up.
    nodes.events.clear()
    layered = await planner.run("t", mode="layered")
    assert layered.nodes["slow"].state is NodeState.DEFAULTED and isinstance(layered.nodes["slow"].error, NodeTimeout)
    assert _span(layered.nodes["after_fast"])[0] >= _span(layered.nodes["slow"])[1]


async def test_output_maps_references(write_flow: Write, planner: Planner) -> None:
    write_flow("""
        inputs: {x: int}
        nodes:
          r: {call: tests.nodes:row, with: {id: $x, name: n}}
        output: {id: $r.id, both: [$x, $r.name], lit: "$$x"}
        """)
    result = await planner.run("t", {"x": 7})
    assert result.output == {"id": 7, "both": [7, "n"], "lit": "$x"}


async def test_without_output_the_caller_gets_every_value(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo, with: {value: 5}}\n")
    assert (await planner.run("t")).output == {"a": 5}


async def test_a_failed_node_is_defaulted_and_the_run_goes_on(write_flow: Write, planner: Planner, caplog: pytest.LogCaptureFixture) -> None:
    write_flow("""
        nodes:
          webhook: {call: tests.nodes:fail, with: {message: no config}, default: {url: null}}
          next: {call: tests.nodes:echo, with: {value: $webhook.url}}
        """)
    with caplog.at_level(logging.WARNING, logger="planner"):
        result = await planner.run("t")
    node = result.nodes["webhook"]
    assert node.state is NodeState.DEFAULTED and node.value == {"url": None}
    assert isinstance(node.error, ValueError) and str(node.error) == "no config"
    assert result.nodes["next"].state is NodeState.OK and result.status == "ok"
    record = next(r for r in caplog.records if getattr(r, "node", None) == "webhook")
    assert record.__dict__["flow"] == "t" and record.__dict__["run_id"] == result.run_id and record.exc_info is not None


async def test_default_is_null_when_none_is_given(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:fail}\n")
    result = await planner.run("t")
    assert result.nodes["a"].state is NodeState.DEFAULTED and result.nodes["a"].value is None


async def test_a_mutable_default_is_not_shared_between_runs(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:fail, default: []}\n")
    first = await planner.run("t")
    first.values["a"].append("leak")
    assert (await planner.run("t")).values["a"] == []


async def test_when_false_skips_with_the_default(write_flow: Write, planner: Planner) -> None:
    write_flow("""
        inputs: {enabled: bool}
        nodes:
          esc: {call: tests.nodes:sleep, with: {ms: 1, value: true, tag: esc}, when: $enabled, default: false}
        """)
    result = await planner.run("t", {"enabled": False})
    assert result.nodes["esc"].state is NodeState.SKIPPED
    assert result.values["esc"] is False and nodes.calls == []
    assert result.nodes["esc"].attempts == 0


async def test_a_null_upstream_skips_what_walks_into_it_and_on_down(write_flow: Write, planner: Planner) -> None:
    write_flow("""
        nodes:
          conv: {call: tests.nodes:echo, with: {value: null}}
          history: {call: tests.nodes:echo, with: {value: $conv.id}, default: []}
          count: {call: tests.nodes:echo, with: {value: $history.0.n}, default: 0}
          whole: {call: tests.nodes:echo, with: {value: $conv}}
        """)
    result = await planner.run("t")
    assert result.states() == {"conv": "ok", "history": "skipped", "count": "skipped", "whole": "ok"}
    assert result.values["history"] == [] and result.values["count"] == 0
    assert result.values["whole"] is None  # a whole null value is passed on, not a skip


async def test_a_missing_field_on_a_row_is_an_error_not_a_skip(write_flow: Write, planner: Planner) -> None:
    # A typo is a bug in the flow: it fails the run whatever `default:` says (see test_degrade).
    write_flow("""
        nodes:
          conv: {call: tests.nodes:row, with: {id: 1}}
          history: {call: tests.nodes:echo, with: {value: $conv.idd}, default: []}
        """)
    with pytest.raises(FlowFailed) as info:
        await planner.run("t")
    node = info.value.result.nodes["history"]
    assert node.state is NodeState.FAILED
    assert isinstance(node.error, ReferenceFieldError) and "'idd'" in str(node.error)


async def test_a_node_timeout_counts_as_a_failure(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  slow: {call: tests.nodes:step, with: {tag: slow, wait: never}, timeout: 50ms, default: late}\n")
    result = await planner.run("t")
    node = result.nodes["slow"]
    assert node.state is NodeState.DEFAULTED and node.value == "late"
    assert isinstance(node.error, NodeTimeout)
    assert nodes.cancelled == ["slow"]
    assert result.elapsed_ms < 3000


async def test_transient_errors_are_retried(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:flaky, with: {key: a, failures: 2}, retry: {attempts: 3, backoff: 1ms}}\n")
    result = await planner.run("t")
    assert result.nodes["a"].state is NodeState.OK and result.nodes["a"].attempts == 3
    assert nodes.attempts["a"] == 3


async def test_other_errors_are_not_retried_by_default(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:flaky, with: {key: a, failures: 1, transient: false}, retry: {attempts: 3, backoff: 1ms}}\n")
    result = await planner.run("t")
    assert result.nodes["a"].state is NodeState.DEFAULTED and result.nodes["a"].attempts == 1
    assert nodes.attempts["a"] == 1


async def test_retry_on_any_retries_every_error(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:flaky, with: {key: a, failures: 1, transient: false}, retry: {attempts: 2, backoff: 1ms, on: any}}\n")
    result = await planner.run("t")
    assert result.nodes["a"].state is NodeState.OK and result.nodes["a"].attempts == 2


async def test_retries_stop_at_the_attempt_limit(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:flaky, with: {key: a, failures: 9}, retry: {attempts: 3, backoff: 1ms}}\n")
    result = await planner.run("t")
    assert result.nodes["a"].state is NodeState.DEFAULTED and nodes.attempts["a"] == 3


async def test_a_failing_fail_node_stops_the_run_and_cancels_in_flight(write_flow: Write, planner: Planner) -> None:
    write_flow("""
        nodes:
          must: {call: tests.nodes:fail, with: {x: $gate}, on_error: fail}
          gate: {call: tests.nodes:step, with: {tag: gate, wait: slow_started}}
          slow: {call: tests.nodes:step, with: {tag: slow, signal: slow_started, wait: never}}
          later: {call: tests.nodes:echo, with: {value: $must}}
        """)
    with pytest.raises(FlowFailed) as info:
        await planner.run("t")
    result = info.value.result
    assert result.status == "failed"
    assert result.states() == {"gate": "ok", "must": "failed", "slow": "cancelled", "later": "cancelled"}
    assert nodes.cancelled == ["slow"]
    assert "must" in str(info.value) and isinstance(result.nodes["must"].error, ValueError)


async def test_the_run_deadline_cancels_what_is_unfinished(write_flow: Write, planner: Planner) -> None:
    write_flow("""
        settings: {timeout: 100ms}
        nodes:
          quick: {call: tests.nodes:echo, with: {value: 1}}
          slow: {call: tests.nodes:step, with: {tag: slow, wait: never, x: $quick}}
          after: {call: tests.nodes:echo, with: {value: $slow}}
        """)
    with pytest.raises(FlowTimeout) as info:
        await planner.run("t")
    assert info.value.result.states() == {"quick": "ok", "slow": "cancelled", "after": "cancelled"}
    assert info.value.result.status == "timeout"
    assert nodes.cancelled == ["slow"]


async def test_max_concurrency_bounds_nodes_in_flight(write_flow: Write, planner: Planner) -> None:
    body = "\n".join(f"  n{i}: {{call: tests.nodes:sleep, with: {{ms: 30, tag: n{i}}}}}" for i in range(6))
    write_flow("settings: {max_concurrency: 2}\nnodes:\n" + body + "\n")
    result = await planner.run("t")
    spans = [_span(n) for n in result.nodes.values()]
    most = max(sum(1 for s, f in spans if s <= t < f) for t, _ in spans)
    assert most == 2


async def test_overrides_replace_a_node_and_prune_what_only_it_needed(write_flow: Write, planner: Planner) -> None:
    write_flow("""
        nodes:
          instance: {call: tests.nodes:sleep, with: {ms: 1, tag: instance, value: {id: 1}}}
          webhook: {call: tests.nodes:sleep, with: {ms: 1, tag: webhook, x: $instance.id}}
          other: {call: tests.nodes:sleep, with: {ms: 1, tag: other, x: $instance.id}}
        """)
    result = await planner.run("t", overrides={"webhook": {"url": "x"}, "instance": {"id": 9}})
    assert result.values == {"instance": {"id": 9}, "webhook": {"url": "x"}, "other": None}
    assert sorted(nodes.calls) == ["other"]
    assert result.nodes["webhook"].attempts == 0


async def test_an_override_of_a_misspelt_node_suggests_the_node(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  settings: {call: tests.nodes:echo}\n")
    with pytest.raises(FlowInputError, match=r"unknown node 'setings' \(did you mean 'settings'\?\)"):
        await planner.run("t", overrides={"setings": 1})


async def test_a_misspelt_input_suggests_the_input(write_flow: Write, planner: Planner) -> None:
    write_flow("inputs: {user_phone: str}\nnodes:\n  a: {call: tests.nodes:echo, with: {value: $user_phone}}\n")
    with pytest.raises(FlowInputError, match=r"unknown input 'user_phon' \(did you mean 'user_phone'\?\)") as caught:
        await planner.run("t", {"user_phon": "+1"})
    assert caught.value.input == "user_phon"


async def test_a_misspelt_flow_name_suggests_the_flow(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo}\n", name="escalation")
    with pytest.raises(FlowFileError, match=r"no flow named 'escalaton' in .*/ \(did you mean 'escalation'\?\)"):
        await planner.run("escalaton")


async def test_an_override_of_an_unknown_node_is_an_input_error(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo}\n")
    with pytest.raises(FlowInputError, match="unknown node 'b'"):
        await planner.run("t", overrides={"b": 1})


@pytest.mark.parametrize("mode", ["eager", "layered", "sequential"])
async def test_every_mode_gives_the_same_values_and_states(write_flow: Write, planner: Planner, mode: str) -> None:
    write_flow("""
        inputs: {x: int}
        nodes:
          a: {call: tests.nodes:row, with: {v: $x}}
          b: {call: tests.nodes:fail, default: 0}
          c: {call: tests.nodes:add, with: {a: $a.v, b: $b}}
          d: {call: tests.nodes:echo, with: {value: $c}, when: $c > 100}
        """)
    result = await planner.run("t", {"x": 2}, mode=mode)
    assert result.mode == mode
    assert result.states() == {"a": "ok", "b": "defaulted", "c": "ok", "d": "skipped"}
    assert result.values["c"] == 2


async def test_sequential_runs_one_node_at_a_time(write_flow: Write, planner: Planner) -> None:
    # `a` waits for `b` to start: it is released when both run at once, and times out alone.
    write_flow("""
        nodes:
          a: {call: tests.nodes:step, with: {tag: a, wait: b_started, value: together}, timeout: 300ms, default: alone}
          b: {call: tests.nodes:step, with: {tag: b, signal: b_started}}
        """)
    assert (await planner.run("t", mode="eager")).values["a"] == "together"
    nodes.events.clear()
    result = await planner.run("t", mode="sequential")
    assert result.values["a"] == "alone" and isinstance(result.nodes["a"].error, NodeTimeout)
    assert _span(result.nodes["b"])[0] >= _span(result.nodes["a"])[1]


async def test_planner_mode_environment_overrides_everything(write_flow: Write, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    write_flow("settings: {mode: eager}\nnodes:\n  a: {call: tests.nodes:echo}\n")
    monkeypatch.setenv("PLANNER_MODE", "sequential")
    planner = Planner(flows=tmp_path, mode="eager", call_options=CallOptions(allowed_modules=["tests"]))
    assert (await planner.run("t", mode="layered")).mode == "sequential"


async def test_planner_mode_is_read_when_the_planner_is_made(write_flow: Write, planner: Planner,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo}\n")
    monkeypatch.setenv("PLANNER_MODE", "sequential")  # after `planner` was made: a restart takes it
    assert (await planner.run("t")).mode == "eager"


async def test_settings_given_to_a_planner_set_its_mode_without_the_environment(write_flow: Write, tmp_path: Path) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo}\n")
    planner = Planner(flows=tmp_path, settings=Settings(mode="layered"), call_options=CallOptions(allowed_modules=["tests"]))
    assert (await planner.run("t", mode="eager")).mode == "layered"


async def test_an_unknown_mode_is_an_input_error(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:echo}\n")
    with pytest.raises(FlowInputError, match="unknown mode"):
        await planner.run("t", mode="parallel")


async def test_sync_functions_run_in_a_worker_thread(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:add, with: {a: 1, b: 2}}\n  b: {call: tests.nodes:where}\n")
    result = await planner.run("t")
    assert result.values["a"] == 3
    ran = result.values["b"]
    assert ran["ident"] != threading.get_ident(), "a sync call ran on the event loop's thread"
    assert ran["name"].startswith("planner-call") and ran["loop"] is False


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        pytest.param({}, "missing input 'phone'", id="missing"),
        pytest.param({"phone": "1", "zzz": 1}, "unknown input 'zzz'", id="unknown"),
        pytest.param({"phone": 1}, "must be str", id="wrong-type"),
        pytest.param({"phone": "1", "limit": True}, "must be int", id="bool-is-not-int"),
    ],
)
async def test_inputs_are_checked_before_any_node_runs(write_flow: Write, planner: Planner, inputs: dict[str, Any], message: str) -> None:
    write_flow("inputs: {phone: str, limit: {type: int, default: 20}}\nnodes:\n  a: {call: tests.nodes:sleep, with: {ms: 1}}\n")
    with pytest.raises(FlowInputError, match=message):
        await planner.run("t", inputs)
    assert nodes.calls == []


async def test_input_defaults_are_filled(write_flow: Write, planner: Planner) -> None:
    write_flow("inputs: {limit: {type: int, default: 20}}\nnodes:\n  a: {call: tests.nodes:echo, with: {value: $limit}}\n")
    assert (await planner.run("t")).values["a"] == 20


async def test_cancelling_the_caller_cancels_every_node(write_flow: Write, planner: Planner) -> None:
    write_flow("""
        nodes:
          a: {call: tests.nodes:step, with: {tag: a, signal: a_started, wait: never}}
          b: {call: tests.nodes:step, with: {tag: b, signal: b_started, wait: never}}
        """)
    task = asyncio.create_task(planner.run("t"))
    async with asyncio.timeout(5):
        await nodes.event("a_started").wait()
        await nodes.event("b_started").wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(nodes.cancelled) == ["a", "b"]


async def test_every_node_reports_times_and_attempts(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:sleep, with: {ms: 20}}\n")
    node = (await planner.run("t")).nodes["a"]
    assert node.attempts == 1 and node.duration_ms is not None and node.duration_ms >= 15


async def test_a_node_that_ignores_cancellation_cannot_hold_the_run(write_flow: Write, planner: Planner) -> None:
    write_flow("settings: {timeout: 100ms}\nnodes:\n  a: {call: tests.nodes:stubborn, with: {ms: 3000}}\n")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(FlowTimeout):
        await planner.run("t")
    assert loop.time() - t0 < 2.5  # deadline plus the stop grace, not the node's 3 s


async def test_a_node_that_cancels_itself_is_a_failure_not_a_cancellation(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:cancels_itself, default: d}\n")
    result = await planner.run("t")
    assert result.nodes["a"].state is NodeState.DEFAULTED and result.status == "ok"


async def test_a_nodes_own_timeout_error_is_not_mistaken_for_its_timeout(write_flow: Write, planner: Planner) -> None:
    write_flow("nodes:\n  a: {call: tests.nodes:own_timeout, timeout: 5s}\n")
    error = (await planner.run("t")).nodes["a"].error
    assert isinstance(error, TimeoutError) and not isinstance(error, NodeTimeout)


async def test_a_finished_run_is_freed_without_the_cyclic_garbage_collector(write_flow: Write, planner: Planner) -> None:
    # Under load every run's objects must go as soon as the run is done: a reference cycle (a run
    # holding a method bound to itself, say) leaves each run to the cyclic GC, whose passes then
    # cost every later allocation.
    import gc

    write_flow("""
        nodes:
          a: {call: tests.nodes:echo, with: {value: 1}}
          b: {call: tests.nodes:echo, with: {value: $a}}
          c: {call: tests.nodes:echo, with: {value: $a}}
        """)
    for _ in range(3):
        await planner.run("t")  # warm: the flow compiled and bound
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            result = await planner.run("t")
            assert result.output == {"a": 1, "b": 1, "c": 1}
        del result
        assert gc.collect() == 0
    finally:
        gc.enable()
