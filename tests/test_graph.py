"""Dependencies are derived from references; groups, critical path and estimate from the graph."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from planner import FlowFileError, FlowGraphError, load_flow
from planner.graph import CompiledFlow, compile_flow, plan, trips
from planner.lang.loader import load_text

SEEDLIKE = """
inputs: {name: str, phone: str}
nodes:
  instance: {sql: "SELECT id FROM i WHERE n = $name", fetch: one, latency: 20ms}
  conversation: {sql: "SELECT id FROM c WHERE i = $instance.id AND p = $phone", fetch: one, latency: 30ms}
  webhook: {sql: "SELECT url FROM w WHERE i = $instance.id", latency: 50ms}
  escalated:
    call: tests.nodes:echo
    with: {value: $instance.id}
    when: $instance.enabled
    latency: 50ms
  duplicate: {sql: "SELECT 1 FROM m WHERE c = $conversation.id", fetch: value, latency: 50ms}
  history: {sql: "SELECT * FROM m WHERE c = $conversation.id", latency: 100ms}
  store:
    sql: "INSERT INTO m (c) VALUES ($conversation.id)"
    when: not $duplicate
    latency: 30ms
output:
  webhook: $webhook
"""


def _flow(text: str) -> CompiledFlow:
    return compile_flow(load_text(text, file="t.yaml", name="t"))


def test_dependencies_come_from_references_in_sql_with_and_when() -> None:
    flow = _flow(SEEDLIKE)
    assert flow.nodes["conversation"].deps == ("instance",)
    assert flow.nodes["escalated"].deps == ("instance",)
    assert set(flow.nodes["store"].deps) == {"conversation", "duplicate"}


def test_groups_are_topological_generations_in_file_order() -> None:
    assert _flow(SEEDLIKE).groups == (
        ("instance",),
        ("conversation", "webhook", "escalated"),
        ("duplicate", "history"),
        ("store",),
    )


def test_after_adds_an_ordering_only_dependency() -> None:
    flow = _flow("nodes:\n  check: {sql: SELECT 1}\n  write: {sql: SELECT 2, after: [check]}\n")
    assert flow.nodes["write"].deps == ("check",)
    assert flow.groups == (("check",), ("write",))


def test_critical_path_and_estimate_follow_latency_hints() -> None:
    p = plan(_flow(SEEDLIKE))
    assert p.critical_path == ("instance", "conversation", "history")
    assert p.sequential_ms == pytest.approx(330)
    assert p.parallel_ms == pytest.approx(150)
    assert p.unknown == ()


def test_recorded_latencies_override_hints() -> None:
    p = plan(_flow(SEEDLIKE), {"webhook": 500.0})
    assert p.critical_path == ("instance", "webhook")
    assert p.parallel_ms == pytest.approx(520)


def test_nodes_without_hints_are_listed_as_unknown() -> None:
    assert plan(_flow("nodes:\n  a: {sql: SELECT 1}\n")).unknown == ("a",)


@pytest.mark.parametrize(
    ("text", "cycle"),
    [
        pytest.param("nodes:\n  a: {sql: SELECT $a.x}\n", ["a", "a"], id="self"),
        pytest.param("nodes:\n  a: {sql: SELECT $b}\n  b: {sql: SELECT $a}\n", ["a", "b", "a"], id="two"),
        pytest.param(
            "nodes:\n  a: {sql: SELECT $c}\n  b: {sql: SELECT $a}\n  c: {sql: SELECT 1, after: [b]}\n",
            ["a", "b", "c", "a"],
            id="three-with-after",
        ),
    ],
)
def test_a_cycle_is_spelled_out(text: str, cycle: list[str]) -> None:
    with pytest.raises(FlowGraphError) as info:
        _flow(text)
    assert info.value.cycle is not None
    spelled = info.value.cycle
    assert spelled[0] == spelled[-1] and sorted(spelled[:-1]) == sorted(cycle[:-1])
    assert " -> ".join(spelled) in str(info.value)
    assert info.value.file == "t.yaml" and info.value.line is not None


def test_an_unknown_reference_names_node_line_and_a_suggestion() -> None:
    with pytest.raises(FlowGraphError) as info:
        _flow("inputs: {phone: str}\nnodes:\n  a:\n    sql: SELECT $phnoe\n")
    err = info.value
    assert (err.node, err.line) == ("a", 4)
    assert "$phnoe" in str(err) and "did you mean 'phone'" in str(err)


def test_an_unknown_after_is_refused() -> None:
    with pytest.raises(FlowGraphError, match="after: unknown node 'nope'"):
        _flow("nodes:\n  a: {sql: SELECT 1, after: [nope]}\n")


def test_an_unknown_reference_in_output_is_refused() -> None:
    with pytest.raises(FlowGraphError, match="output"):
        _flow("nodes:\n  a: {sql: SELECT 1}\noutput: {x: $b}\n")


def test_a_when_syntax_error_points_at_its_column() -> None:
    with pytest.raises(FlowFileError) as info:
        _flow("nodes:\n  a:\n    sql: SELECT 1\n    when: $x and and\n")
    assert (info.value.line, info.value.column) == (4, 18) and "column 8" in str(info.value)  # the second `and`


def test_positional_parameters_in_sql_point_to_the_named_form(write_flow: Callable[..., Path]) -> None:
    path = write_flow("nodes:\n  a:\n    sql: |\n      SELECT 1\n      WHERE x = $1\n")
    with pytest.raises(FlowFileError) as info:
        load_flow(path)
    assert (info.value.node, info.value.line, info.value.column) == ("a", 5, 17)  # the `$1` itself
    assert "SQL line 2" in str(info.value) and "$user_phone" in str(info.value)


@pytest.mark.slow  # loads and plans a 5,000-node flow
def test_five_thousand_nodes_load_and_plan(write_flow: Callable[..., Path]) -> None:
    lines = ["inputs: {x: int}", "nodes:"]
    for i in range(5000):
        deps = [f"$n{j}.v" for j in (i - 1, i // 2, i - 7) if 0 <= j < i]
        lines.append(f"  n{i}: {{sql: 'SELECT {' + '.join(deps) or '$x'}', fetch: one, latency: 1ms}}")
    path = write_flow("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    p = plan(load_flow(path))
    elapsed = time.perf_counter() - t0
    assert len(p.critical_path) == 5000  # every node follows its predecessor
    # Only a guard against a hang: how time grows with size is tests/lang/test_linear_load.py's job
    # (ratios), and the speed itself a benchmark's (about 1 s here, quiet machine).
    assert elapsed < 15.0, f"{elapsed:.2f}s"


def test_trips_count_statements_fusion_and_the_warm_cache() -> None:
    flow = compile_flow(load_text("""
        nodes:
          root: {sql: SELECT 1 AS id, fetch: one, cache: 30s}
          a: {sql: SELECT $root.id, fetch: value}
          b: {sql: SELECT $root.id + 1, fetch: value}
          c: {sql: SELECT $root.id + 2, fetch: value, fuse: false}
          w: {sql: ["UPDATE whatsapp_instances SET id = id WHERE id = $a", "SELECT $b"], fetch: value}
        """, name="t"))
    cold, warm = trips(flow), trips(flow, warm=True)
    assert cold.fused_groups == (("a", "b"),)
    assert cold.statements == 1 + 1 + 1 + 4  # root; a+b fused; c; w's two statements, BEGIN and COMMIT
    assert cold.critical == 1 + 1 + 4
    assert (warm.statements, warm.critical) == (6, 5)
