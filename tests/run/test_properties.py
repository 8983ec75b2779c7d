"""Properties on random DAGs with random latencies and failures (hypothesis)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner import CallOptions, CompiledFlow, FlowFailed, FlowResult, NodeState, Planner, load_flow
from planner.kinds.backend import Offline
from tests import nodes

pytestmark = pytest.mark.slow

_planner = Planner(backend=Offline(), call_options=CallOptions(allowed_modules=["tests"]))  # call nodes only: no database


async def execute(flow: CompiledFlow, inputs: dict[str, Any], mode: str | None = None) -> FlowResult:
    return await _planner.run(flow, inputs, mode=mode)


@st.composite
def dags(draw: st.DrawFn, fail_fast: bool = False) -> str:
    n = draw(st.integers(1, 10))
    lines = ["nodes:"]
    for i in range(n):
        deps = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        ms = draw(st.sampled_from([0, 1, 3, 8]))
        fails = draw(st.booleans()) if draw(st.integers(0, 4)) == 0 else False
        policy = "fail" if fail_fast and fails and draw(st.booleans()) else "default"
        args = ", ".join([f"ms: {ms}", f"fail: {str(fails).lower()}"] + [f"d{d}: $n{d}" for d in sorted(deps)])
        when = f", when: '$n{min(deps)} != {draw(st.integers(0, 3))}'" if deps and draw(st.integers(0, 5)) == 0 else ""
        lines.append(f"  n{i}: {{call: tests.nodes:work, with: {{{args}}}, on_error: {policy}, default: 0{when}}}")
    return "\n".join(lines) + "\n"


def _compile(text: str) -> CompiledFlow:
    return load_flow(text=text, name="prop")


def _expected(text: str) -> dict[str, tuple[NodeState, int]]:
    """Each node's state and value, worked out from the flow text alone: `when` false skips
    (value: the default 0), `fail: true` defaults to 0, otherwise 1 + the sum of the values
    of its dependencies (a skipped or defaulted one gives its 0). File order is topological."""
    out: dict[str, tuple[NodeState, int]] = {}
    for name, node in yaml.safe_load(text)["nodes"].items():
        args = node["with"]
        deps = [out[ref.removeprefix("$")][1] for key, ref in args.items() if key.startswith("d")]
        when = node.get("when", "").split()  # '$nK != V'
        if when and out[when[0].removeprefix("$")][1] == int(when[2]):
            out[name] = (NodeState.SKIPPED, 0)
        elif args["fail"]:
            out[name] = (NodeState.DEFAULTED, 0)
        else:
            out[name] = (NodeState.OK, 1 + sum(deps))
    return out


_settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_settings
@given(text=dags())
async def test_the_three_modes_agree_on_values_and_states(text: str) -> None:
    flow = _compile(text)
    results = [await execute(flow, {}, mode=mode) for mode in ("eager", "layered", "sequential")]
    assert results[0].values == results[1].values == results[2].values
    assert results[0].states() == results[1].states() == results[2].states()


@_settings
@given(text=dags())
async def test_every_node_ends_in_exactly_one_state(text: str) -> None:
    flow = _compile(text)
    result = await execute(flow, {})
    assert list(result.nodes) == list(flow.order)  # every node once
    assert {name: (node.state, node.value) for name, node in result.nodes.items()} == _expected(text)
    for name, node in result.nodes.items():  # and what a node reports fits the one state it is in
        ran = node.state is not NodeState.SKIPPED
        assert node.attempts == int(ran), name
        assert (node.started_ms is not None and node.finished_ms is not None) == ran, name
        assert (node.error is not None) == (node.state is NodeState.DEFAULTED), name


@settings(max_examples=15, deadline=None)
@given(text=dags())
async def test_eager_is_never_slower_than_layered(text: str) -> None:
    flow = _compile(text.replace("ms: 1,", "ms: 10,").replace("ms: 3,", "ms: 30,").replace("ms: 8,", "ms: 60,"))
    eager = await execute(flow, {}, mode="eager")
    layered = await execute(flow, {}, mode="layered")
    # Generous margin for a noisy machine: the structural gap is what matters (see benchmarks/).
    assert eager.elapsed_ms <= layered.elapsed_ms + 25


@_settings
@given(text=dags(fail_fast=True))
async def test_after_a_fail_fast_no_node_is_left_running(text: str) -> None:
    flow = _compile(text)
    try:
        result = await execute(flow, {})
    except FlowFailed as exc:
        result = exc.result
        failed = [n for n, r in result.nodes.items() if r.state is NodeState.FAILED]
        assert len(failed) >= 1
        for name in failed:
            for later in flow.graph.successors(name):
                assert result.nodes[later].state is NodeState.CANCELLED
    assert nodes.running["now"] == 0
    assert len(result.nodes) == len(flow.nodes)


@pytest.mark.parametrize("mode", ["eager", "layered", "sequential"])
async def test_fail_fast_leaves_nothing_running_in_any_mode(mode: str) -> None:
    flow = _compile(
        "nodes:\n"
        "  a: {call: tests.nodes:work, with: {ms: 1, fail: true}, on_error: fail}\n"
        "  b: {call: tests.nodes:work, with: {ms: 500}}\n"
        "  c: {call: tests.nodes:work, with: {ms: 1, x: $a}}\n"
    )
    with pytest.raises(FlowFailed) as info:
        await execute(flow, {}, mode=mode)
    assert nodes.running["now"] == 0
    assert info.value.result.states()["c"] == "cancelled"
