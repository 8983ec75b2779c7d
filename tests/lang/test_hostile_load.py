"""Whatever a YAML author writes, loading ends in a FlowFileError naming the file, line and node.

Each class of input below used to escape as another exception (ValueError, RecursionError),
load silently as something else, or hang. `UNEXPECTED` is the code of the loader's backstop:
a test here passes only when a specific check caught the problem.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner import FlowFileError, FlowInputError, Planner, load_flow
from planner.graph import compile_flow
from planner.lang.loader import MAX_FILE_BYTES, UNEXPECTED, FileStamp, load_spec, load_text, read_flow_text

PLANNER = str(Path(sys.executable).parent / "planner")


def _error(write_flow: Callable[..., Path], text: str) -> FlowFileError:
    path = write_flow(text)
    with pytest.raises(FlowFileError) as info:
        load_flow(path)
    err = info.value
    assert err.code != UNEXPECTED, str(err)
    assert err.file == str(path)
    return err


def _default(value: str) -> str:
    return f"nodes:\n  a:\n    sql: SELECT 1\n    default: {value}\n"


# --- dates and times the calendar refuses -------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["2024-02-30", "2023-02-29", "2024-13-01", "2024-01-01 25:00:00", "2024-01-01 10:61:00", "2024-01-01T10:00:00+99:00"],
)
def test_an_impossible_date_is_refused_at_its_line(write_flow: Callable[..., Path], value: str) -> None:
    err = _error(write_flow, _default(value))
    assert (err.line, err.node) == (4, "a")
    assert f"{value!r} is not a valid date or time" in err.message


@pytest.mark.parametrize(
    ("text", "line", "node"),
    [
        pytest.param("inputs:\n  d: {type: json, default: 2024-02-30}\nnodes:\n  a: {sql: SELECT 1}\n", 2, None, id="input-default"),
        pytest.param("nodes:\n  a:\n    call: tests.nodes:echo\n    with: {value: 2024-02-30}\n", 4, "a", id="with"),
        pytest.param("nodes:\n  a: {sql: SELECT 1}\noutput:\n  d: 2024-02-30\n", 4, None, id="output"),
        pytest.param("nodes:\n  a:\n    sql: SELECT 1\n    default: {2024-02-30: x}\n", 4, "a", id="mapping-key"),
    ],
)
def test_an_impossible_date_is_refused_wherever_it_is_written(
    write_flow: Callable[..., Path], text: str, line: int, node: str | None
) -> None:
    err = _error(write_flow, text)
    assert (err.line, err.node) == (line, node)
    assert "not a valid date or time" in err.message


# --- numbers too large to convert, or that cannot be converted at all ---------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("9" * 5000, id="decimal"),
        pytest.param("-" + "9" * 5000, id="negative"),
        pytest.param("0x" + "f" * 5000, id="hex"),
        pytest.param("0" + "7" * 5000, id="octal"),
        pytest.param("0b" + "1" * 5000, id="binary"),
        pytest.param("1" + ":59" * 2000, id="sexagesimal"),
        pytest.param("9" * 5000 + ".5", id="float-digits"),
    ],
)
def test_a_huge_yaml_number_is_refused_before_it_is_converted(write_flow: Callable[..., Path], value: str) -> None:
    err = _error(write_flow, _default(value))
    assert (err.line, err.column, err.node) == (4, 14, "a")
    assert "characters long (at most 1000)" in err.message


def test_a_float_that_overflows_is_refused_not_read_as_infinity(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, _default("1.0e+99999"))
    assert (err.line, err.node) == (4, "a")
    assert "too large" in err.message


@pytest.mark.parametrize("value", ["0b_", "-0b_", "0x_"])
def test_a_number_python_cannot_read_is_refused(write_flow: Callable[..., Path], value: str) -> None:
    err = _error(write_flow, _default(value))
    assert (err.line, err.node) == (4, "a")
    assert f"{value!r} is not a valid number" in err.message


@pytest.mark.parametrize(
    ("value", "kind"),
    [("!!int x", "number"), ("!!float x", "number"), ("!!bool x", "boolean"), ("!!timestamp x", "date or time")],
)
def test_a_value_its_explicit_tag_refuses_is_refused(write_flow: Callable[..., Path], value: str, kind: str) -> None:
    err = _error(write_flow, _default(value))
    assert (err.line, err.node) == (4, "a")
    assert f"'x' is not a valid {kind}" in err.message


def test_a_huge_number_as_a_mapping_key_is_refused(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, "nodes:\n  a:\n    sql: SELECT 1\n    default:\n      ? " + "9" * 5000 + "\n      : x\n")
    assert (err.line, err.node) == (5, "a")
    assert "characters long" in err.message


def _when(expression: str) -> str:
    return f"inputs: {{x: int}}\nnodes:\n  a:\n    sql: SELECT 1\n    when: '{expression}'\n"


@pytest.mark.parametrize(
    "literal", [pytest.param("9" * 5000, id="int"), pytest.param("1" + "0" * 400 + ".5", id="float-overflow")]
)
def test_a_huge_number_in_when_is_refused_at_its_column(write_flow: Callable[..., Path], literal: str) -> None:
    err = _error(write_flow, _when(f"$x == {literal}"))
    assert (err.line, err.node, err.code) == (5, "a", "PLN120")
    assert err.column == 12 + len("$x == ")  # the number's own column in the file
    assert "number" in err.message


# --- nesting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression",
    [
        pytest.param("(" * 300 + "$x" + ")" * 300, id="parentheses"),
        pytest.param("not " * 3000 + "$x", id="not"),
        pytest.param("$x in " + "[" * 300 + "]" * 300, id="lists"),
        pytest.param("not (" * 200 + "$x" + ")" * 200, id="mixed"),
    ],
)
def test_a_deeply_nested_when_is_refused_with_a_clear_message(write_flow: Callable[..., Path], expression: str) -> None:
    err = _error(write_flow, _when(expression))
    assert (err.line, err.node, err.code) == (5, "a", "PLN120")
    assert "nested too deeply" in err.message


def test_a_when_nested_to_the_limit_loads(write_flow: Callable[..., Path]) -> None:
    from planner.lang.expr import MAX_DEPTH

    flow = load_flow(write_flow(_when("(" * MAX_DEPTH + "$x" + ")" * MAX_DEPTH)))
    assert flow.nodes["a"].deps == ()


def _nested_block(levels: int) -> str:
    return "".join(f"{'  ' * (i + 3)}k:\n" for i in range(levels)) + f"{'  ' * (levels + 3)}v: 1\n"


@pytest.mark.parametrize(
    ("text", "line", "node"),
    [
        pytest.param(_default("[" * 100 + "]" * 100), 4, "a", id="flow-lists-in-default"),
        pytest.param("nodes:\n  a:\n    sql: SELECT 1\n    default:\n" + _nested_block(100), 66, "a", id="block-mappings"),
        pytest.param("nodes:\n  a:\n    call: tests.nodes:echo\n    with: {value: " + "[" * 100 + "]" * 100 + "}\n", 4, "a", id="with"),
        pytest.param("nodes:\n  a: {sql: SELECT 1}\noutput:\n  k: " + "{a: " * 100 + "1" + "}" * 100 + "\n", 4, None, id="output"),
    ],
)
def test_deep_yaml_nesting_is_refused_at_its_line(write_flow: Callable[..., Path], text: str, line: int, node: str | None) -> None:
    err = _error(write_flow, text)
    assert (err.line, err.node) == (line, node)
    assert "nested more than 64 levels deep" in err.message


def test_nesting_made_deep_by_aliases_is_refused(write_flow: Callable[..., Path]) -> None:
    inner = "&d " + "[" * 40 + "]" * 40
    err = _error(write_flow, _default(f"[{inner}, {'[' * 40}*d{']' * 40}]"))
    assert err.node == "a" and err.line == 4
    assert "once aliases are expanded" in err.message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(_default("&x [*x]"), id="default-list"),
        pytest.param("nodes:\n  a:\n    call: tests.nodes:echo\n    with: &x {value: *x}\n", id="with-mapping"),
    ],
)
def test_a_value_that_contains_itself_is_refused(write_flow: Callable[..., Path], text: str) -> None:
    err = _error(write_flow, text)
    assert (err.line, err.node) == (4, "a")
    assert "contains it" in err.message


# --- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mapping", ["{1: a, 0x1: b}", "{1: a, 1.0: b}", "{true: a, 1: b}", "{null: a, ~: b}", "{2024-01-01 00:00:00: a, 2024-01-01T00:00:00: b}"])
def test_keys_that_are_the_same_value_are_duplicates(write_flow: Callable[..., Path], mapping: str) -> None:
    err = _error(write_flow, _default(mapping))
    assert (err.line, err.node) == (4, "a")
    assert "duplicate key" in err.message


def test_a_schema_error_with_no_key_of_its_own_still_has_a_line(write_flow: Callable[..., Path]) -> None:
    err = _error(write_flow, "# a comment\ndescription: no nodes\n")
    assert err.line == 2 and "missing required key 'nodes'" in err.message


# --- the backstop -------------------------------------------------------------------------


def test_an_unforeseen_failure_while_loading_is_still_a_flow_file_error(
    write_flow: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from planner.lang.models import FlowSpec

    def broken(data: object) -> None:
        raise TypeError("unforeseen")

    monkeypatch.setattr(FlowSpec, "model_validate", broken)
    path = write_flow(_default("1"))
    with pytest.raises(FlowFileError) as info:
        load_spec(path)
    assert (info.value.code, info.value.file) == (UNEXPECTED, str(path))
    assert "TypeError: unforeseen" in info.value.message


def test_an_unforeseen_failure_while_compiling_is_still_a_flow_file_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import planner.graph

    def broken(*args: object) -> None:
        raise KeyError("unforeseen")

    loaded = load_text(_default("1"), file="t.yaml", name="t")
    monkeypatch.setattr(planner.graph, "_compile_node", broken)
    with pytest.raises(FlowFileError) as info:
        compile_flow(loaded)
    assert (info.value.code, info.value.file) == (UNEXPECTED, "t.yaml")


# --- random and mutated flows (hypothesis) ------------------------------------------------

SEED = """\
description: fuzz
inputs:
  x: int
  s: {type: str, default: hi}
settings: {mode: eager, timeout: 5s}
nodes:
  a:
    sql: SELECT $x, 'lit', "id" -- c
    fetch: one
    default: [1, {k: v}]
  b:
    call: tests.nodes:echo
    with: {value: $a.id, more: [$x, $$x]}
    when: $x > 1 and not ($a.id in [1, 2]) or $s == 'y'
    retry: {attempts: 2, backoff: 10ms}
    after: [a]
output:
  r: $b
"""
FRAGMENTS = [
    "2024-02-30", "2024-01-01 25:00:00", "9" * 1200, "0x" + "f" * 1200, "1" + ":59" * 400, "0b_", "1.0e+999",
    "[" * 70, "]" * 70, "{" * 70, "}", "(" * 40, ")" * 40, "not " * 40, "&a ", "*a", "&a [*a]", "<<: *a",
    "!!python/name:os.system ", "!!binary x", "!!timestamp x", "!!int x", "!x ", "? ", ": ", "- ", "\t", "\n",
    "'", '"', "$", "$$", "$1", "$a\n", "\\", "\x00", "\ufeff", "\u2028", "\x85", "~", "-.inf", ".nan", "%YAML 1.1\n",
    "---\n", "...\n", "#", "|\n", ">-\n", "0o7", "1_000", "=", "!", "&", "*", "@", "`", "/*", "--", "$t$", "E'\\'",
]


@st.composite
def mutated_flows(draw: st.DrawFn) -> str:
    text = SEED
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(text)))
        piece = draw(st.sampled_from(FRAGMENTS) | st.text(max_size=6))
        kind = draw(st.sampled_from(["insert", "replace", "delete"]))
        if kind == "insert":
            text = text[:pos] + piece + text[pos:]
        elif kind == "replace":
            text = text[:pos] + piece + text[pos + len(piece):]
        else:
            text = text[:pos] + text[pos + draw(st.integers(1, 30)):]
    return text


_WHEN_CHARS = "$ax.0()[],'\"=<>! andortuefslin123456789-\\\n"
_SQL_CHARS = "$ax.0_'\"-/*\n\\eE ;$1"


def _nested_list(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


def _nested_when(depth: int, kind: str, inner: str) -> str:
    opening, closing = {"parens": ("(", ")"), "not": ("not ", ""), "lists": ("$x in [", "]")}[kind]
    return opening * depth + inner + closing * depth


_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.dates() | st.datetimes()
    | st.integers(10**900, 10**1100)  # around the length limit, both sides
    | st.integers(50, 90).map(_nested_list)  # around the depth limit
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=20,
)
_whens = st.text(_WHEN_CHARS, max_size=40) | st.builds(
    _nested_when, st.integers(0, 400), st.sampled_from(["parens", "not", "lists"]), st.sampled_from(["$x", "1", "9" * 1100])
)


@st.composite
def generated_flows(draw: st.DrawFn) -> str:
    """Well-formed YAML whose contents are random: the schema, references and expressions."""
    import yaml

    node: dict[str, object] = {"sql": draw(st.text(_SQL_CHARS, min_size=1, max_size=40))}
    if draw(st.booleans()):
        node = {"call": "tests.nodes:echo", "with": draw(st.dictionaries(st.text(max_size=5), _values, max_size=3))}
    node["when"] = draw(_whens)
    node["default"] = draw(_values)
    flow = {"inputs": {"x": "int"}, "nodes": {draw(st.just("a") | st.text(max_size=6)): node}, "output": {"o": draw(_values)}}
    return str(yaml.safe_dump(flow, allow_unicode=draw(st.booleans())))


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "t.yaml"


def _only_a_specific_flow_file_error(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        compile_flow(load_spec(path))
    except FlowFileError as exc:
        assert exc.code != UNEXPECTED, str(exc)
        assert exc.file == str(path) and exc.line is not None, str(exc)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutated_flows())
def test_a_mutated_flow_loads_or_fails_with_a_flow_file_error(fuzz_file: Path, text: str) -> None:
    _only_a_specific_flow_file_error(fuzz_file, text.encode("utf-8", "surrogatepass"))


@pytest.mark.slow  # 200 generated flows
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=generated_flows())
def test_a_generated_flow_loads_or_fails_with_a_flow_file_error(fuzz_file: Path, text: str) -> None:
    _only_a_specific_flow_file_error(fuzz_file, text.encode("utf-8", "surrogatepass"))


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_load_or_fail_with_a_flow_file_error(fuzz_file: Path, data: bytes) -> None:
    _only_a_specific_flow_file_error(fuzz_file, data)


# --- reading the file: a bound on what is read, and on what is waited for ------------------


def test_a_huge_sparse_file_is_refused_without_being_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(64 * MAX_FILE_BYTES)  # sparse: no disk used, but 128 MB if it were read
    tracemalloc.start()
    try:
        with pytest.raises(FlowFileError, match="larger than"):
            load_spec(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_FILE_BYTES // 4


def test_a_file_that_grows_after_its_size_was_checked_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "growing.yaml"
    path.write_text(_default("1"))
    real_fstat = os.fstat

    def fstat_then_grow(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        with path.open("ab") as f:  # another process appends, just after the size was taken
            f.write(b"#" * (MAX_FILE_BYTES + 10))
        return st

    monkeypatch.setattr(os, "fstat", fstat_then_grow)
    with pytest.raises(FlowFileError, match="larger than"):
        load_spec(path)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _load_in_child(path: Path) -> str:
    """`load_spec(path)` in a child bounded in memory and time: a regression that reads without
    a bound, or waits on a FIFO, fails this test instead of exhausting or hanging the machine."""
    code = (
        "import sys\nfrom planner.lang.loader import load_spec\n"
        "try:\n    load_spec(sys.argv[1])\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True, text=True, timeout=60, cwd=path.parent, preexec_fn=_limit_memory,
    )
    return proc.stdout.strip()


@pytest.mark.subprocess
def test_a_link_to_dev_zero_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    assert _load_in_child(link) == f"FlowFileError {link}: not a regular file (a character device): a flow must be a file"


@pytest.mark.subprocess
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    assert _load_in_child(fifo) == f"FlowFileError {fifo}: not a regular file (a FIFO): a flow must be a file"


def test_read_flow_text_returns_the_text_and_the_stamp_of_what_it_read(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(_default("1"))
    st = path.stat()
    assert read_flow_text(path) == (_default("1"), FileStamp.of(st))
    assert load_spec(path).stamp == FileStamp.of(st)


def test_a_limit_can_be_given_to_read_flow_text(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(_default("1"))
    with pytest.raises(FlowFileError, match="larger than 10 bytes"):
        read_flow_text(path, limit=10)


# --- names are whole names ----------------------------------------------------------------


def test_a_flow_name_ending_in_a_newline_is_not_a_flow_name(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(_default("1"))
    with pytest.raises(FlowInputError, match="is not a flow name"):
        Planner(flows=tmp_path).path_of("a\n")


def test_a_module_file_whose_name_ends_in_a_newline_is_not_allowed(tmp_path: Path) -> None:
    from planner.config import CallTargets

    (tmp_path / "mytasks\n.py").write_text("def f():\n    return 1\n")
    assert "mytasks\n" not in CallTargets(folder=tmp_path).allowed


# --- `planner validate` reports every broken file -------------------------------------------


def _validate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "PLANNER_HOME": str(cwd / "home")}
    return subprocess.run(
        [PLANNER, "validate", *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env, preexec_fn=_limit_memory
    )


BROKEN = {
    "bad_date.yaml": _default("2024-02-30"),
    "deep_when.yaml": _when("(" * 300 + "$x" + ")" * 300),
    "huge_int.yaml": _default("9" * 5000),
    "itself.yaml": _default("&x [*x]"),
    "raises_on_import.yaml": "nodes:\n  a:\n    call: boom:f\n",
}


@pytest.mark.subprocess
def test_validate_reports_each_broken_file_and_goes_on(tmp_path: Path) -> None:
    for name, text in BROKEN.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "boom.py").write_text("raise RuntimeError('boom at import')\n\ndef f():\n    return 1\n")
    (tmp_path / "good.yaml").write_text(_default("1"))
    proc = _validate("--flows", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [str(tmp_path / name) for name in sorted(BROKEN)]
    assert "RuntimeError: boom at import" in lines[-1]


@pytest.mark.subprocess
def test_validate_checks_a_path_as_given_whatever_its_name(tmp_path: Path) -> None:
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "flow.yaml.bak").write_text(_default("2024-02-30"))
    proc = _validate(str(tmp_path / "zero"), str(tmp_path / "flow.yaml.bak"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"{tmp_path / 'zero'}:1:1: PLN100 not a regular file")
    assert lines[1].startswith(f"{tmp_path / 'flow.yaml.bak'}:4:14: PLN100 node 'a': YAML: '2024-02-30' is not a valid date")
