"""Hostile input: malformed flows, values that try to change the SQL, calls outside the allow-list."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import planner.errors as errors
from planner import FlowFailed, FlowFileError, NodeState, Planner, QueryError, load_flow
from planner.config import CallTargets

BAD = Path(__file__).resolve().parent.parent / "data" / "bad_flows"
PLANNER = str(Path(sys.executable).parent / "planner")
_EXPECT = re.compile(r"^# expect: (\w+) node=(\S+) line=(\S+)")


def _cases() -> list[tuple[Path, str, str | None, int | None]]:
    out = []
    for path in sorted(BAD.glob("*.yaml")):
        first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
        cls, node, line = _EXPECT.match(first).groups()  # type: ignore[union-attr]
        out.append((path, cls, None if node == "-" else node, None if line == "-" else int(line)))
    return out


CASES = _cases()


def test_the_corpus_has_at_least_forty_files() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize(("path", "cls", "node", "line"), CASES, ids=[c[0].stem for c in CASES])
def test_each_bad_flow_gives_the_right_error_quickly(path: Path, cls: str, node: str | None, line: int | None) -> None:
    t0 = time.perf_counter()
    with pytest.raises(FlowFileError) as info:
        load_flow(path) if not _needs_binding(path) else _bind(path)
    elapsed = time.perf_counter() - t0
    err = info.value
    assert type(err) is getattr(errors, cls), f"{type(err).__name__}: {err}"
    assert err.file == str(path) and str(path) in str(err)
    assert err.node == node
    if line is not None:
        assert err.line == line, str(err)
    assert elapsed < 1.0, f"{elapsed * 1000:.0f} ms"  # typically a few ms; generous for a noisy machine


def _needs_binding(path: Path) -> bool:
    return path.stem.startswith("call_")


def _bind(path: Path) -> None:
    from planner.kinds import BindEnv, kind_of
    from planner.kinds.backend import Offline

    flow = load_flow(path)
    env = BindEnv(CallTargets(["planner.demo"]), Offline())
    for spec in flow.nodes.values():
        for exc in kind_of(spec.kind).check(spec, flow.marks, env):
            raise exc


def test_a_very_large_file_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("nodes:\n" + "".join(f"  n{i}: {{sql: 'SELECT {i}'}}\n" for i in range(100_000)))
    t0 = time.perf_counter()
    with pytest.raises(FlowFileError, match="larger than"):
        load_flow(path)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.subprocess
def test_validate_prints_one_line_and_fails_for_each_bad_flow() -> None:
    proc = subprocess.run([PLANNER, "validate", *(str(c[0]) for c in CASES)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(CASES)
    for line, (path, _cls, _node, _line) in zip(lines, CASES, strict=True):
        assert line.startswith(f"{path}:"), line


# --- values can never change the SQL ------------------------------------------------------


@pytest.fixture
async def echo_planner(tmp_path: Path, demo_dsn: str) -> AsyncIterator[Planner]:
    (tmp_path / "echo.yaml").write_text(
        "inputs: {text: str}\n"
        "nodes:\n"
        "  put:\n"
        "    sql: INSERT INTO whatsapp_instances (instance_name) VALUES ($text) RETURNING id, instance_name\n"
        "    fetch: one\n"
        "    on_error: fail\n"
        "  back:\n"
        "    sql: SELECT instance_name FROM whatsapp_instances WHERE id = $put.id\n"
        "    fetch: value\n"
    )
    async with Planner(flows=tmp_path, dsn=demo_dsn) as planner:
        yield planner


nasty = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1, max_size=60) | st.sampled_from(
    ["'", "''", "\\", "$1", "$text", "$$", "$tag$", "'); DROP TABLE whatsapp_instances; --", "\" OR 1=1 --", "E'\\x41'", "/*", "--"]
)
_counter = iter(range(10**9))


@pytest.mark.slow  # 60 texts, each a run on the database
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=nasty)
async def test_any_text_is_stored_and_read_back_exactly(echo_planner: Planner, text: str) -> None:
    unique = f"{text}#{next(_counter)}"  # instance_name is unique
    result = await echo_planner.run("echo", {"text": unique})
    assert result.values["put"]["instance_name"] == unique
    assert result.values["back"] == unique


async def test_a_nul_character_is_a_clear_node_error_and_writes_nothing(echo_planner: Planner, demo_dsn: str) -> None:
    with pytest.raises(FlowFailed) as info:
        await echo_planner.run("echo", {"text": "before\x00after"})
    node = info.value.result.nodes["put"]
    assert node.state is NodeState.FAILED and isinstance(node.error, QueryError)
    assert "0x00" in str(node.error) or "NUL" in str(node.error).upper()
    con = await asyncpg.connect(demo_dsn)
    try:
        assert await con.fetchval("SELECT count(*) FROM whatsapp_instances WHERE instance_name LIKE 'before%'") == 0
    finally:
        await con.close()


# --- the allow-list, by every spelling ------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "os:system", "builtins:eval", "builtins:exec", "subprocess:run", "importlib:import_module",
        "os.path:join", "posix:system", "planner.demo.escalation:itertools", "planner.demo.escalation:itertools.chain",
        "planner.demo.escalation:__builtins__", "planner.demo.escalation:Any", "planner.demo.escalation:__import__",
        ".demo.escalation:needs_escalation", "planner.demo..escalation:needs_escalation", "planner.demo.escalation: needs_escalation",
        "planner.demo.escalation:needs_escalation.__globals__", "planner.demoevil:x", "planner.demo_evil:x",
        "planner.demo/escalation:needs_escalation", "planner.demo.escalation", "planner.ｄemo.escalation:needs_escalation",
        "planner.demo.escalation:needs_escalation()", "__import__('os'):system",
    ],
)
def test_no_spelling_reaches_outside_the_allowed_modules(target: str) -> None:
    with pytest.raises(ValueError):
        CallTargets(["planner.demo"]).resolve(target)


def test_the_allowed_function_itself_resolves() -> None:
    from planner.demo.escalation import needs_escalation

    assert CallTargets(["planner.demo"]).resolve("planner.demo.escalation:needs_escalation") is needs_escalation




def test_a_flows_folder_module_cannot_borrow_a_standard_library_name(tmp_path: Path) -> None:
    (tmp_path / "os.py").write_text("def popen(cmd):\n    return cmd\n")
    (tmp_path / "json.py").write_text("")
    (tmp_path / "mytasks.py").write_text("def ok():\n    return 1\n")
    allowed = CallTargets(folder=tmp_path).allowed
    assert "mytasks" in allowed and "os" not in allowed and "json" not in allowed
    with pytest.raises(ValueError, match="not allowed"):
        CallTargets(allowed).resolve("os:popen")
