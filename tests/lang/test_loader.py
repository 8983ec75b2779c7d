"""Loading flow files: every mistake is a FlowFileError naming the file, the line and the node."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from planner import FlowFileError, load_flow
from planner.lang.models import parse_duration
from planner.lang.nodes import CallBody

GOOD = """
description: ok
inputs:
  phone: str
  limit: {type: int, default: 20}
settings: {mode: layered, timeout: 5s, node_timeout: 2s, max_concurrency: 4}
nodes:
  a:
    call: tests.nodes:echo
    with: {value: $phone}
  b:
    sql: SELECT $a.x LIMIT $limit
    fetch: one
    timeout: 300ms
    retry: {attempts: 3, backoff: 20ms}
output:
  b: $b
"""


def test_a_good_flow_loads_with_its_settings(write_flow: Callable[..., Path]) -> None:
    flow = load_flow(write_flow(GOOD))
    assert flow.name == "t"
    assert list(flow.nodes) == ["a", "b"]
    assert flow.settings.mode == "layered"
    assert flow.settings.timeout == 5.0
    assert flow.nodes["b"].timeout == pytest.approx(0.3)
    assert flow.nodes["a"].timeout == 2.0  # settings.node_timeout is the default
    assert flow.nodes["b"].retry.attempts == 3
    assert flow.inputs["limit"].default == 20 and not flow.inputs["limit"].required


def _error(write_flow: Callable[..., Path], text: str) -> FlowFileError:
    path = write_flow(text)
    with pytest.raises(FlowFileError) as info:
        load_flow(path)
    assert str(path) in str(info.value)
    return info.value


def test_unknown_key_names_file_line_and_node(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, """
        nodes:
          a:
            call: tests.nodes:echo
            retires: 3
        """)
    assert (err.line, err.node) == (4, "a")
    assert "unknown key 'retires'" in str(err)
    assert str(err).startswith(f"{err.file}:4:")


FOUR_TYPOS = """
    nodes:
      a: {sql: SELECT 1, fetchh: one}
      b: {sql: SELECT 2, fetchh: one}
      c: {sql: SELECT 3, timeot: 1s}
      d: {call: tests.nodes:echo, wth: {value: 1}}
    """


def test_an_unknown_key_in_four_nodes_is_four_problems_each_in_its_place(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, FOUR_TYPOS)
    assert [(p.node, p.line, p.message) for p in err.problems] == [
        ("a", 2, "unknown key 'fetchh' (did you mean 'fetch'?)"),
        ("b", 3, "unknown key 'fetchh' (did you mean 'fetch'?)"),
        ("c", 4, "unknown key 'timeot' (did you mean 'timeout'?)"),
        ("d", 5, "unknown key 'wth' (did you mean 'with'?)"),
    ]


def test_the_message_of_several_problems_names_each_ones_node_and_line(write_flow: Callable[..., Path]) -> None:
    text = str(_error(write_flow, FOUR_TYPOS))
    assert "and 3 more" in text
    assert "node 'b': unknown key 'fetchh' (did you mean 'fetch'?) (line 3)" in text
    assert "node 'd': unknown key 'wth' (did you mean 'with'?) (line 5)" in text


def test_one_problem_is_its_own_only_problem(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, "nodes:\n  a: {sql: SELECT 1, fetchh: one}\n")
    assert err.problems == [err] and "more" not in str(err)


@pytest.mark.parametrize("value", ["42", "{a: 1}", "true"])
def test_a_value_no_member_of_a_union_takes_is_one_problem(write_flow: Callable[..., Path], value: str) -> None:
    # `sql:` is a string or a list of them: both refuse 42, at one place, and that is one problem.
    err = _error(write_flow, f"nodes:\n  a:\n    sql: {value}\n")
    assert err.problems == [err] and "more" not in str(err)
    assert "valid string, or " in str(err) and (err.line, err.node) == (3, "a")


def test_wrong_type_names_the_field(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, """
        nodes:
          a:
            sql: SELECT 1
            fetch: many
        """)
    assert (err.line, err.node) == (4, "a")
    assert "fetch" in err.message


def test_a_node_needs_sql_or_call(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, """
        nodes:
          a:
            fetch: one
        """)
    assert err.node == "a" and err.line == 2
    assert "either `sql:` or `call:`" in err.message


def test_sql_and_call_together_are_refused(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, """
        nodes:
          a:
            sql: SELECT 1
            call: tests.nodes:echo
        """)
    assert err.node == "a" and "unknown key 'call'" in err.message


def test_duplicate_keys_are_refused_with_both_lines(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, """
        nodes:
          a:
            sql: SELECT 1
          b:
            sql: SELECT 2
          a:
            sql: SELECT 3
        """)
    assert err.line == 6
    assert "duplicate key 'a'" in err.message and "first at line 2" in err.message


def test_duplicate_key_inside_a_node_names_the_node(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, """
        nodes:
          a:
            sql: SELECT 1
            sql: SELECT 2
        """)
    assert err.line == 4 and "in node 'a'" in err.message


@pytest.mark.parametrize(
    "tag",
    [
        pytest.param("!!python/object/apply:os.system ['true']", id="apply"),
        pytest.param("!!python/name:os.system", id="name"),
        pytest.param("!custom 1", id="local-tag"),
    ],
)
def test_object_tags_are_refused(write_flow: Callable[..., Path], tag: str) -> None:
    err = _error(write_flow, f"nodes:\n  a:\n    call: tests.nodes:echo\n    default: {tag}\n")
    assert err.line == 4
    assert "tag" in err.message


@pytest.mark.parametrize("duration", ["3 parsecs", "10", "-1s", "0s", "25h", "1e9s"])
def test_bad_durations_are_refused(write_flow: Callable[..., Path], duration: str) -> None:
    err = _error(write_flow, f"nodes:\n  a:\n    call: tests.nodes:echo\n    timeout: {duration}\n")
    assert (err.line, err.node) == (4, "a")
    assert "duration" in err.message


@pytest.mark.parametrize(("text", "seconds"), [("300ms", 0.3), ("2s", 2.0), ("1.5m", 90.0), ("1h", 3600.0)])
def test_durations_take_a_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_yaml_syntax_error_has_line_and_column(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, "nodes:\n  a: {call: tests.nodes:echo\n  b: 1\n")
    assert err.line is not None and err.column is not None
    assert err.message.startswith("YAML:")


def test_name_key_must_match_the_file(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, "name: other\nnodes:\n  a: {sql: SELECT 1}\n")
    assert err.line == 1 and "does not match" in err.message


def test_invalid_node_name_is_refused(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, "nodes:\n  bad-name: {sql: SELECT 1}\n")
    assert "not a valid name" in err.message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('nodes:\n  "a\\n": {sql: SELECT 1}\n', id="node"),
        pytest.param('inputs:\n  "a\\n": str\nnodes:\n  b: {sql: SELECT 1}\n', id="input"),
    ],
)
def test_a_name_ending_in_a_newline_is_refused(write_flow: Callable[..., Path], text: str) -> None:
    err = _error(write_flow, text)
    assert "'a\\n' is not a valid name" in err.message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('inputs: {x: int}\nnodes:\n  a: {call: tests.nodes:echo, with: {value: "$x\\n"}}\n', id="with"),
        pytest.param('inputs: {x: int}\nnodes:\n  a: {sql: SELECT 1}\noutput: {o: "$x\\n"}\n', id="output"),
    ],
)
def test_a_reference_ending_in_a_newline_is_refused(write_flow: Callable[..., Path], text: str) -> None:
    err = _error(write_flow, text)
    assert "is not a reference" in err.message


def test_input_and_node_names_must_differ(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, "inputs: {a: str}\nnodes:\n  a: {sql: SELECT 1}\n")
    assert "both an input and a node" in err.message


def test_an_empty_file_is_refused(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, "\n")
    assert "mapping" in err.message


def test_an_alias_bomb_is_refused_quickly(write_flow: Callable[..., Path]) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 10)}]" for i in range(1, 9)]
    err = _error(write_flow, "\n".join(lines) + "\nnodes: {a: {sql: SELECT 1}}\n")
    assert "alias" in err.message


def test_a_missing_file_is_a_flow_file_error(tmp_path: Path) -> None:
    with pytest.raises(FlowFileError, match="cannot read"):
        load_flow(tmp_path / "nope.yaml")


def test_the_error_lists_further_problems(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, "nodes:\n  a: {sql: SELECT 1, fetch: x, oops: 1}\n")
    assert "and 1 more" in err.message


def test_yaml_booleans_are_yaml_1_2_so_on_stays_a_key(write_flow: Callable[..., Path]) -> None:
    flow = load_flow(write_flow("nodes:\n  a: {call: tests.nodes:echo, with: {value: yes}, retry: {on: any}}\n"))
    assert flow.nodes["a"].retry.on_any
    assert flow.nodes["a"].body == CallBody(target="tests.nodes:echo", args={"value": "yes"})


def test_an_input_default_must_fit_its_type(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, "inputs:\n  limit: {type: int, default: twenty}\nnodes:\n  a: {sql: SELECT $limit}\n")
    assert err.line == 2 and "does not fit type int" in err.message
